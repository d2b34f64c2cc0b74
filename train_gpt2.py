"""
Reproduce GPT-2 (124M) from scratch: the model, the data loader and the training loop in one file.

On a fresh machine with no FineWeb shards this trains a small model on the bundled public-domain
corpus in a few minutes on a CPU. With shards from `python fineweb.py` in edu_fineweb10B/, the
defaults are the GPT-2 124M reproduction (10B tokens, 19073 steps of 2**19 tokens).

    python train_gpt2.py                                     # CPU, Apple MPS or one GPU
    python train_gpt2.py --max_steps 50 --B 16 --T 512       # any setting: see --help
    python train_gpt2.py --recipe speedrun                   # the modern recipe (speedrun.py)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # one node, 8 GPUs
    # several nodes: run on every node, with its own --node_rank and the first node's address
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 train_gpt2.py
    python train_gpt2.py --resume auto      # continue from the newest checkpoint, if there is one
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --model gpt2-xl --shard fsdp \\
        --activation_checkpointing 1                         # GPT-2 XL, sharded (sharding.py)
"""

import contextlib
import dataclasses
import math
import os
import signal
import time
import typing
from dataclasses import dataclass

from support import cli

if __name__ == "__main__":  # torch takes a second or two to import: a Ctrl-C then is one line
    signal.signal(signal.SIGINT, cli.stop_at_start_up)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dashboards
import evals
import model_kernels
import sharding
import speedrun
from generation import print_samples, token_positions
from support import checkpoints, datafiles, devices, hf_gpt2, rundir
from support.cli import ON_OFF, setting
from support.datafiles import BUNDLED, BUNDLED_DEFAULTS, BUNDLED_NEXT, GPT2_VOCAB_SIZE
from support.run_control import StopSignal, agree, exits_in_one_line, gather, rendezvous_store

PADDED_VOCAB_SIZE = 50304  # 50257 padded to a multiple of 128: faster on tensor cores
RECIPES = ("gpt2", "speedrun")  # this file's GPT, speedrun.py's SpeedrunGPT: see get_recipe

# -----------------------------------------------------------------------------
# The model: GPT-2 (with Hugging Face's GPT2LMHeadModel's parameter names)


@dataclass
class GPTConfig(speedrun.ModelSettings):
    """The model's shape; each field is also a flag of train_gpt2.py (TrainConfig has them).
    The speedrun recipe's switches of its model (speedrun.ModelSettings) come first: GPT ignores
    them."""

    block_size: int = setting(1024, "longest context the model handles", minimum=1)
    vocab_size: int = setting(GPT2_VOCAB_SIZE, "50,000 BPE merges + 256 bytes + <|endoftext|>")
    n_layer: int = setting(12, "transformer blocks", minimum=1)
    n_head: int = setting(12, "attention heads", minimum=1)
    n_embd: int = setting(768, "embedding width", minimum=1)
    recipe: str = setting("gpt2", "gpt2: the lecture's; speedrun: speedrun.py's", choices=RECIPES)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # its slot in a generation.KVCache

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): the heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            # flash attention on GPU: the (T, T) attention matrix is never materialized in memory
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # generation: attend to the cached keys and values too
            k, v = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


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
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # pre-LayerNorm (GPT-2 paper, section 2.3): the residual stream itself is never normalized
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config, fused_loss=False):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017), as in GPT-2: the token embedding is the output layer
        self.transformer.wte.weight = self.lm_head.weight
        self.fused_loss = fused_loss  # linear_cross_entropy instead of the full logits
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

    def forward(self, idx, targets=None, cache=None):
        """(logits, loss). With a generation.KVCache, idx continues the cached rows and only the
        last position's logits are computed; with fused_loss and targets, logits are None."""
        x = self.hidden(idx, cache)
        if cache is not None:
            x = x[:, -1:]  # generation needs the next token only
        if targets is not None and self.fused_loss:
            return None, model_kernels.linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.head(x)
        loss = None if targets is None else self.cross_entropy(logits, targets)
        return logits, loss

    @staticmethod
    def cross_entropy(logits, targets):
        """The mean loss over all positions. Over the whole padded vocabulary, as in the lecture:
        the model learns in a few steps to push the never-seen padded ids down, and losses match
        the reference's."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def hidden(self, idx, cache=None):
        """The final (normalized) hidden state of every position: (B, T, n_embd)."""
        pos = token_positions(idx, cache, self.config.block_size)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)

    def head(self, x):
        """Logits from hidden states (..., n_embd)."""
        return self.lm_head(x)

    def flops_per_token(self, T):
        """Training FLOPs per token: 6N + 12 L H Q T (PaLM paper, appendix B). N counts the
        parameters that take part in matmuls: all but wpe (the tied wte is the lm_head). 12 L H Q
        T is the attention's QK^T and AV, forward and backward."""
        d, L = self.config.n_embd, self.config.n_layer
        n_params = self.config.vocab_size * d + L * (12 * d * d + 13 * d) + 2 * d
        return 6 * n_params + 12 * L * d * T

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load OpenAI's GPT-2 weights (a preset name) or a local Hugging Face GPT-2 directory."""
        hf_model = hf_gpt2.load_hf_gpt2(name_or_path)
        model = cls(GPTConfig(**hf_gpt2.shape_of(hf_model.config, name_or_path)))
        names = model.state_dict().keys()
        model.load_state_dict(hf_gpt2.weights_from_hf(hf_model.state_dict(), names, name_or_path))
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


# -----------------------------------------------------------------------------
# Data: DataLoaderLite over token shards


