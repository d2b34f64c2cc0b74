"""
The data every script reads, without torch: GPT-2's tokenizer (from the BPE ranks in data/), token
shards (.npy, and llm.c's .bin), the bundled corpus, and HellaSwag's jsonl examples. fineweb.py
needs nothing else, so data preparation runs where torch is not installed.
"""

import base64
import functools
import hashlib
import json
import os
import re

import numpy as np
import tiktoken

from support import PROJECT_DIR
from support.cli import check_input_file
from support.files import atomic_open

# -----------------------------------------------------------------------------
# GPT-2's tokenizer

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
EOT = 50256  # <|endoftext|>: separates (and begins) every document
TOKENIZER_PATH = os.path.join(PROJECT_DIR, "data", "gpt2.tiktoken")
# tiktoken's r50k_base ranks: the GPT-2 BPE byte for byte
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py): contractions, letters, digits, other
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


@functools.cache
def get_tokenizer():
    """The GPT-2 tokenizer from the BPE ranks shipped in data/, so it never needs the network."""
    try:
        with open(TOKENIZER_PATH, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SystemExit(
            f"tokenizer file {TOKENIZER_PATH} is missing: restore it from git"
        ) from None
    if hashlib.sha256(raw).hexdigest() != TOKENIZER_SHA256:
        raise SystemExit(f"tokenizer file {TOKENIZER_PATH} is corrupt (sha256 mismatch)")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


@functools.cache
def token_byte_lengths():
    """The UTF-8 bytes of each of GPT-2's tokens, by id (<|endoftext|>: 0, it is no text): what
    turns nats per token into bits per byte."""
    enc = get_tokenizer()
    return [0 if i == EOT else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]


# -----------------------------------------------------------------------------
# Token shards

# llm.c / modded-nanogpt shards: 256 int32 header (magic, version, token count), then uint16 tokens
LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_INTS = 256


def write_shard(path, tokens):
    """Write a 1-D uint16 token array atomically, as .npy or (by extension) llm.c .bin."""
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    with atomic_open(path) as f:
        if path.endswith(".bin"):
            header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.tobytes())
        else:
            np.save(f, tokens)


def open_shard(path):
    """Memory-map a shard (.npy uint16 array or llm.c .bin) without reading it into RAM."""
    try:
        if path.endswith(".bin"):
            return open_llmc_shard(path)
        return open_npy_shard(path)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the shard ({e.strerror or e})") from None


def open_llmc_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS)
    if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
        raise SystemExit(f"{path}: not an llm.c token shard (magic number is not {LLMC_MAGIC})")
    if header[1] != LLMC_VERSION:
        raise SystemExit(f"{path}: unsupported llm.c shard version {header[1]}")
    ntok = int(header[2])
    expected = 4 * LLMC_HEADER_INTS + 2 * ntok
    if os.path.getsize(path) != expected:
        raise SystemExit(
            f"{path}: header says {ntok} tokens but the file has "
            f"{os.path.getsize(path)} bytes, not {expected}"
        )
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(ntok,))


def open_npy_shard(path):
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, EOFError) as e:
        raise SystemExit(f"{path}: not a readable .npy token shard ({e})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise SystemExit(
            f"{path}: shards must be 1-D uint16 token arrays, this one is {tokens.ndim}-D "
            f"{tokens.dtype}"
        )
    return tokens


def list_shards(data_dir, split):
    """Shard files of a split, in name order: the .npy and .bin files that have the split as a
    whole field of their name (fields are separated by _ . or -: fineweb_val_000000.bin)."""
    if not os.path.isdir(data_dir):
        return []
    try:
        names = os.listdir(data_dir)
    except OSError as e:
        raise SystemExit(f"cannot list {data_dir}: {e.strerror or e}") from None
    names = sorted(
        n
        for n in names
        if n.endswith((".npy", ".bin")) and not n.startswith(".") and split in re.split(r"[_.-]", n)
    )
    return [os.path.join(data_dir, n) for n in names]


