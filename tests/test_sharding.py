"""FSDP2 (sharding.py) on the CPU with gloo: a sharded run trains as DDP does and as one process
that accumulates twice the gradients, each rank holds its share of the memory, and a sharded
checkpoint resumes on any number of ranks where the run stopped. The references are the DDP and
one-process runs of conftest's two_runs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers

import sharding
import train_gpt2 as tg
from conftest import (
    FAULTS,
    ROOT,
    TINY,
    TRAIN_SCRIPT,
    fails_in_one_line,
    log_lines,
    no_traceback_of_ours,
    run_in_process,
    run_training,
    small_filesystem,
    torchrun,
)
from support import checkpoints
from train_gpt2 import GPT, GPTConfig

CORE_BUNDLE = os.path.join(ROOT, "tests", "data", "core_bundle")
MEMORY = re.compile(
    r"rank 0 holds ([\d.]+) MiB of parameters, ([\d.]+) MiB of gradients and ([\d.]+) MiB of "
    r"optimizer state"
)


def held(output):
    """MiB of parameters, gradients and optimizer state that rank 0 said it holds."""
    return sum(float(x) for x in MEMORY.search(output).groups())


def close(a, b, tolerance):
    """Two runs' log lines of one kind: the same steps, values within tolerance."""
    assert [s for s, _ in a] == [s for s, _ in b] and a, (a, b)
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < tolerance


@pytest.fixture(scope="module")
def sharded(two_runs):
    """two_runs' 12 steps under FSDP on 2 ranks: the output."""
    root, args, _, _ = two_runs
    return run_training(args + ["--shard", "fsdp", "--log_dir", str(root / "fsdp")], 2, root)


@pytest.fixture(scope="module")
def resumed(two_runs, sharded):
    """Step 4's checkpoints resumed on another number of ranks: {name: stdout}. The sharded run
    of 1->2 also scores 3 examples of each CORE task at its evaluations."""
    root = two_runs[0]
    fsdp_4, one_4 = str(root / "fsdp" / "model_00004.dcp"), str(root / "one" / "model_00004.pt")
    core = ["--core", "3", "--core_bundle", CORE_BUNDLE]
    runs = {
        "2->1": (["--resume", fsdp_4, "--shard", "ddp"], 1),  # a whole model, in one process
        "2->4": (["--resume", fsdp_4], 4),
        "1->2": (["--resume", one_4, "--shard", "fsdp"] + core, 2),
    }
    return {
        name: run_training(args + ["--log_dir", str(root / name)], nproc, root)
        for name, (args, nproc) in runs.items()
    }


def test_fsdp_trains_as_ddp_and_as_one_process(two_runs, sharded):
    root, _, _, out_ddp = two_runs
    for kind in ("train", "val"):
        fsdp = log_lines(root / "fsdp", kind)
        assert len(fsdp) == (12 if kind == "train" else 4)
        assert close(fsdp, log_lines(root / "two", kind), 1e-5), kind
        assert close(fsdp, log_lines(root / "one", kind), 1e-5), kind
    # HellaSwag and the samples run on every rank (each gathers the weights); the master prints
    assert log_lines(root / "fsdp", "hella") == log_lines(root / "two", "hella") != []
    assert sharded.count("sample: ") == out_ddp.count("sample: ") == 3
    # the sharded checkpoint, read whole in this process, holds one process's weights
    model, checkpoint = tg.load_model_from_checkpoint(str(root / "fsdp" / "model_00012.dcp"))
    reference = torch.load(root / "one" / "model_00012.pt", weights_only=True)["model"]
    assert checkpoint.sharded and checkpoint["step"] == 12
    weights = model.state_dict()
    assert weights.keys() == reference.keys()
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-5


def test_each_rank_holds_its_share_of_the_memory(two_runs, sharded, resumed):
    # parameters, gradients and AdamW's moments, counted from the tensors each rank holds
    ddp = held(two_runs[3])
    assert "whole copies, 2 ranks" in two_runs[3]
    assert "its shards, 2 ranks" in sharded and "its shards, 4 ranks" in resumed["2->4"]
    assert held(sharded) <= 0.55 * ddp
    assert held(resumed["2->4"]) <= 0.3 * ddp