class DataLoaderLite:
    """Batches of B sequences of T tokens from token shards, split across processes.

    The shards are cut into sequences of T + 1 tokens, visited in file order or shuffled per
    epoch (datafiles.ShardSequences, which also checks their token ids at once and knows where a
    resumed run takes up). Each micro-step the whole world takes the next B * num_processes
    sequences and rank r gets the r-th B of them; batches run across shard boundaries, so no
    rank skips a shard's tail. With shuffle off, a batch is the lecture's B * T + 1 tokens.
    """

    def __init__(
        self, B, T, process_rank, num_processes, split, data_dir, shuffle=False, seed=1337
    ):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        where = (process_rank, num_processes)
        self.sequences = datafiles.ShardSequences(data_dir, split, T, shuffle, seed, *where)

    def reset(self):
        self.sequences.reset()

    def state_dict(self):
        # the world's position in the stream, the same on every rank
        return self.sequences.state_dict()

    def load_state_dict(self, state):
        self.sequences.load_state_dict(state)

    def next_batch(self):
        self.sequences.skip(self.B * self.process_rank)
        buf = torch.from_numpy(self.sequences.take(self.B).astype(np.int64))
        self.sequences.skip(self.B * (self.num_processes - self.process_rank - 1))
        x = buf[:, :-1].contiguous()  # inputs
        y = buf[:, 1:].contiguous()  # targets: the next token at every position
        return x, y


# -----------------------------------------------------------------------------
# Optimization: the learning-rate schedule, the batch-size ramp, and the recipe


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


def set_learning_rate(optimizer, step, cfg):
    """Every parameter group at get_lr(step); returns it."""
    lr = get_lr(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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


@dataclass(frozen=True)
class Recipe:
    """What a recipe decides; the rest of a run is the same for every recipe. Its optimizer and
    schedule take the run's settings (cfg) and give the recipe's code what it needs."""

    model: type  # model(GPTConfig)
    make_optimizer: typing.Callable  # (model, cfg, device_type, log) -> optimizer
    set_learning_rate: typing.Callable  # (optimizer, step, cfg) -> the lr printed
    set_model_schedule: typing.Callable  # (model, step, cfg): what else of it changes by step
    micro_batch: typing.Callable  # (step, cfg) -> the step's B: the recipe's batch schedule
    shards: bool  # whether --shard fsdp can train it (Muon needs whole matrices: it cannot)


def same_model_every_step(model, step, cfg):
    """The lecture's model has nothing that changes with the step."""


def same_micro_batch_every_step(step, cfg):
    return cfg.B  # the lecture's micro-batch is --B throughout


def make_adamw(model, cfg, device_type, log):
    return model.configure_optimizers(cfg.weight_decay, cfg.max_lr, device_type, log)


def get_recipe(name):
    """--recipe gpt2, the lecture's (GPT, AdamW, warmup and cosine decay), or speedrun (its model,
    Muon and schedules in speedrun.py; speedrun.Settings in TrainConfig): where one is chosen."""
    if name == "speedrun":
        run = (speedrun.set_learning_rate, speedrun.set_model_schedule, speedrun.micro_batch)
        return Recipe(speedrun.SpeedrunGPT, speedrun.make_optimizer, *run, shards=False)
    schedule = (set_learning_rate, same_model_every_step, same_micro_batch_every_step)
    return Recipe(GPT, make_adamw, *schedule, shards=True)


# -----------------------------------------------------------------------------
# Distributed training: one process per device under torchrun (DDP)


@dataclass
class DistEnv:
    distributed: bool  # a process group is up (torchrun's, or FSDP's group of one process)
    rank: int
    local_rank: int
    world_size: int
    device: str
    master_process: bool
    # gloo group for the small collectives that decide things on the host (stop requests, whether
    # every rank's start-up worked): they never wait for the GPU. None: the default group.
    cpu_group: object = None

    @classmethod
    def one_process(cls, device):  # no torchrun, no FSDP: no process group
        return cls(False, 0, 0, 1, device, True)

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def print0(self, *args, **kwargs):
        if self.master_process:
            try:
                print(*args, **kwargs, flush=True)
            except OSError:  # its reader left (`| head`) or its terminal closed: the run stops
                cli.discard_stdout()  # on the SIGPIPE or SIGHUP that came with it (StopSignal)


def setup_distributed(device="", sharded=False):
    """One process per device under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), else one:
    a process group of its own where the model is sharded (FSDP needs one)."""
    device = devices.check_device(device or devices.default_device())
    if "RANK" not in os.environ and not sharded:
        return DistEnv.one_process(device)
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    store = rendezvous_store()  # torchrun's, or for one process in its own memory
    cpu_group = None
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device), **store)
        cpu_group = dist.new_group(backend="gloo")
    elif device == "cpu":
        dist.init_process_group(backend="gloo", **store)
    else:
        raise SystemExit(f"distributed training needs cuda (nccl) or cpu (gloo), not {device}")
    return DistEnv(True, rank, local_rank, world_size, device, rank == 0, cpu_group)


def all_reduce_mean(value, env):
    """Average a tensor over the ranks, in place (a sum and a division: gloo has no AVG)."""
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


# -----------------------------------------------------------------------------
# Evaluation: val loss, HellaSwag and samples


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
        x, y = devices.to_device(x, env.device), devices.to_device(y, env.device)
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    return all_reduce_mean(total / steps, env).item()


