"""Generation: generation.generate with its key/value cache against a full recompute of every step,
batches of prompts of different lengths, top-k / top-p filtering, and sample.py's command line."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import generation
import train_gpt2 as tg
from conftest import (
    ROOT,
    TINY,
    fails_in_one_line,
    make_shards,
    run_in_process,
    run_with_address_limit,
)
from generation import generate
from speedrun import SpeedrunGPT
from support import datafiles
from train_gpt2 import GPT, GPTConfig

TINY_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=256, vocab_size=2048)
GPT2_124M_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def random_model(recipe="gpt2", dtype=torch.float32, shape=TINY_SHAPE):
    """A model with large random weights everywhere: with its init (zeros in the speedrun's, small
    values in GPT-2's) every continuation would be the same token."""
    torch.manual_seed(0)
    model = (SpeedrunGPT if recipe == "speedrun" else GPT)(GPTConfig(recipe=recipe, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.5 if p.size(0) == shape["vocab_size"] else 0.05)
    return model.to(dtype).eval()


def logits_by_recompute(model, tokens, start):
    """The reference: the last position's logits of every prefix tokens[:i], i >= start, each
    prefix run through the whole model again, no cache."""
    with torch.no_grad():
        return [
            model(torch.tensor([tokens[:i]]))[0][0, -1, :50257] for i in range(start, len(tokens))
        ]


def logits_with_cache(model, tokens, start):
    """The same through a KVCache: tokens[:start] at once, then one token per forward pass."""
    cache = generation.KVCache(pad=torch.zeros(1, dtype=torch.long), max_len=len(tokens))
    with torch.no_grad():
        logits = [model(torch.tensor([tokens[:start]]), cache=cache)[0][0, -1, :50257]]
        for token in tokens[start:-1]:
            logits.append(model(torch.tensor([[token]]), cache=cache)[0][0, -1, :50257])
    return logits


def greedy_by_recompute(model, prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0][0, -1, :50257].argmax()))
    return tokens


@pytest.mark.parametrize(
    "recipe, shape, n",
    [("gpt2", TINY_SHAPE, 200), ("speedrun", TINY_SHAPE, 200), ("gpt2", GPT2_124M_SHAPE, 12)],
)
def test_cached_generation_equals_recomputing_every_step(recipe, shape, n):
    model = random_model(recipe, shape=shape)
    prompt = [464, 1101, 257, 11, 314, 1200, 2000, 11]
    # the logits at every step, along a sequence of varied tokens
    g = torch.Generator().manual_seed(0)
    tokens = prompt + torch.randint(0, 2048, (n,), generator=g).tolist()
    want = logits_by_recompute(model, tokens, len(prompt))
    got = logits_with_cache(model, tokens, len(prompt))
    assert len(got) == len(want) == n
    for step, (a, b) in enumerate(zip(got, want)):  # float32 rounding of logits up to ~30
        assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item(), step
    # and greedy generation, as generate() does it
    short = min(n, 20)
    assert generate(model, [prompt], short, temperature=0)[0] == greedy_by_recompute(
        model, prompt, short
    )


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_a_batch_of_prompts_of_different_lengths_equals_each_alone(recipe):
    model = random_model(recipe, torch.float64)  # float64: padding must change nothing at all
    prompts = [
        [464],
        [745, 240, 257, 640, 11, 287, 257, 1956, 1290, 1497, 11],
        [16, 362],
        [44, 45, 46, 47, 48],
    ]
    assert len({len(p) for p in prompts}) == 4
    together = generate(model, prompts, 30, temperature=0)
    for prompt, row in zip(prompts, together):
        assert row == generate(model, [prompt], 30, temperature=0)[0]
    # sampled rows are the batch's own: each row draws from its own distribution
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompts, 20, top_k=50, generator=g)
    assert all(row[: len(p)] == p and len(row) == len(p) + 20 for p, row in zip(prompts, sampled))


def test_generation_stops_at_the_stop_token():
    model = random_model()
    prompt = [464]
    free = generate(model, [prompt], 40, temperature=0)[0]
    stop = free[5]  # the token greedy decoding produces at its 5th step
    first = free.index(stop, 1)
    assert generate(model, [prompt], 40, temperature=0, stop_token=stop)[0] == free[: first + 1]


