import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import speedrun
from conftest import ROOT, run_in_process
from train_gpt2 import GPT, DataLoaderLite, DistEnv, GPTConfig

TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--B", "2"]
TINY += ["--T", "32", "--warmup", "1", "--steps", "2", "--matmul_size", "256"]


def test_step_figures_gpt2_124m_by_hand():
    # GPT-2 124M with the padded vocabulary: N = 50304 * 768 (wte = lm_head)
    # + 12 * (12 * 768^2 + 13 * 768) (blocks) + 2 * 768 (ln_f) = 123,689,472 without wpe;
    # 6N + 12 * 12 * 768 * 1024 = 855,383,040 FLOPs per token at T = 1024
    config = GPTConfig(vocab_size=50304)
    flops = bench.row_flops_per_token(config, bench.Variant(vocab_pad=True), 1024)
    assert flops == 855_383_040
    # 2 steps of 4 micro-batches of 16 x 1024 tokens in 0.8 s: 163,840 tokens/s, 400 ms/step,
    # 855,383,040 * 163,840 = 140,145,957,273,600 FLOP/s
    figures = bench.step_figures(flops, 16, 1024, 4, [0.5, 0.3], 989e12, 700e12)
    assert figures["tokens_per_sec"] == pytest.approx(163_840)
    assert figures["ms_per_step"] == pytest.approx(400)
    assert figures["mfu_spec"] == pytest.approx(140_145_957_273_600 / 989e12)  # 14.17%
    assert figures["mfu_matmul"] == pytest.approx(140_145_957_273_600 / 700e12)  # 20.02%
    assert bench.step_figures(flops, 16, 1024, 4, [0.5], None, 700e12)["mfu_spec"] is None


def test_manual_attention_matches_flash_attention():
    config = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)
    manual = bench.Variant(flash=False)
    model = bench.row_model(config, manual, "cpu")
    assert bench.row_model(config, bench.Variant(flash=True), "cpu").state_dict().keys() == (
        model.state_dict().keys()
    )
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    calls = []
    manual_attention = bench.manual_attention
    bench.manual_attention = lambda *a, **k: calls.append(1) or manual_attention(*a, **k)
    try:
        with torch.no_grad():
            flash_logits = model(idx)[0]
            with bench.attention_of(manual):
                manual_logits = model(idx)[0]
    finally:
        bench.manual_attention = manual_attention
    assert len(calls) == 2  # each block's attention, the manual way
    assert (manual_logits - flash_logits).abs().max().item() < 1e-5


def test_speedrun_row_trains_the_speedrun_model_with_muon(tmp_path, monkeypatch):
    config = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)
    variant = bench.Variant(vocab_pad=True, speedrun=True)
    model = bench.row_model(config, variant, "cpu")
    assert isinstance(model, speedrun.SpeedrunGPT) and model.config.recipe == "speedrun"
    with torch.no_grad():  # nonzero projections and head, so the attention's scale matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the manual attention uses the recipe's scale (0.12) too
        flash = model(idx)[0]
        with bench.attention_of(variant):
            manual = model(idx)[0]
        assert (manual - flash).abs().max().item() < 1e-5
    muon_steps = []
    muon_step = speedrun.Muon.step
    monkeypatch.setattr(speedrun.Muon, "step", lambda self: muon_steps.append(muon_step(self)))
    bench.synthetic_shards(str(tmp_path), 1000)
    loader = DataLoaderLite(2, 32, 0, 1, "train", str(tmp_path), shuffle=True)
    env = DistEnv.one_process("cpu")
    bench.make_step(variant, config, loader, env, torch.float32, 1)()
    assert len(muon_steps) == 1


