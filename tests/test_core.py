import csv
import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_sample import TINY_SHAPE, random_model

import core_eval
import hellaswag_eval
from conftest import ROOT, TINY, fails_in_one_line, make_shards, run_in_process, run_training
from support.datafiles import get_tokenizer
from train_gpt2 import GPT

BUNDLE = os.path.join(ROOT, "tests", "data", "core_bundle")
CORE_SCRIPT = os.path.join(ROOT, "core.py")
EOT = 50256


def file_examples(name):
    with open(os.path.join(BUNDLE, "eval_data", name)) as f:
        return [json.loads(line) for line in f]


def test_tasks_are_read_shuffled_and_limited_as_nanochat_reads_them():
    tasks = core_eval.load_tasks(BUNDLE)
    assert [t.label for t in tasks] == ["tiny_mc", "tiny_schema", "tiny_lm", "tiny_lm_fewshot"]
    assert [(t.kind, t.num_fewshot) for t in tasks] == [
        ("multiple_choice", 2),
        ("schema", 1),
        ("language_modeling", 0),
        ("language_modeling", 2),
    ]
    # the delimiter is a space unless the task names one
    assert [t.delimiter for t in tasks] == [" ", " ", " ", "\nAnswer: "]
    assert [t.baseline for t in tasks] == [0.25, 0.5, 0.0, 0.0]
    # each task's examples in the order of random.Random(1337).shuffle, then cut to the limit
    mc = file_examples("reasoning/tiny_mc.jsonl")
    random.Random(1337).shuffle(mc)
    assert tasks[0].examples == mc
    limited = core_eval.load_tasks(BUNDLE, ["tiny_mc"], limit=4)
    assert [t.label for t in limited] == ["tiny_mc"] and limited[0].examples == mc[:4]


def test_prompts_are_rendered_exactly_as_nanochat_renders_them():
    tasks = {t.label: t for t in core_eval.load_tasks(BUNDLE)}
    # example 1 of each (after the shuffle); its few-shot examples are drawn by
    # random.Random(1234 + 1) from the others: examples 4 and 5 of tiny_mc
    mc = tasks["tiny_mc"]
    assert random.Random(1235).sample([0, 2, 3, 4, 5], 2) == [4, 5]
    assert [mc.examples.index(s) for s in core_eval.fewshot_examples(mc, 1)] == [4, 5]
    shots = (
        "Question: How many legs has a spider?\nAnswer: eight\n\n"
        "Question: What color is grass?\nAnswer: green\n\n"
    )
    assert core_eval.example_prompts(mc, 1) == [
        shots + "Question: What do bees make?\nAnswer: " + choice
        for choice in ("honey", "milk", "wool", "silk")
    ]
    assert core_eval.example_prompts(tasks["tiny_schema"], 1) == [
        "The rain soaked the paper, so the paper was wet.\n\n"
        "The trophy did not fit in the suitcase because the trophy was too big.",
        "The rain soaked the paper, so the paper was wet.\n\n"
        "The trophy did not fit in the suitcase because the suitcase was too big.",
    ]
    # language modelling: the prompt without the continuation is stripped (its delimiter too)
    assert core_eval.example_prompts(tasks["tiny_lm"], 1) == [
        "The capital of France is",
        "The capital of France is Paris",
    ]
    shots = (
        "Monday, Tuesday,\nAnswer: Wednesday, Thursday\n\n"
        "Water freezes at zero degrees\nAnswer: Celsius\n\n"
    )
    assert core_eval.example_prompts(tasks["tiny_lm_fewshot"], 1) == [
        shots + "The capital of France is\nAnswer:",
        shots + "The capital of France is\nAnswer: Paris",
    ]
    # a context's trailing whitespace is trimmed before the delimiter
    lm = tasks["tiny_lm"]
    i = next(i for i, e in enumerate(lm.examples) if e["context"].endswith("  "))
    assert core_eval.example_prompts(lm, i)[1] == "One, two, three, four, five"