def allowed_tokens(logits, top_k, top_p):
    """By hand: the top_k likeliest ids, then the smallest prefix of them reaching top_p."""
    order = torch.argsort(logits, descending=True).tolist()[:top_k]
    probs = torch.softmax(logits[order], dim=0).tolist()
    kept, mass = [], 0.0
    for token, p in zip(order, probs):
        kept.append(token)
        mass += p
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(10, 1.0), (None, 0.6), (25, 0.9), (1, 0.5)])
def test_top_k_and_top_p_never_draw_outside_the_allowed_set(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(16, 1000, generator=g)
    allowed = [allowed_tokens(row, top_k or 1000, top_p) for row in logits]
    drawn = [set() for _ in range(16)]
    for _ in range(300):
        tokens = generation.sample_next(logits, 0.8 if top_k == 25 else 1.0, top_k, top_p, g)
        for row, token in enumerate(tokens.tolist()):
            drawn[row].add(token)
    for row in range(16):
        assert drawn[row] <= allowed[row]
        if len(allowed[row]) > 3:
            assert len(drawn[row]) > 1  # it samples, it does not pick the top one


def test_temperature_zero_is_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(generation.sample_next(logits, temperature=0), logits.argmax(dim=-1))


class PaddedLogits(torch.nn.Module):
    """Stands in for a model whose padded vocabulary entries have the largest logits."""

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(vocab_size=50304)
        self.lm_head = torch.nn.Linear(1, 1)  # where generate finds the device

    def forward(self, idx, targets=None, cache=None):
        cache.extend(idx)
        logits = torch.zeros(idx.size(0), 1, 50304)
        logits[..., 50257:] = 100.0
        logits[..., 0:50] = 1.0
        return logits, None


def test_sampling_never_returns_padded_ids():
    model = PaddedLogits()
    rows = generate(model, [[15496]] * 3, 20, generator=torch.Generator().manual_seed(0))
    for row in rows:
        assert len(row) == 21 and max(row[1:]) < 50257


def test_in_loop_samples_leave_the_global_rng_alone(capsys):
    model = random_model(shape=dict(TINY_SHAPE, vocab_size=50304))  # the prompt's ids need it
    torch.manual_seed(0)
    state = torch.get_rng_state()
    generation.print_samples(model, 2, 20, 1337, contextlib.nullcontext())
    assert torch.equal(torch.get_rng_state(), state)
    first = capsys.readouterr().out
    generation.print_samples(model, 2, 20, 1337, contextlib.nullcontext())
    assert capsys.readouterr().out == first  # their own generator, seeded by its seed
    assert first.count("sample: Hello, I'm a language model,") == 2


def test_samples_of_a_diverged_model_are_skipped_in_one_line(capsys):
    model = random_model(shape=dict(TINY_SHAPE, vocab_size=50304))
    with torch.no_grad():
        model.lm_head.weight[7] = float("inf")
    generation.print_samples(model, 2, 20, 1337, contextlib.nullcontext())
    assert capsys.readouterr().out == "samples skipped: the model's logits are not finite\n"


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a short real run, whose model has GPT-2's vocabulary."""
    root = tmp_path_factory.mktemp("sample")
    make_shards(root / "data", [3000, 9000])
    args = TINY + ["--data_dir", str(root / "data"), "--log_dir", str(root / "log")]
    tg.main(args + ["--max_steps", "2", "--total_batch_size", "64", "--eval_interval", "5"])
    return root / "log" / "model_00002.pt"


def sample(args, cwd, stdin=""):
    """sample.py's stdout and stderr (run in this process: see conftest.run_in_process)."""
    code, out, err = run_in_process("sample.py", ["--device", "cpu"] + args, cwd, stdin)
    assert code == 0, err
    return out, err


def test_sample_py_is_reproducible_and_greedy_at_temperature_zero(checkpoint, tmp_path):
    args = ["--checkpoint", str(checkpoint), "--num_samples", "2", "--max_new_tokens", "20"]
    first, err = sample(args + ["--seed", "7"], tmp_path)
    again, _ = sample(args + ["--seed", "7"], tmp_path)
    other, _ = sample(args + ["--seed", "8"], tmp_path)
    assert first == again and first != other
    assert first.count("--- sample") == 2 and first.count("Hello, I'm a language model,") == 2
    assert "model_00002.pt (step 2, gpt2)" in err and "40 tokens in" in err and "tokens/s" in err
    # greedy: what generation.generate gives, streamed or all at once in a batch
    model, _ = tg.load_model_from_checkpoint(str(checkpoint))
    prompt = datafiles.get_tokenizer().encode("Once upon a time")
    want = datafiles.get_tokenizer().decode(generate(model, [prompt], 20, temperature=0)[0])
    greedy = args + ["--temperature", "0", "--prompt", "Once upon a time", "--dtype", "float32"]
    streamed, _ = sample(greedy + ["--num_samples", "1"], tmp_path)
    batched, _ = sample(greedy + ["--num_samples", "3", "--stream", "0"], tmp_path)
    assert streamed == want + "\n"
    assert batched == "".join(f"--- sample {i} of 3\n{want}\n" for i in (1, 2, 3))


def test_sample_py_prompt_from_a_file_latest_and_interactive(checkpoint, tmp_path):
    (tmp_path / "prompt.txt").write_text("The Queen said", encoding="utf-8")
    log_dir = str(checkpoint.parent)
    base = ["--max_new_tokens", "5", "--temperature", "0", "--dtype", "float32"]
    out, err = sample(
        base + ["--checkpoint", "latest", "--log_dir", log_dir, "--prompt", "@prompt.txt"], tmp_path
    )
    assert out.startswith("The Queen said") and "(step 2, gpt2)" in err
    # two prompts typed in the terminal, then Ctrl-D
    out, err = sample(
        base + ["--checkpoint", str(checkpoint), "--interactive", "1"], tmp_path, "Hi\nAlice\n"
    )
    lines = out.splitlines()
    assert lines[0].startswith("> Hi") and lines[1].startswith("> Alice") and len(lines) == 3


def test_sample_py_from_a_hugging_face_dir(tiny_hf_dir, tmp_path):
    out, err = sample(["--init_from", tiny_hf_dir, "--max_new_tokens", "8"], tmp_path)
    assert out.startswith("Hello, I'm a language model,") and tiny_hf_dir in err


def test_sample_py_errors(checkpoint, tmp_path):
    def fails(args, expected):
        fails_in_one_line("sample.py", ["--device", "cpu"] + args, tmp_path, expected)

    fails(["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist")
    fails(["--log_dir", "empty"], "no checkpoint (model_*.pt) in empty: train first")
    fails(
        ["--checkpoint", str(checkpoint), "--prompt", "@nope.txt"], "prompt file nope.txt does not"
    )
    (tmp_path / "long.txt").write_text("word " * 80)  # the tiny model's context is 64 tokens
    fails(["--checkpoint", str(checkpoint), "--prompt", "@long.txt"], "the prompt has 81 tokens")
    fails(["--checkpoint", str(checkpoint), "--top_p", "0"], "--top_p 0.0: must be in (0, 1]")
    fails(["--checkpoint", str(checkpoint), "--num_samples", "0"], "must be positive")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails(["--checkpoint", "junk.pt"], "is corrupt or not a checkpoint of ours")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not UTF-8")
    fails(["--checkpoint", str(checkpoint), "--prompt", "@binary.txt"], "cannot read the prompt")
    fails(["--checkpoint", str(checkpoint), "--prompt", "@."], "prompt file . is a directory")
    fails(["--checkpoint", str(checkpoint), "--temperature", "nan"], "--temperature nan: must be")
    fails(["--checkpoint", str(checkpoint), "--seed", "-1"], "--seed -1: must be between 0 and")
    for device in ("banana", "cuda:7"):  # no such device here (no GPU on the test machines)
        fails(["--checkpoint", str(checkpoint), "--device", device], f"--device {device} is not")


def test_a_tiny_temperature_samples_the_likeliest_token(checkpoint, tmp_path):
    # 1e-40 divides the logits into inf; they are shifted first, so it is greedy decoding
    args = ["--checkpoint", str(checkpoint), "--max_new_tokens", "12", "--dtype", "float32"]
    greedy, _ = sample(args + ["--temperature", "0"], tmp_path)
    tiny, _ = sample(args + ["--temperature", "1e-40"], tmp_path)
    assert tiny == greedy


def diverged_checkpoint(checkpoint, path, value):
    """A copy of the checkpoint with every weight scaled by `value`: NaN, or finite but so large
    that every logit overflows, as after a run that diverged."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"] = {k: v * value for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    return path


def test_a_diverged_model_is_not_sampled(checkpoint, tmp_path):
    nan = diverged_checkpoint(checkpoint, tmp_path / "nan.pt", float("nan"))
    args = ["--device", "cpu", "--checkpoint", nan]
    fails_in_one_line("sample.py", args, tmp_path, "nan.pt holds weights that are not finite")
    # finite weights whose logits are not: found as the first token is drawn, said in one line
    huge = diverged_checkpoint(checkpoint, tmp_path / "huge.pt", 1e30)
    for stream in ("1", "0"):
        args = ["--device", "cpu", "--checkpoint", huge, "--stream", stream, "--num_samples", "2"]
        code, out, err = run_in_process("sample.py", args, tmp_path)
        assert code == (
            f"{huge} (step 2, gpt2): the model's logits are not finite: the model has diverged, "
            "there is nothing to sample"
        )


def test_out_of_memory_ends_in_one_line(checkpoint, tmp_path):
    # 100,000 samples at once, in a process allowed 4GB of address space: their logits alone
    # would need 10GB
    args = ["--checkpoint", str(checkpoint), "--num_samples", "100000", "--stream", "0"]
    script = os.path.join(ROOT, "sample.py")
    run = run_with_address_limit([script, "--device", "cpu", *args], tmp_path, gigabytes=4)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("out of memory generating 100000 ")


def test_sample_py_into_head_exits_quietly(checkpoint, tmp_path):
    # `python sample.py | head -2`: head leaves after its lines; so does sample.py, with the
    # status a pipe's SIGPIPE gives (141) and no traceback
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--device", "cpu"]
        + ["--checkpoint", str(checkpoint), "--num_samples", "1000", "--max_new_tokens", "40"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.stdout.readline() == "--- sample 1 of 1000\n"
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in proc.stderr.read()
