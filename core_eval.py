"""
CORE (the DCLM paper, Li et al. 2024, arXiv 2406.11794): 22 in-context tasks, each scored as its
accuracy centred on its random baseline, (acc - b) / (1 - b), and averaged. The tasks come as the
DCLM / llm-foundry eval bundle lays them out: core.yaml (each task's label, icl_task_type,
dataset_uri, num_fewshot, continuation_delimiter), eval_data/*.jsonl and eval_meta_data.csv (the
random baselines, in percent), in a directory or in the zip that holds one.

The protocol is nanochat's, so that GPT-2 gives its published figures: each task's examples are
shuffled by random.Random(1337) (and cut to --limit), example i's few-shot examples are drawn
from the others by random.Random(1234 + i), every prompt starts with <|endoftext|>, and the task
kinds (KINDS) are
- multiple_choice: one row per choice, the same query; the choice with the lowest mean loss over
  its continuation (the tokens after the rows' common prefix) is picked;
- schema: one row per context option, the same continuation (the rows' common suffix); the option
  under which it has the lowest mean loss is picked;
- language_modeling: one row, correct only if greedy decoding gives every continuation token.
A row longer than the model's context loses tokens from its left, never from its continuation.

An example's rows begin with the same tokens (the few-shot examples and the query: most of a
multiple-choice prompt), and those run through the model once: hellaswag_eval.pack_shared puts the
examples' shared prefixes left-padded into a generation.KVCache, and every row goes on from its
example's copy of it (SharedBatch), which is the cache that generation runs on, so each recipe's
model scores this way. Batches are sorted by length and kept within a budget of tokens and cached
keys; only the continuation positions go through the lm_head (hellaswag_eval.ending_losses); one
host synchronization per task. core.py is the command line.
"""

import csv
import io
import json
import os
import random
import zipfile
from dataclasses import dataclass

import torch

import hellaswag_eval
from generation import NonFiniteLogits
from support import PROJECT_DIR
from support.datafiles import EOT, download_once, get_tokenizer
from support.run_control import agree

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_CACHE = os.path.join(PROJECT_DIR, "eval_bundle", "eval_bundle.zip")
SHUFFLE_SEED = 1337  # nanochat's order of each task's examples
FEWSHOT_SEED = 1234  # example i draws its few-shot examples with random.Random(1234 + i)


# -----------------------------------------------------------------------------
# The task kinds: how an example becomes prompts, their rows, and a right or wrong answer


def fewshot_prefix(shots, line):
    """The few-shot examples, each rendered by line(example) and followed by a blank line."""
    return "".join(f"{line(shot)}\n\n" for shot in shots)


class MultipleChoice:
    fields = ("query", "choices", "gold")

    @staticmethod
    def prompts(item, shots, delimiter):
        prefix = fewshot_prefix(
            shots, lambda s: f"{s['query']}{delimiter}{s['choices'][s['gold']]}"
        )
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]

    @staticmethod
    def rows(tokens):
        """Each choice scored after the common prefix of all of them."""
        start = hellaswag_eval.common_prefix(tokens)
        return [(row, start) for row in tokens]

    @staticmethod
    def correct(item, means, hits, lengths):
        return int(means.argmin()) == item["gold"]


class Schema:
    fields = ("context_options", "continuation", "gold")

    @staticmethod
    def prompts(item, shots, delimiter):
        prefix = fewshot_prefix(
            shots, lambda s: f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}"
        )
        return [
            f"{prefix}{option}{delimiter}{item['continuation']}"
            for option in item["context_options"]
        ]

    @staticmethod
    def rows(tokens):
        """Each option's row scored on the common suffix of all of them: the continuation."""
        suffix = hellaswag_eval.common_prefix([row[::-1] for row in tokens])
        return [(row, len(row) - suffix) for row in tokens]

    correct = MultipleChoice.correct


