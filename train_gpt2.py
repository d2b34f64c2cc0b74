"""
Reproduce GPT-2 (124M) from scratch: the model, the data loader and the training loop in one file.

On a fresh machine with no FineWeb shards this trains a small model on the bundled public-domain
corpus in a few minutes on a CPU. With shards from `python fineweb.py` in edu_fineweb10B/, the
defaults are the GPT-2 124M reproduction (10B tokens, 19073 steps of 2**19 tokens).

    python train_gpt2.py                                     # CPU, Apple MPS or one GPU
    python train_gpt2.py --max_steps 50 --B 16 --T 512       # any setting: see --help
    python train_gpt2.py --recipe speedrun                   # the modern recipe (README)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # one node, 8 GPUs
    # several nodes: run on every node, with its own --node_rank and the first node's address
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 train_gpt2.py
    python train_gpt2.py --resume latest                     # continue from the newest checkpoint
"""

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
EOT = 50256  # <|endoftext|>: separates (and begins) every document

# -----------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    recipe: str = "gpt2"  # or "speedrun": the modern architecture (README, "The speedrun recipe")


# The four sizes OpenAI released (GPT-2 paper, table 2); all share block_size and vocab_size.
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
RECIPES = ("gpt2", "speedrun")
# The speedrun recipe's architecture (modded-nanogpt's NanoGPT speedrun, 2024-2025): with q and k
# RMS-normalized, a fixed attention temperature of 0.12 trains better than 1/sqrt(head_dim), and
# logits soft-capped by 15 * tanh(logits / 15) keep the early steps stable (Gemma 2 does the same).
SPEEDRUN_ATTN_SCALE = 0.12
SPEEDRUN_SOFTCAP = 15.0
ROPE_BASE = 10000  # RoFormer's


def rms_norm(x):
    """RMSNorm (Zhang & Sennrich 2019) without a learned gain: the speedrun recipe's only norm."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer, arXiv 2104.09864): channel pair i of a head is rotated
    by the angle position * base^(-2i / head_size), so that q.k depends on the distance between two
    positions and not on where they are. Replaces the learned wpe of GPT-2."""

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


