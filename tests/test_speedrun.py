"""--recipe speedrun: its model (rotary positions, QK-norm, ReLU^2, zero-initialized projections
and head, soft-capped logits), Muon, its schedule, and its checkpoints in the other scripts."""

import math
import os

import numpy as np
import pytest
import torch

import hellaswag
import speedrun
import train_gpt2 as tg
from conftest import HELLASWAG_SLICE, TINY, fails_in_one_line, make_shards
from speedrun import SpeedrunGPT
from train_gpt2 import GPTConfig

SPEEDRUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, recipe="speedrun")


# ----------------------------------------------------------------------------- the model


def test_speedrun_model_parameters_and_init():
    torch.manual_seed(0)
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    names = set(dict(model.named_parameters()))
    # no learned positions, no norm gains, no biases: only matrices, and an untied head
    assert names == {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert model.lm_head.weight is not model.transformer.wte.weight
    zero = [n for n, p in model.named_parameters() if not p.any()]
    assert sorted(zero) == sorted(
        ["lm_head.weight"]
        + [f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")]
    )
    # at init every block is the identity and the prediction uniform: loss = ln(vocab)
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(50304)) < 1e-5


def test_speedrun_logits_are_soft_capped():
    torch.manual_seed(0)
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 3.0)  # huge weights: uncapped logits would be in the hundreds
        logits, _ = model(torch.randint(0, 50257, (2, 16)))
    assert logits.abs().max().item() <= 15.0 and logits.abs().max().item() > 14.0


def test_rotary_attention_depends_on_the_distance_only():
    torch.manual_seed(0)
    rotary = speedrun.Rotary(head_size=16, max_len=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):  # q at position i against k at position j
        qi = speedrun.apply_rotary(q, rotary(torch.tensor([i])))
        kj = speedrun.apply_rotary(k, rotary(torch.tensor([j])))
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # a rotation: lengths are kept
    rotated = speedrun.apply_rotary(q, rotary(torch.tensor([17])))
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_speedrun_flops_per_token():
    # no biases or gains; the untied lm_head is multiplied, the embedding only looked up
    config = GPTConfig(**dict(SPEEDRUN, n_layer=12, n_head=12, n_embd=768, block_size=1024))
    n = 50304 * 768 + 12 * 12 * 768 * 768
    with torch.device("meta"):
        model = SpeedrunGPT(config)
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


# ----------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(2304, 768), (768, 768), (3072, 768), (768, 3072)])
def test_newton_schulz_makes_the_singular_values_about_one(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = speedrun.newton_schulz(G)
    assert X.shape == G.shape
    # numpy's LAPACK: torch's CPU build takes over 10 s for an SVD of these shapes
    after = np.linalg.svd(X.double().numpy(), compute_uv=False)
    inside = float(((after > 0.5) & (after < 1.5)).mean())
    # every direction is brought to about 1; a square random matrix also has a few directions
    # (2-3%) so much weaker than the others (under 1/50) that five steps lift them only part way
    assert inside == 1.0 if shape[0] != shape[1] else inside > 0.97
    # and it keeps the singular vectors: X is near U V^T (its singular values spread 0.7-1.2)
    u, _, vh = np.linalg.svd(G.double().numpy(), full_matrices=False)
    polar = u @ vh
    assert np.linalg.norm(X.double().numpy() - polar) / np.linalg.norm(polar) < 0.25
    # in bf16, as on a GPU (slow on a CPU: a smaller matrix), the same
    small = speedrun.newton_schulz(G[:96, :288].bfloat16())
    assert small.dtype == torch.bfloat16
    assert 0.5 < np.linalg.svd(small.double().numpy(), compute_uv=False).min() < 1.0


def muon_reference(p, grads, lr, momentum, weight_decay):
    """Muon by hand in float64, through the SVD: the quintic acts on each singular value."""
    a, b, c = 3.4445, -4.7750, 2.0315
    buf = torch.zeros_like(p)
    for grad in grads:
        buf = momentum * buf + grad
        direction = grad + momentum * buf
        u, s, vh = torch.linalg.svd(direction / (direction.norm() + 1e-7), full_matrices=False)
        for _ in range(5):
            s = a * s + b * s**3 + c * s**5
        update = (u * s) @ vh * max(1.0, p.size(0) / p.size(1)) ** 0.5
        p = p * (1 - lr * weight_decay) - lr * update
    return p


def test_muon_steps_equal_a_float64_reference():
    torch.manual_seed(0)
    tall = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    embedding = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    start = [t.detach().clone() for t in (tall, wide, embedding)]
    groups = [
        dict(params=[tall, wide], use_muon=True, lr=0.05, weight_decay=0.1),
        dict(params=[embedding], lr=0.3, weight_decay=0.01),
    ]
    optimizer = speedrun.Muon(groups, ns_dtype=torch.float64)
    reference = torch.optim.AdamW(
        [start[2].clone().requires_grad_()], lr=0.3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01
    )
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    for step_grads in grads:
        for t, g in zip((tall, wide, embedding), step_grads):
            t.grad = g.clone()
        optimizer.step()
        reference.param_groups[0]["params"][0].grad = step_grads[2].clone()
        reference.step()
    for t, p0, i in ((tall, start[0], 0), (wide, start[1], 1)):
        want = muon_reference(p0, [g[i] for g in grads], 0.05, 0.95, 0.1)
        assert (t.detach() - want).abs().max().item() < 1e-10
    # the other groups are AdamW: torch's own, with the speedrun's betas and eps
    adamw = reference.param_groups[0]["params"][0].detach()
    assert (embedding.detach() - adamw).abs().max().item() < 1e-12


# shapes of matrices whose Newton-Schulz costs differ; more of them than ranks, not a multiple
MUON_SHAPES = [(48, 16), (16, 16), (64, 16), (16, 48), (32, 32), (16, 16), (48, 32)]


def muon_steps(steps=2):
    """Parameters after `steps` Muon steps on seeded gradients, and the shapes that this process
    orthogonalized; under DDP each rank calls it with the same seeds."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in MUON_SHAPES]
    optimizer = speedrun.Muon([dict(params=params, use_muon=True, lr=0.05)], ns_dtype=torch.float32)
    orthogonalized = []
    newton_schulz = speedrun.newton_schulz
    speedrun.newton_schulz = lambda G: orthogonalized.append(tuple(G.shape)) or newton_schulz(G)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
    finally:
        speedrun.newton_schulz = newton_schulz
    return [p.detach() for p in params], orthogonalized


def muon_rank(rank, world, init_file, out_file):
    """One rank of test_muon_under_ddp_splits_the_orthogonalization_between_ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(muon_steps(), out_file.format(rank))
    finally:
        dist.destroy_process_group()


def test_muon_under_ddp_splits_the_orthogonalization_between_ranks(tmp_path):
    expected, all_shapes = muon_steps()  # one process orthogonalizes every matrix
    assert sorted(all_shapes) == sorted(MUON_SHAPES * 2)
    out_file = str(tmp_path / "rank{}.pt")
    torch.multiprocessing.spawn(
        muon_rank, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True
    )
    (params0, shapes0), (params1, shapes1) = [torch.load(out_file.format(r)) for r in (0, 1)]
    # every matrix is orthogonalized once, by one of the ranks, and each rank does about half
    assert sorted(shapes0 + shapes1) == sorted(all_shapes)
    sizes = [sum(m * n for m, n in shapes) for shapes in (shapes0, shapes1)]
    assert max(sizes) <= 0.6 * sum(sizes)
    # ... and both ranks end with the single process's weights, to the bit
    for a, b, c in zip(expected, params0, params1):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_muon_shares_are_balanced():
    # 12 blocks of GPT-2 124M on 8 ranks: c_attn, attn c_proj, c_fc, mlp c_proj per block
    sizes = [768 * 2304, 768 * 768, 768 * 3072, 3072 * 768] * 12
    shares = speedrun.muon_shares(sizes, 8)
    assert sorted(i for share in shares for i in share) == list(range(48))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) <= 1.1 * sum(sizes) / 8
    assert speedrun.muon_shares([5, 3], 4) == [[0], [1], [], []]  # more ranks than matrices


