"""
HellaSwag (Zellers et al. 2019): pick the most likely of four endings for a context.

Every ending is scored by the cross-entropy of its tokens given the context: `acc` picks the
ending with the lowest summed loss, `acc_norm` the lowest mean loss per token (this is the
completion-style scoring of the lecture, not the multiple-choice format of the paper).

    python hellaswag.py --model_type gpt2                  # a transformers model: hub name or dir
    python hellaswag.py --checkpoint log/model_19073.pt    # a checkpoint of train_gpt2.py
    python hellaswag.py --model_type gpt2 --input hellaswag_val.jsonl --limit 500   # offline

Reference figures (val, 10042 examples): OpenAI gpt2 (124M) acc 0.2859, acc_norm 0.2955;
gpt2-xl (1558M) acc_norm about 0.4893.
"""

import argparse
import contextlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train_gpt2 import (
    GPT,
    GPTConfig,
    atomic_open,
    autocast_context,
    autocast_dtype,
    default_device,
    get_tokenizer,
    load_checkpoint,
    load_hf_gpt2,
)

DATA_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")

# -----------------------------------------------------------------------------
# Data


def download(split, cache_dir=DATA_CACHE_DIR):
    """Fetch hellaswag_{split}.jsonl into cache_dir once (streamed, with a progress bar)."""
    import requests
    from tqdm import tqdm

    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    url = DATA_URL.format(split=split)
    os.makedirs(cache_dir, exist_ok=True)
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                atomic_open(path) as f,  # only a complete download gets the final name
                tqdm(total=total, unit="iB", unit_scale=True, desc=path) as bar,
            ):
                for chunk in response.iter_content(chunk_size=1 << 16):
                    bar.update(f.write(chunk))
    except requests.RequestException as e:
        raise SystemExit(
            f"could not download {url} ({type(e).__name__}); offline, put the file at {path} "
            "or pass its path (--input here, --hellaswag_path to train_gpt2.py)"
        ) from None
    return path


def iterate_examples(split="val", path=None):
    """The examples of a split, from a local jsonl file if given, else the (downloaded) cache."""
    if path is None:
        path = download(split)
    if not os.path.isfile(path):
        raise SystemExit(f"HellaSwag file {path} does not exist")
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def render_example(example):
    """Tokenize an example into 4 rows of context + " " + ending.

    Returns (data, tokens, mask, label): tokens and mask are (4, longest row) long tensors,
    right-padded with 0; the mask is 1 over the ending's tokens, where the model is scored.
    """
    enc = get_tokenizer()
    ctx_tokens = enc.encode(example["ctx"])
    # the space goes with the ending: GPT-2's tokens carry their leading space
    ending_tokens = [enc.encode(" " + ending) for ending in example["endings"]]
    rows = [ctx_tokens + end for end in ending_tokens]
    max_len = max(len(row) for row in rows)
    tokens = torch.zeros((4, max_len), dtype=torch.long)
    mask = torch.zeros((4, max_len), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens) : len(row)] = 1
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    return data, tokens, mask, example["label"]


# -----------------------------------------------------------------------------
# Scoring


@dataclass
class Score:
    label: int
    sum_losses: list  # summed cross-entropy of each ending's tokens
    mean_losses: list  # the same per token
    pred: int  # acc's choice: lowest summed loss
    pred_norm: int  # acc_norm's choice: lowest mean loss


@torch.no_grad()
def score_examples(logits_fn, examples, device, autocast=None, batch_examples=8):
    """Score examples in batches: the 4 endings of batch_examples examples in one forward pass.

    logits_fn maps a (rows, T) token tensor to (rows, T, vocab) logits; vocabulary entries past
    GPT-2's 50257 (padding) are ignored. Yields a Score per example, in order.
    """
    autocast = autocast or contextlib.nullcontext()
    n_vocab = get_tokenizer().n_vocab
    batch = []
    for example in examples:
        batch.append(render_example(example))
        if len(batch) == batch_examples:
            yield from _score_batch(logits_fn, batch, device, autocast, n_vocab)
            batch = []
    if batch:
        yield from _score_batch(logits_fn, batch, device, autocast, n_vocab)


