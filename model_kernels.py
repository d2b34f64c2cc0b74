"""
Optional kernels of the models, each switched on by one flag of train_gpt2.py:

- --fused_loss 1: the lm_head and the cross-entropy computed together in chunks of rows, so the
  (tokens x vocab) logits tensor never exists (linear_cross_entropy).
- --fp8 1: the four linear layers of every block multiply in FP8 while training (use_fp8_matmuls):
  ours (FP8Linear), or torchao's float8 training with --fp8_kernels (Settings).
- --attention auto|cudnn|flash|math: which kernel computes F.scaled_dot_product_attention, checked
  against the math backend at start-up (choose_attention, attention_backend).

None changes the parameters, so checkpoints are the same with them and without.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from support.cli import setting
from support.devices import autocast_dtype

# --fp8's matmuls: ours (FP8Linear), or torchao's float8 training with its scales per tensor (the
# same arithmetic as ours, but for a float32 rounding of the scales) or per row of each operand;
# which is faster at which size is what `bash .ci/gpu fp8_kernels` measures
FP8_KERNELS = ("ours", "torchao_tensorwise", "torchao_rowwise")


@dataclass
class Settings:
    """The kernels' own settings, declared here as speedrun.Settings is in speedrun.py: fields of
    train_gpt2.py's TrainConfig, each also a flag."""

    fp8_kernels: str = setting("ours", "--fp8's matmuls: ours or torchao's", choices=FP8_KERNELS)


# -----------------------------------------------------------------------------
# The fused lm_head + cross-entropy


