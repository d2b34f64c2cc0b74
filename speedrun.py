"""
The speedrun recipe (`train_gpt2.py --recipe speedrun`): the model and optimizer of the NanoGPT
speedrun's records (Keller Jordan's modded-nanogpt, 2024-2026), whole, in one file.

Against the lecture's GPT-2 its first records change:
- rotary position embeddings (RoFormer) instead of the learned wpe;
- RMSNorm without weights instead of LayerNorm, and no biases;
- QK-norm: queries and keys RMS-normalized, with a fixed attention scale of 0.12;
- ReLU² instead of GELU (Primer);
- the projections into the residual stream and an untied lm_head initialized to zero;
- logits soft-capped as 15 tanh(logits / 15) (Gemma 2);
- Muon for the blocks' matrices, AdamW for the embedding and the head, each at its own rate;
- no warmup: constant rates, then a linear cooldown.

Later records add, each behind a switch (SWITCHES; all off is the recipe of the first records, to
the bit), on by default: U-net skips between the first and the second half of the blocks, value
embeddings mixed into the attention values, a hashed embedding of each token's bigram,
document-aware attention in a sliding window that grows over the run, Polar Express in place of
Newton-Schulz, NorMuon's per-neuron step sizes, cautious weight decay, and schedules of the batch
size and of the context length; and off by default, the prediction of the tokens 2 and 3 ahead
early in the run (it made the CPU proxy's val loss worse: docs/recipes.md).

Everything else of a run (data, DDP, evaluation, checkpoints, resume) is train_gpt2.py's. What
the trainer takes from here (train_gpt2.get_recipe) is the model, which has GPT's parameter names
and interface (forward, hidden, head, flops_per_token), the optimizer and the schedule at the
run's settings, and the recipe's own settings (Settings: flags of train_gpt2.py).
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from generation import token_positions
from model_kernels import linear_cross_entropy
from support import devices
from support.cli import ON_OFF, setting
from support.datafiles import EOT

# With q and k RMS-normalized, a fixed attention temperature of 0.12 trains better than
# 1/sqrt(head_dim), and logits soft-capped by 15 * tanh(logits / 15) keep the early steps stable.
ATTN_SCALE = 0.12
SOFTCAP = 15.0
ROPE_BASE = 10000  # RoFormer's


@dataclass
class ModelSettings:
    """The recipe's switches that change its model (each is also a flag of train_gpt2.py, and in
    a checkpoint's model_config: GPTConfig has them). The lecture's GPT ignores them."""

    unet_skips: int = setting(
        1, "speedrun: block i's output into block L-1-i (U-net)", choices=ON_OFF
    )
    value_embeds: int = setting(
        3, "speedrun: value embeddings into the first and last N blocks' attention", minimum=0
    )
    doc_attention: int = setting(1, "speedrun: no attention across <|endoftext|>", choices=ON_OFF)
    sliding_window: int = setting(
        128, "speedrun: the attention window at first, grown to block_size (0: none)", minimum=0
    )
    bigram_embed: int = setting(
        5, "speedrun: a table of N x vocab_size hashed token pairs into every block", minimum=0
    )


# A checkpoint without one of these was written before the switch existed: it is off there
SWITCHES = (
    "unet_skips",
    "value_embeds",
    "doc_attention",
    "sliding_window",
    "polar_express",
    "normuon",
    "cautious_wd",
    "batch_schedule",
    "seq_schedule",
    "bigram_embed",
    "mtp",
)
# the sliding window grows in steps of this many tokens: a compiled model recompiles for each
WINDOW_STEP = 64
# cautious weight decay's rate, times Muon's scheduled lr as modded-nanogpt couples them: its
# NorMuon's 1.2, not tuned for other scales (docs/recipes.md measures it on and off)
CAUTIOUS_WD = 1.2
# the schedules' stages: the run in thirds of its steps (modded-nanogpt's batch size schedule)
STAGES = 3
# multi-token prediction's weights of the next token and of those 2 and 3 ahead, from a stage's
# start to its end (modded-nanogpt record 53): 3 tokens, then 2, then the next one alone
MTP_WEIGHTS = (
    ((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
    ((1.0, 0.5), (1.0, 0.0)),
    ((1.0,), (1.0,)),
)
# the bigram hash: two odd multipliers of the token and the one before it, whose products are
# xor-ed, so that the pairs of the 50k tokens spread over the table's rows
BIGRAM_MULTIPLIERS = (40_503, 28_657)


def absent_switches_off(config, settings_class):
    """A checkpoint's settings (a dict of settings_class's fields) with the switches it lacks
    set to 0 (off): it was trained without them, and resumes, samples and scores so."""
    fields = {f.name for f in dataclasses.fields(settings_class)}
    return {**{k: 0 for k in SWITCHES if k in fields}, **config}


@dataclass
class Settings:
    """The recipe's own settings; each is also a flag of train_gpt2.py (its TrainConfig has them),
    used by this recipe only. The cooldown ends at the run's --min_lr_ratio."""

    muon_lr: float = setting(0.05, "speedrun: Muon's rate (the blocks' matrices)", above=0)
    muon_wd: float = setting(0.0, "speedrun: Muon's decoupled weight decay", minimum=0)
    embed_lr: float = setting(0.6, "speedrun: AdamW rate of the token embedding", above=0)
    head_lr: float = setting(0.008, "speedrun: AdamW rate of the lm_head", above=0)
    cooldown_frac: float = setting(0.6, "speedrun: steps of lr cooldown", minimum=0, maximum=1)
    scalar_lr: float = setting(
        0.04, "speedrun: AdamW rate of the skip, value and bigram weights", above=0
    )
    polar_express: int = setting(
        1, "speedrun: Muon orthogonalizes by Polar Express", choices=ON_OFF
    )
    normuon: int = setting(1, "speedrun: NorMuon's per-neuron step sizes", choices=ON_OFF)
    cautious_wd: float = setting(
        CAUTIOUS_WD,
        "speedrun: Muon's weight decay where it agrees with the update (0: off)",
        minimum=0,
    )
    batch_schedule: int = setting(
        1, "speedrun: batches of 1/3, 2/3, then all of total_batch_size", choices=ON_OFF
    )
    seq_schedule: int = setting(
        1, "speedrun: contexts of at most T/2 tokens for the first third", choices=ON_OFF
    )
    # off: in the CPU proxy (docs/recipes.md) it raised the val loss by 0.042 at equal tokens
    # (0.017 to 0.070 over 3 seeds); its record trained a 12-layer model on 100 times the tokens
    mtp: int = setting(
        0, "speedrun: also predict the tokens 2 and 3 ahead in the first two thirds", choices=ON_OFF
    )


