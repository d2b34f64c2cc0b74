import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_shards
from support import datafiles
from train_gpt2 import DataLoaderLite

# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_offline(tmp_path):
    # a fresh interpreter with an empty tiktoken cache and no network at all
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "from support import datafiles\n"
        "enc = datafiles.get_tokenizer()\n"
        'print(enc.encode("Hello, I\'m a language model,"), enc.eot_token, enc.n_vocab)\n'
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11] 50256 50257"
    assert not os.path.exists(tmp_path / "empty")


def test_tokenizer_matches_hugging_face_files():
    # OpenAI's encoder.json / vocab.bpe through transformers: an independent implementation
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(os.path.join(ROOT, "data", "gpt2-hf"))
    enc = datafiles.get_tokenizer()
    corpus = os.path.join(ROOT, "data", "corpus")
    for name in sorted(os.listdir(corpus)):
        text = open(os.path.join(corpus, name), encoding="utf-8").read()
        assert enc.encode_ordinary(text) == hf(text)["input_ids"], name
    odd = "  Ünïcödé\t\n\n 123 4567 you'll 'S -- 🤖 endoftext|>"
    assert enc.encode_ordinary(odd) == hf(odd)["input_ids"]


def test_tokenizer_checks_its_file(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    data = open(datafiles.TOKENIZER_PATH, "rb").read()
    bad.write_bytes(data[:-10] + b"0123456789")
    monkeypatch.setattr(datafiles, "TOKENIZER_PATH", str(bad))
    datafiles.get_tokenizer.cache_clear()
    try:
        with pytest.raises(SystemExit, match="corrupt"):
            datafiles.get_tokenizer()
    finally:
        datafiles.get_tokenizer.cache_clear()


# ----------------------------------------------------------------------------- shards


def all_sequences(shards, T):
    """Reference: every shard cut into (T + 1)-token windows starting at multiples of T."""
    return [s[i * T : i * T + T + 1] for s in shards for i in range((len(s) - 1) // T)]


def test_batches_match_numpy_slicing(tmp_path):
    shards = make_shards(tmp_path, [300, 1000, 777, 1500])[1:]
    B, T = 3, 16
    seqs = all_sequences(shards, T)
    loader = DataLoaderLite(B, T, 0, 1, "train", str(tmp_path))
    # with one process and no shuffling, the first batch is the lecture's contiguous B*T+1 tokens
    x, y = loader.next_batch()
    buf = torch.from_numpy(shards[0][: B * T + 1].astype(np.int64))
    assert torch.equal(x, buf[:-1].view(B, T)) and torch.equal(y, buf[1:].view(B, T))
    assert x.dtype == torch.long and x.is_contiguous() and y.is_contiguous()
    # and every later batch is the next B windows of the stream, across shards and epochs
    for k in range(1, 2 * len(seqs) // B + 3):
        x, y = loader.next_batch()
        rows = np.stack([seqs[(k * B + b) % len(seqs)] for b in range(B)]).astype(np.int64)
        assert np.array_equal(x.numpy(), rows[:, :-1]) and np.array_equal(y.numpy(), rows[:, 1:])


@pytest.mark.parametrize("world", [1, 3])
def test_ranks_cover_every_shard_to_its_last_usable_token(tmp_path, world):
    # token value = position, so a target tells where it came from
    lengths = [1001, 517, 2050]
    for i, n in enumerate(lengths):
        tokens = (np.arange(n) + 10000 * i).astype(np.uint16)
        datafiles.write_shard(str(tmp_path / f"d_train_{i:06d}.npy"), tokens)
    B, T = 2, 10
    total = sum((n - 1) // T for n in lengths)  # windows in one epoch
    loaders = [DataLoaderLite(B, T, r, world, "train", str(tmp_path)) for r in range(world)]
    windows = []  # in stream order: step by step, rank by rank
    while len(windows) < total:
        for loader in loaders:
            windows.extend(loader.next_batch()[1].numpy())
    epoch = np.concatenate(windows[:total])
    assert len(np.unique(epoch)) == len(epoch)  # no window read twice, by any rank
    for i, n in enumerate(lengths):
        last_usable = (n - 1) // T * T
        got = np.sort(epoch[(epoch >= 10000 * i) & (epoch < 10000 * (i + 1))])
        assert np.array_equal(got, np.arange(1, last_usable + 1) + 10000 * i), f"shard {i}"


def test_two_ranks_are_disjoint_and_equal_one_rank_with_twice_the_batch(tmp_path):
    make_shards(tmp_path, [100, 5000, 3000])
    for shuffle in (False, True):
        single = DataLoaderLite(8, 16, 0, 1, "train", str(tmp_path), shuffle=shuffle)
        ranks = [
            DataLoaderLite(4, 16, r, 2, "train", str(tmp_path), shuffle=shuffle) for r in (0, 1)
        ]
        for _ in range(20):
            x, y = single.next_batch()
            (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
            assert not any(torch.equal(a, b) for a in x0 for b in x1)


def test_bin_shards(tmp_path):
    npy = make_shards(tmp_path / "npy", [200, 3000])
    make_shards(tmp_path / "bin", [200, 3000], fmt="bin")
    raw = np.fromfile(tmp_path / "bin" / "test_train_000001.bin", dtype=np.int32, count=3)
    assert raw.tolist() == [20240520, 1, 3000]
    a = DataLoaderLite(4, 32, 0, 1, "train", str(tmp_path / "npy"), shuffle=True)
    b = DataLoaderLite(4, 32, 0, 1, "train", str(tmp_path / "bin"), shuffle=True)
    assert np.array_equal(b.sequences.shards[0], npy[1])
    for _ in range(30):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))


def test_bad_shards_are_rejected(tmp_path):
    make_shards(tmp_path / "ok", [100, 2000], fmt="bin")
    path = tmp_path / "ok" / "test_train_000001.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "magic").mkdir()
    (tmp_path / "magic" / "x_train_000001.bin").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="magic number"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "magic"))
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "x_train_000001.bin").write_bytes(path.read_bytes()[:-2])
    with pytest.raises(SystemExit, match="header says 2000 tokens"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "short"))
    (tmp_path / "dtype").mkdir()
    np.save(tmp_path / "dtype" / "x_train_000001.npy", np.arange(1000, dtype=np.int32))
    with pytest.raises(SystemExit, match="1-D uint16.*int32"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "dtype"))
    (tmp_path / "range").mkdir()
    np.save(tmp_path / "range" / "x_train_000001.npy", np.full(1000, 50300, dtype=np.uint16))
    with pytest.raises(SystemExit, match="token id 50300 is outside the vocabulary"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "range"))
    with pytest.raises(SystemExit, match="no train shards"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "missing"))