class LanguageModeling:
    fields = ("context", "continuation")

    @staticmethod
    def prompts(item, shots, delimiter):
        """The prompt without and with the continuation; the first stripped, so that its last
        token is not one that the continuation's first would merge with."""
        prefix = fewshot_prefix(
            shots, lambda s: f"{s['context'].strip()}{delimiter}{s['continuation']}"
        )
        context = f"{prefix}{item['context'].strip()}{delimiter}"
        return [context.strip(), context + item["continuation"]]

    @staticmethod
    def rows(tokens):
        without, with_continuation = tokens
        if with_continuation[: len(without)] != without or len(with_continuation) == len(without):
            return None  # the context's tokens are not a prefix of the whole prompt's
        return [(with_continuation, len(without))]

    @staticmethod
    def correct(item, means, hits, lengths):
        return bool((hits == lengths).all())


# icl_task_type -> its kind: a new kind is a class with fields, prompts, rows and correct, here
KINDS = {"multiple_choice": MultipleChoice, "schema": Schema, "language_modeling": LanguageModeling}


# -----------------------------------------------------------------------------
# The bundle


@dataclass
class Task:
    label: str
    kind: str  # a key of KINDS
    num_fewshot: int
    delimiter: str
    baseline: float  # accuracy by chance, a fraction
    examples: list  # shuffled as nanochat shuffles them, cut to the limit


class Bundle:
    """Reads the files of an eval bundle in a directory or in a zip (where they may lie in one
    top directory, as in eval_bundle.zip)."""

    def __init__(self, path):
        self.path = path
        if not os.path.exists(path):
            raise SystemExit(f"eval bundle {path} does not exist")
        self.zip, self.root = None, path
        if os.path.isfile(path):
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise SystemExit(f"eval bundle {path} is neither a directory nor a zip") from None
            yamls = [n for n in self.zip.namelist() if n.split("/")[-1] == "core.yaml"]
            self.root = min(yamls, key=len)[: -len("core.yaml")] if yamls else ""

    def read(self, name):
        """The text of the bundle's file `name`; one line if it is not there."""
        try:
            if self.zip is not None:
                return self.zip.read(self.root + name).decode("utf-8")
            with open(os.path.join(self.root, name), encoding="utf-8") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            raise SystemExit(f"eval bundle {self.path} has no {name}") from None
        except UnicodeDecodeError:
            raise SystemExit(f"eval bundle {self.path}: {name} is not UTF-8 text") from None


def read_baselines(bundle):
    """{task label: random baseline as a fraction} from eval_meta_data.csv."""
    rows = csv.DictReader(io.StringIO(bundle.read("eval_meta_data.csv")))
    baselines = {}
    for row in rows:
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100
        except (KeyError, TypeError, ValueError):
            raise SystemExit(
                f"eval bundle {bundle.path}: eval_meta_data.csv needs the columns 'Eval Task' "
                "and 'Random baseline' (a number) on every row"
            ) from None
    return baselines


def read_examples(bundle, name, kind):
    """The examples of eval_data/name, each checked to have its kind's fields."""
    examples = []
    for lineno, line in enumerate(bundle.read(f"eval_data/{name}").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"eval_data/{name} line {lineno} is not JSON ({e.msg})") from None
        missing = [
            f for f in KINDS[kind].fields if not isinstance(example, dict) or f not in example
        ]
        if missing:
            raise SystemExit(f"eval_data/{name} line {lineno}: no {', '.join(missing)} ({kind})")
        examples.append(example)
    return examples