def test_plan_is_the_lectures_sequence():
    plan = bench.plan_rows(bench.parse_args([]), torch.bfloat16, has_fp8=True)
    assert [name for name, _, _ in plan] == [
        "fp32",
        "+ tf32",
        "+ bf16",
        "+ compile",
        "+ flash attention",
        "+ vocab 50304",
        "+ fused AdamW",
        "+ fused loss",  # beyond the lecture
        "+ fp8",
        "+ speedrun recipe",
    ]
    final = bench.parse_args(["--compile", "0", "--rows", "final"])
    assert bench.plan_rows(final, torch.float16, has_fp8=True) == [
        (
            "tf32 + fp16 + flash attention + vocab 50304 + fused AdamW + fused loss + fp8 + "
            "speedrun recipe",
            ["tf32", "autocast", "flash", "vocab_pad", "fused", "fused_loss", "fp8", "speedrun"],
            None,
        )
    ]
    # where "auto" finds no fast low-precision matmuls, or the device has no FP8 matmuls, those
    # rows say so, and the final row leaves them out
    plan = bench.plan_rows(bench.parse_args([]), torch.float32, has_fp8=False)
    assert "no fast bf16" in plan[2][2] and "no FP8 matmuls here" in plan[8][2]
    [(name, _, _)] = bench.plan_rows(final, torch.float32, has_fp8=False)
    assert (
        name == "tf32 + flash attention + vocab 50304 + fused AdamW + fused loss + speedrun recipe"
    )


def test_failed_row_is_skipped_and_left_out_below(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_make_step(variant, *args):
        seen.append(variant)
        if variant.compile:
            raise RuntimeError("no C++ compiler\nmore lines")
        return len(seen)

    monkeypatch.setattr(bench, "make_step", fake_make_step)
    # each row faster than the one before: the n-th made step takes 1 / (n + 1) s
    monkeypatch.setattr(bench, "time_steps", lambda step, warmup, steps: [1 / (step + 1)] * steps)
    cfg = bench.parse_args(TINY)
    bench.synthetic_shards(str(tmp_path), 1000)
    loader = DataLoaderLite(2, 32, 0, 1, "train", str(tmp_path), shuffle=True)
    env = DistEnv.one_process("cpu")
    plan = bench.plan_rows(cfg, torch.bfloat16, has_fp8=True)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32)
    rows, last = bench.measure_rows(plan, config, 32, loader, env, torch.bfloat16, cfg, None, 1e12)
    compile_row = rows[3]
    assert compile_row["skipped"] == "RuntimeError: no C++ compiler"
    assert not any(v.compile for v in seen[4:]) and not last.compile
    assert last == bench.Variant(
        tf32=True,
        autocast=True,
        flash=True,
        vocab_pad=True,
        fused=True,
        fused_loss=True,
        fp8=True,
        speedrun=True,
    )
    # speed-up against the first row: it took 1/2 s a step, the last (the 10th call) 1/11 s
    assert rows[0]["speedup"] == 1 and rows[-1]["speedup"] == pytest.approx(5.5)
    assert "+ compile          skipped: RuntimeError: no C++ compiler" in capsys.readouterr().out