def test_checkpoints_resume_on_another_number_of_ranks(two_runs, resumed, tmp_path):
    root = two_runs[0]
    references = {"2->1": "fsdp", "2->4": "fsdp", "1->2": "one"}
    for name, reference in references.items():
        assert f"resumed from {root / reference}" in resumed[name]
        for kind in ("train", "val"):
            # the steps before 4 come from the checkpoint's log, the later ones are trained again:
            # the same data, weights and optimizer state, to float32's rounding
            assert close(log_lines(root / name, kind), log_lines(root / reference, kind), 1e-5)
    # a sharded run saves sharded checkpoints, an unsharded run single files, whatever it resumed
    assert (root / "1->2" / "model_00012.dcp").is_dir()
    assert (root / "2->1" / "model_00012.pt").is_file()
    # the CORE that the sharded model scored in the loop is core.py's on its checkpoint
    json_path = tmp_path / "core.json"
    args = ["--checkpoint", root / "1->2" / "model_00012.dcp", "--bundle", CORE_BUNDLE]
    args += ["--limit", 3, "--device", "cpu", "--json", json_path]
    assert run_in_process("core.py", args, tmp_path)[0] == 0
    logged = dict(log_lines(root / "1->2", "core"))
    assert logged[12] == round(json.loads(json_path.read_text())["core"], 4)


def test_sigterm_to_one_rank_saves_and_resumes_exactly(two_runs, sharded, tmp_path):
    root, args, _, _ = two_runs
    log_dir = tmp_path / "stopped"
    args = args + ["--shard", "fsdp", "--log_dir", str(log_dir)]
    code, out, _ = torchrun(args, tmp_path, "signal_at_step:6:1")
    assert code != 0 and no_traceback_of_ours(out)
    assert out.count("stopped by SIGTERM after step 5") == 1 and "--resume latest" in out
    assert checkpoints.checkpoint_steps(str(log_dir)) == [4, 6]
    assert checkpoints.latest_checkpoint(str(log_dir)) == str(log_dir / "model_00006.dcp")
    run_training(["--resume", "latest", "--log_dir", str(log_dir)], 2, tmp_path)
    assert open(log_dir / "log.txt").read() == open(root / "fsdp" / "log.txt").read()


def test_torchrun_restarts_a_killed_sharded_worker_with_async_checkpoints(
    two_runs, sharded, tmp_path
):
    root, args, _, _ = two_runs
    log_dir = tmp_path / "restarted"
    # a sharded checkpoint at every step, written in the background (dcp.async_save), the
    # newest 2 and the milestones kept; rank 1 killed as step 6 begins, in the first attempt
    again = args + ["--shard", "fsdp", "--log_dir", str(log_dir), "--resume", "auto"]
    again += ["--checkpoint_minutes", "1e-9", "--keep_checkpoints", "2", "--async_checkpoint", "1"]
    code, out, _ = torchrun(again, tmp_path, "kill_at_step:6:1", timeout=240, restarts=2)
    assert code == 0, out[-3000:]
    assert out.count("fault: sent SIGKILL") == 1 and "resumed from" in out
    assert open(log_dir / "log.txt").read() == open(root / "fsdp" / "log.txt").read()
    assert checkpoints.checkpoint_steps(str(log_dir)) == [4, 8, 11, 12]
    # the background writes hold what the synchronous ones do, to the bit
    for step in (4, 12):
        a, _ = tg.load_model_from_checkpoint(str(root / "fsdp" / f"model_{step:05d}.dcp"))
        b, _ = tg.load_model_from_checkpoint(str(log_dir / f"model_{step:05d}.dcp"))
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
        )


