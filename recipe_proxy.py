"""
The recipes compared on a CPU, where anyone can rerun it: a small model trained on the Python
standard library's own sources (each file one document, tokenized by fineweb.py; its first shard
is val) for a fixed number of tokens, over several seeds, once per recipe and once for each switch
of the speedrun recipe turned off alone (on alone, for a switch that is off by default). Prints
each run's final val loss (mean and standard deviation over the seeds; and against the current
recipe, the mean and standard deviation of the difference seed by seed: a seed fixes the data
order and the init, so that runs of one seed move together) and the fraction of the tokens
after which the current speedrun recipe first reaches the previous one's final val loss: the
figures of docs/recipes.md. Every run trains on the same number of tokens: under the batch
schedule, whose first steps are smaller, in more steps.

    python recipe_proxy.py                          # the previous and the current speedrun recipe
    python recipe_proxy.py --runs ablations         # and the current one, each switch alone
    python recipe_proxy.py --runs previous,current,no_normuon --seeds 1 2 3 4 5
    python recipe_proxy.py --runs current,cautious_wd=0.3,cautious_wd=3   # a setting's values

Each run is train_gpt2.py in a log dir of its own under --out_dir, with --resume auto: a proxy
run that is stopped continues where it was, and a run already done is read back, not redone.
"""

import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import types
from dataclasses import dataclass

import speedrun
from support import PROJECT_DIR
from support.cli import parse_settings, setting

# the recipe of the speedrun's first records: every switch of the current one off
PREVIOUS = dict.fromkeys(speedrun.SWITCHES, 0)
DEFAULTS = {
    f.name: f.default
    for settings in (speedrun.Settings, speedrun.ModelSettings)
    for f in dataclasses.fields(settings)
}
# each switch against the current recipe: off alone, or on alone where it is off by default
ABLATIONS = [f"no_{s}" if DEFAULTS[s] else f"{s}=1" for s in PREVIOUS]
RUN_SETS = {"recipes": ["previous", "current"]}
RUN_SETS["ablations"] = RUN_SETS["recipes"] + ABLATIONS


@dataclass
class ProxySettings:
    """The proxy's runs; each field is also a flag."""

    runs: str = setting(
        "recipes", "recipes, ablations, or run names (previous, current, no_SWITCH, SWITCH=VALUE)"
    )
    seeds: tuple = setting((1337, 1338, 1339), "the seeds of each run", nargs="+", parse=int)
    tokens: int = setting(262_144, "training tokens of each run", minimum=1)
    out_dir: str = setting("recipe_proxy", "the shards, and a log dir per run and seed")
    n_layer: int = setting(4, "the model's blocks", minimum=1)
    n_head: int = setting(4, "its attention heads", minimum=1)
    n_embd: int = setting(128, "its width", minimum=1)
    T: int = setting(256, "sequence length", minimum=1)
    B: int = setting(16, "micro-batch", minimum=1)
    total_batch_size: int = setting(4096, "tokens per optimizer step", minimum=1)
    evals: int = setting(8, "val evaluations over a run (and one at its end)", minimum=1)
    val_loss_steps: int = setting(4, "val loss over this many total_batch_size", minimum=1)
    # bf16 autocast: 2.9x float32's tokens/s on an AMX Xeon; on a CPU without bf16 units, float32
    dtype: str = setting("bfloat16", "train_gpt2.py's --dtype", choices=("float32", "bfloat16"))
    shard_size: int = setting(1_000_000, "tokens per shard (the first is val)", minimum=1)


def run_switches(name):
    """The switches that a run sets apart from the current recipe's defaults: previous (all
    off), current (none), no_SWITCH (that one off) or SWITCH=VALUE (that one at VALUE)."""
    switch, is_value, value = name.partition("=")
    if name == "previous":
        return PREVIOUS
    if name == "current":
        return {}
    if name.startswith("no_") and name[3:] in PREVIOUS:
        return {name[3:]: "0"}
    if is_value and switch in PREVIOUS and value:
        return {switch: value}
    known = ", ".join(["previous", "current"] + [f"no_{s}" for s in PREVIOUS])
    raise SystemExit(f"--runs: no run {name!r} (the runs: {known}, or SWITCH=VALUE)")


def run_flags(name):
    """train_gpt2.py's flags of a run (run_switches)."""
    switches = run_switches(name)
    return ["--recipe", "speedrun"] + [x for k, v in switches.items() for x in (f"--{k}", str(v))]


def tokens_after_steps(cfg, steps, batch_schedule):
    """The training tokens after each step of a run of `steps` steps, [0, after 1, ...]: a step
    trains on total_batch_size tokens, or on its part of them under the batch schedule."""
    run = types.SimpleNamespace(B=cfg.B, max_steps=steps, batch_schedule=batch_schedule)
    accumulation = cfg.total_batch_size // (cfg.B * cfg.T)
    tokens = [0]
    for step in range(steps):
        tokens.append(tokens[-1] + accumulation * speedrun.micro_batch(step, run) * cfg.T)
    return tokens


