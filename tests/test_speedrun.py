"""--recipe speedrun: its model (rotary positions, QK-norm, ReLU^2, zero-initialized projections
and head, soft-capped logits, U-net skips, value and bigram embeddings, multi-token prediction),
Muon (Polar Express, NorMuon), its schedule, each switch off alone, the previous recipe (every
switch off) as it was, and its checkpoints in the other scripts (HellaSwag, CORE, export)."""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from test_core import BUNDLE as CORE_BUNDLE
from test_core import reference_accuracy, reference_scores
from test_sample import logits_by_recompute, logits_with_cache, random_model
from test_train import log_of_the_stored_run

import core_eval
import hellaswag
import speedrun
import train_gpt2 as tg
from conftest import (
    HELLASWAG_SLICE,
    ROOT,
    TINY,
    fails_in_one_line,
    make_shards,
    run_in_process,
)
from speedrun import SpeedrunGPT
from train_gpt2 import GPTConfig

SPEEDRUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, recipe="speedrun")
# the recipe of the speedrun's first records, as this project had it before the switches
PREVIOUS = dict.fromkeys(speedrun.SWITCHES, 0)
# a shape with 4 heads of 16: room for a window and documents inside a head's attention
SPEEDRUN_64 = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304)
PREVIOUS_FLAGS = [x for k, v in PREVIOUS.items() for x in (f"--{k}", str(v))]


# ----------------------------------------------------------------------------- the model


def test_speedrun_model_parameters_and_init():
    torch.manual_seed(0)
    previous = SpeedrunGPT(GPTConfig(**SPEEDRUN, unet_skips=0, value_embeds=0, bigram_embed=0))
    names = set(dict(previous.named_parameters()))
    # no learned positions, no norm gains, no biases: only matrices, and an untied head
    blocks = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert names == {"transformer.wte.weight", "lm_head.weight"} | blocks
    assert previous.lm_head.weight is not previous.transformer.wte.weight
    # the current one adds a skip weight per pair of blocks and the value embeddings, with the
    # weight of v and of the embedding in each value-embedded block's values, and the bigram
    # table (5 x the vocabulary, zero at first) with its weight in each block's input
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    mixes = {f"transformer.h.{i}.attn.value_mix" for i in range(2)}
    added = {"skip_weights", "value_embeds.0.weight"} | mixes
    added |= {"bigram_embed.weight", "bigram_weights"}
    assert set(dict(model.named_parameters())) == names | added
    assert model.skip_weights.tolist() == [1.0]
    assert all(model.get_parameter(m).tolist() == [0.5, 0.5] for m in mixes)
    assert 0.015 < model.value_embeds[0].weight.std().item() < 0.025  # normal(0, 0.02)
    assert model.bigram_embed.weight.shape == (5 * 50304, 32)
    assert model.bigram_weights.tolist() == pytest.approx([0.1, 0.1])
    for m, bigrams in ((previous, []), (model, ["bigram_embed.weight"])):
        zero = [n for n, p in m.named_parameters() if not p.any()]
        assert sorted(zero) == sorted(
            ["lm_head.weight"]
            + bigrams
            + [f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")]
        )
        # at init every block is the identity and the prediction uniform: loss = ln(vocab)
        idx = torch.randint(0, 50257, (2, 16))
        with torch.no_grad():
            _, loss = m(idx, idx)
        assert abs(loss.item() - math.log(50304)) < 1e-5


def test_value_embeddings_go_to_the_first_and_last_blocks():
    def blocks(n_layer, value_embeds):
        config = GPTConfig(**dict(SPEEDRUN, n_layer=n_layer, value_embeds=value_embeds))
        return speedrun.value_embedded_blocks(config)

    assert blocks(12, 3) == {0: 0, 1: 1, 2: 2, 9: 2, 10: 1, 11: 0}  # as the U-net pairs blocks
    assert blocks(4, 3) == {0: 0, 1: 1, 2: 1, 3: 0}  # at most half the blocks get their own
    assert blocks(2, 3) == {0: 0, 1: 0} and blocks(12, 0) == {}


def test_unet_skips_value_and_bigram_embeddings_against_the_blocks_run_by_hand():
    torch.manual_seed(0)
    # plain causal attention here: the masks have a test of their own
    config = GPTConfig(
        **dict(SPEEDRUN, n_layer=5, bigram_embed=1),
        value_embeds=2,
        doc_attention=0,
        sliding_window=0,
    )
    model = SpeedrunGPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    idx = torch.randint(0, 50257, (2, 16))
    h = model.transformer.h
    rope = model.rotary(torch.arange(16))
    ve = [model.value_embeds[j](idx) for j in range(2)]
    w = model.skip_weights
    # each position's pair (the token before it, its token), hashed; position 0 has none
    a, b = speedrun.BIGRAM_MULTIPLIERS
    rows = [[50303] + [(a * t) ^ (b * u) for u, t in zip(r[:-1], r[1:])] for r in idx.tolist()]
    rows = [[r if i == 0 else r % 50303 for i, r in enumerate(row)] for row in rows]
    pairs, bw = model.bigram_embed(torch.tensor(rows)), model.bigram_weights
    with torch.no_grad():
        # blocks 0 and 1 feed blocks 4 and 3 (block 2, the middle one, has no pair); tables 0
        # and 1 go to blocks 0 and 4, and 1 and 3; the pairs go into every block
        x0 = speedrun.rms_norm(model.transformer.wte(idx))
        assert model.attention_mask(idx) is None  # SDPA's causal kernel
        x1 = h[0](x0 + bw[0] * pairs, rope, None, None, ve[0])
        x2 = h[1](x1 + bw[1] * pairs, rope, None, None, ve[1])
        x3 = h[2](x2 + bw[2] * pairs, rope)
        x4 = h[3](x3 + w[0] * x2 + bw[3] * pairs, rope, None, None, ve[1])
        x5 = h[4](x4 + w[1] * x1 + bw[4] * pairs, rope, None, None, ve[0])
        assert torch.equal(model.hidden(idx), speedrun.rms_norm(x5))
        # in the attention, the values are value_mix[0] v + value_mix[1] (the value embedding)
        attn, x = h[0].attn, speedrun.rms_norm(x0)
        q, k, v = attn.c_attn(x).split(32, dim=2)
        v = attn.value_mix[0] * v + attn.value_mix[1] * ve[0]
        q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in (q, k, v))
        q, k = (
            speedrun.apply_rotary(speedrun.rms_norm(q), rope),
            speedrun.apply_rotary(speedrun.rms_norm(k), rope),
        )
        scores = (q @ k.transpose(-1, -2)) * speedrun.ATTN_SCALE
        scores = scores.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32)
        assert (attn(x, rope, None, None, ve[0]) - attn.c_proj(y)).abs().max().item() < 1e-5


