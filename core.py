"""
Score a model on CORE (DCLM's 22 in-context tasks; core_eval.py has the tasks and the protocol):
each task's accuracy, its accuracy centred on the task's random baseline, and CORE, their mean.
A transformers GPT-2 (a hub name or a local directory) or a checkpoint of train_gpt2.py (either
recipe, single-file or sharded) is scored by the same code.

    python core.py --model_type gpt2 --bundle eval_bundle.zip        # a local copy: offline
    python core.py --checkpoint latest --tasks hellaswag_zeroshot,piqa --limit 500
    python core.py --checkpoint log/model_19073.pt --json core.json   # the figures as JSON too
    torchrun --standalone --nproc_per_node=8 core.py --model_type gpt2-xl   # split over 8 GPUs

Without --bundle it downloads the public bundle (eval_bundle.zip, about 90 MB) once into
eval_bundle/. GPT-2's figures by nanochat's protocol (nanochat's published numbers): 124M 0.1139,
355M 0.1849, 774M 0.2146, 1.5B 0.2565.
"""

import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import core_eval
import hellaswag_eval
from eval_models import ScoringSettings, scored_model
from generation import NonFiniteLogits
from support.cli import parse_settings, quiet_exit_when_stdout_closes, setting
from support.devices import autocast_context, autocast_dtype
from train_gpt2 import setup_distributed


@dataclass
class CoreConfig(ScoringSettings):
    """Every setting of core.py; each field is also a command-line flag (--name value)."""

    bundle: str = setting("", "the eval bundle: a directory or zip (default: downloaded once)")
    tasks: str = setting("", "only these tasks, by label, joined by commas (default: all)")
    limit: int = setting(0, "score only the first N examples of each task (0: all)", minimum=0)
    json: str = setting("", "also write the figures to this JSON file")


def parse_args(argv=None):
    return parse_settings(CoreConfig, "Score a model on CORE.", argv)


def main(argv=None):
    cfg = parse_args(argv)
    labels = [label for label in cfg.tasks.split(",") if label] or None
    # every task read and checked before a model is loaded: a bad bundle costs nothing
    tasks = core_eval.load_tasks(core_eval.bundle_path(cfg.bundle), labels, cfg.limit or None)
    env = setup_distributed(cfg.device)
    dtype = autocast_dtype("auto", env.device_type) if env.device_type == "cuda" else torch.float32
    autocast = autocast_context(dtype, env.device_type)
    torch.set_float32_matmul_precision("high")
    model = scored_model(cfg.model_type, cfg.checkpoint, cfg.log_dir, env.device)
    batch_tokens = cfg.batch_tokens or hellaswag_eval.batch_tokens_for(env.device)
    start = time.perf_counter()
    packed = core_eval.pack_tasks(tasks, model.context, batch_tokens)
    packed_at = time.perf_counter()
    scorer = hellaswag_eval.make_scorer(model.hidden, model.head)

    def report(label, accuracy, centred):
        env.print0(f"{label:<40} accuracy {accuracy:.4f}  centred {centred:+.4f}")

    env.print0(f"{model.name} on CORE: {len(tasks)} tasks")
    try:
        figures = core_eval.evaluate(
            scorer, packed, env.device, autocast, env.rank, env.world_size, report
        )
    except NonFiniteLogits as e:
        raise SystemExit(
            f"{model.name}: {e}: the model has diverged, there is nothing to score"
        ) from None
    scored_at = time.perf_counter()  # each task's accuracy has waited for its scores
    examples = sum(len(task.examples) for task in tasks)
    env.print0(
        f"CORE {figures['core']:.4f} ({examples:,} examples: packed in {packed_at - start:.1f} s, "
        f"scored in {scored_at - packed_at:.1f} s)"
    )
    if cfg.json and env.master_process:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(figures, f, indent=2)
    if env.distributed:
        dist.barrier()  # rank 0 may still be writing: gloo aborts a peer torn down under it
        dist.destroy_process_group()
    return figures


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