class Evaluator:
    """What every eval_interval steps measures and prints: the val loss (on the compiled model,
    which has the training shapes) and its bits per byte, evals.LOOP_EVALS and samples; each part
    stops at a stop request."""

    def __init__(self, cfg, env, model, state, val_loader, loop_evals, autocast, stop, log):
        self.cfg, self.env, self.autocast, self.stop, self.log = cfg, env, autocast, stop, log
        self.model, self.state, self.val_loader, self.evals = model, state, val_loader, loop_evals
        # a fixed number of val tokens, whatever the world size and B; fewer if the split is smaller
        steps = cfg.val_loss_steps * cfg.total_batch_size // (cfg.B * cfg.T * env.world_size)
        available = sum(val_loader.sequences.num_sequences) // (cfg.B * env.world_size)
        self.val_steps = max(1, min(steps, available))
        self.val_bytes = evals.val_text_bytes(val_loader, self.val_steps, env) if cfg.bpb else None

    def warm_up(self):
        """Compile the evaluation graphs now, at start-up, where a stop loses nothing, rather than
        at the first evaluation: one val batch, and HellaSwag's."""
        with torch.no_grad(), self.autocast:
            x = devices.to_device(self.val_loader.next_batch()[0], self.env.device)
            self.model(x, x)
        for evaluation in self.evals:
            evaluation.warm_up(self.env.device, self.autocast)

    def run(self, step):
        """Evaluate after `step` steps, the time it takes told to the ETA."""
        with self.log.evaluation():
            self.measure(step)

    def measure(self, step):
        """Val loss, HellaSwag and samples; returns early when a stop is requested."""
        env, requested = self.env, self.stop.requested
        args = (self.model, self.val_loader, self.val_steps, env, self.autocast, requested)
        val_loss = evaluate_val_loss(*args)
        if val_loss is None:
            return
        self.state.val_loss = self.state.last_loss = val_loss
        env.print0(f"validation loss: {val_loss:.4f}")
        self.log.write(step, "val", f"{val_loss:.4f}")
        if self.val_bytes:  # nats over every val token / (ln 2 x the bytes of their text)
            bpb = val_loss * self.val_steps * self.cfg.B * self.cfg.T * env.world_size
            bpb /= math.log(2) * self.val_bytes
            env.print0(f"validation bits per byte: {bpb:.4f}")
            self.log.write(step, "bpb", f"{bpb:.4f}")
        for evaluation in self.evals:
            value = evaluation.score(env, self.autocast, requested)
            if value is None:  # a stop request cut it short, or a diverged model: no samples
                return
            self.log.write(step, evaluation.kind, f"{value:.4f}")
        # a sharded model generates on every rank (each gathers the weights), the master prints
        cfg, model = self.cfg, self.state.model
        if step > 0 and not requested() and (env.master_process or sharding.is_sharded(model)):
            count, seed = cfg.num_return_sequences, cfg.seed + env.rank
            texts = print_samples(model, count, cfg.max_length, seed, self.autocast, env.print0)
            self.log.samples(step, texts)


# -----------------------------------------------------------------------------
# Checkpoints and resume

# what TrainingState.state_dict saves
CHECKPOINT_KEYS = tuple("model optimizer scaler model_config train_config step tokens_seen".split())
CHECKPOINT_KEYS += ("val_loss", "loader", "rng")


def model_config_of(checkpoint):
    try:
        return GPTConfig(**speedrun.absent_switches_off(checkpoint["model_config"], GPTConfig))
    except TypeError:  # another program's model_config
        raise SystemExit(f"checkpoint {checkpoint.path} has a foreign model_config") from None


def model_from_checkpoint(checkpoint):
    """The model (of its recipe) that a checkpoint describes, whole, with its weights: finite ones
    (a diverged run's would make every loss and sample NaN)."""
    config = model_config_of(checkpoint)
    model = get_recipe(config.recipe).model(config)
    checkpoints.load_weights(checkpoint, model)
    if not all(torch.isfinite(w).all() for w in model.state_dict().values()):
        raise SystemExit(f"checkpoint {checkpoint.path} holds weights that are not finite")
    return model


def load_model_from_checkpoint(path, log_dir="."):
    """(model with the checkpoint's weights, the checkpoint): the one way every script reads one."""
    checkpoint = checkpoints.load(path, log_dir, keys=("model", "model_config", "step"))
    return model_from_checkpoint(checkpoint), checkpoint


@dataclass
class TrainingState:
    """Everything a checkpoint holds and --resume restores: state_dict and load_state_dict side by
    side, so that nothing is saved without being restored. support/checkpoints.py stores it."""

    model: nn.Module  # the raw (uncompiled, unwrapped) model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoaderLite
    cfg: "TrainConfig"
    tokens_seen: int = 0
    val_loss: float | None = None
    last_loss: float = 0.0  # the model's latest loss, train or val (not saved): is it diverged?

    def state_dict(self, step):
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return {"model": model, "optimizer": optimizer, **self.progress(step)}

    def progress(self, step):
        """All but the weights and the optimizer state."""
        return {
            "scaler": self.scaler.state_dict(),
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": dataclasses.asdict(self.cfg),
            "step": step,
            "tokens_seen": self.tokens_seen,
            "val_loss": self.val_loss,
            "loader": self.loader.state_dict(),
            "rng": checkpoints.rng_state(),
        }

    def load_state_dict(self, checkpoint, print0=print):
        """Restore a checkpoint (the model has its weights already); returns its step, the next one
        to run. The optimizer state is resharded where this run shards otherwise."""
        sharded = sharding.is_sharded(self.model)
        checkpoints.load_optimizer_state(checkpoint, self.model, self.optimizer, sharded)
        self.scaler.load_state_dict(checkpoint["scaler"])
        other_data = checkpoint["loader"].get("data") != self.loader.sequences.fingerprint
        if other_data and self.cfg.resume_allow_new_data:
            print0("the shards differ from the checkpoint's: the new data starts at its beginning")
        else:
            self.loader.load_state_dict(checkpoint["loader"])  # other data: refused, saying why
        checkpoints.set_rng_state(checkpoint["rng"])
        self.tokens_seen, self.val_loss = checkpoint["tokens_seen"], checkpoint["val_loss"]
        return checkpoint["step"]

    def save(self, step, saver):
        """The checkpoint of `step`, by checkpoints.Saver; none of a diverged model: every rank
        stops instead (they agree on the weights and the losses)."""
        finite = sharding.all_finite(self.model.parameters())
        if not (finite and math.isfinite(self.last_loss)):
            what = "its loss is" if finite else "its weights are"
            raise SystemExit(
                f"the model has diverged after step {step - 1} ({what} not finite): not saved; "
                f"lower --max_lr ({checkpoints.last_saved(self.cfg.log_dir)})"
            )
        saver.save(step, self, sharding.is_sharded(self.model))