def test_a_rank_killed_inside_a_sharded_save_ends_the_other_in_one_line_and_restarts(
    two_runs, sharded, tmp_path
):
    # budget: 25 s
    root, args, _, _ = two_runs
    log_dir = tmp_path / "killed"
    # rank 1 killed as it opens its shard file of step 8's checkpoint, written in the background,
    # while rank 0 writes its own; torchrun restarts the pair
    again = args + ["--shard", "fsdp", "--log_dir", str(log_dir), "--resume", "auto"]
    again += ["--async_checkpoint", "1"]
    code, out, _ = torchrun(again, tmp_path, "kill_writing_shards:8:1", timeout=240, restarts=1)
    assert code == 0 and no_traceback_of_ours(out), out[-3000:]
    gone = re.findall(r"rank 0: a collective failed, another rank is gone \(.+\); (.+)\n", out)
    assert gone == [f"the last checkpoint saved is {log_dir / 'model_00004.dcp'}"], out[-3000:]
    assert open(log_dir / "log.txt").read() == open(root / "fsdp" / "log.txt").read()


@pytest.mark.parametrize("nproc, background", [(1, 0), (1, 1), (2, 1)])
def test_a_real_full_disk_in_a_sharded_save_ends_each_rank_in_one_line(
    two_runs, tmp_path, nproc, background
):
    # budget: 10 s each
    root, args, _, _ = two_runs
    disk = tmp_path / "disk"
    inside = small_filesystem(disk, 40)  # step 4's checkpoint (26 MB) fits, step 8's does not
    if inside is None:
        pytest.skip("no tmpfs can be mounted here: the injected ENOSPC of the tests above stands")
    args = args + ["--shard", "fsdp", "--log_dir", str(disk / "log")]
    args += ["--async_checkpoint", str(background)]
    if nproc == 2:
        code, out, _ = torchrun(args, tmp_path, inside=inside)
    else:  # one process writes its shards in a fixed order: the disk fills inside torch.save
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            inside + [sys.executable, TRAIN_SCRIPT] + args,
            env=env,
            text=True,
            capture_output=True,
            cwd=tmp_path,
        )
        code, out = done.returncode, done.stdout + done.stderr
    assert code != 0 and no_traceback_of_ours(out) and "unexpected pos" not in out, out[-3000:]
    said = [line for line in out.splitlines() if line.startswith("could not save")]
    newest = disk / "log" / "model_00004.dcp"
    message = f"could not save {disk / 'log' / 'model_00008.dcp'}: No space left on device"
    assert set(said) == {f"{message}; the earlier checkpoints are intact, the newest {newest}"}
    # what was on the disk afterwards: step 4's checkpoint, whole, and nothing half-written
    after = tmp_path / "disk.after" / "log"
    assert sorted(os.listdir(after)) == ["log.txt", "model_00004.dcp", "run.json"]
    meta = torch.load(after / "model_00004.dcp" / checkpoints.META_FILE, weights_only=False)
    checkpoints.check_shard_files(str(after / "model_00004.dcp"), meta["shard_files"])


def test_a_shard_from_another_checkpoint_is_refused_naming_the_intact_one(
    two_runs, sharded, tmp_path
):
    root = two_runs[0]
    log_dir = tmp_path / "log"
    for step in (8, 12):
        name = f"model_{step:05d}.dcp"
        shutil.copytree(root / "fsdp" / name, log_dir / name)
    shard = sorted(n for n in os.listdir(log_dir / "model_00012.dcp") if n.endswith(".distcp"))[-1]
    # the same shard of step 8: the same size, other weights
    shutil.copy(log_dir / "model_00008.dcp" / shard, log_dir / "model_00012.dcp" / shard)
    newest = log_dir / "model_00012.dcp"
    with pytest.raises(SystemExit) as e:
        checkpoints.load("latest", str(log_dir), ("model", "step"))
    assert str(e.value.code) == (
        f"checkpoint {newest}: {shard} is not the file it wrote (size, CRC-32); the one before "
        f"it is {log_dir / 'model_00008.dcp'}: move {newest} away to resume from it"
    )
    tg.load_model_from_checkpoint(str(log_dir / "model_00008.dcp"))  # the intact one reads