def test_shuffle_is_a_seeded_permutation(tmp_path):
    shards = make_shards(tmp_path, [100, 700, 1200, 333])[1:]
    T = 8
    seqs = sorted(tuple(s) for s in all_sequences(shards, T))
    n = len(seqs)

    def epochs(seed, count=2):
        loader = DataLoaderLite(1, T, 0, 1, "train", str(tmp_path), shuffle=True, seed=seed)
        rows = []
        for _ in range(count * n):
            x, y = loader.next_batch()
            rows.append(tuple(x[0].tolist()) + (y[0, -1].item(),))
        return [rows[e * n : (e + 1) * n] for e in range(count)]

    first, second = epochs(1)
    assert sorted(first) == seqs and sorted(second) == seqs  # each epoch sees every window once
    sequential = [tuple(s) for s in all_sequences(shards, T)]
    assert first != sequential and second != first
    assert epochs(1) == [first, second]
    assert epochs(2)[0] != first


def test_state_dict_resumes_at_the_next_token(tmp_path):
    make_shards(tmp_path, [100, 900, 650])
    loader = DataLoaderLite(3, 16, 1, 2, "train", str(tmp_path), shuffle=True, seed=5)
    for _ in range(17):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(25)]
    resumed = DataLoaderLite(3, 16, 1, 2, "train", str(tmp_path), shuffle=True, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), want))
    other_t = DataLoaderLite(3, 8, 1, 2, "train", str(tmp_path), shuffle=True, seed=5)
    with pytest.raises(SystemExit, match="T=16"):
        other_t.load_state_dict(state)


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "s_train_000001.npy")
    datafiles.write_shard(path, np.arange(10, dtype=np.uint16))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        datafiles.write_shard(path, np.arange(20, dtype=np.uint16))
    assert np.load(path).tolist() == list(range(10))  # the complete old shard is still there
    assert datafiles.list_shards(str(tmp_path), "train") == [path]


# ----------------------------------------------------------------------------- embedded corpus


def test_bundled_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(datafiles.CORPUS_DIR, corpus)
    out = tmp_path / "shards"
    datafiles.prepare_bundled_corpus(str(out), str(corpus))
    enc = datafiles.get_tokenizer()
    val = np.load(out / "corpus_val_000000.npy")
    train = np.load(out / "corpus_train_000001.npy")
    # each text is one <|endoftext|>-led document in train and one in val (its last tenth)
    val_docs = enc.decode(val.tolist()).split("<|endoftext|>")[1:]
    train_docs = enc.decode(train.tolist()).split("<|endoftext|>")[1:]
    texts = [open(corpus / n, encoding="utf-8").read() for n in sorted(os.listdir(corpus))]
    assert len(val_docs) == len(train_docs) == len(texts) == 4
    for text, head, tail in zip(texts, train_docs, val_docs):
        assert head + tail == text
        assert 0.09 < len(tail) / len(text) < 0.11
    # a second call reuses the shards; a changed text rebuilds them
    mtime = os.path.getmtime(out / "corpus_train_000001.npy")
    datafiles.prepare_bundled_corpus(str(out), str(corpus))
    assert os.path.getmtime(out / "corpus_train_000001.npy") == mtime
    with open(corpus / "alice29.txt", "a") as f:
        f.write("\nThe End.\n")
    datafiles.prepare_bundled_corpus(str(out), str(corpus))
    assert enc.decode(np.load(out / "corpus_val_000000.npy").tolist()).count("The End.") == 1