def test_attention_stays_in_its_document_window_and_context_as_a_plain_masked_attention():
    model = random_model("speedrun", shape=SPEEDRUN_64)
    model.window, model.context = 8, 24
    eot = 50256
    idx = torch.randint(0, 50256, (2, 32))
    idx[0, [0, 13, 20]] = eot
    idx[1, 5] = eot
    mask = model.attention_mask(idx)
    attn, x = model.transformer.h[0].attn, torch.randn(2, 32, 64)
    rope = model.rotary(torch.arange(32))
    with torch.no_grad():
        got = attn(x, rope, mask, None, model.value_embeds[0](idx))
        # the reference: each query's softmax over the keys it may see, one at a time, float64
        q, k, v = attn.c_attn(x).split(64, dim=2)
        v = attn.value_mix[0] * v + attn.value_mix[1] * model.value_embeds[0](idx)
        q, k, v = (t.view(2, 32, 4, 16).transpose(1, 2).double() for t in (q, k, v))
        rope64 = tuple(r.double() for r in rope)
        q = speedrun.apply_rotary(speedrun.rms_norm(q), rope64)
        k = speedrun.apply_rotary(speedrun.rms_norm(k), rope64)
        y = torch.zeros_like(q)
        for b in range(2):
            doc = (idx[b] == eot).cumsum(0)
            for i in range(32):
                seen = [j for j in range(i + 1) if doc[j] == doc[i] and i - j < 8]
                seen = [j for j in seen if j // 24 == i // 24]  # positions 0-23, 24-31
                weights = ((q[b, :, i : i + 1] @ k[b, :, seen].mT) * speedrun.ATTN_SCALE).softmax(
                    -1
                )
                y[b, :, i] = (weights @ v[b, :, seen]).squeeze(1)
        want = attn.c_proj(y.transpose(1, 2).reshape(2, 32, 64).float())
    assert (got - want).abs().max().item() < 1e-5
    # a document's outputs are those of the document alone (rotary attention sees distances only)
    model.window = model.context = 64
    two = torch.randint(0, 50256, (1, 40))
    two[0, [0, 17]] = eot
    with torch.no_grad():
        together, alone = model(two)[0], model(two[:, 17:])[0]
    assert (together[0, 17:] - alone[0]).abs().max().item() < 1e-4
    # ... and off, the second document does see the first
    model.config.doc_attention = 0
    with torch.no_grad():
        assert (model(two)[0][0, 17:] - alone[0]).abs().max().item() > 1e-2


# uncompiled on purpose: the reference implementation, which is what is compared here
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_gives_the_boolean_masks_outputs():
    # FlexAttention (CUDA's kernel for the masks) against SDPA with the boolean mask (the other
    # devices'), on 160 positions: two 128-blocks, windows and contexts across their boundary.
    # Forward only: flex_attention has no backward on a CPU (.ci/gpu checks the gradients)
    model = random_model("speedrun", shape=dict(SPEEDRUN_64, block_size=160))
    model.window, model.context = 40, 96
    idx = torch.randint(0, 50256, (2, 160))
    idx[0, [0, 70, 130]] = 50256
    idx[1, 100] = 50256
    assert isinstance(model.attention_mask(idx), torch.Tensor)  # a CPU's: the boolean mask
    with torch.no_grad():
        masked = model(idx)[0]
        model.flex = True
        assert isinstance(model.attention_mask(idx), speedrun.BlockMask)
        flexed = model(idx)[0]
    assert (flexed - masked).abs().max().item() < 1e-4  # logits of about +-15


def test_cached_generation_with_documents_a_window_and_contexts_equals_recomputing():
    model = random_model("speedrun", shape=SPEEDRUN_64)
    model.window, model.context = 16, 40
    tokens = torch.randint(0, 50256, (48,)).tolist()
    for i in (0, 13, 30):
        tokens[i] = 50256
    cached, recomputed = logits_with_cache(model, tokens, 5), logits_by_recompute(model, tokens, 5)
    assert max((a - b).abs().max().item() for a, b in zip(cached, recomputed)) < 1e-4


def test_bigram_rows_hash_each_pair_and_start_each_document_afresh():
    rows = 5 * 50304
    idx = torch.tensor([[7, 9, 7, 9, 50256, 9, 7, 9]])
    got = speedrun.bigram_rows(idx, torch.arange(8), None, rows)[0].tolist()
    a, b = speedrun.BIGRAM_MULTIPLIERS
    pair = ((a * 9) ^ (b * 7)) % (rows - 1)  # 9 after 7
    # no token before position 0, nor before <|endoftext|> in its document: the last row
    assert got == [rows - 1, pair, ((a * 7) ^ (b * 9)) % (rows - 1), pair, rows - 1] + got[5:]
    assert got[5] == ((a * 9) ^ (b * 50256)) % (rows - 1) and got[7] == pair
    # the 90,000 pairs of the 300 lowest ids (BPE's commonest merges) share rows no more than
    # as many pairs put on uniformly random rows would: m (1 - exp(-n / m)) distinct rows
    low = torch.arange(300)
    pairs = torch.stack((low.repeat_interleave(300), low.repeat(300)), dim=1)  # (before, token)
    hashed = speedrun.bigram_rows(pairs, torch.ones(2, dtype=torch.long), None, rows)[:, 1]
    assert len(set(hashed.tolist())) >= 0.99 * rows * (1 - math.exp(-90_000 / rows))


def multi_token_reference(logits, targets, weights):
    """Multi-token prediction's loss one position at a time in float64."""
    logp = logits.double().log_softmax(-1)
    B, T = targets.shape
    total = 0.0
    for k, w in enumerate(weights):
        losses = [-logp[b, t, targets[b, t + k]] for b in range(B) for t in range(T - k)]
        total += w * sum(losses) / len(losses)
    return total / sum(weights)


def test_multi_token_loss_against_a_float64_loop_and_only_with_gradients():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 6, 11) * 3, torch.randint(0, 11, (2, 6))
    for weights in ((1.0, 0.5, 0.25), (1.0, 0.3), (1.0, 0.5, 0.0)):
        got = speedrun.multi_token_loss(logits, targets, torch.tensor(weights))
        assert abs(got.item() - multi_token_reference(logits, targets, weights)) < 1e-6
    # the model: a loss with gradients is the multi-token one, without them the next token's
    model = random_model("speedrun", shape=SPEEDRUN_64)
    idx, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    speedrun.set_mtp_weights(model, (1.0, 0.5, 0.25))
    logits, loss = model(idx, y)
    assert loss.requires_grad
    assert abs(loss.item() - multi_token_reference(logits, y, (1.0, 0.5, 0.25))) < 1e-5
    with torch.no_grad():
        _, evaluated = model(idx, y)
    assert abs(evaluated.item() - multi_token_reference(logits, y, (1.0,))) < 1e-5


