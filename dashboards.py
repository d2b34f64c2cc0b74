"""
Watching a run live: TensorBoard event files in the log dir (--tensorboard 1), a Weights & Biases
run (--wandb_project), and the ETA on every step line. log.txt stays the run's record: each of its
lines is also a point on the dashboards, beside what only they show (learning rate of every
parameter group, gradient norm, tokens/s, MFU, peak memory, tokens seen, skipped steps, samples).
Only the master process writes them. Both packages are optional and imported only when asked for.

A run resumed in its own log dir continues the same curves with every step and every val point
once, even after a SIGKILL: TensorBoard's points are written out with each log.txt line and the
resumed process hides the earlier ones from the resumed step on (purge_step); W&B, whose history
only grows, gets no step it already holds, and the steps it lost (its transaction log is written
out every 15 s, its server gets them later still) are sent again from log.txt. Which steps W&B
holds is the W&B run's own account: the server's count online, the transaction log of the process
before offline (found through the log dir's wandb_run.json). Only log.txt's values come back for
the lost steps; the other metrics of those steps (learning rates, norm, speed) are gone.
"""

import atexit
import collections
import contextlib
import importlib
import json
import math
import os
import struct
import time
import zlib

from support import files
from support.cli import first_line
from support.devices import peak_memory
from support.rundir import LOG_KINDS, read_log

# the packages the dashboards' flags need: {flag: (module imported, pip package, how to turn it
# off, which a resume needs: the checkpoint's settings have the flag on)}
PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "--tensorboard 0"),
    "wandb_project": ("wandb", "wandb", "--wandb_project ''"),
}
WANDB_STATE = "wandb_run.json"
# W&B's transaction log (run-ID.wandb) is LevelDB's log format: blocks of this size, holding
# chunks of records, each chunk a whole record or its first, middle or last part
LOG_BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
# the ETA's window: whole eval intervals (one evaluation each, so it does not jump after one), at
# least this many steps
ETA_MIN_STEPS = 20


def check_packages(tensorboard, wandb_project, wandb_run_name):
    """Refuse, in one line and before anything runs, a dashboard whose package is missing, and a
    W&B run name without a W&B project."""
    if wandb_run_name and not wandb_project:
        raise SystemExit("--wandb_run_name names a W&B run: it needs --wandb_project")
    wanted = {"tensorboard": tensorboard, "wandb_project": wandb_project}
    for flag, (module, package, off) in PACKAGES.items():
        if wanted[flag]:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise SystemExit(
                    f"--{flag} needs the {package} package: pip install {package}, or run with "
                    f"{off} ({e})"
                ) from None


def eta_seconds(step_ends, steps_left, other_seconds=0.0):
    """Seconds until steps_left more steps are done, at the mean time per step between the clock
    readings step_ends (taken as recent steps ended: the checkpoints between them count), less
    other_seconds spent between them on what is not a step."""
    return (step_ends[-1] - step_ends[0] - other_seconds) / (len(step_ends) - 1) * steps_left


