"""--fp8: the blocks' matmuls in 8-bit floats. A CPU has no FP8 hardware, but torch emulates
torch._scaled_mm there with the same rounding and scaling, so the arithmetic is tested here;
its speed needs a GPU of compute capability 8.9+ (bench.py's "+ fp8" row). torchao's float8
training (--fp8_kernels torchao_*) is the independent reference: its tensorwise scaling is ours."""

import sys

import pytest
import torch

import model_kernels
import train_gpt2 as tg
from conftest import TINY, log_lines
from train_gpt2 import GPT, GPTConfig

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def rounded(x, dtype):
    """x scaled so that its largest magnitude is the format's largest, rounded to the format, and
    scaled back, in float64: what an FP8 matmul multiplies instead of x."""
    x = x.double()
    scale = x.abs().max() / torch.finfo(dtype).max
    return (x / scale).to(dtype).double() * scale


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_matmul_multiplies_its_operands_rounded_to_fp8():
    torch.manual_seed(0)
    x = torch.randn(3, 32, 64, requires_grad=True)
    weight = (0.02 * torch.randn(96, 64)).requires_grad_()
    grad = torch.randn(3, 32, 96) * 1e-3  # gradients are small: the scaling is what keeps them
    y = model_kernels.FP8Matmul.apply(x, weight, torch.float32)
    y.backward(grad)

    # forward: e4m3 x and weight; backward: e5m2 gradient times the forward's e4m3 copies
    x8, w8, g8 = rounded(x.detach(), E4M3), rounded(weight.detach(), E4M3), rounded(grad, E5M2)
    assert relative_error(y, x8 @ w8.t()) < 1e-6  # the sums are float32
    assert relative_error(x.grad, g8 @ w8) < 1e-6
    assert relative_error(weight.grad, g8.flatten(0, 1).t() @ x8.flatten(0, 1)) < 1e-6
    # ... and so near the exact products, but not equal: 3 mantissa bits (2 for the gradient)
    x64, w64, g64 = x.detach().double(), weight.detach().double(), grad.double()
    assert 0.01 < relative_error(y, x64 @ w64.t()) < 0.06
    assert 0.01 < relative_error(x.grad, g64 @ w64) < 0.1
    assert 0.01 < relative_error(weight.grad, g64.flatten(0, 1).t() @ x64.flatten(0, 1)) < 0.1


def test_fp8_matmuls_have_the_layouts_and_types_the_gpu_needs(monkeypatch):
    # cuBLAS multiplies fp8 only as row-major @ column-major, in sizes that are multiples of 16,
    # and never e5m2 @ e5m2; the CPU's emulation accepts anything, so this is checked here
    calls = []
    scaled_mm = torch._scaled_mm

    def checked(a, b, **kwargs):
        assert a.stride(1) == 1 and b.stride(0) == 1
        assert all(n % 16 == 0 for n in (*a.shape, *b.shape))
        assert E4M3 in (a.dtype, b.dtype)
        calls.append(kwargs["out_dtype"])
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304))
    model_kernels.use_fp8_matmuls(model)
    idx = torch.randint(0, 50257, (2, 32))
    with torch.autocast("cpu", torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    # 4 layers x 2 blocks: the forward in bf16, the input's gradient in the input's dtype (the
    # layer norms' float32 or the attention's bf16), the weight's in float32
    assert calls.count(torch.bfloat16) == 8 + 4 and calls.count(torch.float32) == 4 + 8
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_fp8_layers_are_the_plain_ones_without_gradients_and_in_checkpoints():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)
    plain = GPT(config)
    fp8 = GPT(config)
    fp8.load_state_dict(plain.state_dict())
    model_kernels.use_fp8_matmuls(fp8)
    assert isinstance(fp8.transformer.h[1].mlp.c_proj, model_kernels.FP8Linear)
    assert not isinstance(
        fp8.lm_head, model_kernels.FP8Linear
    )  # the head and embedding stay as they are
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():  # validation, HellaSwag and sampling: the same numbers as without
        assert torch.equal(fp8(idx)[0], plain(idx)[0])
    assert not torch.equal(fp8(idx)[0], plain(idx)[0])  # training: fp8