def test_multi_token_weights_over_the_run():
    cfg = tg.TrainConfig(recipe="speedrun", max_steps=90, mtp=1)
    weights = [speedrun.mtp_weights(s, cfg) for s in (0, 15, 30, 45, 60, 90)]
    # three tokens, the third's weight 0.25 falling to 0; two, the second's 0.5 falling; one
    expected = [(1, 0.5, 0.25), (1, 0.5, 0.125), (1, 0.5), (1, 0.25), (1,), (1,)]
    assert [pytest.approx(w) for w in expected] == weights
    # off by default: the next token alone
    assert speedrun.mtp_weights(0, dataclasses.replace(cfg, mtp=0)) == (1.0,)
    assert tg.TrainConfig(recipe="speedrun").mtp == 0
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    buffer = model.mtp_weights
    speedrun.set_model_schedule(model, 0, dataclasses.replace(cfg, mtp=0))
    assert model.mtp_weights is buffer and buffer.tolist() == [1.0]  # left as the model has it
    speedrun.set_model_schedule(model, 0, cfg)
    buffer = model.mtp_weights
    speedrun.set_model_schedule(model, 15, cfg)  # the same buffer while the count stays
    assert model.mtp_weights is buffer and buffer.tolist() == pytest.approx([1, 0.5, 0.125])
    speedrun.set_model_schedule(model, 60, cfg)
    assert model.mtp_weights.tolist() == [1.0]
    assert "mtp_weights" not in model.state_dict()  # the schedule's, not a checkpoint's


