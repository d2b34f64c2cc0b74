"""
Models larger than one device holds: FSDP2 sharding (--shard fsdp), activation checkpointing
(--activation_checkpointing 1) and sharded checkpoints (torch.distributed.checkpoint).

Under DDP every rank holds the whole model, its gradients and AdamW's two moments, all in fp32:
16 bytes per parameter, 25 GB for GPT-2 XL before a single activation. FSDP2
(torch.distributed.fsdp.fully_shard, as torchtitan uses it) splits each of the four over the
ranks: every rank keeps 1/world_size of every tensor, gathers a block's weights just before the
block runs (forward and backward) and frees them after, and reduce-scatters the gradients so that
each rank updates only its share. The optimizer sees DTensors and needs no change; the speedrun
recipe's Muon, which orthogonalizes whole matrices, is refused under FSDP (train_gpt2.check_config).

A sharded checkpoint is a directory model_{step:05d}.dcp: every rank writes its shards of the
weights and of the optimizer state, and the master the run's progress (meta.pt). A reader on any
number of ranks, one process included, asks for the tensors it holds and gets them resharded.
"""

import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as recompute_in_backward
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from run_control import checkpoint_write

TENSOR_KEYS = ("model", "optimizer")  # written by every rank, in shards
META_FILE = "meta.pt"  # the rest of a checkpoint (TrainingState.progress), by the master


# -----------------------------------------------------------------------------
# Memory: activation checkpointing and FSDP


def checkpoint_activations(model):
    """Keep only each block's input from the forward pass and recompute the block in the backward
    (Chen et al. 2016, "Training deep nets with sublinear memory cost"): the activations of one
    block at a time instead of all of them, for about a third more compute. The parameter names
    stay as they are, so checkpoints do not change."""
    for block in model.transformer.h:
        recompute_in_backward(block)


def shard_model(model, dtype, compile_blocks):
    """FSDP2 over each transformer block, then the root (the embeddings, the final LayerNorm and
    the tied lm_head), in place. Compute in `dtype` (bf16 on GPUs) with fp32 master weights and
    fp32 gradient reduction. With compile_blocks, each block and the loss are compiled on their
    own, as torchtitan does: torch.compile of the whole sharded model would trace through FSDP's
    hooks."""
    low_precision = dtype if dtype in (torch.bfloat16, torch.float16) else None
    policy = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
    for i, block in enumerate(model.transformer.h):
        if compile_blocks:
            block.compile()
        # the last block's weights are the first that the backward needs: kept, not regathered
        last = i == len(model.transformer.h) - 1
        fully_shard(block, mp_policy=policy, reshard_after_forward=not last)
    fully_shard(model, mp_policy=policy)
    if compile_blocks:
        # the rest of the root runs eagerly. Its loss over 50k logits a position is bound by
        # memory: eager, it writes fp32 log-probabilities and their gradient (3.3 GB each at
        # B=16, T=1024); compiled, it reads the logits in fused passes
        model.cross_entropy = torch.compile(model.cross_entropy)
    # evaluation calls these directly (HellaSwag's scorer): they gather the root's weights too
    for method in ("hidden", "head"):
        register_fsdp_forward_method(model, method)
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


def accumulate_gradients(model, last_micro_step):
    """Between the micro-steps of one optimizer step, gradients accumulate unsharded and the
    gathered weights stay (no communication); the last micro-step reduce-scatters them."""
    model.set_requires_gradient_sync(last_micro_step)
    model.set_reshard_after_backward(last_micro_step)


def local(tensor):
    """This rank's part of a tensor: its shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor):
    """The whole value of a DTensor (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_finite(tensors):
    """Whether every element of the tensors is finite, on every rank's shard."""
    tensors = list(tensors)
    # on the tensors' device (NCCL reduces CUDA tensors only), with one sync for them all
    flag = torch.stack([torch.isfinite(local(t)).all() for t in tensors]).all().float()
    if any(isinstance(t, DTensor) for t in tensors):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def bytes_held(model, optimizer):
    """(parameters, gradients, optimizer state): the bytes of each that this rank holds."""

    def size(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    params = list(model.parameters())  # a tied weight once
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return size(params), size(grads), size(states)


def memory_line(model, optimizer, world_size):
    params, grads, states = (b / 2**20 for b in bytes_held(model, optimizer))
    how = "its shards" if is_sharded(model) else "whole copies"
    ranks = f"{world_size} rank" + "s" * (world_size > 1)
    return (
        f"rank 0 holds {params:.2f} MiB of parameters, {grads:.2f} MiB of gradients and "
        f"{states:.2f} MiB of optimizer state ({how}, {ranks})"
    )


# -----------------------------------------------------------------------------
# Sharded checkpoints


def is_sharded_checkpoint(path):
    """A complete sharded checkpoint: a directory that has its progress file."""
    return os.path.isfile(os.path.join(path, META_FILE))


def save_checkpoint(path, progress, model, optimizer, env):
    """Every rank writes its shards into a temporary directory, the master adds `progress` and
    renames the directory when it is complete: a kill at any moment leaves the earlier
    checkpoints as they were. Every rank calls it."""
    names = [os.path.basename(path), os.getpid()]
    dist.broadcast_object_list(names, src=0, group=env.cpu_group)  # the master's pid names it
    tmp = os.path.join(os.path.dirname(path), f".{names[0]}.{names[1]}.tmp")
    tensors = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    try:
        with checkpoint_write(path):
            dcp.save(tensors, checkpoint_id=tmp)
            if env.master_process:
                torch.save(progress, os.path.join(tmp, META_FILE))
                replace_directory(tmp, path)
    finally:
        if env.master_process and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier(group=env.cpu_group)  # no rank reads or leaves before the checkpoint is there


def replace_directory(tmp, path):
    """Rename tmp to path, atomically where path is new (a step saved again replaces the old)."""
    with open(os.path.join(tmp, META_FILE), "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def load(path, state):
    """Fill `state` (tensors, DTensors or both, under "model" and "optimizer") from the sharded
    checkpoint at path, each rank reading the parts its tensors hold."""
    if not os.path.isfile(os.path.join(path, ".metadata")):  # else torch logs tracebacks first
        raise SystemExit(f"checkpoint {path} is incomplete: it has no .metadata")
    try:
        with warnings.catch_warnings():  # torch warns that one process reads: that is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (dcp.CheckpointException, RuntimeError, ValueError) as e:
        cause = next((exc for exc, _ in getattr(e, "failures", {}).values()), e)  # a rank's
        first = (str(cause).strip() or type(cause).__name__).splitlines()[0]
        raise SystemExit(f"checkpoint {path} cannot be read into its model: {first}") from None


def load_weights(path, model):
    """A whole (unsharded) model's weights from a sharded checkpoint."""
    state = {"model": model.state_dict()}  # its tensors are the parameters: filled in place
    load(path, state)


def load_optimizer_state(path, model, optimizer):
    """The optimizer state of a sharded checkpoint, resharded to this run's model."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    load(path, state)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_whole_optimizer_state(model, optimizer, saved):
    """A single-file checkpoint's optimizer state (optimizer.state_dict(): parameters numbered in
    the order of the groups) into the sharded model's optimizer, each rank keeping its shards."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    state = {order[i]: s for i, s in saved["state"].items()}
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]]
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=options
    )
