"""Checkpoints and stops: exact resume, stop requests honored wherever the run is, crashes while
saving, non-finite steps, and the rules that keep one run from overwriting another."""

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt2 as tg
from conftest import HELLASWAG_SLICE, ROOT, TINY, make_shards
from support import checkpoints, datafiles

SCRIPT = os.path.join(ROOT, "train_gpt2.py")
FAULTS = os.path.join(ROOT, "tests", "faults.py")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread here and in the runs' subprocesses: their logs are compared to the byte, so no
    sum may take its order from the number of threads the machine, or its load, gives a run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


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


def with_hellaswag(args, tmp_path, examples=64):
    path = tmp_path / "hella.jsonl"
    path.write_text("".join(open(HELLASWAG_SLICE).readlines()[:examples]))
    return args + ["--hellaswag", "1", "--hellaswag_path", str(path), "--block_size", "128"]


def run_with_fault(fault, args, timeout=120):
    """train_gpt2.py with a fault of tests/faults.py: (exit code, stdout, stderr, seconds from
    the fault's signal to the exit, or None)."""
    proc = subprocess.Popen(
        [sys.executable, FAULTS] + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, FAULT=fault, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
    )
    lines, signalled = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("fault: sent"):
            signalled = time.perf_counter()
    code = proc.wait(timeout=timeout)
    ended = time.perf_counter()
    err = proc.stderr.read()
    return code, "".join(lines), err, (ended - signalled) if signalled else None


def checkpoint_step(path):
    return torch.load(path, weights_only=True)["step"]


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, data):
    tg.main(args_for(data, tmp_path / "full"))
    expected = open(tmp_path / "full" / "log.txt").read()
    # in its own directory, from the latest checkpoint: the log is trimmed, then appended
    shutil.copytree(tmp_path / "full", tmp_path / "own")
    for later in ("model_00006.pt", "model_00008.pt"):
        os.remove(tmp_path / "own" / later)
    tg.main(["--resume", "latest", "--log_dir", str(tmp_path / "own")])
    assert open(tmp_path / "own" / "log.txt").read() == expected
    # branching off step 3 into a new directory: the log lines before step 3 come along
    tg.main(
        [
            "--resume",
            str(tmp_path / "full" / "model_00003.pt"),
            "--log_dir",
            str(tmp_path / "branch"),
        ]
    )
    assert open(tmp_path / "branch" / "log.txt").read() == expected
    a = torch.load(tmp_path / "full" / "model_00008.pt", weights_only=True)
    b = torch.load(tmp_path / "branch" / "model_00008.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_sigterm_between_micro_steps_saves_the_last_step_and_resumes_exactly(tmp_path, data):
    tg.main(args_for(data, tmp_path / "full", max_steps=12))
    expected = open(tmp_path / "full" / "log.txt").read()
    log_dir = tmp_path / "stopped"
    # SIGTERM as step 4 begins: its first micro-step runs, then the stop undoes the step
    code, out, err, _ = run_with_fault("signal_at_step:4", args_for(data, log_dir, max_steps=12))
    assert code == 128 + signal.SIGTERM, out + err
    assert "stopped by SIGTERM after step 3" in out and "--resume latest" in out
    assert "Traceback" not in out + err
    assert (
        checkpoint_step(checkpoints.latest_checkpoint(str(log_dir))) == 4
    )  # unscheduled: 4 % 3 != 0
    assert (
        open(log_dir / "log.txt").read().splitlines()[-1]
        == "3 train " + (expected.split("3 train ")[1].split("\n")[0])
    )
    tg.main(["--resume", "latest", "--log_dir", str(log_dir)])
    assert open(log_dir / "log.txt").read() == expected


@pytest.mark.parametrize("where", ["hellaswag", "val"])
def test_sigterm_during_evaluation_stops_within_seconds(tmp_path, data, where):
    import hellaswag_eval

    def args(log_dir):
        args = with_hellaswag(args_for(data, log_dir, max_steps=5), tmp_path, examples=48)
        return args + ["--val_loss_steps", "3"]

    tg.main(args(tmp_path / "full"))
    expected = open(tmp_path / "full" / "log.txt").read()
    # the signal comes in the second batch of the evaluation at step 3, and every batch after it
    # takes 3 s: finishing that evaluation would take 10 s or more
    per_pass = {
        "hellaswag": len(
            hellaswag_eval.load_packed(str(tmp_path / "hella.jsonl"), "cpu", 128).batches
        ),
        "val": 3 * 128 // (2 * 32),  # val_loss_steps * total_batch_size / (B * T)
    }[where]
    assert per_pass >= 5
    code, out, err, seconds = run_with_fault(
        f"signal_in_{where}:{per_pass + 2}", args(tmp_path / "stopped")
    )
    assert code == 128 + signal.SIGTERM, out + err
    assert seconds is not None and seconds < 8, seconds  # the batch it came in, then the save
    assert "stopped by SIGTERM after step 2" in out and "Traceback" not in out + err
    # the evaluation of step 3 was cut short; its checkpoint is the state after 3 steps
    assert checkpoint_step(checkpoints.latest_checkpoint(str(tmp_path / "stopped"))) == 3
    tg.main(["--resume", "latest", "--log_dir", str(tmp_path / "stopped")])
    assert open(tmp_path / "stopped" / "log.txt").read() == expected


def test_a_second_ctrl_c_stops_at_once(tmp_path, data):
    log_dir = tmp_path / "log"
    code, out, err, _ = run_with_fault("two_sigints_at_step:4", args_for(data, log_dir, 12))
    assert code == 128 + signal.SIGINT
    assert err.strip().splitlines() == ["stopped at once by a second Ctrl-C, without saving"]
    assert checkpoints.checkpoint_steps(str(log_dir)) == [3]  # the scheduled one only
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]


