"""dashboards.py: TensorBoard event files and an offline W&B run, read back with their own readers
and compared with log.txt and the printed step lines, across a SIGTERM and a resume that redoes a
step; the ETA against known step times; a missing package refused at start."""

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import types

import pytest

import dashboards
import speedrun
import train_gpt2 as tg
from conftest import (
    FAULTS,
    HELLASWAG_SLICE,
    ROOT,
    TINY,
    fails_in_one_line,
    make_shards,
    refuse_network,
)
from train_gpt2 import DistEnv, TrainConfig

STEP_LINE = re.compile(
    r"step +(\d+) \| loss (\S+) \| lr (\S+) \| norm (\S+) \| dt \S+ms \| tok/sec (\S+) \| "
    r"mfu (\S+)% \| eta (\d+d\d\dh|\d+h\d\dm|\d+m\d\ds|\d+s)"
)


def offline_wandb_env(wandb_root):
    """The environment of an offline W&B run that keeps all its files under wandb_root."""
    env = dict(WANDB_MODE="offline", WANDB_CONSOLE="off", WANDB_ERROR_REPORTING="false")
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        env[f"WANDB_{name}"] = str(wandb_root / name.lower())
    return env


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A speedrun-recipe run (three parameter groups) with both dashboards, HellaSwag, CORE and
    bits per byte: stopped
    by SIGTERM as step 7 begins, its checkpoint of step 7 then lost as if the process had been
    killed before it saved (so the resume redoes step 6, which the dashboards already have), and
    resumed to step 8. Returns the log dir, the W&B dir and what the two processes printed."""
    tmp = tmp_path_factory.mktemp("watched")
    make_shards(tmp / "data", [3000, 9000])
    hella = tmp / "hella.jsonl"
    hella.write_text("".join(open(HELLASWAG_SLICE).readlines()[:8]))
    log_dir = tmp / "log"
    args = TINY + ["--data_dir", str(tmp / "data"), "--log_dir", str(log_dir), "--max_steps", "8"]
    args += ["--total_batch_size", "128", "--eval_interval", "3", "--val_loss_steps", "1"]
    args += ["--checkpoint_interval", "3", "--num_return_sequences", "1", "--max_length", "12"]
    args += ["--hellaswag", "1", "--hellaswag_path", str(hella), "--block_size", "128"]
    args += ["--recipe", "speedrun", "--tensorboard", "1"]
    args += ["--core", "3", "--core_bundle", CORE_BUNDLE, "--bpb", "1"]
    args += ["--wandb_project", "repro", "--wandb_run_name", "tiny"]
    wandb_env = offline_wandb_env(tmp / "wandb")
    get_recipe = tg.get_recipe

    def sigterm_at_step_7(name):
        recipe = get_recipe(name)

        def set_learning_rate(optimizer, step, cfg):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            return recipe.set_learning_rate(optimizer, step, cfg)

        return dataclasses.replace(recipe, set_learning_rate=set_learning_rate)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        refuse_network(mp)
        for name, value in wandb_env.items():
            mp.setenv(name, value)
        mp.setattr(tg.devices, "peak_flops", lambda device: 1e12)  # a CPU has none: MFU too
        mp.setattr(tg, "get_recipe", sigterm_at_step_7)
        with pytest.raises(SystemExit) as stopped:
            tg.main(args)
        assert stopped.value.code == 128 + signal.SIGTERM
        os.remove(log_dir / "model_00007.pt")
        mp.setattr(tg, "get_recipe", get_recipe)
        tg.main(["--resume", "latest", "--log_dir", str(log_dir)])  # the dashboards come along
    return types.SimpleNamespace(
        log_dir=log_dir, wandb_dir=tmp / "wandb" / "dir", out=out.getvalue()
    )


def log_values(log_dir, kind):
    """{step: value} of one kind of log.txt line: the run's record."""
    lines = open(log_dir / "log.txt").read().split()
    rows = [lines[i : i + 3] for i in range(0, len(lines), 3)]
    return {int(step): float(value) for step, k, value in rows if k == kind}


CORE_BUNDLE = os.path.join(ROOT, "tests", "data", "core_bundle")
# the watched run's tokens after each step: 2 micro-steps of 1 x 32 tokens for the two thirds
# of its steps under the batch schedule, then of 2 x 32
TOKENS_SEEN = {s: 64 * min(s + 1, 6) + 128 * max(0, s - 5) for s in range(8)}


def printed_steps(out):
    """{step: (loss, lr, norm, tok/sec, mfu %, eta)} of the step lines printed, the last wins."""
    return {int(m[1]): m.groups()[1:] for m in STEP_LINE.finditer(out)}


