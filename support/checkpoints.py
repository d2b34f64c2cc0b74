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
"""

import contextlib
import os
import random
import re
import warnings

import numpy as np
import torch
import torch.distributed as dist

from support import files
from support.cli import check_input_file, check_written, error_chain, first_line
from support.run_control import StopNow

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
        raise SystemExit(
            f"could not save {path}: {cause.strerror or cause}; the earlier checkpoints are intact"
        ) from None


def save(path, contents):
    """A single-file checkpoint of the dict `contents`, written atomically."""
    with write_errors(path), files.atomic_open(path) as f:
        torch.save(contents, f)
    check_written(path, "checkpoint")


def save_sharded(path, progress, model, optimizer, env):
    """A sharded checkpoint of an FSDP model and its optimizer, with `progress` (the rest of the
    checkpoint) by the master. Every rank calls it; it returns once the checkpoint is complete."""
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
    owner = env.master_process
    with write_errors(path), files.atomic_directory(path, master_pid[0], owner) as tmp:
        dcp.save(tensors, checkpoint_id=tmp)
        if owner:
            with files.atomic_open(os.path.join(tmp, META_FILE)) as f:
                torch.save(progress, f)
    dist.barrier(group=env.cpu_group)  # no rank reads or leaves before the checkpoint is there


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
    sharded = is_sharded_checkpoint(path)
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
    return Checkpoint(path, sharded, contents)


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
        raise SystemExit(f"checkpoint {path} is incomplete: it has no .metadata")
    try:
        with warnings.catch_warnings():  # torch warns that one process reads: that is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (dcp.CheckpointException, RuntimeError, ValueError) as e:
        cause = next((exc for exc, _ in getattr(e, "failures", {}).values()), e)  # a rank's
        message = f"checkpoint {path} cannot be read into its model: {first_line(cause)}"
        raise SystemExit(message) from None


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
