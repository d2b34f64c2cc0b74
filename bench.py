"""
Measure the speed of train_gpt2.py: its training step, its data loader and HellaSwag evaluation.

The training step (train_step, imported from train_gpt2.py: forward, backward, gradient clipping
and the AdamW step, over --grad_accum micro-batches) is timed after warm-up steps, first in the
lecture's fp32 baseline, then with its optimizations added one row at a time: TF32, bf16
autocast, torch.compile, flash attention, the vocabulary padded to 50304, fused AdamW; then the
ones this project adds: the chunked lm_head + cross-entropy (train_gpt2.py --fused_loss), the
blocks' matmuls in FP8 (--fp8, on GPUs that have FP8), and last the speedrun recipe's model and
Muon optimizer (--recipe speedrun). Each row
prints tokens/s, ms/step, MFU (PaLM FLOPs, against the GPU's datasheet peak and against the matmul
peak measured here, so that a CPU has one too), peak memory and the speed-up over the first row.

    python bench.py                                    # GPT-2 124M, B=16 T=1024 on a GPU
    python bench.py --device cpu                       # the small model of train_gpt2.py's 1st run
    python bench.py --B 64 --T 1024 --rows final       # one row, every optimization at once
    python bench.py --compile 0 --json bench.json      # any optimization off; figures as JSON too
    python bench.py --rows final --profile trace.json  # where the time goes (torch.profiler)
    python bench.py --rows none --preset gpt2 --generate 1   # generation: cache against none
    torchrun --standalone --nproc_per_node=8 bench.py --shard 1 --preset gpt2-xl  # DDP vs FSDP
    python bench.py --checkpoint 1 --preset gpt2       # how long a save stalls the step loop

It also measures the data loader, the val loss, HellaSwag evaluation and, with --generate 1,
generation: tokens/s of generation.generate with its key/value cache (one stream, and a batch of
streams) against the loop that runs the whole sequence again for every new token.

With --shard 1 it measures, instead, the training step under DDP, under FSDP (sharding.py) and
under FSDP with activation checkpointing, on every rank of torchrun (or on one process): tokens/s
and the memory each rank holds for parameters, gradients and optimizer state, with the same
memory computed for GPT-2's four sizes on 1 to 64 ranks.

With --checkpoint 1 it measures, instead, how long saving a checkpoint (the model, AdamW's state
after one step, and the rest of train_gpt2.TrainingState) keeps the step loop waiting: a
synchronous save against one in the background (--async_checkpoint 1), whose stall is the copy
to host memory; and how long the background write itself takes.
"""

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import core_eval
import hellaswag_eval
import sharding
import train_gpt2 as tg
from generation import generate, sample_next
from model_kernels import (
    ATTENTION_CHOICES,
    FP8_KERNELS,
    attention_backend,
    choose_attention,
    fp8_hardware,
)
from support import PROJECT_DIR, checkpoints, files
from support.cli import (
    ON_OFF,
    check_input_file,
    check_output_file,
    check_written,
    first_line,
    parse_settings,
    quiet_exit_when_stdout_closes,
    setting,
)
from support.datafiles import BUNDLED_DEFAULTS, GPT2_VOCAB_SIZE, get_tokenizer, write_shard
from support.devices import (
    autocast_context,
    autocast_dtype,
    check_device,
    default_device,
    keep_freed_cpu_memory,
    mfu,
    peak_flops,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from support.hf_gpt2 import GPT2_PRESETS
from train_gpt2 import PADDED_VOCAB_SIZE, DataLoaderLite, DistEnv, GPTConfig

# 64 HellaSwag val examples kept in the repository, for offline runs
HELLASWAG_SLICE = os.path.join(PROJECT_DIR, "tests", "data", "hellaswag_val_head64.jsonl")
CORE_BUNDLE = os.path.join(PROJECT_DIR, "tests", "data", "core_bundle")  # the tests' small one
# the small model train_gpt2.py trains on the bundled corpus when there is no FineWeb
SMALL_PRESET = {k: BUNDLED_DEFAULTS[k] for k in ("n_layer", "n_head", "n_embd")}
PRESETS = {**GPT2_PRESETS, "small": SMALL_PRESET}
QUIET = lambda *args: None  # noqa: E731  the optimizers' start-up lines are not the table's

# -----------------------------------------------------------------------------
# Variants of the training step


@dataclass(frozen=True)
class Variant:
    """Which of the lecture's optimizations a row uses; all off is its fp32 baseline."""

    tf32: bool = False
    autocast: bool = False
    compile: bool = False
    flash: bool = False
    vocab_pad: bool = False
    fused: bool = False
    fused_loss: bool = False
    fp8: bool = False
    speedrun: bool = False
    fp8_kernels: str = "ours"  # whose FP8 matmuls the fp8 rows use (model_kernels.FP8_KERNELS)


# The optimizations in the lecture's order, each with a short name for the table. The autocast
# one is named after its dtype (bf16, or fp16 on GPUs without bf16) when the rows are made.
OPTIMIZATIONS = {
    "tf32": "tf32",
    "autocast": "autocast",
    "compile": "compile",
    "flash": "flash attention",
    "vocab_pad": f"vocab {PADDED_VOCAB_SIZE}",
    "fused": "fused AdamW",
    "fused_loss": "fused loss",  # beyond the lecture
    "fp8": "fp8",
    "speedrun": "speedrun recipe",  # its model and Muon: against the row above, the recipe's cost
}
BASELINE = "fp32"
PROFILE_STEPS = 3  # enough to see the steady state; a trace of each kernel launch grows fast


def manual_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """The lecture's attention before flash attention: softmax(QK^T / sqrt(d) + causal mask) V,
    with the (T, T) attention matrix materialized in memory; or with the boolean attn_mask that
    a model gives (the speedrun recipe's documents and window) in place of the causal one."""
    assert is_causal or attn_mask is not None  # the training step's attention
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (scale or 1.0 / math.sqrt(k.size(-1)))
    if attn_mask is None:
        attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = F.softmax(att.masked_fill(~attn_mask, float("-inf")), dim=-1)
    return att @ v


class ManualAttention(TorchFunctionMode):
    """Inside `with ManualAttention():`, the models' F.scaled_dot_product_attention calls run
    manual_attention instead: the rows without flash attention train the very same model (and
    torch.compile traces through the mode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return manual_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def row_settings(config, variant, dtype=torch.float32, **settings):
    """The train_gpt2.py settings of the model a row trains (config's shape, the variant's
    vocabulary, recipe and kernels, autocast in dtype), and any others given."""
    row = dict(
        vocab_size=PADDED_VOCAB_SIZE if variant.vocab_pad else GPT2_VOCAB_SIZE,
        recipe="speedrun" if variant.speedrun else "gpt2",
        fused_loss=int(variant.fused_loss),
        fp8=int(variant.fp8),
        fp8_kernels=variant.fp8_kernels,
        dtype=str(dtype).removeprefix("torch."),
    )
    return tg.TrainConfig(**{**dataclasses.asdict(config), **row, **settings})


def row_model(config, variant, device):
    """A freshly initialized model of the variant's recipe, vocabulary and kernels on the device,
    built as train_gpt2.py builds it; with variant.flash off, run it in attention_of(variant)."""
    torch.manual_seed(0)
    return tg.build_model(row_settings(config, variant), None).to(device)


def row_flops_per_token(config, variant, T):
    """The training FLOPs per token of a row's model (counted on the meta device: no memory)."""
    with torch.device("meta"):
        return row_model(config, variant, "meta").flops_per_token(T)


def attention_of(variant):
    """The context in which a row's model computes its attention: flash, or the manual one."""
    return contextlib.nullcontext() if variant.flash else ManualAttention()


def make_step(variant, config, loader, env, dtype, grad_accum):
    """A fresh model and optimizer in this variant, made as train_gpt2.py makes them, and a
    function that runs one optimizer step of its train_step on them, reading from the loader,
    and waits for the device to finish it."""
    torch.set_float32_matmul_precision("high" if variant.tf32 else "highest")
    dtype = dtype if variant.autocast else torch.float32
    settings = row_settings(config, variant, dtype)
    raw_model = row_model(config, variant, env.device)
    model, _ = tg.wrap_model(raw_model, settings, env, dtype, variant.compile)
    if variant.speedrun:
        recipe = tg.get_recipe(settings.recipe)
        optimizer = recipe.make_optimizer(raw_model, settings, env.device_type, QUIET)
    else:  # the lecture's rows add fused AdamW one row after the others
        rates = (settings.weight_decay, settings.max_lr, env.device_type, QUIET)
        optimizer = raw_model.configure_optimizers(*rates, fused=variant.fused)
    autocast = autocast_context(dtype, env.device_type)
    # fp16 needs loss scaling, as in train_gpt2.py
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == torch.float16)
    loader.reset()

    def step():
        with attention_of(variant):
            args = (model, optimizer, loader, grad_accum, env, autocast, scaler)
            tg.train_step(*args, settings.grad_clip)
        synchronize(env.device)

    return step