def steps_for_tokens(cfg, name):
    """The fewest steps in which run `name` trains on at least cfg.tokens tokens."""
    schedule = int(run_switches(name).get("batch_schedule", DEFAULTS["batch_schedule"]))
    steps = max(1, cfg.tokens // cfg.total_batch_size)
    while tokens_after_steps(cfg, steps, schedule)[-1] < cfg.tokens:
        steps += 1
    return steps, tokens_after_steps(cfg, steps, schedule)


def stdlib_shards(cfg):
    """The standard library's .py files (no site-packages), one document each, as token shards
    in out_dir/data (made once)."""
    data = os.path.join(cfg.out_dir, "data")
    if os.path.exists(os.path.join(data, "done")):
        return data
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(p for p in glob.glob(f"{root}/**/*.py", recursive=True) if "-packages" not in p)
    os.makedirs(cfg.out_dir, exist_ok=True)
    documents = os.path.join(cfg.out_dir, "stdlib.jsonl")
    with open(documents, "w") as out:
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                out.write(json.dumps({"text": f.read()}) + "\n")
    print(f"{len(paths)} files of {root} -> {data}", flush=True)
    command = [sys.executable, os.path.join(PROJECT_DIR, "fineweb.py"), "--input", documents]
    command += ["--output_dir", data, "--shard_size", str(cfg.shard_size)]
    subprocess.run(command, check=True)
    open(os.path.join(data, "done"), "w").close()
    return data


def train(cfg, data, name, seed):
    """One run (train_gpt2.py, continued if it was stopped): its {tokens trained: val loss}."""
    steps, tokens = steps_for_tokens(cfg, name)
    log_dir = os.path.join(cfg.out_dir, f"{name}_seed{seed}")
    command = [sys.executable, os.path.join(PROJECT_DIR, "train_gpt2.py"), *run_flags(name)]
    command += ["--data_dir", data, "--log_dir", log_dir, "--seed", str(seed), "--device", "cpu"]
    command += ["--n_layer", str(cfg.n_layer), "--n_head", str(cfg.n_head)]
    command += ["--n_embd", str(cfg.n_embd), "--block_size", str(cfg.T), "--T", str(cfg.T)]
    command += ["--B", str(cfg.B), "--total_batch_size", str(cfg.total_batch_size)]
    command += ["--max_steps", str(steps), "--eval_interval", str(max(1, steps // cfg.evals))]
    command += ["--val_loss_steps", str(cfg.val_loss_steps), "--dtype", cfg.dtype]
    command += ["--hellaswag", "0", "--num_return_sequences", "0", "--compile", "0"]
    command += ["--checkpoint_interval", str(steps), "--checkpoint_minutes", "10"]
    command += ["--keep_checkpoints", "1", "--resume", "auto"]
    losses = val_losses(log_dir)
    if steps not in losses:
        print(f"{name}, seed {seed}: {steps} steps, {tokens[-1]:,} tokens", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        losses = val_losses(log_dir)
    return {tokens[step]: loss for step, loss in losses.items()}


def val_losses(log_dir):
    path = os.path.join(log_dir, "log.txt")
    if not os.path.exists(path):
        return {}
    rows = [line.split() for line in open(path)]
    return {int(step): float(value) for step, kind, value in rows if kind == "val"}


def tokens_to_reach(curve, target):
    """The tokens after which a val curve ({tokens: loss}) first reaches target, interpolated
    linearly between evaluations; None if it never does."""
    points = sorted(curve.items())
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if v1 <= target:
            frac = 0.0 if v0 == v1 else min(1.0, max(0.0, (v0 - target) / (v0 - v1)))
            return t0 + frac * (t1 - t0)
    return None


def main(argv=None):
    cfg = parse_settings(ProxySettings, __doc__.strip().split("\n")[0], argv)
    names = RUN_SETS.get(cfg.runs) or cfg.runs.split(",")
    for name in names:
        run_flags(name)  # an unknown run is refused before anything runs
    if len(cfg.seeds) < 2:
        raise SystemExit("--seeds: at least 2, for a standard deviation")
    data = stdlib_shards(cfg)
    curves = {name: [train(cfg, data, name, seed) for seed in cfg.seeds] for name in names}
    finals = {name: [curve[max(curve)] for curve in runs] for name, runs in curves.items()}
    figures = {}
    print(f"final val loss after {cfg.tokens:,} tokens or just over, {len(cfg.seeds)} seeds")
    print("  (against current: the difference seed by seed, the same data order and init)")
    for name in names:
        mean, std = statistics.mean(finals[name]), statistics.stdev(finals[name])
        figures[name] = dict(mean=mean, std=std, finals=finals[name])
        steps, tokens = steps_for_tokens(cfg, name)
        figures[name].update(steps=steps, tokens=tokens[-1])
        line = f"  {name:<22} {steps:>4} steps  {mean:.4f} +- {std:.4f}"
        if "current" in finals and name != "current":
            paired = [a - b for a, b in zip(finals[name], finals["current"])]
            diff, diff_std = statistics.mean(paired), statistics.stdev(paired)
            figures[name].update(minus_current=diff, minus_current_std=diff_std)
            line += f"   minus current {diff:+.4f} +- {diff_std:.4f}"
        print(line, flush=True)
    if {"previous", "current"} <= set(names):
        target = figures["previous"]["mean"]
        mean_curve = {
            t: statistics.mean(c[t] for c in curves["current"]) for t in curves["current"][0]
        }
        reached = tokens_to_reach(mean_curve, target)
        gap = figures["previous"]["mean"] - figures["current"]["mean"]
        stds = gap / max(figures["previous"]["std"], figures["current"]["std"])
        fraction = None if reached is None else reached / figures["previous"]["tokens"]
        figures["current_vs_previous"] = dict(gap=gap, in_stds=stds, tokens_fraction=fraction)
        print(f"current below previous by {gap:.4f} = {stds:.1f} x the larger seed std")
        reach = "never" if fraction is None else f"after {fraction:.2f} of the tokens"
        print(f"current reaches previous's final {target:.4f} {reach}")
    with open(os.path.join(cfg.out_dir, "figures.json"), "w") as f:
        json.dump(dict(settings=dataclasses.asdict(cfg), figures=figures), f, indent=2)


if __name__ == "__main__":
    main()
