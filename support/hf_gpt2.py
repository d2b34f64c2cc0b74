"""
GPT-2 in Hugging Face's transformers, both ways, without torch or transformers at import: OpenAI's
four sizes, loading their weights (or a local directory's) as a GPT2LMHeadModel, a model's shape
read from a GPT2Config and written to one, and the names and layouts in which the weights differ
from ours. GPT.from_pretrained reads through here, export_hf.py writes through here, and
hellaswag.py and sample.py load transformers models through here.
"""

import os

from support import PROJECT_DIR
from support.cli import first_line
from support.datafiles import EOT, GPT2_VOCAB_SIZE

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
# OpenAI's GPT-2 vocabulary in Hugging Face's file format (encoder.json and vocab.bpe)
HF_TOKENIZER_DIR = os.path.join(PROJECT_DIR, "data", "gpt2-hf")

# -----------------------------------------------------------------------------
# The presets


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


def pretrained_shape(name_or_path):
    """GPTConfig's fields for OpenAI's GPT-2 (a preset name: nothing is downloaded) or a local
    Hugging Face directory (its config.json), before any weights are loaded."""
    check_name(name_or_path)
    if name_or_path in GPT2_PRESETS:
        return dict(GPT2_PRESETS[name_or_path], block_size=1024, vocab_size=GPT2_VOCAB_SIZE)
    from transformers import GPT2Config

    try:
        config = GPT2Config.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not read {name_or_path!r}'s config: {first_line(e)}") from None
    return shape_of(config, name_or_path)


# -----------------------------------------------------------------------------
# transformers -> ours


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


def shape_of(hf, name_or_path):
    """GPTConfig's fields of a transformers GPT2Config. Our blocks implement exactly GPT-2's
    variant of the transformer: a config that differs is refused."""
    if (
        hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh")
        or (hf.n_inner or 4 * hf.n_embd) != 4 * hf.n_embd
        or hf.layer_norm_epsilon != 1e-5
        or not hf.scale_attn_weights
        or hf.scale_attn_by_inverse_layer_idx
    ):
        raise SystemExit(f"{name_or_path!r} is a GPT-2 variant this model does not implement")
    return dict(
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
    )


def weights_from_hf(hf_state_dict, names, name_or_path):
    """A GPT2LMHeadModel's weights under our names and layouts; `names` are the model's own
    (those of its state_dict), which the weights must be exactly."""
    state = {k: v for k, v in hf_state_dict.items() if not k.endswith(MASK_BUFFERS)}
    if set(state) != set(names):
        differ = sorted(set(names) ^ set(state))
        raise SystemExit(f"{name_or_path!r} does not hold GPT-2 weights: {differ[:3]} differ")
    return {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state.items()}


# -----------------------------------------------------------------------------
# ours -> transformers


def hf_config_of(config):
    """The transformers GPT2Config of a GPTConfig, with GPT-2's own vocabulary of 50257."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        bos_token_id=EOT,
        eos_token_id=EOT,
        # we train without dropout; GPT-2's config would turn 0.1 on when fine-tuned with HF
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def to_hf(model):
    """A transformers GPT2LMHeadModel holding the weights of `model`, a GPT of the gpt2 recipe:
    the vocabulary's padding rows dropped (50304 -> 50257), the Conv1D weights transposed."""
    from transformers import GPT2LMHeadModel

    c = model.config
    if c.recipe != "gpt2":
        raise SystemExit(
            f"a --recipe {c.recipe} model is not a GPT-2 architecture (rotary positions, no "
            "LayerNorm, untied head): transformers' GPT2LMHeadModel cannot hold it"
        )
    if c.vocab_size < GPT2_VOCAB_SIZE:
        raise SystemExit(
            f"the model's vocabulary ({c.vocab_size}) is smaller than GPT-2's ({GPT2_VOCAB_SIZE})"
        )
    state = {}
    for k, v in model.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:GPT2_VOCAB_SIZE]
        state[k] = (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous().float()
    hf_model = GPT2LMHeadModel(hf_config_of(c))
    result = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(MASK_BUFFERS)]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return hf_model


def save_pretrained(model, out_dir):
    """`model` as a Hugging Face GPT-2 directory: the weights and config of to_hf(model), and
    OpenAI's tokenizer files, so that transformers loads it offline."""
    from transformers import GPT2TokenizerFast
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar for one file: stderr is kept for what went wrong
    to_hf(model).save_pretrained(out_dir)
    tokenizer = GPT2TokenizerFast.from_pretrained(HF_TOKENIZER_DIR)
    tokenizer.model_max_length = model.config.block_size
    tokenizer.save_pretrained(out_dir)
