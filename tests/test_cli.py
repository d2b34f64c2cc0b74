"""Bad input (SPEC S11): one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, TINY, fails_in_one_line, make_shards, run_with_address_limit
from support import checkpoints

SCRIPT = os.path.join(ROOT, "train_gpt2.py")


def fails(args, cwd, expected):
    fails_in_one_line("train_gpt2.py", args, cwd, expected)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A data dir, and a log dir with a checkpoint of a finished tiny run."""
    root = tmp_path_factory.mktemp("cli")
    make_shards(root / "data", [3000, 9000])
    tg.main(
        TINY
        + [
            "--data_dir",
            str(root / "data"),
            "--log_dir",
            str(root / "log"),
            "--max_steps",
            "2",
            "--total_batch_size",
            "64",
            "--eval_interval",
            "10",
            "--val_loss_steps",
            "1",
        ]
    )
    return root


def with_data(workdir, *args):
    return TINY + [
        "--data_dir",
        str(workdir / "data"),
        "--log_dir",
        str(workdir / "new"),
        "--total_batch_size",
        "64",
        "--max_steps",
        "1",
        *args,
    ]


def test_missing_data_dir(workdir):
    fails(
        TINY + ["--data_dir", str(workdir / "nope"), "--log_dir", "new"], workdir, "no train shards"
    )


def test_empty_data_dir(workdir):
    os.makedirs(workdir / "empty", exist_ok=True)
    fails(
        TINY + ["--data_dir", str(workdir / "empty"), "--log_dir", "new"],
        workdir,
        "no train shards",
    )


@pytest.mark.parametrize("kind", ["dtype", "header", "range"])
def test_bad_shards(workdir, kind):
    d = workdir / kind
    make_shards(d, [3000, 3000])
    if kind == "dtype":
        np.save(d / "test_train_000001.npy", np.zeros(3000, dtype=np.int32))
        expected = "1-D uint16"
    elif kind == "header":
        os.remove(d / "test_train_000001.npy")
        np.zeros(256 + 1500, dtype=np.int32).tofile(d / "test_train_000001.bin")
        expected = "magic number"
    else:
        np.save(d / "test_train_000001.npy", np.full(3000, 60000, dtype=np.uint16))
        expected = "token id 60000 is outside the vocabulary"
    fails(TINY + ["--data_dir", str(d), "--log_dir", str(workdir / "new")], workdir, expected)


def test_batch_not_divisible(workdir):
    fails(
        with_data(workdir, "--total_batch_size", "100"),
        workdir,
        "total_batch_size=100 is not divisible by B * T * world_size = 2 * 32 * 1 = 64",
    )


def test_sequence_longer_than_block_size(workdir):
    fails(
        with_data(workdir, "--T", "128"), workdir, "T=128 is longer than the model's block_size=64"
    )


def test_unknown_model_name(workdir):
    fails(
        [
            "--init_from",
            "gpt3",
            "--data_dir",
            str(workdir / "data"),
            "--device",
            "cpu",
            "--log_dir",
            str(workdir / "new"),
        ],
        workdir,
        "unknown model 'gpt3'",
    )


def test_missing_checkpoint(workdir):
    fails(["--resume", str(workdir / "log" / "model_99999.pt")], workdir, "does not exist")
    fails(["--resume", "latest", "--log_dir", str(workdir / "nolog")], workdir, "no checkpoint")


