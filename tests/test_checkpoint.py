"""Checkpoints: exact resume, preemption, crashes while saving, non-finite steps."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, TINY, make_shards

SCRIPT = os.path.join(ROOT, "train_gpt2.py")


@pytest.fixture
def data(tmp_path):
    make_shards(tmp_path / "data", [3000, 9000, 7000])
    return str(tmp_path / "data")


def args_for(data, log_dir, max_steps=8):
    # shuffling on, a warmup and a decay inside the run, and accumulation of 2 micro-steps
    return TINY + [
        "--data_dir",
        data,
        "--log_dir",
        str(log_dir),
        "--max_steps",
        str(max_steps),
        "--total_batch_size",
        "128",
        "--warmup_steps",
        "2",
        "--eval_interval",
        "3",
        "--val_loss_steps",
        "1",
        "--checkpoint_interval",
        "3",
        "--shuffle",
        "1",
        "--num_return_sequences",
        "1",
    ]


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, data):
    tg.main(args_for(data, tmp_path / "full"))
    expected = open(tmp_path / "full" / "log.txt").read()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    # resume from step 3 in the same log dir: steps 3..7 run again, log.txt is trimmed then appended
    tg.main(
        [
            "--resume",
            str(tmp_path / "resumed" / "model_00003.pt"),
            "--log_dir",
            str(tmp_path / "resumed"),
        ]
    )
    assert open(tmp_path / "resumed" / "log.txt").read() == expected
    a = torch.load(tmp_path / "full" / "model_00008.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_00008.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_sigterm_saves_and_resume_latest_continues_exactly(tmp_path, data):
    tg.main(args_for(data, tmp_path / "full", max_steps=12))
    expected = open(tmp_path / "full" / "log.txt").read()
    log_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT] + args_for(data, log_dir, max_steps=12),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     4 |"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "--resume latest" in out and "Traceback" not in out
    saved = tg.latest_checkpoint(str(log_dir))
    step = torch.load(saved, weights_only=True)["step"]
    assert 5 <= step < 12 and step % 3  # an unscheduled checkpoint, right after the step it ran
    tg.main(["--resume", "latest", "--log_dir", str(log_dir)])
    assert open(log_dir / "log.txt").read() == expected


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, data):
    log_dir = tmp_path / "log"
    tg.main(args_for(data, log_dir, max_steps=3))
    good = tg.latest_checkpoint(str(log_dir))
    # a process that starts writing a bigger checkpoint and is killed in the middle of it
    code = (
        "import time, torch, train_gpt2 as tg\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "torch.save = slow_save\n"
        f"tg.save_checkpoint(tg.checkpoint_path({str(log_dir)!r}, 6), {{'model': {{}}}})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert not os.path.exists(log_dir / "model_00006.pt")
    assert tg.latest_checkpoint(str(log_dir)) == good
    tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "5"])
    assert os.path.exists(log_dir / "model_00005.pt")


def test_repeated_nonfinite_steps_stop_the_run(tmp_path, data, monkeypatch, capsys):
    forward = tg.GPT.forward

    def infinite_loss(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        return logits, None if loss is None else loss * float("inf")

    monkeypatch.setattr(tg.GPT, "forward", infinite_loss)
    with pytest.raises(SystemExit, match="3 non-finite steps in a row at step 2"):
        tg.main(args_for(data, tmp_path / "log") + ["--max_skipped_steps", "3"])
    out = capsys.readouterr().out
    assert out.count("update skipped") == 3
    assert "train" not in open(tmp_path / "log" / "log.txt").read()  # no inf in the log


def test_batch_ramp_schedule():
    cfg = tg.TrainConfig(
        B=2, T=32, total_batch_size=1024, batch_ramp_start=128, batch_ramp_tokens=4096
    )
    # micro-batch 64 tokens per rank; batch = 128 + (1024 - 128) * tokens_seen / 4096
    assert tg.grad_accum_steps_at(0, cfg, 1) == 2  # 128 / 64
    assert tg.grad_accum_steps_at(1024, cfg, 1) == 5  # 352 / 64 = 5.5 -> 5
    assert tg.grad_accum_steps_at(2048, cfg, 1) == 9  # 576 / 64
    assert tg.grad_accum_steps_at(4000, cfg, 1) == 15  # 1003 / 64 = 15.7 -> 15
    assert tg.grad_accum_steps_at(4096, cfg, 1) == 16  # full: 1024 / 64
    assert tg.grad_accum_steps_at(2048, cfg, 2) == 4  # 576 / 128 = 4.5 -> 4 on two ranks
    assert tg.grad_accum_steps_at(0, tg.TrainConfig(B=2, T=32, total_batch_size=1024), 1) == 16


def test_batch_ramp_resumes_exactly(tmp_path, data):
    ramp = ["--batch_ramp_tokens", "600", "--batch_ramp_start", "64", "--total_batch_size", "256"]
    tg.main(args_for(data, tmp_path / "full") + ramp)
    expected = open(tmp_path / "full" / "log.txt").read()
    tg.main(args_for(data, tmp_path / "part") + ramp)
    os.remove(tmp_path / "part" / "model_00008.pt")
    os.remove(tmp_path / "part" / "model_00006.pt")
    tg.main(["--resume", "latest", "--log_dir", str(tmp_path / "part")])
    assert open(tmp_path / "part" / "log.txt").read() == expected


def test_fresh_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path, data):
    tg.main(args_for(data, tmp_path / "log", max_steps=3))
    before = open(tmp_path / "log" / "log.txt").read()
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run"):
        tg.main(args_for(data, tmp_path / "log", max_steps=3))
    assert open(tmp_path / "log" / "log.txt").read() == before