def test_the_split_is_a_whole_field_of_the_name(tmp_path):
    # "retrieval" contains "val": such a name must not make a train shard a val shard
    names = ["retrieval_val_000000.npy", "retrieval_train_000001.npy", "fineweb_train_000002.bin"]
    names += ["tiny_shakespeare_val.bin", "interval_train_000003.npy", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    val = [os.path.basename(p) for p in datafiles.list_shards(str(tmp_path), "val")]
    train = [os.path.basename(p) for p in datafiles.list_shards(str(tmp_path), "train")]
    assert val == ["retrieval_val_000000.npy", "tiny_shakespeare_val.bin"]
    assert train == [
        "fineweb_train_000002.bin",
        "interval_train_000003.npy",
        "retrieval_train_000001.npy",
    ]


def test_token_ids_are_checked_up_front_each_rank_a_share(tmp_path):
    make_shards(tmp_path, [100, 2000, 2000, 2000])
    bad = np.load(tmp_path / "test_train_000002.npy")
    bad[-1] = 50300
    np.save(tmp_path / "test_train_000002.npy", bad)
    # train shards 1, 2, 3 are the loader's 0, 1, 2: rank 1 of 2 scans the middle one
    DataLoaderLite(2, 8, 0, 2, "train", str(tmp_path))
    with pytest.raises(SystemExit, match="test_train_000002.npy: token id 50300 is outside"):
        DataLoaderLite(2, 8, 1, 2, "train", str(tmp_path))
    # fineweb.py's manifest records every shard's largest id, size and modification time: a
    # shard it vouches for, unchanged since, is not read
    names = sorted(os.listdir(tmp_path))
    shards = [
        {"name": n, "bytes": s.st_size, "mtime_ns": s.st_mtime_ns, "max_token": 100}
        for n, s in ((n, os.stat(tmp_path / n)) for n in names)
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards}))
    DataLoaderLite(2, 8, 1, 2, "train", str(tmp_path))
    assert shards[2]["name"] == "test_train_000003.npy"  # sorted: train shards, then val
    shards[2]["max_token"] = 50257
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards}))
    with pytest.raises(SystemExit, match="token id 50257 is outside"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path))
    # a shard edited after the manifest was written (same size, a later time) is read again
    shards[2]["max_token"] = 100
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards}))
    edited = np.load(tmp_path / "test_train_000003.npy")
    edited[5] = 60000
    np.save(tmp_path / "test_train_000003.npy", edited)
    later = shards[2]["mtime_ns"] + 3600 * 10**9  # an edit an hour on, as a user would make it
    os.utime(tmp_path / "test_train_000003.npy", ns=(later, later))
    assert os.path.getsize(tmp_path / "test_train_000003.npy") == shards[2]["bytes"]
    with pytest.raises(SystemExit, match="test_train_000003.npy: token id 60000 is outside"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path))


def test_the_loader_state_names_its_data(tmp_path):
    make_shards(tmp_path / "a", [100, 2000, 2000])
    make_shards(tmp_path / "b", [100, 2000, 2000], seed=1)  # the same names and sizes
    a = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "a"))
    b = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "b"))
    a.next_batch()
    assert a.state_dict()["data"] != b.state_dict()["data"]
    with pytest.raises(SystemExit, match="the shards differ from those the checkpoint"):
        b.load_state_dict(a.state_dict())
    again = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "a"))
    again.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(again.next_batch(), a.next_batch()))


# ----------------------------------------------------------------------------- HellaSwag's files


class StreamedResponse:
    """requests.get's streamed response, from chunks of bytes; `broken` after the first chunk."""

    def __init__(self, chunks, broken):
        self.chunks, self.broken = chunks, broken
        self.headers = {"content-length": str(sum(len(c) for c in chunks))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        import requests

        for i, chunk in enumerate(self.chunks):
            if self.broken and i == 1:
                raise requests.ConnectionError("the connection dropped")
            yield chunk


def test_a_hellaswag_download_appears_only_once_complete(tmp_path, monkeypatch):
    import requests

    lines = open(os.path.join(ROOT, "tests", "data", "hellaswag_val_head64.jsonl"), "rb").read()
    chunks = [lines[:1000], lines[1000:5000], lines[5000:]]
    cache = tmp_path / "cache"
    monkeypatch.setattr(requests, "get", lambda *a, **k: StreamedResponse(chunks, broken=True))
    with pytest.raises(SystemExit, match="could not download .* \\(ConnectionError\\); offline"):
        datafiles.download_hellaswag("val", str(cache))
    assert os.listdir(cache) == []  # neither a part of the file nor a temporary of it
    monkeypatch.setattr(requests, "get", lambda *a, **k: StreamedResponse(chunks, broken=False))
    path = datafiles.download_hellaswag("val", str(cache))
    assert open(path, "rb").read() == lines and os.listdir(cache) == ["hellaswag_val.jsonl"]
    examples = list(datafiles.iterate_examples("val", path))
    assert len(examples) == 64 and examples[0]["label"] in range(4)
