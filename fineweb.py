"""
FineWeb-Edu into token shards for train_gpt2.py: every document becomes <|endoftext|> followed by
its GPT-2 tokens, packed back to back into uint16 shards of exactly --shard_size tokens (the last
one shorter). Shard 0 is the validation split, the rest training: edufineweb_val_000000.npy,
edufineweb_train_000001.npy, ...

    python fineweb.py                                        # FineWeb-Edu sample-10BT (~20GB out)
    python fineweb.py --remote_name sample-100BT --output_dir edu_fineweb100B
    python fineweb.py --dataset HuggingFaceFW/fineweb --output_dir fineweb10B   # plain FineWeb
    python fineweb.py --input sample/10BT/*.parquet          # offline: local parquet/jsonl/txt
    python fineweb.py --format bin                           # llm.c .bin shards
    python fineweb.py --decontaminate hellaswag              # GPT-3 paper, appendix C

A rerun continues where an earlier one stopped: manifest.json in the output directory records,
after every shard, where the next one starts in the document stream, so completed shards are
kept as they are and the others come out byte for byte as in an uninterrupted run.
"""

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from support import files
from support.cli import (
    check_input_file,
    check_output_dir,
    error_chain,
    first_line,
    parse_settings,
    quiet_exit_when_stdout_closes,
    setting,
)
from support.datafiles import (
    EOT,
    download_hellaswag,
    get_tokenizer,
    iterate_examples,
    open_shard,
    write_shard,
)

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_REMOTE_NAME = "sample-10BT"
DEFAULT_OUTPUT_DIR = "edu_fineweb10B"  # train_gpt2.py's default --data_dir
SHARD_PREFIX = "edufineweb"
MANIFEST = "manifest.json"
# Chunks of 16 documents (about 16k tokens of FineWeb) amortize the inter-process traffic and
# still keep every worker busy.
CHUNKSIZE = 16

# -----------------------------------------------------------------------------
# Reading documents: local files or the Hugging Face hub

INPUT_KINDS = (".parquet", ".jsonl", ".txt")


class InputError(Exception):
    """A bad record found while streaming. Not SystemExit: a pool's task feeder passes only
    Exceptions on to the consumer, in document order."""


def check_input(path):
    """Fail early, before anything is written, on an input that cannot be read."""
    check_input_file(path, "input file")
    if not path.endswith(INPUT_KINDS):
        raise SystemExit(f"input file {path}: expected a .parquet, .jsonl or .txt file")
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise SystemExit(f"input file {path} is not a readable parquet file ({e})") from None
        if "text" not in schema.names:
            raise SystemExit(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
        kind = schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise SystemExit(f"{path}: the 'text' column holds {kind}, not strings")
    elif path.endswith(".jsonl"):
        try:
            next(read_documents(path), None)  # the first record has a text field
        except InputError as e:
            raise SystemExit(str(e)) from None


def count_documents(path):
    if path.endswith(".txt"):
        return 1
    if path.endswith(".jsonl"):
        return sum(1 for _ in jsonl_lines(path))
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def read_documents(path, skip=0):
    """The texts of one input file from its skip-th document on, streamed: a .txt file is one
    document, a .jsonl file one per non-blank line, a .parquet file one per row."""
    try:
        if path.endswith(".txt"):
            if skip == 0:
                with open(path, encoding="utf-8", newline="") as f:  # the text as it is: \r too
                    yield f.read()
        elif path.endswith(".jsonl"):
            for i, (lineno, line) in enumerate(jsonl_lines(path)):
                if i >= skip:
                    yield jsonl_text(path, lineno, line)
        else:
            yield from read_parquet(path, skip)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path} could not be read ({e.strerror or e})") from None