def time_steps(step, warmup, steps):
    """Seconds of each of `steps` timed calls of step(), after `warmup` untimed ones (in which
    torch.compile compiles and the allocators reach their steady state)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def profile_steps(step, device_type, steps, trace_path):
    """Run steps under torch.profiler: print the operators that take the most time, and write a
    trace for chrome://tracing or https://ui.perfetto.dev."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    prof.export_chrome_trace(trace_path)
    sort_by = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))
    check_written(trace_path, "--profile")
    print(f"profiler trace of {steps} steps: {trace_path}")


def step_figures(flops_per_token, B, T, grad_accum, step_times, peak_spec, peak_matmul):
    """FLOPs per token, tokens/s, ms/step and MFU against each peak (None where it is unknown)."""
    seconds = sum(step_times)
    tokens_per_sec = B * T * grad_accum * len(step_times) / seconds
    return dict(
        flops_per_token=flops_per_token,
        tokens_per_sec=tokens_per_sec,
        ms_per_step=1000 * seconds / len(step_times),
        mfu_spec=mfu(flops_per_token, tokens_per_sec, peak_spec) if peak_spec else None,
        mfu_matmul=mfu(flops_per_token, tokens_per_sec, peak_matmul) if peak_matmul else None,
    )


# -----------------------------------------------------------------------------
# The device's matmul peak