def _score_batch(logits_fn, batch, device, autocast, n_vocab):
    # right padding does not change the logits of earlier positions of a causal model
    width = max(tokens.size(1) for _, tokens, _, _ in batch)
    tokens = torch.cat([F.pad(t, (0, width - t.size(1))) for _, t, _, _ in batch]).to(device)
    mask = torch.cat([F.pad(m, (0, width - m.size(1))) for _, _, m, _ in batch]).to(device)
    with autocast:
        logits = logits_fn(tokens)
    # the logits at position t predict token t + 1
    logits = logits[:, :-1, :n_vocab]
    logits = logits.float() if logits.element_size() < 4 else logits  # bf16 / fp16 under autocast
    targets, target_mask = tokens[:, 1:], mask[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    sum_losses = (losses * target_mask).sum(dim=1)
    mean_losses = sum_losses / target_mask.sum(dim=1)
    for i, (_, _, _, label) in enumerate(batch):
        s, m = sum_losses[4 * i : 4 * i + 4], mean_losses[4 * i : 4 * i + 4]
        yield Score(label, s.tolist(), m.tolist(), int(s.argmin()), int(m.argmin()))


def evaluate(
    logits_fn,
    examples,
    device,
    autocast=None,
    rank=0,
    world_size=1,
    batch_examples=8,
):
    """(correct by acc, correct by acc_norm, total) over all examples; each rank scores every
    world_size-th example and, under torch.distributed, the counts are summed over ranks."""
    mine = (ex for i, ex in enumerate(examples) if i % world_size == rank)
    counts = torch.zeros(3, dtype=torch.long)
    for score in score_examples(logits_fn, mine, device, autocast, batch_examples):
        counts += torch.tensor([score.pred == score.label, score.pred_norm == score.label, 1])
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return tuple(int(c) for c in counts.tolist())


# -----------------------------------------------------------------------------
# Command line


def load_model(model_type, checkpoint, device):
    """(logits_fn, description) for a transformers model or one of our checkpoints."""
    if checkpoint:
        ckpt = load_checkpoint(checkpoint, log_dir=os.path.dirname(checkpoint) or ".")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        return (lambda tokens: model(tokens)[0]), f"{ckpt['path']} (step {ckpt['step']})"
    model = load_hf_gpt2(model_type)
    model.to(device).eval()
    return (lambda tokens: model(tokens).logits), model_type


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score a model on HellaSwag.")
    parser.add_argument(
        "-m", "--model_type", default="gpt2", help="transformers model: hub name or local dir"
    )
    parser.add_argument(
        "-c", "--checkpoint", default="", help="a train_gpt2.py checkpoint (instead of -m)"
    )
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--input", default=None, help="local hellaswag jsonl file (no download)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N examples")
    parser.add_argument(
        "--device", default="", help="cuda, mps or cpu (default: the best available)"
    )
    parser.add_argument("--batch_examples", type=int, default=8, help="examples per forward pass")
    args = parser.parse_args(argv)

    device = args.device or default_device()
    device_type = device.split(":")[0]
    # bf16 on GPUs as in training; fp32 elsewhere
    dtype = autocast_dtype("auto", device_type) if device_type == "cuda" else torch.float32
    autocast = autocast_context(dtype, device_type)
    torch.set_float32_matmul_precision("high")
    logits_fn, name = load_model(args.model_type, args.checkpoint, device)
    examples = iterate_examples(args.split, args.input)
    if args.limit > 0:
        examples = (ex for i, ex in enumerate(examples) if i < args.limit)
    correct = correct_norm = total = 0
    for score in score_examples(logits_fn, examples, device, autocast, args.batch_examples):
        total += 1
        correct += score.pred == score.label
        correct_norm += score.pred_norm == score.label
        if total % 100 == 0:
            acc, acc_norm = correct / total, correct_norm / total
            print(f"{total} acc: {acc:.4f} acc_norm: {correct_norm}/{total}={acc_norm:.4f}")
    if total == 0:
        raise SystemExit("no examples to score")
    print(
        f"{name} on HellaSwag {args.split}, {total} examples: acc {correct / total:.4f}, "
        f"acc_norm {correct_norm / total:.4f}"
    )


if __name__ == "__main__":
    main()
