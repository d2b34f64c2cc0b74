"""fineweb.py: local inputs into token shards, checked against the tokenizer applied directly."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from conftest import HELLASWAG_SLICE, ROOT, fails_in_one_line, run_in_process
from support.datafiles import EOT, get_tokenizer
from train_gpt2 import DataLoaderLite

SCRIPT = os.path.join(ROOT, "fineweb.py")
SHARD = re.compile(r"^edufineweb_(val|train)_(\d{6})\.(npy|bin)$")


def corpus_docs(n=60):
    """Paragraphs of a bundled book, and edge cases: non-ASCII text, an empty document, \\r\\n
    line ends, and the special token's text (encode_ordinary reads it as plain text)."""
    with open(os.path.join(ROOT, "data", "corpus", "lcet10.txt"), encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    docs = paragraphs[100 : 100 + n]
    docs[3:3] = ["", "naïve café — 東京 🙂", "a <|endoftext|> inside", "two\r\nlines\r\n"]
    return docs


def tokens_of(doc):
    return [EOT] + get_tokenizer().encode_ordinary(doc)


def reference(docs):
    """Every document as <|endoftext|> and its tokens, back to back."""
    return np.array([t for doc in docs for t in tokens_of(doc)], dtype=np.uint16)


def read_shards(out):
    """{index: (split, tokens)} read with plain numpy: np.load, or the llm.c header by hand."""
    shards = {}
    for name in os.listdir(out):
        m = SHARD.match(name)
        if not m:
            continue
        path = os.path.join(out, name)
        if m.group(3) == "bin":
            header = np.fromfile(path, dtype=np.int32, count=256)
            assert list(header[:2]) == [20240520, 1]
            tokens = np.fromfile(path, dtype=np.uint16, offset=1024)
            assert header[2] == len(tokens)
        else:
            tokens = np.load(path)
        assert tokens.dtype == np.uint16
        shards[int(m.group(2))] = (m.group(1), tokens)
    assert sorted(shards) == list(range(len(shards)))
    return dict(sorted(shards.items()))


def concatenated(out):
    return np.concatenate([tokens for _, tokens in read_shards(out).values()])


def snapshot(out):
    """Each file's bytes, inode and mtime: a file rewritten with the same bytes still shows."""
    result = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        st = os.stat(path)
        with open(path, "rb") as f:
            result[name] = (f.read(), st.st_ino, st.st_mtime_ns)
    return result


def contents(out):
    """Each file's bytes; of the manifest, all but the shards' modification times (the one thing
    a resumed run records differently: it wrote the files at other times)."""
    result = {name: data for name, (data, _, _) in snapshot(out).items()}
    manifest = json.loads(result.pop("manifest.json"))
    for record in manifest["shards"]:
        assert record.pop("mtime_ns") == os.stat(os.path.join(out, record["name"])).st_mtime_ns
    return dict(result, manifest=manifest)


def write_inputs(directory, docs, kind):
    """The documents as input files of one kind, in order."""
    os.makedirs(directory, exist_ok=True)
    half = len(docs) // 2
    paths = []
    if kind == "txt":  # one document per file
        for i, doc in enumerate(docs):
            paths.append(os.path.join(directory, f"doc{i:03d}.txt"))
            with open(paths[-1], "wb") as f:
                f.write(doc.encode("utf-8"))
    elif kind == "jsonl":
        for i, part in enumerate((docs[:half], docs[half:])):
            paths.append(os.path.join(directory, f"part{i}.jsonl"))
            with open(paths[-1], "w") as f:
                for j, doc in enumerate(part):
                    f.write(json.dumps({"id": j, "text": doc}) + "\n")
                    if j == 2:
                        f.write("\n")  # blank lines are no documents
    else:
        for i, part in enumerate((docs[:half], docs[half:])):
            paths.append(os.path.join(directory, f"part{i}.parquet"))
            table = pa.table({"text": part, "id": list(range(len(part)))})
            pq.write_table(table, paths[-1], row_group_size=4)
    return paths


def argv(inputs, out, **flags):
    """fineweb.py's command line: --input inputs --output_dir out --flag value..."""
    args = (["--input", *inputs] if inputs else []) + ["--output_dir", out]
    for flag, value in flags.items():
        args += [f"--{flag}", value]
    return [str(a) for a in args]


def run(inputs, out, **flags):
    fineweb.main(argv(inputs, out, **flags))


DECONTAMINATE = dict(decontaminate="hellaswag", hellaswag_path=HELLASWAG_SLICE)


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("kind,num_proc", [("jsonl", 1), ("parquet", 2), ("txt", 1)])
def test_local_inputs_give_the_documents_tokens(tmp_path, kind, num_proc):
    docs = corpus_docs()
    out = tmp_path / "out"
    run(write_inputs(tmp_path / "in", docs, kind), out, shard_size=700, num_proc=num_proc)
    shards = read_shards(out)
    expected = reference(docs)
    assert np.array_equal(concatenated(out), expected)
    assert [split for split, _ in shards.values()] == ["val"] + ["train"] * (len(shards) - 1)
    sizes = [len(tokens) for _, tokens in shards.values()]
    assert sizes[:-1] == [700] * (len(sizes) - 1) and 0 < sizes[-1] <= 700
    assert len(shards) == -(-len(expected) // 700)


def test_bin_shards_read_back_like_npy(tmp_path):
    docs = corpus_docs()
    inputs = write_inputs(tmp_path / "in", docs, "jsonl")
    for fmt in ("npy", "bin"):
        run(inputs, tmp_path / fmt, shard_size=500, format=fmt, num_proc=1)
    assert all(n.endswith(".bin") for n in os.listdir(tmp_path / "bin") if SHARD.match(n))
    expected = reference(docs)
    assert np.array_equal(concatenated(tmp_path / "bin"), expected)
    B, T = 2, 64
    for split, stream in (("val", expected[:500]), ("train", expected[500:])):
        npy = DataLoaderLite(B, T, 0, 1, split, str(tmp_path / "npy"))
        bin_ = DataLoaderLite(B, T, 0, 1, split, str(tmp_path / "bin"))
        x, y = bin_.next_batch()
        # the first sequences of T + 1 tokens of the split's first shard, overlapping by one
        assert np.array_equal(x.numpy(), np.stack([stream[i * T : (i + 1) * T] for i in (0, 1)]))
        assert np.array_equal(
            y.numpy(), np.stack([stream[i * T + 1 : (i + 1) * T + 1] for i in (0, 1)])
        )
        npy.next_batch()
        for _ in range(10):  # across shard boundaries
            for a, b in zip(npy.next_batch(), bin_.next_batch()):
                assert a.equal(b)


def test_rerun_keeps_complete_shards_and_rebuilds_missing_ones(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "parquet")
    out = tmp_path / "out"
    run(inputs, out, shard_size=2000, num_proc=1)
    first, first_contents = snapshot(out), contents(out)
    assert len([n for n in first if SHARD.match(n)]) >= 4
    run(inputs, out, shard_size=2000, num_proc=1)
    assert "already holds all" in capsys.readouterr().out
    assert snapshot(out) == first  # same bytes, no file written again

    os.remove(out / "edufineweb_train_000002.npy")
    run(inputs, out, shard_size=2000, num_proc=1)
    again = snapshot(out)
    assert contents(out) == first_contents
    for name in ("edufineweb_val_000000.npy", "edufineweb_train_000001.npy"):
        assert again[name] == first[name]


def planted_docs():
    """Clean paragraphs with HellaSwag 13-grams planted in some documents (changed case and
    punctuation, or across the context-ending join) and a 12-gram that must not count.

    Returns (docs, indices of the planted documents, index of the one to straddle val/train).
    """
    with open(HELLASWAG_SLICE) as f:
        examples = [json.loads(line) for line in f]

    def words(example, ending=0):
        # GPT-3's grams, by hand: whitespace-separated, punctuation-only pieces vanish
        text = example["ctx"] + " " + example["endings"][ending]
        return [w for w in text.split() if any(c.isalnum() for c in w)]

    long = [ex for ex in examples if len(words(ex)) >= 26 and len(words(ex, 1)) >= 26]
    a, b, c, d = long[:4]
    ctx_words = len([w for w in a["ctx"].split() if any(ch.isalnum() for ch in w)])
    planted = {
        "upper": "Quote: " + " ".join(words(a)[:13]).upper() + " (end of quote)",
        "punctuation": "Notes - " + ", ".join(words(b, 1)[5:18]) + "!? That was all.",
        "join": "See " + " ".join(words(a)[ctx_words - 6 : ctx_words + 7]) + " and more.",
        "in_val": " ".join(words(c)[:13]) + " and that is all.",
    }
    near_miss = " ".join(words(d)[:12]) + " zebra " + " ".join(words(d)[13:25])
    clean = corpus_docs(40)
    docs = clean[:4] + [planted["in_val"]] + clean[4:10] + [planted["upper"]] + clean[10:20]
    docs += [planted["punctuation"], near_miss] + clean[20:30] + [planted["join"]] + clean[30:]
    indices = [docs.index(planted[k]) for k in ("in_val", "upper", "punctuation", "join")]
    return docs, indices, docs.index(planted["upper"])


def decontaminated_reference(docs, planted, shard_size):
    """The val shard is the plain stream's first shard; train has no token of a planted doc."""
    owner = np.array([i for i, doc in enumerate(docs) for _ in tokens_of(doc)])
    stream = reference(docs)
    keep = ~np.isin(owner, planted)
    keep[:shard_size] = True
    dropped = set(owner[shard_size:][~keep[shard_size:]].tolist())
    return stream[keep], len(dropped), int((~keep).sum())


def straddling_shard_size(docs, straddle):
    """A shard size that ends the val shard in the middle of docs[straddle]."""
    start = sum(len(tokens_of(doc)) for doc in docs[:straddle])
    return start + len(tokens_of(docs[straddle])) // 2


def test_decontamination_drops_exactly_the_planted_documents(tmp_path, capsys):
    docs, planted, straddle = planted_docs()
    size = straddling_shard_size(docs, straddle)
    inputs = write_inputs(tmp_path / "in", docs, "jsonl")
    run(inputs, tmp_path / "out", shard_size=size, num_proc=1, **DECONTAMINATE)
    expected, documents, tokens = decontaminated_reference(docs, planted, size)
    assert documents == 3  # the one in the val shard stays
    assert np.array_equal(concatenated(tmp_path / "out"), expected)
    assert np.array_equal(read_shards(tmp_path / "out")[0][1], reference(docs)[:size])
    assert (
        f"dropped {documents:,} training documents ({tokens:,} tokens)" in capsys.readouterr().out
    )


# ----------------------------------------------------------------------------- resume


@contextlib.contextmanager
def crash_writing(monkeypatch, index):
    """Writing shard `index` fails as if the machine went down."""
    real_write = fineweb.write_shard

    def crashing(path, tokens):
        if path.endswith(f"_{index:06d}.npy"):
            raise RuntimeError("the machine went down")
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", crashing)
    yield
    monkeypatch.setattr(fineweb, "write_shard", real_write)


@pytest.mark.parametrize("crash_at", [1, 3])
def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch, capsys, crash_at):
    """A crash while writing shard crash_at (1: right after the val shard, in the middle of a
    contaminated document), then a rerun: the files of an uninterrupted run, and the same count
    of dropped documents."""
    docs, planted, straddle = planted_docs()
    size = straddling_shard_size(docs, straddle)
    inputs = write_inputs(tmp_path / "in", docs, "parquet")

    run(inputs, tmp_path / "whole", shard_size=size, num_proc=1, **DECONTAMINATE)
    whole = capsys.readouterr().out.splitlines()

    with crash_writing(monkeypatch, crash_at), pytest.raises(RuntimeError):
        run(inputs, tmp_path / "resumed", shard_size=size, num_proc=1, **DECONTAMINATE)
    before = snapshot(tmp_path / "resumed")
    run(inputs, tmp_path / "resumed", shard_size=size, num_proc=1, **DECONTAMINATE)
    resumed = capsys.readouterr().out.splitlines()

    after = snapshot(tmp_path / "resumed")
    assert contents(tmp_path / "resumed") == contents(tmp_path / "whole")
    for name in before:
        if SHARD.match(name):  # written before the crash, kept as they were
            assert after[name] == before[name]
    assert [line for line in resumed if "dropped" in line] == [
        line for line in whole if "dropped" in line
    ]


def test_killed_run_resumes_to_the_same_shards(tmp_path):
    """SIGKILL in the middle of writing shard 3, half a temporary file left behind."""
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    run(inputs, tmp_path / "whole", shard_size=900, num_proc=2)
    code = f"""
import os, signal, fineweb
def dying(path, tokens):
    if path.endswith("000003.npy"):
        name = f".{{os.path.basename(path)}}.{{os.getpid()}}.tmp"  # as files.atomic_open names it
        tmp = os.path.join(os.path.dirname(path), name)
        with open(tmp, "wb") as f:
            f.write(tokens[: len(tokens) // 2].tobytes())
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, tokens)
real, fineweb.write_shard = fineweb.write_shard, dying
fineweb.main({argv(inputs, tmp_path / "killed", shard_size=900, num_proc=2)!r})
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    killed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr
    before = snapshot(tmp_path / "killed")
    assert [n for n in before if n.startswith(".edufineweb_train_000003.npy.")] != []
    assert "edufineweb_train_000003.npy" not in before
    run(inputs, tmp_path / "killed", shard_size=900, num_proc=2)
    after = snapshot(tmp_path / "killed")
    assert after.keys() == snapshot(tmp_path / "whole").keys()  # the temporary file is gone
    assert all(
        after[f"edufineweb_{name}.npy"] == before[f"edufineweb_{name}.npy"]
        for name in ("val_000000", "train_000001", "train_000002")
    )
    assert np.array_equal(concatenated(tmp_path / "killed"), reference(corpus_docs()))


def test_spawned_workers_give_the_same_shards(tmp_path):
    """The pool under 'spawn' (macOS, Windows): workers import fineweb afresh, with another
    str hash seed for their 13-gram index."""
    docs, planted, straddle = planted_docs()
    size = straddling_shard_size(docs, straddle)
    inputs = write_inputs(tmp_path / "in", docs, "jsonl")
    args = argv(inputs, tmp_path / "out", shard_size=size, num_proc=2, **DECONTAMINATE)
    code = (
        "import multiprocessing as mp, fineweb\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('spawn')\n"
        f"    fineweb.main({args!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected, documents, _ = decontaminated_reference(docs, planted, size)
    assert np.array_equal(concatenated(tmp_path / "out"), expected)
    assert f"dropped {documents} training documents" in done.stdout


def test_documents_are_read_as_the_shards_fill(tmp_path, monkeypatch):
    """Memory stays flat: nothing reads the whole input before the first shard is written."""
    docs = corpus_docs()
    inputs = write_inputs(tmp_path / "in", docs, "parquet")
    read = []
    real_iter, real_write = fineweb.iter_documents, fineweb.write_shard

    def counting(paths, start):
        for text in real_iter(paths, start):
            read.append(text)
            yield text

    def recording(path, tokens):
        if "val" in path:
            recording.read_at_val = len(read)
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "iter_documents", counting)
    monkeypatch.setattr(fineweb, "write_shard", recording)
    run(inputs, tmp_path / "out", shard_size=300, num_proc=1)
    needed = np.searchsorted(np.cumsum([len(tokens_of(d)) for d in docs]), 300) + 1
    assert recording.read_at_val == needed and len(read) == len(docs)


# ----------------------------------------------------------------------------- downloads


def remote_fake(monkeypatch, failures):
    """datasets.load_dataset answering with the given exceptions first, then a small dataset."""
    import datasets

    calls, sleeps = [], []
    docs = corpus_docs(20)

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return datasets.Dataset.from_dict({"text": docs, "id": [str(i) for i in range(len(docs))]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(fineweb.time, "sleep", sleeps.append)
    return docs, calls, sleeps


class RateLimited(Exception):
    """The shape of an HTTP error from the hub client: a response with a status code."""

    def __init__(self, url):
        super().__init__(f"429 Client Error: Too Many Requests for url: {url}")
        self.response = SimpleNamespace(status_code=429, headers={"Retry-After": "7"})


def test_download_retries_rate_limits_and_dropped_connections(tmp_path, monkeypatch):
    url = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/x.parquet"
    failures = [RateLimited(url), ConnectionResetError("Connection reset by peer")]
    docs, calls, sleeps = remote_fake(monkeypatch, failures)
    run(None, tmp_path / "out", shard_size=1000, num_proc=1)
    assert calls == [("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train"})] * 3
    assert sleeps == [7, 4]  # the server's Retry-After, then exponential backoff
    assert np.array_equal(concatenated(tmp_path / "out"), reference(docs))


def test_download_resumes_after_a_crash(tmp_path, monkeypatch):
    docs, _, _ = remote_fake(monkeypatch, [])
    with crash_writing(monkeypatch, 2), pytest.raises(RuntimeError):
        run(None, tmp_path / "out", shard_size=1000, num_proc=1)
    run(None, tmp_path / "out", shard_size=1000, num_proc=1)
    assert np.array_equal(concatenated(tmp_path / "out"), reference(docs))


def test_failed_download_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    url = "https://huggingface.co/datasets/HuggingFaceFW/fineweb/resolve/main/000_00000.parquet"
    failures = [RateLimited(url)] * fineweb.DOWNLOAD_ATTEMPTS
    _, calls, _ = remote_fake(monkeypatch, failures)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run(None, out, dataset="HuggingFaceFW/fineweb", remote_name="sample-100BT")
    message = str(e.value)
    assert url in message and "--input" in message and "\n" not in message
    assert calls[0] == ("HuggingFaceFW/fineweb", {"name": "sample-100BT", "split": "train"})
    assert not out.exists()


def test_permanent_download_error_is_not_retried(tmp_path, monkeypatch):
    failures = [ValueError("BuilderConfig 'sample-1BT' not found. Available: ['default']")]
    _, calls, sleeps = remote_fake(monkeypatch, failures)
    with pytest.raises(SystemExit, match="could not load .*sample-1BT' not found"):
        run(None, tmp_path / "out", remote_name="sample-1BT")
    assert len(calls) == 1 and sleeps == []


# ----------------------------------------------------------------------------- bad input


def fails(args, cwd, expected):
    fails_in_one_line("fineweb.py", args, cwd, expected)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An input file and the output directory of a finished run on it."""
    root = tmp_path_factory.mktemp("made")
    inputs = write_inputs(root / "in", corpus_docs(), "jsonl")
    run(inputs, root / "out", shard_size=3000, num_proc=1)
    return root, inputs


def test_bad_input_files(tmp_path):
    with open(tmp_path / "untitled.jsonl", "w") as f:
        f.write(json.dumps({"content": "no text here"}) + "\n")
    pq.write_table(pa.table({"body": ["no text here"]}), tmp_path / "untitled.parquet")
    out = tmp_path / "out"
    for path, expected in (
        (tmp_path / "missing.parquet", "missing.parquet does not exist"),
        (tmp_path / "untitled.jsonl", "has no 'text' field (it has: content)"),
        (tmp_path / "untitled.parquet", "has no 'text' column (columns: body)"),
    ):
        fails(argv([path], out), tmp_path, expected)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags,expected",
    [
        (dict(shard_size=2999), "holds shards of --shard_size 3000, not 2999"),
        (dict(shard_size=3000, format="bin"), "holds shards of --format npy, not bin"),
        (dict(shard_size=3000, **DECONTAMINATE), "not decontaminated against hellaswag val"),
    ],
)
def test_output_dir_of_other_settings_is_refused(made, flags, expected):
    root, inputs = made
    before = snapshot(root / "out")
    fails(argv(inputs, root / "out", **flags), root, expected)
    assert snapshot(root / "out") == before