def test_bench_script_prints_every_column(tmp_path):
    """A smoke test: the real script on a tiny model, in seconds. No timings are checked."""
    out_json = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), *TINY, "--compile", "0"]
        + ["--loader_batches", "10", "--hellaswag_examples", "8", "--core_examples", "3"]
        + ["--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    assert header.split("  ")[0].strip() == "variant"
    for column in bench.COLUMNS:
        assert column in header
    figures = json.loads(out_json.read_text())
    assert figures["attention"] == "flash"  # a CPU's fastest: the header names it
    assert lines[0].endswith("timed steps per row; attention: flash")
    names = ["fp32", "+ tf32", "+ bf16", "+ flash attention", "+ vocab 50304", "+ fused AdamW"]
    names += ["+ fused loss", "+ fp8", "+ speedrun recipe"]
    assert [row["variant"] for row in figures["rows"]] == names
    for row in figures["rows"]:
        line = next(line for line in lines if line.startswith(row["variant"] + " "))
        if row["variant"] == "+ fp8":  # a CPU has no FP8 matmuls: torch emulates them
            assert "skipped: no FP8 matmuls here" in line
            continue
        if row["skipped"]:  # only a CPU without bf16 may skip another row: the autocast one
            assert row["variant"] == "+ bf16" and "skipped: --dtype auto" in line
            continue
        assert row["tokens_per_sec"] > 0 and row["mfu_matmul"] > 0 and row["mfu_spec"] is None
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
        assert line.endswith(f"{row['speedup']:.2f}x")
        assert len(line.split()) >= 8  # name words + tokens/s, ms, MFU x2, memory, speed-up
    assert figures["data_loader"]["batches_per_sec"] > 0
    assert figures["hellaswag"]["examples"] == 8
    assert any(line.startswith("data loader: ") for line in lines)
    assert figures["val_loss"]["tokens_per_sec"] > 0
    assert any(line.startswith("val loss: ") and "20 x 2**19 tokens in" in line for line in lines)
    assert any(line.startswith("HellaSwag: ") and "examples/s" in line for line in lines)
    assert figures["core"]["examples"] == 4 * 3  # the 4 tasks of tests/data/core_bundle
    assert any(line.startswith("CORE: ") and "one forward per option" in line for line in lines)


def test_bad_outputs_and_settings_are_refused_before_the_benchmark(tmp_path):
    # refused at once, before a row is measured: nothing of the benchmark is printed
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--json", "missing/x.json"], "--json missing/x.json: "),
        (["--profile", "missing/p.json"], "--profile missing/p.json: "),
        (["--profile", "a_file/p.json"], "is not a directory"),
        (["--generate", "1", "--gen_tokens", "0"], "--gen_tokens 0: must be positive"),
        (["--generate", "1", "--gen_batch", "0"], "--gen_batch 0: must be positive"),
        (["--generate", "1", "--gen_tokens", "2000"], "exceed the model's context of 1024 tokens"),
        (["--device", "banana"], "--device banana is not available on this machine"),
    ]
    for flags, expected in cases:
        args = [a for a in TINY if a not in ("--device", "cpu")] + flags
        code, out, err = run_in_process("bench.py", args, tmp_path)
        assert isinstance(code, str) and expected in code and out == "" and err == "", code
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_benchmark_where_no_row_runs_says_so(tmp_path):
    # at T=99999 every row's (T, T) attention matrix is out of memory: the rows are skipped, and
    # so are the measurements that would use the last row's model, instead of failing after them
    args = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--B", "1"]
    args += ["--T", "99999", "--flash", "0", "--compile", "0", "--warmup", "0", "--steps", "1"]
    args += ["--loader_batches", "1", "--matmul_size", "128", "--hellaswag_examples", "4"]
    code, out, err = run_in_process("bench.py", args + ["--json", "b.json"], tmp_path)
    assert code == 0, (code, err[-2000:])
    rows = json.load(open(tmp_path / "b.json"))["rows"]
    assert all(row["skipped"] for row in rows)
    assert sum("can't allocate memory" in row["skipped"] for row in rows) >= 5
    assert "val loss: skipped: no row of the table ran" in out
    assert "HellaSwag: skipped: no row of the table ran" in out
    assert "CORE: skipped: no row of the table ran" in out


def test_ddp_against_fsdp_counts_each_ranks_memory(tmp_path):
    # two ranks under torchrun: DDP's every rank holds the whole of it, FSDP's about half
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += [os.path.join(ROOT, "bench.py")] + TINY
    args += ["--shard", "1", "--compile", "0", "--json", str(tmp_path / "shard.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True)
    out = subprocess.run([sys.executable] + args, **run)
    assert out.returncode == 0, out.stderr[-2000:]
    # GPT-2 XL: 50304 * 1600 + 1024 * 1600 + 48 * (12 * 1600^2 + 13 * 1600) + 2 * 1600
    # = 1,557,686,400 parameters, 16 bytes each
    assert "gpt2-xl        1558M parameters   24.92" in out.stdout
    rows = {r["mode"]: r for r in json.load(open(tmp_path / "shard.json"))["rows"]}
    assert list(rows) == ["ddp", "fsdp", "fsdp + act. ckpt"]
    # counted by hand: the tiny model's parameters (the padded vocabulary), fp32, AdamW's two
    # moments and one step counter per tensor (bench.py builds block_size 1024)
    config = GPTConfig(block_size=1024, n_layer=2, n_head=2, n_embd=32, vocab_size=50304)
    params = list(GPT(config).parameters())
    n = sum(p.numel() for p in params)
    ddp = rows["ddp"]
    assert ddp["parameter_bytes"] == ddp["gradient_bytes"] == 4 * n
    assert ddp["optimizer_bytes"] == 8 * n + 4 * len(params)
    for mode in ("fsdp", "fsdp + act. ckpt"):
        held = [rows[mode][k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes")]
        assert sum(held) <= 0.55 * (16 * n + 4 * len(params))
        assert rows[mode]["tokens_per_sec"] > 0
