"""
What each kind of device can do, for training and for the scripts: the best one available, the
autocast dtype its hardware has, waiting for its queued work, its peak FLOP/s (for MFU), the
largest micro-batch that fits in its memory, the peak memory a process used, and a CPU allocator
setting that keeps steps fast.
"""

import contextlib
import ctypes
import gc
import sys

import torch

from support.datafiles import GPT2_VOCAB_SIZE


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device):
    """The device, if this machine has it: else one line saying which it has."""
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.split(":")[0]):
        usable = ", ".join(k for k, ok in available.items() if ok)
        raise SystemExit(f"--device {device} is not available on this machine (it has: {usable})")
    return device


def out_of_memory(error):
    """Whether an exception says the device (or the host) ran out of memory."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def autocast_dtype(requested, device_type):
    """bf16 where the hardware has it, fp16 (with loss scaling) on older GPUs, else fp32."""
    if requested != "auto":
        return getattr(torch, requested)
    if device_type == "cuda":
        # V100 and T4 (compute capability < 8) have no bf16 tensor cores
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    if device_type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16():
    """CPUs with AVX512-BF16 (or AMX) run bf16 matmuls 3-4x faster than fp32 ones."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_context(dtype, device_type):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def to_device(t, device):
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)  # the copy overlaps with GPU work
    return t.to(device)


def synchronize(device):
    """Wait until the device has done its queued work (CUDA and MPS run asynchronously): step
    times are measured after it."""
    device = str(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def keep_freed_cpu_memory():
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default every freed block over 32MB goes back to the OS, so a CPU step that allocates
    hundreds of MB of logits page-faults all of them in afresh: measured on a 2-core CPU, that
    made the default run's steps three times slower. Linux (glibc) only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not from fresh mmaps
    libc.mallopt(M_TRIM_THRESHOLD, 2**62)  # never shrink the heap
    libc.mallopt(M_TOP_PAD, 2**30)  # grow it in 1GB steps


# Dense bf16 (fp16 for pre-Ampere) tensor-core peaks from the vendors' data sheets, in FLOP/s;
# the first name that occurs in torch.cuda.get_device_name() wins.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device):
    """The device's peak bf16 FLOP/s, or None where we do not know it (CPUs, unlisted GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def mfu(flops_per_token, tokens_per_sec, peak):
    """Model FLOPs utilization: the training FLOP/s achieved, as a fraction of the peak."""
    return flops_per_token * tokens_per_sec / peak


def largest_micro_batch(fits, total_batch_size, T, world_size, largest=64):
    """The largest power-of-two B, at most `largest`, that cuts a step's tokens into whole
    micro-batches of every rank and for which fits(B) holds (fits None: every B fits), tried
    from the top down."""
    B = largest
    while B >= 1:
        if total_batch_size % (B * T * world_size) == 0 and (fits is None or fits(B)):
            return B
        B //= 2
    raise SystemExit(
        f"no micro-batch B <= {largest} of T={T} tokens both fits in memory and divides "
        f"total_batch_size={total_batch_size} over {world_size} ranks"
    )


def micro_batch_fits(model, T, device, autocast, state_shards=1):
    """fits(B) for largest_micro_batch on CUDA: one eager forward and backward of B random
    sequences of T tokens, whose peak memory plus the optimizer state to come must fit the GPU.
    The optimizer state is AdamW's two float32 moments per parameter at most, split over
    state_shards ranks (FSDP's); the model probed is whole, so a B that fits here fits sharded."""
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_state = 8 * sum(p.numel() for p in model.parameters()) // state_shards

    def fits(B):
        x = torch.randint(0, GPT2_VOCAB_SIZE, (B, T), device=device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with autocast:
                _, loss = model(x, x)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)
            return peak + optimizer_state < 0.95 * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()

    return fits


# -----------------------------------------------------------------------------
# Peak memory


def reset_peak_memory(device):
    """Start a peak-memory measurement: returns the memory in use now (bytes), or None where it
    cannot be measured. On CUDA the caching allocator's counters; on Linux resident memory."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        # keep_freed_cpu_memory keeps freed memory in the heap: hand it back to the OS so that
        # what was freed before does not count, then reset the kernel's high-water mark of
        # resident memory to the current value (proc(5): clear_refs, Linux 4.0 and later)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return resident_bytes("VmRSS")
    except OSError:
        return None


def peak_memory(device):
    """Bytes at the peak since the process started or reset_peak_memory: allocated on a CUDA
    device, else the process's resident memory (a CPU's, which MPS shares), or None where the OS
    does not tell it."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    try:
        return resident_bytes("VmHWM")
    except OSError:  # no /proc: not Linux
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # macOS counts bytes, others KiB


def resident_bytes(field):
    """A memory figure of this process from /proc/self/status (Linux): VmRSS, VmHWM."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")