# -----------------------------------------------------------------------------
# The model


def rms_norm(x):
    """RMSNorm (Zhang & Sennrich 2019) without a learned gain: the recipe's only norm."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer, arXiv 2104.09864): channel pair i of a head is rotated
    by the angle position * base^(-2i / head_size), so that q.k depends on the distance between two
    positions and not on where they are."""

    def __init__(self, head_size, max_len):
        super().__init__()
        freqs = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
        # buffers, not weights: the same for every model, rebuilt rather than saved
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos):
        """cos and sin for positions pos, (T,) or per row (B, T), shaped to broadcast over heads."""
        cos, sin = self.cos[pos], self.sin[pos]
        if pos.dim() == 2:  # (B, T, D/2) -> (B, 1, T, D/2): one rotation per row and position
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rotary(x, rope):
    """Rotate the channel pairs (i, i + D/2) of x, (B, n_head, T, D), by the angles in rope."""
    cos, sin = rope
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer, value_embedded=False):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # its slot in a generation.KVCache
        if value_embedded:  # the weights of v and of the value embedding in the values used
            self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x, rope, mask, cache=None, value_embedding=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if value_embedding is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embedding
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # QK-norm (Dehghani et al. 2023): unit-RMS queries and keys bound the attention logits
        q, k = apply_rotary(rms_norm(q), rope), apply_rotary(rms_norm(k), rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if mask is None:  # causal attention over the whole sequence: SDPA's own kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ATTN_SCALE)
        elif isinstance(mask, BlockMask):  # FlexAttention: only the blocks that the mask keeps
            y = flex_attention_kernel(q.device.type)(q, k, v, block_mask=mask, scale=ATTN_SCALE)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ATTN_SCALE)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


