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

Scoring needs only a tokenizer and a function from tokens to logits, so this file does not import
train_gpt2.py (train_gpt2.py imports it); its command line loads models through train_gpt2.py.

The scoring keeps a GPU busy: the examples are rendered once, their 4 rows are sorted by length
and packed into batches of about --batch_tokens tokens whose widths are rounded up to a multiple
of 32 (so that a compiled scorer sees a handful of shapes), and the losses stay on the device
until the last batch: one host synchronization per pass.
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DATA_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
ENDINGS = 4
GPT2_TOKENS = 50257  # models may pad their output past GPT-2's vocabulary (50304): not scored
# rows x width per forward pass: 16k tokens keep an H100 busy; on a CPU, whose logits are float32
# (200KB per token), 2k tokens are as fast per token and need 8 times less memory
GPU_BATCH_TOKENS = 2**14
CPU_BATCH_TOKENS = 2**11
WIDTH_MULTIPLE = 32  # batch widths are multiples of this: HellaSwag's rows need 3 to 6 of them

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
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            partial = path + ".part"  # only a complete download gets the final name
            with (
                open(partial, "wb") as f,
                tqdm(total=total, unit="iB", unit_scale=True, desc=path) as bar,
            ):
                for chunk in response.iter_content(chunk_size=1 << 16):
                    bar.update(f.write(chunk))
            os.replace(partial, path)
    except requests.RequestException as e:
        raise SystemExit(
            f"could not download {url} ({type(e).__name__}); offline, put the file at {path} "
            "or pass its path (--input here, --hellaswag_path to train_gpt2.py)"
        ) from None
    except OSError as e:
        raise SystemExit(f"could not write {path}: {e.strerror or e}") from None
    return path


def iterate_examples(split="val", path=None):
    """The examples of a split, from a local jsonl file if given, else the (downloaded) cache.
    A file that is not HellaSwag's jsonl ends in one line naming the file and the line."""
    if path is None:
        path = download(split)
    if not os.path.isfile(path):
        raise SystemExit(f"HellaSwag file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield parse_example(line, path, lineno)
    except UnicodeDecodeError:
        raise SystemExit(f"HellaSwag file {path} is not UTF-8 text") from None
    except OSError as e:
        raise SystemExit(f"HellaSwag file {path} could not be read: {e.strerror or e}") from None


def parse_example(line, path, lineno):
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} line {lineno} is not JSON ({e.msg})") from None
    if not (
        isinstance(example, dict)
        and isinstance(example.get("ctx"), str)
        and isinstance(example.get("endings"), list)
        and len(example["endings"]) == ENDINGS
        and all(isinstance(e, str) for e in example["endings"])
        and example.get("label") in range(ENDINGS)
    ):
        raise SystemExit(
            f"{path} line {lineno} is not a HellaSwag example (ctx, 4 endings and a label 0-3)"
        )
    return example


def render_example(example, enc):
    """Tokenize an example with GPT-2's tokenizer enc into 4 rows of context + " " + ending.

    Returns (data, tokens, mask, label): tokens and mask are (4, longest row) long tensors,
    right-padded with 0; the mask is 1 over the ending's tokens, where the model is scored.
    """
    ctx_tokens = enc.encode(example["ctx"])
    # the space goes with the ending: GPT-2's tokens carry their leading space
    ending_tokens = [enc.encode(" " + ending) for ending in example["endings"]]
    rows = [ctx_tokens + end for end in ending_tokens]
    max_len = max(len(row) for row in rows)
    tokens = torch.zeros((ENDINGS, max_len), dtype=torch.long)
    mask = torch.zeros((ENDINGS, max_len), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens) : len(row)] = 1
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    return data, tokens, mask, example["label"]


# -----------------------------------------------------------------------------
# Packing the rows of many examples into batches


@dataclass
class Batch:
    rows: torch.Tensor  # (R,) which row of the set each batch row is; padding rows point past it
    tokens: torch.Tensor  # (R, width) right-padded with 0
    mask: torch.Tensor  # (R, width) bool, True over the ending's tokens