def test_shards_without_manifest_are_refused(made, tmp_path):
    root, inputs = made
    for name in os.listdir(root / "out"):
        if SHARD.match(name):  # another script's shards, in two formats
            os.link(root / "out" / name, tmp_path / name)
            os.link(root / "out" / name, tmp_path / name.replace(".npy", ".bin"))
    before = snapshot(tmp_path)
    fails(
        argv(inputs, tmp_path, shard_size=3000), tmp_path, ".bin and .npy shards, not --format npy"
    )
    for name in os.listdir(tmp_path):
        if name.endswith(".bin"):
            os.remove(tmp_path / name)
    fails(
        argv(inputs, tmp_path, shard_size=2000), tmp_path, "shards of --shard_size 3000, not 2000"
    )
    fails(argv(inputs, tmp_path, shard_size=3000), tmp_path, "but no manifest.json")
    assert {n: v[0] for n, v in snapshot(tmp_path).items()} == {
        n: v[0] for n, v in before.items() if n.endswith(".npy")
    }


def test_bad_flags(tmp_path):
    out = tmp_path / "out"
    fails(argv(None, out, shard_size=0), tmp_path, "--shard_size 0: must be positive")
    fails(argv(None, out, num_proc=0), tmp_path, "--num_proc 0: must be positive")
    fails(
        argv(None, out, hellaswag_path=HELLASWAG_SLICE), tmp_path, "for --decontaminate hellaswag"
    )
    assert not out.exists()