# -----------------------------------------------------------------------------
# Settings: TrainConfig, its flags, and the checks before anything runs


MODEL_HELP = "a GPT-2 shape, and GPT-3's lr for its size (default: the --n_* flags)"
ATTENTION_HELP = "the SDPA kernel; auto: the fastest that agrees with the math one"
MICRO_BATCH_HELP = "micro-batch size; auto: the largest that fits on CUDA, else 64 (default: auto)"


@dataclass
class TrainConfig(model_kernels.Settings, speedrun.Settings, GPTConfig):
    """Every setting of a run; each field is also a command-line flag (--name value).

    The model's shape and recipe (GPTConfig's fields), the speedrun recipe's own settings and the
    kernels' (speedrun.Settings, model_kernels.Settings, declared there), then how to train it.
    The defaults are the GPT-2 124M reproduction on FineWeb-Edu 10B (GPT-3 paper, table 2.1 and
    appendix B, as in the lecture); the bundled corpus's run replaces some (BUNDLED_DEFAULTS).
    """

    vocab_size: int = setting(PADDED_VOCAB_SIZE, "padded to 128s: faster", minimum=GPT2_VOCAB_SIZE)

    data_dir: str = setting("edu_fineweb10B", "token shards made by fineweb.py, or 'bundled'")
    log_dir: str = setting("log", "where log.txt, run.json and checkpoints go")
    tensorboard: int = setting(0, "TensorBoard event files in log_dir", choices=ON_OFF)
    wandb_project: str = setting("", "log to this Weights & Biases project (default: none)")
    wandb_run_name: str = setting("", "the W&B run's name (default: W&B's own)")
    model: str = setting("", MODEL_HELP, choices=tuple(hf_gpt2.GPT2_PRESETS))
    init_from: str = setting("", "start from gpt2[-medium|-large|-xl], a HF dir, .pt or .dcp")
    B: int | None = setting(None, MICRO_BATCH_HELP, minimum=1, parse=cli.parse_auto_or_int)
    T: int = setting(1024, "sequence length of a training sample", minimum=1)
    total_batch_size: int = setting(524288, "tokens per optimizer step: 2**19 (0.5M)", minimum=1)
    batch_ramp_tokens: int = setting(0, "GPT-3 batch ramp: tokens over which the batch grows")
    batch_ramp_start: int = setting(32768, "GPT-3 batch ramp: the first batch's tokens", minimum=1)
    max_lr: float = setting(6e-4, "peak learning rate", above=0)
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak", minimum=0, maximum=1)
    warmup_steps: int = setting(715, "linear warmup: 375M tokens (GPT-3) / 2**19", minimum=0)
    max_steps: int = setting(19073, "optimizer steps: 10B tokens / 2**19 is one epoch", minimum=1)
    weight_decay: float = setting(0.1, "AdamW weight decay of matmuls and embeddings", minimum=0)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", above=0)
    fused_loss: int = setting(0, "lm_head and loss in chunks: no full logits", choices=ON_OFF)
    fp8: int = setting(0, "the blocks' matmuls in FP8 (compute capability 8.9+)", choices=ON_OFF)
    max_skipped_steps: int = setting(5, "stop after this many non-finite steps in a row", minimum=1)
    eval_interval: int = setting(250, "steps between val loss, HellaSwag, samples", minimum=1)
    val_loss_steps: int = setting(20, "val loss over this many total_batch_size", minimum=1)
    hellaswag: int | None = setting(None, "HellaSwag (default: on for FineWeb)", choices=ON_OFF)
    hellaswag_path: str = setting("", "local hellaswag_val.jsonl (default: downloaded)")
    core: int = setting(0, "CORE: N examples of each task at every evaluation (0: off)", minimum=0)
    core_bundle: str = setting("", "CORE's eval bundle, a dir or zip (default: downloaded)")
    bpb: int = setting(0, "the val loss in bits per byte too", choices=ON_OFF)
    num_return_sequences: int = setting(4, "samples printed at each evaluation", minimum=0)
    max_length: int = setting(32, "tokens per sample, prompt included", minimum=1)
    checkpoint_interval: int = setting(5000, "steps between checkpoints (and the last)", minimum=1)
    checkpoint_minutes: float = setting(0.0, "also save this often (wall time; 0: off)", minimum=0)
    keep_checkpoints: int = setting(0, "keep the newest K and the interval's (0: all)", minimum=0)
    async_checkpoint: int = setting(0, "write checkpoints while training goes on", choices=ON_OFF)
    resume: str = setting("", "a checkpoint path; latest, or auto (latest if any) in log_dir")
    resume_allow_new_data: int = setting(0, "resume on new shards from their start", choices=ON_OFF)
    device: str = setting("", "cuda, cuda:1, mps or cpu (default: the best available)")
    dtype: str = setting("auto", "autocast dtype", choices=("auto", *cli.DTYPES))
    compile: int | None = setting(None, "torch.compile (default: on CUDA)", choices=ON_OFF)
    attention: str = setting("auto", ATTENTION_HELP, choices=model_kernels.ATTENTION_CHOICES)
    shard: str = setting("ddp", "ddp: whole models; fsdp: sharded ones", choices=("ddp", "fsdp"))
    activation_checkpointing: int = setting(0, "recompute blocks in backward", choices=ON_OFF)
    shuffle: int = setting(1, "shuffle shards and sequences each epoch", choices=ON_OFF)
    seed: int = setting(1337, "seed of init, data order, samples", minimum=0, maximum=2**32 - 1)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))


