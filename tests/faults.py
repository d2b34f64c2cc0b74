"""Run train_gpt2.py with one fault injected, for the tests that need a fault inside a process
they cannot monkeypatch: torchrun's workers, or a run that must receive a signal at an exact
point. The FAULT environment variable names the fault and where it strikes, NAME:ARG[:RANK]
(RANK: the only rank it strikes; every rank if absent); the arguments are train_gpt2.py's.
FLOAT64=1 makes every float tensor float64, for comparisons that float32's rounding would blur.

    FAULT=signal_at_step:4 python tests/faults.py --max_steps 12 ...

Faults:
    signal_at_step:STEP     SIGTERM to this process as training step STEP begins
    sigint_at_step:STEP     the same with SIGINT (Ctrl-C)
    two_sigints_at_step:STEP  two Ctrl-C in a row
    hangup_at_step:STEP     as step STEP begins, wait for the terminal of stdout to close, then
                            SIGHUP, as a terminal that closes sends (see hang_up: $FAULT_DIR)
    signal_in_hellaswag:N   SIGTERM during the N-th HellaSwag batch scored; from then on each
                            batch takes 3 s, as in a long evaluation pass
    signal_in_val:N         the same with the N-th val micro-batch
    hellaswag_offline       the HellaSwag download fails
    disk_full_writing_shards  tokenizing the bundled corpus anew, writing its shards fails (ENOSPC)
    disk_full_at_save       writing a checkpoint fails with ENOSPC partway (inside torch.save)
    two_sigints_at_save:STEP  Ctrl-C as step STEP begins, and again while its checkpoint is written
    kill_in_sharded_save:STEP  SIGKILL once this rank has written its shards of step STEP's
                            sharded checkpoint, before the checkpoint is complete
    disk_full_in_sharded_save  writing a sharded checkpoint's shards fails with ENOSPC partway
    kill_writing_shards:STEP  SIGKILL as this rank opens its first shard file of step STEP's
                            sharded checkpoint (the other ranks are inside the same save), in
                            the first attempt of a torchrun job only
    kill_in_save:POINT/STEP  SIGKILL at POINT of saving step STEP's checkpoint (and removing
                            the older ones): before_write, during_write, before_rename,
                            during_removal (one checkpoint renamed away, not yet deleted)
    kill_at_step:STEP       SIGKILL as step STEP begins, in the first attempt of a torchrun job
                            only (its restarts run on)
    slow_save:STEP          SIGTERM as step STEP begins, and every checkpoint write takes 3 s
    stall_at_step:STEP      as step STEP begins rank 1 stops (SIGSTOP), and rank 0 gets SIGTERM
    fewer_shards            list_shards misses the last train shard
    slow_start:SECONDS      start-up (making the data loaders) takes this long
"""

import contextlib
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hellaswag_eval  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from support import checkpoints, datafiles, files  # noqa: E402


def kill_self(signum):
    """Send a signal to this process, saying so first (tests time the stop from this line)."""
    print(f"fault: sent {signal.Signals(signum).name}", flush=True)
    os.kill(os.getpid(), signum)


def at_step(step, action):
    """Run action() as training step `step` begins (the loop sets its learning rate first), in
    either recipe."""
    get_recipe = tg.get_recipe

    def patched(name):
        recipe = get_recipe(name)

        def set_learning_rate(optimizer, s, cfg):
            if s == step:
                action()
            return recipe.set_learning_rate(optimizer, s, cfg)

        return dataclasses.replace(recipe, set_learning_rate=set_learning_rate)

    tg.get_recipe = patched


def hang_up():
    """Wait until stdout's terminal is closed, then SIGHUP this process, as a closing terminal
    does. The test and this fault tell each other through files in $FAULT_DIR, never through the
    terminal itself (a write to it may fail at any moment): `ready` when this step has begun,
    `closed` once the test has closed the terminal. A failing write to it counts as closed too."""
    directory = os.environ["FAULT_DIR"]
    open(os.path.join(directory, "ready"), "w").close()
    while not os.path.exists(os.path.join(directory, "closed")):
        try:
            os.write(sys.stdout.fileno(), b".")
        except OSError:
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGHUP)


def slowed(fn, n, seconds=3.0):
    """fn, sending SIGTERM on its n-th call, and from then on slow: each call takes `seconds`."""
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            kill_self(signal.SIGTERM)
        if len(calls) >= n:
            time.sleep(seconds)
        return fn(*args, **kwargs)

    return patched


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FailingFile:
    """A file that calls fail() once `after` bytes have been written to it, as a disk that
    fills up does: torch.save's zip writer meets it in the middle of a checkpoint."""

    def __init__(self, f, fail, after=1 << 16):
        self.f, self.fail, self.left = f, fail, after

    def write(self, data):
        self.left -= len(data)
        if self.left < 0:
            self.fail()
        return self.f.write(data)

    def flush(self):
        return self.f.flush()

    def __getattr__(self, name):  # fileno, tell, ...: the real file's
        return getattr(self.f, name)


def failing_checkpoint_writes(fail, name=".pt"):
    """Checkpoints whose file name ends in `name` are written to a FailingFile."""
    atomic_open = files.atomic_open

    @contextlib.contextmanager
    def patched(path, mode="wb"):
        with atomic_open(path, mode) as f:
            yield FailingFile(f, fail) if path.endswith(name) else f

    files.atomic_open = patched