class KVCache:
    """The keys and values of every layer during generation, preallocated to max_len positions,
    with the attention mask of the rows: a row's left padding is never attended to."""

    def __init__(self, pad, max_len):
        self.pad = pad  # (B,) left-padding tokens of each row
        self.max_len = max_len
        self.length = 0  # positions already filled
        self.k, self.v = {}, {}  # layer -> (B, n_head, max_len, head_size)
        self.mask = None  # (B, 1, T, length + T), set by GPT.forward for the T new positions

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.speedrun = config.recipe == "speedrun"
        bias = not self.speedrun  # the speedrun's linear layers have no biases (as PaLM's)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # its slot in a KVCache
        self.scale = SPEEDRUN_ATTN_SCALE if self.speedrun else None  # None: 1/sqrt(head_size)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): the heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.speedrun:
            # QK-norm (Dehghani et al. 2023): unit-RMS queries and keys bound the attention logits
            q, k = apply_rotary(rms_norm(q), rope), apply_rotary(rms_norm(k), rope)
        if cache is None:
            y = self.attend(q, k, v)
        else:
            k, v = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def attend(self, q, k, v):
        # flash attention on GPU: the (T, T) attention matrix is never materialized in memory
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.speedrun = config.recipe == "speedrun"
        bias = not self.speedrun
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        x = self.c_fc(x)
        # the speedrun's ReLU squared (Primer, arXiv 2109.08668): cheaper than GELU, and better
        x = F.relu(x).square() if self.speedrun else self.gelu(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.speedrun = config.recipe == "speedrun"
        # the speedrun's norms have no weights: no modules
        self.ln_1 = None if self.speedrun else nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = None if self.speedrun else nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        # pre-LayerNorm (GPT-2 paper, section 2.3): the residual stream itself is never normalized
        norm_1 = rms_norm if self.speedrun else self.ln_1
        norm_2 = rms_norm if self.speedrun else self.ln_2
        x = x + self.attn(norm_1(x), rope, cache)
        x = x + self.mlp(norm_2(x))
        return x


# Hugging Face's GPT-2 implements these as Conv1D layers, which store weights as (in, out);
# nn.Linear stores (out, in), so they are transposed on the way in and out.
HF_CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# older transformers versions keep the causal mask in the state dict: buffers, not weights
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def load_hf_gpt2(name_or_path):
    """A transformers GPT2LMHeadModel: OpenAI's (by preset name, from the hub) or a local dir."""
    if name_or_path not in GPT2_PRESETS and not os.path.isdir(name_or_path):
        raise SystemExit(
            f"unknown model {name_or_path!r}: expected one of {', '.join(GPT2_PRESETS)} "
            "or a local Hugging Face GPT-2 directory"
        )
    from transformers import GPT2LMHeadModel  # heavy import, only this path needs it

    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # offline without a cached copy, or not GPT-2 files
        first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise SystemExit(
            f"could not load {name_or_path!r} with transformers: {first_line}"
        ) from None


class NonFiniteLogits(Exception):
    """Generation met NaN or infinite logits: the model has diverged."""


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.speedrun = config.recipe == "speedrun"
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                # rotary embeddings, not learned positions, in the speedrun
                wpe=None if self.speedrun else nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=None if self.speedrun else nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if self.speedrun:
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        else:
            # weight tying (Press & Wolf 2017), as in GPT-2: the token embedding is the output layer
            self.transformer.wte.weight = self.lm_head.weight
        self.softcap = SPEEDRUN_SOFTCAP if self.speedrun else None
        self.fused_loss = False  # train_gpt2.py --fused_loss: see linear_cross_entropy
        self.apply(self._init_weights)
        if self.speedrun:
            # zero-initialized projections into the residual stream and head (modded-nanogpt):
            # every block starts as the identity, and the first logits are uniform
            for block in self.transformer.h:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, module):
        # GPT-2's init: normal(0, 0.02) weights, zero biases; each block adds to the residual stream
        # twice, so the projections into it are scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, 2.3)
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """(logits, loss). With a KVCache, idx continues the cached rows and only the last
        position's logits are computed; with fused_loss and targets, logits are None."""
        x = self.hidden(idx, cache)
        if cache is not None:
            x = x[:, -1:]  # generation needs the next token only
        if targets is not None and self.fused_loss:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.softcap)
        logits = self.head(x)
        loss = None
        if targets is not None:
            # over the whole padded vocabulary, as in the lecture: the model learns in a few
            # steps to push the never-seen padded ids down, and losses match the reference's
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden(self, idx, cache=None):
        """The final (normalized) hidden state of every position: (B, T, n_embd)."""
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
            )
        if cache is None:
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        else:
            pos = cache.positions(T)
            cache.prepare(T)
        x = self.transformer.wte(idx)
        rope = None
        if self.speedrun:
            x = rms_norm(x)
            rope = self.rotary(pos)
        else:
            x = x + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.length += T
        return rms_norm(x) if self.speedrun else self.transformer.ln_f(x)

    def head(self, x):
        """Logits from hidden states (..., n_embd): the lm_head, soft-capped in the speedrun."""
        logits = self.lm_head(x)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        generator=None,
        stop_token=None,
    ):
        """Continue each prompt by up to max_new_tokens tokens, with a key/value cache.

        idx is a (B, T) token tensor or a list of token lists of any lengths (left-padded inside).
        Returns a list of token lists: each prompt followed by its new tokens, which end early at
        stop_token (included). Runs under the caller's autocast, if any.
        """
        prompts = idx.tolist() if torch.is_tensor(idx) else [list(p) for p in idx]
        rows = [list(p) for p in prompts]
        for tokens in self.stream(
            prompts, max_new_tokens, temperature, top_k, top_p, generator, stop_token
        ):
            for row, token in zip(rows, tokens):
                if token is not None:
                    row.append(token)
        return rows

    @torch.no_grad()
    def stream(
        self,
        prompts,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        generator=None,
        stop_token=None,
    ):
        """Generate one token per step for every prompt (token lists); yields the list of each
        row's new token, None for a row that has reached stop_token. The prompts are run once
        through the model, then each step runs only the newest token of every row."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"a prompt of {width} tokens and {max_new_tokens} new tokens exceed the model's "
                f"context of {self.config.block_size} tokens"
            )
        device = self.lm_head.weight.device
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        idx = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
        cache = KVCache(pad, width + max_new_tokens)
        n_vocab = min(self.config.vocab_size, GPT2_VOCAB_SIZE)  # never a padded id
        done = [False] * len(prompts)
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            next_tokens = sample_next(logits[:, -1, :n_vocab], temperature, top_k, top_p, generator)
            tokens = next_tokens.tolist()
            yield [None if d else t for d, t in zip(done, tokens)]
            done = [d or t == stop_token for d, t in zip(done, tokens)]
            if all(done) or i == max_new_tokens - 1:
                return
            logits, _ = self(next_tokens.unsqueeze(1), cache=cache)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load OpenAI's GPT-2 weights (a preset name) or a local Hugging Face GPT-2 directory."""
        hf_model = load_hf_gpt2(name_or_path)
        hf = hf_model.config
        # our blocks implement exactly this variant of GPT-2; refuse checkpoints that differ
        if (
            hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh")
            or (hf.n_inner or 4 * hf.n_embd) != 4 * hf.n_embd
            or hf.layer_norm_epsilon != 1e-5
            or not hf.scale_attn_weights
            or hf.scale_attn_by_inverse_layer_idx
        ):
            raise SystemExit(f"{name_or_path!r} is a GPT-2 variant this model does not implement")
        config = GPTConfig(
            block_size=hf.n_positions,
            vocab_size=hf.vocab_size,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=hf.n_embd,
        )
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(HF_MASK_BUFFERS)}
        if set(sd_hf) != set(sd):
            missing = sorted(set(sd) ^ set(sd_hf))
            raise SystemExit(f"{name_or_path!r} does not hold GPT-2 weights: {missing[:3]} differ")
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type, log=print, fused=None):
        """AdamW, weight decay on matmul weights and embeddings only (GPT-3 paper, appendix B)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm gains
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        log(
            f"decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} "
            f"parameters; non-decayed: {len(no_decay)}, with "
            f"{sum(p.numel() for p in no_decay):,} parameters"
        )
        # the fused kernel updates all parameters in a few launches instead of one per tensor
        if fused is None:
            fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def configure_speedrun_optimizer(self, cfg, ns_dtype, log=print):
        """Muon for the blocks' matrices; AdamW (betas 0.8, 0.95) for the embedding and the head,
        each with its own learning rate (modded-nanogpt's choices, scaled by cfg)."""
        matrices = [p for block in self.transformer.h for p in block.parameters()]
        assert all(p.dim() == 2 for p in matrices), "speedrun blocks hold matrices only"
        groups = [
            dict(params=matrices, use_muon=True, lr=cfg.muon_lr, weight_decay=cfg.muon_wd),
            dict(params=[self.transformer.wte.weight], lr=cfg.embed_lr),
            dict(params=[self.lm_head.weight], lr=cfg.head_lr),
        ]
        for group in groups:
            group["initial_lr"] = group["lr"]  # the schedule scales every group's own rate
        log(
            f"Muon: {len(matrices)} matrices with {sum(p.numel() for p in matrices):,} parameters; "
            f"AdamW: embedding and head, {2 * self.lm_head.weight.numel():,} parameters"
        )
        return Muon(groups, ns_dtype=ns_dtype)


def linear_cross_entropy(x, weight, targets, softcap=None, chunk_rows=8192):
    """F.cross_entropy(x @ weight.T, targets) without the (rows, vocab) logits tensor.

    The logits exist for chunk_rows rows at a time: their loss and their gradients (softmax minus
    one-hot) are computed together in the forward pass, and the gradients of x and weight are
    kept for backward. For GPT-2 124M at B=64, T=1024, the full logits are 13GB in float32.
    Under autocast the matmuls run in its dtype, as nn.Linear's would.
    """
    x = x.reshape(-1, x.size(-1))
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), softcap, chunk_rows)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_rows):
        n = x.size(0)
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 logits upcast: F.cross_entropy
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        loss = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, n, chunk_rows):
            xc, yc = x[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = (xc @ weight.t()).to(acc)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss += (lse.squeeze(1) - logits.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            # d(mean loss) / d(logits) = (softmax - one_hot) / n
            grad = logits.sub_(lse).exp_()
            grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0
            grad /= n
            if softcap:
                grad *= 1.0 - capped * capped  # through softcap * tanh(z / softcap)
            grad = grad.to(x.dtype)
            grad_x[start : start + chunk_rows] = grad @ weight
            grad_weight += (grad.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


# FP8 matmuls (--fp8): the blocks' four linear layers multiply in 8-bit floats while training.
# An H100 multiplies fp8 at twice its bf16 rate. Weights and activations are rounded to e4m3
# (more mantissa), gradients to e5m2 (more range), as in "FP8 Formats for Deep Learning"
# (Micikevicius et al. 2022); each tensor is scaled by its own largest magnitude first, so that
# it uses the format's whole range. The weights stay in float32; only the products are fp8.
FP8_WEIGHTS = torch.float8_e4m3fn
FP8_GRADIENTS = torch.float8_e5m2


def to_fp8(x, dtype):
    """(x / scale in fp8, scale): scale maps x's largest magnitude onto the format's largest."""
    top = torch.finfo(dtype).max
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / top
    return (x.float() / scale).clamp(-top, top).to(dtype), scale


def fp8_matmul(a, b, scale_a, scale_b, out_dtype):
    """(a * scale_a) @ (b * scale_b) in fp32 sums. cuBLAS multiplies fp8 only with a row-major
    and b column-major (and sizes that are multiples of 16): they are copied so where not."""
    a, b = a.contiguous(), b.t().contiguous().t()
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


class FP8Matmul(torch.autograd.Function):
    """x @ weight.T with the forward's operands in e4m3 and the gradient in e5m2; backward
    reuses the forward's fp8 copies, which are all it keeps (a quarter of float32's memory)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_scale = to_fp8(x.reshape(-1, x.size(-1)), FP8_WEIGHTS)
        w8, w_scale = to_fp8(weight, FP8_WEIGHTS)
        out = fp8_matmul(x8, w8.t(), x_scale, w_scale, out_dtype)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.x_dtype, ctx.x_shape, ctx.weight_dtype = x.dtype, x.shape, weight.dtype
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        g8, g_scale = to_fp8(grad.reshape(-1, grad.size(-1)), FP8_GRADIENTS)
        grad_x = fp8_matmul(g8, w8, g_scale, w_scale, ctx.x_dtype)
        grad_weight = fp8_matmul(g8.t(), x8, g_scale, x_scale, torch.float32)
        return grad_x.view(ctx.x_shape), grad_weight.to(ctx.weight_dtype), None


class FP8Linear(nn.Linear):
    """nn.Linear whose matmul is FP8Matmul where gradients are computed (training); under
    no_grad (validation, HellaSwag, sampling) it is the plain layer, in the autocast dtype."""

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        device = x.device.type
        on = torch.is_autocast_enabled(device)
        y = FP8Matmul.apply(x, self.weight, torch.get_autocast_dtype(device) if on else x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_fp8_matmuls(model):
    """Make the linear layers of every block FP8Linear (the embedding and lm_head stay as they
    are): the same parameters, so checkpoints do not change."""
    for block in model.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            layer.__class__ = FP8Linear


def fp8_hardware(device):
    """Whether the device multiplies FP8 natively: CUDA GPUs of compute capability 8.9 and
    newer (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device):
    """--fp8 runs on FP8 hardware, and on the CPU, where torch emulates FP8 matmuls (slower than
    float32: for tests)."""
    if torch.device(device).type != "cpu" and not fp8_hardware(device):
        raise SystemExit(
            f"--fp8: {device} has no FP8 matmuls (CUDA GPUs of compute capability 8.9+ have: "
            "H100, H200, L4, RTX 40xx)"
        )


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token of every row from its (B, vocab) logits: the most likely one at
    temperature 0, else one drawn from softmax(logits / temperature) restricted to the top_k
    likeliest tokens and to the smallest set of them whose probability reaches top_p."""
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("the model's logits are not finite")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
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


def flops_per_token(config, T):
    """Training FLOPs per token: 6N + 12 L H Q T (PaLM paper, appendix B).

    N counts the parameters that take part in matmuls: all but the position embedding (the tied
    token embedding is the lm_head). 12 L H Q T is the attention's QK^T and AV, forward and back.
    The speedrun model has no biases and no norm gains, and its lm_head is the one matrix of its
    untied embeddings that is multiplied.
    """
    d, L = config.n_embd, config.n_layer
    if config.recipe == "speedrun":
        n_params = config.vocab_size * d + L * 12 * d * d
    else:
        n_params = config.vocab_size * d + L * (12 * d * d + 13 * d) + 2 * d
    return 6 * n_params + 12 * L * d * T


# Dense bf16 (fp16 for pre-Ampere) tensor-core peaks from the vendors' data sheets, in FLOP/s;
# the first name that occurs in torch.cuda.get_device_name() wins.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device):
    """The device's peak bf16 FLOP/s, or None where we do not know it (CPUs, unlisted GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def mfu(config, T, tokens_per_sec, peak):
    """Model FLOPs utilization: the training FLOP/s achieved, as a fraction of the peak."""
    return flops_per_token(config, T) * tokens_per_sec / peak


# -----------------------------------------------------------------------------
# Tokenizer and data

TOKENIZER_PATH = os.path.join(HERE, "data", "gpt2.tiktoken")
# tiktoken's r50k_base ranks: the GPT-2 BPE byte for byte
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py): contractions, letters, digits, other
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


@functools.cache
def get_tokenizer():
    """The GPT-2 tokenizer from the BPE ranks shipped in data/, so it never needs the network."""
    try:
        with open(TOKENIZER_PATH, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SystemExit(
            f"tokenizer file {TOKENIZER_PATH} is missing: restore it from git"
        ) from None
    if hashlib.sha256(raw).hexdigest() != TOKENIZER_SHA256:
        raise SystemExit(f"tokenizer file {TOKENIZER_PATH} is corrupt (sha256 mismatch)")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


# llm.c / modded-nanogpt shards: 256 int32 header (magic, version, token count), then uint16 tokens
LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_INTS = 256
# atomic_open's temporary files: .{name}.{pid}.tmp beside the file being written
TEMPORARY_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a file for writing that appears under `path` only once it is complete.

    It is written under a temporary name in the same directory, flushed to disk, then renamed
    (an atomic step): a crash or kill at any moment leaves either the old file or the new one,
    never half of one. Used for shards, checkpoints and logs.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory, names):
    """Delete atomic_open's temporary files of the given names left by killed processes (a
    SIGKILL during a save leaves one as large as the checkpoint), never those of a live one."""
    for entry in os.listdir(directory):
        m = TEMPORARY_FILE.match(entry)
        if m and re.fullmatch(names, m["name"]) and not process_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, entry))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def write_shard(path, tokens):
    """Write a 1-D uint16 token array atomically, as .npy or (by extension) llm.c .bin."""
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    with atomic_open(path) as f:
        if path.endswith(".bin"):
            header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.tobytes())
        else:
            np.save(f, tokens)