def parse_args(argv=None):
    """Command-line flags, one per TrainConfig field; returns only the settings given."""
    parser = cli.ArgumentParser(description="Train GPT-2. " + TrainConfig.__doc__.split("\n")[0])
    return vars(cli.add_flags(parser, TrainConfig).parse_args(argv))


def resolve_config(overrides):
    """(the run's settings, the checkpoint it resumes or None): the flags given, then the resumed
    checkpoint's settings, then the bundled corpus's or the 124M defaults; with --init_from, the
    shape of the weights it names. Refuses, before anything slow or written, settings out of
    range or that do not fit together, a log dir of another run, and a resume that would go
    back on what a checkpoint already holds."""
    checkpoint, base = None, TrainConfig()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if overrides.get("model"):
        overrides = with_model_preset(overrides)
    log_dir = overrides.get("log_dir", base.log_dir)
    restart = overrides.get("resume") == "auto"  # the first start and every restart alike
    if restart:
        overrides = dict(overrides, resume=checkpoints.latest_checkpoint(log_dir) or "")
    if overrides.get("resume") and overrides.get("init_from"):
        raise SystemExit("--resume and --init_from exclude each other: a resumed run has weights")
    if overrides.get("resume"):
        checkpoint = checkpoints.load(overrides["resume"], log_dir, CHECKPOINT_KEYS)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = {k: v for k, v in checkpoint["train_config"].items() if k in known}
        base = TrainConfig(**speedrun.absent_switches_off(saved, TrainConfig))
        if os.path.abspath(base.data_dir) == datafiles.BUNDLED_SHARDS_DIR:  # older checkpoints
            base = dataclasses.replace(base, data_dir=BUNDLED)
        model_config = dataclasses.asdict(model_config_of(checkpoint))
        for k in MODEL_FIELDS:
            if k in overrides and overrides[k] != model_config[k]:
                raise SystemExit(
                    f"checkpoint {checkpoint.path} has {k}={model_config[k]}, "
                    f"but {k}={overrides[k]} was requested"
                )
    else:
        if overrides.get("init_from") and set(MODEL_FIELDS) & set(overrides):
            raise SystemExit(
                "--init_from takes the model's shape from its weights: drop "
                + ", ".join(f"--{k}" for k in MODEL_FIELDS if k in overrides)
            )
        if "data_dir" not in overrides and not datafiles.list_shards(base.data_dir, "train"):
            datafiles.check_bundled_may_replace(base.data_dir, world_size)
            base = dataclasses.replace(base, data_dir=BUNDLED)
        if overrides.get("data_dir", base.data_dir) == BUNDLED:
            base = dataclasses.replace(base, **BUNDLED_DEFAULTS)
    cfg = dataclasses.replace(base, **overrides)
    cli.check_ranges(cfg)
    if checkpoint is None and cfg.init_from:
        shape = init_shape(cfg)
        cfg = dataclasses.replace(cfg, **{k: getattr(shape, k) for k in MODEL_FIELDS})
    check_config(cfg, world_size)
    if checkpoint is not None and cfg.max_steps < checkpoint["step"]:
        raise SystemExit(
            f"--max_steps {cfg.max_steps} is below the step of the checkpoint to resume "
            f"({checkpoint['step']})"
        )
    rundir.check_log_dir(cfg.log_dir, checkpoint, restart)
    return cfg, checkpoint


def with_model_preset(overrides):
    """--model: the shape of one of OpenAI's four GPT-2s, and its GPT-3 learning rate unless
    --max_lr is given or the run resumes (its checkpoint has one)."""
    given = [f"--{k}" for k in ("n_layer", "n_head", "n_embd", "init_from") if k in overrides]
    if given:
        raise SystemExit(f"--model {overrides['model']} sets the shape: drop {', '.join(given)}")
    preset = hf_gpt2.preset_settings(overrides["model"], with_lr=not overrides.get("resume"))
    return {**preset, **overrides}


def init_shape(cfg):
    """The GPTConfig of the weights --init_from names: a checkpoint of ours, OpenAI's GPT-2 or a
    Hugging Face directory."""
    if cfg.init_from.endswith(".pt") or checkpoints.is_sharded_checkpoint(cfg.init_from):
        keys = ("model", "model_config", "step")
        return model_config_of(checkpoints.load(cfg.init_from, cfg.log_dir, keys))
    return GPTConfig(**hf_gpt2.pretrained_shape(cfg.init_from))


