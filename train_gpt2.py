"""
Reproduce GPT-2 (124M) from scratch: the model, the data loader and the training loop in one file.

On a fresh machine with no FineWeb shards this trains a small model on the bundled public-domain
corpus in a few minutes on a CPU. With shards from `python fineweb.py` in edu_fineweb10B/, the
defaults are the GPT-2 124M reproduction (10B tokens, 19073 steps of 2**19 tokens).

    python train_gpt2.py                                     # CPU, Apple MPS or one GPU
    python train_gpt2.py --max_steps 50 --B 16 --T 512       # any setting: see --help
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

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


# The four sizes OpenAI released (GPT-2 paper, table 2); all share block_size and vocab_size.
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): the heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = self.attend(q, k, v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def attend(self, q, k, v):
        # flash attention on GPU: the (T, T) attention matrix is never materialized in memory
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LayerNorm (GPT-2 paper, section 2.3): the residual stream itself is never normalized
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
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


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017), as in GPT-2: the token embedding is the output layer
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

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

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of length {T} is longer than block_size {self.config.block_size}"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # over the whole padded vocabulary, as in the lecture: the model learns in a few
            # steps to push the never-seen padded ids down, and losses match the reference's
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

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


def flops_per_token(config, T):
    """Training FLOPs per token: 6N + 12 L H Q T (PaLM paper, appendix B).

    N counts the parameters that take part in matmuls: all but the position embedding (the tied
    token embedding is the lm_head). 12 L H Q T is the attention's QK^T and AV, forward and back.
    """
    d, L = config.n_embd, config.n_layer
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
EOT = 50256  # <|endoftext|>: separates (and begins) every document


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
        return np.memmap(
            path, dtype=np.uint16, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(ntok,)
        )
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise SystemExit(f"{path}: not a readable .npy token shard ({e})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise SystemExit(
            f"{path}: shards must be 1-D uint16 token arrays, this one is {tokens.ndim}-D "
            f"{tokens.dtype}"
        )
    return tokens


def list_shards(data_dir, split):
    """Shard files of a split, in name order: every .npy or .bin file with the split in its name."""
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if split in n and n.endswith((".npy", ".bin")))
    return [os.path.join(data_dir, n) for n in names if not n.startswith(".")]


class DataLoaderLite:
    """Batches of B sequences of T tokens from token shards, split across processes.

    The stream is cut into sequences of T + 1 tokens that overlap by one (inputs and their
    next-token targets); sequence i of a shard starts at token i * T, so with shuffle off a batch
    is the contiguous B * T + 1 tokens of the lecture's loader. Each optimizer micro-step the whole
    world takes the next B * num_processes sequences and rank r gets the r-th B of them; batches
    run across shard boundaries, so no rank skips a shard's tail. With shuffle on, every epoch
    visits the shards and the sequences within each shard in a fresh order drawn from
    (seed, epoch), so neither the world size nor B changes which data a step sees.
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
        vocab_size=50257,
    ):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed, self.vocab_size = shuffle, seed, vocab_size
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
        self.checked = set()  # shards whose token ids have been range-checked
        self.reset()

    def reset(self):
        self.load_state_dict(
            {"epoch": 0, "shard_pos": 0, "seq_pos": 0, "T": self.T, "num_shards": len(self.shards)}
        )

    def state_dict(self):
        # the world's position in the stream, the same on every rank
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "seq_pos": self.seq_pos,
            "T": self.T,
            "num_shards": len(self.shards),
        }

    def load_state_dict(self, state):
        if state["T"] != self.T or state["num_shards"] != len(self.shards):
            raise SystemExit(
                f"data loader state is for T={state['T']} over {state['num_shards']} shards; this "
                f"run has T={self.T} over {len(self.shards)} shards"
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
        if shard not in self.checked:
            top = int(self.shards[shard].max()) if len(self.shards[shard]) else 0
            if top >= self.vocab_size:
                raise SystemExit(
                    f"{self.paths[shard]}: token id {top} is outside the vocabulary "
                    f"(< {self.vocab_size})"
                )
            self.checked.add(shard)

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
    os.makedirs(out_dir, exist_ok=True)
    write_shard(os.path.join(out_dir, "corpus_val_000000.npy"), np.array(splits["val"], np.uint16))
    write_shard(
        os.path.join(out_dir, "corpus_train_000001.npy"), np.array(splits["train"], np.uint16)
    )
    tokens = {split: len(ids) for split, ids in splits.items()}
    with atomic_open(manifest_path, "w") as f:  # written last: it marks the shards complete
        json.dump({"sha256": digest.hexdigest(), "texts": texts, "tokens": tokens}, f)
    return out_dir


# -----------------------------------------------------------------------------
# Optimizer and schedule


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

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def print0(self, *args, **kwargs):
        if self.master_process:
            print(*args, **kwargs, flush=True)


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
    if device_type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        # CPUs with AVX512-BF16 run bf16 matmuls 3-4x faster than fp32 ones
        with contextlib.suppress(AttributeError, RuntimeError):
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
    return torch.float32


def autocast_context(dtype, device_type):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


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
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    elif device == "cpu":
        dist.init_process_group(backend="gloo")
    else:
        raise SystemExit(f"distributed training needs cuda (nccl) or cpu (gloo), not {device}")
    return DistEnv(True, rank, local_rank, world_size, device, rank == 0)


def all_reduce_mean(value, env):
    """Average a tensor over the ranks, in place (a sum and a division: gloo has no AVG)."""
    if env.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


# -----------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def evaluate_val_loss(model, loader, steps, env, autocast):
    """Mean loss over the first `steps` micro-batches of every rank, averaged over ranks."""
    loader.reset()
    total = torch.zeros((), device=env.device)
    for _ in range(steps):
        x, y = loader.next_batch()
        x, y = to_device(x, env.device), to_device(y, env.device)
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    return all_reduce_mean(total / steps, env).item()


@torch.no_grad()
def sample(model, enc, prompt, num_return_sequences, max_length, device, seed, autocast, top_k=50):
    """Top-k sampling with a private generator, so sampling never moves the training RNG."""
    tokens = torch.tensor(enc.encode(prompt), dtype=torch.long, device=device)
    tokens = tokens.unsqueeze(0).repeat(num_return_sequences, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    while tokens.size(1) < max_length:
        with autocast:
            logits, _ = model(tokens[:, -model.config.block_size :])
        # drop the padded vocabulary ids: they are not tokens
        probs = F.softmax(logits[:, -1, : enc.n_vocab].float(), dim=-1)
        topk_probs, topk_indices = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
        choice = torch.multinomial(topk_probs, 1, generator=generator)
        tokens = torch.cat((tokens, torch.gather(topk_indices, -1, choice)), dim=1)
    return [enc.decode(row.tolist()) for row in tokens]


def to_device(t, device):
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)  # copy overlaps with GPU work
    return t.to(device)


# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def save_checkpoint(path, checkpoint):
    """Atomically: a crash mid-save leaves the previous checkpoint as the latest complete one."""
    with atomic_open(path) as f:
        torch.save(checkpoint, f)


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None."""
    if not os.path.isdir(log_dir):
        return None
    steps = [int(m[1]) for n in os.listdir(log_dir) if (m := re.fullmatch(r"model_(\d+)\.pt", n))]
    return checkpoint_path(log_dir, max(steps)) if steps else None


def load_checkpoint(path, log_dir):
    """Read a checkpoint (a path, or 'latest' in log_dir) onto the CPU."""
    if path == "latest":
        path = latest_checkpoint(log_dir)
        if path is None:
            raise SystemExit(f"--resume latest: no checkpoint (model_*.pt) in {log_dir}")
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise SystemExit(
            f"checkpoint {path} is corrupt or not a checkpoint of ours ({type(e).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config", "step"} <= set(checkpoint):
        raise SystemExit(f"checkpoint {path} is not a checkpoint of train_gpt2.py")
    checkpoint["path"] = path
    return checkpoint


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

    data_dir: str = setting("edu_fineweb10B", "directory of token shards made by fineweb.py")
    log_dir: str = setting("log", "where log.txt, run.json and checkpoints go")
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads")
    n_embd: int = setting(768, "embedding width")
    block_size: int = setting(1024, "longest context the model handles")
    vocab_size: int = setting(50304, "50257 padded to a multiple of 128: faster on tensor cores")
    init_from: str = setting(
        "", "start from gpt2[-medium|-large|-xl], a HF dir or a .pt checkpoint"
    )
    B: int = setting(64, "micro-batch size, sequences per process")
    T: int = setting(1024, "sequence length of a training sample")
    total_batch_size: int = setting(524288, "tokens per optimizer step: 2**19, about 0.5M")
    batch_ramp_tokens: int = setting(0, "GPT-3 batch ramp: tokens over which the batch grows")
    batch_ramp_start: int = setting(32768, "GPT-3 batch ramp: tokens in the first batch")
    max_lr: float = setting(6e-4, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of max_lr")
    warmup_steps: int = setting(715, "linear warmup: 375M tokens (GPT-3) / 2**19")
    max_steps: int = setting(19073, "optimizer steps: 10B tokens / 2**19 is one epoch")
    weight_decay: float = setting(0.1, "AdamW weight decay on matmul weights and embeddings")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this")
    max_skipped_steps: int = setting(5, "stop after this many non-finite steps in a row")
    eval_interval: int = setting(250, "steps between val loss, HellaSwag and samples")
    val_loss_steps: int = setting(20, "val loss over val_loss_steps * total_batch_size tokens")
    hellaswag: int | None = setting(None, "HellaSwag during training (default: FineWeb runs)")
    hellaswag_path: str = setting("", "local hellaswag_val.jsonl (default: hellaswag.py's cache)")
    num_return_sequences: int = setting(4, "samples printed at each evaluation")
    max_length: int = setting(32, "tokens per sample, prompt included")
    checkpoint_interval: int = setting(5000, "steps between checkpoints (and the last step)")
    resume: str = setting("", "checkpoint to continue from: a path, or 'latest' in log_dir")
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

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def parse_args(argv=None):
    """Command-line flags, one per TrainConfig field; returns only the settings given."""
    parser = argparse.ArgumentParser(
        description="Train GPT-2. " + TrainConfig.__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        kind = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type  # int | None
        kwargs = {"choices": (0, 1)} if f.name in ("compile", "hellaswag", "shuffle") else {}
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=None,
            help=f"{f.metadata['help']} (default: {f.default})",
            **kwargs,
        )
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def resolve_config(overrides):
    """The run's settings: flags given > resumed checkpoint's > embedded-corpus or 124M defaults.

    Returns (config, checkpoint or None, whether the embedded corpus is used).
    """
    checkpoint = None
    base = TrainConfig()
    if overrides.get("resume"):
        checkpoint = load_checkpoint(overrides["resume"], overrides.get("log_dir", base.log_dir))
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig(**{k: v for k, v in checkpoint["train_config"].items() if k in known})
        for k in MODEL_FIELDS:
            if k in overrides and overrides[k] != checkpoint["model_config"][k]:
                raise SystemExit(
                    f"checkpoint {checkpoint['path']} has {k}={checkpoint['model_config'][k]}, "
                    f"but {k}={overrides[k]} was requested"
                )
    else:
        if overrides.get("init_from") and set(MODEL_FIELDS) & set(overrides):
            raise SystemExit(
                "--init_from takes the model's shape from its weights: drop "
                + ", ".join(f"--{k}" for k in MODEL_FIELDS if k in overrides)
            )
        if "data_dir" not in overrides and not list_shards(base.data_dir, "train"):
            base = dataclasses.replace(base, data_dir=EMBEDDED_DATA_DIR, **EMBEDDED_DEFAULTS)
    cfg = dataclasses.replace(base, **overrides)
    earlier = latest_checkpoint(cfg.log_dir)
    if checkpoint is None and earlier is not None:  # never overwrite another run's checkpoints
        raise SystemExit(
            f"{cfg.log_dir} holds checkpoints of an earlier run ({earlier}): continue "
            "it with --resume latest, or start afresh in another --log_dir"
        )
    embedded = os.path.abspath(cfg.data_dir) == EMBEDDED_DATA_DIR
    return cfg, checkpoint, embedded


def check_config(cfg, world_size):
    micro = cfg.B * cfg.T * world_size
    if cfg.T > cfg.block_size:
        raise SystemExit(f"T={cfg.T} is longer than the model's block_size={cfg.block_size}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.total_batch_size % micro:
        raise SystemExit(
            f"total_batch_size={cfg.total_batch_size} is not divisible by B * T * world_size = "
            f"{cfg.B} * {cfg.T} * {world_size} = {micro}"
        )
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype {cfg.dtype}: expected auto, float32, bfloat16 or float16")
    if min(cfg.B, cfg.T, cfg.max_steps, cfg.eval_interval, cfg.checkpoint_interval) < 1:
        raise SystemExit("B, T, max_steps, eval_interval and checkpoint_interval must be positive")


def git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class StopSignal:
    """While active, remembers SIGTERM / SIGINT so the loop can finish its step and checkpoint
    before exiting (preemption, Ctrl-C). A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train_step(model, optimizer, loader, grad_accum_steps, env, autocast, scaler, grad_clip):
    """One optimizer step over grad_accum_steps micro-batches.

    Returns (loss, grad norm, updated). A non-finite loss or gradient norm skips the update, so
    the weights and the optimizer state stay as they were.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=env.device)
    for micro_step in range(grad_accum_steps):
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
    finite = bool(torch.isfinite(loss_accum)) and (
        scaler.is_enabled() or bool(torch.isfinite(norm))
    )
    if finite:
        scaler.step(optimizer)  # with fp16 loss scaling, this itself skips steps with inf gradients
    else:
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    return loss_accum.item(), norm.item(), finite


def trim_log(log_file, step):
    """On resume, drop the log lines of the steps the resumed run will redo (step and later)."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        keep = [line for line in f if line.split() and int(line.split()[0]) < step]
    with atomic_open(log_file, "w") as f:
        f.writelines(keep)


def build_model(cfg, checkpoint):
    """The model to train: resumed, started from pretrained weights, or fresh with GPT-2's init."""
    if checkpoint is not None:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    elif cfg.init_from.endswith(".pt"):
        init = load_checkpoint(cfg.init_from, cfg.log_dir)
        model = GPT(GPTConfig(**init["model_config"]))
        model.load_state_dict(init["model"])
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FIELDS}))
    return model