class ShardSequences:
    """The sequences of a split's token shards, and where a loader is among them.

    The stream of tokens is cut into sequences of T + 1 tokens that overlap by one (inputs and
    their next-token targets): sequence i of a shard starts at token i * T, so that in file order
    consecutive sequences are the lecture's contiguous batches. A cursor runs through them, across
    shard boundaries, epoch after epoch; with shuffle on, every epoch visits the shards, and the
    sequences within each shard, in a fresh order drawn from (seed, epoch), so that neither the
    world size nor B changes which data a step sees. state_dict() is the cursor, for checkpoints.
    """

    def __init__(self, data_dir, split, T, shuffle=False, seed=1337, rank=0, world_size=1):
        self.T, self.shuffle, self.seed = T, shuffle, seed
        self.paths = list_shards(data_dir, split)
        if not self.paths:
            raise SystemExit(
                f"no {split} shards (.npy or .bin files with '{split}' in the name) in {data_dir}"
            )
        self.shards = [open_shard(p) for p in self.paths]
        self.num_sequences = [(len(s) - 1) // T if len(s) > 0 else 0 for s in self.shards]
        if sum(self.num_sequences) == 0:
            raise SystemExit(
                f"the {split} shards in {data_dir} hold fewer than T + 1 = {T + 1} tokens"
            )
        self.fingerprint = shard_fingerprint(self.paths)
        check_token_ids(self.paths, self.shards, data_dir, rank, world_size)
        self.reset()

    def reset(self):
        self.load_state_dict(self.state_at(epoch=0))

    def state_at(self, epoch, shard_pos=0, seq_pos=0):
        return {
            "epoch": epoch,
            "shard_pos": shard_pos,
            "seq_pos": seq_pos,
            "T": self.T,
            "num_shards": len(self.shards),
            "data": self.fingerprint,
        }

    def state_dict(self):
        return self.state_at(self.epoch, self.shard_pos, self.seq_pos)

    def load_state_dict(self, state):
        if state["T"] != self.T or state["num_shards"] != len(self.shards):
            raise SystemExit(
                f"data loader state is for T={state['T']} over {state['num_shards']} shards; this "
                f"run has T={self.T} over {len(self.shards)} shards"
            )
        if state.get("data") != self.fingerprint:
            raise SystemExit(
                "the shards differ from those the checkpoint was trained on (names, sizes or "
                "contents): resume with the same data, or pass --resume_allow_new_data 1 to "
                "start the new data from its beginning"
            )
        self.epoch, self.shard_pos, self.seq_pos = (
            state[k] for k in ("epoch", "shard_pos", "seq_pos")
        )
        self._start_epoch(self.epoch)

    def _start_epoch(self, epoch):
        self.epoch = epoch
        n = len(self.shards)
        self.shard_order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        self._enter_shard()

    def _rng(self, *key):
        return np.random.default_rng([self.seed, *key])

    def _enter_shard(self):
        shard = int(self.shard_order[self.shard_pos])
        self.shard = shard
        n = self.num_sequences[shard]
        self.seq_order = self._rng(self.epoch, shard + 1).permutation(n) if self.shuffle else None

    def skip(self, n):
        """Move the cursor n sequences forward, into the next shard and epoch as needed."""
        while n > 0:
            left = self.num_sequences[self.shard] - self.seq_pos
            if n < left:
                self.seq_pos += n
                return
            n -= left
            self._next_shard()

    def _next_shard(self):
        self.seq_pos = 0
        self.shard_pos += 1
        if self.shard_pos == len(self.shards):
            self.shard_pos = 0
            self._start_epoch(self.epoch + 1)
        else:
            self._enter_shard()

    def take(self, n):
        """The next n sequences, (n, T + 1) uint16 tokens; the cursor moves past them."""
        rows = []
        while len(rows) < n:
            if self.seq_pos == self.num_sequences[self.shard]:
                self._next_shard()
                continue
            i = self.seq_pos if self.seq_order is None else int(self.seq_order[self.seq_pos])
            rows.append(self.shards[self.shard][i * self.T : (i + 1) * self.T + 1])
            self.seq_pos += 1
        return np.stack(rows)


def check_token_ids(paths, shards, data_dir, rank=0, world_size=1):
    """Refuse, when a loader is made and not hours into a run, a token id outside GPT-2's
    vocabulary: the largest of each shard from fineweb.py's manifest where it records it, else
    from a scan of the memory-mapped shard, each of world_size ranks scanning every one of its."""
    recorded = recorded_max_tokens(data_dir)
    for i, (path, shard) in enumerate(zip(paths, shards)):
        if os.path.basename(path) in recorded:
            top = recorded[os.path.basename(path)]
        elif i % world_size == rank:
            top = int(shard.max()) if len(shard) else 0
        else:
            continue
        if top >= GPT2_VOCAB_SIZE:
            raise SystemExit(
                f"{path}: token id {top} is outside the vocabulary (< {GPT2_VOCAB_SIZE})"
            )


def shard_fingerprint(paths):
    """A cheap identity of a set of shards: their names and sizes and the first and last KB of
    each. A resumed run refuses other shards: its position in them would mean other data."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1024)
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
        digest.update(f"{os.path.basename(path)}:{size}:".encode() + head + tail)
    return digest.hexdigest()[:16]


def recorded_max_tokens(data_dir):
    """{shard name: its largest token id} from fineweb.py's manifest, for the shards that are
    still as fineweb.py wrote them: the size and modification time it recorded."""
    try:
        with open(os.path.join(data_dir, "manifest.json")) as f:
            shards = json.load(f).get("shards", [])
        recorded = {}
        for s in shards:
            path = os.path.join(data_dir, s["name"])
            if "max_token" in s and os.path.isfile(path):
                stat = os.stat(path)
                if (stat.st_size, stat.st_mtime_ns) == (s["bytes"], s.get("mtime_ns")):
                    recorded[s["name"]] = s["max_token"]
        return recorded
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


# -----------------------------------------------------------------------------
# The bundled corpus

# The bundled public-domain texts (Canterbury corpus) for a first run with no download.
# `--data_dir bundled` names them in flags and checkpoints, wherever the project is checked out.
BUNDLED = "bundled"
CORPUS_DIR = os.path.join(PROJECT_DIR, "data", "corpus")
BUNDLED_SHARDS_DIR = os.path.join(PROJECT_DIR, "data", "corpus_shards")
BUNDLED_VAL_FRACTION = 0.1  # the last tenth of every text is held out for validation
# The run of train_gpt2.py on it: a small model for its ~300k tokens, sized for a 2-core CPU
# (docs/recipes.md): the lm_head and softmax over 50304 ids dominate a step, so depth and width
# cost little; small batches of many steps learn most from the few minutes.
# fmt: off
BUNDLED_DEFAULTS = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=256, B=4, T=256, total_batch_size=1024,
    max_lr=2e-3, warmup_steps=20, max_steps=1000, checkpoint_interval=1000, compile=0,
    eval_interval=100, val_loss_steps=32, hellaswag=0, num_return_sequences=2,
)  # val_loss_steps=32: the whole held-out 33k tokens
# fmt: on
BUNDLED_NEXT = (  # what train_gpt2.py says after that run
    "For the real GPT-2 (124M) run, get FineWeb-Edu 10B (about 20GB of token shards) with "
    "`python fineweb.py`, then run `torchrun --standalone --nproc_per_node=8 train_gpt2.py`."
)


def check_bundled_may_replace(data_dir, world_size):
    """Where train_gpt2.py's default FineWeb dir holds no train shards, the small bundled-corpus
    run trains instead, but not in place of half-made shards, nor as a cluster run: a run of
    the wrong data would end with status 0."""
    bundled = "or pass --data_dir (--data_dir bundled: the small bundled-corpus run)"
    if os.path.exists(data_dir):
        raise SystemExit(
            f"{data_dir}/ holds no train shards: `python fineweb.py` goes on making them, {bundled}"
        )
    if world_size > 1:
        raise SystemExit(
            f"no FineWeb shards in {data_dir}/: make them with `python fineweb.py`, {bundled}"
        )


def prepare_bundled_corpus(out_dir=BUNDLED_SHARDS_DIR, corpus_dir=CORPUS_DIR):
    """Tokenize the bundled texts into one val and one train shard, once; later calls reuse them.

    Every text gives a train document (its first 90%) and a val document (the rest, cut at a line
    break), each starting with <|endoftext|>. A manifest of the inputs' hashes detects staleness.
    """
    texts = sorted(n for n in os.listdir(corpus_dir) if n.endswith(".txt"))
    digest = hashlib.sha256(TOKENIZER_SHA256.encode() + str(BUNDLED_VAL_FRACTION).encode())
    for name in texts:
        with open(os.path.join(corpus_dir, name), "rb") as f:
            digest.update(name.encode() + hashlib.sha256(f.read()).digest())
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get("sha256") == digest.hexdigest():
                return out_dir
    enc = get_tokenizer()
    splits = {"train": [], "val": []}
    for name in texts:
        with open(os.path.join(corpus_dir, name), encoding="utf-8") as f:
            text = f.read()
        cut = text.find("\n", int(len(text) * (1 - BUNDLED_VAL_FRACTION)))
        cut = len(text) if cut < 0 else cut + 1
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            splits[split].extend([EOT] + enc.encode_ordinary(part))
    try:
        os.makedirs(out_dir, exist_ok=True)
        for i, split in enumerate(("val", "train")):
            path = os.path.join(out_dir, f"corpus_{split}_{i:06d}.npy")
            write_shard(path, np.array(splits[split], np.uint16))
        tokens = {split: len(ids) for split, ids in splits.items()}
        with atomic_open(manifest_path, "w") as f:  # written last: it marks the shards complete
            json.dump({"sha256": digest.hexdigest(), "texts": texts, "tokens": tokens}, f)
    except OSError as e:
        raise SystemExit(
            f"cannot write the bundled corpus's token shards to {out_dir}: {e.strerror or e}"
        ) from None
    return out_dir


# -----------------------------------------------------------------------------
# HellaSwag's examples (Zellers et al. 2019)

HELLASWAG_CACHE_DIR = os.path.join(PROJECT_DIR, "hellaswag")
HELLASWAG_URL = (
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
)
HELLASWAG_SPLITS = ("train", "val", "test")
ENDINGS = 4


def download_hellaswag(split, cache_dir=HELLASWAG_CACHE_DIR):
    """Fetch hellaswag_{split}.jsonl into cache_dir once (streamed, with a progress bar)."""
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    offline = "--input to hellaswag.py, --hellaswag_path to train_gpt2.py"
    return download_once(HELLASWAG_URL.format(split=split), path, offline)


def download_once(url, path, offline):
    """url into path unless it is there already (streamed, with a progress bar; only a complete
    download gets the name). Offline, one line that says to put the file at path or to pass a
    local copy by the flags that `offline` names."""
    import requests
    from tqdm import tqdm

    if os.path.exists(path):
        return path
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                atomic_open(path) as f,  # only a complete download gets the final name
                tqdm(total=total, unit="iB", unit_scale=True, desc=path) as bar,
            ):
                for chunk in response.iter_content(chunk_size=1 << 16):
                    bar.update(f.write(chunk))
    except requests.RequestException as e:
        raise SystemExit(
            f"could not download {url} ({type(e).__name__}); offline, put the file at {path} "
            f"or pass its path ({offline})"
        ) from None
    except OSError as e:
        raise SystemExit(f"could not write {path}: {e.strerror or e}") from None
    return path


def iterate_examples(split="val", path=None):
    """The examples of a split, from a local jsonl file if given, else the (downloaded) cache.
    A file that is not HellaSwag's jsonl ends in one line naming the file and the line."""
    if path is None:
        path = download_hellaswag(split)
    check_input_file(path, "HellaSwag file")
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield parse_example(line, path, lineno)
    except UnicodeDecodeError:
        raise SystemExit(f"HellaSwag file {path} is not UTF-8 text") from None
    except OSError as e:
        raise SystemExit(f"HellaSwag file {path} could not be read: {e.strerror or e}") from None


def parse_example(line, path, lineno):
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} line {lineno} is not JSON ({e.msg})") from None
    if not (
        isinstance(example, dict)
        and isinstance(example.get("ctx"), str)
        and isinstance(example.get("endings"), list)
        and len(example["endings"]) == ENDINGS
        and all(isinstance(e, str) for e in example["endings"])
        and example.get("label") in range(ENDINGS)
    ):
        raise SystemExit(
            f"{path} line {lineno} is not a HellaSwag example (ctx, 4 endings and a label 0-3)"
        )
    return example
