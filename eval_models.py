"""
The models that the evaluation scripts (hellaswag.py, core.py) score, whatever they are: a
checkpoint of train_gpt2.py (either recipe, single-file or sharded) or a transformers GPT-2 (a
hub name or a local directory, its weights loaded into train_gpt2.GPT), each as the hidden states
and the head that the scorers take.
"""

import typing
from dataclasses import dataclass

import hellaswag_eval
from support.cli import setting
from train_gpt2 import GPT, load_model_from_checkpoint


class ScoredModel(typing.NamedTuple):
    hidden: typing.Callable  # (rows, width) tokens [, a generation.KVCache] -> hidden states
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
    model = GPT.from_pretrained(model_type)  # its weights in our blocks: they take a KVCache
    model.to(device).eval()
    return ScoredModel(model.hidden, model.head, model_type, model.config.block_size)


@dataclass
class ScoringSettings:
    """The settings of the evaluation scripts (hellaswag.py, core.py) that choose the model and
    how it is scored; each field is also a command-line flag."""

    model_type: str = setting("gpt2", "transformers model: hub name or local dir", aliases=["-m"])
    checkpoint: str = setting(
        "", "a train_gpt2.py checkpoint, or 'latest' in --log_dir (instead of -m)", aliases=["-c"]
    )
    log_dir: str = setting("log", "where --checkpoint latest looks")
    device: str = setting("", "cuda, cuda:1, mps or cpu (default: the best available)")
    batch_tokens: int | None = setting(
        None,
        f"tokens per forward pass (default: {hellaswag_eval.GPU_BATCH_TOKENS} on CUDA, else "
        f"{hellaswag_eval.CPU_BATCH_TOKENS})",
        minimum=1,
    )