@dataclass
class PackedExamples:
    """Examples rendered once and packed into batches, ready to be scored any number of times.
    Row 4 * i + j is ending j of example i."""

    labels: torch.Tensor  # (examples,)
    ending_lengths: torch.Tensor  # (rows,) tokens in each ending
    batches: list
    longest: int  # the longest row: the context a model needs

    def __len__(self):
        return len(self.labels)


def batch_tokens_for(device):
    return GPU_BATCH_TOKENS if str(device).startswith("cuda") else CPU_BATCH_TOKENS


def pack_examples(examples, enc, batch_tokens=CPU_BATCH_TOKENS, max_width=None):
    """Render every example with the tokenizer enc and pack the rows, longest first, into batches of
    batch_tokens // width rows each. A batch's width is its longest row rounded up to a multiple
    of WIDTH_MULTIPLE (at most max_width), and every batch of one width has the same number of
    rows (the last is padded with empty rows), so a compiled scorer meets few shapes."""
    if batch_tokens < 1:
        raise SystemExit(f"the HellaSwag batch must hold at least one token, not {batch_tokens}")
    rows, labels = [], []
    for example in examples:
        data, _, _, label = render_example(example, enc)
        labels.append(label)
        for ending in data["ending_tokens"]:
            rows.append((data["ctx_tokens"] + ending, len(data["ctx_tokens"])))
    longest = max((len(tokens) for tokens, _ in rows), default=0)
    if max_width and longest > max_width:
        raise SystemExit(f"HellaSwag needs block_size >= {longest}, the model has {max_width}")
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    batches, start = [], 0
    while start < len(order):
        width = math.ceil(len(rows[order[start]][0]) / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        width = min(width, max_width or width)
        size = max(1, batch_tokens // width)
        members = order[start : start + size]
        batch = Batch(
            rows=torch.full((size,), len(rows), dtype=torch.long),
            tokens=torch.zeros((size, width), dtype=torch.long),
            mask=torch.zeros((size, width), dtype=torch.bool),
        )
        for i, r in enumerate(members):
            tokens, ctx_len = rows[r]
            batch.rows[i] = r
            batch.tokens[i, : len(tokens)] = torch.tensor(tokens)
            batch.mask[i, ctx_len : len(tokens)] = True
        batches.append(batch)
        start += len(members)
    return PackedExamples(
        labels=torch.tensor(labels, dtype=torch.long),
        ending_lengths=torch.tensor([len(t) - c for t, c in rows], dtype=torch.long),
        batches=batches,
        longest=longest,
    )


# -----------------------------------------------------------------------------
# Scoring


def ending_losses(logits, tokens, mask):
    """Summed cross-entropy of each row's ending tokens, from (rows, T, vocab) logits.

    The logits at position t predict token t + 1. Vocabulary entries past GPT-2's 50257
    (padding) are ignored. The float32 upcast is fused into the reductions when compiled, so no
    float32 copy of the whole logits tensor is made on a GPU.
    """
    logits = logits[:, :-1, :GPT2_TOKENS]
    if logits.element_size() < 4:  # bf16 / fp16 under autocast
        logits = logits.float()
    targets = tokens[:, 1:].unsqueeze(-1)
    losses = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets).squeeze(-1)
    return torch.where(mask[:, 1:], losses, 0.0).sum(dim=1)


def make_scorer(logits_fn, compile=False):
    """(tokens, mask) -> summed ending losses per row; compiled with static shapes if asked
    (one graph per batch shape: pack_examples keeps them few)."""
    score = lambda tokens, mask: ending_losses(logits_fn(tokens), tokens, mask)
    return torch.compile(score, dynamic=False) if compile else score


@torch.no_grad()
def row_losses(scorer, packed, device, autocast=None, rank=0, world_size=1, should_stop=None):
    """Summed ending loss of every row, on the device: (rows,), or None if should_stop() said
    so between two batches. Rank r scores batches r, r + world_size, ...; the losses are summed
    over ranks, so every rank returns all of them."""
    autocast = autocast or contextlib.nullcontext()
    n_rows = len(packed.ending_lengths)
    # float64 where the device has it: the sums stay as exact as the losses, even of a float64 model
    dtype = torch.float32 if str(device).startswith("mps") else torch.float64
    sums = torch.zeros(n_rows + 1, dtype=dtype, device=device)  # the last slot: padding rows
    rounds = math.ceil(len(packed.batches) / world_size)  # the same number on every rank
    for i in range(rounds):
        if should_stop is not None and should_stop():
            return None
        k = i * world_size + rank
        if k >= len(packed.batches):
            continue
        batch = packed.batches[k]
        tokens = batch.tokens.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
        with autocast:
            losses = scorer(tokens, mask)
        sums.index_copy_(0, batch.rows.to(device, non_blocking=True), losses.to(dtype))
    sums = sums[:n_rows]
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


@dataclass
class Score:
    label: int
    sum_losses: list  # summed cross-entropy of each ending's tokens
    mean_losses: list  # the same per token
    pred: int  # acc's choice: lowest summed loss
    pred_norm: int  # acc_norm's choice: lowest mean loss


def predictions(sums, packed):
    """(sum losses, mean losses, pred, pred_norm) per example, on the CPU: one synchronization."""
    sums = sums.double().cpu().view(-1, ENDINGS)
    means = sums / packed.ending_lengths.view(-1, ENDINGS)
    return sums, means, sums.argmin(dim=1), means.argmin(dim=1)


def score_examples(logits_fn, examples, enc, device, autocast=None, batch_tokens=CPU_BATCH_TOKENS):
    """A Score per example, in order. logits_fn maps a (rows, T) token tensor to
    (rows, T, vocab) logits; enc is GPT-2's tokenizer."""
    packed = pack_examples(examples, enc, batch_tokens)
    sums = row_losses(make_scorer(logits_fn), packed, device, autocast)
    sums, means, pred, pred_norm = predictions(sums, packed)
    return [
        Score(int(packed.labels[i]), sums[i].tolist(), means[i].tolist(), int(p), int(q))
        for i, (p, q) in enumerate(zip(pred, pred_norm))
    ]


def evaluate(scorer, packed, device, autocast=None, rank=0, world_size=1, should_stop=None):
    """(correct by acc, correct by acc_norm, total) over the packed examples, the batches split
    over the ranks; None when should_stop() interrupted it."""
    sums = row_losses(scorer, packed, device, autocast, rank, world_size, should_stop)
    if sums is None:
        return None
    _, _, pred, pred_norm = predictions(sums, packed)
    correct = int((pred == packed.labels).sum())
    correct_norm = int((pred_norm == packed.labels).sum())
    return correct, correct_norm, len(packed)


# -----------------------------------------------------------------------------
# Command line


def load_model(model_type, checkpoint, device):
    """(logits_fn, description) for a transformers model or one of our checkpoints."""
    import train_gpt2

    if checkpoint:
        model, ckpt = train_gpt2.load_model_from_checkpoint(checkpoint)
        model.to(device).eval()
        return (lambda tokens: model(tokens)[0]), f"{ckpt['path']} (step {ckpt['step']})"
    model = train_gpt2.load_hf_gpt2(model_type)
    model.to(device).eval()
    return (lambda tokens: model(tokens).logits), model_type


def parse_args(argv=None):
    from train_gpt2 import ArgumentParser  # errors in one line, as in every script here

    parser = ArgumentParser(description="Score a model on HellaSwag.")
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
    parser.add_argument(
        "--batch_tokens",
        type=int,
        default=None,
        help=f"tokens per forward pass (default: {GPU_BATCH_TOKENS} on CUDA, else "
        f"{CPU_BATCH_TOKENS})",
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
    from train_gpt2 import autocast_context, autocast_dtype, default_device, get_tokenizer

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
    logits_fn, name = load_model(args.model_type, args.checkpoint, device)
    packed = pack_examples(examples, get_tokenizer(), args.batch_tokens or batch_tokens_for(device))
    result = evaluate(make_scorer(logits_fn, bool(args.compile)), packed, device, autocast)
    correct, correct_norm, total = result
    print(
        f"{name} on HellaSwag {args.split}, {total} examples: acc {correct / total:.4f}, "
        f"acc_norm {correct_norm / total:.4f}"
    )


if __name__ == "__main__":
    main()