def test_speedrun_schedule():
    cfg = tg.TrainConfig(recipe="speedrun", max_steps=100, cooldown_frac=0.6, min_lr_ratio=0.1)
    factors = [speedrun.lr_factor(s, 100, 0.6, 0.1) for s in (0, 39, 40, 70, 100, 150)]
    # no warmup; constant to step 40, then linear to 0.1 at step 100
    assert factors == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    torch.manual_seed(0)
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    recipe = tg.get_recipe("speedrun")
    optimizer = recipe.make_optimizer(model, cfg, "cpu", lambda *a: None)
    assert recipe.set_learning_rate(optimizer, 70, cfg) == pytest.approx(cfg.muon_lr * 0.55)
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates == pytest.approx([r * 0.55 for r in (cfg.muon_lr, cfg.embed_lr, cfg.head_lr)])


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def speedrun_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedrun")
    make_shards(root / "data", [3000, 9000, 7000])
    args = TINY + ["--recipe", "speedrun", "--data_dir", str(root / "data")]
    args += ["--max_steps", "8", "--total_batch_size", "128", "--eval_interval", "3"]
    args += ["--val_loss_steps", "1", "--checkpoint_interval", "3", "--num_return_sequences", "1"]
    args += ["--block_size", "128"]
    tg.main(args + ["--log_dir", str(root / "full")])
    return root, args


def test_speedrun_resumes_exactly(speedrun_run, tmp_path):
    root, args = speedrun_run
    expected = open(root / "full" / "log.txt").read()
    tg.main(["--resume", str(root / "full" / "model_00003.pt"), "--log_dir", str(tmp_path / "r")])
    assert open(tmp_path / "r" / "log.txt").read() == expected
    a = torch.load(root / "full" / "model_00008.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "model_00008.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"][0]["use_muon"]


def test_speedrun_checkpoints_in_hellaswag_and_export(speedrun_run, tmp_path, capsys):
    root, _ = speedrun_run
    checkpoint = str(root / "full" / "model_00008.pt")
    hellaswag.main(["--checkpoint", checkpoint, "--input", HELLASWAG_SLICE, "--device", "cpu"])
    assert "on HellaSwag val, 64 examples: acc" in capsys.readouterr().out
    out_dir = tmp_path / "hf"
    fails_in_one_line(
        "export_hf.py", [checkpoint, str(out_dir)], tmp_path, "not a GPT-2 architecture"
    )
    assert not os.path.exists(out_dir)
