"""Long runs that need no one watching: one command line (--resume auto) for the first start and
every restart, checkpoints on a clock (--checkpoint_minutes), bounded disk (--keep_checkpoints),
saves in the background (--async_checkpoint), and one run at a time in a log dir. The reference
is always an uninterrupted run of the same command line; torchrun's restarts are in
test_distributed.py (DDP) and test_sharding.py (FSDP)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import FAULTS, ROOT, TINY, make_shards
from support import checkpoints

EVERY_STEP = ["--checkpoint_minutes", "1e-9"]  # a clock that is always late: a save each step


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread, here and in the subprocesses: logs are compared to the byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    make_shards(path, [3000, 9000, 7000])
    return str(path)


def args_for(data, log_dir, *extra, max_steps=12):
    return TINY + [
        "--data_dir", data, "--log_dir", str(log_dir), "--max_steps", str(max_steps),
        "--total_batch_size", "128", "--warmup_steps", "2", "--eval_interval", "4",
        "--val_loss_steps", "1", "--checkpoint_interval", "4", "--num_return_sequences", "0",
        "--resume", "auto", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """12 uninterrupted steps, saving at each one and keeping the milestones and the newest 2:
    (log dir, log.txt)."""
    log_dir = tmp_path_factory.mktemp("reference") / "log"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        tg.main(args_for(data, log_dir, *EVERY_STEP, "--keep_checkpoints", "2"))
    return log_dir, open(log_dir / "log.txt").read()


def run_with_fault(fault, args):
    """train_gpt2.py with a fault of tests/faults.py: (exit code, stdout, stderr)."""
    env = dict(os.environ, FAULT=fault, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, FAULTS] + args, capture_output=True, text=True, env=env, timeout=120
    )
    return out.returncode, out.stdout, out.stderr


def contents(log_dir):
    return sorted(os.listdir(log_dir))


def same(a, b):
    """Two checkpoints' contents, to the bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load(path):
    """A checkpoint's contents, less the settings that name where it was written and how."""
    checkpoint = torch.load(path, weights_only=True)
    for key in ("log_dir", "resume", "async_checkpoint"):
        checkpoint["train_config"].pop(key)
    return checkpoint


def test_one_command_line_starts_and_restarts_after_a_kill(data, reference, tmp_path):
    ref_dir, expected = reference
    args = args_for(data, tmp_path / "log", *EVERY_STEP, "--keep_checkpoints", "2")
    code, out, err = run_with_fault("kill_at_step:7", args)
    assert code == -signal.SIGKILL, out + err
    assert checkpoints.checkpoint_steps(str(tmp_path / "log")) == [4, 6, 7]
    tg.main(args)  # the same command line, run again
    assert open(tmp_path / "log" / "log.txt").read() == expected
    assert contents(tmp_path / "log") == contents(ref_dir)
    assert same(load(tmp_path / "log" / "model_00012.pt"), load(ref_dir / "model_00012.pt"))


@pytest.mark.parametrize(
    "point", ["before_write", "during_write", "before_rename", "during_removal"]
)
def test_a_kill_anywhere_in_save_and_removal_leaves_a_checkpoint_auto_continues(
    data, reference, tmp_path, point
):
    ref_dir, expected = reference
    args = args_for(data, tmp_path / "log", *EVERY_STEP, "--keep_checkpoints", "2")
    code, out, err = run_with_fault(f"kill_in_save:{point}/7", args)
    assert code == -signal.SIGKILL, out + err
    # step 7's checkpoint is complete only once renamed; a removal moves the oldest out first
    left = {"before_write": [4, 5, 6], "during_write": [4, 5, 6], "before_rename": [4, 5, 6]}
    assert checkpoints.checkpoint_steps(str(tmp_path / "log")) == left.get(point, [4, 6, 7])
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path / "log")) == (
        point != "before_write"
    )
    tg.main(args)
    assert open(tmp_path / "log" / "log.txt").read() == expected
    assert contents(tmp_path / "log") == contents(ref_dir)  # the killed save's temporary is gone


def test_keep_checkpoints_keeps_the_milestones_and_the_newest(data, tmp_path):
    keep = ["--keep_checkpoints", "2", "--checkpoint_interval", "20"]
    tg.main(args_for(data, tmp_path / "keep", *EVERY_STEP, *keep, max_steps=50))
    assert checkpoints.checkpoint_steps(str(tmp_path / "keep")) == [20, 40, 49, 50]
    # by default every checkpoint stays: the interval's, and the clock's
    tg.main(args_for(data, tmp_path / "all", "--checkpoint_minutes", "1e-9", max_steps=5))
    assert checkpoints.checkpoint_steps(str(tmp_path / "all")) == [1, 2, 3, 4, 5]
    # without the clock, the interval's and the last
    tg.main(args_for(data, tmp_path / "interval", max_steps=10))
    assert checkpoints.checkpoint_steps(str(tmp_path / "interval")) == [4, 8, 10]


