"""
HellaSwag (Zellers et al. 2019) scored on a device: pick the most likely of four endings for a
context. The training loop evaluates with it every eval_interval steps (load_hellaswag), and
hellaswag.py (the command line) scores any model with it.

Every ending is scored by the cross-entropy of its tokens given the context: `acc` picks the
ending with the lowest summed loss, `acc_norm` the lowest mean loss per token (the completion-style
scoring of the lecture, not the multiple-choice format of the paper).

The packing and scoring here serve every evaluation (core_eval.py's too): rows with a scored span,
sorted by length and packed into batches of about batch_tokens tokens, two ways.
- Whole rows (pack_rows, Batch), for a compiled scorer: widths rounded up to a multiple of 32 and
  a fixed number of rows per width, so that it sees a handful of shapes.
- After their shared prefix (pack_shared, SharedBatch), for an eager one: the rows of an example
  begin with the same tokens (HellaSwag's context, about half of its tokens; a CORE task's
  few-shot examples and query), which run through the model once, left-padded into a
  generation.KVCache; each row goes on from its own copy of it.
Either way only the positions that predict a scored token go through the lm_head, and the losses
stay on the device until the last batch: one host synchronization per pass.
"""

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from generation import KVCache, NonFiniteLogits
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
    """R whole rows of `width` tokens, and the N scored tokens in them. Only the positions that
    predict a scored token go through the lm_head: about a fifth of HellaSwag's tokens. (A row's
    scored span is HellaSwag's ending, a CORE task's continuation.)"""

    tokens: torch.Tensor  # (R, width) right-padded with 0; padding rows are all 0
    positions: torch.Tensor  # (N,) flat index (row * width + t) of each position t predicting t + 1
    targets: torch.Tensor  # (N,) the scored token each of them predicts
    rows: torch.Tensor  # (N,) the row of the set (4 * example + ending) each belongs to

    def to(self, device):
        return on_device(self, device)

    def hidden_states(self, hidden_fn):
        return hidden_fn(self.tokens)


@dataclass
class SharedBatch:
    """Examples whose rows begin with the same tokens, in two forward passes: their shared
    prefixes, left-padded, into a generation.KVCache; then each row's own tokens, right-padded,
    after its example's copy of the cache. The positions, targets and rows are Batch's, in the
    (R, S) rows."""

    prefixes: torch.Tensor  # (E, P) left-padded with 0; P is 0 where every prefix is empty
    pad: torch.Tensor  # (E,) the padding of each prefix
    owners: torch.Tensor  # (R,) the prefix that each row goes on from
    tokens: torch.Tensor  # (R, S) each row's tokens after its prefix, right-padded with 0
    positions: torch.Tensor  # (N,) flat index (row * S + t) of each position t predicting t + 1
    targets: torch.Tensor  # (N,) the scored token each of them predicts
    rows: torch.Tensor  # (N,) the row of the set each belongs to

    def to(self, device):
        return on_device(self, device)

    def hidden_states(self, hidden_fn):
        """The rows' hidden states; hidden_fn(tokens, cache) runs tokens after a KVCache's."""
        if self.prefixes.size(1) == 0:
            return hidden_fn(self.tokens)
        cache = KVCache(self.pad, self.prefixes.size(1) + self.tokens.size(1))
        hidden_fn(self.prefixes, cache)  # their keys and values: the hidden states unused
        return hidden_fn(self.tokens, cache.select(self.owners))  # the examples' own cache freed


def on_device(batch, device):
    """A copy of the dataclass `batch` with its tensors on the device."""
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(batch)(**{k: t.to(device, non_blocking=True) for k, t in tensors.items()})


@dataclass
class PackedRows:
    """Rows packed into batches (pack_rows, pack_shared), to be scored again and again."""

    ending_lengths: torch.Tensor  # (rows,) tokens in each row's scored span
    batches: list
    longest: int  # the longest row: the context a model needs

    @classmethod
    def of(cls, rows, batches):
        """The rows (tokens, start), in the numbering of the batches' `rows`, and the batches."""
        return cls(
            ending_lengths=torch.tensor([len(t) - c for t, c in rows], dtype=torch.long),
            batches=batches,
            longest=max((len(tokens) for tokens, _ in rows), default=0),
        )


@dataclass
class PackedExamples(PackedRows):
    """HellaSwag's examples rendered once and packed: row 4 * i + j is ending j of example i."""

    labels: torch.Tensor = None  # (examples,)

    def __len__(self):
        return len(self.labels)


def batch_tokens_for(device):
    return GPU_BATCH_TOKENS if str(device).startswith("cuda") else CPU_BATCH_TOKENS


