"""--attention (model_kernels): the SDPA kernel a run computes its attention with, chosen and
checked against the math backend at start-up, and refused in one line where it cannot serve."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import model_kernels
import train_gpt2 as tg
from conftest import TINY, make_shards

# the op each CPU kernel runs as: what a profile of the call shows
CPU_OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "math": "aten::_scaled_dot_product_attention_math",
}


def written_out_attention(q, k, v):
    """Causal attention in float64, as the lecture first writes it: softmax(QK^T / sqrt(d)) V."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_the_context_runs_the_kernel_it_names_and_it_computes_attention(backend):
    q, k, v = torch.randn(3, 2, 4, 40, 16, generator=torch.Generator().manual_seed(0))

    def attend():
        with model_kernels.attention_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out, ops = ops_run(attend)
    assert CPU_OPS[backend] in ops
    assert not {op for name, op in CPU_OPS.items() if name != backend} & ops
    torch.testing.assert_close(out.double(), written_out_attention(q, k, v), rtol=0, atol=1e-6)


def test_a_masked_call_falls_back_to_a_kernel_that_can_run_it():
    """The sampler's KV cache passes a boolean mask, which cuDNN's kernel may not take: the
    backend asked for comes first, not alone (math alone is math everywhere)."""
    q, k, v = torch.randn(3, 1, 2, 5, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with model_kernels.attention_backend("cudnn"):  # no CPU kernel: another one runs
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), written_out_attention(q, k, v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_takes_the_cpus_flash_kernel_and_measures_its_error(dtype):
    backend, error = model_kernels.choose_attention("auto", "cpu", dtype, n_head=2, head_size=16)
    assert backend == "flash"
    # the error it reports is the worst of the output and the three gradients: at least the
    # output's error against the written-out attention, on the same inputs
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=g) for _ in range(3))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with model_kernels.attention_backend("flash"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).double()
    want = written_out_attention(q, k, v)
    assert (out - want).abs().max() / want.abs().max() <= error * (1 + 1e-9)
    assert error <= model_kernels.attention_tolerance(dtype)


def test_a_kernel_that_disagrees_with_math_is_refused_and_auto_passes_it_by(monkeypatch):
    """A flash kernel that ignores the causal mask (a broken build, say): named, the run is
    refused in one line; auto goes on to the next candidate, math."""
    sdpa = F.scaled_dot_product_attention

    def broken(q, k, v, is_causal=False, **kwargs):
        if torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled():
            is_causal = False  # under flash alone: the check's call
        return sdpa(q, k, v, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    with pytest.raises(SystemExit, match=r"^--attention flash disagrees with the math backend"):
        model_kernels.choose_attention("flash", "cpu", torch.float32, 2, 16)
    assert model_kernels.choose_attention("auto", "cpu", torch.float32, 2, 16)[0] == "math"


def test_a_run_under_math_equals_a_run_under_flash(tmp_path, capsys):
    """Same losses to float32 rounding, with the backend named in each run's header."""
    make_shards(tmp_path / "data", [3000, 9000])
    losses = {}
    for backend in ("math", "flash"):
        log_dir = tmp_path / backend
        args = ["--data_dir", str(tmp_path / "data"), "--log_dir", str(log_dir)]
        args += ["--max_steps", "4", "--total_batch_size", "128", "--eval_interval", "2"]
        tg.main(TINY + args + ["--val_loss_steps", "1", "--attention", backend])
        assert f"attention: {backend} (error " in capsys.readouterr().out
        lines = open(os.path.join(log_dir, "log.txt")).read().split("\n")
        losses[backend] = [float(line.split()[2]) for line in lines if line]
    assert len(losses["math"]) == 4 + 3  # 4 train lines, val at 0, 2 and 4
    assert losses["flash"] == pytest.approx(losses["math"], rel=1e-5)