def test_a_second_ctrl_c_while_saving_stops_at_once_in_one_line(tmp_path, data):
    # the second Ctrl-C lands inside torch.save, which reports it as its own RuntimeError: the
    # run still stops at once, in one line, with 130, and leaves no half-written file
    log_dir = tmp_path / "log"
    code, out, err, _ = run_with_fault("two_sigints_at_save:4", args_for(data, log_dir, 12))
    assert code == 128 + signal.SIGINT and "Traceback" not in err, err
    assert err.strip().splitlines() == ["stopped at once by a second Ctrl-C, without saving"]
    assert checkpoints.checkpoint_steps(str(log_dir)) == [3]  # the scheduled one only
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_start_up_exits_at_once_in_one_line(tmp_path, data, signum):
    proc = subprocess.Popen(
        [sys.executable, FAULTS] + args_for(data, tmp_path / "log"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, FAULT="slow_start:60", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
    )
    for line in proc.stdout:
        if line.startswith("decayed parameter tensors"):  # start-up is under way
            break
    t0 = time.perf_counter()
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    assert time.perf_counter() - t0 < 5
    name = signal.Signals(signum).name
    assert proc.stderr.read().strip() == f"stopped by {name} before the first step: nothing to save"


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, data):
    log_dir = tmp_path / "log"
    tg.main(args_for(data, log_dir, max_steps=3))
    good = checkpoints.latest_checkpoint(str(log_dir))
    # a process that starts writing a bigger checkpoint and is killed in the middle of it
    code = (
        "import time, torch\n"
        "from support import checkpoints\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "torch.save = slow_save\n"
        f"checkpoints.save(checkpoints.checkpoint_path({str(log_dir)!r}, 6), {{'model': {{}}}})\n"
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
    assert checkpoints.latest_checkpoint(str(log_dir)) == good
    stale = [n for n in os.listdir(log_dir) if n.endswith(".tmp")]
    assert stale == [f".model_00006.pt.{proc.pid}.tmp"]  # as big as a checkpoint, in real life
    live = log_dir / f".model_00009.pt.{os.getpid()}.tmp"  # a live process's: left alone
    live.write_bytes(b"")
    tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "5"])
    assert os.path.exists(log_dir / "model_00005.pt")
    assert [n for n in os.listdir(log_dir) if n.endswith(".tmp")] == [live.name]