def jsonl_lines(path):
    """(line number, line) of the non-blank lines; only \n ends a line, as in JSON Lines."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def jsonl_text(path, lineno, line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "text" not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{path} line {lineno} has no 'text' field (it has: {keys})")
    if not isinstance(record["text"], str):
        raise InputError(f"{path} line {lineno}: 'text' is not a string")
    return record["text"]


def read_parquet(path, skip):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0  # of the file, where the next batch starts
        row_groups = []  # whole row groups before the skip-th row are never read
        for i in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(i).num_rows
            if skip >= rows and not row_groups:
                skip -= rows
                row += rows
            else:
                row_groups.append(i)
        for batch in parquet.iter_batches(batch_size=1024, row_groups=row_groups, columns=["text"]):
            texts = batch.column(0).to_pylist()
            if None in texts:
                raise InputError(f"{path} row {row + texts.index(None)} has no text (null)")
            yield from texts[skip:]
            skip = max(0, skip - len(texts))
            row += len(texts)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} could not be read ({e})") from None


def iter_documents(paths, start):
    """The texts of all input files in order, from the start-th document on."""
    for path in paths:
        if start:
            n = count_documents(path)
            if start >= n:
                start -= n
                continue
        yield from read_documents(path, start)
        start = 0


# The hub's rate limits (HTTP 429), server errors and dropped connections pass; other errors
# (no such dataset or config, no access) do not. Classes are matched by name so that the
# exceptions of requests, httpx or aiohttp count, whichever the installed hub client uses.
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
TRANSIENT_ERRORS = {
    "ConnectionError",
    "TransportError",
    "Timeout",
    "TimeoutError",
    "ChunkedEncodingError",
    "ProtocolError",
    "IncompleteRead",
    "ClientPayloadError",
    "ServerDisconnectedError",
}
DOWNLOAD_ATTEMPTS = 8
MAX_BACKOFF_S = 120


def is_transient(error):
    for e in error_chain(error):
        if type(e).__name__ == "OfflineModeIsEnabled":  # HF_HUB_OFFLINE=1: waiting won't help
            return False
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in TRANSIENT_STATUS or any(
            c.__name__ in TRANSIENT_ERRORS for c in type(e).__mro__
        ):
            return True
    return False


def backoff_seconds(error, attempt):
    """The server's Retry-After if it sent one, else exponential backoff."""
    for e in error_chain(error):
        retry_after = getattr(getattr(e, "response", None), "headers", {}).get("Retry-After")
        if retry_after and str(retry_after).isdigit():
            return min(int(retry_after), MAX_BACKOFF_S)
    return min(2**attempt, MAX_BACKOFF_S)


def failed_file(error):
    for e in error_chain(error):
        url = re.search(r"(https?|hf)://[^\s'\"]+", str(e))
        if url:
            return url.group(0)
    return "a file"


def load_remote(dataset, remote_name):
    """The hub dataset, downloaded (or found in the Hugging Face cache) and memory-mapped.

    Every retry resumes: load_dataset keeps the files that finished downloading in its cache.
    """
    import datasets

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            ds = datasets.load_dataset(dataset, name=remote_name, split="train")
            break
        except Exception as e:
            what = f"{dataset} ({remote_name})"
            if not is_transient(e):
                raise SystemExit(f"could not load {what}: {first_line(e)}") from None
            if attempt == DOWNLOAD_ATTEMPTS:
                raise SystemExit(
                    f"downloading {what} failed at {failed_file(e)} after {attempt} attempts "
                    f"({type(e).__name__}); run the same command again to continue (finished "
                    "files stay in the Hugging Face cache), or fetch the parquet files another "
                    "way and pass them with --input"
                ) from None
            delay = backoff_seconds(e, attempt)
            print(
                f"downloading {what}: {type(e).__name__} at {failed_file(e)}; "
                f"retry {attempt}/{DOWNLOAD_ATTEMPTS - 1} in {delay}s"
            )
            time.sleep(delay)
    if "text" not in ds.column_names:
        raise SystemExit(f"{dataset} ({remote_name}) has no 'text' column")
    return ds.select_columns(["text"])


def iter_remote(ds, start):
    for batch in ds.skip(start).iter(batch_size=1024):
        yield from batch["text"]


# -----------------------------------------------------------------------------
# Tokenizing and decontamination

NGRAM = 13  # GPT-3 paper, appendix C
ROLLING_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so every word's hash counts


@functools.cache
def punctuation_table():
    """str.translate table deleting Unicode punctuation and symbols (categories P*, S*): a few
    times faster than a regular expression, and tokenizing is the budget it eats into."""
    return dict.fromkeys(
        c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] in "PS"
    )