def hf_tokens(text):
    """<|endoftext|> and the text by transformers' GPT-2 tokenizer: another implementation."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(os.path.join(ROOT, "data", "gpt2-hf"))
    return [EOT] + tokenizer(text)["input_ids"]


def reference_rows(task, i, context):
    """Example i's rows as (tokens, start), found from the whole prompts' tokens one by one."""
    prompts = [hf_tokens(p) for p in core_eval.example_prompts(task, i)]
    if task.kind == "language_modeling":
        without, whole = prompts
        rows = [(whole, len(without))]
    elif task.kind == "multiple_choice":
        start = 0
        while all(len(r) > start and r[start] == prompts[0][start] for r in prompts):
            start += 1
        rows = [(r, start) for r in prompts]
    else:
        suffix = 0
        while all(len(r) > suffix and r[-1 - suffix] == prompts[0][-1 - suffix] for r in prompts):
            suffix += 1
        rows = [(r, len(r) - suffix) for r in prompts]
    # too long for the model: cut from the left
    return [(r[max(0, len(r) - context) :], s - max(0, len(r) - context)) for r, s in rows]


def reference_scores(logits_of, task, context):
    """Each row's mean continuation loss and its greedy hits, one forward per row in float64:
    logits_of(row) is a float64 model's (len(row), GPT-2's vocabulary) logits."""
    means, hits = [], []
    for i in range(len(task.examples)):
        for row, start in reference_rows(task, i, context):
            with torch.no_grad():
                logits = logits_of(row).double()
            targets = torch.tensor(row[start:])
            predicted = logits[start - 1 : len(row) - 1]
            means.append(F.cross_entropy(predicted, targets).item())
            hits.append(int((predicted.argmax(dim=1) == targets).sum()))
    return means, hits


def reference_accuracy(task, means, hits, context):
    correct, k = 0, 0
    for i, item in enumerate(task.examples):
        rows = reference_rows(task, i, context)
        mine = means[k : k + len(rows)]
        if task.kind == "language_modeling":
            correct += hits[k] == len(rows[0][0]) - rows[0][1]
        else:
            correct += mine.index(min(mine)) == item["gold"]
        k += len(rows)
    return correct / len(task.examples)


def test_each_kind_scores_as_one_forward_per_option_in_float64(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    # scored as core.py scores a transformers model (its weights in our blocks), and the reference
    # run by transformers itself
    ours = GPT.from_pretrained(tiny_hf_dir).double().eval()
    model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).double().eval()
    context = model.config.n_positions  # 128: the long example and its few-shot prompts are cut
    scorer = hellaswag_eval.make_scorer(ours.hidden, ours.head)
    # tiny_lm_fewshot covers language modelling (and its cut rows); tiny_lm adds nothing here
    for task in core_eval.load_tasks(BUNDLE, ["tiny_mc", "tiny_schema", "tiny_lm_fewshot"]):
        packed = core_eval.pack_task(task, get_tokenizer(), context, batch_tokens=128)
        assert len(packed.packed.batches) > 1  # the rows of several examples in each batch
        with torch.no_grad():
            scores = hellaswag_eval.row_scores(scorer, packed.packed, "cpu")
        means, hits = reference_scores(
            lambda row: model(torch.tensor([row])).logits[0], task, context
        )
        got = (scores[0] / packed.packed.ending_lengths).tolist()
        assert max(abs(a - b) for a, b in zip(got, means)) < 1e-9, task.label
        assert scores[1].long().tolist() == hits, task.label
        assert core_eval.task_accuracy(scores, packed) == reference_accuracy(
            task, means, hits, context
        )
    examples_rows = core_eval.task_rows(task, get_tokenizer(), context)
    assert max(len(r) for rows in examples_rows for r, _ in rows) == 128


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_rows_after_their_shared_prefix_score_as_each_row_alone_in_float64(recipe):
    """Examples of 1 to 4 rows, their prompts of 0 to 40 tokens (some with a document boundary)
    left-padded in a KV cache, each row going on from its copy: every row's summed loss and hits
    are those of one forward of the whole row, for both recipes' models, a speedrun model's window
    and context shorter than the rows (counted in positions, not in padded slots)."""
    model = random_model(recipe, torch.float64, shape=dict(TINY_SHAPE, vocab_size=50304))
    if recipe == "speedrun":
        model.window, model.context = 16, 40
    gen = random.Random(0)
    draw = lambda n: [gen.randrange(50256) for _ in range(n)]  # noqa: E731
    examples = []  # each one's rows
    for e in range(24):
        prompt = draw(gen.choice([0, 1, 5, 20, 36, 40]))
        if len(prompt) > 8 and e % 3 == 0:
            prompt[6] = EOT
        # no shared prompt: rows differing from their first token, each scored from its second
        own = [draw(gen.randint(2, 8)) for _ in range(gen.randint(1, 4))]
        examples.append([(prompt + tokens, max(1, len(prompt))) for tokens in own])
    rows = [row for mine in examples for row in mine]
    packed = hellaswag_eval.pack_shared(examples, 192, context=TINY_SHAPE["block_size"])
    batches = packed.batches
    assert len(batches) > 2 and any(b.prefixes.size(1) == 0 for b in batches)
    assert any(b.pad.max() > 0 for b in batches)  # prefixes of different lengths in a batch
    with torch.no_grad():
        scorer = hellaswag_eval.make_scorer(model.hidden, model.head)
        scores = hellaswag_eval.row_scores(scorer, packed, "cpu")
        for r, (tokens, start) in enumerate(rows):
            logits = model(torch.tensor([tokens]))[0][0, start - 1 : -1, :50257]
            targets = torch.tensor(tokens[start:])
            loss = F.cross_entropy(logits, targets, reduction="sum").item()
            assert scores[0, r].item() == pytest.approx(loss, rel=1e-10), r
            assert scores[1, r].item() == (logits.argmax(dim=1) == targets).sum().item(), r
    # the prompts ran once an example
    split = map(hellaswag_eval.split_shared_prefix, examples)
    ran = sum(len(prefix) + sum(len(t) for t, _ in rests) for prefix, rests in split)
    assert ran < 0.6 * sum(len(t) for t, _ in rows)


def test_language_modelling_is_right_only_if_every_token_is_the_greedy_one():
    task = core_eval.Task("lm", "language_modeling", 0, " ", 0.0, [{}, {}, {}])
    packed = core_eval.PackedTask(task, None, [1, 1, 1])
    packed.packed = hellaswag_eval.PackedRows(torch.tensor([3, 2, 1]), [], 0)
    scores = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 1.0]])  # losses, hits of 3, 2 and 1
    assert core_eval.task_accuracy(scores, packed) == pytest.approx(2 / 3)


def test_core_prints_and_writes_each_tasks_centred_accuracy_and_their_mean(tiny_hf_dir, tmp_path):
    out = tmp_path / "figures" / "core.json"
    args = ["--model_type", tiny_hf_dir, "--bundle", BUNDLE, "--device", "cpu", "--json", out]
    code, stdout, _ = run_in_process("core.py", args, tmp_path)
    assert code == 0
    figures = json.loads(out.read_text())
    with open(os.path.join(BUNDLE, "eval_meta_data.csv")) as f:
        baselines = {
            row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)
        }
    assert set(figures["tasks"]) == set(baselines)
    for label, result in figures["tasks"].items():
        b = baselines[label]
        assert result["centered"] == pytest.approx((result["accuracy"] - b) / (1 - b))
        assert f"{label:<40} accuracy {result['accuracy']:.4f}" in stdout
    mean = sum(r["centered"] for r in figures["tasks"].values()) / len(baselines)
    assert figures["core"] == pytest.approx(mean)
    assert f"CORE {mean:.4f}" in stdout


def broken_bundle(tmp_path, edit):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    edit(bundle)
    return str(bundle)


def replace_in(path, old, new):
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda b: os.remove(b / "eval_data" / "reasoning" / "tiny_mc.jsonl"),
            "has no eval_data/reasoning/tiny_mc.jsonl",
        ),
        (
            lambda b: replace_in(
                b / "eval_data" / "reasoning" / "tiny_mc.jsonl", '"gold": 3}', '"gold": 3'
            ),
            "eval_data/reasoning/tiny_mc.jsonl line 6 is not JSON",
        ),
        (
            lambda b: replace_in(
                b / "core.yaml", "icl_task_type: schema", "icl_task_type: ranking"
            ),
            "task tiny_schema: unknown icl_task_type 'ranking'",
        ),
        (
            lambda b: replace_in(b / "eval_meta_data.csv", "tiny_lm,", "tiny_lm_typo,"),
            "task tiny_lm: no random baseline in eval_meta_data.csv",
        ),
        (
            lambda b: replace_in(b / "core.yaml", "num_fewshot: [1]", "num_fewshot: [5]"),
            "task tiny_schema: 5 examples cannot give each 5 few-shot others",
        ),
        (
            lambda b: replace_in(
                b / "eval_data" / "language_understanding" / "tiny_schema.jsonl",
                '"continuation": "was wet."',
                '"ending": "was wet."',
            ),
            "tiny_schema.jsonl line 5: no continuation (schema)",
        ),
    ],
)
def test_a_broken_bundle_is_refused_in_one_line_before_a_model_loads(tmp_path, edit, message):
    bundle = broken_bundle(tmp_path, edit)
    # the checkpoint does not exist: a refusal about it would mean the bundle was read too late
    args = ["--bundle", bundle, "--checkpoint", str(tmp_path / "none.pt"), "--device", "cpu"]
    fails_in_one_line("core.py", args, tmp_path, message)


def test_core_refuses_unknown_tasks_and_a_missing_bundle_in_one_line(tmp_path):
    fails_in_one_line(
        "core.py",
        ["--bundle", BUNDLE, "--tasks", "tiny_mc,piqa"],
        tmp_path,
        "--tasks: no task piqa",
    )
    fails_in_one_line(
        "core.py", ["--bundle", str(tmp_path / "nowhere")], tmp_path, "does not exist"
    )


def test_a_checkpoint_its_transformers_export_and_two_ranks_give_the_same_figures(
    trained, tmp_path
):
    checkpoint, hf_dir = trained
    figures = {}
    for name, model in [("checkpoint", ["--checkpoint", checkpoint]), ("hf", ["-m", hf_dir])]:
        args = model + ["--bundle", BUNDLE, "--device", "cpu", "--json", tmp_path / f"{name}.json"]
        assert run_in_process("core.py", args, tmp_path)[0] == 0
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    args = ["--checkpoint", checkpoint, "--bundle", BUNDLE, "--device", "cpu"]
    run_training(args + ["--json", str(tmp_path / "ranks.json")], 2, tmp_path, script=CORE_SCRIPT)
    figures["two ranks"] = json.loads((tmp_path / "ranks.json").read_text())
    assert figures["two ranks"] == figures["checkpoint"]  # each batch scored by one rank, exactly
    for label, result in figures["checkpoint"]["tasks"].items():
        assert figures["hf"]["tasks"][label]["accuracy"] == result["accuracy"], label
    assert figures["hf"]["core"] == pytest.approx(figures["checkpoint"]["core"])


def test_a_zipped_bundle_reads_as_its_directory_and_offline_the_download_says_what_to_do(
    tmp_path, monkeypatch
):
    import requests

    # eval_bundle.zip holds the bundle in a top directory of its own
    shutil.copytree(BUNDLE, tmp_path / "eval_bundle")
    archive = shutil.make_archive(str(tmp_path / "eval_bundle"), "zip", tmp_path, "eval_bundle")
    shutil.rmtree(tmp_path / "eval_bundle")
    assert core_eval.load_tasks(archive) == core_eval.load_tasks(BUNDLE)

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(core_eval, "BUNDLE_CACHE", str(tmp_path / "cache" / "eval_bundle.zip"))
    with pytest.raises(SystemExit, match="could not download .* pass its path \\(--bundle"):
        core_eval.bundle_path("")
    assert not os.path.exists(tmp_path / "cache" / "eval_bundle.zip")


def test_the_loops_core_and_bits_per_byte_are_core_pys_and_the_val_texts(tmp_path):
    import math

    import train_gpt2 as tg

    make_shards(tmp_path / "data", [3000, 9000])
    log_dir = tmp_path / "log"
    args = TINY + ["--data_dir", tmp_path / "data", "--log_dir", log_dir, "--max_steps", "2"]
    args += ["--total_batch_size", "128", "--eval_interval", "2", "--val_loss_steps", "1"]
    args += ["--block_size", "128", "--num_return_sequences", "0"]
    args += ["--core", "3", "--core_bundle", BUNDLE, "--bpb", "1"]
    tg.main([str(a) for a in args])
    logged = {
        (int(s), k): float(v) for s, k, v in (line.split() for line in open(log_dir / "log.txt"))
    }
    # CORE of the first 3 examples of each task at step 2: core.py's on the checkpoint of step 2
    checkpoint = ["--checkpoint", log_dir / "model_00002.pt", "--bundle", BUNDLE, "--limit", "3"]
    json_path = tmp_path / "core.json"
    run_in_process("core.py", checkpoint + ["--device", "cpu", "--json", json_path], tmp_path)
    assert logged[(2, "core")] == round(json.loads(json_path.read_text())["core"], 4)
    # bits per byte: the nats of the val targets (2 batches of 2 x 32) over the bytes of their
    # text, <|endoftext|> left out, as the tokenizer decodes it
    loader = tg.DataLoaderLite(2, 32, 0, 1, "val", str(tmp_path / "data"))
    targets = [t for _ in range(2) for t in loader.next_batch()[1].flatten().tolist()]
    text_bytes = len(get_tokenizer().decode_bytes([t for t in targets if t != EOT]))
    expected = logged[(2, "val")] * len(targets) / (math.log(2) * text_bytes)
    assert logged[(2, "bpb")] == pytest.approx(expected, abs=2e-4)  # val's 4 decimals
    assert sorted(k for s, k in logged if s == 0) == ["bpb", "core", "train", "val"]