def open_shard(path):
    """Memory-map a shard (.npy uint16 array or llm.c .bin) without reading it into RAM."""
    try:
        return _open_shard(path)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the shard ({e.strerror or e})") from None


def _open_shard(path):
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS)
        if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
            raise SystemExit(f"{path}: not an llm.c token shard (magic number is not {LLMC_MAGIC})")
        if header[1] != LLMC_VERSION:
            raise SystemExit(f"{path}: unsupported llm.c shard version {header[1]}")
        ntok = int(header[2])
        expected = 4 * LLMC_HEADER_INTS + 2 * ntok
        if os.path.getsize(path) != expected:
            raise SystemExit(
                f"{path}: header says {ntok} tokens but the file has "
                f"{os.path.getsize(path)} bytes, not {expected}"
            )
        if ntok == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(
            path, dtype=np.uint16, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(ntok,)
        )
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, EOFError) as e:
        raise SystemExit(f"{path}: not a readable .npy token shard ({e})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise SystemExit(
            f"{path}: shards must be 1-D uint16 token arrays, this one is {tokens.ndim}-D "
            f"{tokens.dtype}"
        )
    return tokens


def list_shards(data_dir, split):
    """Shard files of a split, in name order: the .npy and .bin files that have the split as a
    whole field of their name (fields are separated by _ . or -: fineweb_val_000000.bin)."""
    if not os.path.isdir(data_dir):
        return []
    try:
        names = os.listdir(data_dir)
    except OSError as e:
        raise SystemExit(f"cannot list {data_dir}: {e.strerror or e}") from None
    names = sorted(
        n
        for n in names
        if n.endswith((".npy", ".bin")) and not n.startswith(".") and split in re.split(r"[_.-]", n)
    )
    return [os.path.join(data_dir, n) for n in names]


def shard_fingerprint(paths):
    """A cheap identity of a set of shards: their names and sizes and the first and last KB of
    each. A resumed run refuses other shards: its position in them would mean other data."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1024)
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
        digest.update(f"{os.path.basename(path)}:{size}:".encode() + head + tail)
    return digest.hexdigest()[:16]


def recorded_max_tokens(data_dir):
    """{shard name: (bytes, largest token id)} from fineweb.py's manifest, where it has one."""
    try:
        with open(os.path.join(data_dir, "manifest.json")) as f:
            shards = json.load(f).get("shards", [])
        return {s["name"]: (s["bytes"], s["max_token"]) for s in shards if "max_token" in s}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


class DataLoaderLite:
    """Batches of B sequences of T tokens from token shards, split across processes.

    The stream is cut into sequences of T + 1 tokens that overlap by one (inputs and their
    next-token targets); sequence i of a shard starts at token i * T, so with shuffle off a batch
    is the contiguous B * T + 1 tokens of the lecture's loader. Each optimizer micro-step the whole
    world takes the next B * num_processes sequences and rank r gets the r-th B of them; batches
    run across shard boundaries, so no rank skips a shard's tail. With shuffle on, every epoch
    visits the shards and the sequences within each shard in a fresh order drawn from
    (seed, epoch), so neither the world size nor B changes which data a step sees.

    Every token id is checked against the vocabulary when the loader is made, not hours into a
    run: from fineweb.py's manifest where it records them, else by a scan of the memory-mapped
    shards, each rank scanning every num_processes-th.
    """

    def __init__(
        self,
        B,
        T,
        process_rank,
        num_processes,
        split,
        data_dir,
        shuffle=False,
        seed=1337,
        vocab_size=GPT2_VOCAB_SIZE,
    ):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.paths = list_shards(data_dir, split)
        if not self.paths:
            raise SystemExit(
                f"no {split} shards (.npy or .bin files with '{split}' in the name) in {data_dir}"
            )
        self.shards = [open_shard(p) for p in self.paths]
        self.num_sequences = [(len(s) - 1) // T if len(s) > 0 else 0 for s in self.shards]
        if sum(self.num_sequences) == 0:
            raise SystemExit(
                f"the {split} shards in {data_dir} hold fewer than T + 1 = {T + 1} tokens"
            )
        self.fingerprint = shard_fingerprint(self.paths)
        self.check_token_ids(recorded_max_tokens(data_dir), vocab_size)
        self.reset()

    def check_token_ids(self, recorded, vocab_size):
        for i, (path, shard) in enumerate(zip(self.paths, self.shards)):
            name, size = os.path.basename(path), os.path.getsize(path)
            if name in recorded and recorded[name][0] == size:
                top = recorded[name][1]
            elif i % self.num_processes == self.process_rank:
                top = int(shard.max()) if len(shard) else 0
            else:
                continue
            if top >= vocab_size:
                raise SystemExit(
                    f"{path}: token id {top} is outside the vocabulary (< {vocab_size})"
                )

    def reset(self):
        self.load_state_dict(self.state_at(epoch=0))

    def state_at(self, epoch, shard_pos=0, seq_pos=0):
        return {
            "epoch": epoch,
            "shard_pos": shard_pos,
            "seq_pos": seq_pos,
            "T": self.T,
            "num_shards": len(self.shards),
            "data": self.fingerprint,
        }

    def state_dict(self):
        # the world's position in the stream, the same on every rank
        return self.state_at(self.epoch, self.shard_pos, self.seq_pos)

    def load_state_dict(self, state):
        if state["T"] != self.T or state["num_shards"] != len(self.shards):
            raise SystemExit(
                f"data loader state is for T={state['T']} over {state['num_shards']} shards; this "
                f"run has T={self.T} over {len(self.shards)} shards"
            )
        if state.get("data") != self.fingerprint:
            raise SystemExit(
                "the shards differ from those the checkpoint was trained on (names, sizes or "
                "contents): resume with the same data, or pass --resume_allow_new_data 1 to "
                "start the new data from its beginning"
            )
        self.epoch, self.shard_pos, self.seq_pos = (
            state["epoch"],
            state["shard_pos"],
            state["seq_pos"],
        )
        self._start_epoch(self.epoch)

    def _start_epoch(self, epoch):
        self.epoch = epoch
        n = len(self.shards)
        self.shard_order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        self._enter_shard()

    def _rng(self, *key):
        return np.random.default_rng([self.seed, *key])

    def _enter_shard(self):
        shard = int(self.shard_order[self.shard_pos])
        self.shard = shard
        n = self.num_sequences[shard]
        self.seq_order = self._rng(self.epoch, shard + 1).permutation(n) if self.shuffle else None

    def _advance(self, n):
        """Move the cursor n sequences forward, into the next shard and epoch as needed."""
        while n > 0:
            left = self.num_sequences[self.shard] - self.seq_pos
            if n < left:
                self.seq_pos += n
                return
            n -= left
            self._next_shard()

    def _next_shard(self):
        self.seq_pos = 0
        self.shard_pos += 1
        if self.shard_pos == len(self.shards):
            self.shard_pos = 0
            self._start_epoch(self.epoch + 1)
        else:
            self._enter_shard()

    def _take(self, n):
        rows = []
        while len(rows) < n:
            if self.seq_pos == self.num_sequences[self.shard]:
                self._next_shard()
                continue
            i = self.seq_pos if self.seq_order is None else int(self.seq_order[self.seq_pos])
            rows.append(self.shards[self.shard][i * self.T : (i + 1) * self.T + 1])
            self.seq_pos += 1
        return np.stack(rows)

    def next_batch(self):
        self._advance(self.B * self.process_rank)
        buf = torch.from_numpy(self._take(self.B).astype(np.int64))
        self._advance(self.B * (self.num_processes - self.process_rank - 1))
        x = buf[:, :-1].contiguous()  # inputs
        y = buf[:, 1:].contiguous()  # targets: the next token at every position
        return x, y


# The bundled public-domain texts (Canterbury corpus) for a first run with no download.
# `--data_dir bundled` names them in flags and checkpoints, wherever the project is checked out.
BUNDLED = "bundled"
CORPUS_DIR = os.path.join(HERE, "data", "corpus")
EMBEDDED_DATA_DIR = os.path.join(HERE, "data", "corpus_shards")
EMBEDDED_VAL_FRACTION = 0.1  # the last tenth of every text is held out for validation


def prepare_embedded_corpus(out_dir=EMBEDDED_DATA_DIR, corpus_dir=CORPUS_DIR):
    """Tokenize the bundled texts into one val and one train shard, once; later calls reuse them.

    Every text gives a train document (its first 90%) and a val document (the rest, cut at a line
    break), each starting with <|endoftext|>. A manifest of the inputs' hashes detects staleness.
    """
    texts = sorted(n for n in os.listdir(corpus_dir) if n.endswith(".txt"))
    digest = hashlib.sha256(TOKENIZER_SHA256.encode() + str(EMBEDDED_VAL_FRACTION).encode())
    for name in texts:
        with open(os.path.join(corpus_dir, name), "rb") as f:
            digest.update(name.encode() + hashlib.sha256(f.read()).digest())
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get("sha256") == digest.hexdigest():
                return out_dir
    enc = get_tokenizer()
    splits = {"train": [], "val": []}
    for name in texts:
        with open(os.path.join(corpus_dir, name), encoding="utf-8") as f:
            text = f.read()
        cut = text.find("\n", int(len(text) * (1 - EMBEDDED_VAL_FRACTION)))
        cut = len(text) if cut < 0 else cut + 1
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            splits[split].extend([EOT] + enc.encode_ordinary(part))
    try:
        os.makedirs(out_dir, exist_ok=True)
        for i, split in enumerate(("val", "train")):
            path = os.path.join(out_dir, f"corpus_{split}_{i:06d}.npy")
            write_shard(path, np.array(splits[split], np.uint16))
        tokens = {split: len(ids) for split, ids in splits.items()}
        with atomic_open(manifest_path, "w") as f:  # written last: it marks the shards complete
            json.dump({"sha256": digest.hexdigest(), "texts": texts, "tokens": tokens}, f)
    except OSError as e:
        raise SystemExit(
            f"cannot write the bundled corpus's token shards to {out_dir}: {e.strerror or e}"
        ) from None
    return out_dir


# -----------------------------------------------------------------------------
# Optimizer and schedule


def newton_schulz(G, steps=5):
    """An approximately orthogonal matrix near G: its singular values moved to about 1 (within
    roughly 0.7-1.2), its singular vectors kept, by a quintic Newton-Schulz iteration.

    Each step maps every singular value s to a s + b s^3 + c s^5; these coefficients (from the
    Muon write-up, Jordan et al. 2024) pull all of [0, 1] quickly towards 1 at the cost of not
    converging exactly, which Muon does not need. Runs in G's dtype.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)  # singular values <= 1: the iteration's range
    transposed = X.size(0) > X.size(1)
    if transposed:  # X @ X.T is then the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


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
    move as much per element as square ones; weight decay is decoupled (p *= 1 - lr * wd).
    The other groups (embedding, head) get AdamW with betas (0.8, 0.95) and eps 1e-10.
    Under DDP every rank holds the same averaged gradients and momenta, and orthogonalizes only
    its share of the matrices; the updates are then all-gathered, so that Newton-Schulz's cost
    is split across the ranks rather than repeated on each (modded-nanogpt does the same).
    """

    def __init__(self, params, ns_dtype=torch.bfloat16):
        defaults = dict(
            lr=0.02, use_muon=False, momentum=0.95, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

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
                updates[i] = newton_schulz(direction.to(self.ns_dtype))
        if world > 1:
            updates = self._all_gather_updates(params, shares, [updates[i] for i in shares[rank]])
        for i, p in enumerate(params):
            update = updates[i].to(p.dtype) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
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


def get_lr(step, cfg):
    """Linear warmup to max_lr, cosine decay to min_lr at max_steps, min_lr after (GPT-3 paper)."""
    max_lr = cfg.max_lr
    min_lr = max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps  # step 0 trains too, so it is not lr 0
    if step >= cfg.max_steps:
        return min_lr
    decay_ratio = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def speedrun_lr_factor(step, cfg):
    """The speedrun's schedule, as a factor of each group's rate: no warmup, constant, then a
    linear cooldown to min_lr_ratio over the last cooldown_frac of the steps."""
    cooldown_start = cfg.max_steps * (1.0 - cfg.cooldown_frac)
    if step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start) / max(1e-9, cfg.max_steps - cooldown_start))
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