def test_step_lines_end_with_the_eta_and_log_txt_keeps_its_five_kinds(watched):
    lines = [line for line in watched.out.splitlines() if line.startswith("step ")]
    assert len(lines) == 7 + 2  # steps 0-6, then 6 again and 7 after the resume
    assert all(STEP_LINE.fullmatch(line) for line in lines), lines
    kinds = {line.split()[1] for line in open(watched.log_dir / "log.txt")}
    assert kinds == {"train", "val", "bpb", "hella", "core"}


def test_tensorboard_has_every_metric_at_its_steps_across_a_stop_and_resume(watched):
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the first process's file has points for step 6, which the resumed process redid ...
    first = sorted(glob.glob(str(watched.log_dir / "events.out.tfevents.*")))[0]
    events = event_file_loader.EventFileLoader(first).Load()
    tags = {(v.tag, e.step) for e in events if e.HasField("summary") for v in e.summary.value}
    assert ("train/loss", 6) in tags and ("val/loss", 6) in tags
    # ... and the reader, as TensorBoard shows it, keeps only the resumed process's
    acc = EventAccumulator(str(watched.log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()

    def scalars(tag):
        points = [(e.step, e.value) for e in acc.Scalars(tag)]
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)  # one point per step, in order
        return dict(points)

    train_steps = list(range(8))
    for tag, kind in [
        ("train/loss", "train"),
        ("val/loss", "val"),
        ("hellaswag/acc_norm", "hella"),
        ("core/score", "core"),
        ("val/bits_per_byte", "bpb"),
    ]:
        expected = log_values(watched.log_dir, kind)
        assert sorted(expected) == (train_steps if kind == "train" else [0, 3, 6, 8])
        # the dashboards get log.txt's own numbers (in float32: TensorBoard's)
        assert scalars(tag) == pytest.approx(expected, abs=1e-6), tag
    printed = printed_steps(watched.out)
    assert sorted(printed) == train_steps
    # the step lines' norm (4 decimals), tok/sec and MFU in % (2 decimals)
    for i, tag, scale, decimals in [
        (2, "train/grad_norm", 1, 4),
        (3, "perf/tokens_per_sec", 1, 2),
        (4, "perf/mfu", 100, 2),
    ]:
        got = {step: scale * value for step, value in scalars(tag).items()}
        expected = {step: float(p[i]) for step, p in printed.items()}
        assert got == pytest.approx(expected, abs=0.5 * 10**-decimals + 1e-4), tag
    # the speedrun's three groups, each at its own rate times the schedule (and the root of the
    # batch schedule's part of the batch: micro-batches of 1, 1 and 2 rows of B=2): Muon,
    # embedding, head
    cfg = TrainConfig(max_steps=8, recipe="speedrun", B=2)
    part = {s: speedrun.micro_batch(s, cfg) / 2 for s in train_steps}
    assert list(part.values()) == [0.5] * 6 + [1.0] * 2
    for group, rate in enumerate((cfg.muon_lr, cfg.embed_lr, cfg.head_lr)):
        schedule = (cfg.max_steps, cfg.cooldown_frac, cfg.min_lr_ratio)
        expected = {s: rate * speedrun.lr_factor(s, *schedule) * part[s] ** 0.5 for s in part}
        assert scalars(f"lr/group{group}") == pytest.approx(expected, rel=1e-6)
    assert scalars("lr") == scalars("lr/group0")
    assert scalars("train/tokens_seen") == TOKENS_SEEN
    assert scalars("train/skipped") == dict.fromkeys(train_steps, 0)
    memory = scalars("perf/peak_memory_gib")
    assert sorted(memory) == train_steps and all(0.01 < gib < 64 for gib in memory.values())

    def texts(tag):
        return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}

    samples = texts("samples/text_summary")
    assert sorted(samples) == [3, 6, 8]  # evaluations after step 0
    assert all(t.strip().startswith("Hello, I'm a language model,") for t in samples.values())
    config = texts("config/text_summary")
    assert sorted(config) == [0, 6] and '"recipe": "speedrun"' in config[6]


