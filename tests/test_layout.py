"""The shape of the project: imports run one way, data preparation needs no torch, importing does
no work, every flag is in --help, and checkpoints keep the format older versions wrote."""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import speedrun
import train_gpt2 as tg
from conftest import ROOT, TINY, make_shards

SCRIPTS = ("fineweb", "hellaswag", "core", "sample", "bench", "export_hf", "recipe_proxy")
ROOT_MODULES = sorted(n[:-3] for n in os.listdir(ROOT) if n.endswith(".py"))
SUPPORT = sorted(
    f"support.{n[:-3]}" for n in os.listdir(os.path.join(ROOT, "support")) if n.endswith(".py")
)
SUPPORT = [m if m != "support.__init__" else "support" for m in SUPPORT]  # the package itself
PROJECT = ROOT_MODULES + SUPPORT


def source_file(module):
    path = module.replace(".", os.sep)
    return os.path.join(ROOT, path, "__init__.py") if module == "support" else f"{ROOT}/{path}.py"


def project_imports(module):
    """The project modules that `module` imports anywhere in its file (at the top or inside a
    function: a lazy import closes a circle all the same). `from support import cli` imports
    support.cli; `from support import PROJECT_DIR` the package itself."""
    tree = ast.parse(open(source_file(module)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in PROJECT else node.module)
    return names & set(PROJECT)


def test_imports_run_one_way():
    graph = {m: project_imports(m) for m in PROJECT}
    assert graph["train_gpt2"] and "hellaswag" not in graph["train_gpt2"]  # the test sees imports
    order, state = [], {}  # a depth-first search: a module met again while open is a circle

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import circle: {' -> '.join(path + [module])}")
        if state.get(module) != "done":
            state[module] = "open"
            for imported in sorted(graph[module]):
                visit(imported, path + [module])
            state[module] = "done"
            order.append(module)

    for module in PROJECT:
        visit(module, [])
    # the scripts sit above the trainer, never below it
    for script in SCRIPTS:
        assert script not in {m for m in PROJECT if script in graph[m]}, script
    # support/ is plumbing under everything: it imports nothing of the root
    for module in SUPPORT:
        assert graph[module] <= set(SUPPORT), (module, graph[module] - set(SUPPORT))


def test_the_trainer_reads_as_the_lectures_path():
    # STYLE habit 1: the lecture's path, its extensions beside it and the plumbing below it;
    # `from support import ...` counts as one module, the package of the plumbing
    lines = open(os.path.join(ROOT, "train_gpt2.py")).read().count("\n")
    assert lines <= 1100, lines
    imported = {m.split(".")[0] for m in project_imports("train_gpt2")}
    assert len(imported) <= 9 and "support" in imported, sorted(imported)
    assert not imported & set(SCRIPTS)


def calls(module, names):
    """The lines of a module where it calls one of `names` (dotted, as written: torch.save)."""
    found = []
    for node in ast.walk(ast.parse(open(source_file(module)).read())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names:
            found.append(node.lineno)
    return found


def test_checkpoints_are_written_in_one_module():
    # torch.save and torch.distributed.checkpoint's save only in support/checkpoints.py, which
    # writes through support/files.py's atomic writers, the only os.replace of the project
    for module in PROJECT:
        if module != "support.checkpoints":
            assert not calls(module, {"torch.save", "dcp.save"}), module
        if module != "support.files":
            assert not calls(module, {"os.replace", "os.rename", "shutil.move"}), module
    assert calls("support.checkpoints", {"torch.save"}) and calls("support.files", {"os.replace"})


def test_importing_the_trainer_and_the_scripts_leaves_the_heavy_parts_unloaded(tmp_path):
    # FSDP2, DTensor and torch.distributed.checkpoint (half a second each) load when a run shards
    # or reads a sharded checkpoint; transformers when a transformers model is loaded or written
    heavy = ["torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp"]
    heavy += ["transformers", "datasets", "torch.utils.tensorboard", "wandb"]
    code = (
        "import sys, train_gpt2, sample, hellaswag, core, export_hf\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_data_preparation_needs_no_torch(tmp_path):
    # a `torch` that cannot be imported shadows the installed one
    (tmp_path / "no_torch" / "torch").mkdir(parents=True)
    (tmp_path / "no_torch" / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is not installed here')\n"
    )
    text = open(os.path.join(ROOT, "data", "corpus", "alice29.txt"), encoding="utf-8").read()
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": part}) + "\n" for part in text.split("\n\n")[:200])
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "no_torch"), ROOT]))
    script = os.path.join(ROOT, "fineweb.py")
    args = ["--input", "docs.jsonl", "--output_dir", "out", "--shard_size", "5000"]
    args += ["--num_proc", "2", "--decontaminate", "hellaswag"]
    args += ["--hellaswag_path", os.path.join(ROOT, "tests", "data", "hellaswag_val_head64.jsonl")]
    run = subprocess.run(
        [sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0  # torch really was unimportable there
    # the shards hold the documents' tokens, as the tokenizer gives them here
    import numpy as np

    from support.datafiles import EOT, get_tokenizer

    enc = get_tokenizer()
    expected = [t for part in text.split("\n\n")[:200] for t in [EOT] + enc.encode_ordinary(part)]
    names = sorted(os.listdir(tmp_path / "out"), key=lambda n: n.split("_")[-1])
    got = np.concatenate([np.load(tmp_path / "out" / n) for n in names if n.endswith(".npy")])
    assert got.tolist() == expected


def test_import_does_no_work(tmp_path):
    # no files, no network, no process group, no CUDA, no threads or pools, no heavy imports
    modules = ", ".join(PROJECT)
    code = (
        "import multiprocessing, os, sys, threading\n"
        "import socket\n"
        "socket.socket.connect = lambda *a: (_ for _ in ()).throw(OSError('network'))\n"
        "before = threading.active_count()\n"
        f"import {modules}\n"
        "import torch\n"
        "assert not torch.distributed.is_initialized()\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert threading.active_count() == before and not multiprocessing.active_children()\n"
        "assert 'transformers' not in sys.modules and 'datasets' not in sys.modules\n"
        "assert os.listdir('.') == []\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "ok", out.stderr


SETTINGS = {
    "train_gpt2": "TrainConfig",
    "sample": "SampleConfig",
    "bench": "BenchConfig",
    "hellaswag": "HellaSwagConfig",
    "core": "CoreConfig",
    "fineweb": "FinewebConfig",
}


@pytest.mark.parametrize("script", sorted(SETTINGS))
def test_help_lists_every_flag_with_its_real_default(script, capsys):
    # a field whose default is None says in its help what None means
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    import dataclasses

    for f in dataclasses.fields(getattr(module, SETTINGS[script])):
        assert f"--{f.name} " in text, f.name
    assert "(default: None)" not in text
    if script in ("train_gpt2", "sample", "bench"):
        assert "(default: auto)" in text.replace("'", "")


def checkpoint_format(path):
    """The structure of a checkpoint: its keys, the names and shapes of its weights, and the kinds
    of state its optimizer, loader and RNGs keep (tests/data/checkpoint_format.json's fields)."""
    ckpt = torch.load(path, weights_only=True)
    opt = ckpt["optimizer"]
    ours = {"betas", "eps", "lr", "weight_decay", "initial_lr", "momentum", "use_muon"}
    return {
        "keys": sorted(ckpt),
        "model_config": ckpt["model_config"],
        "train_config": sorted(ckpt["train_config"]),
        "model": {k: list(v.shape) for k, v in ckpt["model"].items()},
        "optimizer_groups": [sorted(set(g) & ours) for g in opt["param_groups"]],
        "optimizer_params": [len(g["params"]) for g in opt["param_groups"]],
        "optimizer_state": sorted({k for s in opt["state"].values() for k in s}),
        "loader": sorted(ckpt["loader"]),
        "rng": sorted(ckpt["rng"]),
    }


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_checkpoints_keep_their_format(tmp_path, recipe):
    # tests/data/checkpoint_format.json was read off checkpoints that commit e2a0390 wrote (the
    # bundled-corpus model at n_layer 2, n_head 2, n_embd 64): a change that would leave older
    # checkpoints unreadable, or make new ones that older code cannot read, fails here
    expected = json.load(open(os.path.join(ROOT, "tests", "data", "checkpoint_format.json")))
    make_shards(tmp_path / "data", [3000, 9000])
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "log")]
    args += ["--n_embd", "64", "--block_size", "256", "--recipe", recipe, "--max_steps", "1"]
    args += ["--total_batch_size", "64", "--eval_interval", "10", "--val_loss_steps", "1"]
    # the speedrun's switches since then (speedrun.SWITCHES), off: e2a0390's speedrun recipe
    tg.main(args + [x for switch in speedrun.SWITCHES for x in (f"--{switch}", "0")])
    found = checkpoint_format(tmp_path / "log" / "model_00001.pt")
    # settings added since e2a0390 (the code of then and now ignores train_config keys it does
    # not know, so checkpoints stay readable both ways)
    added = {"model", "shard", "activation_checkpointing"}  # sharding.py's
    added |= {"tensorboard", "wandb_project", "wandb_run_name"}  # dashboards.py's
    added |= {"checkpoint_minutes", "keep_checkpoints", "async_checkpoint"}  # long runs' flags
    added |= set(speedrun.SWITCHES) | {"scalar_lr"}  # the current speedrun recipe's
    added |= {"core", "core_bundle", "bpb"}  # the loop's CORE and bits per byte
    added |= {"attention", "fp8_kernels"}  # the SDPA kernel, whose FP8 (model_kernels.py)
    assert added <= set(found["train_config"])
    found["train_config"] = [k for k in found["train_config"] if k not in added]
    model_switches = [f.name for f in dataclasses.fields(speedrun.ModelSettings)]
    assert all(found["model_config"].pop(switch) == 0 for switch in model_switches)
    assert found == expected[recipe]


def test_no_module_of_the_root_hides_an_installed_package():
    # the root is first on sys.path: a kernels.py there was imported by transformers 5.25 in
    # place of the `kernels` package it requires, and every transformers model failed to load
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    assert not set(ROOT_MODULES) & installed, sorted(set(ROOT_MODULES) & installed)
