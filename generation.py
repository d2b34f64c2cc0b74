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

from datafiles import GPT2_VOCAB_SIZE, get_tokenizer


class NonFiniteLogits(Exception):
    """Generation met NaN or infinite logits: the model has diverged."""


class KVCache:
    """The keys and values of every layer during generation, preallocated to max_len positions,
    with the attention mask of the rows: a row's left padding is never attended to. A model's
    forward(idx, cache=cache) reads positions() and mask, stores each layer's keys and values
    with update(), and advances length by the tokens it ran."""

    def __init__(self, pad, max_len):
        self.pad = pad  # (B,) left-padding tokens of each row
        self.max_len = max_len
        self.length = 0  # positions already filled
        self.k, self.v = {}, {}  # layer -> (B, n_head, max_len, head_size)
        self.mask = None  # (B, 1, T, length + T), set by prepare() for the T new positions

    def positions(self, T):
        """Positions of the next T tokens of every row, counted from the row's first real token."""
        start = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (start.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)

    def prepare(self, T):
        """The mask of T new queries: causal, and blind to padding (a padding query attends to
        itself only, so that its row of weights is never empty)."""
        keys = torch.arange(self.length + T, device=self.pad.device)
        queries = torch.arange(self.length, self.length + T, device=self.pad.device)
        causal = keys.view(1, -1) <= queries.view(-1, 1)  # (T, L)
        real = keys.view(1, -1) >= self.pad.view(-1, 1)  # (B, L)
        self.mask = causal.unsqueeze(0) & (real.unsqueeze(1) | (keys == queries.view(-1, 1)))
        self.mask = self.mask.unsqueeze(1)

    def update(self, layer, k, v):
        """Store the new keys and values of a layer; returns all of that layer's so far."""
        if layer not in self.k:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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


def print_samples(model, cfg, env, autocast):
    """num_return_sequences continuations of SAMPLE_PROMPT, top-k 50, with a generator of their
    own so that sampling never moves the training RNG; returns their texts (none if skipped)."""
    if cfg.num_return_sequences == 0:
        return []
    enc = get_tokenizer()
    prompt = enc.encode(SAMPLE_PROMPT)
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed + env.rank)
    new_tokens = max(0, cfg.max_length - len(prompt))
    try:
        with autocast:
            prompts = [prompt] * cfg.num_return_sequences
            rows = generate(model, prompts, new_tokens, top_k=50, generator=generator)
    except NonFiniteLogits as e:
        env.print0(f"samples skipped: {e}")
        return []
    texts = [enc.decode(row) for row in rows]
    for text in texts:
        env.print0(f"sample: {text}")
    return texts
