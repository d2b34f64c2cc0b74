"""
Checkpoint files, all of them: their names in a log dir (model_{step:05d}.pt, or the directory
model_{step:05d}.dcp of a sharded one), the newest, atomic writes and reads of both kinds, the
temporaries a killed save leaves, and the random-number state a checkpoint carries. What a
checkpoint holds is train_gpt2.TrainingState's: this module only stores and reads it.

A single-file checkpoint is one torch.save of a dict, written under a temporary name and renamed
once complete. A sharded one (--shard fsdp) is written with torch.distributed.checkpoint into a
temporary directory: every rank its shards of the weights and of the optimizer state, the master
the rest (meta.pt); the master renames it once complete. A reader on any number of ranks, one
process included, asks for the tensors it holds and gets them resharded. Either way a kill at any
moment leaves the earlier checkpoints as they were, and the newest one named is complete.

When a run saves, how many checkpoints it keeps and the one save it may write in the background
are Saver's: a checkpoint leaves the listing by a rename too, before it is deleted, so a kill
during a removal leaves no half-deleted checkpoint under its name.
"""

import contextlib
import os
import random
import re
import shutil
import threading
import time
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist

from support import files
from support.cli import check_input_file, check_written, error_chain, first_line
from support.run_control import StopNow, gather

CHECKPOINT_FILE = re.compile(r"model_(\d+)\.(pt|dcp)")
META_FILE = "meta.pt"  # in a sharded checkpoint: all but the tensors, by the master
TENSOR_KEYS = ("model", "optimizer")  # in a sharded checkpoint: every rank's shards of them

# -----------------------------------------------------------------------------
# Names


def checkpoint_path(log_dir, step, sharded=False):
    return os.path.join(log_dir, f"model_{step:05d}.{'dcp' if sharded else 'pt'}")


def checkpoints(log_dir):
    """{step: path} of the checkpoints in log_dir."""
    if not os.path.isdir(log_dir):
        return {}
    found = (CHECKPOINT_FILE.fullmatch(n) for n in os.listdir(log_dir))
    return {int(m[1]): os.path.join(log_dir, m[0]) for m in found if m}