def format_eta(seconds):
    """A duration as tqdm-like progress bars show it: 12s, 3m05s, 5h12m, 2d03h."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


class ETA:
    """The time a run has left: its steps at their mean time over a recent window (the
    checkpoints in it count), and its evaluations still to come at the mean time of those done.
    Evaluations are timed on their own: a window without one (the first steps of a run) would
    leave them out, and one with them would count them as steps."""

    def __init__(self, max_steps, eval_interval):
        self.max_steps, self.eval_interval = max_steps, eval_interval
        window = eval_interval * math.ceil(ETA_MIN_STEPS / eval_interval)
        self.step_ends = collections.deque(maxlen=window + 1)
        self.evaluations = collections.deque(maxlen=window)  # (end, seconds) of recent ones

    def evaluated(self, start, end):
        self.evaluations.append((end, end - start))

    def step_ended(self, step, dt, now):
        """Seconds left after training step `step`, which took dt and ended now."""
        self.step_ends.append(now)
        # a process's first step compiles and warms up: it stands alone only until another ends
        ends = self.step_ends if len(self.step_ends) > 1 else (now - dt, now)
        evaluating = sum(seconds for end, seconds in self.evaluations if end > ends[0])
        left = eta_seconds(ends, self.max_steps - step - 1, evaluating)
        if self.evaluations:
            mean = sum(seconds for _, seconds in self.evaluations) / len(self.evaluations)
            left += mean * self.evaluations_after(step)
        return left

    def evaluations_after(self, step):
        """The evaluations still to come after training step `step`: every eval_interval steps,
        and at the last step."""
        every = self.max_steps // self.eval_interval - step // self.eval_interval
        return every + (self.max_steps % self.eval_interval != 0)


class Dashboard:
    """What the loop logs: log.txt's lines (through the run's rundir.RunLog), every line and each
    step's other metrics on TensorBoard and W&B once started, and the step lines' ETA."""

    def __init__(self, run_log, device, max_steps, eval_interval):
        self.run_log, self.device = run_log, device
        self.eta = ETA(max_steps, eval_interval)
        self.tensorboard = self.wandb = None

    def start(self, log_dir, run_info, start_step, tensorboard, wandb_project, wandb_name, here):
        """The dashboards asked for (on the master only), showing run_info (run.json's: the
        settings and more) from start_step on; here: the run resumes in its own log dir."""
        config = dict(run_info["config"], **{k: v for k, v in run_info.items() if k != "config"})
        if tensorboard:
            self.start_tensorboard(log_dir, config, start_step)
        if wandb_project:
            self.start_wandb(wandb_project, wandb_name, log_dir, config, here, start_step)

    def start_tensorboard(self, log_dir, config, start_step):
        """TensorBoard event files in log_dir, from start_step on (a resumed run's points hide
        those the earlier process logged from there), with the run's config as text."""
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir, purge_step=start_step)
        atexit.register(self.tensorboard.close)  # a run that fails keeps its last points
        text = json.dumps(config, indent=2).replace("\n", "\n    ")
        self.tensorboard.add_text("config", f"    {text}", start_step)

    def start_wandb(self, project, run_name, log_dir, config, resumed_here, start_step):
        """A new W&B run, or on a resume in the same log dir the run it continues, sent from
        log.txt the steps before start_step that it lost; in the mode the user's W&B settings say
        (WANDB_MODE=offline: no network)."""
        import wandb

        self.wandb_path = os.path.join(log_dir, WANDB_STATE)
        earlier = None
        if resumed_here and os.path.exists(self.wandb_path):
            with open(self.wandb_path) as f:
                earlier = json.load(f)
        try:
            self.wandb = wandb.init(
                project=project,
                name=run_name or None,
                id=earlier["id"] if earlier else None,
                resume="allow" if earlier else None,
            )
        except Exception as e:  # no login, no server, the run's id in use: W&B's own account
            raise SystemExit(f"cannot start the W&B run: {first_line(e)}") from None
        self.wandb.config.update(config, allow_val_change=True)  # a resume may change settings
        self.wandb_log_file = self.wandb.settings.sync_file
        self.wandb_floor = self.wandb_step = self.last_step_wandb_holds(earlier)
        self.save_wandb_state()
        self.resend_from_log(start_step)

    def last_step_wandb_holds(self, earlier):
        """The last step that the W&B run holds for sure (-1: none), by the account of the
        process before (earlier: its wandb_run.json) and of W&B itself: the server's count
        online, offline that process's transaction log, which W&B writes out every 15 s."""
        if earlier is None:
            return -1
        if self.wandb.offline:
            return max(earlier["step"], last_step_in(earlier.get("transaction_log")))
        return max(earlier["step"], self.wandb.starting_step - 1)

    def save_wandb_state(self):
        # the W&B run, the last step it holds for sure, and where this process's records go
        state = {"id": self.wandb.id, "step": self.wandb_floor}
        files.write_json(self.wandb_path, dict(state, transaction_log=self.wandb_log_file))

    def resend_from_log(self, start_step):
        """log.txt's values of the steps before start_step that the W&B run lacks (the other
        metrics of those steps are not in log.txt: they are lost)."""
        rows = collections.defaultdict(dict)
        for line in read_log(self.run_log.path):
            step, kind, value = line.split()
            if self.wandb_floor < int(step) < start_step:
                rows[int(step)][LOG_KINDS[kind]] = float(value)
        for step in sorted(rows):
            self.log_wandb(step, rows[step])

    def log(self, step, metrics):
        """Scalars of step on the dashboards that are on."""
        if self.tensorboard is not None:
            for tag, value in metrics.items():
                self.tensorboard.add_scalar(tag, value, step)
        self.log_wandb(step, metrics)

    def log_wandb(self, step, data):
        if self.wandb is not None and step > self.wandb_floor:
            self.wandb.log(data, step=step)
            self.wandb_step = max(self.wandb_step, step)

    def write(self, step, kind, value):
        """A line of log.txt ({step} {kind} {value}), and its point on the dashboards."""
        self.run_log.write(step, kind, value)
        self.log(step, {LOG_KINDS[kind]: float(value)})
        if self.tensorboard is not None:  # out with the line: a killed run's points survive it
            self.tensorboard.flush()

    @contextlib.contextmanager
    def evaluation(self):
        """Around an evaluation: its time goes into the ETA as evaluation time, not step time."""
        start = time.time()
        yield
        self.eta.evaluated(start, time.time())

    def log_step(self, step, state, lr, norm, dt, tokens, mfu, updated):
        """The metrics of training step `step` besides its loss (a log.txt line); returns the ETA
        of the whole run for its step line."""
        seconds_left = self.eta.step_ended(step, dt, time.time())
        groups = enumerate(state.optimizer.param_groups)
        metrics = {"lr": lr, **{f"lr/group{i}": group["lr"] for i, group in groups}}
        metrics.update({"perf/tokens_per_sec": tokens / dt, "train/tokens_seen": state.tokens_seen})
        metrics["train/skipped"] = int(not updated)  # a step with a non-finite loss or gradient
        if updated:
            metrics["train/grad_norm"] = norm
        if mfu is not None:
            metrics["perf/mfu"] = mfu
        memory = peak_memory(self.device)
        if memory is not None:
            metrics["perf/peak_memory_gib"] = memory / 2**30
        self.log(step, metrics)
        return format_eta(seconds_left)

    def samples(self, step, texts):
        """The samples printed at an evaluation, as text."""
        if not texts:
            return
        if self.tensorboard is not None:
            # TensorBoard reads markdown: indented, each sample keeps its spaces and line breaks
            blocks = ["    " + text.replace("\n", "\n    ") for text in texts]
            self.tensorboard.add_text("samples", "\n\n".join(blocks), step)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["sample"], data=[[text] for text in texts])
            self.log_wandb(step, {"samples": table})

    def close(self, exit_code=0):
        """Write out and close the dashboards; a W&B run that ends with a non-zero exit_code is
        marked failed."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            atexit.unregister(self.tensorboard.close)
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)  # returns once W&B holds every step logged
            self.wandb_floor = self.wandb_step
            self.save_wandb_state()
            self.wandb = None


def transaction_log_records(path):
    """The records of a W&B transaction log (a header, then protobuf Records in LevelDB's log
    format: chunks with a 7-byte header of CRC-32, length and type), up to the first chunk that is
    torn or damaged, as a process killed while writing leaves it."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        return
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if LOG_BLOCK - pos % LOG_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += LOG_BLOCK - pos % LOG_BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or len(chunk) < length:
            return
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pos += 7 + length
        record += chunk
        if kind in (FULL, LAST):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


def last_step_in(transaction_log):
    """The last history step in a W&B transaction log that is on disk (-1: none, or no log)."""
    try:
        records = list(transaction_log_records(transaction_log)) if transaction_log else []
    except OSError:
        return -1
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    return max(steps, default=-1)
