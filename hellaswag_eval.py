"""
HellaSwag (Zellers et al. 2019) scored on a device: pick the most likely of four endings for a
context. The training loop evaluates with it every eval_interval steps (load_hellaswag), and
hellaswag.py (the command line) scores any model with it.

Every ending is scored by the cross-entropy of its tokens given the context: `acc` picks the
ending with the lowest summed loss, `acc_norm` the lowest mean loss per token (the completion-style
scoring of the lecture, not the multiple-choice format of the paper).

The scoring keeps a GPU busy: the examples are rendered once, their 4 rows are sorted by length
and packed into batches of about batch_tokens tokens whose widths are rounded up to a multiple of
32 (so that a compiled scorer sees a handful of shapes); only the positions that predict an
ending token (about a fifth) go through the lm_head; and the losses stay on the device until the
last batch: one host synchronization per pass. The scoring takes any batch of rows with a scored
span (row_scores, ending_losses): core_eval.py's batches, which run each example's shared prompt
once, go through it too.
"""

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from generation import NonFiniteLogits
from support import datafiles
from support.datafiles import ENDINGS, GPT2_VOCAB_SIZE, get_tokenizer, iterate_examples
from support.run_control import agree

# rows x width per forward pass: 16k tokens keep an H100 busy; on a CPU, whose logits are float32
# (200KB per token), 2k tokens are as fast per token and need 8 times less memory
GPU_BATCH_TOKENS = 2**14
CPU_BATCH_TOKENS = 2**11
WIDTH_MULTIPLE = 32  # batch widths are multiples of this: HellaSwag's rows need 3 to 6 of them
# a CPU computes the logits and their loss 64 positions at a time: their (64, 50304) logits stay in
# its cache (2.4x faster than 485 at once on a 2-core Xeon; a GPU takes a batch's all at once)
CPU_HEAD_ROWS = 64

# -----------------------------------------------------------------------------
# Rendering and packing the examples


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


@dataclass
class Batch:
    """R rows of `width` tokens, and the N ending tokens to score in them. Only the positions
    that predict an ending token go through the lm_head: about a fifth of HellaSwag's tokens.
    (An "ending" is a row's scored span: HellaSwag's ending, a CORE task's continuation.)"""

    tokens: torch.Tensor  # (R, width) right-padded with 0; padding rows are all 0
    positions: torch.Tensor  # (N,) flat index (row * width + t) of each position t predicting t + 1
    targets: torch.Tensor  # (N,) the ending token each of them predicts
    rows: torch.Tensor  # (N,) the row of the set (4 * example + ending) each belongs to

    def to(self, device):
        return on_device(self, device)


def on_device(batch, device):
    """A copy of the dataclass `batch` with its tensors on the device."""
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(batch)(**{k: t.to(device, non_blocking=True) for k, t in tensors.items()})


@dataclass
class PackedRows:
    """Rows packed into batches (pack_rows, core_eval.pack_task), to be scored again and again."""

    ending_lengths: torch.Tensor  # (rows,) tokens in each row's scored span
    batches: list
    longest: int  # the longest row: the context a model needs


@dataclass
class PackedExamples(PackedRows):
    """HellaSwag's examples rendered once and packed: row 4 * i + j is ending j of example i."""

    labels: torch.Tensor = None  # (examples,)

    def __len__(self):
        return len(self.labels)


def batch_tokens_for(device):
    return GPU_BATCH_TOKENS if str(device).startswith("cuda") else CPU_BATCH_TOKENS


def load_packed(
    path,
    device,
    max_width=None,
    limit=None,
    split="val",
    batch_tokens=None,
    multiple=WIDTH_MULTIPLE,
):
    """The examples of a HellaSwag file (the downloaded split's if path is None; the first
    `limit` if given) packed for scoring on the device, in batches of about batch_tokens tokens
    (by default the device's) whose widths are multiples of `multiple`."""
    examples = list(iterate_examples(split, path))[:limit]
    batch_tokens = batch_tokens or batch_tokens_for(device)
    packed = pack_examples(examples, get_tokenizer(), batch_tokens, max_width, multiple)
    if not len(packed):
        raise SystemExit(f"HellaSwag file {path or split} holds no examples")
    return packed


def pack_examples(
    examples, enc, batch_tokens=CPU_BATCH_TOKENS, max_width=None, multiple=WIDTH_MULTIPLE
):
    """Render every example with the tokenizer enc and pack its rows (pack_rows): context and
    ending, the ending scored."""
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
    packed = pack_rows(rows, batch_tokens, max_width, multiple)
    return PackedExamples(**vars(packed), labels=torch.tensor(labels, dtype=torch.long))