def load_hellaswag(cfg, env, embedded):
    """The HellaSwag val examples, or None when HellaSwag is off for this run.

    By default it runs with FineWeb data only, and a missing file that cannot be downloaded
    turns it off with a message; asked for explicitly (--hellaswag 1), that is an error.
    """
    if not (cfg.hellaswag if cfg.hellaswag is not None else not embedded):
        return None
    import hellaswag  # it imports this file: import it only when it is needed

    path = cfg.hellaswag_path or os.path.join(hellaswag.DATA_CACHE_DIR, "hellaswag_val.jsonl")
    try:
        if env.local_rank == 0 and not cfg.hellaswag_path:
            hellaswag.download("val")  # once per node
        if env.ddp:
            dist.barrier()
        examples = list(hellaswag.iterate_examples("val", path))
    except SystemExit as e:
        if cfg.hellaswag == 1:
            raise
        env.print0(f"HellaSwag is off for this run: {e}")
        return None
    longest = max(hellaswag.render_example(ex)[1].size(1) for ex in examples)
    if longest > cfg.block_size:
        message = f"HellaSwag needs block_size >= {longest}, the model has {cfg.block_size}"
        if cfg.hellaswag == 1:
            raise SystemExit(message)
        env.print0(f"HellaSwag is off for this run: {message}")
        return None
    return examples