def matmul_peak(device, dtype, n, min_seconds=0.5):
    """FLOP/s of an (n, n) @ (n, n) matmul in dtype: the best of repeated timings, at least three
    and at least min_seconds of them. The device's attainable peak, where no datasheet has one."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # the first call picks kernels and allocates workspace
    synchronize(device)
    best, spent, reps = math.inf, 0.0, 0
    while reps < 3 or spent < min_seconds:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * n**3 / best


# -----------------------------------------------------------------------------
# Data loader and HellaSwag


def synthetic_shards(data_dir, tokens, seed=0):
    """One random train shard of `tokens` GPT-2 token ids, written as fineweb.py writes them."""
    rng = np.random.default_rng(seed)
    write_shard(
        os.path.join(data_dir, "bench_train_000000.npy"),
        rng.integers(0, GPT2_VOCAB_SIZE, size=tokens, dtype=np.uint16),
    )
    return data_dir


def loader_rate(loader, batches):
    """Batches per second of loader.next_batch()."""
    loader.reset()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches / (time.perf_counter() - t0)


def hellaswag_rate(config, variant, device, dtype, path, limit):
    """(examples per second, examples) of HellaSwag scoring as the training loop runs it: the
    examples packed once, the scorer compiled when the variant compiles, the autocast of
    training; the first pass (which compiles) is not timed. (None, reason) where it cannot run."""
    try:
        packed = hellaswag_eval.load_packed(
            path, device, config.block_size, limit, compiled=variant.compile
        )
    except SystemExit as e:  # an empty file, examples longer than the model's context
        return None, str(e)
    model = row_model(config, variant, device)
    device_type = device.split(":")[0]
    autocast = autocast_context(dtype if variant.autocast else torch.float32, device_type)
    scorer = hellaswag_eval.make_scorer(model.hidden, model.head, variant.compile)
    with attention_of(variant):
        hellaswag_eval.evaluate(scorer, packed, device, autocast)
        t0 = time.perf_counter()
        hellaswag_eval.evaluate(scorer, packed, device, autocast)
    return len(packed) / (time.perf_counter() - t0), len(packed)


def core_rates(config, variant, device, dtype, bundle, limit):
    """(examples per second packed and scored as core.py does, the same one example at a time
    with a forward of the whole logits per row, examples): the last row's model in its autocast;
    the first packed pass is not timed."""
    tasks = core_eval.load_tasks(bundle, limit=limit)
    model = row_model(config, variant, device).eval()
    autocast = autocast_context(dtype if variant.autocast else torch.float32, device.split(":")[0])
    batch_tokens = hellaswag_eval.batch_tokens_for(device)
    packed = core_eval.pack_tasks(tasks, config.block_size, batch_tokens)
    enc = get_tokenizer()
    scorer = hellaswag_eval.make_scorer(model.hidden, model.head)
    examples = sum(len(t.examples) for t in tasks)
    with attention_of(variant), torch.no_grad():
        core_eval.evaluate(scorer, packed, device, autocast)
        t0 = time.perf_counter()
        core_eval.evaluate(scorer, packed, device, autocast)
        packed_rate = examples / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = [
            row
            for task in tasks
            for example_rows in core_eval.task_rows(task, enc, config.block_size)
            for row in example_rows
        ]
        for tokens, start in rows:
            with autocast:
                logits, _ = model(torch.tensor([tokens], device=device))
            targets = torch.tensor(tokens[start:], device=device)
            F.cross_entropy(logits[0, start - 1 : -1].float(), targets).item()
        single_rate = examples / (time.perf_counter() - t0)
    return packed_rate, single_rate, examples


def val_loss_rate(config, variant, device, dtype, loader, steps):
    """Tokens per second of evaluate_val_loss as the training loop runs it: the last row's model
    (compiled when the variant compiles) in its autocast, forward only, one wait for the device
    per pass; the first pass (which compiles) is not timed."""
    model = row_model(config, variant, device)
    model = torch.compile(model) if variant.compile else model
    env = DistEnv.one_process(device)
    autocast = autocast_context(dtype if variant.autocast else torch.float32, env.device_type)
    with attention_of(variant):
        tg.evaluate_val_loss(model, loader, 1, env, autocast)
        t0 = time.perf_counter()
        tg.evaluate_val_loss(model, loader, steps, env, autocast)  # ends with .item(): a sync
    return steps * loader.B * loader.T / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate_by_recompute(model, prompt, new_tokens, generator):
    """The lecture's sampling loop: the whole sequence through the model for every new token."""
    idx = torch.tensor([prompt], device=model.lm_head.weight.device)
    for _ in range(new_tokens):
        logits = model(idx)[0][:, -1, :GPT2_VOCAB_SIZE]
        next_token = sample_next(logits, top_k=50, generator=generator)
        idx = torch.cat((idx, next_token.unsqueeze(1)), dim=1)
    return idx


def generation_rates(config, device, dtype, prompt_len, new_tokens, batch):
    """tokens/s of generation from a random model in dtype (its weights cast, as sample.py does):
    generate() for one stream and for `batch` streams, and the loop without a cache."""
    model = row_model(config, Variant(vocab_pad=True), device).to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, GPT2_VOCAB_SIZE, (prompt_len,), generator=torch.Generator()).tolist()
    options = dict(top_k=50, generator=generator)

    def rate(fn, tokens):
        fn(min(4, new_tokens))  # warm-up: kernels chosen, memory allocated
        synchronize(device)
        t0 = time.perf_counter()
        fn(new_tokens)
        synchronize(device)
        return tokens / (time.perf_counter() - t0)

    recompute = lambda n: generate_by_recompute(model, prompt, n, generator)
    return {
        "cache_1": rate(lambda n: generate(model, [prompt], n, **options), new_tokens),
        "no_cache_1": rate(recompute, new_tokens),
        f"cache_{batch}": rate(
            lambda n: generate(model, [prompt] * batch, n, **options), batch * new_tokens
        ),
    }