def test_wandb_offline_run_has_the_history_and_config_and_continues_on_resume(watched):
    runs = sorted(glob.glob(str(watched.wandb_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2  # the stopped process and the resumed one
    state = json.load(open(watched.log_dir / "wandb_run.json"))
    assert state["step"] == 8 and all(run.endswith("-" + state["id"]) for run in runs)
    history, config = {}, {}
    for run in runs:
        for record in dashboards.transaction_log_records(
            glob.glob(os.path.join(run, "run-*.wandb"))[0]
        ):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert (record.run.run_id, record.run.display_name) == (state["id"], "tiny")
                assert record.run.project == "repro"
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                step = record.history.step.num
                assert step not in history, f"step {step} logged twice"
                items = record.history.item  # "a/b" keys come as a nested key ["a", "b"]
                history[step] = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items
                }
    assert sorted(history) == list(range(9))
    for tag, kind in [
        ("train/loss", "train"),
        ("val/loss", "val"),
        ("hellaswag/acc_norm", "hella"),
        ("core/score", "core"),
        ("val/bits_per_byte", "bpb"),
    ]:
        got = {step: row[tag] for step, row in history.items() if tag in row}
        assert got == log_values(watched.log_dir, kind), tag
    metrics = ["lr", "lr/group0", "lr/group1", "lr/group2", "train/grad_norm", "perf/mfu"]
    metrics += ["perf/tokens_per_sec", "perf/peak_memory_gib", "train/tokens_seen"]
    for step in range(8):
        assert set(metrics + ["train/skipped"]) <= set(history[step]), step
        assert history[step]["train/tokens_seen"] == TOKENS_SEEN[step]
    tables = {s: row["samples/_type"] for s, row in history.items() if "samples/_type" in row}
    assert tables == dict.fromkeys([3, 6, 8], "table-file")
    # the resolved config, with what the resumed process changed
    assert config["recipe"] == "speedrun" and config["n_layer"] == 2 and config["B"] == 2
    assert config["wandb_project"] == "repro" and config["resume"] == "latest"
    assert config["device"] == "cpu" and config["world_size"] == 1 and "torch" in config


def test_a_run_killed_twice_has_every_step_once_on_both_dashboards(tmp_path):
    # budget: 30 s (three processes that start W&B)
    """SIGKILL as step 17 begins, while W&B writes out its transaction log every 0.1 s (it holds
    most of the steps); resumed from step 10 and killed again as step 34 begins, while W&B holds
    back that process's records (it holds none of them); resumed from step 30 to the end. Each
    dashboard ends with every step's train loss and every val point once, log.txt's values."""
    make_shards(tmp_path / "data", [3000, 9000])
    log_dir, wandb_root = tmp_path / "log", tmp_path / "wandb"
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--log_dir", str(log_dir)]
    args += ["--max_steps", "40", "--total_batch_size", "128", "--eval_interval", "5"]
    args += ["--val_loss_steps", "1", "--checkpoint_interval", "10", "--num_return_sequences"]
    args += ["0", "--tensorboard", "1", "--wandb_project", "repro", "--resume", "auto"]
    env = dict(os.environ, PYTHONPATH=ROOT, **offline_wandb_env(wandb_root))
    env.pop("WANDB_SERVICE", None)  # the W&B service of this process (a test before) is not theirs
    for fault, flush_seconds, code in [("kill_at_step:17", 0.1, -9), ("kill_at_step:34", 600, -9)]:
        env.update(FAULT=fault, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=str(flush_seconds))
        done = subprocess.run([sys.executable, FAULTS] + args, env=env, capture_output=True)
        assert done.returncode == code, done.stderr.decode()[-2000:]
    env.pop("FAULT")
    done = subprocess.run([sys.executable, FAULTS] + args, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    train, val = log_values(log_dir, "train"), log_values(log_dir, "val")
    assert sorted(train) == list(range(40)) and sorted(val) == list(range(0, 41, 5))
    runs = sorted(glob.glob(str(wandb_root / "dir" / "wandb" / "offline-run-*")))
    assert len(runs) == 3 and len({run[-8:] for run in runs}) == 1  # one W&B run, 3 processes
    rows, steps_of = {}, []
    for run in runs:
        steps_of.append([])
        for record in dashboards.transaction_log_records(glob.glob(run + "/run-*.wandb")[0]):
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                assert step not in rows, f"step {step} logged twice"
                rows[step] = {"/".join(i.nested_key): i.value_json for i in record.history.item}
                steps_of[-1].append(step)
    assert sorted(rows) == list(range(41))
    assert {s: float(r["train/loss"]) for s, r in rows.items() if s < 40} == train
    assert {s: float(r["val/loss"]) for s, r in rows.items() if "val/loss" in r} == val
    first, second, third = steps_of
    assert first and not second  # W&B held some steps of the first process, none of the second
    assert min(third) <= 20  # the third process sent the second's steps again, from log.txt
    assert all("lr" in rows[s] for s in first)  # what W&B held keeps every metric

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for tag, expected in [("train/loss", train), ("val/loss", val)]:
        points = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [step for step, _ in points] == sorted(expected), tag  # once each, in order
        assert dict(points) == pytest.approx(expected, abs=1e-6), tag


def test_eta_from_known_step_times():
    # four steps of 1 s and an evaluation of 10 s among them: 3.5 s a step
    assert dashboards.eta_seconds([100.0, 101.0, 102.0, 113.0, 114.0], 10) == 35.0
    as_text = [dashboards.format_eta(s) for s in (0, 12.4, 59.6, 185, 5 * 3600 + 12 * 60 + 29)]
    assert as_text == ["0s", "12s", "1m00s", "3m05s", "5h12m"]
    assert dashboards.format_eta(2 * 86400 + 3 * 3600 + 59 * 60) == "2d03h"


def test_eta_of_a_run_whose_step_times_are_known(tmp_path, monkeypatch):
    # steps of 1 s, 30 s for the first (compiling), an evaluation of 10 s every 5 steps: 3 s a
    # step once the first is out of the window. On a rank that is not the master, which writes
    # no dashboard even when asked.
    cfg = TrainConfig(max_steps=105, eval_interval=5, tensorboard=1, log_dir=str(tmp_path))
    env = DistEnv(
        distributed=True, rank=1, local_rank=1, world_size=2, device="cpu", master_process=False
    )
    board = tg.make_dashboard(cfg, env, run_log=None, run_info=None, checkpoint=None)
    now = [1000.0]
    monkeypatch.setattr(dashboards, "time", types.SimpleNamespace(time=lambda: now[0]))
    state = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 1.0}]))
    etas = []
    for step in range(30):
        if step % cfg.eval_interval == 0:
            now[0] += 10
        dt = 30.0 if step == 0 else 1.0
        now[0] += dt
        state.tokens_seen = step
        etas.append(board.log_step(step, state, 1.0, 1.0, dt, 1, None, True))
    assert etas[0] == dashboards.format_eta(30 * 104)  # only the first step's own time to go on
    assert etas[1] == dashboards.format_eta(1 * 103)  # no evaluation between steps 0 and 1
    assert etas[20:] == [dashboards.format_eta(3 * (104 - s)) for s in range(20, 30)]
    board.close()
    assert os.listdir(tmp_path) == []


