import math

import pytest
import torch

import train_gpt2 as tg
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
    assert tg.flops_per_token(config, 1024) == 6 * 123_689_472 + 12 * 12 * 768 * 1024 == 855_383_040


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


class PaddedLogits(torch.nn.Module):
    """Stands in for a model whose padded vocabulary entries have the largest logits."""

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(vocab_size=50304)

    def forward(self, idx):
        logits = torch.zeros(idx.size(0), idx.size(1), 50304)
        logits[..., 50257:] = 100.0
        logits[..., 0:50] = 1.0
        return logits, None


def test_sampling_never_returns_padded_ids(monkeypatch):
    enc = tg.get_tokenizer()
    decoded = []
    monkeypatch.setattr(enc, "decode", lambda ids: decoded.append(ids) or "")
    tg.sample(PaddedLogits(), enc, "Hello", 3, 20, "cpu", 0, torch.autocast("cpu", enabled=False))
    assert len(decoded) == 3
    for ids in decoded:
        assert len(ids) == 20 and max(ids[1:]) < 50257


def test_sampling_leaves_global_rng_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32, vocab_size=50304))
    enc = tg.get_tokenizer()
    state = torch.get_rng_state()
    first = tg.sample(model, enc, "Hello", 2, 10, "cpu", 42, torch.autocast("cpu", enabled=False))
    assert torch.equal(torch.get_rng_state(), state)
    again = tg.sample(model, enc, "Hello", 2, 10, "cpu", 42, torch.autocast("cpu", enabled=False))
    assert first == again