def set_learning_rate(optimizer, step, cfg):
    """Set every parameter group's learning rate for this step; returns the first group's."""
    for group in optimizer.param_groups:
        if cfg.recipe == "speedrun":
            group["lr"] = group["initial_lr"] * speedrun_lr_factor(step, cfg)
        else:
            group["lr"] = get_lr(step, cfg)
    return optimizer.param_groups[0]["lr"]


def grad_accum_steps_at(tokens_seen, cfg, world_size):
    """Micro-steps per optimizer step. With the GPT-3 batch-size ramp (GPT-3 paper, appendix B)
    the batch grows linearly from batch_ramp_start to total_batch_size tokens over the first
    batch_ramp_tokens tokens, rounded down to whole micro-batches of the world."""
    micro = cfg.B * cfg.T * world_size
    full = cfg.total_batch_size // micro
    if cfg.batch_ramp_tokens <= 0 or tokens_seen >= cfg.batch_ramp_tokens:
        return full
    frac = tokens_seen / cfg.batch_ramp_tokens
    batch = cfg.batch_ramp_start + (cfg.total_batch_size - cfg.batch_ramp_start) * frac
    return max(1, min(full, int(batch) // micro))


# -----------------------------------------------------------------------------
# Devices and distributed setup


@dataclass
class DistEnv:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    master_process: bool
    # gloo group for the small collectives that decide things on the host (stop requests, whether
    # every rank's start-up worked): they never wait for the GPU. None: the default group.
    cpu_group: object = None

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def print0(self, *args, **kwargs):
        if self.master_process:
            try:
                print(*args, **kwargs, flush=True)
            except OSError:  # its reader left (`| head`) or its terminal closed: the run stops
                discard_stdout()  # on the SIGPIPE or SIGHUP that came with it (StopSignal)


def discard_stdout():
    """Send what is still to be printed to /dev/null: stdout's pipe or terminal is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def quiet_exit_when_stdout_closes():
    """`python script.py | head`: once head has its lines and leaves, exit as `cat` would, with
    SIGPIPE's status 141 and no traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        raise SystemExit(141) from None


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_dtype(requested, device_type):
    """bf16 where the hardware has it, fp16 (with loss scaling) on older GPUs, else fp32."""
    if requested != "auto":
        return getattr(torch, requested)
    if device_type == "cuda":
        # V100 and T4 (compute capability < 8) have no bf16 tensor cores
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    if device_type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16():
    """CPUs with AVX512-BF16 (or AMX) run bf16 matmuls 3-4x faster than fp32 ones."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_context(dtype, device_type):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def synchronize(device):
    """Wait until the device has done its queued work (CUDA and MPS run asynchronously): step
    times are measured after it."""
    device = str(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def keep_freed_cpu_memory():
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default every freed block over 32MB goes back to the OS, so a CPU step that allocates
    hundreds of MB of logits page-faults all of them in afresh: measured on a 2-core CPU, that
    made the default run's steps three times slower. Linux (glibc) only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not from fresh mmaps
    libc.mallopt(M_TRIM_THRESHOLD, 2**62)  # never shrink the heap
    libc.mallopt(M_TOP_PAD, 2**30)  # grow it in 1GB steps


def setup_distributed(device=""):
    """One process per device under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), else one."""
    device = device or default_device()
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.split(":")[0]):
        usable = ", ".join(k for k, ok in available.items() if ok)
        raise SystemExit(f"--device {device} is not available on this machine (it has: {usable})")
    if "RANK" not in os.environ:
        return DistEnv(False, 0, 0, 1, device, True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    cpu_group = None
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
        cpu_group = dist.new_group(backend="gloo")
    elif device == "cpu":
        dist.init_process_group(backend="gloo")
    else:
        raise SystemExit(f"distributed training needs cuda (nccl) or cpu (gloo), not {device}")
    return DistEnv(True, rank, local_rank, world_size, device, rank == 0, cpu_group)


def all_reduce_mean(value, env):
    """Average a tensor over the ranks, in place (a sum and a division: gloo has no AVG)."""
    if env.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def agree(env, action):
    """Run action() on this rank, then agree with every rank on how it went: its result if it
    worked on all of them, else SystemExit on all of them with the message of the lowest rank
    that failed, printed once per node. A rank that acts alone on local state (a download, a
    file, a parse) thus never leaves the others waiting in a collective."""
    error, result = None, None
    try:
        result = action()
    except SystemExit as e:
        error = str(e.code)
    if env.ddp:
        errors = [None] * env.world_size
        dist.all_gather_object(errors, error, group=env.cpu_group)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise SystemExit(error if env.local_rank == 0 else 1)
    return result


class StopNow(BaseException):
    """A stop request that cannot wait: nothing is lost by stopping at once."""

    def __init__(self, signum, why):
        super().__init__(why)
        self.signum = signum


class StopSignal:
    """SIGTERM and SIGINT (preemption, Ctrl-C) while training; also SIGPIPE (stdout's reader has
    gone: `python train_gpt2.py | head`) and SIGHUP (its terminal closed), unless the run was
    started to ignore it (`nohup`). The run stops for them as if preempted.

    Until a step of this run has completed, a stop loses nothing: the run stops at once (even in
    the middle of torch.compile). After, the signal is remembered, and the run asks for it with
    requested() between micro-steps, evaluation batches and samples and before checkpoints, then
    saves the last completed step and exits. A second Ctrl-C stops at once.
    """

    SIGNALS = tuple(
        getattr(signal, name)
        for name in ("SIGTERM", "SIGINT", "SIGPIPE", "SIGHUP")
        if hasattr(signal, name)  # Windows has neither SIGPIPE nor SIGHUP
    )

    def __init__(self, env):
        self.env = env
        self.signum = 0
        self.deferred = False  # whether a signal waits for the run to save

    def __enter__(self):
        # nohup starts a run with SIGHUP ignored: it is meant to outlive its terminal
        nohup = hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signals = [s for s in self.SIGNALS if not (nohup and s == signal.SIGHUP)]
        self.previous = {s: signal.signal(s, self._handler) for s in signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferred:
            raise StopNow(signum, f"stopped by {name} before the first step: nothing to save")
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise StopNow(signum, "stopped at once by a second Ctrl-C, without saving")
        self.signum = signum

    def defer(self):
        """From now on a signal waits for the run to save its state."""
        self.deferred = True

    def requested(self):
        """The signal every rank agrees to stop for, or 0. Under DDP a collective (on the CPU
        group): every rank calls it at the same points."""
        signum = self.signum
        if self.env.ddp:
            flag = torch.tensor(signum)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.env.cpu_group)
            signum = int(flag)
        return signum


# -----------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def evaluate_val_loss(model, loader, steps, env, autocast, should_stop=None):
    """Mean loss over the first `steps` micro-batches of every rank, averaged over ranks; None if
    should_stop() said so between two micro-batches."""
    loader.reset()
    total = torch.zeros((), device=env.device)
    for _ in range(steps):
        if should_stop is not None and should_stop():
            return None
        x, y = loader.next_batch()
        x, y = to_device(x, env.device), to_device(y, env.device)
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    return all_reduce_mean(total / steps, env).item()


def to_device(t, device):
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)  # copy overlaps with GPU work
    return t.to(device)


SAMPLE_PROMPT = "Hello, I'm a language model,"


class Evaluator:
    """What every eval_interval steps measures and prints: the val loss (on the compiled model,
    which has the training shapes), HellaSwag (its own compiled scorer) and samples. Each part
    checks for a stop request between its batches and stops early when there is one."""

    def __init__(self, cfg, env, model, state, val_loader, hella, autocast, stop, run_log):
        self.cfg, self.env, self.autocast, self.stop, self.log = cfg, env, autocast, stop, run_log
        self.model, self.state, self.val_loader, self.hella = model, state, val_loader, hella
        raw_model = state.model
        # a fixed number of val tokens, whatever the world size and B; fewer if the split is smaller
        steps = cfg.val_loss_steps * cfg.total_batch_size // (cfg.B * cfg.T * env.world_size)
        available = sum(val_loader.num_sequences) // (cfg.B * env.world_size)
        self.val_steps = max(1, min(steps, available))
        self.scorer = self.hellaswag = None
        if hella is not None:
            compiled = model is not raw_model
            self.scorer = hellaswag.make_scorer(raw_model.hidden, raw_model.head, compiled)
            # () -> (correct, correct_norm, total), or None when a stop request cut it short
            self.hellaswag = functools.partial(
                hellaswag.evaluate,
                self.scorer,
                hella,
                env.device,
                autocast,
                rank=env.rank,
                world_size=env.world_size,
                should_stop=stop.requested,
            )

    def warm_up(self):
        """Compile the evaluation graphs now, at start-up, where a stop loses nothing, rather than
        at the first evaluation: one val batch, and one HellaSwag batch of every shape."""
        device = self.env.device
        with torch.no_grad(), self.autocast:
            x, _ = self.val_loader.next_batch()
            self.model(to_device(x, device), to_device(x, device))
            shapes = {tuple(b.tokens.shape): b for b in self.hella.batches} if self.hella else {}
            for batch in shapes.values():
                self.scorer(*(t.to(device) for t in (batch.tokens, batch.positions, batch.targets)))

    def run(self, step):
        """Evaluate after `step` steps; returns early when a stop is requested."""
        env, requested = self.env, self.stop.requested
        val_loss = evaluate_val_loss(
            self.model, self.val_loader, self.val_steps, env, self.autocast, requested
        )
        if val_loss is None:
            return
        self.state.val_loss = val_loss
        env.print0(f"validation loss: {val_loss:.4f}")
        self.log.write(step, "val", f"{val_loss:.4f}")
        if self.hellaswag is not None:
            result = self.hellaswag()
            if result is None:
                return
            _, correct_norm, total = result
            env.print0(f"HellaSwag accuracy: {correct_norm}/{total}={correct_norm / total:.4f}")
            self.log.write(step, "hella", f"{correct_norm / total:.4f}")
        if step > 0 and not requested() and env.master_process:
            print_samples(self.state.model, self.cfg, env, self.autocast)


def print_samples(model, cfg, env, autocast):
    """num_return_sequences continuations of SAMPLE_PROMPT, top-k 50, with a generator of their
    own so that sampling never moves the training RNG."""
    if cfg.num_return_sequences == 0:
        return
    enc = get_tokenizer()
    prompt = enc.encode(SAMPLE_PROMPT)
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed + env.rank)
    new_tokens = max(0, cfg.max_length - len(prompt))
    try:
        with autocast:
            rows = model.generate(
                [prompt] * cfg.num_return_sequences, new_tokens, top_k=50, generator=generator
            )
    except NonFiniteLogits as e:
        env.print0(f"samples skipped: {e}")
        return
    for row in rows:
        env.print0(f"sample: {enc.decode(row)}")


# -----------------------------------------------------------------------------
# Checkpoints, log.txt and run.json

CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "model_config",
    "train_config",
    "step",
    "tokens_seen",
    "val_loss",
    "loader",
    "rng",
)
CHECKPOINT_FILE = re.compile(r"model_(\d+)\.pt")


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def save_checkpoint(path, checkpoint):
    """Atomically: a crash mid-save leaves the previous checkpoint as the latest complete one."""
    try:
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
    except OSError as e:
        raise SystemExit(
            f"could not save {path}: {e.strerror or e}; the earlier checkpoints are intact"
        ) from None


def checkpoint_steps(log_dir):
    """The steps of the checkpoints in log_dir, in order."""
    if not os.path.isdir(log_dir):
        return []
    return sorted(int(m[1]) for n in os.listdir(log_dir) if (m := CHECKPOINT_FILE.fullmatch(n)))


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None."""
    steps = checkpoint_steps(log_dir)
    return checkpoint_path(log_dir, steps[-1]) if steps else None


def load_checkpoint(path, log_dir, keys=CHECKPOINT_KEYS):
    """Read a checkpoint (a path, or 'latest' in log_dir) onto the CPU; it must hold `keys`."""
    if path == "latest":
        path = latest_checkpoint(log_dir)
        if path is None:
            raise SystemExit(f"no checkpoint (model_*.pt) in {log_dir} for 'latest'")
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise SystemExit(
            f"checkpoint {path} is corrupt or not a checkpoint of ours ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"checkpoint {path} is not a checkpoint of train_gpt2.py")
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise SystemExit(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    checkpoint["path"] = path
    return checkpoint


def model_config_of(checkpoint):
    try:
        return GPTConfig(**checkpoint["model_config"])
    except TypeError:
        path = checkpoint["path"]
        raise SystemExit(f"checkpoint {path} has a model_config of another kind") from None


def model_from_checkpoint(checkpoint):
    """The GPT that a checkpoint describes, with its weights."""
    model = GPT(model_config_of(checkpoint))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0]
        raise SystemExit(
            f"checkpoint {checkpoint['path']} does not fit the model it describes: {first_line}"
        ) from None
    return model


def load_model_from_checkpoint(path, log_dir="."):
    """(GPT with the checkpoint's weights, the checkpoint): the one way every script reads one."""
    checkpoint = load_checkpoint(path, log_dir, keys=("model", "model_config", "step"))
    return model_from_checkpoint(checkpoint), checkpoint


def rng_state():
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingState:
    """Everything a checkpoint holds and --resume restores: state_dict and load_state_dict side by
    side, so that nothing is saved without being restored."""

    model: nn.Module  # the raw (uncompiled, unwrapped) model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoaderLite
    cfg: "TrainConfig"
    tokens_seen: int = 0
    val_loss: float | None = None

    def state_dict(self, step):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": dataclasses.asdict(self.cfg),
            "step": step,
            "tokens_seen": self.tokens_seen,
            "val_loss": self.val_loss,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, checkpoint, print0=print):
        """Restore a checkpoint; returns its step, the next one to run."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["loader"].get("data") == self.loader.fingerprint:
            self.loader.load_state_dict(checkpoint["loader"])
        elif self.cfg.resume_allow_new_data:
            print0("the shards differ from the checkpoint's: the new data starts at its beginning")
        else:
            self.loader.load_state_dict(checkpoint["loader"])  # refuses, saying why
        set_rng_state(checkpoint["rng"])
        self.tokens_seen, self.val_loss = checkpoint["tokens_seen"], checkpoint["val_loss"]
        return checkpoint["step"]

    def save(self, step, env):
        if env.master_process:
            path = checkpoint_path(self.cfg.log_dir, step)
            save_checkpoint(path, self.state_dict(step))
            env.print0(f"saved {path}")


LOG_LINE = re.compile(r"(\d+) (train|val|hella) \S+")


def read_log(path):
    """The lines of a log.txt, each checked to be one of ours (so that a resume never trims a
    file it does not understand)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not LOG_LINE.fullmatch(line):
            raise SystemExit(f"{path} line {i} is not a line of train_gpt2.py's log: {line[:60]!r}")
    return lines


def check_log_dir(log_dir, checkpoint):
    """Refuse, before anything is written, a log dir that would mix or lose another run's files.

    A fresh run needs a log dir without checkpoints or log lines. A resumed run continues in its
    checkpoint's directory only from the latest checkpoint there (a later one would be
    overwritten); into any other directory it branches off, and that directory must be free.
    """
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise SystemExit(f"--log_dir {log_dir} is a file, not a directory")
    steps = checkpoint_steps(log_dir)
    log_lines = read_log(os.path.join(log_dir, "log.txt"))
    if checkpoint is not None:
        step = checkpoint["step"]
        own_dir = os.path.dirname(os.path.abspath(checkpoint["path"]))
        if os.path.isdir(log_dir) and os.path.samefile(own_dir, log_dir):
            later = [s for s in steps if s > step]
            if later:
                raise SystemExit(
                    f"{checkpoint_path(log_dir, later[-1])} is later than the checkpoint to "
                    f"resume (step {step}): resume the latest with --resume latest, or branch off "
                    f"step {step} into a new --log_dir"
                )
            return
        what = "checkpoints" if steps else "a log.txt"
        if steps or log_lines:
            raise SystemExit(
                f"{log_dir} holds {what} of another run: resume into the checkpoint's own "
                "directory or a new --log_dir"
            )
        return
    if steps:  # never overwrite another run's checkpoints
        raise SystemExit(
            f"{log_dir} holds checkpoints of an earlier run ({checkpoint_path(log_dir, steps[-1])})"
            ": continue it with --resume latest, or start afresh in another --log_dir"
        )
    if log_lines:
        raise SystemExit(
            f"{log_dir}/log.txt holds the log of an earlier run ({len(log_lines)} lines): move it "
            "away, or start afresh in another --log_dir"
        )


class RunLog:
    """log.txt ({step} train/val/hella {value} lines) and run.json (the run's settings, and one
    entry per resume) in the log dir, written by the master process only."""

    def __init__(self, log_dir, env):
        self.dir, self.env = log_dir, env
        self.path = os.path.join(log_dir, "log.txt")

    def start(self, cfg, settings, checkpoint):
        """A new log.txt and run.json; on resume, the log up to the resumed step (carried over
        from the checkpoint's directory when the run branches into another) and the run.json of
        the run with this resume appended."""
        if not self.env.master_process:
            return
        run_info = dict(
            config=dataclasses.asdict(cfg),
            git_commit=git_commit(),
            torch=torch.__version__,
            device=self.env.device,
            world_size=self.env.world_size,
            **settings,
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        try:
            os.makedirs(self.dir, exist_ok=True)
            remove_stale_temporaries(self.dir, r"model_\d+\.pt|log\.txt|run\.json")
            run = dict(run_info, resumes=[])
            lines = []
            if checkpoint is not None:
                step = checkpoint["step"]
                own_dir = os.path.dirname(os.path.abspath(checkpoint["path"]))
                lines = read_log(os.path.join(own_dir, "log.txt"))
                kept = [line for line in lines if int(line.split()[0]) < step]
                if len(kept) < len(lines):
                    self.env.print0(
                        f"log.txt: {len(lines) - len(kept)} lines of step {step} and later "
                        "dropped: this run redoes those steps"
                    )
                lines = kept
                run = self.read_run(own_dir) or dict(run_info, resumes=[])
                run["resumes"].append(
                    dict(
                        step=step,
                        time=time.strftime("%Y-%m-%d %H:%M:%S"),
                        checkpoint=checkpoint["path"],
                        git_commit=run_info["git_commit"],
                        world_size=run_info["world_size"],
                        device=run_info["device"],
                        config=run_info["config"],
                    )
                )
            with atomic_open(self.path, "w") as f:
                f.writelines(line + "\n" for line in lines)
            with atomic_open(os.path.join(self.dir, "run.json"), "w") as f:
                json.dump(run, f, indent=2)
        except OSError as e:
            raise SystemExit(f"cannot write to --log_dir {self.dir}: {e.strerror or e}") from None

    @staticmethod
    def read_run(directory):
        """The run.json in directory, or None if there is none we can read."""
        try:
            with open(os.path.join(directory, "run.json")) as f:
                run = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(run, dict) or not isinstance(run.setdefault("resumes", []), list):
            return None
        return run

    def write(self, step, kind, value):
        if self.env.master_process:
            try:
                with open(self.path, "a") as f:
                    f.write(f"{step} {kind} {value}\n")
            except OSError as e:
                raise SystemExit(f"cannot write {self.path}: {e.strerror or e}") from None


# -----------------------------------------------------------------------------
# Training configuration and main()


def setting(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run; each field is also a command-line flag (--name value).

    The defaults are the GPT-2 124M reproduction on FineWeb-Edu 10B (GPT-3 paper, table 2.1 and
    appendix B, as in the lecture). EMBEDDED_DEFAULTS replaces some of them for the bundled corpus.
    """

    data_dir: str = setting("edu_fineweb10B", "token shards made by fineweb.py, or 'bundled'")
    log_dir: str = setting("log", "where log.txt, run.json and checkpoints go")
    recipe: str = setting("gpt2", "gpt2: the lecture's; speedrun: the modern one (README)")
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads")
    n_embd: int = setting(768, "embedding width")
    block_size: int = setting(1024, "longest context the model handles")
    vocab_size: int = setting(50304, "50257 padded to a multiple of 128: faster on tensor cores")
    init_from: str = setting(
        "", "start from gpt2[-medium|-large|-xl], a HF dir or a .pt checkpoint"
    )
    B: int | str = setting("auto", "micro-batch size; auto: the largest that fits on CUDA, else 64")
    T: int = setting(1024, "sequence length of a training sample")
    total_batch_size: int = setting(524288, "tokens per optimizer step: 2**19, about 0.5M")
    batch_ramp_tokens: int = setting(0, "GPT-3 batch ramp: tokens over which the batch grows")
    batch_ramp_start: int = setting(32768, "GPT-3 batch ramp: tokens in the first batch")
    max_lr: float = setting(6e-4, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = setting(715, "linear warmup: 375M tokens (GPT-3) / 2**19")
    max_steps: int = setting(19073, "optimizer steps: 10B tokens / 2**19 is one epoch")
    weight_decay: float = setting(0.1, "AdamW weight decay on matmul weights and embeddings")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this")
    muon_lr: float = setting(0.05, "speedrun: Muon's learning rate (the blocks' matrices)")
    muon_wd: float = setting(0.0, "speedrun: Muon's decoupled weight decay")
    embed_lr: float = setting(0.6, "speedrun: AdamW learning rate of the token embedding")
    head_lr: float = setting(0.008, "speedrun: AdamW learning rate of the lm_head")
    cooldown_frac: float = setting(0.6, "speedrun: final fraction of steps of linear lr decay")
    fused_loss: int = setting(0, "lm_head and loss in chunks: no full logits tensor (memory)")
    fp8: int = setting(0, "the blocks' matmuls in FP8 while training (GPUs of compute cap. 8.9+)")
    max_skipped_steps: int = setting(5, "stop after this many non-finite steps in a row")
    eval_interval: int = setting(250, "steps between val loss, HellaSwag and samples")
    val_loss_steps: int = setting(20, "val loss over val_loss_steps * total_batch_size tokens")
    hellaswag: int | None = setting(None, "HellaSwag during training (default: FineWeb runs)")
    hellaswag_path: str = setting("", "local hellaswag_val.jsonl (default: hellaswag.py's cache)")
    num_return_sequences: int = setting(4, "samples printed at each evaluation")
    max_length: int = setting(32, "tokens per sample, prompt included")
    checkpoint_interval: int = setting(5000, "steps between checkpoints (and the last step)")
    resume: str = setting("", "checkpoint to continue from: a path, or 'latest' in log_dir")
    resume_allow_new_data: int = setting(0, "resume onto other shards, from their beginning")
    device: str = setting("", "cuda, cuda:1, mps or cpu (default: the best available)")
    dtype: str = setting("auto", "autocast dtype: auto, float32, bfloat16 or float16")
    compile: int | None = setting(None, "torch.compile the model (default: on CUDA)")
    shuffle: int = setting(1, "shuffle shards and sequences each epoch (0: in file order)")
    seed: int = setting(1337, "seed of the model init, data order and sampling")


# A small model for the bundled ~300k-token corpus, tuned on a 2-core CPU (README): the lm_head
# and softmax over 50304 ids dominate a step, so depth and width cost little; small batches of
# many steps learn most from the few minutes.
EMBEDDED_DEFAULTS = dict(
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=256,
    B=4,
    T=256,
    total_batch_size=1024,
    max_lr=2e-3,
    warmup_steps=20,
    max_steps=1000,
    eval_interval=100,
    val_loss_steps=32,  # the whole held-out 33k tokens
    checkpoint_interval=1000,
    hellaswag=0,
    compile=0,
    num_return_sequences=2,
)

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "recipe")
FLAG_CHOICES = {
    "compile": (0, 1),
    "hellaswag": (0, 1),
    "shuffle": (0, 1),
    "fused_loss": (0, 1),
    "fp8": (0, 1),
    "resume_allow_new_data": (0, 1),
    "recipe": RECIPES,
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in one line, as every other error of these scripts."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (--help lists the flags)\n")


def micro_batch_size(value):
    """--B: 'auto' or a number."""
    return value if value == "auto" else int(value)


def parse_args(argv=None):
    """Command-line flags, one per TrainConfig field; returns only the settings given."""
    parser = ArgumentParser(
        description="Train GPT-2. " + TrainConfig.__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        kind = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type  # int | None
        if f.name == "B":
            kind = micro_batch_size
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=None,
            choices=FLAG_CHOICES.get(f.name),
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def resolve_config(overrides):
    """The run's settings: flags given > resumed checkpoint's > bundled-corpus or 124M defaults.

    Returns (config, checkpoint or None). Refuses, before anything is written, a log dir of
    another run and a resume that would go back on what a checkpoint already holds.
    """
    checkpoint = None
    base = TrainConfig()
    if overrides.get("resume"):
        checkpoint = load_checkpoint(overrides["resume"], overrides.get("log_dir", base.log_dir))
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig(**{k: v for k, v in checkpoint["train_config"].items() if k in known})
        if os.path.abspath(base.data_dir) == EMBEDDED_DATA_DIR:  # saved before 'bundled' existed
            base = dataclasses.replace(base, data_dir=BUNDLED)
        model_config = dataclasses.asdict(model_config_of(checkpoint))
        for k in MODEL_FIELDS:
            if k in overrides and overrides[k] != model_config[k]:
                raise SystemExit(
                    f"checkpoint {checkpoint['path']} has {k}={model_config[k]}, "
                    f"but {k}={overrides[k]} was requested"
                )
    else:
        if overrides.get("init_from") and set(MODEL_FIELDS) & set(overrides):
            raise SystemExit(
                "--init_from takes the model's shape from its weights: drop "
                + ", ".join(f"--{k}" for k in MODEL_FIELDS if k in overrides)
            )
        if "data_dir" not in overrides and not list_shards(base.data_dir, "train"):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # a cluster run without its data would otherwise train the tiny model and exit 0
                raise SystemExit(
                    f"no FineWeb shards in {base.data_dir}/: make them with `python fineweb.py`, "
                    "or pass --data_dir (--data_dir bundled: the small bundled-corpus run)"
                )
            base = dataclasses.replace(base, data_dir=BUNDLED)
        if overrides.get("data_dir", base.data_dir) == BUNDLED:
            base = dataclasses.replace(base, **EMBEDDED_DEFAULTS)
    cfg = dataclasses.replace(base, **overrides)
    if checkpoint is not None and cfg.max_steps < checkpoint["step"]:
        raise SystemExit(
            f"--max_steps {cfg.max_steps} is below the step of the checkpoint to resume "
            f"({checkpoint['step']})"
        )
    check_log_dir(cfg.log_dir, checkpoint)
    return cfg, checkpoint


def check_config(cfg, world_size):
    positive = (
        "n_layer n_head n_embd block_size vocab_size T total_batch_size max_steps eval_interval "
        "val_loss_steps checkpoint_interval max_skipped_steps max_length"
    ).split()
    bad = [f"--{k} {getattr(cfg, k)}" for k in positive if getattr(cfg, k) < 1]
    if cfg.B != "auto" and cfg.B < 1:
        bad.append(f"--B {cfg.B}")
    if bad:
        raise SystemExit(f"{', '.join(bad)}: must be positive")
    rates = ("max_lr", "muon_lr", "embed_lr", "head_lr", "grad_clip")
    negative = [f"--{k} {getattr(cfg, k)}" for k in rates if getattr(cfg, k) <= 0]
    negative += [
        f"--{k} {getattr(cfg, k)}"
        for k in ("warmup_steps", "weight_decay", "muon_wd", "num_return_sequences")
        if getattr(cfg, k) < 0
    ]
    if negative:
        raise SystemExit(f"{', '.join(negative)}: out of range")
    for k in ("min_lr_ratio", "cooldown_frac"):
        if not 0 <= getattr(cfg, k) <= 1:
            raise SystemExit(f"--{k} {getattr(cfg, k)}: must be between 0 and 1")
    if cfg.vocab_size < GPT2_VOCAB_SIZE:
        raise SystemExit(
            f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {GPT2_VOCAB_SIZE}"
        )
    if cfg.T > cfg.block_size:
        raise SystemExit(f"T={cfg.T} is longer than the model's block_size={cfg.block_size}")
    if cfg.max_length > cfg.block_size:
        raise SystemExit(f"--max_length {cfg.max_length} is longer than block_size")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.recipe == "speedrun" and (cfg.n_embd // cfg.n_head) % 2:
        raise SystemExit("the speedrun recipe's rotary embeddings need an even head size")
    if cfg.fp8 and (cfg.n_embd % 16 or cfg.T % 16):
        raise SystemExit(f"--fp8 needs n_embd and T divisible by 16, not {cfg.n_embd} and {cfg.T}")
    if cfg.batch_ramp_tokens > 0 and cfg.batch_ramp_start < 1:
        raise SystemExit("--batch_ramp_start must be positive")
    if cfg.B != "auto" and cfg.total_batch_size % (cfg.B * cfg.T * world_size):
        micro = cfg.B * cfg.T * world_size
        raise SystemExit(
            f"total_batch_size={cfg.total_batch_size} is not divisible by B * T * world_size = "
            f"{cfg.B} * {cfg.T} * {world_size} = {micro}"
        )


def git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_model(cfg, checkpoint):
    """The model to train: resumed, started from pretrained weights, or fresh with its init."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    elif cfg.init_from.endswith(".pt"):
        model, _ = load_model_from_checkpoint(cfg.init_from, cfg.log_dir)
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FIELDS}))
    model.fused_loss = bool(cfg.fused_loss)
    if cfg.fp8:
        use_fp8_matmuls(model)
    return model