def words_of(text):
    """GPT-3's grams: lowercase, whitespace-delimited words, punctuation (and symbols) removed."""
    return text.lower().translate(punctuation_table()).split()


def ngram_hashes(words):
    """A 64-bit hash of every run of NGRAM consecutive words, computed for all runs at once.

    It builds on Python's str hash, which differs between processes: only hashes made in the
    same process are compared.
    """
    n = len(words) - NGRAM + 1
    if n <= 0:
        return np.empty(0, np.uint64)
    word_hashes = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    hashes = word_hashes[:n].copy()
    for k in range(1, NGRAM):
        hashes *= ROLLING_MULTIPLIER  # wraps modulo 2**64
        hashes += word_hashes[k : k + n]
    return hashes


class NgramIndex:
    """The 13-grams of an evaluation set, tested in three steps of rising cost: a bitmap of their
    hashes' top bits (most of a document's 13-grams fall in an empty bucket), the sorted hashes,
    and the normalized texts themselves, so that a hash collision never drops a document."""

    BUCKET_BITS = 24  # 16MB of buckets, ~10% of them full with HellaSwag val's ~1.5M 13-grams

    def __init__(self, texts):
        word_lists = [words_of(t) for t in texts]
        self.hashes = np.unique(
            np.concatenate([np.empty(0, np.uint64)] + [ngram_hashes(w) for w in word_lists])
        )
        self.buckets = np.zeros(1 << self.BUCKET_BITS, bool)
        self.buckets[self.bucket(self.hashes)] = True
        self.text = "\n".join(f" {' '.join(w)} " for w in word_lists)

    def bucket(self, hashes):
        return (hashes >> np.uint64(64 - self.BUCKET_BITS)).astype(np.intp)

    def __len__(self):
        return len(self.hashes)

    def overlaps(self, text):
        words = words_of(text)
        hashes = ngram_hashes(words)
        if not len(hashes) or not len(self.hashes):
            return False
        candidates = np.flatnonzero(self.buckets[self.bucket(hashes)])
        slots = np.searchsorted(self.hashes, hashes[candidates]).clip(max=len(self.hashes) - 1)
        return any(
            f" {' '.join(words[i : i + NGRAM])} " in self.text
            for i in candidates[self.hashes[slots] == hashes[candidates]]
        )


