"""
The models that the evaluation scripts (hellaswag.py, core.py) score, whatever they are: a
checkpoint of train_gpt2.py (either recipe, single-file or sharded) or a transformers GPT-2 (a
hub name or a local directory), each as the hidden states and the head that the scorers take.
"""

import typing

from support.hf_gpt2 import load_hf_gpt2
from train_gpt2 import load_model_from_checkpoint


class ScoredModel(typing.NamedTuple):
    hidden: typing.Callable  # (rows, width) tokens -> the final hidden states
    head: typing.Callable  # hidden states -> logits
    name: str
    context: int  # the most tokens it reads at once


def scored_model(model_type, checkpoint, log_dir, device):
    """One of our checkpoints (when `checkpoint` is given: a path, or 'latest' in log_dir) or a
    transformers model (model_type), on the device, ready to score."""
    if checkpoint:
        model, ckpt = load_model_from_checkpoint(checkpoint, log_dir)
        model.to(device).eval()
        name = f"{ckpt.path} (step {ckpt['step']})"
        return ScoredModel(model.hidden, model.head, name, model.config.block_size)
    model = load_hf_gpt2(model_type)
    model.to(device).eval()
    hidden = lambda tokens: model.transformer(tokens).last_hidden_state  # noqa: E731
    return ScoredModel(hidden, model.lm_head, model_type, model.config.n_positions)