def load_packed(
    path, device, max_width=None, limit=None, split="val", batch_tokens=None, compiled=False
):
    """The examples of a HellaSwag file (the downloaded split's if path is None; the first
    `limit` if given) packed for scoring on the device, in batches of about batch_tokens tokens
    (by default the device's): whole rows for a compiled scorer, else after their context."""
    examples = list(iterate_examples(split, path))[:limit]
    batch_tokens = batch_tokens or batch_tokens_for(device)
    packed = pack_examples(examples, get_tokenizer(), batch_tokens, max_width, compiled)
    if not len(packed):
        raise SystemExit(f"HellaSwag file {path or split} holds no examples")
    return packed


def pack_examples(examples, enc, batch_tokens=CPU_BATCH_TOKENS, max_width=None, compiled=False):
    """Render every example with the tokenizer enc and pack its 4 rows, context and ending with
    the ending scored: whole (pack_rows) for a compiled scorer, else after the context they share
    (pack_shared)."""
    if batch_tokens < 1:
        raise SystemExit(f"the HellaSwag batch must hold at least one token, not {batch_tokens}")
    examples_rows, labels = [], []
    for example in examples:
        data, _, _, label = render_example(example, enc)
        labels.append(label)
        context = data["ctx_tokens"]
        examples_rows.append([(context + ending, len(context)) for ending in data["ending_tokens"]])
    rows = [row for mine in examples_rows for row in mine]
    longest = max((len(tokens) for tokens, _ in rows), default=0)
    if max_width and longest > max_width:
        raise SystemExit(f"HellaSwag needs block_size >= {longest}, the model has {max_width}")
    if compiled:
        packed = pack_rows(rows, batch_tokens, max_width)
    else:
        packed = pack_shared(examples_rows, batch_tokens, max_width or longest)
    return PackedExamples(**vars(packed), labels=torch.tensor(labels, dtype=torch.long))


