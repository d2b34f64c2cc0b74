"""
GPT-2 in Hugging Face's transformers, without torch at import: OpenAI's four sizes, loading their
weights (or a local directory's) as a GPT2LMHeadModel, reading a model's shape, and the names and
layouts in which its weights differ from ours. GPT.from_pretrained, hellaswag.py, sample.py and
export_hf.py go through here.
"""

import os

# The four sizes OpenAI released (GPT-2 paper, table 2); all share block_size and vocab_size.
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# GPT-3 paper, table 2.1: the peak learning rate of the GPT-3 model nearest in size to each
GPT3_LEARNING_RATES = {"gpt2": 6e-4, "gpt2-medium": 3e-4, "gpt2-large": 2.5e-4, "gpt2-xl": 2e-4}
# Hugging Face's GPT-2 implements these as Conv1D layers, which store weights as (in, out);
# nn.Linear stores (out, in), so they are transposed on the way in and out.
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# older transformers versions keep the causal mask in the state dict: buffers, not weights
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def preset_settings(name, with_lr=True):
    """train_gpt2.py's settings for one of the four sizes: its shape, and its learning rate."""
    settings = dict(GPT2_PRESETS[name], block_size=1024)
    return dict(settings, max_lr=GPT3_LEARNING_RATES[name]) if with_lr else settings


def check_name(name_or_path):
    if name_or_path not in GPT2_PRESETS and not os.path.isdir(name_or_path):
        raise SystemExit(
            f"unknown model {name_or_path!r}: expected one of {', '.join(GPT2_PRESETS)} "
            "or a local Hugging Face GPT-2 directory"
        )


def first_line(error):
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def load_hf_gpt2(name_or_path):
    """A transformers GPT2LMHeadModel: OpenAI's (by preset name, from the hub) or a local dir."""
    check_name(name_or_path)
    from transformers import GPT2LMHeadModel  # heavy import, only this path needs it

    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # offline without a cached copy, or not GPT-2 files
        raise SystemExit(
            f"could not load {name_or_path!r} with transformers: {first_line(e)}"
        ) from None


def check_variant(hf, name_or_path):
    """Our blocks implement exactly GPT-2's variant of the transformer: refuse a config (a
    transformers GPT2Config) that differs."""
    if (
        hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh")
        or (hf.n_inner or 4 * hf.n_embd) != 4 * hf.n_embd
        or hf.layer_norm_epsilon != 1e-5
        or not hf.scale_attn_weights
        or hf.scale_attn_by_inverse_layer_idx
    ):
        raise SystemExit(f"{name_or_path!r} is a GPT-2 variant this model does not implement")


def shape_of(hf):
    """GPTConfig's fields of a transformers GPT2Config."""
    return dict(
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
    )


def pretrained_shape(name_or_path):
    """GPTConfig's fields for OpenAI's GPT-2 (a preset name: nothing is downloaded) or a local
    Hugging Face directory (its config.json), before any weights are loaded."""
    check_name(name_or_path)
    if name_or_path in GPT2_PRESETS:
        return dict(GPT2_PRESETS[name_or_path], block_size=1024, vocab_size=50257)
    from transformers import GPT2Config

    try:
        return shape_of(GPT2Config.from_pretrained(name_or_path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not read {name_or_path!r}'s config: {first_line(e)}") from None