def test_auto_starts_again_a_run_that_died_before_its_first_checkpoint(data, tmp_path):
    full = args_for(data, tmp_path / "full", max_steps=6)
    tg.main(full)
    args = args_for(data, tmp_path / "log", max_steps=6)
    code, out, err = run_with_fault("kill_at_step:3", args)
    assert code == -signal.SIGKILL and checkpoints.checkpoint_steps(str(tmp_path / "log")) == []
    assert open(tmp_path / "log" / "log.txt").read()  # steps 0-2 were logged
    fresh = [a for a in args if a not in ("--resume", "auto")]
    with pytest.raises(SystemExit, match=r"no checkpoint: start it again with --resume auto"):
        tg.main(fresh)
    tg.main(args)
    assert open(tmp_path / "log" / "log.txt").read() == open(tmp_path / "full" / "log.txt").read()


def test_auto_refuses_a_log_dir_of_another_shape_in_one_line(data, reference, tmp_path):
    ref_dir, _ = reference
    args = args_for(data, ref_dir, "--n_embd", "64")
    checkpoint = ref_dir / "model_00012.pt"
    message = f"checkpoint {checkpoint} has n_embd=32, but n_embd=64 was requested"
    with pytest.raises(SystemExit, match=message):
        tg.main(args)


def test_a_second_run_into_a_busy_log_dir_is_refused_and_a_killed_one_leaves_no_lock(
    data, reference, tmp_path
):
    _, expected = reference
    args = args_for(data, tmp_path / "log", *EVERY_STEP, "--keep_checkpoints", "2")
    env = dict(os.environ, FAULT="slow_start:60", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(
        [sys.executable, FAULTS] + args, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert first.stdout.readline().startswith("attention: ")  # it has the log dir
        assert first.stdout.readline().startswith("decayed parameter tensors")  # it is starting
        busy = f"{tmp_path / 'log'} is in use by another run: wait for it to end"
        for second in (args, [a for a in args if a not in ("--resume", "auto")]):
            with pytest.raises(SystemExit, match=busy):
                tg.main(second)
    finally:
        first.kill()
        first.wait()
    tg.main(args)  # the lock went with its process
    assert open(tmp_path / "log" / "log.txt").read() == expected


def test_async_checkpoints_equal_synchronous_ones_to_the_bit(data, reference, tmp_path):
    ref_dir, expected = reference
    args = args_for(data, tmp_path / "log", *EVERY_STEP, "--keep_checkpoints", "2")
    tg.main(args + ["--async_checkpoint", "1"])
    assert open(tmp_path / "log" / "log.txt").read() == expected
    assert contents(tmp_path / "log") == contents(ref_dir)
    for step in checkpoints.checkpoint_steps(str(ref_dir)):
        name = f"model_{step:05d}.pt"
        assert same(load(tmp_path / "log" / name), load(ref_dir / name)), step


def test_a_full_disk_in_a_background_save_ends_in_one_line(data, tmp_path):
    log_dir = tmp_path / "log"
    tg.main(args_for(data, log_dir, max_steps=4))
    before = contents(log_dir)
    args = args_for(data, log_dir, *EVERY_STEP, "--async_checkpoint", "1")
    code, out, err = run_with_fault("disk_full_at_save", args)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        f"could not save {log_dir}/model_00005.pt: No space left on device; the earlier "
        f"checkpoints are intact, the newest {log_dir}/model_00004.pt"
    ]
    assert contents(log_dir) == before


def test_sigterm_while_a_background_save_is_in_flight(data, reference, tmp_path):
    _, expected = reference
    log_dir = tmp_path / "log"
    args = args_for(data, log_dir, *EVERY_STEP, "--async_checkpoint", "1")
    # each write takes 3 s; the signal comes as step 6 begins, with step 6's save in flight
    code, out, err = run_with_fault("slow_save:6", args)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, out + err
    assert "stopped by SIGTERM after step 5" in out
    saved = [line for line in out.splitlines() if line.startswith("saved ")]
    assert [line.split()[1] for line in saved] == [
        str(log_dir / f"model_{s:05d}.pt") for s in range(1, 7)
    ]  # each step once, the last one complete before the exit
    assert load(log_dir / "model_00006.pt")["step"] == 6
    tg.main(args)
    assert open(log_dir / "log.txt").read() == expected


def test_a_damaged_newest_checkpoint_is_refused_naming_the_one_before_it(reference, tmp_path):
    ref_dir, _ = reference
    log_dir = tmp_path / "log"
    shutil.copytree(ref_dir, log_dir)
    newest, before = log_dir / "model_00012.pt", log_dir / "model_00011.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a disk that broke
    with pytest.raises(SystemExit) as e:
        tg.main(["--resume", "auto", "--log_dir", str(log_dir)])
    assert str(e.value.code) == (
        f"checkpoint {newest} is corrupt or not a checkpoint of ours (RuntimeError); the one "
        f"before it is {before}: move {newest} away to resume from it"
    )
    # a sharded checkpoint's directory without its progress file
    os.remove(newest)
    (log_dir / "model_00012.dcp").mkdir()
    with pytest.raises(SystemExit) as e:
        tg.main(["--resume", "latest", "--log_dir", str(log_dir)])
    assert str(e.value.code).startswith(
        f"checkpoint {log_dir / 'model_00012.dcp'} is incomplete: it has no meta.pt; the one "
        f"before it is {before}"
    )