def fp8_logits_and_gradients(kernels, seed=0):
    """A small GPT's logits and its parameters' gradients, in float32, with --fp8's matmuls by
    `kernels` (model_kernels.FP8_KERNELS), or plain ones (None); the same weights and tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304))
    if kernels:
        model_kernels.use_fp8_matmuls(model, kernels)
    idx = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, idx)
    loss.backward()
    return [logits.detach()] + [p.grad for p in model.parameters()], model.state_dict().keys()


def test_our_fp8_matmuls_are_torchaos_tensorwise_float8_training():
    pytest.importorskip("torchao.float8")
    plain, keys = fp8_logits_and_gradients(None)
    ours, _ = fp8_logits_and_gradients("ours")
    tensorwise, tensorwise_keys = fp8_logits_and_gradients("torchao_tensorwise")
    rowwise, rowwise_keys = fp8_logits_and_gradients("torchao_rowwise")
    assert tensorwise_keys == keys == rowwise_keys  # checkpoints are the same
    # torchao scales each operand by its largest magnitude as ours does, with the reciprocal
    # scale (x * (448 / amax), not x / (amax / 448)): the same e4m3 and e5m2 operands but for a
    # float32 rounding, which now and then moves a value across an FP8 rounding boundary (one
    # FP8 step, 1/8 of that element: about 2e-5 of a gradient's norm at this size, seen)
    assert max(relative_error(a, b) for a, b in zip(tensorwise, ours)) < 2e-3
    # ... where FP8 itself is 2-10% from the plain model, and rowwise scales differ from ours
    assert relative_error(ours[0], plain[0]) > 1e-2
    assert (
        relative_error(rowwise[0], ours[0]) > 1e-2 and relative_error(rowwise[0], plain[0]) < 0.06
    )


def test_torchaos_fp8_trains_as_ours_and_without_torchao_is_refused_in_one_line(
    tmp_path, monkeypatch
):
    pytest.importorskip("torchao.float8")
    losses = {}
    for kernels in ("ours", "torchao_tensorwise"):
        log_dir = tmp_path / kernels
        tg.main(
            TINY
            + ["--data_dir", "bundled", "--log_dir", str(log_dir), "--max_steps", "3"]
            + ["--fp8", "1", "--fp8_kernels", kernels, "--total_batch_size", "64"]
            + ["--eval_interval", "10", "--num_return_sequences", "0"]
        )
        losses[kernels] = [v for _, v in log_lines(log_dir, "train")]
    assert max(abs(a - b) for a, b in zip(losses["ours"], losses["torchao_tensorwise"])) < 1e-4
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if it were not installed
    with pytest.raises(
        SystemExit, match="^--fp8_kernels torchao_rowwise needs torchao: pip install"
    ):
        fp8_logits_and_gradients("torchao_rowwise")


def test_an_fp8_run_learns_what_the_float32_run_learns(tmp_path):
    # 30 steps of 128 tokens on the bundled corpus: the val loss falls from 10.8 to 7.5, and the
    # fp8 run's val loss stays within 0.02 of the float32 run's at every evaluation (0.003 apart
    # at most on a 2-core AMD EPYC with AVX512). torch emulates FP8 matmuls slowly on a CPU, so
    # the steps are small and the rate high.
    logs = {}
    for fp8 in ("0", "1"):
        log_dir = tmp_path / f"fp8_{fp8}"
        tg.main(
            ["--data_dir", "bundled", "--log_dir", str(log_dir), "--fp8", fp8, "--max_lr", "4e-3"]
            + ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--T", "32", "--B", "4"]
            + ["--total_batch_size", "128", "--max_steps", "30", "--eval_interval", "15"]
            + ["--val_loss_steps", "8", "--num_return_sequences", "0", "--dtype", "float32"]
        )
        logs[fp8] = [line.split() for line in open(log_dir / "log.txt")]
    val = {k: [float(v) for _, kind, v in lines if kind == "val"] for k, lines in logs.items()}
    assert len(val["0"]) == 3 and val["0"][-1] < val["0"][0] - 3
    assert max(abs(a - b) for a, b in zip(val["0"], val["1"])) < 0.02
    assert val["0"][0] == val["1"][0]  # evaluation before any step: no fp8 in it


def test_fp8_runs_where_the_device_has_fp8_matmuls(monkeypatch):
    capability = (8, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(SystemExit, match=r"--fp8: cuda:1 has no FP8 matmuls \(CUDA GPUs of"):
        model_kernels.check_fp8_device("cuda:1")  # an A100
    with pytest.raises(SystemExit, match="--fp8: mps has no FP8 matmuls"):
        model_kernels.check_fp8_device("mps")
    model_kernels.check_fp8_device("cpu")  # emulated, for tests
    capability = (9, 0)  # an H100
    model_kernels.check_fp8_device("cuda:1")
    assert model_kernels.fp8_hardware("cuda:1") and not model_kernels.fp8_hardware("cpu")