def test_corrupt_checkpoint(workdir):
    good = open(workdir / "log" / "model_00002.pt", "rb").read()
    (workdir / "bad").mkdir(exist_ok=True)
    (workdir / "bad" / "model_00002.pt").write_bytes(good[: len(good) // 2])
    fails(["--resume", "latest", "--log_dir", str(workdir / "bad")], workdir, "is corrupt")


def test_config_mismatch_on_resume(workdir):
    before = open(workdir / "log" / "log.txt").read()
    fails(
        ["--resume", "latest", "--log_dir", str(workdir / "log"), "--n_layer", "3"],
        workdir,
        "has n_layer=2, but n_layer=3 was requested",
    )
    assert open(workdir / "log" / "log.txt").read() == before


def test_hellaswag_missing_offline(workdir):
    fails(
        with_data(
            workdir,
            "--hellaswag",
            "1",
            "--hellaswag_path",
            str(workdir / "none.jsonl"),
            "--block_size",
            "256",
        ),
        workdir,
        "HellaSwag file",
    )


def test_unavailable_device(workdir):
    fails(with_data(workdir, "--device", "tpu"), workdir, "--device tpu is not available")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--B", "0"], "--B 0: must be positive"),
        (["--total_batch_size", "0"], "--total_batch_size 0: must be positive"),
        (["--n_layer", "-1"], "--n_layer -1: must be positive"),
        (["--max_lr", "0"], "--max_lr 0.0: out of range"),
        (["--vocab_size", "50000"], "--vocab_size 50000: out of range (must be >= 50257)"),
        (["--recipe", "gpt3"], "argument --recipe: invalid choice: 'gpt3'"),
        (["--attention", "cudnn"], "--attention cudnn does not run on cpu (float32, head size 16)"),
        (["--B", "many"], "argument --B: expected a number or 'auto', not 'many'"),
        (["--max_length", "100"], "--max_length 100 is longer than block_size"),
        (["--fp8", "1", "--T", "24"], "--fp8 needs n_embd and T divisible by 16, not 32 and 24"),
        # not finite, or outside what numpy and torch accept: refused before anything runs
        (["--max_lr", "inf"], "--max_lr inf: must be a finite number"),
        (["--max_lr", "nan"], "--max_lr nan: must be a finite number"),
        (["--weight_decay", "nan"], "--weight_decay nan: must be a finite number"),
        (["--recipe", "speedrun", "--muon_lr", "nan"], "--muon_lr nan: must be a finite number"),
        (["--grad_clip", "inf"], "--grad_clip inf: must be a finite number"),
        (["--min_lr_ratio", "nan"], "--min_lr_ratio nan: must be a finite number"),
        (["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        (["--seed", "99999999999"], "--seed 99999999999: must be between 0 and 4294967295"),
        (
            ["--resume", "x.pt", "--init_from", "gpt2"],
            "--resume and --init_from exclude each other",
        ),
    ],
)
def test_bad_settings(workdir, flags, expected):
    fails(with_data(workdir, *flags), workdir, expected)
    assert not os.path.exists(workdir / "new")


def test_a_directory_where_a_file_is_expected(workdir):
    (workdir / "a_dir.pt").mkdir(exist_ok=True)
    fails(["--resume", str(workdir / "a_dir.pt")], workdir, "a_dir.pt is a directory, not a file")
    args = ["--hellaswag", "1", "--hellaswag_path", str(workdir), "--block_size", "256"]
    fails(with_data(workdir, *args), workdir, f"HellaSwag file {workdir} is a directory")


def test_no_step_is_taken_with_a_rate_that_is_not_finite(workdir, tmp_path, monkeypatch):
    # the settings are finite (checked at start), but should a schedule ever make a rate that is
    # not, the step is not taken and the run stops, its weights as the last step left them
    get_lr = tg.get_lr
    monkeypatch.setattr(
        tg, "get_lr", lambda step, cfg: math.inf if step == 1 else get_lr(step, cfg)
    )
    args = TINY + ["--data_dir", str(workdir / "data"), "--log_dir", str(tmp_path / "log")]
    args += ["--total_batch_size", "64", "--eval_interval", "10", "--max_steps", "3"]
    with pytest.raises(SystemExit, match=r"step 1: a learning rate or weight decay is not finite"):
        tg.main(args)
    assert [line.split()[:2] for line in open(tmp_path / "log" / "log.txt")][-1] == ["0", "train"]


def test_a_diverged_model_is_never_saved(workdir, tmp_path, monkeypatch):
    # a rate that makes the loss infinite after one step: the run stops at its first checkpoint
    # instead of writing the diverged model, and names the last good checkpoint, or none
    log_dir = tmp_path / "log"
    args = TINY + ["--data_dir", str(workdir / "data"), "--log_dir", str(log_dir)]
    args += ["--total_batch_size", "64", "--eval_interval", "2", "--val_loss_steps", "1"]
    args += ["--checkpoint_interval", "2", "--warmup_steps", "1", "--max_steps", "10"]
    with pytest.raises(SystemExit) as e:
        tg.main(args + ["--max_lr", "1e30"])
    assert str(e.value) == (
        "the model has diverged after step 1 (its loss is not finite): not saved; lower --max_lr "
        "(no checkpoint was saved)"
    )
    assert checkpoints.checkpoint_steps(str(log_dir)) == []
    # a run that saved step 2, resumed at that rate, keeps step 2 and says so
    TEN = ["--max_steps", "10"]
    shutil.rmtree(log_dir)
    tg.main(args + ["--max_steps", "2"])
    with pytest.raises(SystemExit, match=r"\(the last checkpoint saved is .*model_00002.pt\)"):
        tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_lr", "1e30"] + TEN)
    assert checkpoints.checkpoint_steps(str(log_dir)) == [2]
    # weights made infinite by an optimizer step whose loss was finite: caught at the save
    step = torch.optim.AdamW.step

    def infinite_step(self, *a, **k):
        step(self, *a, **k)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", infinite_step)
    with pytest.raises(SystemExit, match=r"after step 3 \(its weights are not finite\): not saved"):
        tg.main(["--resume", "latest", "--log_dir", str(log_dir), "--max_steps", "4"])
    assert checkpoints.checkpoint_steps(str(log_dir)) == [2]


def test_unreadable_shards(workdir):
    d = workdir / "unreadable"
    make_shards(d, [3000, 3000])
    open(d / "test_train_000001.npy", "wb").close()  # zero bytes
    fails(TINY + ["--data_dir", str(d), "--log_dir", "new"], workdir, "not a readable .npy")
    os.remove(d / "test_train_000001.npy")
    os.mkdir(d / "test_train_000001.npy")  # not a file at all
    fails(TINY + ["--data_dir", str(d), "--log_dir", "new"], workdir, "cannot read the shard")


def test_a_bad_token_in_a_later_shard_is_found_before_training(workdir):
    d = workdir / "late"
    make_shards(d, [3000, 3000, 3000, 3000])
    tokens = np.load(d / "test_train_000003.npy")
    tokens[-1] = 50257
    np.save(d / "test_train_000003.npy", tokens)
    args = TINY + ["--data_dir", str(d), "--log_dir", str(workdir / "late_log")]
    out = subprocess.run(
        [sys.executable, SCRIPT] + args + ["--total_batch_size", "64", "--shuffle", "0"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    # in file order the shard would be read after about 190 steps: it is found before step 0
    assert out.returncode == 1 and "step" not in out.stdout
    assert out.stderr.strip().endswith("token id 50257 is outside the vocabulary (< 50257)")


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_log_dir_that_cannot_be_used(workdir, where):
    log_dir = {"file": str(workdir / "data" / "test_val_000000.npy"), "unwritable": "/sys/log"}
    expected = {"file": "is a file, not a directory", "unwritable": "cannot write to --log_dir"}
    fails(with_data(workdir, "--log_dir", log_dir[where]), workdir, expected[where])


def test_checkpoint_missing_keys(workdir):
    ckpt = torch.load(workdir / "log" / "model_00002.pt", weights_only=True)
    del ckpt["optimizer"], ckpt["rng"]
    (workdir / "partial").mkdir(exist_ok=True)
    torch.save(ckpt, workdir / "partial" / "model_00002.pt")
    fails(
        ["--resume", "latest", "--log_dir", str(workdir / "partial")],
        workdir,
        "is incomplete: it has no optimizer, rng",
    )


def test_foreign_line_in_log(workdir):
    shutil.copytree(workdir / "log", workdir / "foreign")
    with open(workdir / "foreign" / "log.txt", "a") as f:
        f.write("epoch 3 done\n")
    before = open(workdir / "foreign" / "log.txt").read()
    fails(
        ["--resume", "latest", "--log_dir", str(workdir / "foreign")],
        workdir,
        "log.txt line 5 is not a line of train_gpt2.py's log: 'epoch 3 done'",
    )
    assert open(workdir / "foreign" / "log.txt").read() == before


def test_broken_hellaswag_file(workdir):
    broken = workdir / "broken.jsonl"
    broken.write_text('{"ctx": "A man", "endings": ["a", "b"], "label": 0}\n')
    args = ["--hellaswag", "1", "--hellaswag_path", str(broken), "--block_size", "256"]
    fails(with_data(workdir, *args), workdir, "line 1 is not a HellaSwag example")
    broken.write_text("{not json\n")
    fails(with_data(workdir, *args), workdir, "line 1 is not JSON")


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("train_gpt2.py", ["--max_lr", "nan"], "--max_lr nan: must be a finite number"),
        ("train_gpt2.py", ["--recipe", "gpt3"], "argument --recipe: invalid choice: 'gpt3'"),
        ("sample.py", ["--device", "banana"], "--device banana is not available"),
        ("hellaswag.py", ["--input", "missing.jsonl"], "HellaSwag file missing.jsonl does not"),
        ("fineweb.py", ["--num_proc", "0"], "--num_proc 0: must be positive"),
        ("bench.py", ["--json", "missing/x.json"], "--json missing/x.json: "),
        ("export_hf.py", ["missing.pt", "out"], "checkpoint missing.pt does not exist"),
    ],
)
def test_every_script_refuses_bad_input_in_one_line_with_status_1(tmp_path, script, args, expected):
    # the end-to-end check, in a process of its own (the others run main() in this one)
    fails_in_one_line(script, args, tmp_path, expected, in_process=False)


# ----------------------------------------------------------------------------- found as a new user


def test_a_ctrl_c_while_torch_imports_ends_in_one_line(tmp_path):
    # the imports take a second or two before main() runs: a numpy that never finishes importing
    # holds the run there until the Ctrl-C has come
    (tmp_path / "slow" / "numpy").mkdir(parents=True)
    (tmp_path / "slow" / "numpy" / "__init__.py").write_text(
        "import time\nprint('importing numpy', flush=True)\ntime.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "slow"), ROOT]))
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--max_steps", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "importing numpy\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert proc.stderr.read() == "interrupted (Ctrl-C) during start-up: nothing to save\n"


def test_running_out_of_host_memory_ends_in_one_line(tmp_path):
    # GPT-2 XL's weights alone are 6.2 GB: a process allowed 3 GB of address space (torch takes
    # under 1) cannot build them
    args = ["--model", "gpt2-xl", "--data_dir", "bundled", "--device", "cpu", "--max_steps", "1"]
    run = run_with_address_limit([SCRIPT, *args], tmp_path, gigabytes=3)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("out of memory (") and "--activation_checkpointing 1" in line
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_default_data_dir_without_train_shards_is_refused_not_replaced(tmp_path):
    # fineweb.py writes the val shard first: a run it has not finished holds no train shard yet,
    # and the bundled corpus must not silently take its place
    make_shards(tmp_path / "edu_fineweb10B", [3000], split_names=["val"])
    args = ["--max_steps", "1", "--device", "cpu"]
    fails(args, tmp_path, "edu_fineweb10B/ holds no train shards: `python fineweb.py` goes on")
    assert sorted(os.listdir(tmp_path)) == ["edu_fineweb10B"]
    shutil.rmtree(tmp_path / "edu_fineweb10B")  # with no such directory, the small run trains
    cfg, _ = tg.resolve_config(tg.parse_args(args))
    assert cfg.data_dir == "bundled"


def test_a_link_to_nothing_as_log_dir_is_refused_in_one_line(workdir, tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    args = with_data(workdir, "--log_dir", str(tmp_path / "link"))
    fails(args, tmp_path, f"--log_dir {tmp_path / 'link'} is a link to {tmp_path / 'gone'}, which")
    assert not os.path.exists(tmp_path / "gone")


def test_the_closing_line_says_the_size_of_the_model_it_trained():
    with torch.device("meta"):
        small = tg.GPT(tg.GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=50304))
        gpt2 = tg.GPT(tg.GPTConfig(vocab_size=50304))
    assert tg.model_size(small) == "a small model"  # 7.3M parameters: the default run's
    assert tg.model_size(gpt2) == "a 124M-parameter model"  # GPT-2 124M's shape
