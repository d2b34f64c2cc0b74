"""Bad input (SPEC S11): one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, TINY, fails_in_one_line, make_shards

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
        (["--vocab_size", "50000"], "--vocab_size 50000 is smaller than the tokenizer's 50257"),
        (["--recipe", "gpt3"], "argument --recipe: invalid choice: 'gpt3'"),
        (["--B", "many"], "argument --B: expected a number or 'auto', not 'many'"),
        (["--max_length", "100"], "--max_length 100 is longer than block_size"),
        (["--fp8", "1", "--T", "24"], "--fp8 needs n_embd and T divisible by 16, not 32 and 24"),
    ],
)
def test_bad_settings(workdir, flags, expected):
    fails(with_data(workdir, *flags), workdir, expected)
    assert not os.path.exists(workdir / "new")


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
