"""
Score a model on HellaSwag (Zellers et al. 2019): a transformers GPT-2 (a hub name or a local
directory) or a checkpoint of train_gpt2.py, with the same scoring the training loop runs
(hellaswag_eval.py): `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest
mean loss per token.

    python hellaswag.py --model_type gpt2                  # a transformers model: hub name or dir
    python hellaswag.py --checkpoint log/model_19073.pt    # a checkpoint of train_gpt2.py
    python hellaswag.py --checkpoint latest                # the newest in --log_dir (log)
    python hellaswag.py --model_type gpt2 --input hellaswag_val.jsonl --limit 500   # offline

Reference figures (val, 10042 examples): OpenAI gpt2 (124M) acc 0.2859, acc_norm 0.2955;
gpt2-xl (1558M) acc_norm about 0.4893.
"""

from dataclasses import dataclass

import torch

import hellaswag_eval
from eval_models import ScoringSettings, scored_model
from generation import NonFiniteLogits
from hellaswag_eval import render_example
from support.cli import ON_OFF, parse_settings, quiet_exit_when_stdout_closes, setting
from support.datafiles import HELLASWAG_SPLITS, iterate_examples
from support.devices import autocast_context, autocast_dtype, check_device, default_device

# the lecture's `from hellaswag import render_example, iterate_examples` keeps working
__all__ = ["iterate_examples", "main", "render_example"]


@dataclass
class HellaSwagConfig(ScoringSettings):
    """Every setting of hellaswag.py; each field is also a command-line flag (--name value)."""

    split: str = setting("val", "HellaSwag split", choices=HELLASWAG_SPLITS)
    input: str | None = setting(None, "local hellaswag jsonl file (default: downloaded)")
    limit: int = setting(0, "score only the first N examples (0: all)", minimum=0)
    compile: int = setting(0, "torch.compile the scorer", choices=ON_OFF)


def parse_args(argv=None):
    return parse_settings(HellaSwagConfig, "Score a model on HellaSwag.", argv)


def main(argv=None):
    cfg = parse_args(argv)
    device = check_device(cfg.device or default_device())
    device_type = device.split(":")[0]
    # bf16 on GPUs as in training; fp32 elsewhere
    dtype = autocast_dtype("auto", device_type) if device_type == "cuda" else torch.float32
    autocast = autocast_context(dtype, device_type)
    torch.set_float32_matmul_precision("high")
    # a compiled scorer meets few shapes (whole rows, widths rounded up to 32); an eager one any
    # shape, and runs each context once for its 4 endings: about half the tokens
    args = (cfg.input, device, None, cfg.limit or None, cfg.split, cfg.batch_tokens)
    packed = hellaswag_eval.load_packed(*args, compiled=bool(cfg.compile))
    hidden_fn, head_fn, name, _ = scored_model(cfg.model_type, cfg.checkpoint, cfg.log_dir, device)
    scorer = hellaswag_eval.make_scorer(hidden_fn, head_fn, bool(cfg.compile))
    try:
        correct, correct_norm, total = hellaswag_eval.evaluate(scorer, packed, device, autocast)
    except NonFiniteLogits as e:
        raise SystemExit(
            f"{name}: {e}: the model has diverged, there is nothing to score"
        ) from None
    print(
        f"{name} on HellaSwag {cfg.split}, {total} examples: acc {correct / total:.4f}, "
        f"acc_norm {correct_norm / total:.4f}"
    )


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
