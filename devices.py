"""
What each kind of device can do, for training and for the scripts: the best one available, the
autocast dtype its hardware has, waiting for its queued work, its peak FLOP/s (for MFU), the
largest micro-batch that fits in its memory, and a CPU allocator setting that keeps steps fast.
"""

import contextlib
import ctypes
import dataclasses
import sys

import torch

from datafiles import GPT2_VOCAB_SIZE


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


def resolve_micro_batch(cfg, env, model, autocast):
    """cfg with --B auto made a number: on CUDA the largest that fits (one trial step each, from
    64 down), elsewhere the largest power of two up to 64 that divides the step."""
    if cfg.B is not None:
        return cfg
    on_gpu = env.device_type == "cuda"
    fits = micro_batch_fits(model, cfg, env, autocast) if on_gpu else lambda B: True
    B = largest_micro_batch(fits, cfg.total_batch_size, cfg.T, env.world_size)
    env.print0(f"micro-batch B={B}" + (" (the largest that fits in memory)" if on_gpu else ""))
    return dataclasses.replace(cfg, B=B)


def largest_micro_batch(fits, total_batch_size, T, world_size, largest=64):
    """The largest power-of-two B, at most `largest`, that cuts a step's tokens into whole
    micro-batches of every rank and for which fits(B) holds, tried from the top down."""
    B = largest
    while B >= 1:
        if total_batch_size % (B * T * world_size) == 0 and fits(B):
            return B
        B //= 2
    raise SystemExit(
        f"no micro-batch B <= {largest} of T={T} tokens both fits in memory and divides "
        f"total_batch_size={total_batch_size} over {world_size} ranks"
    )


def micro_batch_fits(model, cfg, env, autocast):
    """fits(B) for largest_micro_batch on CUDA: one eager forward and backward of B random
    sequences, whose peak memory plus the optimizer state to come must fit the GPU. Under
    --shard fsdp the model probed is still whole (its weights and gradients unsharded, more than
    FSDP holds): a B that fits here fits there."""
    total = torch.cuda.get_device_properties(env.device).total_memory
    params = sum(p.numel() for p in model.parameters())
    # two float32 moments per parameter (AdamW), at most; FSDP keeps 1/world_size of them a rank
    optimizer_state = 8 * params // (env.world_size if cfg.shard == "fsdp" else 1)

    def fits(B):
        x = torch.randint(0, GPT2_VOCAB_SIZE, (B, cfg.T), device=env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        try:
            with autocast:
                _, loss = model(x, x)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(env.device)
            return peak + optimizer_state < 0.95 * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()

    return fits