def newton_schulz_dtype(device_type, dtype):
    """Muon's Newton-Schulz in bf16 on GPUs that train in bf16 (its purpose needs no more
    precision); else float32: a CPU multiplies these shapes in bf16 up to 50 times slower."""
    return torch.bfloat16 if device_type == "cuda" and dtype == torch.bfloat16 else torch.float32


def make_optimizer(model, cfg, env, dtype):
    if cfg.recipe == "speedrun":
        ns_dtype = newton_schulz_dtype(env.device_type, dtype)
        return model.configure_speedrun_optimizer(cfg, ns_dtype, env.print0)
    return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, env.device_type, env.print0)


def resolve_micro_batch(cfg, env, model, autocast):
    """cfg with --B auto made a number: on CUDA the largest that fits (one trial step each, from
    64 down), elsewhere the largest power of two up to 64 that divides the step."""
    if cfg.B != "auto":
        return cfg
    on_gpu = env.device_type == "cuda"
    fits = micro_batch_fits(model, cfg, env, autocast) if on_gpu else lambda B: True
    B = largest_micro_batch(fits, cfg.total_batch_size, cfg.T, env.world_size)
    env.print0(f"micro-batch B={B}" + (" (the largest that fits in memory)" if on_gpu else ""))
    return dataclasses.replace(cfg, B=B)