def checkpoint_steps(log_dir):
    """The steps of the checkpoints in log_dir, in order."""
    return sorted(checkpoints(log_dir))


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None. Every checkpoint is renamed into
    its name only once complete, so the newest named is the newest complete one."""
    found = checkpoints(log_dir)
    return found[max(found)] if found else None


def last_saved(log_dir):
    """Where a run that must stop can be taken up again, said truthfully."""
    path = latest_checkpoint(log_dir)
    return f"the last checkpoint saved is {path}" if path else "no checkpoint was saved"


def is_sharded_checkpoint(path):
    """A complete sharded checkpoint: a directory that has its progress file."""
    return os.path.isfile(os.path.join(path, META_FILE))


def remove_old_checkpoints(log_dir, keep, milestone_interval):
    """All but the newest `keep` checkpoints in log_dir, and those of steps that are multiples of
    milestone_interval, removed."""
    found = checkpoints(log_dir)
    for step in sorted(found)[:-keep]:
        if step % milestone_interval:
            files.atomic_remove(found[step])


def remove_unfinished_saves(log_dir):
    """Remove what killed saves left in log_dir: a temporary as large as a checkpoint."""
    files.remove_stale_temporaries(log_dir, CHECKPOINT_FILE.pattern)


# -----------------------------------------------------------------------------
# Writes


@contextlib.contextmanager
def write_errors(path):
    """Around the write of a checkpoint: a write that fails (a full disk) ends the run in one
    line, and a second Ctrl-C that came during it stops the run at once (run_control.StopNow).
    torch.save reports either as a RuntimeError of its zip writer, and
    torch.distributed.checkpoint as a CheckpointException holding every rank's failure: the
    cause is found inside."""
    try:
        yield
    except BaseException as e:
        causes = list(error_chain(e))
        for failure, _ in getattr(e, "failures", {}).values():
            causes += error_chain(failure)
        cause = next((c for c in causes if isinstance(c, OSError | StopNow)), None)
        if isinstance(cause, StopNow):
            raise cause from None
        if cause is None:
            raise
        earlier = latest_checkpoint(os.path.dirname(path) or ".")
        kept = f"the earlier checkpoints are intact, the newest {earlier}" if earlier else ""
        raise SystemExit(
            f"could not save {path}: {cause.strerror or cause}; {kept or 'none was saved before'}"
        ) from None


def save(path, contents):
    """A single-file checkpoint of the dict `contents`, written atomically."""
    with write_errors(path), files.atomic_open(path) as f:
        torch.save(contents, f)
    check_written(path, "checkpoint")


def save_sharded(path, progress, model, optimizer, env, group=None):
    """A sharded checkpoint of an FSDP model and its optimizer, with `progress` (the rest of the
    checkpoint) by the master. Every rank calls it. With a process `group` of its own (gloo) the
    shards are copied to host memory now and written in the background: it returns a function
    that waits for the write to complete. Without, it returns once the checkpoint is complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    master_pid = [os.getpid()]
    dist.broadcast_object_list(master_pid, src=0, group=env.cpu_group)  # names the temporary
    tensors = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    owner, tmp = env.master_process, files.temporary_path(path, master_pid[0])

    def complete(write):
        with write_errors(path), files.atomic_directory(path, master_pid[0], owner):
            write()
            if owner:  # the progress, and what every shard file written holds
                written = shard_files(tmp)
                with files.atomic_open(os.path.join(tmp, META_FILE)) as f:
                    torch.save(dict(progress, shard_files=written), f)

    writing = dict(checkpoint_id=tmp, storage_writer=shard_writer(tmp))
    if group is None:
        complete(lambda: dcp.save(tensors, **writing))
        dist.barrier(group=env.cpu_group)  # no rank reads or leaves before the checkpoint is there
        return None
    try:
        with write_errors(path):  # the copy to host memory (async_save's staging) happens here
            future = dcp.async_save(tensors, process_group=group, **writing)
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lambda: complete(future.result)


def shard_writer(directory):
    """torch.distributed.checkpoint's file writer into directory, whose failure is the OSError
    beneath it (a full disk). Inside it, torch.save reports a short write as a RuntimeError
    raised during the OSError, and dcp sends every rank's failure to the others pickled, which
    keeps an exception but not the one it was raised during."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except Exception as e:
                cause = next((c for c in error_chain(e) if isinstance(c, OSError)), e)
                raise cause from None

    return Writer(directory)


def shard_files(directory):
    """{name: [bytes, CRC-32]} of every file of a sharded checkpoint but its progress file."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if name != META_FILE:
            with open(os.path.join(directory, name), "rb") as f:
                crc, size = 0, 0
                while chunk := f.read(1 << 24):
                    crc, size = zlib.crc32(chunk, crc), size + len(chunk)
            found[name] = [size, crc]
    return found


def check_shard_files(path, recorded):
    """Refuse a sharded checkpoint whose files are not those it recorded when it was written:
    one copied in from another run or another step, damaged, missing or added."""
    if recorded is None:  # written before checkpoints recorded their files
        return
    found = shard_files(path)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            raise SystemExit(f"checkpoint {path} is incomplete: it has no {name}")
        if name not in recorded:
            raise SystemExit(f"checkpoint {path} holds a file that is not its own: {name}")
        if found[name] != list(recorded[name]):
            raise SystemExit(f"checkpoint {path}: {name} is not the file it wrote (size, CRC-32)")


