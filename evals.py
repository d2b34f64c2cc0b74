"""
The training loop's evaluations besides the val loss (train_gpt2.Evaluator runs them at every
eval_interval): each is a module's for_the_loop(cfg, env, raw model, compile), which gives None
where the run has it off, or what scores it: `kind` (its log.txt lines, support/rundir.py's
LOG_KINDS, which the dashboards and play.ipynb read), warm_up(device, autocast) and
score(env, autocast, should_stop). A new evaluation is a module like those and a line in
LOOP_EVALS. And the val loss's bits per byte (--bpb), which needs the val text's bytes.
"""

import torch
import torch.distributed as dist

import core_eval
import hellaswag_eval
from support import datafiles

LOOP_EVALS = (hellaswag_eval.for_the_loop, core_eval.for_the_loop)  # in the order they run


def for_the_loop(cfg, env, model, compile):
    """What scores each of LOOP_EVALS that the run has on, in their order."""
    evaluations = (make(cfg, env, model, compile) for make in LOOP_EVALS)
    return [evaluation for evaluation in evaluations if evaluation is not None]


def val_text_bytes(loader, steps, env):
    """The UTF-8 bytes of the text of the targets that the val loss averages over (every rank's
    first `steps` batches of loader; <|endoftext|> is no text: 0 bytes). Bits per byte are then
    the val loss x those targets / (ln 2 x their bytes), whatever the tokenizer."""
    lengths = torch.tensor(datafiles.token_byte_lengths())
    total = torch.zeros((), dtype=torch.long)
    loader.reset()
    for _ in range(steps):
        targets = loader.next_batch()[1]
        total += lengths[targets.clamp(max=len(lengths) - 1)].sum()
    if env.distributed:
        total = total.to(env.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total)