def test_disk_full_at_save_ends_in_one_line_and_keeps_the_earlier_checkpoints(tmp_path, data):
    log_dir = tmp_path / "log"
    tg.main(args_for(data, log_dir, max_steps=3))
    before = sorted(os.listdir(log_dir))
    args = ["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "6"]
    code, out, err, _ = run_with_fault("disk_full_at_save", args)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"could not save {log_dir}/model_00006.pt: No space left on device; the earlier "
        f"checkpoints are intact, the newest {log_dir}/model_00003.pt"
    ]
    assert sorted(os.listdir(log_dir)) == before


def test_repeated_nonfinite_steps_stop_the_run(tmp_path, data, monkeypatch, capsys):
    forward = tg.GPT.forward

    def infinite_loss(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
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


# ----------------------------------------------------------------------------- one run's files


def snapshot(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


@pytest.fixture
def finished(tmp_path, data):
    """A finished 8-step run in log/ (checkpoints at 3, 6 and 8)."""
    tg.main(args_for(data, tmp_path / "log"))
    return tmp_path / "log"


def test_a_fresh_run_never_touches_an_earlier_runs_files(tmp_path, data, finished):
    before = snapshot(finished)
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run"):
        tg.main(args_for(data, finished, max_steps=3))
    # a run that stopped before its first checkpoint left only its log
    only_log = tmp_path / "only_log"
    only_log.mkdir()
    shutil.copy(finished / "log.txt", only_log / "log.txt")
    lines = len(before["log.txt"].splitlines())
    with pytest.raises(SystemExit, match=rf"log.txt holds the log of an earlier run \({lines} "):
        tg.main(args_for(data, only_log, max_steps=3))
    assert snapshot(finished) == before
    assert open(only_log / "log.txt", "rb").read() == before["log.txt"]


def test_a_resume_never_overwrites_or_mixes_runs(tmp_path, data, finished):
    other = tmp_path / "other"
    tg.main(args_for(data, other, max_steps=4))
    before, before_other = snapshot(finished), snapshot(other)
    # into a directory that holds another run
    with pytest.raises(SystemExit, match="holds checkpoints of another run"):
        tg.main(["--resume", str(finished / "model_00003.pt"), "--log_dir", str(other)])
    # from an earlier checkpoint in its own directory, where a later one exists
    with pytest.raises(SystemExit, match="model_00008.pt is later than the checkpoint to resume"):
        tg.main(["--resume", str(finished / "model_00003.pt"), "--log_dir", str(finished)])
    # to fewer steps than it already made
    with pytest.raises(SystemExit, match="--max_steps 2 is below the step of the checkpoint"):
        tg.main(["--resume", str(finished / "model_00003.pt"), "--max_steps", "2"])
    assert snapshot(finished) == before and snapshot(other) == before_other


def test_run_json_keeps_the_start_and_records_every_resume(tmp_path, data):
    log_dir = tmp_path / "log"
    tg.main(args_for(data, log_dir, max_steps=3))
    first = json.load(open(log_dir / "run.json"))
    assert first["resumes"] == [] and first["config"]["max_steps"] == 3
    tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "5"])
    tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "6"])
    run = json.load(open(log_dir / "run.json"))
    assert {k: v for k, v in run.items() if k != "resumes"} == {
        k: v for k, v in first.items() if k != "resumes"
    }
    assert [(r["step"], r["config"]["max_steps"]) for r in run["resumes"]] == [(3, 5), (5, 6)]
    assert all(r["checkpoint"].endswith(f"model_{r['step']:05d}.pt") for r in run["resumes"])