def check_config(cfg, world_size):
    """Refuse, in one line, settings that do not fit together."""
    if cfg.T > cfg.block_size:
        raise SystemExit(f"T={cfg.T} is longer than the model's block_size={cfg.block_size}")
    if cfg.max_length > cfg.block_size:
        raise SystemExit(f"--max_length {cfg.max_length} is longer than block_size")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.fp8 and (cfg.n_embd % 16 or cfg.T % 16):
        raise SystemExit(f"--fp8 needs n_embd and T divisible by 16, not {cfg.n_embd} and {cfg.T}")
    shardable = get_recipe(cfg.recipe).shards and not cfg.fp8 and cfg.dtype != "float16"
    if cfg.shard == "fsdp" and not shardable:
        raise SystemExit(
            "--shard fsdp trains the gpt2 recipe in bf16 or fp32, without --fp8: use DDP for the "
            "speedrun recipe (Muon orthogonalizes whole matrices), fp8 and float16"
        )
    micro = (cfg.B or 1) * cfg.T * world_size
    if cfg.B is not None and cfg.total_batch_size % micro:
        raise SystemExit(
            f"total_batch_size={cfg.total_batch_size} is not divisible by B * T * world_size = "
            f"{cfg.B} * {cfg.T} * {world_size} = {micro}"
        )
    dashboards.check_packages(cfg.tensorboard, cfg.wandb_project, cfg.wandb_run_name)


# -----------------------------------------------------------------------------
# The training loop


def build_model(cfg, checkpoint):
    """The model to train: resumed, started from pretrained weights, or fresh with its init."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    elif cfg.init_from.endswith(".pt") or checkpoints.is_sharded_checkpoint(cfg.init_from):
        model, _ = load_model_from_checkpoint(cfg.init_from, cfg.log_dir)
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        config = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FIELDS})
        try:
            model = get_recipe(cfg.recipe).model(config)
        except ValueError as e:  # a shape the recipe cannot build
            raise SystemExit(str(e)) from None
    model.fused_loss = bool(cfg.fused_loss)
    if cfg.fp8:
        model_kernels.use_fp8_matmuls(model, cfg.fp8_kernels)
    if cfg.activation_checkpointing:
        sharding.checkpoint_activations(model)
    return model


def wrap_model(raw_model, cfg, env, dtype, use_compile):
    """(the model a step trains, the compiled one that evaluation runs): compiled as asked and
    DDP-wrapped under torchrun, or sharded by FSDP in place (raw_model is then the sharded one)."""
    if cfg.shard == "fsdp":
        model = sharding.shard_model(raw_model, dtype, use_compile)
        return model, model
    compiled = torch.compile(raw_model) if use_compile else raw_model
    device_ids = [env.local_rank] if env.device_type == "cuda" else None
    return (DDP(compiled, device_ids=device_ids) if env.distributed else compiled), compiled


def settle_micro_batch(cfg, env, model, autocast):
    """cfg with --B auto made a number: on CUDA the largest that fits (a trial step each, from 64
    down), elsewhere the largest up to 64; FSDP keeps a rank's share of the optimizer state."""
    if cfg.B is not None:
        return cfg
    on_gpu, shares = env.device_type == "cuda", env.world_size if cfg.shard == "fsdp" else 1
    fits = devices.micro_batch_fits(model, cfg.T, env.device, autocast, shares) if on_gpu else None
    B = devices.largest_micro_batch(fits, cfg.total_batch_size, cfg.T, env.world_size)
    env.print0(f"micro-batch B={B}" + (" (the largest that fits in memory)" if on_gpu else ""))
    return dataclasses.replace(cfg, B=B)