def test_the_window_grows_to_the_block_size_by_the_end_of_the_run():
    model = SpeedrunGPT(GPTConfig(**dict(SPEEDRUN, block_size=1024)))
    cfg = tg.TrainConfig(recipe="speedrun", max_steps=100, sliding_window=128)
    windows = []
    for step in (0, 1, 50, 99, 100):
        speedrun.set_attention_span(model, step, cfg)
        windows.append(model.window)
    # linear from 128 to 1024 in 64-token steps, rounded up: 128 + 896 * step / 100
    assert windows == [128, 192, 576, 1024, 1024]
    speedrun.set_attention_span(model, 0, dataclasses.replace(cfg, sliding_window=0))
    assert model.window == 1024
    # the sequence-length schedule: contexts of T/2 for the first third of the run, then whole
    contexts = []
    for step in (0, 33, 34, 99):
        speedrun.set_attention_span(model, step, dataclasses.replace(cfg, T=512))
        contexts.append(model.context)
    assert contexts == [256, 256, 1024, 1024]
    speedrun.set_attention_span(model, 0, dataclasses.replace(cfg, seq_schedule=0))
    assert model.context == 1024


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


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072)])
def test_polar_express_is_nearer_the_polar_factor_than_newton_schulz(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = np.linalg.svd(G.double().numpy(), full_matrices=False)
    polar = u @ vh  # the orthogonal matrix nearest G

    def error(X):
        return np.linalg.norm(X.double().numpy() - polar) / np.linalg.norm(polar)

    X = speedrun.polar_express(G)
    pe, ns = error(X), error(speedrun.newton_schulz(G))
    # in the same five steps (the paper's point): on these 0.6 of Newton-Schulz's error
    assert pe < 0.75 * ns and pe < 0.13, (pe, ns)
    if shape[0] != shape[1]:  # every singular value within 0.86-1.15 (Newton-Schulz: 0.68-1.14)
        after = np.linalg.svd(X.double().numpy(), compute_uv=False)
        assert 0.85 < after.min() and after.max() < 1.16, (after.min(), after.max())


def muon_reference(
    p, grads, lr, momentum, weight_decay, polar_express=False, normuon=False, cautious_wd=0.0
):
    """Muon by hand in float64, through the SVD: each quintic acts on each singular value;
    NorMuon's running mean square per row (per column of a wide matrix), by its formulas;
    cautious weight decay element by element where the weight and its update agree in sign."""
    if polar_express:
        steps, scale, eps = speedrun.POLAR_EXPRESS, 1.02, 1e-6
    else:
        steps, scale, eps = [(3.4445, -4.7750, 2.0315)] * 5, 1.0, 1e-7
    buf, second_moment = torch.zeros_like(p), 0.0
    for grad in grads:
        buf = momentum * buf + grad
        direction = grad + momentum * buf
        u, s, vh = torch.linalg.svd(
            direction / (direction.norm() * scale + eps), full_matrices=False
        )
        for a, b, c in steps:
            s = a * s + b * s**3 + c * s**5
        update = (u * s) @ vh
        if normuon:
            dim = 1 if p.size(0) >= p.size(1) else 0
            second_moment = 0.95 * second_moment + 0.05 * update.square().mean(dim, keepdim=True)
            scaled = update / second_moment.sqrt()
            update = scaled * update.norm() / scaled.norm()
        update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
        agree = torch.where(torch.sign(update) == torch.sign(p), 1.0, 0.0).double()
        p = p * (1 - lr * weight_decay) * (1 - lr * cautious_wd * agree) - lr * update
    return p


@pytest.mark.parametrize("switches", [{}, dict(polar_express=True, normuon=True, cautious_wd=1.2)])
def test_muon_steps_equal_a_float64_reference(switches):
    torch.manual_seed(0)
    tall = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    embedding = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    start = [t.detach().clone() for t in (tall, wide, embedding)]
    cautious_wd = switches.get("cautious_wd", 0.0)
    groups = [
        dict(
            params=[tall, wide], use_muon=True, lr=0.05, weight_decay=0.1, cautious_wd=cautious_wd
        ),
        dict(params=[embedding], lr=0.3, weight_decay=0.01),
    ]
    orthogonalization = {k: v for k, v in switches.items() if k != "cautious_wd"}
    optimizer = speedrun.Muon(groups, ns_dtype=torch.float64, **orthogonalization)
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
        want = muon_reference(p0, [g[i] for g in grads], 0.05, 0.95, 0.1, **switches)
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
    group = dict(params=params, use_muon=True, lr=0.05)
    # the current recipe's: NorMuon's state too must end the same on every rank
    optimizer = speedrun.Muon([group], ns_dtype=torch.float32, polar_express=True, normuon=True)
    orthogonalized = []
    polar_express = speedrun.polar_express
    speedrun.polar_express = lambda G: orthogonalized.append(tuple(G.shape)) or polar_express(G)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
    finally:
        speedrun.polar_express = polar_express
    return [p.detach() for p in params], orthogonalized


def muon_rank(rank, world, init_file, out_file):
    """One rank of test_muon_under_ddp_splits_the_orthogonalization_between_ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(muon_steps(), out_file.format(rank))
        dist.barrier()  # as train_gpt2 leaves: no rank tears the group down under a working peer
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
    cfg = tg.TrainConfig(
        recipe="speedrun", B=16, max_steps=100, cooldown_frac=0.6, min_lr_ratio=0.1
    )
    factors = [speedrun.lr_factor(s, 100, 0.6, 0.1) for s in (0, 39, 40, 70, 100, 150)]
    # no warmup; constant to step 40, then linear to 0.1 at step 100
    assert factors == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    torch.manual_seed(0)
    model = SpeedrunGPT(GPTConfig(**SPEEDRUN))
    recipe = tg.get_recipe("speedrun")
    optimizer = recipe.make_optimizer(model, cfg, "cpu", lambda *a: None)
    assert recipe.set_learning_rate(optimizer, 70, cfg) == pytest.approx(cfg.muon_lr * 0.55)
    rates = [g["lr"] for g in optimizer.param_groups]
    every = (cfg.muon_lr, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr)
    assert rates == pytest.approx([r * 0.55 for r in every])
    # the batch schedule: 5, 11 then 16 of B=16 over the thirds of the run, each at the root of
    # its part of the batch; after the cooldown has begun (step 70), the whole batch
    steps = (0, 33, 34, 66, 67, 100)
    assert [speedrun.micro_batch(s, cfg) for s in steps] == [5, 5, 11, 11, 16, 16]
    assert recipe.set_learning_rate(optimizer, 20, cfg) == pytest.approx(cfg.muon_lr * 5**0.5 / 4)
    assert recipe.set_learning_rate(optimizer, 50, cfg) == pytest.approx(
        cfg.muon_lr * 0.85 * (11 / 16) ** 0.5  # a sixth into the cooldown: 1 - 0.9 / 6
    )
    off = dataclasses.replace(cfg, batch_schedule=0)
    assert [speedrun.micro_batch(s, off) for s in steps] == [16] * 6
    assert recipe.set_learning_rate(optimizer, 20, off) == cfg.muon_lr
    # the lecture's recipe trains every step on --B
    assert tg.get_recipe("gpt2").micro_batch(0, cfg) == 16


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def speedrun_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedrun")
    make_shards(root / "data", [3000, 9000, 7000])
    # every switch on: the default ones, and multi-token prediction (off by default)
    args = TINY + ["--recipe", "speedrun", "--mtp", "1", "--data_dir", str(root / "data")]
    args += ["--max_steps", "8", "--total_batch_size", "128", "--eval_interval", "3"]
    args += ["--val_loss_steps", "1", "--checkpoint_interval", "3", "--num_return_sequences", "1"]
    args += ["--block_size", "128"]
    tg.main(args + ["--log_dir", str(root / "full")])
    return root, args


def test_the_previous_recipe_logs_what_it_logged_before_the_switches(tmp_path):
    # tests/data/speedrun_recipe_log.txt was written by this run with the code of commit a5b42bb,
    # before the switches (Muon's and the head's rates raised, so that 8 steps move the losses),
    # in float64 (in float32 its last digits differ between CPUs): every switch off is that
    # recipe, to the bit
    rates = ["--head_lr", "0.2", "--muon_lr", "0.1"]
    args = ["--recipe", "speedrun"] + rates + PREVIOUS_FLAGS
    log = log_of_the_stored_run(tmp_path, args, float64=True)
    assert log == open(os.path.join(ROOT, "tests", "data", "speedrun_recipe_log.txt")).read()


def test_a_checkpoint_from_before_the_switches_resumes_with_them_off(speedrun_run, tmp_path):
    root, args = speedrun_run
    previous = args + PREVIOUS_FLAGS
    tg.main(previous + ["--log_dir", str(tmp_path / "full")])
    # step 3's checkpoint as the code before the switches wrote it: without their settings
    old = torch.load(tmp_path / "full" / "model_00003.pt", weights_only=True)
    for switch in speedrun.SWITCHES:
        del old["train_config"][switch]
        old["model_config"].pop(switch, None)  # the model's are in both
    (tmp_path / "before").mkdir()
    shutil.copy(tmp_path / "full" / "log.txt", tmp_path / "before")
    torch.save(old, tmp_path / "before" / "model_00003.pt")
    checkpoint = str(tmp_path / "before" / "model_00003.pt")
    model, _ = tg.load_model_from_checkpoint(checkpoint)  # as the scripts read it
    assert not hasattr(model, "skip_weights") and not hasattr(model, "value_embeds")
    tg.main(["--resume", checkpoint, "--log_dir", str(tmp_path / "resumed")])
    expected = open(tmp_path / "full" / "log.txt").read()
    assert open(tmp_path / "resumed" / "log.txt").read() == expected
    # ... and differs from the current recipe's run, which each switch changes
    assert open(root / "full" / "log.txt").read() != expected


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


def test_speedrun_checkpoints_in_core_answer_as_one_float64_forward_per_row(speedrun_run, tmp_path):
    root, _ = speedrun_run
    checkpoint = str(root / "full" / "model_00008.pt")
    json_path = tmp_path / "core.json"
    args = ["--checkpoint", checkpoint, "--bundle", CORE_BUNDLE, "--device", "cpu"]
    assert run_in_process("core.py", args + ["--json", json_path], tmp_path)[0] == 0
    figures = json.loads(json_path.read_text())
    model, _ = tg.load_model_from_checkpoint(checkpoint)
    model = model.double().eval()
    logits_of = lambda row: model(torch.tensor([row]))[0][0, :, :50257]  # noqa: E731
    for task in core_eval.load_tasks(CORE_BUNDLE):
        means, hits = reference_scores(logits_of, task, 128)
        expected = reference_accuracy(task, means, hits, 128)
        assert figures["tasks"][task.label]["accuracy"] == expected, task.label


def test_the_recipe_proxy_names_its_runs_and_finds_when_a_curve_reaches_a_loss(tmp_path):
    import recipe_proxy

    # the previous recipe is every switch off; no_SWITCH is the current one with that one off
    assert recipe_proxy.PREVIOUS == dict(PREVIOUS) and set(PREVIOUS) == set(speedrun.SWITCHES)
    assert recipe_proxy.run_flags("no_normuon") == ["--recipe", "speedrun", "--normuon", "0"]
    # the ablations: each switch off alone, or on alone where it is off by default
    ablations = recipe_proxy.RUN_SETS["ablations"]
    assert "no_bigram_embed" in ablations and "mtp=1" in ablations and "no_mtp" not in ablations
    assert len(ablations) == 2 + len(speedrun.SWITCHES)
    assert recipe_proxy.run_flags("previous") == ["--recipe", "speedrun"] + PREVIOUS_FLAGS
    assert recipe_proxy.run_flags("cautious_wd=0.3") == ["--recipe", "speedrun"] + [
        "--cautious_wd",
        "0.3",
    ]
    # equal tokens: the proxy's steps of 16 x 256 are 5, 11 and 16 rows under the batch schedule
    # (1280, 2816 and 4096 tokens), so that 96 steps of thirds train the 64 full steps' 262,144
    cfg = recipe_proxy.ProxySettings()
    steps, tokens = recipe_proxy.steps_for_tokens(cfg, "current")
    assert steps == 96 and tokens[-1] == 262_144 and tokens[32] == 32 * 1280
    assert tokens[64] == 32 * (1280 + 2816)
    for name in ("previous", "no_batch_schedule"):
        steps, tokens = recipe_proxy.steps_for_tokens(cfg, name)
        assert steps == 64 and tokens == list(range(0, 262_144 + 1, 4096))
    curve = {0: 10.0, 1000: 6.0, 2000: 5.0, 3000: 4.5}
    assert recipe_proxy.tokens_to_reach(curve, 5.5) == pytest.approx(1500.0)
    assert recipe_proxy.tokens_to_reach(curve, 6.0) == pytest.approx(1000.0)
    assert recipe_proxy.tokens_to_reach(curve, 4.0) is None
    for argv, message in [
        (["--runs", "previous,fast"], "--runs: no run 'fast'"),
        (["--runs", "window=3"], "--runs: no run 'window=3'"),
        (["--seeds", "1"], "--seeds: at least 2, for a standard deviation"),
    ]:
        with pytest.raises(SystemExit) as refused:
            recipe_proxy.main(argv + ["--out_dir", str(tmp_path / "proxy")])
        assert str(refused.value).startswith(message)
    assert not (tmp_path / "proxy").exists()  # refused before anything was made