def linear_cross_entropy(x, weight, targets, softcap=None, chunk_rows=8192):
    """F.cross_entropy(x @ weight.T, targets) without the (rows, vocab) logits tensor; with
    softcap, of the logits softcap * tanh(logits / softcap).

    The logits exist for chunk_rows rows at a time: their loss and their gradients (softmax minus
    one-hot) are computed together in the forward pass, and the gradients of x and weight are
    kept for backward. For GPT-2 124M at B=64, T=1024, the full logits are 13GB in float32.
    Under autocast the matmuls run in its dtype, as nn.Linear's would.
    """
    x = x.reshape(-1, x.size(-1))
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), softcap, chunk_rows)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_rows):
        n = x.size(0)
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 logits upcast: F.cross_entropy
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        loss = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, n, chunk_rows):
            xc, yc = x[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = (xc @ weight.t()).to(acc)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss += (lse.squeeze(1) - logits.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            # d(mean loss) / d(logits) = (softmax - one_hot) / n
            grad = logits.sub_(lse).exp_()
            grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0
            grad /= n
            if softcap:
                grad *= 1.0 - capped * capped  # through softcap * tanh(z / softcap)
            grad = grad.to(x.dtype)
            grad_x[start : start + chunk_rows] = grad @ weight
            grad_weight += (grad.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


# -----------------------------------------------------------------------------
# FP8 matmuls

# An H100 multiplies fp8 at twice its bf16 rate. Weights and activations are rounded to e4m3
# (more mantissa), gradients to e5m2 (more range), as in "FP8 Formats for Deep Learning"
# (Micikevicius et al. 2022); each tensor is scaled by its own largest magnitude first, so that
# it uses the format's whole range. The weights stay in float32; only the products are fp8.
FP8_WEIGHTS = torch.float8_e4m3fn
FP8_GRADIENTS = torch.float8_e5m2


def to_fp8(x, dtype):
    """(x / scale in fp8, scale): scale maps x's largest magnitude onto the format's largest."""
    top = torch.finfo(dtype).max
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / top
    return (x.float() / scale).clamp(-top, top).to(dtype), scale


def fp8_matmul(a, b, scale_a, scale_b, out_dtype):
    """(a * scale_a) @ (b * scale_b) in fp32 sums. cuBLAS multiplies fp8 only with a row-major
    and b column-major (and sizes that are multiples of 16): they are copied so where not."""
    a, b = a.contiguous(), b.t().contiguous().t()
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


class FP8Matmul(torch.autograd.Function):
    """x @ weight.T with the forward's operands in e4m3 and the gradient in e5m2; backward
    reuses the forward's fp8 copies, which are all it keeps (a quarter of float32's memory)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_scale = to_fp8(x.reshape(-1, x.size(-1)), FP8_WEIGHTS)
        w8, w_scale = to_fp8(weight, FP8_WEIGHTS)
        out = fp8_matmul(x8, w8.t(), x_scale, w_scale, out_dtype)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.x_dtype, ctx.x_shape, ctx.weight_dtype = x.dtype, x.shape, weight.dtype
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        g8, g_scale = to_fp8(grad.reshape(-1, grad.size(-1)), FP8_GRADIENTS)
        grad_x = fp8_matmul(g8, w8, g_scale, w_scale, ctx.x_dtype)
        grad_weight = fp8_matmul(g8.t(), x8, g_scale, x_scale, torch.float32)
        return grad_x.view(ctx.x_shape), grad_weight.to(ctx.weight_dtype), None


class FP8Linear(nn.Linear):
    """nn.Linear whose matmul is FP8Matmul where gradients are computed (training); under
    no_grad (validation, HellaSwag, sampling) it is the plain layer, in the autocast dtype."""

    @classmethod
    def sharing(cls, linear):
        """An FP8Linear with the very parameters of `linear` (made on the meta device, so that
        no weights are initialized and no random numbers drawn)."""
        fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        fp8.weight, fp8.bias = linear.weight, linear.bias
        return fp8

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        device = x.device.type
        on = torch.is_autocast_enabled(device)
        y = FP8Matmul.apply(x, self.weight, torch.get_autocast_dtype(device) if on else x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_fp8_matmuls(model, kernels="ours"):
    """Replace the linear layers of every block by FP8Linear layers holding the same parameters
    (the embedding and lm_head stay as they are), so that checkpoints do not change; or, with
    kernels torchao_tensorwise or torchao_rowwise, by torchao's (use_torchao_float8)."""
    if kernels != "ours":
        return use_torchao_float8(model, kernels.removeprefix("torchao_"))
    for block in model.transformer.h:
        for module, name in (
            (block.attn, "c_attn"),
            (block.attn, "c_proj"),
            (block.mlp, "c_fc"),
            (block.mlp, "c_proj"),
        ):
            setattr(module, name, FP8Linear.sharing(getattr(module, name)))


def use_torchao_float8(model, scaling):
    """torchao's float8 training (Float8Linear, with `scaling` tensorwise or rowwise) for the
    linear layers of every block, holding the same parameters. Unlike FP8Linear, its layers
    multiply in FP8 under no_grad too: validation and HellaSwag see the FP8 model."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise SystemExit(
            f"--fp8_kernels torchao_{scaling} needs torchao: pip install torchao"
        ) from None
    config = Float8LinearConfig.from_recipe_name(scaling)
    for block in model.transformer.h:
        convert_to_float8_training(block, config=config)


def fp8_hardware(device):
    """Whether the device multiplies FP8 natively: CUDA GPUs of compute capability 8.9 and
    newer (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device):
    """--fp8 runs on FP8 hardware, and on the CPU, where torch emulates FP8 matmuls (slower than
    float32: for tests)."""
    if torch.device(device).type != "cpu" and not fp8_hardware(device):
        raise SystemExit(
            f"--fp8: {device} has no FP8 matmuls (CUDA GPUs of compute capability 8.9+ have: "
            "H100, H200, L4, RTX 40xx)"
        )


# -----------------------------------------------------------------------------
# The attention backend

# PyTorch's SDPA picks among these kernels by its own fixed order, which on Hopper does not always
# put cuDNN's fused attention first, though it is reported at 1.6-2.3x FlashAttention-2 there for
# training shapes. --attention names the kernel; auto takes the fastest that runs here and agrees
# with the math backend (softmax(QK^T)V written out in matmuls: the reference).
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "math")


def auto_candidates(device):
    """--attention auto's backends, fastest first: on CUDA cuDNN (Hopper and newer only: on older
    GPUs FlashAttention is the faster), FlashAttention, the memory-efficient kernel (float32,
    which flash does not take); elsewhere the CPU's flash kernel."""
    device = torch.device(device)
    if device.type == "cuda":
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
        return ("cudnn",) * hopper + ("flash", "efficient", "math")
    return ("flash", "math")


def attention_tolerance(dtype):
    """The largest error relative to float64 math that a correct kernel shows: 8 roundings of
    the dtype (measured on a CPU: about 1 in bf16 and fp16, 6 in float32), and at least TF32's
    (CUDA's float32 matmuls round to 10 bits with torch.set_float32_matmul_precision("high")).
    A wrong mask or scale is off by 10% or more."""
    return max(8 * torch.finfo(dtype).eps, 2e-3)


def attention_error(name, device, dtype, n_head, head_size, T=256, seed=0):
    """How far backend `name`'s causal attention (output, and the q, k, v gradients) is from the
    math backend's in float64 on a small random input of the run's head shape, relative to the
    largest magnitude of each; None if the backend cannot run it here."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(2, n_head, T, head_size, generator=generator) for _ in range(4))

    def attend(backend, tensors, upstream):
        tensors = [t.to(device, copy=True).requires_grad_() for t in tensors]
        with sdpa_kernel([SDPA_BACKENDS[backend]]):
            y = F.scaled_dot_product_attention(*tensors, is_causal=True)
        y.backward(upstream.to(device))
        return [y.detach()] + [t.grad for t in tensors]

    try:
        got = attend(name, [t.to(dtype) for t in (q, k, v)], grad.to(dtype))
    except RuntimeError:  # "No available kernel": this device, dtype or head size has none
        return None
    want = attend("math", [t.double() for t in (q, k, v)], grad.double())
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))


def choose_attention(name, device, dtype, n_head, head_size):
    """(backend, its error against float64 math): the one --attention names, or auto's first
    candidate that runs here and agrees; a named one that cannot run or disagrees is refused in
    one line."""
    shape = f"{dtype}, head size {head_size}".replace("torch.", "")
    for backend in auto_candidates(device) if name == "auto" else (name,):
        error = attention_error(backend, device, dtype, n_head, head_size)
        if error is not None and error <= attention_tolerance(dtype):
            return backend, error
        if name != "auto" and error is None:
            raise SystemExit(
                f"--attention {name} does not run on {device} ({shape}): use auto or math"
            )
        if name != "auto":
            raise SystemExit(
                f"--attention {name} disagrees with the math backend on {device} ({shape}): "
                f"error {error:.1e} > {attention_tolerance(dtype):.1e}; use auto or math"
            )
    raise SystemExit(f"no attention backend agrees with the math backend on {device} ({shape})")


def attention_backend(backend):
    """`with` it, F.scaled_dot_product_attention runs `backend` first, and another where that
    one cannot (the sampler's masked attention, say); math alone means math everywhere."""
    if backend == "math":
        return sdpa_kernel([SDPBackend.MATH])
    order = [SDPA_BACKENDS[backend]] + [b for n, b in SDPA_BACKENDS.items() if n != backend]
    return sdpa_kernel(order, set_priority=True)


def checked_attention(cfg, env):
    """The context in which a run of TrainConfig `cfg` computes its attention: --attention's
    backend, chosen and checked on env.device (a DistEnv's) for the run's autocast dtype and
    heads, and named in the run's header."""
    dtype = autocast_dtype(cfg.dtype, env.device_type)
    head_size = cfg.n_embd // cfg.n_head
    backend, error = choose_attention(cfg.attention, env.device, dtype, cfg.n_head, head_size)
    dtype_name = str(dtype).removeprefix("torch.")
    env.print0(f"attention: {backend} (error {error:.1e} against float64 math, {dtype_name})")
    return attention_backend(backend)