def test_resuming_onto_other_shards_is_refused_unless_asked(tmp_path, data, finished):
    new_data = tmp_path / "new_data"
    make_shards(new_data, [3000, 9000, 7000], seed=1)  # same names and sizes, other tokens
    shutil.copytree(finished, tmp_path / "resume")
    for later in ("model_00006.pt", "model_00008.pt"):
        os.remove(tmp_path / "resume" / later)
    resume = ["--resume", "latest", "--log_dir", str(tmp_path / "resume"), "--max_steps", "5"]
    with pytest.raises(SystemExit, match="the shards differ from those the checkpoint"):
        tg.main(resume + ["--data_dir", str(new_data)])
    tg.main(resume + ["--data_dir", str(new_data), "--resume_allow_new_data", "1"])
    ckpt = torch.load(tmp_path / "resume" / "model_00005.pt", weights_only=True)
    # two steps of 2 micro-batches of 2 sequences from the new data's beginning
    position = [ckpt["loader"][k] for k in ("epoch", "shard_pos", "seq_pos")]
    assert position == [0, 0, 8] and ckpt["train_config"]["data_dir"] == str(new_data)


def test_bundled_corpus_runs_name_it_and_not_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no edu_fineweb10B here: the bundled corpus
    tg.main(
        ["--max_steps", "1", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--B", "2"]
        + ["--T", "32", "--total_batch_size", "64", "--val_loss_steps", "1", "--device", "cpu"]
    )
    ckpt = torch.load(tmp_path / "log" / "model_00001.pt", weights_only=True)
    assert ckpt["train_config"]["data_dir"] == "bundled"  # wherever the project is checked out
    # checkpoints of earlier versions held the absolute path of this checkout's corpus shards
    ckpt["train_config"]["data_dir"] = datafiles.BUNDLED_SHARDS_DIR
    os.makedirs(tmp_path / "old")
    torch.save(ckpt, tmp_path / "old" / "model_00001.pt")
    cfg, _ = tg.resolve_config({"resume": "latest", "log_dir": str(tmp_path / "old")})
    assert cfg.data_dir == "bundled"


def test_a_closed_stdout_stops_the_run_and_saves_it(tmp_path, data):
    # `python train_gpt2.py | head`: once head has its lines and exits, the run's next print
    # meets a pipe with no reader (SIGPIPE); it stops as for SIGTERM, saving its last step
    tg.main(args_for(data, tmp_path / "full", max_steps=20))
    expected = open(tmp_path / "full" / "log.txt").read()
    log_dir = tmp_path / "piped"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT] + args_for(data, log_dir, max_steps=20),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    for line in proc.stdout:
        if line.startswith("step     4 "):
            break
    proc.stdout.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == ""  # no traceback: the message went where stdout went
    step = checkpoint_step(checkpoints.latest_checkpoint(str(log_dir)))
    assert 5 <= step < 15  # within a few steps of the close, not at the end
    tg.main(["--resume", "latest", "--log_dir", str(log_dir)])
    assert open(log_dir / "log.txt").read() == expected


@pytest.mark.parametrize("nohup", [False, True])
def test_a_closed_terminal_stops_the_run_and_saves_it_unless_nohup(tmp_path, data, nohup):
    # the run prints to a terminal (a pty) that closes as step 4 begins, then gets the SIGHUP a
    # closing terminal sends: from then on every print fails (EIO). It saves and stops, or, started
    # under nohup (SIGHUP ignored), trains on to the end with nowhere to print
    tg.main(args_for(data, tmp_path / "full", max_steps=12))
    expected = open(tmp_path / "full" / "log.txt").read()
    log_dir = tmp_path / "terminal"
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, FAULTS] + args_for(data, log_dir, max_steps=12),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=dict(os.environ, FAULT="hangup_at_step:4", FAULT_DIR=str(tmp_path), PYTHONPATH=ROOT),
        preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
    )
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + 60
    while not (tmp_path / "ready").exists():  # read what the run prints until step 4 begins
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no sign of step 4 in 60 s: {seen.decode(errors='replace')[-500:]}")
        if select.select([master], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):  # EIO once the run has exited
                seen += os.read(master, 4096)
    os.close(master)
    (tmp_path / "closed").touch()
    code = proc.wait(timeout=60)
    if nohup:
        assert code == 0 and open(log_dir / "log.txt").read() == expected
        return
    assert code == 128 + signal.SIGHUP
    assert checkpoint_step(checkpoints.latest_checkpoint(str(log_dir))) == 4
    tg.main(["--resume", "latest", "--log_dir", str(log_dir)])
    assert open(log_dir / "log.txt").read() == expected