def load_tasks(path, labels=None, limit=None):
    """The tasks of the bundle at path (those named in labels, if given), each with its examples
    shuffled and cut to `limit`. Every way a bundle can be wrong ends here in one line."""
    import yaml

    bundle = Bundle(path)
    try:
        config = yaml.safe_load(bundle.read("core.yaml"))
        entries = config["icl_tasks"]
    except (yaml.YAMLError, TypeError, KeyError):
        raise SystemExit(f"eval bundle {path}: core.yaml has no list of icl_tasks") from None
    known = [entry.get("label") for entry in entries]
    unknown = sorted(set(labels or ()) - set(known))
    if unknown:
        raise SystemExit(f"--tasks: no task {', '.join(unknown)} in {path} (it has {len(known)})")
    baselines = read_baselines(bundle)
    tasks = []
    for entry in entries:
        label = entry.get("label")
        if labels and label not in labels:
            continue
        kind = entry.get("icl_task_type")
        if kind not in KINDS:
            raise SystemExit(
                f"task {label}: unknown icl_task_type {kind!r} (known: {', '.join(KINDS)})"
            )
        if label not in baselines:
            raise SystemExit(f"task {label}: no random baseline in eval_meta_data.csv")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        examples = read_examples(bundle, entry["dataset_uri"], kind)
        random.Random(SHUFFLE_SEED).shuffle(examples)
        examples = examples[:limit]
        if len(examples) <= shots:
            raise SystemExit(
                f"task {label}: {len(examples)} examples cannot give each {shots} few-shot others"
            )
        delimiter = entry.get("continuation_delimiter", " ")
        tasks.append(Task(label, kind, shots, delimiter, baselines[label], examples))
    return tasks


def bundle_path(path):
    """--bundle: a local directory or zip, or '' for the public bundle, downloaded once."""
    return path or download_once(BUNDLE_URL, BUNDLE_CACHE, "--bundle DIR|ZIP to core.py")


# -----------------------------------------------------------------------------
# Rows and scores


def fewshot_examples(task, i):
    """Example i's few-shot examples, as nanochat draws them: seeded by the index, from the list
    of the others. sample() draws the same places from a range of that length, and the place p
    is the example p (before i) or p + 1: no list of all the others for every example."""
    if not task.num_fewshot:
        return []
    places = random.Random(FEWSHOT_SEED + i).sample(range(len(task.examples) - 1), task.num_fewshot)
    return [task.examples[p if p < i else p + 1] for p in places]


def example_prompts(task, i):
    return KINDS[task.kind].prompts(task.examples[i], fewshot_examples(task, i), task.delimiter)


def left_cropped(row, start, context):
    """A row of at most `context` tokens: its leftmost ones dropped (never its scored span, nor
    the position that predicts the span's first token)."""
    crop = max(0, len(row) - context)
    if start - crop < 1:
        return None
    return row[crop:], start - crop


# examples tokenized at once, by every core: a 10-shot prompt is a few thousand characters, and a
# multiple-choice example's rows each repeat it (the whole bundle is about 120M tokens)
TOKENIZED_TOGETHER = 1024


def task_tokens(task, enc):
    """Each example's prompts tokenized, each after <|endoftext|>: [[tokens of each prompt]]."""
    for first in range(0, len(task.examples), TOKENIZED_TOGETHER):
        indices = range(first, min(first + TOKENIZED_TOGETHER, len(task.examples)))
        prompts = [example_prompts(task, i) for i in indices]
        flat = [prompt for example in prompts for prompt in example]
        tokens = iter(enc.encode_ordinary_batch(flat, num_threads=os.cpu_count() or 1))
        for example in prompts:
            yield [[EOT] + next(tokens) for _ in example]


def task_rows(task, enc, context):
    """Each example's rows, (tokens, start) with the tokens from `start` on scored."""
    examples_rows = []
    for i, tokens in enumerate(task_tokens(task, enc)):
        spans = KINDS[task.kind].rows(tokens)
        if spans is None:
            raise SystemExit(
                f"task {task.label} example {i}: its context does not tokenize as a prefix"
            )
        examples_rows.append([])
        for row, start in spans:
            cropped = left_cropped(row, start, context)
            if cropped is None:
                raise SystemExit(
                    f"task {task.label} example {i}: its continuation alone is longer than the "
                    f"model's context of {context} tokens"
                )
            examples_rows[-1].append(cropped)
    return examples_rows


# -----------------------------------------------------------------------------
# Packing: an example's prompt once, then each of its rows' own tokens (hellaswag_eval.pack_shared)


@dataclass
class PackedTask:
    task: Task
    packed: hellaswag_eval.PackedRows  # of SharedBatches, an example's rows one after the other
    counts: list  # the rows of each example


def pack_task(task, enc, context, batch_tokens):
    """The task's rows (task_rows) as hellaswag_eval.SharedBatches of about batch_tokens tokens."""
    examples_rows = task_rows(task, enc, context)
    packed = hellaswag_eval.pack_shared(examples_rows, batch_tokens, context)
    return PackedTask(task, packed, [len(rows) for rows in examples_rows])