def test_the_eta_counts_the_evaluations_to_come_from_the_first_step(monkeypatch):
    # steps of 1 s, evaluations of 10 s every 5 steps (the loop's, timed as it times them): from
    # step 1 on, before any evaluation falls between two steps, the ETA is the time left to the
    # second (before, the evaluations were left out: 4.4 times too low at step 5 of a real run)
    board = dashboards.Dashboard(run_log=None, device="cpu", max_steps=105, eval_interval=5)
    now = [1000.0]
    monkeypatch.setattr(dashboards, "time", types.SimpleNamespace(time=lambda: now[0]))
    state = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 1.0}]))
    etas = {}
    for step in range(30):
        if step % 5 == 0:
            with board.evaluation():
                now[0] += 10
        dt = 30.0 if step == 0 else 1.0  # the first step compiles
        now[0] += dt
        state.tokens_seen = step
        etas[step] = board.log_step(step, state, 1.0, 1.0, dt, 1, None, True)
    for step in range(1, 30):
        # steps step + 1 .. 104 to train, and the evaluations of the steps 5, 10, .. 105 after it
        left = (104 - step) * 1 + 10 * (105 // 5 - step // 5)
        assert etas[step] == dashboards.format_eta(left), step


@pytest.mark.parametrize(
    "flag, module", [("--tensorboard", "torch.utils.tensorboard"), ("--wandb_project", "wandb")]
)
def test_a_dashboard_whose_package_is_missing_is_refused_at_start(
    tmp_path, monkeypatch, flag, module
):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` does when it is not installed
    package = module.split(".")[-1]
    args = TINY + [
        flag,
        "1",
        "--data_dir",
        str(tmp_path / "no_shards"),
        "--log_dir",
        str(tmp_path / "log"),
    ]
    # before the data is looked at (it is missing) or anything is written
    fails_in_one_line("train_gpt2.py", args, tmp_path, f"pip install {package}")
    assert os.listdir(tmp_path) == []


def test_a_wandb_run_name_needs_a_project(tmp_path):
    args = TINY + ["--wandb_run_name", "tiny", "--log_dir", str(tmp_path / "log")]
    fails_in_one_line("train_gpt2.py", args, tmp_path, "it needs --wandb_project")