# -----------------------------------------------------------------------------
# Table and command line

COLUMNS = ("variant", "tokens/s", "ms/step", "MFU (spec)", "MFU (matmul)", "peak mem", "speed-up")
WIDTHS = (11, 9, 10, 12, 10, 8)  # of the figures' columns; the variant's fits its names


def format_row(row, width):
    """One line of the table for a row of measure_rows: its figures, or why it was skipped."""
    name = row["variant"].ljust(width)
    if row.get("skipped"):
        return f"{name}  skipped: {row['skipped']}"
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    mem = row["peak_memory_bytes"]
    cells = (
        f"{row['tokens_per_sec']:,.0f}",
        f"{row['ms_per_step']:.1f}",
        pct(row["mfu_spec"]),
        pct(row["mfu_matmul"]),
        "-" if mem is None else f"{mem / 2**20:,.0f} MiB",
        f"{row['speedup']:.2f}x",
    )
    return "  ".join([name] + [c.rjust(w) for c, w in zip(cells, WIDTHS)])


def plan_rows(cfg, dtype, has_fp8):
    """(name, optimizations added, reason to skip or None) of each row: the baseline, then one
    optimization more per row (the lecture's sequence), or one row with all of them. Optimizations
    switched off by flag appear in no row."""
    names = dict(OPTIMIZATIONS, autocast={torch.float16: "fp16"}.get(dtype, "bf16"))
    if cfg.fp8_kernels != "ours":
        names["fp8"] = f"fp8 ({cfg.fp8_kernels})"
    enabled = [k for k in OPTIMIZATIONS if getattr(cfg, k)]
    missing = {}  # the optimizations this device has no fast kernels for, and why
    if dtype == torch.float32:
        missing["autocast"] = (
            "--dtype auto found no fast bf16 or fp16 here (--dtype bfloat16 forces it)"
        )
    if not has_fp8:  # elsewhere torch emulates FP8 matmuls: slower than float32
        missing["fp8"] = "no FP8 matmuls here (CUDA GPUs of compute capability 8.9+ have them)"
    if cfg.rows == "none":
        return []
    if cfg.rows == "final":
        enabled = [k for k in enabled if k not in missing]
        return [(" + ".join([names[k] for k in enabled]) or BASELINE, enabled, None)]
    return [(BASELINE, [], None)] + [(f"+ {names[k]}", [k], missing.get(k)) for k in enabled]


@dataclass
class BenchConfig:
    """Every setting of a benchmark run; each field is also a command-line flag (--name value)."""

    preset: str = setting("", "gpt2[-medium|-large|-xl] or small; '': gpt2 on CUDA, else small")
    n_layer: int = setting(0, "transformer blocks (0: the preset's)", minimum=0)
    n_head: int = setting(0, "attention heads (0: the preset's)", minimum=0)
    n_embd: int = setting(0, "embedding width (0: the preset's)", minimum=0)
    B: int = setting(16, "micro-batch size, sequences", minimum=1)
    T: int = setting(0, "sequence length (0: 1024 for GPT-2 presets, 256 for small)", minimum=0)
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1)
    device: str = setting("", "cuda, cuda:1, mps or cpu ('': the best available)")
    dtype: str = setting("auto", "autocast dtype", choices=("auto", "bfloat16", "float16"))
    warmup: int = setting(3, "untimed steps per row before the timed ones", minimum=0)
    steps: int = setting(10, "timed optimizer steps per row", minimum=1)
    rows: str = setting(
        "sequence",
        "sequence: a row per optimization; final: the last; none",
        choices=("sequence", "final", "none"),
    )
    tf32: int = setting(1, "rows with TF32 matmuls (0: in no row)", choices=ON_OFF)
    autocast: int = setting(
        1, "rows with bf16 autocast, fp16 on GPUs without bf16 (0: in no row)", choices=ON_OFF
    )
    compile: int = setting(1, "rows with torch.compile (0: in no row)", choices=ON_OFF)
    flash: int = setting(
        1, "rows with flash attention, else the manual one (0: in no row)", choices=ON_OFF
    )
    vocab_pad: int = setting(
        1, f"rows with the vocabulary padded to {PADDED_VOCAB_SIZE} (0: in no row)", choices=ON_OFF
    )
    fused: int = setting(
        1, "rows with fused AdamW, else the unfused one (0: in no row)", choices=ON_OFF
    )
    fused_loss: int = setting(
        1, "rows with the chunked lm_head + loss (0: in no row)", choices=ON_OFF
    )
    fp8: int = setting(
        1, "rows with the blocks' matmuls in FP8, where the GPU has them (0: none)", choices=ON_OFF
    )
    fp8_kernels: str = setting("ours", "the fp8 rows' matmuls", choices=FP8_KERNELS)
    speedrun: int = setting(
        1, "rows with --recipe speedrun's model and Muon (0: in no row)", choices=ON_OFF
    )
    attention: str = setting(
        "auto", "the flash rows' SDPA kernel (auto: train_gpt2.py's)", choices=ATTENTION_CHOICES
    )
    matmul_size: int = setting(
        0, "n of the n^3 peak matmul (0: 8192 on CUDA, else 2048)", minimum=0
    )
    data_dir: str = setting("", "train shards to read ('': random ones in a temporary directory)")
    loader_batches: int = setting(100, "batches timed from the data loader", minimum=1)
    hellaswag: int = setting(1, "measure HellaSwag evaluation", choices=ON_OFF)
    hellaswag_path: str = setting(HELLASWAG_SLICE, "HellaSwag jsonl file")
    hellaswag_examples: int = setting(64, "HellaSwag examples timed", minimum=1)
    core: int = setting(1, "measure CORE scoring, against one forward per example", choices=ON_OFF)
    core_bundle: str = setting(CORE_BUNDLE, "the CORE eval bundle (a directory or zip)")
    core_examples: int = setting(64, "CORE examples timed per task", minimum=1)
    val_steps: int = setting(10, "micro-batches of the timed val loss (0: not measured)", minimum=0)
    generate: int = setting(
        0, "measure generation (sample.py's): with the cache and without", choices=ON_OFF
    )
    gen_prompt: int = setting(16, "generation: prompt tokens", minimum=1)
    gen_tokens: int = setting(256, "generation: new tokens per stream", minimum=1)
    gen_batch: int = setting(64, "generation: streams of the batched measurement", minimum=1)
    json: str = setting("", "also write the figures to this file")
    profile: str = setting("", "profile the last row that ran and write its trace to this file")
    shard: int = setting(0, "instead: DDP against FSDP, each rank's memory", choices=ON_OFF)
    checkpoint: int = setting(
        0, "instead: a save's stall, synchronous against async", choices=ON_OFF
    )


