"""
A run's directory (--log_dir): log.txt, run.json, and the rules that keep a run from overwriting
or mixing with another run's files: one run at a time owns it. The checkpoints in it are
support/checkpoints.py's.
"""

import contextlib
import json
import os
import re
import subprocess
import time

from support import PROJECT_DIR, checkpoints, files
from support.cli import check_output_dir

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

# log.txt's kinds of lines ({step} {kind} {value}), each with the metric it is (as dashboards
# name it): the one list of them
LOG_KINDS = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}
LOG_KINDS.update(bpb="val/bits_per_byte", core="core/score")
LOG_LINE = re.compile(rf"(\d+) ({'|'.join(LOG_KINDS)}) \S+")


def read_log(path):
    """The lines of a log.txt, each checked to be one of ours (so that a resume never trims a
    file it does not understand)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not LOG_LINE.fullmatch(line):
            raise SystemExit(f"{path} line {i} is not a line of train_gpt2.py's log: {line[:60]!r}")
    return lines


@contextlib.contextmanager
def owned(log_dir):
    """The log dir, owned by this run until the block ends: a second run into it, started while
    this one runs, is refused in one line. Under torchrun rank 0 holds it for every rank. The
    lock is the directory's own (flock), so it leaves no file behind, and the system drops it
    when its process dies, however it dies. After check_log_dir (a log dir that is a file, say,
    is refused there)."""
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    created = not os.path.exists(log_dir)
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(log_dir, os.O_RDONLY)
    except OSError as e:
        raise SystemExit(f"cannot write to --log_dir {log_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"{log_dir} is in use by another run: wait for it to end, or use another --log_dir"
            ) from None
        except OSError:  # a file system without locks (some network ones): nothing to hold
            pass
        try:
            yield
        finally:
            if created and not os.listdir(log_dir):  # refused before it wrote: leave no trace
                os.rmdir(log_dir)
    finally:
        os.close(fd)


def check_log_dir(log_dir, checkpoint, restart=False):
    """Refuse, before anything is written, a log dir that would mix or lose another run's files.

    A fresh run needs a log dir without checkpoints or log lines; one that starts again (--resume
    auto, no checkpoint yet) replaces the log lines of a run that died before its first. A resumed
    run continues in its checkpoint's directory only from the latest checkpoint there (a later
    one would be overwritten); into any other directory it branches off, and that directory must
    be free.
    """
    check_output_dir(log_dir, "--log_dir")
    steps = checkpoints.checkpoint_steps(log_dir)
    log_lines = read_log(os.path.join(log_dir, "log.txt"))
    if checkpoint is not None:
        step = checkpoint["step"]
        if resumes_in(checkpoint, log_dir):
            later = [s for s in steps if s > step]
            if later:
                raise SystemExit(
                    f"{checkpoints.latest_checkpoint(log_dir)} is later than the checkpoint to "
                    f"resume (step {step}): resume the latest with --resume latest, or branch off "
                    f"step {step} into a new --log_dir"
                )
            return
        what = "checkpoints" if steps else "a log.txt"
        if steps or log_lines:
            raise SystemExit(
                f"{log_dir} holds {what} of another run: resume into the checkpoint's own "
                "directory or a new --log_dir"
            )
        return
    if steps:  # never overwrite another run's checkpoints
        raise SystemExit(
            f"{log_dir} holds checkpoints of an earlier run "
            f"({checkpoints.latest_checkpoint(log_dir)})"
            ": continue it with --resume latest, or start afresh in another --log_dir"
        )
    if log_lines and not restart:
        raise SystemExit(
            f"{log_dir}/log.txt holds the log of an earlier run ({len(log_lines)} lines) and no "
            "checkpoint: start it again with --resume auto, or afresh in another --log_dir"
        )


def resumes_in(checkpoint, log_dir):
    """Whether a run from this checkpoint continues in the checkpoint's own directory."""
    own_dir = os.path.dirname(os.path.abspath(checkpoint.path))
    return os.path.isdir(log_dir) and os.path.samefile(own_dir, log_dir)


def git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunLog:
    """log.txt ({step} {kind} {value} lines, of LOG_KINDS) and run.json (the run's settings, and
    one entry per resume) in the log dir, written by the master process only."""

    def __init__(self, log_dir, master_process):
        self.dir, self.master_process = log_dir, master_process
        self.path = os.path.join(log_dir, "log.txt")

    def start(self, run_info, checkpoint, print0=print):
        """A new log.txt and run.json (run_info, with the git commit and the time); on resume,
        the log up to the resumed step (carried over from the checkpoint's directory when the run
        branches into another) and the run.json of the run with this resume appended."""
        if not self.master_process:
            return
        run_info = dict(
            run_info, git_commit=git_commit(), started=time.strftime("%Y-%m-%d %H:%M:%S")
        )
        try:
            os.makedirs(self.dir, exist_ok=True)
            checkpoints.remove_unfinished_saves(self.dir)
            files.remove_stale_temporaries(self.dir, r"log\.txt|run\.json")
            run = dict(run_info, resumes=[])
            lines = []
            if checkpoint is not None:
                step = checkpoint["step"]
                own_dir = os.path.dirname(os.path.abspath(checkpoint.path))
                lines = read_log(os.path.join(own_dir, "log.txt"))
                kept = [line for line in lines if int(line.split()[0]) < step]
                if len(kept) < len(lines):
                    print0(
                        f"log.txt: {len(lines) - len(kept)} lines of step {step} and later "
                        "dropped: this run redoes those steps"
                    )
                lines = kept
                run = self.read_run(own_dir) or dict(run_info, resumes=[])
                run["resumes"].append(
                    dict(
                        step=step,
                        time=time.strftime("%Y-%m-%d %H:%M:%S"),
                        checkpoint=checkpoint.path,
                        **{k: run_info[k] for k in ("git_commit", "world_size", "device")},
                        config=run_info["config"],
                    )
                )
            with files.atomic_open(self.path, "w") as f:
                f.writelines(line + "\n" for line in lines)
            files.write_json(os.path.join(self.dir, "run.json"), run)
        except OSError as e:
            raise SystemExit(f"cannot write to --log_dir {self.dir}: {e.strerror or e}") from None

    @staticmethod
    def read_run(directory):
        """The run.json in directory, or None if there is none we can read."""
        try:
            with open(os.path.join(directory, "run.json")) as f:
                run = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(run, dict) or not isinstance(run.setdefault("resumes", []), list):
            return None
        return run

    def write(self, step, kind, value):
        if self.master_process:
            try:
                with open(self.path, "a") as f:
                    f.write(f"{step} {kind} {value}\n")
            except OSError as e:
                raise SystemExit(f"cannot write {self.path}: {e.strerror or e}") from None