def pack_tasks(tasks, context, batch_tokens):
    """Every task packed for a model of `context` tokens, in batches of about batch_tokens."""
    enc = get_tokenizer()
    return [pack_task(task, enc, context, batch_tokens) for task in tasks]


def task_accuracy(scores, packed_task):
    """The fraction of the task's examples answered right, from row_scores: one synchronization."""
    scores = scores.double().cpu()
    if not torch.isfinite(scores).all():
        raise NonFiniteLogits("the model's logits are not finite")
    task, lengths = packed_task.task, packed_task.packed.ending_lengths.double()
    means, hits = scores[0] / lengths, scores[1]
    kind, correct = KINDS[task.kind], 0
    split = [x.split(packed_task.counts) for x in (means, hits, lengths)]
    for item, *rows in zip(task.examples, *split):
        correct += kind.correct(item, *rows)
    return correct / len(task.examples)


def centered(accuracy, baseline):
    """Accuracy above chance as a fraction of what is above chance: 0 by chance, 1 if perfect."""
    return (accuracy - baseline) / (1 - baseline)


def evaluate(
    scorer, packed_tasks, device, autocast=None, rank=0, world_size=1, report=None, should_stop=None
):
    """{"tasks": {label: {"accuracy", "centered"}}, "core": the mean of the centred ones}; each
    task's batches split over the ranks. report(label, accuracy, centred) after each task; None
    if should_stop() said so between two batches."""
    results = {}
    for packed_task in packed_tasks:
        scores = hellaswag_eval.row_scores(
            scorer, packed_task.packed, device, autocast, rank, world_size, should_stop
        )
        if scores is None:
            return None
        accuracy = task_accuracy(scores, packed_task)
        task = packed_task.task
        results[task.label] = dict(accuracy=accuracy, centered=centered(accuracy, task.baseline))
        if report is not None:
            report(task.label, accuracy, results[task.label]["centered"])
    core = sum(r["centered"] for r in results.values()) / len(results)
    return dict(tasks=results, core=core)


# -----------------------------------------------------------------------------
# In the training loop (--core N)


def for_the_loop(cfg, env, model, compile):
    """CORE in the training loop (InTheLoop) with --core N: the first N examples of each task
    (nanochat's order), or None; scored eagerly, compiled run or not (SharedBatch). Local rank 0
    of each node downloads the bundle if need be, and every rank agrees on it before going on."""
    if not cfg.core:
        return None
    agree(env, lambda: bundle_path(cfg.core_bundle) if env.local_rank == 0 else None)
    tasks = agree(env, lambda: load_tasks(bundle_path(cfg.core_bundle), limit=cfg.core))
    batch_tokens = hellaswag_eval.batch_tokens_for(env.device)
    return InTheLoop(pack_tasks(tasks, cfg.block_size, batch_tokens), model)


class InTheLoop:
    """CORE as the training loop scores it: its tasks packed once, a scorer of the raw model,
    the CORE score at every evaluation, as `core` lines."""

    kind = "core"

    def __init__(self, packed_tasks, model):
        self.packed_tasks = packed_tasks
        self.scorer = hellaswag_eval.make_scorer(model.hidden, model.head)

    def warm_up(self, device, autocast):
        """Nothing to compile before the run: the scorer is eager."""

    def score(self, env, autocast, should_stop):
        """The CORE score, said on the master; None when should_stop() cut it short, or when
        the model has diverged."""
        args = (self.scorer, self.packed_tasks, env.device, autocast, env.rank, env.world_size)
        try:
            figures = evaluate(*args, should_stop=should_stop)
        except NonFiniteLogits as e:
            env.print0(f"CORE skipped: {e}")
            return None
        if figures is None:
            return None
        examples = sum(len(t.task.examples) for t in self.packed_tasks)
        env.print0(
            f"CORE: {figures['core']:.4f} ({len(figures['tasks'])} tasks, {examples} examples)"
        )
        return figures["core"]