def parse_args(argv=None):
    """A BenchConfig from command-line flags, one per field."""
    return parse_settings(BenchConfig, __doc__.strip().split("\n")[0], argv)


def resolve_model(cfg, device_type):
    """The GPTConfig and T to measure, from the preset and the size flags."""
    preset = cfg.preset or ("gpt2" if device_type == "cuda" else "small")
    if preset not in PRESETS:
        raise SystemExit(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    shape = {k: getattr(cfg, k) or v for k, v in PRESETS[preset].items()}
    T = cfg.T or (BUNDLED_DEFAULTS["T"] if preset == "small" else 1024)
    if min(shape.values()) < 1:
        raise SystemExit(f"n_layer, n_head and n_embd must be positive, not {shape}")
    if shape["n_embd"] % shape["n_head"]:
        raise SystemExit(f"n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}")
    if T < 1:
        raise SystemExit(f"T={T} must be positive")
    return GPTConfig(block_size=max(GPTConfig.block_size, T), **shape), preset, T


def measure_rows(plan, config, T, loader, env, dtype, cfg, peak_spec, peak_matmul):
    """Time every row of the plan, printing each as it is measured.

    Each row adds its optimizations to the last row that ran. A row that fails (no compiler for
    torch.compile, out of memory, ...) is reported as skipped with the reason, and its
    optimization is left out of the rows below it. Returns (rows' figures, last variant that ran).
    """
    width = max(len(COLUMNS[0]), *(len(name) for name, _, _ in plan))
    print("  ".join([COLUMNS[0].ljust(width)] + [c.rjust(w) for c, w in zip(COLUMNS[1:], WIDTHS)]))
    results, current, baseline = [], Variant(fp8_kernels=cfg.fp8_kernels), None
    for name, added, reason in plan:
        variant = dataclasses.replace(current, **{k: True for k in added})
        row = {"variant": name, **dataclasses.asdict(variant), "skipped": reason}
        if reason is None:
            torch._dynamo.reset()  # compiled graphs hold their model: drop the previous row's
            start = reset_peak_memory(env.device)
            try:
                # the step is passed on, never named: nothing here keeps its model and optimizer
                # alive into the next row's memory measurement
                times = time_steps(
                    make_step(variant, config, loader, env, dtype, cfg.grad_accum),
                    cfg.warmup,
                    cfg.steps,
                )
            except Exception as e:  # report it and go on: the other rows still measure something
                row["skipped"] = skip_reason(e)
            else:
                flops = row_flops_per_token(config, variant, T)
                figures = step_figures(
                    flops, cfg.B, T, cfg.grad_accum, times, peak_spec, peak_matmul
                )
                row.update(figures)
                row["peak_memory_bytes"] = memory_used(env.device, start)
                baseline = baseline or row["tokens_per_sec"]
                row["speedup"] = row["tokens_per_sec"] / baseline
                current = variant
        results.append(row)
        print(format_row(row, width), flush=True)
    return results, current


def main(argv=None):
    cfg = parse_args(argv)
    device = check_device(cfg.device or default_device())
    for path, what in ((cfg.json, "--json"), (cfg.profile, "--profile")):
        if path:  # refused now, not after the whole benchmark
            check_output_file(path, what)
    if cfg.hellaswag:
        check_input_file(cfg.hellaswag_path, "HellaSwag file")
    if cfg.core:  # a bundle that cannot be scored is refused before the benchmark
        core_eval.load_tasks(cfg.core_bundle, limit=cfg.core_examples)
    env = DistEnv.one_process(device)
    if env.device_type == "cpu":
        keep_freed_cpu_memory()
    config, preset, T = resolve_model(cfg, env.device_type)
    if cfg.generate and cfg.gen_prompt + cfg.gen_tokens > config.block_size:
        raise SystemExit(
            f"--gen_prompt {cfg.gen_prompt} + --gen_tokens {cfg.gen_tokens} exceed the model's "
            f"context of {config.block_size} tokens"
        )
    dtype = autocast_dtype(cfg.dtype, env.device_type)
    if cfg.shard:
        return write_figures(cfg.json, sharding_figures(cfg, config, T, dtype))
    if cfg.checkpoint:
        return write_figures(cfg.json, checkpoint_figures(cfg, config, T, env))
    head_size = config.n_embd // config.n_head
    attention, _ = choose_attention(cfg.attention, device, dtype, config.n_head, head_size)
    plan = plan_rows(cfg, dtype, fp8_hardware(device))
    figures = dict(device=env.device_type, torch=torch.__version__, preset=preset, T=T)
    figures.update(model=dataclasses.asdict(config), settings=dataclasses.asdict(cfg))
    figures.update(autocast_dtype=str(dtype).removeprefix("torch."), attention=attention)
    if env.device_type == "cuda":
        figures["device"] = torch.cuda.get_device_name(device)
    print(
        f"{figures['device']}, torch {torch.__version__}; {preset} (n_layer={config.n_layer}, "
        f"n_head={config.n_head}, n_embd={config.n_embd}), B={cfg.B}, T={T}, "
        f"grad_accum={cfg.grad_accum}; {cfg.warmup} warm-up and {cfg.steps} timed steps per row; "
        f"attention: {attention}"
    )
    figures.update(measure_peaks(plan, cfg, device, dtype))

    with attention_backend(attention):  # the rows', the evaluations' and generation's
        with tempfile.TemporaryDirectory() as tmp:
            # the timed steps read from the loader too, with shuffling on as in training
            sequences = cfg.B * max(cfg.loader_batches, (cfg.warmup + cfg.steps) * cfg.grad_accum)
            data_dir = cfg.data_dir or synthetic_shards(tmp, sequences * T + 1)
            loader = DataLoaderLite(cfg.B, T, 0, 1, "train", data_dir, shuffle=True)
            peaks = (figures["peak_flops_spec"], figures["peak_flops_matmul"])
            results, last = [], Variant()
            if plan:
                results, last = measure_rows(plan, config, T, loader, env, dtype, cfg, *peaks)
            # the model the measurements below use: the last row's, or with --rows none the plain
            ran = not plan or any(not row["skipped"] for row in results)
            if results:
                print_memory_note(env.device_type)
            if cfg.profile and ran:
                torch._dynamo.reset()
                step = make_step(last, config, loader, env, dtype, cfg.grad_accum)
                time_steps(step, cfg.warmup, 0)
                profile_steps(step, env.device_type, PROFILE_STEPS, cfg.profile)
            figures.update(rows=results, data_loader=data_loader_figures(loader, results, cfg, T))
            if cfg.val_steps and plan:  # the loader's shards live in tmp
                args = (config, last, device, dtype, loader, cfg.val_steps)
                figures["val_loss"] = measure_or_skip(ran, val_loss_figures, *args)
        if cfg.hellaswag:
            args = (config, last, device, dtype, cfg.hellaswag_path, cfg.hellaswag_examples)
            figures["hellaswag"] = measure_or_skip(ran, hellaswag_figures, *args)
        if cfg.core:
            args = (config, last, device, dtype, cfg.core_bundle, cfg.core_examples)
            figures["core"] = measure_or_skip(ran, core_figures, *args)
        if cfg.generate:
            figures["generation"] = generation_figures(config, device, dtype, cfg)
    write_figures(cfg.json, figures)


def write_figures(path, figures):
    if path and figures is not None:
        files.write_json(path, figures)
        check_written(path, "--json")


def skip_reason(error):
    """Why a row or a measurement was skipped: the error's type and first line."""
    return f"{type(error).__name__}: {first_line(error)[:160]}"


def memory_used(device, start):
    """Peak bytes used since reset_peak_memory returned `start`, or None where not measured."""
    peak = peak_memory(device)
    return None if start is None or peak is None else peak - start


def measure_peaks(plan, cfg, device, dtype):
    """The peak FLOP/s every row's MFU is measured against, printed: the datasheet's, and the
    fastest matmul here in a precision some row uses (fp16 or bf16 need not be faster than fp32:
    most CPUs have no fast fp16)."""
    device_type = device.split(":")[0]
    planned = {k for _, added, reason in plan if reason is None for k in added}
    torch.set_float32_matmul_precision("high" if "tf32" in planned else "highest")
    n = cfg.matmul_size or (8192 if device_type == "cuda" else 2048)
    dtypes = [torch.float32] + ([dtype] if "autocast" in planned else [])
    peak_matmul, peak_dtype = max(
        ((matmul_peak(device, d, n), d) for d in dtypes), key=lambda p: p[0]
    )
    peak_spec = peak_flops(device)
    spec = f"{peak_spec / 1e12:.0f} TFLOP/s datasheet" if peak_spec else "no datasheet figure"
    peak_dtype_name = str(peak_dtype).removeprefix("torch.")
    print(
        f"peak: {spec}; {peak_matmul / 1e12:.3f} TFLOP/s measured ({n}^3 matmul, "
        f"{peak_dtype_name}); MFU counts 6N + 12LHQT FLOPs per token (PaLM)"
    )
    return dict(
        peak_flops_spec=peak_spec, peak_flops_matmul=peak_matmul, peak_matmul_dtype=peak_dtype_name
    )


def print_memory_note(device_type):
    memory = (
        "the most memory held by tensors (torch.cuda.max_memory_allocated)"
        if device_type == "cuda"
        else "growth of the process's resident memory (VmHWM), the allocator's cache included"
    )
    print(f"peak mem: {memory}; speed-up: tokens/s over the first row's")


def data_loader_figures(loader, results, cfg, T):
    """The loader's batches/s, printed beside those the fastest row consumes."""
    batches_per_sec = loader_rate(loader, cfg.loader_batches)
    best = max((r["tokens_per_sec"] for r in results if not r["skipped"]), default=None)
    needed = best / (cfg.B * T) if best else None
    print(
        f"data loader: {batches_per_sec:,.0f} batches/s of {cfg.B} x {T} tokens, shuffled"
        + (f"; the fastest row takes {needed:,.1f} batches/s" if needed else "")
    )
    return {"batches_per_sec": batches_per_sec, "fastest_row_needs": needed}


def measure_or_skip(ran, measure, *args):
    """measure(*args) on the last row's model; skipped, with the reason, where no row ran or the
    measurement fails (out of memory, say), as a row is."""
    what = {val_loss_figures: "val loss", hellaswag_figures: "HellaSwag", core_figures: "CORE"}
    what = what[measure]
    if not ran:
        print(f"{what}: skipped: no row of the table ran")
        return {"skipped": "no row ran"}
    try:
        return measure(*args)
    except Exception as e:
        reason = skip_reason(e)
        print(f"{what}: skipped: {reason}")
        return {"skipped": reason}


def val_loss_figures(config, variant, device, dtype, loader, steps):
    val_rate = val_loss_rate(config, variant, device, dtype, loader, steps)
    # the training loop's default: 20 steps of 2**19 tokens, whatever B and the GPUs
    print(
        f"val loss: {val_rate:,.0f} tokens/s ({steps} batches of {loader.B} x {loader.T}; the "
        f"last row's model, as the training loop evaluates it): 20 x 2**19 tokens in "
        f"{20 * 2**19 / val_rate:,.1f} s"
    )
    return {"tokens_per_sec": val_rate, "steps": steps}


def hellaswag_figures(config, variant, device, dtype, path, limit):
    rate, count = hellaswag_rate(config, variant, device, dtype, path, limit)
    if rate is None:
        print(f"HellaSwag: skipped: {count}")
        return {"skipped": count}
    print(
        f"HellaSwag: {rate:,.1f} examples/s ({count} examples of {os.path.basename(path)}; the "
        "last row's model, packed and scored as the training loop does)"
    )
    return {"examples_per_sec": rate, "examples": count, "path": path}


def core_figures(config, variant, device, dtype, bundle, limit):
    packed, single, count = core_rates(config, variant, device, dtype, bundle, limit)
    print(
        f"CORE: {packed:,.1f} examples/s packed ({count} examples of {bundle}; the last row's "
        f"model, as core.py scores them), {single:,.1f} with one forward per option: "
        f"{packed / single:.1f}x"
    )
    return {"examples_per_sec": packed, "one_per_forward": single, "examples": count}


def generation_figures(config, device, dtype, cfg):
    rates = generation_rates(config, device, dtype, cfg.gen_prompt, cfg.gen_tokens, cfg.gen_batch)
    cached, uncached = rates["cache_1"], rates["no_cache_1"]
    print(
        f"generation ({str(dtype).removeprefix('torch.')} weights, top-k 50), a "
        f"{cfg.gen_prompt}-token prompt and {cfg.gen_tokens} new tokens: {cached:,.1f} "
        f"tokens/s with the cache, {uncached:,.1f} without ({cached / uncached:.1f}x); "
        f"{rates[f'cache_{cfg.gen_batch}']:,.0f} tokens/s summed over {cfg.gen_batch} streams"
    )
    return rates


# -----------------------------------------------------------------------------
# DDP against FSDP (--shard 1)

SHARD_MODES = ("ddp", "fsdp", "fsdp + act. ckpt")
MiB = 2**20


def sharding_figures(cfg, config, T, dtype):
    """Every rank times the same steps in each mode; rank 0 prints the table and returns the
    figures (the other ranks None)."""
    env = tg.setup_distributed(cfg.device, sharded=True)
    try:
        if env.master_process:
            print_computed_memory(env.world_size)
        with tempfile.TemporaryDirectory() as tmp:
            tokens = cfg.B * T * env.world_size * (cfg.warmup + cfg.steps) * cfg.grad_accum
            data_dir = synthetic_shards(tmp, tokens + 1)
            loader = DataLoaderLite(cfg.B, T, env.rank, env.world_size, "train", data_dir)
            if env.master_process:
                print(
                    f"measured on {env.world_size} x {env.device} ({dtype}), n_layer="
                    f"{config.n_layer}, n_embd={config.n_embd}, B={cfg.B}, T={T}, grad_accum="
                    f"{cfg.grad_accum}: median of {cfg.steps} steps after {cfg.warmup}"
                )
            rows = [shard_row(mode, config, T, loader, env, dtype, cfg) for mode in SHARD_MODES]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return dict(world_size=env.world_size, rows=rows) if env.master_process else None


def checkpoint_figures(cfg, config, T, env, saves=3):
    """Seconds the step loop waits for a save (median of `saves`), synchronous and in the
    background, and the background write's own seconds; printed and returned."""
    model = tg.GPT(dataclasses.replace(config, vocab_size=PADDED_VOCAB_SIZE)).to(env.device)
    train_cfg = tg.TrainConfig(**{k: getattr(config, k) for k in tg.MODEL_FIELDS}, B=cfg.B, T=T)
    optimizer = model.configure_optimizers(0.1, 6e-4, env.device_type, log=lambda *a: None)
    with tempfile.TemporaryDirectory() as tmp:
        loader = DataLoaderLite(cfg.B, T, 0, 1, "train", synthetic_shards(tmp, cfg.B * T + 1))
        x, y = loader.next_batch()
        model(x.to(env.device), y.to(env.device))[1].backward()
        optimizer.step()  # AdamW's moments exist: the state is a real checkpoint's
        scaler = torch.amp.GradScaler(env.device_type, enabled=False)
        state = tg.TrainingState(model, optimizer, scaler, loader, train_cfg)
        size = sum(t.numel() * t.element_size() for t in tensors_of(state.state_dict(0)))
        print(
            f"{env.device}: a checkpoint of n_layer={config.n_layer}, n_embd={config.n_embd} is "
            f"{size / 1e9:.3f} GB; median of {saves} saves"
        )
        figures = dict(device=env.device, checkpoint_bytes=size)
        for background in (False, True):
            log_dir = os.path.join(tmp, f"log_{int(background)}")
            os.makedirs(log_dir)
            saver = checkpoints.Saver(log_dir, env, 1, background=background)
            stalls, writes = [], []
            for step in range(1, saves + 1):
                synchronize(env.device)
                t0 = time.perf_counter()
                saver.save(step, state, sharded=False)
                synchronize(env.device)
                stalls.append(time.perf_counter() - t0)
                saver.wait()
                writes.append(time.perf_counter() - t0)
            kind = "async" if background else "sync"
            figures[kind] = dict(stall_s=float(np.median(stalls)), total_s=float(np.median(writes)))
            print(
                f"  {kind:<5}  the loop waits {figures[kind]['stall_s']:.3f} s; "
                f"complete after {figures[kind]['total_s']:.3f} s",
                flush=True,
            )
    return figures


def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_of(v)]
    return []