def largest_micro_batch(fits, total_batch_size, T, world_size, largest=64):
    """The largest power-of-two B, at most `largest`, that cuts a step's tokens into whole
    micro-batches of every rank and for which fits(B) holds, tried from the top down."""
    B = largest
    while B >= 1:
        if total_batch_size % (B * T * world_size) == 0 and fits(B):
            return B
        B //= 2
    raise SystemExit(
        f"no micro-batch B <= {largest} of T={T} tokens both fits in memory and divides "
        f"total_batch_size={total_batch_size} over {world_size} ranks"
    )


def micro_batch_fits(model, cfg, env, autocast):
    """fits(B) for largest_micro_batch on CUDA: one eager forward and backward of B random
    sequences, whose peak memory plus the optimizer state to come must fit the GPU."""
    total = torch.cuda.get_device_properties(env.device).total_memory
    params = sum(p.numel() for p in model.parameters())
    optimizer_state = 8 * params  # two float32 moments per parameter (AdamW), at most

    def fits(B):
        x = torch.randint(0, GPT2_VOCAB_SIZE, (B, cfg.T), device=env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        try:
            with autocast:
                _, loss = model(x, x)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(env.device)
            return peak + optimizer_state < 0.95 * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()

    return fits


def train_step(
    model, optimizer, loader, grad_accum_steps, env, autocast, scaler, grad_clip, should_stop=None
):
    """One optimizer step over grad_accum_steps micro-batches.

    Returns (loss, grad norm, updated), with one host synchronization. A non-finite loss or
    gradient norm, or inf gradients that the fp16 loss scaler skips, leave the weights and the
    optimizer state as they were (updated is False). If should_stop() says so between two
    micro-batches, the step is undone (the loader rewound, the gradients dropped) and None is
    returned: the state is the last completed step's.
    """
    start = loader.state_dict()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=env.device)
    for micro_step in range(grad_accum_steps):
        if micro_step > 0 and should_stop is not None and should_stop():
            optimizer.zero_grad(set_to_none=True)
            loader.load_state_dict(start)
            return None
        x, y = loader.next_batch()
        x, y = to_device(x, env.device), to_device(y, env.device)
        # DDP all-reduces gradients during backward; only the last micro-step needs that
        last = micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if last or not env.ddp else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            # cross-entropy is a mean over its micro-batch; dividing by the number of micro-batches
            # makes the accumulated gradient that of the mean over the whole batch
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    all_reduce_mean(loss_accum, env)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # the loss is reduced over ranks and the gradients synchronized, so every rank agrees here
    loss, norm = torch.stack([loss_accum, norm.float()]).tolist()
    if math.isfinite(loss) and (scaler.is_enabled() or math.isfinite(norm)):
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)  # with fp16 loss scaling, this itself skips steps with inf gradients
        scaler.update()
        # the scaler lowers its scale exactly when it skipped the step
        updated = scale is None or scaler.get_scale() >= scale
    else:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        updated = False
    return loss, norm, updated


