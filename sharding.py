"""
Models larger than one device holds: FSDP2 sharding (--shard fsdp) and activation checkpointing
(--activation_checkpointing 1). Their checkpoints are support/checkpoints.py's (sharded ones).

Under DDP every rank holds the whole model, its gradients and AdamW's two moments, all in fp32:
16 bytes per parameter, 25 GB for GPT-2 XL before a single activation. FSDP2
(torch.distributed.fsdp.fully_shard, as torchtitan uses it) splits each of the four over the
ranks: every rank keeps 1/world_size of every tensor, gathers a block's weights just before the
block runs (forward and backward) and frees them after, and reduce-scatters the gradients so that
each rank updates only its share. The optimizer sees DTensors and needs no change; the speedrun
recipe's Muon, which orthogonalizes whole matrices, is refused under FSDP (train_gpt2.check_config).

FSDP2 and DTensor take half a second to import: they are imported by shard_model, when a run
shards, and a model or tensor can only be sharded once they are.
"""

import sys

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Memory: activation checkpointing and FSDP


def checkpoint_activations(model):
    """Keep only each block's input from the forward pass and recompute the block in the backward
    (Chen et al. 2016, "Training deep nets with sublinear memory cost"): the activations of one
    block at a time instead of all of them, for about a third more compute. The parameter names
    stay as they are, so checkpoints do not change."""
    from torch.distributed._composable import checkpoint as recompute_in_backward

    for block in model.transformer.h:
        recompute_in_backward(block)


def shard_model(model, dtype, compile_blocks):
    """FSDP2 over each transformer block, then the root (the embeddings, the final LayerNorm and
    the tied lm_head), in place. Compute in `dtype` (bf16 on GPUs) with fp32 master weights and
    fp32 gradient reduction. With compile_blocks, each block and the loss are compiled on their
    own, as torchtitan does: torch.compile of the whole sharded model would trace through FSDP's
    hooks."""
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

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


def imported(module, name):
    """The class `name` of torch's `module` if something has imported it, else None."""
    return getattr(sys.modules.get(module), name, None)


def is_sharded(model):
    fsdp_module = imported("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and isinstance(model, fsdp_module)


def is_dtensor(tensor):
    dtensor = imported("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def accumulate_gradients(model, last_micro_step):
    """Between the micro-steps of one optimizer step, gradients accumulate unsharded and the
    gathered weights stay (no communication); the last micro-step reduce-scatters them."""
    model.set_requires_gradient_sync(last_micro_step)
    model.set_reshard_after_backward(last_micro_step)


def local(tensor):
    """This rank's part of a tensor: its shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor):
    """The whole value of a DTensor (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def all_finite(tensors):
    """Whether every element of the tensors is finite, on every rank's shard."""
    tensors = list(tensors)
    # on the tensors' device (NCCL reduces CUDA tensors only), with one sync for them all
    flag = torch.stack([torch.isfinite(local(t)).all() for t in tensors]).all().float()
    if any(is_dtensor(t) for t in tensors):
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