def kill_in_save(point, step):
    """SIGKILL at one point of the save of step `step` and the removals after it."""
    name = f"model_{int(step):05d}"
    kill = lambda: kill_self(signal.SIGKILL)  # noqa: E731
    if point == "before_write":
        atomic_open = files.atomic_open

        def patched(path, mode="wb"):
            if name in path:
                kill()
            return atomic_open(path, mode)

        files.atomic_open = patched
    elif point == "during_write":
        failing_checkpoint_writes(kill, f"{name}.pt")
    elif point == "before_rename":
        replace = os.replace

        def patched(src, dst):
            if os.path.basename(dst).startswith(name):
                kill()
            return replace(src, dst)

        os.replace = patched  # every rename; only the one into the checkpoint's name kills
    elif point == "during_removal":
        remove = files.atomic_remove

        def patched(path):
            if checkpoints.latest_checkpoint(os.path.dirname(path)).endswith(name + ".pt"):
                os.replace(path, files.temporary_path(path))  # out of the listing, not deleted
                kill()
            return remove(path)

        files.atomic_remove = patched
    else:
        raise SystemExit(f"unknown point {point}")


def stall_or_stop():
    """Rank 1 stops (SIGSTOP) as one whose machine hangs, and is killed 20 s later (no test
    waits longer); rank 0 gets SIGTERM 2 s after, once it waits for rank 1 in a collective."""
    if os.environ["RANK"] == "1":
        subprocess.Popen(["sh", "-c", f"sleep 20; kill -KILL {os.getpid()}"])
        print("fault: rank 1 stopped", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        threading.Timer(2.0, kill_self, [signal.SIGTERM]).start()


def inject(name, arg):
    if name == "signal_at_step":
        at_step(int(arg), lambda: kill_self(signal.SIGTERM))
    elif name == "sigint_at_step":
        at_step(int(arg), lambda: kill_self(signal.SIGINT))
    elif name == "two_sigints_at_step":
        at_step(int(arg), lambda: (kill_self(signal.SIGINT), kill_self(signal.SIGINT)))
    elif name == "hangup_at_step":
        at_step(int(arg), hang_up)
    elif name == "signal_in_hellaswag":
        hellaswag_eval.ending_losses = slowed(hellaswag_eval.ending_losses, int(arg))
    elif name == "signal_in_val":
        evaluate = tg.evaluate_val_loss

        def patched(model, loader, *args):
            if "next_batch" not in vars(loader):  # the val loader, slowed once for good
                loader.next_batch = slowed(loader.next_batch, int(arg))
            return evaluate(model, loader, *args)

        tg.evaluate_val_loss = patched
    elif name == "hellaswag_offline":

        def offline(split, cache_dir=None):
            raise SystemExit("could not download hellaswag_val.jsonl (ConnectionError)")

        datafiles.download_hellaswag = offline
    elif name == "disk_full_writing_shards":  # of the bundled corpus, into a new directory
        datafiles.BUNDLED_SHARDS_DIR = os.path.abspath("corpus_shards")
        datafiles.write_shard = disk_full
    elif name == "disk_full_at_save":
        failing_checkpoint_writes(disk_full)
    elif name == "two_sigints_at_save":
        at_step(int(arg), lambda: kill_self(signal.SIGINT))
        once = []  # the second Ctrl-C, once, in the middle of the save
        second = lambda: once or once.append(kill_self(signal.SIGINT))
        failing_checkpoint_writes(second, f"model_{int(arg):05d}.pt")
    elif name == "kill_in_sharded_save":
        import torch.distributed.checkpoint as dcp

        save = dcp.save

        def killed_after(state, checkpoint_id, **writing):
            save(state, checkpoint_id=checkpoint_id, **writing)
            if f"model_{int(arg):05d}" in checkpoint_id:
                kill_self(signal.SIGKILL)

        dcp.save = killed_after
    elif name == "disk_full_in_sharded_save":
        from torch.distributed.checkpoint.filesystem import FileSystem

        create_stream = FileSystem.create_stream

        @contextlib.contextmanager
        def failing(self, path, mode):
            with create_stream(self, path, mode) as f:
                yield FailingFile(f, disk_full, after=1024)

        FileSystem.create_stream = failing
    elif name == "kill_writing_shards":
        from torch.distributed.checkpoint.filesystem import FileSystem

        create_stream = FileSystem.create_stream

        def killed(self, path, mode):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if first_attempt and f"model_{int(arg):05d}" in str(path):
                kill_self(signal.SIGKILL)
            return create_stream(self, path, mode)

        FileSystem.create_stream = killed
    elif name == "kill_in_save":
        kill_in_save(*arg.split("/"))
    elif name == "kill_at_step":
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            at_step(int(arg), lambda: kill_self(signal.SIGKILL))
    elif name == "slow_save":
        at_step(int(arg), lambda: kill_self(signal.SIGTERM))
        atomic_open = files.atomic_open

        def slow(path, mode="wb"):
            if checkpoints.CHECKPOINT_FILE.fullmatch(os.path.basename(path)):
                time.sleep(3)
            return atomic_open(path, mode)

        files.atomic_open = slow
    elif name == "stall_at_step":
        at_step(int(arg), stall_or_stop)
    elif name == "fewer_shards":
        list_shards = datafiles.list_shards
        datafiles.list_shards = lambda data_dir, split: list_shards(data_dir, split)[
            : -1 if split == "train" else None
        ]
    elif name == "slow_start":
        loaders = tg.make_loaders

        def slow(*args):
            time.sleep(float(arg))
            return loaders(*args)

        tg.make_loaders = slow
    else:
        raise SystemExit(f"unknown FAULT {name}")


if __name__ == "__main__":
    if os.environ.get("FLOAT64"):  # every float tensor in float64: nothing blurred by rounding
        tg.torch.set_default_dtype(tg.torch.float64)
    name, _, rest = os.environ.get("FAULT", "").partition(":")
    arg, _, rank = rest.partition(":")
    if name and (not rank or int(rank) == int(os.environ.get("RANK", "0"))):
        inject(name, arg)
    tg.main(sys.argv[1:])