def pack_rows(rows, batch_tokens=CPU_BATCH_TOKENS, max_width=None, multiple=WIDTH_MULTIPLE):
    """Rows of (tokens, start), each scored on its tokens from `start` to its end, packed longest
    first into batches of batch_tokens // width rows. A batch's width is its longest row rounded
    up to a multiple of `multiple` (at most max_width, which no row may exceed), and with a
    multiple above 1 (a compiled scorer's) every batch of one width has the same number of rows
    (the last is padded with empty rows)."""
    longest = max((len(tokens) for tokens, _ in rows), default=0)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    batches, start = [], 0
    while start < len(order):
        width = math.ceil(len(rows[order[start]][0]) / multiple) * multiple
        width = min(width, max_width or width)
        size = max(1, batch_tokens // width)
        members = order[start : start + size]
        # padded to `size` rows for a compiled scorer's few shapes; an eager one takes any
        grid = torch.zeros((size if multiple > 1 else len(members), width), dtype=torch.long)
        positions, targets, row_ids = [], [], []
        for i, r in enumerate(members):
            tokens, ctx_len = rows[r]
            grid[i, : len(tokens)] = torch.tensor(tokens)
            positions += range(i * width + ctx_len - 1, i * width + len(tokens) - 1)
            targets += tokens[ctx_len:]
            row_ids += [r] * (len(tokens) - ctx_len)
        batches.append(
            Batch(
                tokens=grid,
                positions=torch.tensor(positions, dtype=torch.long),
                targets=torch.tensor(targets, dtype=torch.long),
                rows=torch.tensor(row_ids, dtype=torch.long),
            )
        )
        start += len(members)
    return PackedRows(
        ending_lengths=torch.tensor([len(t) - c for t, c in rows], dtype=torch.long),
        batches=batches,
        longest=longest,
    )


# -----------------------------------------------------------------------------
# Scoring


def ending_losses(hidden, head_fn, positions, targets):
    """Cross-entropy of each ending token, and whether it is the most likely one (1.0 or 0.0),
    from the (rows, width, n_embd) hidden states: (2, N). Only the positions that predict an
    ending token (flat indices) go through head_fn, the lm_head.

    Vocabulary entries past GPT-2's 50257 (padding) are masked out (a slice would leave the
    logits strided, and the loss over them slower). The float32 upcast of bf16 logits covers
    those positions only, not the whole (rows, width, vocab) tensor.
    """
    selected = hidden.flatten(0, 1).index_select(0, positions)
    rows = CPU_HEAD_ROWS if selected.device.type == "cpu" else max(1, len(selected))
    losses = []
    for x, y in zip(selected.split(rows), targets.split(rows)):
        logits = head_fn(x)
        logits[:, GPT2_VOCAB_SIZE:] = float("-inf")  # in place: scoring runs without gradients
        if logits.element_size() < 4:  # bf16 / fp16 under autocast
            logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        losses.append(torch.stack((loss, (logits.argmax(dim=1) == y).to(loss.dtype))))
    return torch.cat(losses, dim=1)


def make_scorer(hidden_fn, head_fn, compile=False):
    """A Batch on the device -> ending_losses: the loss of every ending token and whether the
    model's most likely token is it. hidden_fn maps (rows, width) tokens to the final hidden
    states, head_fn those to logits. With compile, hidden_fn is compiled with static shapes (one
    graph per batch shape: pack_examples keeps them few); the head runs on a varying number of
    positions and stays eager."""
    body = torch.compile(hidden_fn, dynamic=False) if compile else hidden_fn
    return lambda batch: ending_losses(body(batch.tokens), head_fn, batch.positions, batch.targets)


@torch.no_grad()
def row_scores(scorer, packed, device, autocast=None, rank=0, world_size=1, should_stop=None):
    """Every row's summed ending loss and the number of its ending tokens that are the model's
    most likely, on the device: (2, rows), or None if should_stop() said so between two batches.
    Rank r scores batches r, r + world_size, ...; the sums are summed over ranks, so every rank
    returns all of them."""
    autocast = autocast or contextlib.nullcontext()
    # float64 where the device has it: the sums stay as exact as the losses, even of a float64 model
    dtype = torch.float32 if str(device).startswith("mps") else torch.float64
    sums = torch.zeros((2, len(packed.ending_lengths)), dtype=dtype, device=device)
    # the same number of batches on every rank (a sharded model's ranks gather its weights
    # together): a rank past the last batch scores the last one again and keeps nothing of it
    rounds = math.ceil(len(packed.batches) / world_size)
    for i in range(rounds):
        if should_stop is not None and should_stop():
            return None
        k = i * world_size + rank
        batch = packed.batches[min(k, len(packed.batches) - 1)].to(device)
        with autocast:
            losses = scorer(batch)
        if k < len(packed.batches):
            sums.index_add_(1, batch.rows, losses.to(dtype))
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def predictions(scores, packed):
    """(sum losses, mean losses, pred, pred_norm) per example, from row_scores, on the CPU: one
    synchronization. A diverged model's losses are not finite: NonFiniteLogits, rather than picks
    that would all be the first ending."""
    sums = scores[0].double().cpu().view(-1, ENDINGS)
    if not torch.isfinite(sums).all():
        raise NonFiniteLogits("the model's logits are not finite")
    means = sums / packed.ending_lengths.view(-1, ENDINGS)
    return sums, means, sums.argmin(dim=1), means.argmin(dim=1)


def evaluate(scorer, packed, device, autocast=None, rank=0, world_size=1, should_stop=None):
    """(correct by acc, correct by acc_norm, total) over the packed examples, the batches split
    over the ranks; None when should_stop() interrupted it."""
    scores = row_scores(scorer, packed, device, autocast, rank, world_size, should_stop)
    if scores is None:
        return None
    _, _, pred, pred_norm = predictions(scores, packed)
    correct = int((pred == packed.labels).sum())
    correct_norm = int((pred_norm == packed.labels).sum())
    return correct, correct_norm, len(packed)


def warm_up(scorer, packed_sets, device, autocast):
    """One batch of every shape of the packed sets (PackedRows) through the scorer, under no_grad:
    its graphs compiled at start-up, where a stop loses nothing."""
    batches = [b for packed in packed_sets for b in packed.batches]
    with torch.no_grad(), autocast:
        for batch in {tuple(b.tokens.shape): b for b in batches}.values():
            scorer(batch.to(device))


class InTheLoop:
    """HellaSwag as the training loop scores it: the examples packed once (load_hellaswag), a
    scorer of the raw model (compiled where the loop compiles: warm_up compiles its graphs at
    start-up), its acc_norm at every evaluation (score), logged as `hella` lines."""

    kind = "hella"

    def __init__(self, packed, model, compile):
        self.packed, self.scorer = packed, make_scorer(model.hidden, model.head, compile)

    def warm_up(self, device, autocast):
        warm_up(self.scorer, [self.packed], device, autocast)

    def score(self, env, autocast, should_stop):
        """acc_norm, said on the master (env.print0); None when should_stop() cut the pass
        short, or when the model has diverged (its logits are not finite)."""
        args = (self.scorer, self.packed, env.device, autocast, env.rank, env.world_size)
        try:
            result = evaluate(*args, should_stop)
        except NonFiniteLogits as e:
            env.print0(f"HellaSwag skipped: {e}")
            return None
        if result is None:
            return None
        _, correct_norm, total = result
        env.print0(f"HellaSwag accuracy: {correct_norm}/{total}={correct_norm / total:.4f}")
        return correct_norm / total


def for_the_loop(cfg, env, model, compile):
    """HellaSwag in the training loop (InTheLoop), or None: asked for (--hellaswag), or by default
    for FineWeb's data (a file that cannot be had then turns it off instead of failing the run)."""
    if not (cfg.hellaswag if cfg.hellaswag is not None else cfg.data_dir != datafiles.BUNDLED):
        return None
    packed = load_hellaswag(cfg.hellaswag_path, cfg.block_size, env, cfg.hellaswag == 1)
    return None if packed is None else InTheLoop(packed, model, compile)


def load_hellaswag(path, block_size, env, required):
    """The HellaSwag val examples of a local file (path), or of the download when path is empty,
    packed for scoring by a model of context block_size. Local rank 0 of each node downloads,
    and every rank agrees on the outcome before going on. A file that cannot be had is an error
    when required, else it turns HellaSwag off for the run (None) with a message."""
    cached = os.path.join(datafiles.HELLASWAG_CACHE_DIR, "hellaswag_val.jsonl")

    def download():
        if env.local_rank == 0 and not path:
            datafiles.download_hellaswag("val")

    try:
        agree(env, download)
        return agree(env, lambda: load_packed(path or cached, env.device, block_size))
    except SystemExit as e:
        if required:
            raise
        env.print0(f"HellaSwag is off for this run: {e}")
        return None
