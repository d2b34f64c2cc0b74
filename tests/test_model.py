import math

import pytest
import torch
import torch.nn.functional as F

import model_kernels
from speedrun import SpeedrunGPT
from train_gpt2 import GPT, GPTConfig


def test_from_pretrained_logits_match_transformers(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ours = GPT.from_pretrained(tiny_hf_dir).eval()
    assert ours.config == GPTConfig(
        block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32
    )
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = ours(idx)
    assert loss is None
    assert (logits - expected).abs().max().item() < 1e-5
    # the loss is cross-entropy of next-token prediction, as transformers computes it
    with torch.no_grad():
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_from_pretrained_unknown_name():
    with pytest.raises(SystemExit, match="unknown model 'gpt3'"):
        GPT.from_pretrained("gpt3")


def test_optimizer_groups_gpt2_124m():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    optimizer = model.configure_optimizers(0.1, 6e-4, "cpu", log=lambda *a: None)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert len(decay["params"]) == 50
    assert sum(p.numel() for p in decay["params"]) == 124_354_560
    assert len(no_decay["params"]) == 98
    assert sum(p.numel() for p in no_decay["params"]) == 121_344
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_flops_per_token_gpt2_124m():
    config = GPTConfig(vocab_size=50304)
    with torch.device("meta"):
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    assert n == 123_689_472
    # 6N + 12 * n_layer * n_embd * T, by hand
    flops = model.flops_per_token(1024)
    assert flops == 6 * 123_689_472 + 12 * 12 * 768 * 1024 == 855_383_040


def test_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=5000, block_size=64))
    assert model.transformer.wte.weight is model.lm_head.weight
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
            expected = 0.0 if name.endswith("bias") else 1.0
            assert torch.all(p == expected), name
        else:
            std = 0.02 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - std) / std < 0.05, name


def test_sequence_longer_than_block_size():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=100))
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros((1, 17), dtype=torch.long))


def test_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=100))
    idx = torch.randint(0, 100, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_fused_loss_matches_the_plain_loss_and_gradients():
    # F.cross_entropy(lm_head(x)) is the reference; chunks of 7 rows leave a partial last chunk
    torch.manual_seed(0)
    x = torch.randn(2, 25, 32, dtype=torch.float64, requires_grad=True)
    weight = (0.3 * torch.randn(500, 32, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 500, (2, 25))
    for softcap in (None, 15.0):
        logits = x @ weight.t()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        want = torch.autograd.grad(expected, (x, weight))
        loss = model_kernels.linear_cross_entropy(x, weight, targets, softcap, chunk_rows=7)
        got = torch.autograd.grad(3.0 * loss, (x, weight))  # an upstream gradient is applied
        assert abs(loss.item() - expected.item()) < 1e-12
        for a, b in zip(got, want):
            assert (a - 3.0 * b).abs().max().item() < 1e-12


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_fused_loss_in_the_model(recipe):
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304, recipe=recipe
    )
    model = (SpeedrunGPT if recipe == "speedrun" else GPT)(config)
    with torch.no_grad():  # the speedrun's zero-initialized head would make every gradient 0
        model.lm_head.weight.normal_(0, 0.02)
    idx, targets = torch.randint(0, 50257, (2, 2, 32)).unbind(0)
    results = []
    for fused in (False, True):
        model.fused_loss = fused
        model.zero_grad()
        logits, loss = model(idx, targets)
        loss.backward()
        assert (logits is None) == fused
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = results
    assert abs(fused - plain) / plain < 1e-5  # float32
    # each tensor to float32's rounding of its own gradients, or of the model's largest where
    # its own are exactly 0 (the speedrun's skip weights at init: RMSNorm undoes their scale)
    largest = max(b.abs().max().item() for b in plain_grads)
    for a, b in zip(fused_grads, plain_grads):
        assert (a - b).abs().max().item() <= max(1e-5 * b.abs().max().item(), 1e-6 * largest)
    # under bf16 autocast the two agree to bf16 rounding of the logits
    with torch.autocast("cpu", torch.bfloat16):
        model.fused_loss = True
        _, fused_bf16 = model(idx, targets)
        model.fused_loss = False
        _, plain_bf16 = model(idx, targets)
    assert abs(fused_bf16.item() - plain_bf16.item()) < 1e-2
