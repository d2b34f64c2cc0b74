import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests never touch the network: transformers and datasets must read local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

HELLASWAG_SLICE = os.path.join(ROOT, "tests", "data", "hellaswag_val_head64.jsonl")
TRAIN_SCRIPT = os.path.join(ROOT, "train_gpt2.py")
FAULTS = os.path.join(ROOT, "tests", "faults.py")

# A model small enough to train in a second on a CPU, with GPT-2's real (padded) vocabulary.
TINY = [
    "--n_layer",
    "2",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--block_size",
    "64",
    "--B",
    "2",
    "--T",
    "32",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--compile",
    "0",
    "--hellaswag",
    "0",
]


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory):
    """The session's fixtures, and the processes they start, work in a directory of their own:
    the checkout's log/, edu_fineweb10B/ or hellaswag/ (what README's first command leaves, say)
    never changes an outcome, and no test writes there."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture(autouse=True)
def in_its_own_directory(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond this machine fails the test that makes it."""
    refuse_network(monkeypatch)


def refuse_network(monkeypatch):
    """Make every connection beyond this machine fail (also for module-scoped fixtures, which
    run before no_network)."""
    import socket

    connect = socket.socket.connect

    def local_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def fails_in_one_line(script, args, cwd, expected, in_process=True):
    """`python script args` exits non-zero with exactly one line on stderr, naming the problem,
    and no traceback anywhere (SPEC S11). By default the script's main() runs in this process
    (what Python does with the SystemExit that ends it: its message on stderr, exit status 1),
    which saves starting an interpreter and importing torch; in_process=False starts one."""
    if in_process:
        code, out, err = run_in_process(script, args, cwd)
        errors = err.splitlines() + ([] if isinstance(code, int | None) else str(code).splitlines())
        assert code not in (0, None)
    else:
        run = subprocess.run(
            [sys.executable, os.path.join(ROOT, script)] + args,
            cwd=cwd,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            timeout=120,
        )
        out, err, errors = run.stdout, run.stderr, run.stderr.strip().splitlines()
        assert run.returncode == 1  # a refused input, whatever the script
    assert "Traceback" not in out + err, err
    assert len(errors) == 1 and expected in errors[0], errors


def run_in_process(script, args, cwd, stdin=""):
    """(exit code, stdout, stderr) of script's main(args) run here, in cwd."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            mock.patch("sys.stdin", io.StringIO(stdin)),
        ):
            module.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


def run_with_address_limit(argv, cwd, gigabytes):
    """A script (argv: its path and arguments) in a process allowed `gigabytes` of address
    space, as `ulimit -v` allows it: the completed process, stderr captured."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gigabytes << 30, gigabytes << 30))

    env = dict(os.environ, PYTHONPATH=ROOT)
    run = dict(cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    return subprocess.run([sys.executable, *argv], **run)


def make_shards(data_dir, lengths, seed=0, split_names=None, fmt="npy"):
    """Write random uint16 token shards; returns their arrays. Shard 0 is val, the rest train."""
    from support.datafiles import write_shard

    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i, n in enumerate(lengths):
        split = (split_names or ["val"] + ["train"] * (len(lengths) - 1))[i]
        tokens = rng.integers(0, 50257, size=n, dtype=np.uint16)
        write_shard(os.path.join(data_dir, f"test_{split}_{i:06d}.{fmt}"), tokens)
        arrays.append(tokens)
    return arrays


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A small random GPT-2 saved by transformers itself, as a local model directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    model = GPT2LMHeadModel(config)
    # GPT-2's init leaves biases and LayerNorms at 0 and 1: randomize them so every weight counts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return str(path)


def run_training(args, nproc, cwd, script=TRAIN_SCRIPT, **env):
    """train_gpt2.py (or a script that wraps it) in nproc CPU processes under torchrun, or one
    without; its stdout, after checking that it succeeded."""
    launcher = (
        [sys.executable, script]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env)
    out = subprocess.run(
        launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def log_lines(log_dir, kind):
    lines = open(os.path.join(log_dir, "log.txt")).read().splitlines()
    return [(int(s), float(v)) for s, k, v in (line.split() for line in lines) if k == kind]


def torchrun(args, cwd, fault="", timeout=120, restarts=0, inside=()):
    """2 CPU processes under torchrun, optionally with a fault of tests/faults.py and restarts by
    torchrun's elastic agent, the whole run inside the command `inside` if given (a prefix such
    as small_filesystem's): (exit code, output, seconds)."""
    launcher = [*inside, sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node=2"]
    launcher += [f"--max-restarts={restarts}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, FAULT=fault)
    t0 = time.perf_counter()
    out = subprocess.run(
        launcher + [FAULTS] + args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0


def small_filesystem(directory, megabytes):
    """A command prefix that runs a command with a real filesystem of this size (tmpfs) mounted
    at directory, in a mount namespace of its own, and copies what is on it to directory.after
    once the command ends (the filesystem goes with the namespace); None where this machine lets
    no test make one (no unshare, or no user namespaces)."""
    os.makedirs(directory, exist_ok=True)
    prefix = ["unshare", "--map-root-user", "--mount", "sh", "-c"]
    script = f'mount -t tmpfs -o size={megabytes}m tmpfs "$0" && "$@"; code=$?; '
    script += 'cp -a "$0" "$0.after"; exit $code'
    try:
        probe = subprocess.run(prefix + [script, str(directory), "true"], capture_output=True)
    except FileNotFoundError:
        return None
    if probe.returncode != 0:
        return None
    shutil.rmtree(f"{directory}.after")
    return prefix + [script, str(directory)]


def no_traceback_of_ours(output):
    # torchrun prints a traceback of its own when a worker fails; ours must not appear
    return 'train_gpt2.py", line' not in output and 'faults.py", line' not in output


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """The same 12 steps run by one process and by two under torchrun (DDP), with HellaSwag, and
    the arguments: 512 tokens per step, 4 micro-steps of B*T = 2*32 on each of 2 ranks, or 8 on
    one. test_distributed.py and test_sharding.py compare other runs with these."""
    root = tmp_path_factory.mktemp("two_runs")
    make_shards(root / "data", [6000, 30000])
    hella = root / "hella.jsonl"
    hella.write_text("".join(open(HELLASWAG_SLICE).readlines()[:10]))
    args = TINY + ["--data_dir", str(root / "data"), "--total_batch_size", "512"]
    args += ["--max_steps", "12", "--eval_interval", "5", "--val_loss_steps", "1"]
    args += ["--checkpoint_interval", "4", "--block_size", "128", "--hellaswag", "1"]
    args += ["--hellaswag_path", str(hella), "--num_return_sequences", "1"]
    out1 = run_training(args + ["--log_dir", str(root / "one")], 1, root)
    out2 = run_training(args + ["--log_dir", str(root / "two")], 2, root)
    return root, args, out1, out2


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A checkpoint of a short real run and its Hugging Face export."""
    import export_hf
    import train_gpt2

    root = tmp_path_factory.mktemp("hella")
    make_shards(root / "data", [3000, 9000])
    train_gpt2.main(
        TINY
        + ["--data_dir", str(root / "data"), "--log_dir", str(root / "log"), "--max_steps", "3"]
        + ["--total_batch_size", "64", "--eval_interval", "10", "--block_size", "128"]
        + ["--max_lr", "1e-2", "--warmup_steps", "1"]
    )
    checkpoint = str(root / "log" / "model_00003.pt")
    export_hf.main([checkpoint, str(root / "hf")])
    return checkpoint, str(root / "hf")