def test_output_that_cannot_be_written(tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    (tmp_path / "a_file").write_text("mine")
    fails(argv(inputs, tmp_path / "a_file"), tmp_path, "is a file, not a directory")
    assert (tmp_path / "a_file").read_text() == "mine"
    # the disk fills up while the third shard is written: two complete shards stay, and the same
    # command later continues from them to the shards of an uninterrupted run
    run(inputs, tmp_path / "whole", shard_size=3000, num_proc=1)
    write_shard = fineweb.write_shard
    written = []

    def fills_up(path, tokens):
        if len(written) == 2:
            raise OSError(28, "No space left on device", path)
        written.append(path)
        write_shard(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", fills_up)
    with pytest.raises(SystemExit, match=r"edufineweb_train_000002.npy: No space left on device; "):
        run(inputs, tmp_path / "full", shard_size=3000, num_proc=1)
    assert len(read_shards(tmp_path / "full")) == 2
    monkeypatch.setattr(fineweb, "write_shard", write_shard)
    run(inputs, tmp_path / "full", shard_size=3000, num_proc=1)
    assert contents(tmp_path / "full") == contents(tmp_path / "whole")


def test_the_manifest_records_each_shards_largest_token(tmp_path):
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    run(inputs, tmp_path / "out", shard_size=3000, num_proc=1)
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    for record in manifest["shards"]:
        tokens = np.load(tmp_path / "out" / record["name"])
        assert record["max_token"] == int(tokens.max())


def test_ctrl_c_stops_the_pool_in_one_line(tmp_path):
    # Ctrl-C reaches every process of the terminal's group, the workers too: only the parent
    # says so, once, and exits with 130. The documents are books of 30MB, so that the workers
    # are still tokenizing when it comes, right after the pool starts
    text = open(os.path.join(ROOT, "data", "corpus", "lcet10.txt"), encoding="utf-8").read()
    for i in range(4):
        (tmp_path / f"book{i}.txt").write_text(text * 70)
    inputs = [tmp_path / f"book{i}.txt" for i in range(4)]
    args = argv(inputs, tmp_path / "out", shard_size=10**6, num_proc=2)
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        start_new_session=True,  # its own process group, as a terminal gives
        # as from a terminal's shell: a job started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    while "shard 0" not in seen:  # the bar: the pool is working
        char = proc.stderr.read(1)
        assert char, f"fineweb.py ended first: {seen}"
        seen += char
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "interrupted with 0 shards complete: run the same command again to continue"
    )


def test_a_run_that_wrote_no_shard_does_not_block_its_directory(tmp_path):
    # the input fails before the first shard is complete: the manifest it leaves records no
    # shards, and another input may then use the directory
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"content": "no text"}\n')
    code, _, err = run_in_process("fineweb.py", argv([bad], tmp_path / "out"), tmp_path)
    assert code.endswith("line 2 has no 'text' field (it has: content)") and "Traceback" not in err
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    run(inputs, tmp_path / "out", shard_size=3000, num_proc=1)
    assert np.array_equal(concatenated(tmp_path / "out"), reference(corpus_docs()))