def train_step(
    model, optimizer, loader, grad_accum_steps, env, autocast, scaler, grad_clip, should_stop=None
):
    """One optimizer step over grad_accum_steps micro-batches: (loss, grad norm, updated), with
    one host synchronization. A non-finite loss or gradient norm, or inf gradients that the fp16
    loss scaler skips, leave the weights and the optimizer state as they were (updated False).
    If should_stop() says so between two micro-batches, the step is undone (the loader rewound,
    the gradients dropped) and None is returned: the state is the last completed step's."""
    start = loader.state_dict()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=env.device)
    for micro_step in range(grad_accum_steps):
        if micro_step > 0 and should_stop is not None and should_stop():
            optimizer.zero_grad(set_to_none=True)
            loader.load_state_dict(start)
            return None
        x, y = loader.next_batch()
        x, y = devices.to_device(x, env.device), devices.to_device(y, env.device)
        # DDP all-reduces (FSDP reduce-scatters) gradients in backward; only the last micro-step
        # needs that
        last = micro_step == grad_accum_steps - 1
        if sharding.is_sharded(model):
            sharding.accumulate_gradients(model, last)
        with contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            # cross-entropy is a mean over its micro-batch; dividing by the number of micro-batches
            # makes the accumulated gradient that of the mean over the whole batch
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    all_reduce_mean(loss_accum, env)
    scaler.unscale_(optimizer)
    norm = sharding.full(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
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


def step_line(step, loss, lr, norm, dt, tokens, rate_mfu, eta):
    """The line printed after every step; eta: the time left, as dashboards.format_eta says it."""
    mfu_text = f" | mfu {100 * rate_mfu:.2f}%" if rate_mfu is not None else ""
    return (
        f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
        f"dt {1000 * dt:.2f}ms | tok/sec {tokens / dt:.2f}{mfu_text} | eta {eta}"
    )


def prepare_data(cfg, env):
    """The shard directory of the run: for --data_dir bundled, the bundled corpus tokenized once
    (by local rank 0 of each node, agreed by all)."""
    if cfg.data_dir != BUNDLED:
        return cfg.data_dir
    shards = datafiles.BUNDLED_SHARDS_DIR
    agree(env, lambda: datafiles.prepare_bundled_corpus(shards) if env.local_rank == 0 else None)
    return shards


def make_loaders(cfg, env, data_dir):
    """The train and val loaders: each rank checks its share of the shards' token ids, and every
    rank must see the same shards; the ranks agree on both before training starts."""

    def loaders():
        common = dict(process_rank=env.rank, num_processes=env.world_size, data_dir=data_dir)
        shuffled = dict(shuffle=bool(cfg.shuffle), seed=cfg.seed)
        train = DataLoaderLite(cfg.B, cfg.T, split="train", **shuffled, **common)
        return train, DataLoaderLite(cfg.B, cfg.T, split="val", **common)

    train_loader, val_loader = agree(env, loaders)
    train, val = train_loader.sequences, val_loader.sequences
    seen = gather(env, (len(train.paths), len(val.paths), train.fingerprint, val.fingerprint))
    if len(set(seen)) > 1:
        counts = ", ".join(f"rank {r}: {s[0]} + {s[1]} shards" for r, s in enumerate(seen))
        message = f"the ranks see different shards in {data_dir} ({counts}): every node needs"
        raise SystemExit(f"{message} the same files" if env.local_rank == 0 else 1)
    return train_loader, val_loader


def make_dashboard(cfg, env, run_log, run_info, checkpoint):
    """log.txt's lines and the ETA; on the master also the dashboards that the flags turn on."""
    dashboard = dashboards.Dashboard(run_log, env.device, cfg.max_steps, cfg.eval_interval)
    if env.master_process:
        start_step = checkpoint["step"] if checkpoint else 0
        here = checkpoint is not None and rundir.resumes_in(checkpoint, cfg.log_dir)
        flags = (cfg.tensorboard, cfg.wandb_project, cfg.wandb_run_name)
        dashboard.start(cfg.log_dir, run_info, start_step, *flags, here)
    return dashboard


@dataclass
class Run:
    """What the training loop works with, made by start_run."""

    cfg: TrainConfig  # with the micro-batch size settled (--B auto)
    recipe: Recipe
    model: nn.Module  # compiled and DDP-wrapped as asked; state.model is the raw one
    autocast: typing.Any
    state: TrainingState  # the raw model, the optimizer, the loss scaler, the train loader
    start_step: int
    evaluator: Evaluator
    dashboard: dashboards.Dashboard  # log.txt's lines and more, on TensorBoard and W&B; the ETA
    saver: checkpoints.Saver  # when to save, what to keep, the save in the background


def start_run(cfg, env, checkpoint, stop):
    """Everything a run needs before its first step, in an order that makes a resumed run's
    random numbers those of the uninterrupted one."""
    print0 = env.print0
    if cfg.fp8:
        model_kernels.check_fp8_device(env.device)
    checkpoints.seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    data_dir = prepare_data(cfg, env)

    # the model, and what trains it
    recipe = get_recipe(cfg.recipe)
    raw_model = build_model(cfg, checkpoint).to(env.device)  # evaluation, sampling, checkpoints
    if cfg.data_dir == BUNDLED:
        print0(f"training {model_size(raw_model)} on the bundled corpus ({datafiles.CORPUS_DIR})")
    use_compile = cfg.compile if cfg.compile is not None else env.device_type == "cuda"
    dtype = devices.autocast_dtype(cfg.dtype, env.device_type)
    autocast = devices.autocast_context(dtype, env.device_type)
    cfg = settle_micro_batch(cfg, env, raw_model, autocast)
    model, compiled = wrap_model(raw_model, cfg, env, dtype, use_compile)
    # fp16 needs loss scaling so that small gradients do not underflow; bf16 has fp32's range
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == torch.float16)
    optimizer = recipe.make_optimizer(raw_model, cfg, env.device_type, print0)

    # data, evaluation and the state a checkpoint holds
    train_loader, val_loader = make_loaders(cfg, env, data_dir)
    loop_evals = evals.for_the_loop(cfg, env, raw_model, compiled is not raw_model)  # no file yet
    state = TrainingState(raw_model, optimizer, scaler, train_loader, cfg)
    start_step = state.load_state_dict(checkpoint, print0) if checkpoint else 0
    if checkpoint:
        print0(f"resumed from {checkpoint.path} at step {start_step}")
    run_log = rundir.RunLog(cfg.log_dir, env.master_process)
    run_info = dict(config=dataclasses.asdict(cfg), torch=torch.__version__, device=env.device)
    run_info.update(world_size=env.world_size, dtype=str(dtype), compile=bool(use_compile))
    agree(env, lambda: run_log.start(run_info, checkpoint, print0))
    dashboard = agree(env, lambda: make_dashboard(cfg, env, run_log, run_info, checkpoint))
    evaluator = Evaluator(
        cfg, env, compiled, state, val_loader, loop_evals, autocast, stop, dashboard
    )
    if use_compile:
        evaluator.warm_up()
    print0(
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {cfg.total_batch_size} "
        f"tokens per step on {env.world_size} x {env.device} ({dtype}), compile={bool(use_compile)}"
    )
    saving = (cfg.checkpoint_interval, cfg.checkpoint_minutes, cfg.keep_checkpoints)
    saver = checkpoints.Saver(cfg.log_dir, env, *saving, background=bool(cfg.async_checkpoint))
    return Run(cfg, recipe, model, autocast, state, start_step, evaluator, dashboard, saver)