def copy_to_host(obj):
    """A copy of a (nested) state dict whose tensors are on the CPU, in pinned memory when they
    come from a GPU (the copy is then faster, and a write of it never waits for the GPU)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(obj.detach())
    if isinstance(obj, dict):
        return {k: copy_to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(copy_to_host(v) for v in obj)
    return obj


class Saver:
    """When a run saves, what it keeps, and the one save it may write in the background.

    It saves every `interval` steps (the milestones), at the last step, and with `minutes` also at
    the first step boundary that many minutes after its last save: rank 0's clock decides for
    every rank. After each save all but the newest `keep` checkpoints are removed, milestones
    excepted (keep 0: none is removed). With `background`, a save copies the state to host memory
    and writes it while the run goes on; the next save, a stop and the end of the run wait for it,
    and a failed write ends the run in one line on every rank. Every rank calls due(), save() and
    wait() at the same points: each is a collective under torchrun.
    """

    def __init__(self, log_dir, env, interval, minutes=0.0, keep=0, background=False):
        self.log_dir, self.env, self.interval = log_dir, env, interval
        self.minutes, self.keep, self.background = minutes, keep, background
        self.last_save_time = time.monotonic()
        self.saved_step = None  # the step last saved, or being saved
        self.writer, self.error = None, None  # the background write, and how it failed
        self.group = None  # of the background sharded writes: collectives of their own

    def due(self, step, last_step):
        """Whether the run saves at this step boundary; also where a failed background write is
        found between saves."""
        late = self.minutes and time.monotonic() - self.last_save_time >= 60 * self.minutes
        failed = self.writer is not None and not self.writer.is_alive() and self.error is not None
        if self.env.distributed and (self.minutes or self.background):
            flags = torch.tensor([int(late and self.env.rank == 0), int(failed)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.env.cpu_group)
            late, failed = bool(flags[0]), bool(flags[1])
        if failed:
            self.wait()
        return step % self.interval == 0 or last_step or bool(late)

    def save(self, step, state, sharded):
        """The checkpoint of `step` of `state` (train_gpt2.TrainingState), once the save before it
        is complete. A step saved already (a stop right after its save) is not saved again."""
        self.wait()
        if step == self.saved_step:
            return
        path = checkpoint_path(self.log_dir, step, sharded)
        self.saved_step, self.last_save_time = step, time.monotonic()
        if sharded:
            group = self.background_group() if self.background else None
            finish = save_sharded(
                path, state.progress(step), state.model, state.optimizer, self.env, group
            )
        elif self.env.master_process:
            contents = state.state_dict(step)
            if self.background:
                contents = copy_to_host(contents)
            finish = lambda: save(path, contents)  # noqa: E731
        else:
            finish = lambda: None  # noqa: E731
        if not self.background:
            if finish is not None:
                finish()
            self.after_save(path)
            return
        self.writer = threading.Thread(target=self.write, args=(finish, path), daemon=True)
        self.writer.start()

    def write(self, finish, path):
        t0 = time.monotonic()
        try:
            finish()
            self.after_save(path, f" ({time.monotonic() - t0:.1f}s in the background)")
        except SystemExit as e:
            self.error = str(e.code)
        except BaseException as e:  # said in one line by the main thread, in wait()
            self.error = f"could not save {path}: {first_line(e)} ({last_saved(self.log_dir)})"

    def after_save(self, path, how=""):
        if self.env.master_process:
            if self.keep:
                remove_old_checkpoints(self.log_dir, self.keep, self.interval)
            self.env.print0(f"saved {path}{how}")

    def wait(self):
        """Until the background write (if any) is complete; if it failed, every rank stops in
        one line naming the last complete checkpoint."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        errors = gather(self.env, self.error) if self.background else [self.error]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise SystemExit(error if self.env.local_rank == 0 else 1)

    def background_group(self):
        if self.group is None:  # the background thread's collectives never meet the run's
            self.group = dist.new_group(backend="gloo")
        return self.group


# -----------------------------------------------------------------------------
# Reads


class Checkpoint:
    """A checkpoint read onto the CPU: where it is, whether it is sharded, and what it holds
    (checkpoint["step"], ...). Of a sharded one only the progress: its tensors are read by
    load_weights and load_optimizer_state, into a model of any sharding."""

    def __init__(self, path, sharded, contents):
        self.path, self.sharded, self.contents = path, sharded, contents

    def __getitem__(self, key):
        return self.contents[key]


