import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import FAULTS, HELLASWAG_SLICE, ROOT, TINY, TRAIN_SCRIPT, make_shards
from support import devices
from train_gpt2 import GPT, DataLoaderLite, DistEnv, GPTConfig, TrainConfig

SINGLE = DistEnv(
    distributed=False, rank=0, local_rank=0, world_size=1, device="cpu", master_process=True
)


def test_get_lr():
    cfg = TrainConfig(max_lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert math.isclose(tg.get_lr(0, cfg), 1e-4)  # 1/10 of max_lr: step 0 trains too
    assert math.isclose(tg.get_lr(4, cfg), 5e-4)
    assert math.isclose(tg.get_lr(9, cfg), 1e-3)  # end of warmup
    assert math.isclose(tg.get_lr(10, cfg), 1e-3)  # cosine starts at the top
    assert math.isclose(tg.get_lr(35, cfg), 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert math.isclose(tg.get_lr(60, cfg), 5.5e-4)  # half way: the mean of max and min
    assert math.isclose(tg.get_lr(110, cfg), 1e-4)  # max_steps
    assert math.isclose(tg.get_lr(500, cfg), 1e-4)  # beyond


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    make_shards(tmp_path, [200, 4000])
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)
    grads, losses = [], []
    for B, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loader = DataLoaderLite(B, 32, 0, 1, "train", str(tmp_path))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, norm, updated = tg.train_step(
            model,
            optimizer,
            loader,
            accum,
            SINGLE,
            contextlib.nullcontext(),
            scaler,
            grad_clip=math.inf,
        )
        assert updated
        losses.append(loss)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-6
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() < 1e-6


def test_nonfinite_loss_skips_the_update(tmp_path):
    make_shards(tmp_path, [200, 4000])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", log=lambda *a: None)
    loader = DataLoaderLite(2, 16, 0, 1, "train", str(tmp_path))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = lambda: tg.train_step(
        model, optimizer, loader, 2, SINGLE, contextlib.nullcontext(), scaler, 1.0
    )
    step()  # a normal step first, so the optimizer has state to protect
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    forward = model.forward
    model.forward = lambda x, y: (None, forward(x, y)[1] * float("nan"))
    loss, norm, updated = step()
    assert not updated and math.isnan(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    state = optimizer.state_dict()["state"]
    for i, s in state.items():
        assert all(torch.equal(s[k], before[1]["state"][i][k]) for k in s)
    model.forward = forward
    assert step()[2]


def test_training_run_writes_log_and_checkpoint(tmp_path, capsys):
    data, log_dir = tmp_path / "data", tmp_path / "log"
    make_shards(data, [3000, 20000])
    hellaswag_8 = tmp_path / "hellaswag_8.jsonl"
    hellaswag_8.write_text("".join(open(HELLASWAG_SLICE).readlines()[:8]))
    tg.main(
        TINY
        + [
            "--data_dir",
            str(data),
            "--log_dir",
            str(log_dir),
            "--max_steps",
            "3",
            "--total_batch_size",
            "128",
            "--eval_interval",
            "1",
            "--val_loss_steps",
            "1",
            "--checkpoint_interval",
            "2",
            "--hellaswag",
            "1",
            "--hellaswag_path",
            str(hellaswag_8),
            "--block_size",
            "128",
        ]
    )
    out = capsys.readouterr().out
    lines = open(log_dir / "log.txt").read().splitlines()
    kinds = {"train": r"\d+\.\d{6}", "val": r"\d+\.\d{4}", "hella": r"0\.\d{4}|1\.0000"}
    for line in lines:
        step, kind, value = line.split(" ")
        assert re.fullmatch(kinds[kind], value), line
    assert [line.split(" ")[:2] for line in lines] == [
        ["0", "val"],
        ["0", "hella"],
        ["0", "train"],
        ["1", "val"],
        ["1", "hella"],
        ["1", "train"],
        ["2", "val"],
        ["2", "hella"],
        ["2", "train"],
        ["3", "val"],
        ["3", "hella"],
    ]
    assert sorted(os.listdir(log_dir)) == [
        "log.txt",
        "model_00002.pt",
        "model_00003.pt",
        "run.json",
    ]
    # the printed per-step line has every field
    assert re.search(
        r"step     2 \| loss \d+\.\d{6} \| lr \d\.\d{4}e-\d\d \| norm \d+\.\d{4} \| "
        r"dt \d+\.\d\dms \| tok/sec \d+\.\d\d",
        out,
    )
    assert out.count("sample: Hello, I'm a language model,") == 3 * 4
    ckpt = torch.load(log_dir / "model_00003.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["train_config"]["max_steps"] == 3
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert math.isclose(ckpt["val_loss"], float(lines[-2].split()[2]), abs_tol=1e-4)
    run = json.load(open(log_dir / "run.json"))
    assert run["config"]["n_layer"] == 2 and run["device"] == "cpu" and run["world_size"] == 1


def test_default_run_uses_the_bundled_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no edu_fineweb10B here
    cfg, checkpoint = tg.resolve_config({})
    assert checkpoint is None and cfg.data_dir == tg.BUNDLED
    assert cfg.n_layer == tg.BUNDLED_DEFAULTS["n_layer"]
    tg.main(
        [
            "--max_steps",
            "2",
            "--n_layer",
            "1",
            "--n_embd",
            "32",
            "--n_head",
            "2",
            "--B",
            "4",
            "--T",
            "64",
            "--total_batch_size",
            "512",
            "--val_loss_steps",
            "1",
            "--eval_interval",
            "1",
            "--checkpoint_interval",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "training a small model on the bundled corpus" in out
    assert "python fineweb.py" in out
    assert os.path.exists(tmp_path / "log" / "model_00002.pt")
    assert len(open(tmp_path / "log" / "log.txt").read().splitlines()) == 3 + 2


def test_fineweb_shards_select_the_124m_reproduction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_shards(tmp_path / "edu_fineweb10B", [100, 100])
    cfg, _ = tg.resolve_config({})
    assert cfg == TrainConfig()
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.total_batch_size) == (
        12,
        768,
        50304,
        2**19,
    )
    assert (cfg.max_lr, cfg.warmup_steps, cfg.max_steps) == (6e-4, 715, 19073)
    with pytest.raises(SystemExit, match="no train shards"):
        tg.main(["--data_dir", str(tmp_path / "nothing")] + TINY)


def test_help_is_light(tmp_path):
    # --help must not pay for transformers or datasets (it should answer in about a second)
    code = (
        "import sys, train_gpt2\n"
        "try:\n    train_gpt2.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('transformers' in sys.modules, 'datasets' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert "--total_batch_size" in out.stdout and out.stdout.strip().endswith("False False")


SAME_SUMS_EVERYWHERE = dict(
    OMP_NUM_THREADS="1",
    ATEN_CPU_CAPABILITY="default",
    MKL_CBWR="COMPATIBLE",
    ONEDNN_MAX_CPU_ISA="SSE41",
)


def log_of_the_stored_run(tmp_path, recipe_args, float64=False):
    """log.txt of the 8 steps whose logs tests/data keeps (each written by the code of its time),
    with HellaSwag and a sample, in one thread and with the CPU kernels of the plainest
    instruction set (torch's, MKL's and oneDNN's): the sums are then computed in the same order
    on every x86 machine, with or without AVX-512. float64: every tensor in float64 (faults.py's
    FLOAT64), where float32's differences would be amplified (Muon's are, to 1e-4 of a loss on
    another CPU) beyond the log's digits."""
    make_shards(tmp_path / "data", [3000, 20000])
    hella = tmp_path / "h8.jsonl"
    hella.write_text("".join(open(HELLASWAG_SLICE).readlines()[:8]))
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "log")]
    args += ["--max_steps", "8", "--total_batch_size", "128", "--eval_interval", "4"]
    args += ["--val_loss_steps", "2", "--checkpoint_interval", "8", "--block_size", "128"]
    args += ["--hellaswag", "1", "--hellaswag_path", str(hella), "--num_return_sequences", "1"]
    script, env = TRAIN_SCRIPT, dict(os.environ, PYTHONPATH=ROOT, **SAME_SUMS_EVERYWHERE)
    if float64:
        script, env = FAULTS, dict(env, FLOAT64="1")
    out = subprocess.run(
        [sys.executable, script] + args + recipe_args,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return open(tmp_path / "log" / "log.txt").read()


def test_the_gpt2_recipe_logs_what_it_logged_before_the_speedrun_existed(tmp_path):
    # tests/data/gpt2_recipe_log.txt was written by this run at commit 65adb50, before the
    # recipes, the new HellaSwag scorer and the generation cache
    log = log_of_the_stored_run(tmp_path, ["--warmup_steps", "3", "--max_lr", "1e-2"])
    assert log == open(os.path.join(ROOT, "tests", "data", "gpt2_recipe_log.txt")).read()


def test_micro_batch_auto():
    # on a CPU: the 124M run's 64, or the largest power of two that divides the step
    assert devices.largest_micro_batch(lambda B: True, 2**19, 1024, 1) == 64
    assert devices.largest_micro_batch(lambda B: True, 4096, 256, 2) == 8
    # on a GPU that holds 20 sequences of activations: the largest power of two under that
    tried = []

    def fits(B):
        tried.append(B)
        return B <= 20

    assert devices.largest_micro_batch(fits, 2**19, 1024, 8) == 16 and tried == [64, 32, 16]
    with pytest.raises(SystemExit, match="no micro-batch B <= 64 of T=1024 tokens both fits"):
        devices.largest_micro_batch(lambda B: False, 2**19, 1024, 1)


def test_micro_batch_auto_in_a_cpu_run(tmp_path, capsys):
    make_shards(tmp_path / "data", [3000, 9000])
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "log")]
    args[args.index("--B") + 1] = "auto"
    tg.main(args + ["--max_steps", "1", "--total_batch_size", "256", "--eval_interval", "5"])
    assert "micro-batch B=8\n" in capsys.readouterr().out  # 256 tokens = 8 x 32
    ckpt = torch.load(tmp_path / "log" / "model_00001.pt", weights_only=True)
    assert ckpt["train_config"]["B"] == 8


def test_a_step_the_fp16_loss_scaler_skips_is_reported_as_skipped(tmp_path):
    make_shards(tmp_path, [200, 4000])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", log=lambda *a: None)
    loader = DataLoaderLite(2, 16, 0, 1, "train", str(tmp_path))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = lambda: tg.train_step(
        model, optimizer, loader, 2, SINGLE, contextlib.nullcontext(), scaler, 1.0
    )
    assert step()[2]
    before = copy.deepcopy(model.state_dict())
    hook = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("inf"))
    loss, norm, updated = step()  # a finite loss, infinite gradients: the scaler skips it
    assert math.isfinite(loss) and not updated and scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    hook.remove()
    assert step()[2]


def test_step_times_wait_for_the_device(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    for device in ("cuda:1", "mps", "cpu"):
        devices.synchronize(device)
    assert calls == ["cuda", "mps"]
    # and the training loop waits once per step, before it reads the clock
    waited = []
    monkeypatch.setattr(devices, "synchronize", waited.append)
    make_shards(tmp_path / "data", [3000, 9000])
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "log")]
    tg.main(args + ["--max_steps", "3", "--total_batch_size", "64", "--eval_interval", "5"])
    assert waited == ["cpu"] * 3
