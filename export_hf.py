"""
Export a train_gpt2.py checkpoint as a Hugging Face GPT-2 directory, tokenizer included, so
that transformers pipelines and lm-evaluation-harness run on it offline.

    python export_hf.py log/model_19073.pt gpt2-repro
    python -c "import transformers as t; print(t.pipeline('text-generation', 'gpt2-repro')('Hi'))"
    lm_eval --model hf --model_args pretrained=gpt2-repro --tasks hellaswag
"""

import os
import shutil

import torch

from cli import (
    ArgumentParser,
    check_output_dir,
    check_written,
    error_chain,
    quiet_exit_when_stdout_closes,
)
from datafiles import EOT, GPT2_VOCAB_SIZE, HERE
from hf_gpt2 import CONV1D_WEIGHTS, MASK_BUFFERS
from train_gpt2 import load_model_from_checkpoint

# OpenAI's GPT-2 vocabulary in Hugging Face's file format (encoder.json and vocab.bpe)
HF_TOKENIZER_DIR = os.path.join(HERE, "data", "gpt2-hf")


def export_hf(model, out_dir):
    """Write `model` (a GPT) to out_dir as GPT2LMHeadModel weights, config and tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar for one file: stderr is kept for what went wrong

    n_vocab = GPT2_VOCAB_SIZE  # drop the padding rows: 50304 -> 50257
    c = model.config
    if c.recipe != "gpt2":
        raise SystemExit(
            f"a --recipe {c.recipe} model is not a GPT-2 architecture (rotary positions, no "
            "LayerNorm, untied head): transformers' GPT2LMHeadModel cannot hold it"
        )
    if c.vocab_size < n_vocab:
        raise SystemExit(
            f"the model's vocabulary ({c.vocab_size}) is smaller than GPT-2's ({n_vocab})"
        )
    hf_config = GPT2Config(
        vocab_size=n_vocab,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        bos_token_id=EOT,
        eos_token_id=EOT,
        # we train without dropout; GPT-2's config would turn 0.1 on when fine-tuned with HF
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    state = {}
    for k, v in model.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:n_vocab]
        state[k] = (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous().float()
    hf_model = GPT2LMHeadModel(hf_config)
    result = hf_model.load_state_dict(state, strict=False)
    # older transformers versions hold the causal mask as (non-weight) buffers
    missing = [k for k in result.missing_keys if not k.endswith(MASK_BUFFERS)]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    hf_model.save_pretrained(out_dir)
    tokenizer = GPT2TokenizerFast.from_pretrained(HF_TOKENIZER_DIR)
    tokenizer.model_max_length = c.block_size
    tokenizer.save_pretrained(out_dir)


def check_out_dir(out_dir):
    """The export writes into a new or empty directory only: never over other files."""
    check_output_dir(out_dir, "the export")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} is not empty: name a new or empty directory to export into")


def export_atomically(model, out_dir):
    """export_hf into a temporary directory beside out_dir, renamed to out_dir once complete: a
    failure (a full disk, say) leaves nothing behind that would block the same command again."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.tmp")
    try:
        export_hf(model, tmp)
        os.replace(tmp, out_dir)  # onto a missing or empty directory
    except Exception as e:  # transformers and safetensors report a failed write in their own types
        cause = next((c for c in error_chain(e) if isinstance(c, OSError)), e)
        reason = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[0]
        raise SystemExit(f"could not write {out_dir}: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    parser = ArgumentParser(description="Export a checkpoint to Hugging Face format.")
    parser.add_argument("checkpoint", help="a log/model_XXXXX.pt of train_gpt2.py, or 'latest'")
    parser.add_argument("out_dir", help="a new or empty directory to write")
    parser.add_argument("--log_dir", default="log", help="where 'latest' looks")
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir)
    model, ckpt = load_model_from_checkpoint(args.checkpoint, args.log_dir)
    with torch.no_grad():
        export_atomically(model, args.out_dir)
    check_written(os.path.join(args.out_dir, "model.safetensors"), "the export's weights")
    print(f"wrote {args.out_dir} from {ckpt['path']} (step {ckpt['step']})")


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
