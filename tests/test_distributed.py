"""torchrun with gloo on the CPU: 2 processes must train exactly like 1 process with twice the
gradient accumulation (same data per step, same averaged gradients)."""

import os
import signal
import subprocess
import sys

import torch

import train_gpt2 as tg
from conftest import HELLASWAG_SLICE, ROOT, TINY, make_shards

SCRIPT = os.path.join(ROOT, "train_gpt2.py")


def run(args, nproc, cwd):
    launcher = (
        [sys.executable, SCRIPT]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            SCRIPT,
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(
        launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def log_lines(log_dir, kind):
    lines = open(os.path.join(log_dir, "log.txt")).read().splitlines()
    return [(int(s), float(v)) for s, k, v in (line.split() for line in lines) if k == kind]


def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    data = tmp_path / "data"
    make_shards(data, [6000, 30000])
    hella = tmp_path / "hella.jsonl"
    hella.write_text("".join(open(HELLASWAG_SLICE).readlines()[:10]))
    # 512 tokens per step: 4 micro-steps of B*T = 2*32 on each of 2 ranks, or 8 on one
    args = TINY + [
        "--data_dir",
        str(data),
        "--total_batch_size",
        "512",
        "--max_steps",
        "4",
        "--eval_interval",
        "2",
        "--val_loss_steps",
        "1",
        "--checkpoint_interval",
        "4",
        "--block_size",
        "128",
        "--hellaswag",
        "1",
        "--hellaswag_path",
        str(hella),
        "--num_return_sequences",
        "1",
    ]
    out1 = run(args + ["--log_dir", str(tmp_path / "one")], 1, tmp_path)
    out2 = run(args + ["--log_dir", str(tmp_path / "two")], 2, tmp_path)
    for kind in ("train", "val"):
        one, two = log_lines(tmp_path / "one", kind), log_lines(tmp_path / "two", kind)
        assert [s for s, _ in one] == [s for s, _ in two]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two)), (kind, one, two)
    # HellaSwag: examples split over the ranks, counts summed
    assert log_lines(tmp_path / "one", "hella") == log_lines(tmp_path / "two", "hella")
    counts = [line for line in out2.splitlines() if line.startswith("HellaSwag accuracy")]
    assert counts and all(
        c.endswith(f"/10={int(c.split(': ')[1].split('/')[0]) / 10:.4f}") for c in counts
    )
    # only the master prints its steps
    assert out2.count("step     3 |") == 1 and out1.count("step     3 |") == 1
    a = torch.load(tmp_path / "one" / "model_00004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "model_00004.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_torchrun_on_the_embedded_corpus(tmp_path):
    # no edu_fineweb10B in the working directory: the bundled corpus, prepared once for all ranks
    out = run(
        [
            "--max_steps",
            "2",
            "--n_layer",
            "1",
            "--n_head",
            "2",
            "--n_embd",
            "32",
            "--B",
            "2",
            "--T",
            "64",
            "--total_batch_size",
            "256",
            "--val_loss_steps",
            "1",
            "--device",
            "cpu",
        ],
        2,
        tmp_path,
    )
    assert "bundled corpus" in out and "done: 2 steps" in out
    assert len(log_lines(tmp_path / "log", "train")) == 2


def worker_pids(agent_pid):
    """{LOCAL_RANK: pid} of the workers torchrun started, read from /proc."""
    workers = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent_pid:
            rank = [e for e in environ if e.startswith(b"LOCAL_RANK=")]
            if rank:
                workers[int(rank[0].split(b"=")[1])] = int(pid)
    return workers


def test_sigterm_to_one_rank_stops_all_at_the_same_step_and_resumes(tmp_path):
    data = tmp_path / "data"
    make_shards(data, [6000, 30000])
    args = TINY + ["--data_dir", str(data), "--total_batch_size", "256", "--max_steps", "30"]
    args += ["--eval_interval", "10", "--val_loss_steps", "1", "--checkpoint_interval", "30"]
    args += ["--num_return_sequences", "1"]
    run(args + ["--log_dir", str(tmp_path / "full")], 2, tmp_path)
    expected = open(tmp_path / "full" / "log.txt").read()

    log_dir = tmp_path / "stopped"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.Popen(
        launcher + ["--nproc_per_node=2", SCRIPT] + args + ["--log_dir", str(log_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     3 |"):
            os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)  # rank 1 only, as a preemption
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    assert out.count("stopped by SIGTERM") == 1 and "--resume latest" in out
    step = torch.load(tg.latest_checkpoint(str(log_dir)), weights_only=True)["step"]
    assert 4 <= step < 30
    run(["--resume", "latest", "--log_dir", str(log_dir)], 2, tmp_path)
    assert open(log_dir / "log.txt").read() == expected
