"""
Score a model on HellaSwag (Zellers et al. 2019): a transformers GPT-2 (a hub name or a local
directory) or a checkpoint of train_gpt2.py, with the same scoring the training loop runs
(hellaswag_eval.py): `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest
mean loss per token.

    python hellaswag.py --model_type gpt2                  # a transformers model: hub name or dir
    python hellaswag.py --checkpoint log/model_19073.pt    # a checkpoint of train_gpt2.py
    python hellaswag.py --model_type gpt2 --input hellaswag_val.jsonl --limit 500   # offline

Reference figures (val, 10042 examples): OpenAI gpt2 (124M) acc 0.2859, acc_norm 0.2955;
gpt2-xl (1558M) acc_norm about 0.4893.
"""

import torch

import hellaswag_eval
from cli import ArgumentParser, quiet_exit_when_stdout_closes
from datafiles import HELLASWAG_SPLITS, get_tokenizer, iterate_examples
from devices import autocast_context, autocast_dtype, default_device
from hellaswag_eval import render_example
from hf_gpt2 import load_hf_gpt2
from train_gpt2 import load_model_from_checkpoint

# the lecture's `from hellaswag import render_example, iterate_examples` keeps working
__all__ = ["iterate_examples", "main", "render_example", "scored_model"]


def scored_model(model_type, checkpoint, device):
    """(hidden_fn, head_fn, description) of a transformers model or one of our checkpoints."""
    if checkpoint:
        model, ckpt = load_model_from_checkpoint(checkpoint)
        model.to(device).eval()
        return model.hidden, model.head, f"{ckpt['path']} (step {ckpt['step']})"
    model = load_hf_gpt2(model_type)
    model.to(device).eval()
    return (lambda tokens: model.transformer(tokens).last_hidden_state), model.lm_head, model_type


def parse_args(argv=None):
    parser = ArgumentParser(description="Score a model on HellaSwag.")
    parser.add_argument(
        "-m", "--model_type", default="gpt2", help="transformers model: hub name or local dir"
    )
    parser.add_argument(
        "-c", "--checkpoint", default="", help="a train_gpt2.py checkpoint (instead of -m)"
    )
    parser.add_argument("--split", default="val", choices=HELLASWAG_SPLITS)
    parser.add_argument("--input", default=None, help="local hellaswag jsonl file (no download)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N examples")
    parser.add_argument(
        "--device", default="", help="cuda, mps or cpu (default: the best available)"
    )
    parser.add_argument(
        "--batch_tokens",
        type=int,
        default=None,
        help=f"tokens per forward pass (default: {hellaswag_eval.GPU_BATCH_TOKENS} on CUDA, else "
        f"{hellaswag_eval.CPU_BATCH_TOKENS})",
    )
    parser.add_argument(
        "--compile", type=int, default=0, choices=(0, 1), help="torch.compile the scorer"
    )
    args = parser.parse_args(argv)
    if args.limit < 0:
        raise SystemExit(f"--limit {args.limit}: expected 0 (all examples) or a positive count")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise SystemExit(f"--batch_tokens {args.batch_tokens}: expected a positive count")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = args.device or default_device()
    device_type = device.split(":")[0]
    # bf16 on GPUs as in training; fp32 elsewhere
    dtype = autocast_dtype("auto", device_type) if device_type == "cuda" else torch.float32
    autocast = autocast_context(dtype, device_type)
    torch.set_float32_matmul_precision("high")
    examples = list(iterate_examples(args.split, args.input))[: args.limit or None]
    if not examples:
        raise SystemExit("no examples to score")
    hidden_fn, head_fn, name = scored_model(args.model_type, args.checkpoint, device)
    batch_tokens = args.batch_tokens or hellaswag_eval.batch_tokens_for(device)
    packed = hellaswag_eval.pack_examples(examples, get_tokenizer(), batch_tokens)
    scorer = hellaswag_eval.make_scorer(hidden_fn, head_fn, bool(args.compile))
    correct, correct_norm, total = hellaswag_eval.evaluate(scorer, packed, device, autocast)
    print(
        f"{name} on HellaSwag {args.split}, {total} examples: acc {correct / total:.4f}, "
        f"acc_norm {correct_norm / total:.4f}"
    )


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