def step_line(step, loss, lr, norm, dt, tokens, rate_mfu):
    """The line printed after every step."""
    mfu_text = f" | mfu {100 * rate_mfu:.2f}%" if rate_mfu is not None else ""
    return (
        f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
        f"dt {1000 * dt:.2f}ms | tok/sec {tokens / dt:.2f}{mfu_text}"
    )


def prepare_data(cfg, env):
    """The shard directory of the run: for --data_dir bundled, the bundled corpus tokenized once
    (by local rank 0 of each node, agreed by all)."""
    if cfg.data_dir != BUNDLED:
        return cfg.data_dir
    env.print0(f"training a small model on the bundled corpus ({CORPUS_DIR})")
    agree(env, lambda: prepare_embedded_corpus(EMBEDDED_DATA_DIR) if env.local_rank == 0 else 0)
    return EMBEDDED_DATA_DIR


def make_loaders(cfg, env, data_dir):
    """The train and val loaders. Every rank checks its share of the shards' token ids, and all of
    them must see the same shards: the ranks agree on both before training starts."""

    def loaders():
        common = dict(process_rank=env.rank, num_processes=env.world_size, data_dir=data_dir)
        train = DataLoaderLite(
            cfg.B, cfg.T, split="train", shuffle=bool(cfg.shuffle), seed=cfg.seed, **common
        )
        val = DataLoaderLite(cfg.B, cfg.T, split="val", **common)
        return train, val

    train_loader, val_loader = agree(env, loaders)
    if env.ddp:
        seen = [None] * env.world_size
        mine = (
            len(train_loader.paths),
            len(val_loader.paths),
            train_loader.fingerprint,
            val_loader.fingerprint,
        )
        dist.all_gather_object(seen, mine, group=env.cpu_group)
        if len(set(seen)) > 1:
            counts = ", ".join(f"rank {r}: {s[0]} + {s[1]} shards" for r, s in enumerate(seen))
            message = f"the ranks see different shards in {data_dir} ({counts}): every node needs"
            raise SystemExit(f"{message} the same files" if env.local_rank == 0 else 1)
    return train_loader, val_loader