@functools.cache
def flex_attention_kernel(device_type):
    """flex_attention compiled on CUDA, once a process (uncompiled, it computes every score of
    the (T, T) matrix); elsewhere uncompiled: there it serves the tests that hold it equal to the
    boolean mask of the other devices."""
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        # ReLU squared (Primer, arXiv 2109.08668): cheaper than GELU, and better
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer, value_embedded=False):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer, value_embedded)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask=None, cache=None, value_embedding=None):
        x = x + self.attn(rms_norm(x), rope, mask, cache, value_embedding)
        x = x + self.mlp(rms_norm(x))
        return x


def value_embedded_blocks(config):
    """{block: its value embedding table} under --value_embeds N: table j feeds block j and block
    L-1-j (as the U-net pairs them), N at most half the blocks."""
    tables = min(config.value_embeds, config.n_layer // 2)
    return {**{j: j for j in range(tables)}, **{config.n_layer - 1 - j: j for j in range(tables)}}


class SpeedrunGPT(nn.Module):
    def __init__(self, config, fused_loss=False):
        super().__init__()
        if (config.n_embd // config.n_head) % 2:
            raise ValueError("the speedrun recipe's rotary embeddings need an even head size")
        self.config = config
        self.value_tables = value_embedded_blocks(config)
        blocks = [Block(config, i, i in self.value_tables) for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(config.vocab_size, config.n_embd), h=nn.ModuleList(blocks))
        )
        if self.value_tables:  # value embeddings (modded-nanogpt record 14)
            tables = len(set(self.value_tables.values()))
            self.value_embeds = nn.ModuleList(
                nn.Embedding(config.vocab_size, config.n_embd) for _ in range(tables)
            )
        if config.unet_skips:  # the weight of each skip into the second half (record 11)
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        if config.bigram_embed:  # token pairs' embeddings, each block's own weight (record 62)
            rows = config.bigram_embed * config.vocab_size
            self.bigram_embed = nn.Embedding(rows, config.n_embd)
            self.bigram_weights = nn.Parameter(torch.full((config.n_layer,), 0.1))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        # how far back attention sees now: set_attention_span changes both over a run
        self.window = config.block_size  # a sliding window: keys fewer than this back
        self.context = config.block_size  # and in the same context of this many positions
        self.flex = None  # FlexAttention for the masks: None is on CUDA only, True/False forces
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        self.fused_loss = fused_loss  # linear_cross_entropy instead of the full logits
        # the weights of the training loss's next token and of those after it (set_mtp_weights):
        # a tensor, so that a compiled model does not recompile as they change step by step
        self.register_buffer("mtp_weights", torch.ones(1), persistent=False)
        # normal(0, 0.02) as GPT-2's, then zero-initialized projections into the residual stream
        # and head (modded-nanogpt): every block starts as the identity, the first logits uniform
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        if config.bigram_embed:  # a pair adds nothing to the residual stream until it is learned
            nn.init.zeros_(self.bigram_embed.weight)

    def forward(self, idx, targets=None, cache=None):
        """(logits, loss), as GPT.forward. A loss with gradients (training) is multi_token_loss
        under self.mtp_weights; without (evaluation), that of the next token alone."""
        x = self.hidden(idx, cache)
        if cache is not None:
            x = x[:, -1:]  # generation needs the next token only
        ahead = targets is not None and torch.is_grad_enabled() and self.mtp_weights.numel() > 1
        if targets is not None and self.fused_loss and not ahead:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, SOFTCAP)
        logits = self.head(x)
        loss = None
        if ahead:  # the fused loss has the next token only: the full logits then
            loss = multi_token_loss(logits, targets, self.mtp_weights)
        elif targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden(self, idx, cache=None):
        """The final (normalized) hidden state of every position: (B, T, n_embd)."""
        positions = token_positions(idx, cache, self.config.block_size)
        rope = self.rotary(positions)
        mask = self.attention_mask(idx, cache)
        x = rms_norm(self.transformer.wte(idx))
        # each table's lookup once: a table feeds two blocks
        tables = [table(idx) for table in self.value_embeds] if self.value_tables else []
        if self.config.bigram_embed:
            rows = self.bigram_embed.num_embeddings
            pairs = self.bigram_embed(bigram_rows(idx, positions, cache, rows))
        L, skips = self.config.n_layer, []
        for i, block in enumerate(self.transformer.h):
            if self.config.unet_skips and i >= L - L // 2:  # the second half: skip from L-1-i
                x = x + self.skip_weights[i - (L - L // 2)] * skips.pop()
            if self.config.bigram_embed:  # into every block's input, as the record adds it
                x = x + self.bigram_weights[i] * pairs
            table = self.value_tables.get(i)
            x = block(x, rope, mask, cache, None if table is None else tables[table])
            if self.config.unet_skips and i < L // 2:
                skips.append(x)
        return rms_norm(x)

    def attention_mask(self, idx, cache=None):
        """Which keys each query of idx (B, T) may attend, (B, 1, T, keys): the earlier positions
        (and with a KVCache its mask: no padding), of the same document if doc_attention (each
        starts with <|endoftext|>, as fineweb.py writes them), fewer than self.window back, and
        in the same self.context positions (0 to context-1, context to 2 context-1, ...).
        None where that is all of the earlier positions: SDPA's causal kernel then. Training on
        CUDA (self.flex), the same mask as a FlexAttention BlockMask instead (block_mask)."""
        T = idx.size(1)
        keys = T if cache is None else cache.length
        documents = bool(self.config.doc_attention)
        whole = self.window >= keys and self.context >= keys
        if cache is None and not documents and whole:
            return None
        if cache is None and (idx.is_cuda if self.flex is None else self.flex):
            return self.block_mask(idx)
        q = torch.arange(keys - T, keys, device=idx.device).view(1, -1, 1)
        k = torch.arange(keys, device=idx.device).view(1, 1, -1)
        # the contexts count positions, which a KVCache's left-padded row starts after its padding
        start = 0 if cache is None else cache.pad.view(-1, 1, 1)
        same_context = (q - start) // self.context == (k - start) // self.context
        mask = (k <= q) & (q - k < self.window) & same_context  # (1 or B, T, keys)
        if documents:
            tokens = idx if cache is None else cache.tokens[:, :keys]
            document = (tokens == EOT).cumsum(dim=1)  # (B, keys)
            mask = mask & (document[:, -T:].unsqueeze(2) == document.unsqueeze(1))
        if cache is not None:
            mask = mask & cache.mask.squeeze(1)
        return mask.unsqueeze(1)

    def block_mask(self, idx):
        """attention_mask's rule for idx (B, T) without a cache, as a FlexAttention BlockMask:
        its kernel skips every block of 128 x 128 scores that the mask leaves out entirely (most
        of them under a short window), where SDPA computes the whole (T, T) of a boolean mask."""
        B, T = idx.shape
        window, context = self.window, self.context
        document = (idx == EOT).cumsum(dim=1) if self.config.doc_attention else None

        def may_attend(b, h, q, k):
            seen = (k <= q) & (q - k < window) & (q // context == k // context)
            return seen if document is None else seen & (document[b, q] == document[b, k])

        return create_block_mask(may_attend, B, None, T, T, device=idx.device)

    def head(self, x):
        """Soft-capped logits from hidden states (..., n_embd)."""
        logits = self.lm_head(x)
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def flops_per_token(self, T):
        """Training FLOPs per token, 6N + 12 L H Q T (PaLM, appendix B), as GPT.flops_per_token.
        No biases or norm gains; the untied lm_head is multiplied, the embedding only looked up."""
        d, L = self.config.n_embd, self.config.n_layer
        return 6 * (self.config.vocab_size * d + L * 12 * d * d) + 12 * L * d * T


def bigram_rows(idx, positions, cache, rows):
    """The bigram table's row (of `rows`) for each token of idx (B, T) at its positions (from
    token_positions): a hash of the token and the one before it (modded-nanogpt record 62: the
    hashed pairs collide rarely, since few of the 2.5G pairs occur). With no token before it in
    its own document (a row's first position, or an <|endoftext|>, which starts a document), the
    last row, which no pair hashes to. With a KVCache, the token before is the cached one."""
    tokens = idx if cache is None else cache.tokens[:, : cache.length]
    before = torch.cat((tokens[:, :1], tokens[:, :-1]), dim=1)[:, -idx.size(1) :]
    a, b = BIGRAM_MULTIPLIERS
    pair = torch.bitwise_xor(a * idx, b * before) % (rows - 1)
    return torch.where((positions == 0) | (idx == EOT), rows - 1, pair)


def multi_token_loss(logits, targets, weights):
    """Multi-token prediction without parameters of its own (modded-nanogpt record 53): the
    cross-entropy of the logits at each position against the next token (targets, (B, T)), the
    one after it, ... (len(weights) of them), each averaged over the positions that have it in
    their row, weighted by weights and divided by their sum: the same head learns to see further
    ahead, which shapes the hidden states early in training."""
    logits = logits.float()
    lse = logits.logsumexp(dim=-1)  # once for every target: the same logits predict each
    T, ahead = targets.size(1), min(weights.numel(), targets.size(1))
    total = 0.0
    for k in range(ahead):
        picked = logits[:, : T - k].gather(-1, targets[:, k:].unsqueeze(-1)).squeeze(-1)
        total = total + weights[k] * (lse[:, : T - k] - picked).mean()
    return total / weights[:ahead].sum()


# -----------------------------------------------------------------------------
# The optimizer: Muon, and AdamW for the rest


def newton_schulz(G, steps=5):
    """An approximately orthogonal matrix near G: its singular values moved to about 1 (within
    roughly 0.7-1.2), its singular vectors kept, by a quintic Newton-Schulz iteration.

    Each step maps every singular value s to a s + b s^3 + c s^5; these coefficients (from the
    Muon write-up, Jordan et al. 2024) pull all of [0, 1] quickly towards 1 at the cost of not
    converging exactly, which Muon does not need. Runs in G's dtype.
    """
    X = G / (G.norm() + 1e-7)  # singular values <= 1: the iteration's range
    return odd_quintic_steps(X, [(3.4445, -4.7750, 2.0315)] * steps)


# Polar Express (Amsel, Persson, Musco and Gower 2025, arXiv 2505.16932): its own quintic for each
# of 5 steps, each chosen so that the singular value furthest from 1 ends as near 1 as it can
# after that step; these are the paper's for a safety factor of 2e-2 (as modded-nanogpt uses)
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G):
    """As newton_schulz, nearer to orthogonal in the same 5 steps (modded-nanogpt record 38)."""
    X = G / (G.norm() * (1 + 2e-2) + 1e-6)  # a little below norm 1: the safety factor
    return odd_quintic_steps(X, POLAR_EXPRESS)


def odd_quintic_steps(X, coefficients):
    """X after one step X <- a X + b (X X^T) X + c (X X^T)^2 X for each (a, b, c): each maps every
    singular value s of X to a s + b s^3 + c s^5 and keeps the singular vectors."""
    transposed = X.size(0) > X.size(1)
    if transposed:  # X @ X.T is then the smaller Gram matrix
        X = X.T
    for a, b, c in coefficients:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def normuon(update, state, beta2=0.95):
    """NorMuon (Li et al. 2025, arXiv 2510.05491; modded-nanogpt record 41): an orthogonalized
    update with each neuron's row (each column of a wide matrix) divided by the root of a running
    mean of its mean square (state["second_moment"], in float32 at least), then scaled back to the
    update's own norm: orthogonal updates leave some neurons far larger steps than others."""
    u = update.to(torch.promote_types(update.dtype, torch.float32))
    mean_square = u.square().mean(dim=1 if u.size(0) >= u.size(1) else 0, keepdim=True)
    if "second_moment" not in state:
        state["second_moment"] = torch.zeros_like(mean_square)
    second_moment = state["second_moment"].lerp_(mean_square, 1 - beta2)
    scaled = u * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (u.norm() / scaled.norm().clamp_min(1e-10))


def cautious_weight_decay(p, update, rate):
    """Cautious weight decay (Chen et al. 2025, arXiv 2510.12402; modded-nanogpt record 43):
    p *= 1 - rate only where p and its update (the step is -lr * update) have the same sign, so
    that decay never pulls a weight against where the optimizer takes it."""
    p.sub_(p * (update * p > 0), alpha=rate)


def make_optimizer(model, cfg, device_type, log=print):
    """Muon for the blocks' matrices; AdamW (betas 0.8, 0.95) for the embeddings, the head and
    the scalar weights (skips, value mixes, bigram weights), each group at its own rate
    (modded-nanogpt's choices), at the run's settings (cfg: train_gpt2.TrainConfig, which has
    Settings' fields)."""
    blocks = [p for block in model.transformer.h for p in block.parameters()]
    matrices = [p for p in blocks if p.ndim == 2]
    embeddings = [model.transformer.wte.weight]
    if hasattr(model, "value_embeds"):
        embeddings += [table.weight for table in model.value_embeds]
    if hasattr(model, "bigram_embed"):
        embeddings.append(model.bigram_embed.weight)
    added = [getattr(model, name, None) for name in ("skip_weights", "bigram_weights")]
    scalars = [p for p in [p for p in blocks if p.ndim < 2] + added if p is not None]
    groups = [
        dict(
            params=matrices,
            use_muon=True,
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_wd,
            cautious_wd=cfg.cautious_wd,
        ),
        dict(params=embeddings, lr=cfg.embed_lr),
        dict(params=[model.lm_head.weight], lr=cfg.head_lr),
    ]
    if scalars:
        groups.append(dict(params=scalars, lr=cfg.scalar_lr))
    for group in groups:
        group["initial_lr"] = group["lr"]  # the schedule scales every group's own rate
    adamw = sum(p.numel() for group in groups[1:] for p in group["params"])
    log(
        f"Muon: {len(matrices)} matrices with {sum(p.numel() for p in matrices):,} parameters; "
        f"AdamW: embeddings, head and scalar weights, {adamw:,} parameters"
    )
    dtype = devices.autocast_dtype(cfg.dtype, device_type)
    ns_dtype = newton_schulz_dtype(device_type, dtype, model.lm_head.weight.dtype)
    switches = dict(polar_express=bool(cfg.polar_express), normuon=bool(cfg.normuon))
    return Muon(groups, ns_dtype=ns_dtype, **switches)


def newton_schulz_dtype(device_type, dtype, weights=torch.float32):
    """Muon's Newton-Schulz in bf16 on GPUs that train in bf16 (its purpose needs no more
    precision); else in the weights' dtype: a CPU multiplies these shapes in bf16 up to 50 times
    slower."""
    return torch.bfloat16 if device_type == "cuda" and dtype == torch.bfloat16 else weights


def muon_shares(sizes, world):
    """The matrices (indices into sizes) each of `world` ranks orthogonalizes: the largest first,
    each to the rank with the fewest elements so far, so that the ranks' shares are about equal."""
    shares, loads = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = loads.index(min(loads))
        shares[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(share) for share in shares]


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-schulz; Jordan et al. 2024) for the parameter groups
    marked use_muon, AdamW for the others.

    Muon keeps a momentum of each matrix's gradient and steps along its Nesterov look-ahead made
    orthogonal by newton_schulz: every direction of the update has the same size, whatever the
    gradient's spectrum. The update is scaled by sqrt(max(1, rows / cols)) so that tall matrices
    move as much per element as square ones; weight decay is decoupled (p *= 1 - lr * wd), and
    a group's cautious_wd decays only the weights that its update already moves towards zero.
    With polar_express the orthogonalization is polar_express's; with normuon each update then
    gets NorMuon's per-neuron step sizes (every rank computes those for every matrix, from the
    gathered updates, so that all ranks keep the same state).
    The other groups (embeddings, head, scalars) get AdamW with betas (0.8, 0.95) and eps 1e-10.
    Under DDP every rank holds the same averaged gradients and momenta, and orthogonalizes only
    its share of the matrices; the updates are then all-gathered, so that Newton-Schulz's cost
    is split across the ranks rather than repeated on each (modded-nanogpt does the same).
    """

    def __init__(self, params, ns_dtype=torch.bfloat16, polar_express=False, normuon=False):
        defaults = dict(
            lr=0.02,
            use_muon=False,
            momentum=0.95,
            betas=(0.8, 0.95),
            eps=1e-10,
            weight_decay=0.0,
            cautious_wd=0.0,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.polar_express, self.normuon = polar_express, normuon

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon_step(params, group)
            else:
                for p in params:
                    self._adamw_update(p, group, self.state[p])

    def _muon_step(self, params, group):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        shares = muon_shares([p.numel() for p in params], world)
        mine = set(shares[rank])
        updates = {}
        for i, p in enumerate(params):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(p.grad)
            if i in mine:
                direction = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                orthogonalize = polar_express if self.polar_express else newton_schulz
                updates[i] = orthogonalize(direction.to(self.ns_dtype))
        if world > 1:
            updates = self._all_gather_updates(params, shares, [updates[i] for i in shares[rank]])
        for i, p in enumerate(params):
            update = updates[i]
            if self.normuon:
                update = normuon(update, self.state[p])
            update = update.to(p.dtype) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
            # a checkpoint's groups from before cautious weight decay lack it: it was off there
            if group.get("cautious_wd"):
                cautious_weight_decay(p, update, group["lr"] * group["cautious_wd"])
            p.add_(update, alpha=-group["lr"])

    def _all_gather_updates(self, params, shares, mine):
        """Every rank's updates (its share's, flattened into one buffer) on every rank."""
        size = max(sum(params[i].numel() for i in share) for share in shares)
        buffer = torch.zeros(size, dtype=self.ns_dtype, device=params[0].device)
        flat = [u.flatten() for u in mine]
        if flat:
            torch.cat(flat, out=buffer[: sum(len(f) for f in flat)])
        gathered = [torch.empty_like(buffer) for _ in shares]
        dist.all_gather(gathered, buffer)
        updates = {}
        for share, received in zip(shares, gathered):
            offset = 0
            for i in share:
                updates[i] = received[offset : offset + params[i].numel()].view_as(params[i])
                offset += params[i].numel()
        return updates

    def _adamw_update(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1 ** state["step"]
        bias_correction2 = 1.0 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias_correction2).sqrt_().add_(group["eps"])
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)


# -----------------------------------------------------------------------------
# The schedule


def lr_factor(step, max_steps, cooldown_frac, min_lr_ratio):
    """The speedrun's schedule, as a factor of each group's rate: no warmup, constant, then a
    linear cooldown to min_lr_ratio over the last cooldown_frac of the max_steps steps."""
    cooldown_start = max_steps * (1.0 - cooldown_frac)
    if step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start) / max(1e-9, max_steps - cooldown_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def scale_learning_rates(optimizer, factor):
    """Every group at its own rate times factor; returns the first group's (Muon's)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def stage(step, cfg):
    """Which of the STAGES equal parts of the run (cfg) step `step` is in: 0, 1, ... STAGES-1."""
    return min(STAGES - 1, STAGES * step // cfg.max_steps)


def micro_batch(step, cfg):
    """The micro-batch (--B) of step `step` of the run (cfg): with --batch_schedule, about 1/3,
    2/3 and then all of it over the thirds of the run (modded-nanogpt record 46), so that a step
    trains on that part of total_batch_size: early training learns the common patterns, which
    small batches already show, and goes further with more steps on fewer tokens; the rarer
    patterns of later training need the larger batch."""
    if not cfg.batch_schedule:
        return cfg.B
    return max(1, round(cfg.B * (stage(step, cfg) + 1) / STAGES))


def set_learning_rate(optimizer, step, cfg):
    """Every group at its own rate times lr_factor at `step` of the run (cfg) and, under the
    batch schedule, times the root of the part of the batch that the step trains on (as
    modded-nanogpt scales its rates between the batch's stages); returns Muon's."""
    factor = lr_factor(step, cfg.max_steps, cfg.cooldown_frac, cfg.min_lr_ratio)
    return scale_learning_rates(optimizer, factor * (micro_batch(step, cfg) / cfg.B) ** 0.5)


def set_model_schedule(model, step, cfg):
    """What of the model (SpeedrunGPT) changes with the step `step` of the run (cfg): how far
    back its attention sees (set_attention_span) and, with --mtp, the weights of its multi-token
    loss. Without --mtp the weights stay the model's own (1.0,): no copy to the device a step."""
    set_attention_span(model, step, cfg)
    if cfg.mtp:
        set_mtp_weights(model, mtp_weights(step, cfg))


def mtp_weights(step, cfg):
    """The training loss's weights of the next token and of the tokens after it at step `step`
    (MTP_WEIGHTS: three tokens, then two, then one, each stage's last weight falling linearly to
    0 over it); (1.0,), the next token alone, without --mtp."""
    if not cfg.mtp:
        return (1.0,)
    now = stage(step, cfg)
    start, end = MTP_WEIGHTS[now]
    progress = min(1.0, STAGES * step / cfg.max_steps - now)
    return tuple(a + (b - a) * progress for a, b in zip(start, end))


def set_mtp_weights(model, weights):
    """model.mtp_weights = weights: in place while their number is the same, so that a compiled
    model recompiles only when it changes (twice a run)."""
    new = torch.tensor(weights, dtype=model.mtp_weights.dtype)
    if model.mtp_weights.shape == new.shape:
        model.mtp_weights.copy_(new)
    else:
        model.mtp_weights = new.to(model.mtp_weights.device)


def set_attention_span(model, step, cfg):
    """How far back the attention of step `step` of the run (cfg) sees.

    With --sliding_window W, its window is W tokens at the start, growing linearly to the whole
    block_size at max_steps, in WINDOW_STEP steps (modded-nanogpt record 12): early training
    needs only local context, and short windows are cheaper. With --seq_schedule, the first third
    of the run also cuts each training row into independent contexts of T/2 tokens (as record 72
    trains on shorter sequences first), in the same tokens per step."""
    start, full = cfg.sliding_window, model.config.block_size
    model.context = max(1, cfg.T // 2) if cfg.seq_schedule and stage(step, cfg) == 0 else full
    if not start:
        model.window = full
        return
    grown = start + (full - start) * min(1.0, step / cfg.max_steps)
    model.window = min(full, WINDOW_STEP * math.ceil(grown / WINDOW_STEP))