def pack_rows(rows, batch_tokens=CPU_BATCH_TOKENS, max_width=None):
    """Rows of (tokens, start), each scored on its tokens from `start` to its end, packed whole,
    longest first, for a compiled scorer: a batch's width is its longest row rounded up to a
    multiple of WIDTH_MULTIPLE (at most max_width, which no row may exceed), and every batch of
    one width has batch_tokens // width rows (the last is padded with empty rows)."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    batches, start = [], 0
    while start < len(order):
        width = math.ceil(len(rows[order[start]][0]) / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        width = min(width, max_width or width)
        size = max(1, batch_tokens // width)
        members = order[start : start + size]
        grid = torch.zeros((size, width), dtype=torch.long)
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
    return PackedRows.of(rows, batches)


# a batch's cache holds at most this many keys per token of batch_tokens: each row of an example
# has its own copy of the prompt's keys and values (4 copies for 4 choices). GPT-2 XL's keys and
# values are 300 KB a position in bf16: 10 GB for a GPU's 16k-token batches
CACHED_PER_BATCH_TOKEN = 2
# and its examples, each alone (its prefix, its rows padded to its longest), fill at least this
# much of it: examples of very different lengths would otherwise share a batch mostly of padding
SHARED_FILL = 0.85


def common_prefix(rows):
    """How many leading tokens all rows share: as many as the lexicographically first and last
    do, every other row lying between them. Found by halving, each test one list comparison."""
    first, last = min(rows), max(rows)
    low, high = 0, min(len(first), len(last))
    while low < high:
        middle = (low + high + 1) // 2
        if first[:middle] == last[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def split_shared_prefix(rows):
    """An example's rows (tokens, start) as the prefix that all begin with and, for each, the
    rest and where its scored tokens start in it. Each rest keeps the position that predicts its
    first scored token: the scores read the hidden states of the rests only."""
    tokens = [row for row, _ in rows]
    n = max(0, min([common_prefix(tokens)] + [start for _, start in rows]) - 1)
    return tokens[0][:n], [(row[n:], start - n) for row, start in rows]


def pack_shared(examples_rows, batch_tokens, context):
    """Each example's rows [(tokens, start)], the rows numbered on across the examples, packed
    into SharedBatches, for an eager scorer. The examples go longest rest first (a rest's padding
    counts once a row, a prefix's once an example), as many in a batch as keep its prefixes and
    rests within batch_tokens, its cache within CACHED_PER_BATCH_TOKEN x batch_tokens, its padding
    between examples within SHARED_FILL, and every row within the context."""
    examples, first_row = [], 0
    for mine in examples_rows:
        prefix, rests = split_shared_prefix(mine)
        numbered = [(own, start, first_row + j) for j, (own, start) in enumerate(rests)]
        examples.append((prefix, numbered, max(len(own) for own, _ in rests)))
        first_row += len(mine)
    batches, members, width, rest, rows, alone = [], [], 0, 0, 0, 0
    for prefix, rests, longest in sorted(examples, key=lambda e: (-e[2], -len(e[0]))):
        own = len(prefix) + len(rests) * longest  # its tokens in a batch of its own
        if members:
            grown_width, grown_rows = max(width, len(prefix)), rows + len(rests)
            tokens = (len(members) + 1) * grown_width + grown_rows * rest
            fits = tokens <= batch_tokens and alone + own >= SHARED_FILL * tokens
            fits &= grown_rows * (grown_width + rest) <= CACHED_PER_BATCH_TOKEN * batch_tokens
            fits &= grown_width + rest <= context
            if fits:
                members.append((prefix, rests))
                width, rows, alone = grown_width, grown_rows, alone + own
                continue
            batches.append(shared_batch(members, width, rest))
        # the batch's rests are as long as its first example's longest
        members, width, rest, rows, alone = [(prefix, rests)], len(prefix), longest, len(rests), own
    if members:
        batches.append(shared_batch(members, width, rest))
    return PackedRows.of([row for mine in examples_rows for row in mine], batches)


def shared_batch(examples, width, rest):
    """The SharedBatch of the examples: prefixes left-padded to `width`, rests right-padded to
    `rest` tokens."""
    prefixes = torch.zeros((len(examples), width), dtype=torch.long)
    pad, owners, tokens = [], [], []
    positions, targets, row_ids = [], [], []
    for e, (prefix, rests) in enumerate(examples):
        pad.append(width - len(prefix))
        prefixes[e, pad[-1] :] = torch.tensor(prefix, dtype=torch.long)
        for own, start, row in rests:
            i = len(tokens)
            tokens.append(own + [0] * (rest - len(own)))
            owners.append(e)
            positions += range(i * rest + start - 1, i * rest + len(own) - 1)
            targets += own[start:]
            row_ids += [row] * (len(own) - start)
    return SharedBatch(
        prefixes,
        *(torch.tensor(x, dtype=torch.long) for x in (pad, owners, tokens)),
        *(torch.tensor(x, dtype=torch.long) for x in (positions, targets, row_ids)),
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
    """A batch on the device (Batch, SharedBatch) -> ending_losses: the loss of every scored
    token and whether the model's most likely token is it. hidden_fn(tokens, cache=None) maps
    (rows, width) tokens, after a generation.KVCache's if given, to the final hidden states;
    head_fn those to logits. With compile, hidden_fn is compiled with static shapes (one graph per
    batch shape: pack_rows keeps them few), for Batches; the head runs on a varying number of
    positions and stays eager."""
    body = torch.compile(hidden_fn, dynamic=False) if compile else hidden_fn
    return lambda batch: ending_losses(
        batch.hidden_states(body), head_fn, batch.positions, batch.targets
    )


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


class InTheLoop:
    """HellaSwag as the training loop scores it: the examples packed once (load_hellaswag), a
    scorer of the raw model (compiled where the loop compiles: warm_up compiles its graphs at
    start-up; else eager, each context run once), its acc_norm at every evaluation (score),
    logged as `hella` lines."""

    kind = "hella"

    def __init__(self, packed, model, compile):
        self.packed, self.compile = packed, compile
        self.scorer = make_scorer(model.hidden, model.head, compile)

    def warm_up(self, device, autocast):
        """One batch of every shape through a compiled scorer, under no_grad: its graphs compiled
        at start-up, where a stop loses nothing. An eager one has nothing to compile."""
        if not self.compile:
            return
        shapes = {tuple(batch.tokens.shape): batch for batch in self.packed.batches}
        with torch.no_grad(), autocast:
            for batch in shapes.values():
                self.scorer(batch.to(device))

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
    packed = load_hellaswag(cfg.hellaswag_path, cfg.block_size, env, cfg.hellaswag == 1, compile)
    return None if packed is None else InTheLoop(packed, model, compile)


def load_hellaswag(path, block_size, env, required, compiled=False):
    """The HellaSwag val examples of a local file (path), or of the download when path is empty,
    packed for scoring by a model of context block_size (for a compiled scorer or an eager one:
    load_packed). Local rank 0 of each node downloads,
    and every rank agrees on the outcome before going on. A file that cannot be had is an error
    when required, else it turns HellaSwag off for the run (None) with a message."""
    cached = os.path.join(datafiles.HELLASWAG_CACHE_DIR, "hellaswag_val.jsonl")

    def download():
        if env.local_rank == 0 and not path:
            datafiles.download_hellaswag("val")

    try:
        agree(env, download)
        packing = (path or cached, env.device, block_size)
        return agree(env, lambda: load_packed(*packing, compiled=compiled))
    except SystemExit as e:
        if required:
            raise
        env.print0(f"HellaSwag is off for this run: {e}")
        return None