def train(cfg, env, checkpoint, stop, start_time):
    """The training run; returns 0 when done, or the number of the signal that stopped it."""
    run = start_run(cfg, env, checkpoint, stop)
    cfg, state = run.cfg, run.state
    flops_per_token, peak = state.model.flops_per_token(cfg.T), devices.peak_flops(env.device)
    skipped_in_a_row = 0
    for step in range(run.start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        run.recipe.set_model_schedule(state.model, step, cfg)  # before this step's evaluation
        if step % cfg.eval_interval == 0 or last_step:
            run.evaluator.run(step)  # val loss, HellaSwag, samples
        if stop.requested():
            return stop_run(run, step, stop, env)
        if step > run.start_step and run.saver.due(step, last_step):
            state.save(step, run.saver)
        if last_step:
            break

        t0 = time.time()
        lr = run.recipe.set_learning_rate(state.optimizer, step, cfg)
        check_finite_rates(state.optimizer, step)
        state.loader.B = run.recipe.micro_batch(step, cfg)
        grad_accum_steps = grad_accum_steps_at(state.tokens_seen, cfg, env.world_size)
        how = (run.model, state.optimizer, state.loader, grad_accum_steps, env, run.autocast)
        result = train_step(*how, state.scaler, cfg.grad_clip, stop.requested)
        if result is None:  # a stop request between micro-steps: the step was undone
            return stop_run(run, step, stop, env)
        devices.synchronize(env.device)
        dt = time.time() - t0
        stop.defer()  # a step is done: from now on a stop saves it first
        loss, norm, updated = result
        if step == run.start_step:  # the gradients and the optimizer state exist from now on
            env.print0(sharding.memory_line(state.model, state.optimizer, env.world_size))
        state.last_loss = loss
        tokens = grad_accum_steps * state.loader.B * cfg.T * env.world_size
        state.tokens_seen += tokens
        rate = tokens / dt / env.world_size  # per device
        util = devices.mfu(flops_per_token, rate, peak) if peak else None
        eta = run.dashboard.log_step(step, state, lr, norm, dt, tokens, util, updated)
        if updated:
            skipped_in_a_row = 0
            env.print0(step_line(step, loss, lr, norm, dt, tokens, util, eta))
            run.dashboard.write(step, "train", f"{loss:.6f}")
        else:
            skipped_in_a_row += 1
            report_skipped_step(step, loss, norm, skipped_in_a_row, cfg, env)

    run.saver.wait()
    env.print0(
        f"done: {cfg.max_steps} steps in {time.time() - start_time:.0f}s, final val loss "
        f"{state.val_loss:.4f}; log in {run.dashboard.run_log.path}"
    )
    if cfg.data_dir == BUNDLED:
        env.print0(f"This was {model_size(state.model)} on the bundled corpus. {BUNDLED_NEXT}")
    run.dashboard.close()
    return 0


def model_size(model):
    """'a small model', or from GPT-2's smallest (124M parameters) on, its number of parameters."""
    n = sum(p.numel() for p in model.parameters())
    return "a small model" if n < 124e6 else f"a {n / 1e6:.0f}M-parameter model"


def check_finite_rates(optimizer, step):
    """No step is taken with a learning rate or weight decay that is not a finite number."""
    rates = [(g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
    if not all(math.isfinite(r) for pair in rates for r in pair):
        raise SystemExit(f"step {step}: a learning rate or weight decay is not finite: {rates}")


def report_skipped_step(step, loss, norm, in_a_row, cfg, env):
    """Say that a step was skipped; stop the run after max_skipped_steps of them in a row."""
    env.print0(
        f"step {step:5d} | non-finite loss {loss} or grad norm {norm}: update skipped "
        f"({in_a_row} in a row)"
    )
    if in_a_row >= cfg.max_skipped_steps:
        raise SystemExit(
            f"stopping: {in_a_row} non-finite steps in a row at step {step}; lower --max_lr "
            f"({checkpoints.last_saved(cfg.log_dir)})"
        )


def stop_run(run, step, stop, env):
    """Save the state after `step` steps (unless this run has done none) and say how to resume;
    returns the signal's number."""
    signum = stop.requested()
    name = signal.Signals(signum).name
    if step > run.start_step:
        run.state.save(step, run.saver)
        run.saver.wait()
        how = f"python train_gpt2.py --resume latest --log_dir {run.cfg.log_dir}"
        env.print0(f"stopped by {name} after step {step - 1}; continue with: {how}")
    else:
        env.print0(f"stopped by {name} before this run's first step: nothing new to save")
    run.dashboard.close(exit_code=128 + signum)
    return signum


# -----------------------------------------------------------------------------
# main()


def main(argv=None):
    """Train, as the command line says; what ends the run early ends it in one line."""
    with exits_in_one_line(OUT_OF_MEMORY):
        signum = run(argv)
    if signum:
        raise SystemExit(128 + signum)


OUT_OF_MEMORY = "a smaller --B or model, --activation_checkpointing 1 or --shard fsdp need less"


def run(argv):
    """The run: 0 when done, or the number of the signal that stopped it."""
    start_time = time.time()
    cfg, checkpoint = resolve_config(parse_args(argv))
    with rundir.owned(cfg.log_dir):  # by one run at a time, once its settings are good
        env = setup_distributed(cfg.device, sharded=cfg.shard == "fsdp")
        if env.device_type == "cpu":
            devices.keep_freed_cpu_memory()
        try:
            attention = agree(env, lambda: model_kernels.checked_attention(cfg, env))
            with StopSignal(env, lambda: checkpoints.last_saved(cfg.log_dir)) as stop, attention:
                signum = train(cfg, env, checkpoint, stop, start_time)
            if env.distributed:
                # the ranks leave together: gloo aborts a process whose peers tear down the
                # group while it still works (rank 0 saving the last checkpoint, say)
                dist.barrier()
        finally:
            if env.distributed:
                dist.destroy_process_group()
    return signum


if __name__ == "__main__":
    with cli.quiet_exit_when_stdout_closes():
        main()