@functools.cache
def hellaswag_index(path):
    """The 13-grams of HellaSwag's contexts, each followed by each of its four endings; built
    once per process (the pool's workers included)."""
    try:
        texts = [
            ex["ctx"] + " " + ending
            for ex in iterate_examples(path=path)
            for ending in ex["endings"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(
            f"{path} is not a HellaSwag jsonl file ({type(e).__name__}: {e})"
        ) from None
    return NgramIndex(texts)


def tokenize(text, eval_path=None):
    """A document's tokens, <|endoftext|> first, as uint16; and whether it shares a 13-gram with
    the HellaSwag file at eval_path. Top-level, so that spawned pool workers can import it."""
    tokens = np.array([EOT] + get_tokenizer().encode_ordinary(text), dtype=np.uint32)
    assert tokens.max() < 2**16, "GPT-2 token ids fit in uint16"
    contaminated = eval_path is not None and hellaswag_index(eval_path).overlaps(text)
    return tokens.astype(np.uint16), contaminated


# -----------------------------------------------------------------------------
# Shards and the manifest

SHARD_FILE = re.compile(rf"^{SHARD_PREFIX}_(val|train)_(\d{{6}})\.(npy|bin)$")


def shard_name(index, fmt):
    return f"{SHARD_PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.{fmt}"


def write_manifest(out, manifest):
    files.write_json(os.path.join(out, MANIFEST), manifest, indent=1)  # atomic, like the shards


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(settings, key):
    """How the shards were made, as the end of "shards made ..."."""
    value = settings[key]
    if key == "source" and "input" in value:
        size = sum(s for _, s in value["input"])
        return (
            f"from --input {value['input'][0][0]} ... ({len(value['input'])} files, {size} bytes)"
        )
    if key == "source":
        return f"from {value['dataset']} ({value['remote_name']})"
    if value is None:
        return "without decontamination"
    return f"decontaminated against {value['eval_set']} (sha256 {value['sha256'][:12]})"


def completed_shards(out, settings):
    """The shards of out that an earlier run with these settings completed, in order, and whether
    that run finished. Refuses a directory that holds shards made with other settings."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        check_unknown_shards(out, settings)
        return [], False
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SystemExit(f"{path} is not valid JSON: delete {out} and start afresh") from None
    if not isinstance(manifest, dict) or not {*settings, "shards", "complete"} <= manifest.keys():
        raise SystemExit(f"{path} was not written by fineweb.py: choose another --output_dir")
    if not manifest["shards"]:  # a run that wrote no shard (a bad input): nothing to keep
        check_unknown_shards(out, settings)
        return [], False
    for key in ("shard_size", "format"):
        if manifest[key] != settings[key]:
            raise SystemExit(
                f"{out} holds shards of --{key} {manifest[key]}, not {settings[key]}: choose "
                "another --output_dir, or delete them to start afresh"
            )
    for key in ("source", "decontaminate"):
        if manifest[key] != settings[key]:
            raise SystemExit(
                f"{out} holds shards made {describe(manifest, key)}, not "
                f"{describe(settings, key)}: choose another --output_dir"
            )
    shards = []
    for record in manifest["shards"]:
        shard = os.path.join(out, record["name"])
        # shards are written atomically: a file of the recorded size is the one that was written
        if not (os.path.isfile(shard) and os.path.getsize(shard) == record["bytes"]):
            break
        shards.append(record)
    return shards, manifest["complete"] and len(shards) == len(manifest["shards"])


def check_unknown_shards(out, settings):
    """Shards with no manifest (another script's, or the manifest was deleted): never touched."""
    found = sorted(
        (int(m.group(2)), m.group(3), m.group(0))
        for m in map(SHARD_FILE.match, os.listdir(out) if os.path.isdir(out) else [])
        if m
    )
    if not found:
        return
    formats = {fmt for _, fmt, _ in found}
    if formats != {settings["format"]}:
        raise SystemExit(
            f"{out} holds .{' and .'.join(sorted(formats))} shards, not --format "
            f"{settings['format']}: choose another --output_dir"
        )
    if len(found) > 1:  # all shards but the last are full
        size = len(open_shard(os.path.join(out, found[0][2])))
        if size != settings["shard_size"]:
            raise SystemExit(
                f"{out} holds shards of --shard_size {size}, not {settings['shard_size']}: "
                "choose another --output_dir, or delete them to start afresh"
            )
    raise SystemExit(
        f"{out} holds {SHARD_PREFIX} shards but no {MANIFEST}, so where they end in the input is "
        "unknown: move them away or choose another --output_dir"
    )


class ShardWriter:
    """Packs documents' tokens into one buffer and writes it out as a shard of exactly shard_size
    tokens whenever it fills. After each shard the manifest records where in the document stream
    the next shard starts (a document and a token offset within it), for a rerun to continue."""

    def __init__(self, out, manifest):
        self.out, self.manifest = out, manifest
        self.buffer = np.empty(manifest["shard_size"], np.uint16)  # the one shard held in memory
        self.fill = 0
        last = manifest["shards"][-1] if manifest["shards"] else {}
        self.dropped_documents = last.get("dropped_documents", 0)
        self.dropped_tokens = last.get("dropped_tokens", 0)

    @property
    def index(self):
        return len(self.manifest["shards"])

    def add(self, tokens, document, offset, contaminated):
        """Append tokens[offset:] of the document-th document. A contaminated document is dropped
        from the train shards only: the val shard is the same as without decontamination."""
        while offset < len(tokens):
            if contaminated and self.index > 0:
                self.dropped_documents += 1
                self.dropped_tokens += len(tokens) - offset
                return
            n = min(len(self.buffer) - self.fill, len(tokens) - offset)
            self.buffer[self.fill : self.fill + n] = tokens[offset : offset + n]
            self.fill += n
            offset += n
            if self.fill == len(self.buffer):
                self.flush(document, offset)  # the next shard starts at this token

    def flush(self, next_document, next_offset=0):
        name = shard_name(self.index, self.manifest["format"])
        path = os.path.join(self.out, name)
        write_shard(path, self.buffer[: self.fill])
        self.manifest["shards"].append(
            {
                "name": name,
                "tokens": self.fill,
                "bytes": os.path.getsize(path),
                # a shard changed since (same size, other tokens) has another mtime: train_gpt2.py
                # then scans it rather than trust max_token
                "mtime_ns": os.stat(path).st_mtime_ns,
                # the largest token id, so that train_gpt2.py need not scan the shard for it
                "max_token": int(self.buffer[: self.fill].max()),
                "next_document": next_document,
                "next_offset": next_offset,
                "dropped_documents": self.dropped_documents,
                "dropped_tokens": self.dropped_tokens,
            }
        )
        write_manifest(self.out, self.manifest)  # after the shard: see above
        self.fill = 0


def report(out, manifest):
    val, *train = manifest["shards"]
    print(
        f"{out}: a val shard of {val['tokens']:,} tokens and {len(train)} train shards of "
        f"{sum(s['tokens'] for s in train):,} tokens"
    )
    if not train:
        print("every token went to the val shard: lower --shard_size to get train shards")
    if manifest["decontaminate"]:
        last = manifest["shards"][-1]
        print(
            f"decontamination: dropped {last['dropped_documents']:,} training documents "
            f"({last['dropped_tokens']:,} tokens) sharing a {NGRAM}-gram with "
            f"{manifest['decontaminate']['eval_set']}"
        )


# -----------------------------------------------------------------------------
# main()


@dataclass
class FinewebConfig:
    """Every setting of fineweb.py; each field is also a command-line flag (--name value)."""

    input: list | None = setting(
        None,
        "local .parquet, .jsonl or .txt files (a .txt file is one document; parquet and jsonl "
        "need a 'text' column) (default: none, the download)",
        nargs="+",
    )
    dataset: str = setting(DEFAULT_DATASET, "Hugging Face dataset (or HuggingFaceFW/fineweb)")
    remote_name: str = setting(
        DEFAULT_REMOTE_NAME, "its config: sample-100BT, sample-350BT, or a dump (CC-MAIN-2024-10)"
    )
    output_dir: str = setting(DEFAULT_OUTPUT_DIR, "where the shards go; train_gpt2.py's --data_dir")
    shard_size: int = setting(10**8, "tokens per shard", minimum=1)
    num_proc: int = setting(
        max(1, (os.cpu_count() or 2) // 2), "tokenizing processes (1: this process)", minimum=1
    )
    format: str = setting("npy", "numpy .npy or llm.c .bin shards", choices=("npy", "bin"))
    decontaminate: str | None = setting(
        None,
        "drop training documents sharing a 13-gram with this eval set (default: none)",
        choices=("hellaswag",),
    )
    hellaswag_path: str | None = setting(
        None, "local hellaswag_val.jsonl for --decontaminate (default: downloaded)"
    )


def parse_args(argv=None):
    description = "Tokenize FineWeb-Edu (or local files) into GPT-2 token shards."
    return parse_settings(FinewebConfig, description, argv)


def main(argv=None):
    try:
        build_shards(parse_args(argv))
    except OSError as e:  # a full disk, an unwritable directory: the complete shards stay
        where = e.filename or "the output directory"
        raise SystemExit(
            f"cannot write {where}: {e.strerror or e}; the shards already complete are kept, "
            "and the same command continues from them"
        ) from None


def leave_ctrl_c_to_parent():
    """A pool worker ignores Ctrl-C (the terminal sends it to every process of the group): the
    parent stops the pool and says so, once, without a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_shards(args):
    """Tokenize the documents into the shards of args.output_dir, continuing an earlier run."""
    if args.format == "bin" and args.shard_size >= 2**31:
        raise SystemExit("a .bin header counts tokens in an int32: --shard_size must be < 2**31")
    if args.hellaswag_path and not args.decontaminate:
        raise SystemExit("--hellaswag_path is for --decontaminate hellaswag")
    check_output_dir(args.output_dir, "--output_dir")  # before a download, not after it
    inputs = [os.path.abspath(p) for p in args.input or []]
    for path in inputs:
        check_input(path)
    if inputs:
        source = {"input": [[p, os.path.getsize(p)] for p in inputs]}
    else:
        source = {"dataset": args.dataset, "remote_name": args.remote_name}
    eval_path, decontaminate = decontamination_set(args) if args.decontaminate else (None, None)
    settings = {
        "source": source,
        "shard_size": args.shard_size,
        "format": args.format,
        "decontaminate": decontaminate,
    }
    out = args.output_dir
    shards, complete = completed_shards(out, settings)
    manifest = dict(settings, shards=shards, complete=False)
    if complete:
        print(f"{out} already holds all {len(shards)} shards made {describe(settings, 'source')}")
        report(out, manifest)
        return

    last = shards[-1] if shards else {"next_document": 0, "next_offset": 0}
    if inputs:
        texts = iter_documents(inputs, last["next_document"])
    else:
        texts = iter_remote(load_remote(args.dataset, args.remote_name), last["next_document"])
    os.makedirs(out, exist_ok=True)
    # what a run killed while writing left (files.atomic_open writes shards and the manifest)
    files.remove_stale_temporaries(out, rf"{SHARD_PREFIX}_.*|{re.escape(MANIFEST)}")
    write_manifest(out, manifest)
    if shards:
        print(f"{len(shards)} shards of {out} are complete: continuing with shard {len(shards)}")
    t0 = time.perf_counter()
    tokenized = write_documents(texts, ShardWriter(out, manifest), last, eval_path, args.num_proc)
    manifest["complete"] = True
    write_manifest(out, manifest)
    seconds = time.perf_counter() - t0
    report(out, manifest)
    print(
        f"tokenized {tokenized:,} tokens in {seconds:.2f}s: {tokenized / seconds:,.0f} tokens/s "
        f"with --num_proc {args.num_proc}"
    )


def decontamination_set(args):
    """(path, manifest record) of the evaluation set whose 13-grams the train shards avoid."""
    eval_path = os.path.abspath(args.hellaswag_path or download_hellaswag("val"))
    ngrams = len(hellaswag_index(eval_path))  # iterate_examples checks the file
    if not ngrams:
        raise SystemExit(f"{eval_path} holds no {NGRAM}-gram to decontaminate against")
    print(f"decontaminating the train shards against {ngrams:,} {NGRAM}-grams of {eval_path}")
    return eval_path, {"eval_set": "hellaswag val", "sha256": file_sha256(eval_path)}


def write_documents(texts, writer, last, eval_path, num_proc):
    """Tokenize the documents (from the one `last` says comes next) into the writer's shards,
    in a pool of num_proc processes; returns the number of tokens written."""
    work = functools.partial(tokenize, eval_path=eval_path)
    document = start_document = last["next_document"]
    tokenized = 0
    try:
        with contextlib.ExitStack() as stack:  # the bar and the pool are closed before a message
            if num_proc > 1:
                pool = mp.Pool(num_proc, initializer=leave_ctrl_c_to_parent)
                stack.enter_context(pool)
                # imap streams: the documents are read as the workers need them, in order
                results = pool.imap(work, texts, chunksize=CHUNKSIZE)
            else:
                results = map(work, texts)
            bar = tqdm(unit="tok", unit_scale=True, desc=f"shard {writer.index}")
            stack.enter_context(bar)
            for tokens, contaminated in results:
                offset = last["next_offset"] if document == start_document else 0
                writer.add(tokens, document, offset, contaminated)
                document += 1
                tokenized += len(tokens) - offset
                bar.update(len(tokens) - offset)
                bar.set_description_str(f"shard {writer.index}", refresh=False)
    except InputError as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        print(
            f"interrupted with {writer.index} shards complete: run the same command again to "
            "continue",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGINT) from None
    if writer.fill:
        writer.flush(document)
    elif writer.index == 0:
        raise SystemExit("the input holds no documents")
    return tokenized


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