def print_computed_memory(world_size):
    """Parameters, gradients and AdamW's two moments in fp32 are 16 bytes per parameter: each
    rank holds all of them under DDP, 1/world_size of them under FSDP (activations, and the
    weights FSDP gathers for the block that runs, come on top)."""
    sizes = sorted({8, 64, world_size})
    print("computed: GB per rank of parameters, gradients and AdamW's moments (16 bytes each)")
    print(f"{'':<33}{'DDP':>8}" + "".join(f"{f'FSDP x{n}':>10}" for n in sizes))
    for name, shape in GPT2_PRESETS.items():
        with torch.device("meta"):
            model = tg.GPT(GPTConfig(vocab_size=PADDED_VOCAB_SIZE, **shape))
            n = sum(p.numel() for p in model.parameters())
        shards = "".join(f"{16 * n / w / 1e9:10.2f}" for w in sizes)
        print(f"  {name:<12} {n / 1e6:6.0f}M parameters{16 * n / 1e9:8.2f}{shards}")


def shard_row(mode, config, T, loader, env, dtype, cfg):
    """One mode's step timed on every rank; its figures, printed by rank 0."""
    start = reset_peak_memory(env.device)
    shard = "fsdp" if mode.startswith("fsdp") else "ddp"
    recompute = int(mode.endswith("ckpt"))
    settings = row_settings(config, Variant(vocab_pad=True), dtype, shard=shard)
    settings = dataclasses.replace(settings, activation_checkpointing=recompute)
    torch.manual_seed(0)
    model = tg.build_model(settings, None).to(env.device)
    wrapped, _ = tg.wrap_model(model, settings, env, dtype, bool(cfg.compile))
    optimizer = tg.get_recipe("gpt2").make_optimizer(model, settings, env.device_type, QUIET)
    autocast = autocast_context(dtype, env.device_type)
    scaler = torch.amp.GradScaler(env.device_type, enabled=False)
    loader.reset()

    def step():
        args = (wrapped, optimizer, loader, cfg.grad_accum, env, autocast, scaler)
        tg.train_step(*args, settings.grad_clip)
        synchronize(env.device)

    times = time_steps(step, cfg.warmup, cfg.steps)
    held = sharding.bytes_held(model, optimizer)
    seconds = float(np.median(times))
    tokens = cfg.B * T * cfg.grad_accum * env.world_size
    row = dict(mode=mode, tokens_per_sec=tokens / seconds, ms_per_step=1000 * seconds)
    row.update(zip(("parameter_bytes", "gradient_bytes", "optimizer_bytes"), held))
    row["peak_memory_bytes"] = memory_used(env.device, start)
    if env.master_process:
        peak = row["peak_memory_bytes"]
        print(
            f"{mode:<17} {row['tokens_per_sec']:10,.0f} tok/s {row['ms_per_step']:9.1f} ms | "
            f"rank 0 holds {held[0] / MiB:8.1f} MiB parameters, {held[1] / MiB:8.1f} gradients, "
            f"{held[2] / MiB:8.1f} optimizer state"
            + (f" | peak mem {peak / MiB:,.0f} MiB" if peak is not None else ""),
            flush=True,
        )
    return row


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