def load(path, log_dir, keys):
    """The checkpoint at path, or with path 'latest' the newest in log_dir; it must hold `keys`.
    A missing, damaged or foreign file is refused in one line."""
    if path == "latest":
        path = latest_checkpoint(log_dir)
        if path is None:
            raise SystemExit(f"no checkpoint (model_*.pt or .dcp) in {log_dir} for 'latest'")
    try:
        return read_checkpoint(path, keys)
    except SystemExit as e:
        raise SystemExit(f"{e.code}{earlier_checkpoint_hint(path)}") from None


def read_checkpoint(path, keys):
    sharded = is_sharded_checkpoint(path)
    if path.rstrip("/").endswith(".dcp") and os.path.isdir(path) and not sharded:
        raise SystemExit(f"checkpoint {path} is incomplete: it has no {META_FILE}")
    file = os.path.join(path, META_FILE) if sharded else path
    check_input_file(file, "checkpoint")
    try:
        contents = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise SystemExit(
            f"checkpoint {path} is corrupt or not a checkpoint of ours ({type(e).__name__})"
        ) from None
    if not isinstance(contents, dict):
        raise SystemExit(f"checkpoint {path} is not a checkpoint of train_gpt2.py")
    missing = [k for k in keys if k not in contents and not (sharded and k in TENSOR_KEYS)]
    if missing:
        raise SystemExit(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    if sharded:
        check_shard_files(path, contents.get("shard_files"))
    return Checkpoint(path, sharded, contents)


def earlier_checkpoint_hint(path):
    """For a checkpoint that cannot be used: the one before it in its directory, if any."""
    log_dir = os.path.dirname(os.path.abspath(path))
    name = CHECKPOINT_FILE.fullmatch(os.path.basename(path.rstrip("/")))
    found = checkpoints(log_dir)
    earlier = [s for s in found if name and s < int(name[1])]
    if not earlier:
        return ""
    return f"; the one before it is {found[max(earlier)]}: move {path} away to resume from it"


def load_weights(checkpoint, model):
    """The checkpoint's weights into a whole (unsharded) model, in place; refused in one line
    where they do not fit it."""
    if checkpoint.sharded:
        read_shards(checkpoint.path, {"model": model.state_dict()})  # its tensors: filled in place
        return
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise SystemExit(
            f"checkpoint {checkpoint.path} does not fit the model it describes: {first_line(e)}"
        ) from None


def load_optimizer_state(checkpoint, model, optimizer, sharded_model):
    """The checkpoint's optimizer state into the optimizer of `model`, resharded where the
    checkpoint and the model (sharded_model: an FSDP one) are sharded differently."""
    if not checkpoint.sharded and not sharded_model:
        optimizer.load_state_dict(checkpoint["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if checkpoint.sharded:
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        read_shards(checkpoint.path, state)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    # optimizer.state_dict() numbers the parameters in the order of the groups; DCP names them
    saved = checkpoint["optimizer"]
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    state = {order[i]: s for i, s in saved["state"].items()}
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]]
    whole = {"state": state, "param_groups": groups}
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, whole, options=options)


def read_shards(path, state):
    """Fill `state` (tensors, DTensors or both, under "model" and "optimizer") from the sharded
    checkpoint at path, each rank reading the parts its tensors hold."""
    import torch.distributed.checkpoint as dcp

    if not os.path.isfile(os.path.join(path, ".metadata")):  # else torch logs tracebacks first
        hint = earlier_checkpoint_hint(path)
        raise SystemExit(f"checkpoint {path} is incomplete: it has no .metadata{hint}")
    try:
        with warnings.catch_warnings():  # torch warns that one process reads: that is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (dcp.CheckpointException, RuntimeError, ValueError) as e:
        cause = next((exc for exc, _ in getattr(e, "failures", {}).values()), e)  # a rank's
        message = f"checkpoint {path} cannot be read into its model: {first_line(cause)}"
        raise SystemExit(message + earlier_checkpoint_hint(path)) from None


# -----------------------------------------------------------------------------
# Random-number state


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