def test_the_scripts_read_a_sharded_checkpoint(two_runs, sharded, tmp_path):
    root = two_runs[0]
    path = str(root / "fsdp" / "model_00012.dcp")
    code, out, _ = run_in_process("export_hf.py", [path, tmp_path / "hf"], tmp_path)
    assert code == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    model, _ = tg.load_model_from_checkpoint(path)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], exported(idx).logits
    assert (ours[..., :50257] - theirs).abs().max().item() < 1e-4
    # HellaSwag scored by hellaswag.py is what the loop logged at step 12
    hella = root / "hella.jsonl"
    args = ["--checkpoint", path, "--input", hella, "--device", "cpu"]
    code, out, _ = run_in_process("hellaswag.py", args, tmp_path)
    logged = dict(log_lines(root / "fsdp", "hella"))[12]
    assert code == 0 and f"acc_norm {logged:.4f}" in out, out
    code, out, _ = run_in_process(
        "sample.py", ["--checkpoint", path, "--max_new_tokens", 4], tmp_path
    )
    assert code == 0 and out.strip()
    # CORE by core.py: the sharded checkpoint answers as its transformers export does
    core = {}
    for name, which in (("sharded", ["--checkpoint", path]), ("exported", ["-m", tmp_path / "hf"])):
        json_path = tmp_path / f"{name}.json"
        args = which + ["--bundle", CORE_BUNDLE, "--device", "cpu", "--json", json_path]
        assert run_in_process("core.py", args, tmp_path)[0] == 0
        core[name] = json.loads(json_path.read_text())
    for label, result in core["sharded"]["tasks"].items():
        assert core["exported"]["tasks"][label]["accuracy"] == result["accuracy"], label
    # a damaged one is refused in one line
    damaged = tmp_path / "damaged.dcp"
    shutil.copytree(path, damaged)
    with open(damaged / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    args = ["--checkpoint", damaged, "--device", "cpu"]
    fails_in_one_line("sample.py", args, tmp_path, "__1_0.distcp is not the file it wrote")
    os.remove(damaged / ".metadata")
    fails_in_one_line("sample.py", args, tmp_path, "is incomplete: it has no .metadata")
    # and a training run starts from its weights (--init_from), given the directory as written
    args = ["--init_from", path + "/", "--data_dir", "bundled", "--T", "32"]
    args += ["--log_dir", str(tmp_path / "ft")]
    cfg, _ = tg.resolve_config(tg.parse_args(args))
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (2, 32, 128)
    started = tg.build_model(cfg, None).state_dict()
    assert all(torch.equal(started[k], v) for k, v in model.state_dict().items())


ONE_PROCESS = TINY + ["--data_dir", "bundled", "--max_steps", "6", "--total_batch_size", "128"]
ONE_PROCESS += ["--num_return_sequences", "0", "--val_loss_steps", "1", "--eval_interval", "3"]
ONE_PROCESS += ["--checkpoint_interval", "2"]
SHARDED_ONE = ["--shard", "fsdp", "--activation_checkpointing", "1"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """6 steps in one process, plain, and sharded with activation checkpointing (FSDP with a
    process group of its own, as on one GPU without torchrun): the log dirs and the sharded run's
    output."""
    root = tmp_path_factory.mktemp("one_process")
    run_training(ONE_PROCESS + ["--log_dir", str(root / "plain")], 1, root)
    out = run_training(ONE_PROCESS + SHARDED_ONE + ["--log_dir", str(root / "fsdp")], 1, root)
    return root, out


def test_one_process_shards_too(one_process):
    root, out = one_process
    assert "its shards, 1 rank)" in out
    # sharding over one rank changes nothing, and activation checkpointing recomputes the same
    for kind in ("train", "val"):
        assert close(log_lines(root / "fsdp", kind), log_lines(root / "plain", kind), 1e-6)
    assert checkpoints.checkpoint_steps(str(root / "fsdp")) == [2, 4, 6]


def test_compiled_fsdp_trains_as_the_eager_plain_run(one_process, tmp_path):
    # with --compile 1, shard_model compiles each block and the loss on its own (the GPU default)
    root, _ = one_process
    log_dir = tmp_path / "compiled"
    run_training(
        ONE_PROCESS + ["--shard", "fsdp", "--compile", "1", "--log_dir", str(log_dir)], 1, tmp_path
    )
    # fp32 throughout: inductor's kernels reorder the sums, a few ulps of a loss near 11
    for kind in ("train", "val"):
        assert close(log_lines(log_dir, kind), log_lines(root / "plain", kind), 1e-5)


def test_a_kill_during_a_sharded_save_keeps_the_earlier_checkpoints(one_process, tmp_path):
    root, _ = one_process
    args = ONE_PROCESS + SHARDED_ONE + ["--log_dir", str(tmp_path / "log")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, FAULT="kill_in_sharded_save:4")
    killed = subprocess.run([sys.executable, FAULTS] + args, cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL
    # step 4's shards were written, but the checkpoint was never completed
    assert checkpoints.checkpoint_steps(str(tmp_path / "log")) == [2]
    assert [n for n in os.listdir(tmp_path / "log") if n.startswith(".model_00004.dcp.")]
    run_training(["--resume", "latest", "--log_dir", str(tmp_path / "log")], 1, tmp_path)
    assert open(tmp_path / "log" / "log.txt").read() == open(root / "fsdp" / "log.txt").read()
    assert sorted(os.listdir(tmp_path / "log")) == sorted(os.listdir(root / "fsdp"))
    # a disk that fills up while the shards are written: one line, nothing half-written left
    env["FAULT"] = "disk_full_in_sharded_save"
    args = ONE_PROCESS + SHARDED_ONE + ["--log_dir", str(tmp_path / "full")]
    full = subprocess.run(
        [sys.executable, FAULTS] + args, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert full.returncode == 1 and "Traceback" not in full.stdout + full.stderr
    message = f"could not save {tmp_path / 'full' / 'model_00002.dcp'}: No space left on device"
    assert full.stderr.splitlines() == [f"{message}; none was saved before"]
    assert sorted(os.listdir(tmp_path / "full")) == ["log.txt", "run.json"]


def test_activation_checkpointing_keeps_less_for_the_same_gradients():
    torch.manual_seed(0)
    # a small vocabulary: the blocks' activations, not the logits, are most of what is kept
    config = GPTConfig(block_size=64, vocab_size=64, n_layer=3, n_head=2, n_embd=64)
    plain, recomputed = GPT(config), GPT(config)
    recomputed.load_state_dict(plain.state_dict())
    sharding.checkpoint_activations(recomputed)
    idx = torch.randint(0, 64, (4, 64))

    def saved_bytes_and_grads(model):
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        return sum(saved), {n: p.grad for n, p in model.named_parameters()}

    plain_bytes, plain_grads = saved_bytes_and_grads(plain)
    recomputed_bytes, grads = saved_bytes_and_grads(recomputed)
    assert all(torch.allclose(grads[n], g, rtol=0, atol=1e-6) for n, g in plain_grads.items())
    # a block keeps its input only: the activations inside the blocks are recomputed
    assert recomputed_bytes < 0.6 * plain_bytes


def test_model_presets_and_what_fsdp_refuses(tmp_path):
    cfg, _ = tg.resolve_config(tg.parse_args(["--model", "gpt2-xl", "--data_dir", "bundled"]))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (48, 25, 1600, 1024)
    assert cfg.max_lr == 2e-4  # GPT-3 XL's (table 2.1)
    cfg, _ = tg.resolve_config(tg.parse_args(["--model", "gpt2-medium", "--max_lr", "1e-4"]))
    assert (cfg.n_layer, cfg.n_embd, cfg.max_lr) == (24, 1024, 1e-4)
    errors = {
        (
            "--model",
            "gpt2-large",
            "--n_layer",
            "4",
        ): "--model gpt2-large sets the shape: drop --n_layer",
        ("--model", "gpt3"): "argument --model: invalid choice: 'gpt3'",
        ("--shard", "fsdp", "--recipe", "speedrun"): "use DDP for the speedrun recipe",
        (
            "--shard",
            "fsdp",
            "--dtype",
            "float16",
        ): "--shard fsdp trains the gpt2 recipe in bf16 or fp32",
    }
    for args, expected in errors.items():
        fails_in_one_line(
            "train_gpt2.py", list(args) + ["--data_dir", "bundled"], tmp_path, expected
        )
