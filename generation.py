"""
Generation with a key/value cache, for the models of both recipes: the samples the training loop
prints, sample.py and bench.py all generate through generate() or stream() here.

The prompts run through the model once; then each step runs only the newest token of every row,
each attention layer appending its keys and values to a cache preallocated to the context length.
Prompts of different lengths share a batch: they are left-padded, the padding is masked out of
attention, and each row counts its positions from its own first token.
"""

import torch
import torch.nn.functional as F

from support.datafiles import GPT2_VOCAB_SIZE, get_tokenizer


class NonFiniteLogits(Exception):
    """Generation met NaN or infinite logits: the model has diverged."""


class KVCache:
    """The keys and values of every layer during generation, preallocated to max_len positions,
    with the attention mask of the rows: a row's left padding is never attended to. A model's
    forward(idx, cache=cache) makes room for its tokens with token_positions(), which gives their
    positions and sets the mask, then stores each layer's keys and values with update()."""

    def __init__(self, pad, max_len):
        self.pad = pad  # (B,) left-padding tokens of each row
        self.max_len = max_len
        self.start = self.length = 0  # the new tokens fill positions start..length-1
        self.k, self.v = {}, {}  # layer -> (B, n_head, max_len, head_size)
        self.mask = None  # (B, 1, T, length) for the T new positions
        self.tokens = None  # (B, max_len): the tokens of every position so far

    def extend(self, idx):
        """Room for the new tokens idx (B, T) in every row: their positions, counted from the
        row's first real token, and the mask of their queries: causal, and blind to padding (a
        padding query attends to itself only, so that its row of weights is never empty)."""
        T = idx.size(1)
        if self.tokens is None:
            self.tokens = idx.new_zeros(idx.size(0), self.max_len)
        self.start, self.length = self.length, self.length + T
        self.tokens[:, self.start : self.length] = idx
        keys = torch.arange(self.length, device=self.pad.device)
        queries = keys[self.start :]
        causal = keys.view(1, -1) <= queries.view(-1, 1)  # (T, L)
        real = keys.view(1, -1) >= self.pad.view(-1, 1)  # (B, L)
        mask = causal.unsqueeze(0) & (real.unsqueeze(1) | (keys == queries.view(-1, 1)))
        self.mask = mask.unsqueeze(1)
        return (queries.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)

    def select(self, rows):
        """A cache of the given rows (B',) of this one, a row any number of times: each copy goes
        on from its row's tokens on its own (hellaswag_eval's SharedBatch scores every row of
        an example after one run of the prefix they share)."""
        selected = KVCache(self.pad[rows], self.max_len)
        selected.start, selected.length = self.start, self.length
        selected.tokens = self.tokens[rows]
        selected.k = {layer: k[rows] for layer, k in self.k.items()}
        selected.v = {layer: v[rows] for layer, v in self.v.items()}
        return selected

    def update(self, layer, k, v):
        """Store the new keys and values of a layer; returns all of that layer's so far."""
        if layer not in self.k:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, self.start : self.length] = k
        self.v[layer][:, :, self.start : self.length] = v
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]


def token_positions(idx, cache, block_size):
    """The position of every token of idx (B, T): 0..T-1, or with a KVCache the positions after
    the cached tokens (KVCache.extend). A sequence longer than block_size is refused."""
    T = idx.size(1)
    past = 0 if cache is None else cache.length
    if past + T > block_size:
        raise ValueError(f"sequence of length {past + T} is longer than block_size {block_size}")
    if cache is None:
        return torch.arange(0, T, dtype=torch.long, device=idx.device)
    return cache.extend(idx)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token of every row from its (B, vocab) logits: the most likely one at
    temperature 0, else one drawn from softmax(logits / temperature) restricted to the top_k
    likeliest tokens and to the smallest set of them whose probability reaches top_p."""
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("the model's logits are not finite")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so that the largest is 0 before the division: a tiny temperature then gives -inf
    # to the others, never inf - inf (NaN) in the softmax
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # a token is kept while the probability of the likelier ones is still below top_p
        outside = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    top_p=None,
    generator=None,
    stop_token=None,
):
    """Continue each prompt by up to max_new_tokens tokens.

    prompts is a (B, T) token tensor or a list of token lists of any lengths. Returns a list of
    token lists: each prompt followed by its new tokens, which end early at stop_token
    (included). Runs under the caller's autocast, if any.
    """
    prompts = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
    rows = [list(p) for p in prompts]
    options = (temperature, top_k, top_p, generator, stop_token)
    for tokens in stream(model, prompts, max_new_tokens, *options):
        for row, token in zip(rows, tokens):
            if token is not None:
                row.append(token)
    return rows


@torch.no_grad()
def stream(
    model,
    prompts,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    top_p=None,
    generator=None,
    stop_token=None,
):
    """Generate one token per step for every prompt (token lists); yields the list of each
    row's new token, None for a row that has reached stop_token."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    if width + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"a prompt of {width} tokens and {max_new_tokens} new tokens exceed the model's "
            f"context of {model.config.block_size} tokens"
        )
    device = model.lm_head.weight.device
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache(pad, width + max_new_tokens)
    n_vocab = min(model.config.vocab_size, GPT2_VOCAB_SIZE)  # never a padded id
    done = [False] * len(prompts)
    logits, _ = model(idx, cache=cache)
    for i in range(max_new_tokens):
        next_tokens = sample_next(logits[:, -1, :n_vocab], temperature, top_k, top_p, generator)
        tokens = next_tokens.tolist()
        yield [None if d else t for d, t in zip(done, tokens)]
        done = [d or t == stop_token for d, t in zip(done, tokens)]
        if all(done) or i == max_new_tokens - 1:
            return
        logits, _ = model(next_tokens.unsqueeze(1), cache=cache)


SAMPLE_PROMPT = "Hello, I'm a language model,"


def print_samples(model, count, max_length, seed, autocast, print0=print):
    """count continuations of SAMPLE_PROMPT to max_length tokens, top-k 50, with a generator of
    their own seeded by seed, so that sampling never moves the training RNG; printed, and
    returned as texts (none if skipped)."""
    if count == 0:
        return []
    enc = get_tokenizer()
    prompt = enc.encode(SAMPLE_PROMPT)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    new_tokens = max(0, max_length - len(prompt))
    try:
        with autocast:
            rows = generate(model, [prompt] * count, new_tokens, top_k=50, generator=generator)
    except NonFiniteLogits as e:
        print0(f"samples skipped: {e}")
        return []
    texts = [enc.decode(row) for row in rows]
    for text in texts:
        print0(f"sample: {text}")
    return texts