def test_a_directory_given_as_the_hellaswag_file(tmp_path):
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    args = argv(inputs, tmp_path / "out", decontaminate="hellaswag", hellaswag_path=tmp_path)
    fails(args, tmp_path, f"HellaSwag file {tmp_path} is a directory, not a file")


def test_a_shard_edited_after_it_was_written_is_read_again(tmp_path):
    # train_gpt2.py trusts the manifest's largest token id only for a shard still as fineweb.py
    # wrote it: one edited later, to the same size, is scanned, and its bad id refused at start
    inputs = write_inputs(tmp_path / "in", corpus_docs(), "jsonl")
    run(inputs, tmp_path / "out", shard_size=3000, num_proc=1)
    path = tmp_path / "out" / "edufineweb_train_000002.npy"
    DataLoaderLite(2, 32, 0, 1, "train", str(tmp_path / "out"))
    written = os.stat(path)
    tokens = np.load(path)
    tokens[7] = 60000
    np.save(path, tokens)
    later = written.st_mtime_ns + 3600 * 10**9  # edited an hour on, as a user would
    os.utime(path, ns=(later, later))
    assert os.path.getsize(path) == written.st_size
    with pytest.raises(SystemExit, match="edufineweb_train_000002.npy: token id 60000 is outside"):
        DataLoaderLite(2, 32, 0, 1, "train", str(tmp_path / "out"))