def main(argv=None):
    start_time = time.time()
    overrides = parse_args(argv)
    cfg, checkpoint, embedded = resolve_config(overrides)
    env = setup_distributed(cfg.device)
    if env.device_type == "cpu":
        keep_freed_cpu_memory()
    try:
        with StopSignal() as stop:
            signum = train(cfg, env, checkpoint, embedded, stop, start_time)
        if env.ddp:
            # the ranks leave together: gloo aborts a process whose peers tear down the group
            # while it still works (rank 0 saving the last checkpoint, say)
            dist.barrier()
    finally:
        if env.ddp:
            dist.destroy_process_group()
    if signum:
        raise SystemExit(128 + signum)


def train(cfg, env, checkpoint, embedded, stop, start_time):
    """The training run; returns 0 when done, or the number of the signal that stopped it."""
    check_config(cfg, env.world_size)  # before anything slow
    print0 = env.print0
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    if embedded:
        print0(
            f"no FineWeb shards in ./{TrainConfig.data_dir}: training a small model on the "
            f"bundled corpus ({CORPUS_DIR})"
        )
        if env.local_rank == 0:
            prepare_embedded_corpus(cfg.data_dir)
        if env.ddp:
            dist.barrier()  # the other ranks read the shards just written
    enc = get_tokenizer()

    # model
    raw_model = build_model(cfg, checkpoint)  # evaluation, sampling, checkpoints use this module
    model_config = raw_model.config
    cfg = dataclasses.replace(cfg, **dataclasses.asdict(model_config))  # --init_from sets these
    check_config(cfg, env.world_size)  # again, for the shape --init_from brought
    raw_model.to(env.device)
    model = raw_model
    use_compile = cfg.compile if cfg.compile is not None else env.device_type == "cuda"
    if use_compile:
        model = torch.compile(model)
    if env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
    dtype = autocast_dtype(cfg.dtype, env.device_type)
    autocast = autocast_context(dtype, env.device_type)
    # fp16 needs loss scaling so that small gradients do not underflow; bf16 has fp32's range
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == torch.float16)
    optimizer = raw_model.configure_optimizers(
        cfg.weight_decay, cfg.max_lr, env.device_type, print0
    )

    # data
    train_loader = DataLoaderLite(
        cfg.B,
        cfg.T,
        env.rank,
        env.world_size,
        "train",
        cfg.data_dir,
        shuffle=bool(cfg.shuffle),
        seed=cfg.seed,
        vocab_size=enc.n_vocab,
    )
    val_loader = DataLoaderLite(
        cfg.B, cfg.T, env.rank, env.world_size, "val", cfg.data_dir, vocab_size=enc.n_vocab
    )
    # a fixed number of val tokens, whatever the world size and B; fewer if the split is smaller
    val_steps = cfg.val_loss_steps * cfg.total_batch_size // (cfg.B * cfg.T * env.world_size)
    val_steps = max(1, min(val_steps, sum(val_loader.num_sequences) // (cfg.B * env.world_size)))
    hella_examples = load_hellaswag(cfg, env, embedded)

    start_step, tokens_seen, val_loss = 0, 0, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        start_step, tokens_seen = checkpoint["step"], checkpoint["tokens_seen"]
        val_loss = checkpoint["val_loss"]
        print0(f"resumed from {checkpoint['path']} at step {start_step}")

    # logging: log.txt holds only the train / val / hella lines; run.json describes the run
    os.makedirs(cfg.log_dir, exist_ok=True)
    log_file = os.path.join(cfg.log_dir, "log.txt")
    if env.master_process:
        if checkpoint is None:
            open(log_file, "w").close()
        else:
            trim_log(log_file, start_step)
        run_info = dict(
            config=dataclasses.asdict(cfg),
            git_commit=git_commit(),
            torch=torch.__version__,
            device=env.device,
            world_size=env.world_size,
            dtype=str(dtype),
            compile=bool(use_compile),
            resumed_from=checkpoint["path"] if checkpoint else None,
        )
        with open(os.path.join(cfg.log_dir, "run.json"), "w") as f:
            json.dump(run_info, f, indent=2)

    def log(line):
        if env.master_process:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    def save(step):
        if env.master_process:
            path = checkpoint_path(cfg.log_dir, step)
            save_checkpoint(
                path,
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "model_config": dataclasses.asdict(model_config),
                    "train_config": dataclasses.asdict(cfg),
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "val_loss": val_loss,
                    "loader": train_loader.state_dict(),
                    "rng": rng_state(),
                },
            )
            print0(f"saved {path}")

    peak = peak_flops(env.device)
    skipped_in_a_row = 0
    print0(
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {cfg.total_batch_size} "
        f"tokens per step on {env.world_size} x {env.device} ({dtype}), compile={bool(use_compile)}"
    )
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        if step % cfg.eval_interval == 0 or last_step:
            val_loss = evaluate_val_loss(raw_model, val_loader, val_steps, env, autocast)
            print0(f"validation loss: {val_loss:.4f}")
            log(f"{step} val {val_loss:.4f}")
            if hella_examples is not None:
                import hellaswag

                _, correct_norm, total = hellaswag.evaluate(
                    lambda tokens: raw_model(tokens)[0],
                    hella_examples,
                    env.device,
                    autocast,
                    env.rank,
                    env.world_size,
                )
                print0(f"HellaSwag accuracy: {correct_norm}/{total}={correct_norm / total:.4f}")
                log(f"{step} hella {correct_norm / total:.4f}")
            if step > 0 and env.master_process:
                for text in sample(
                    raw_model,
                    enc,
                    "Hello, I'm a language model,",
                    cfg.num_return_sequences,
                    cfg.max_length,
                    env.device,
                    cfg.seed + env.rank,
                    autocast,
                ):
                    print0(f"sample: {text}")
        if step > start_step and (step % cfg.checkpoint_interval == 0 or last_step):
            save(step)
        if last_step:
            break

        t0 = time.time()
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_accum_steps = grad_accum_steps_at(tokens_seen, cfg, env.world_size)
        loss, norm, updated = train_step(
            model, optimizer, train_loader, grad_accum_steps, env, autocast, scaler, cfg.grad_clip
        )
        if env.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens = grad_accum_steps * cfg.B * cfg.T * env.world_size
        tokens_seen += tokens
        if updated:
            skipped_in_a_row = 0
            rate = tokens / dt / env.world_size  # per device
            mfu_text = f" | mfu {100 * mfu(model_config, cfg.T, rate, peak):.2f}%" if peak else ""
            print0(
                f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                f"dt {1000 * dt:.2f}ms | tok/sec {tokens / dt:.2f}{mfu_text}"
            )
            log(f"{step} train {loss:.6f}")
        else:
            skipped_in_a_row += 1
            print0(
                f"step {step:5d} | non-finite loss {loss} or grad norm {norm}: update skipped "
                f"({skipped_in_a_row} in a row)"
            )
            if skipped_in_a_row >= cfg.max_skipped_steps:
                raise SystemExit(
                    f"stopping: {skipped_in_a_row} non-finite steps in a row at step "
                    f"{step}; lower --max_lr or resume from an earlier checkpoint"
                )
        signum = stop.signum
        if env.ddp:  # a signal may reach the ranks at different steps: all stop at the first
            signum_t = torch.tensor(signum, device=env.device)
            dist.all_reduce(signum_t, op=dist.ReduceOp.MAX)
            signum = int(signum_t.item())
        if signum:
            save(step + 1)
            print0(
                f"stopped by {signal.Signals(signum).name} after step {step}; continue with: "
                f"python train_gpt2.py --resume latest --log_dir {cfg.log_dir}"
            )
            return signum

    print0(
        f"done: {cfg.max_steps} steps in {time.time() - start_time:.0f}s, final val loss "
        f"{val_loss:.4f}; log in {log_file}"
    )
    if embedded:
        print0(
            "This was a small model on the bundled corpus. For the real GPT-2 (124M) run, get "
            "FineWeb-Edu 10B (about 20GB of token shards) with `python fineweb.py`, then run "
            "`torchrun --standalone --nproc_per_node=8 train_gpt2.py`."
        )
    return 0


if __name__ == "__main__":
    main()