def load_hellaswag(cfg, env, embedded):
    """The HellaSwag val examples packed for scoring, or None when HellaSwag is off for this run.

    By default it runs with FineWeb data only, and a missing file that cannot be downloaded
    turns it off with a message; asked for explicitly (--hellaswag 1), that is an error. Local
    rank 0 of each node downloads, and every rank agrees on the outcome before going on.
    """
    if not (cfg.hellaswag if cfg.hellaswag is not None else not embedded):
        return None
    path = cfg.hellaswag_path or os.path.join(hellaswag.DATA_CACHE_DIR, "hellaswag_val.jsonl")

    def download():
        if env.local_rank == 0 and not cfg.hellaswag_path:
            hellaswag.download("val")

    def pack():
        examples = hellaswag.iterate_examples("val", path)
        batch_tokens = hellaswag.batch_tokens_for(env.device)
        packed = hellaswag.pack_examples(
            examples, get_tokenizer(), batch_tokens, max_width=cfg.block_size
        )
        if not len(packed):
            raise SystemExit(f"HellaSwag file {path} holds no examples")
        return packed

    try:
        agree(env, download)
        return agree(env, pack)
    except SystemExit as e:
        if cfg.hellaswag == 1:
            raise
        env.print0(f"HellaSwag is off for this run: {e}")
        return None


def once_per_node(action):
    """action(), whose errors every process of a torchrun node would print alike (the flags, the
    files are the same): printed by local rank 0 only, the others exit with 1."""
    try:
        return action()
    except SystemExit as e:
        if e.code not in (0, None) and os.environ.get("LOCAL_RANK", "0") != "0":
            raise SystemExit(1) from None
        raise


def main(argv=None):
    start_time = time.time()
    try:
        cfg, checkpoint = once_per_node(lambda: resolve_config(parse_args(argv)))
        env = setup_distributed(cfg.device)
        if env.device_type == "cpu":
            keep_freed_cpu_memory()
        try:
            with StopSignal(env) as stop:
                signum = train(cfg, env, checkpoint, stop, start_time)
            if env.ddp:
                # the ranks leave together: gloo aborts a process whose peers tear down the group
                # while it still works (rank 0 saving the last checkpoint, say)
                dist.barrier()
        finally:
            if env.ddp:
                dist.destroy_process_group()
    except StopNow as e:
        with contextlib.suppress(OSError):  # `2>&1 | head`, a closed terminal: stderr is gone too
            print(e, file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # Ctrl-C before the handlers are in place
        print("interrupted (Ctrl-C) during start-up: nothing to save", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    if signum:
        raise SystemExit(128 + signum)


def train(cfg, env, checkpoint, stop, start_time):
    """The training run; returns 0 when done, or the number of the signal that stopped it."""
    print0 = env.print0
    check_config(cfg, env.world_size)  # before anything slow
    if cfg.fp8:
        check_fp8_device(env.device)
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    data_dir = prepare_data(cfg, env)

    # model
    raw_model = build_model(cfg, checkpoint).to(env.device)  # evaluation, sampling, checkpoints
    cfg = dataclasses.replace(cfg, **dataclasses.asdict(raw_model.config))  # --init_from sets these
    use_compile = cfg.compile if cfg.compile is not None else env.device_type == "cuda"
    dtype = autocast_dtype(cfg.dtype, env.device_type)
    autocast = autocast_context(dtype, env.device_type)
    cfg = resolve_micro_batch(cfg, env, raw_model, autocast)
    check_config(cfg, env.world_size)  # again, for the shape --init_from brought and B
    compiled = torch.compile(raw_model) if use_compile else raw_model
    model = compiled
    if env.ddp:
        model = DDP(compiled, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
    # fp16 needs loss scaling so that small gradients do not underflow; bf16 has fp32's range
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == torch.float16)
    optimizer = make_optimizer(raw_model, cfg, env, dtype)

    # data, evaluation and the state a checkpoint holds
    train_loader, val_loader = make_loaders(cfg, env, data_dir)
    hella = load_hellaswag(cfg, env, embedded=cfg.data_dir == BUNDLED)
    state = TrainingState(raw_model, optimizer, scaler, train_loader, cfg)
    start_step = state.load_state_dict(checkpoint, print0) if checkpoint else 0
    if checkpoint:
        print0(f"resumed from {checkpoint['path']} at step {start_step}")
    run_log = RunLog(cfg.log_dir, env)
    run_info = dict(dtype=str(dtype), compile=bool(use_compile))
    agree(env, lambda: run_log.start(cfg, run_info, checkpoint))
    evaluator = Evaluator(cfg, env, compiled, state, val_loader, hella, autocast, stop, run_log)
    if use_compile:
        evaluator.warm_up()

    peak = peak_flops(env.device)
    skipped_in_a_row = 0
    print0(
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {cfg.total_batch_size} "
        f"tokens per step on {env.world_size} x {env.device} ({dtype}), compile={bool(use_compile)}"
    )
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        if step % cfg.eval_interval == 0 or last_step:
            evaluator.run(step)  # val loss, HellaSwag, samples
        if stop.requested():
            return stop_run(state, step, start_step, stop, env)
        if step > start_step and (step % cfg.checkpoint_interval == 0 or last_step):
            state.save(step, env)
        if last_step:
            break

        t0 = time.time()
        lr = set_learning_rate(optimizer, step, cfg)
        grad_accum_steps = grad_accum_steps_at(state.tokens_seen, cfg, env.world_size)
        result = train_step(
            model,
            optimizer,
            train_loader,
            grad_accum_steps,
            env,
            autocast,
            scaler,
            cfg.grad_clip,
            stop.requested,
        )
        if result is None:  # a stop request between micro-steps: the step was undone
            return stop_run(state, step, start_step, stop, env)
        synchronize(env.device)
        dt = time.time() - t0
        stop.defer()  # a step is done: from now on a stop saves it first
        loss, norm, updated = result
        tokens = grad_accum_steps * cfg.B * cfg.T * env.world_size
        state.tokens_seen += tokens
        if updated:
            skipped_in_a_row = 0
            rate = tokens / dt / env.world_size  # per device
            util = mfu(raw_model.config, cfg.T, rate, peak) if peak else None
            print0(step_line(step, loss, lr, norm, dt, tokens, util))
            run_log.write(step, "train", f"{loss:.6f}")
        else:
            skipped_in_a_row += 1
            report_skipped_step(step, loss, norm, skipped_in_a_row, cfg, env)

    print0(
        f"done: {cfg.max_steps} steps in {time.time() - start_time:.0f}s, final val loss "
        f"{state.val_loss:.4f}; log in {run_log.path}"
    )
    if cfg.data_dir == BUNDLED:
        print0(NEXT_STEPS)
    return 0


NEXT_STEPS = (
    "This was a small model on the bundled corpus. For the real GPT-2 (124M) run, get "
    "FineWeb-Edu 10B (about 20GB of token shards) with `python fineweb.py`, then run "
    "`torchrun --standalone --nproc_per_node=8 train_gpt2.py`."
)


def report_skipped_step(step, loss, norm, in_a_row, cfg, env):
    """Say that a step was skipped; stop the run after max_skipped_steps of them in a row."""
    env.print0(
        f"step {step:5d} | non-finite loss {loss} or grad norm {norm}: update skipped "
        f"({in_a_row} in a row)"
    )
    if in_a_row >= cfg.max_skipped_steps:
        raise SystemExit(
            f"stopping: {in_a_row} non-finite steps in a row at step {step}; lower --max_lr "
            "or resume from an earlier checkpoint"
        )


def stop_run(state, step, start_step, stop, env):
    """Save the state after `step` steps (unless this run has done none) and say how to resume;
    returns the signal's number."""
    signum = stop.requested()
    name = signal.Signals(signum).name
    if step > start_step:
        state.save(step, env)
        how = f"python train_gpt2.py --resume latest --log_dir {state.cfg.log_dir}"
        env.print0(f"stopped by {name} after step {step - 1}; continue with: {how}")
    else:
        env.print0(f"stopped by {name} before this run's first step: nothing new to save")
    return signum


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
