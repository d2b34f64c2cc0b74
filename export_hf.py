"""
Export a train_gpt2.py checkpoint as a Hugging Face GPT-2 directory, tokenizer included, so
that transformers pipelines and lm-evaluation-harness run on it offline. The mapping of the
weights and the config is support/hf_gpt2.py's.

    python export_hf.py log/model_19073.pt gpt2-repro
    python -c "import transformers as t; print(t.pipeline('text-generation', 'gpt2-repro')('Hi'))"
    lm_eval --model hf --model_args pretrained=gpt2-repro --tasks hellaswag
"""

import os

import torch

from support import files, hf_gpt2
from support.cli import (
    ArgumentParser,
    check_output_dir,
    check_written,
    error_chain,
    first_line,
    quiet_exit_when_stdout_closes,
)
from train_gpt2 import load_model_from_checkpoint


def check_out_dir(out_dir):
    """The export writes into a new or empty directory only: never over other files."""
    check_output_dir(out_dir, "the export")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} is not empty: name a new or empty directory to export into")


def export(model, out_dir):
    """The model as a Hugging Face directory, written whole or not at all: a failure (a full disk,
    say) leaves nothing behind that would block the same command again."""
    try:
        with files.atomic_directory(out_dir) as tmp, torch.no_grad():
            hf_gpt2.save_pretrained(model, tmp)
    except Exception as e:  # transformers and safetensors report a failed write in their own types
        cause = next((c for c in error_chain(e) if isinstance(c, OSError)), e)
        reason = getattr(cause, "strerror", None) or first_line(cause)
        raise SystemExit(f"could not write {out_dir}: {reason}") from None
    check_written(os.path.join(out_dir, "model.safetensors"), "the export's weights")


def main(argv=None):
    parser = ArgumentParser(description="Export a checkpoint to Hugging Face format.")
    parser.add_argument("checkpoint", help="a log/model_XXXXX.pt of train_gpt2.py, or 'latest'")
    parser.add_argument("out_dir", help="a new or empty directory to write")
    parser.add_argument("--log_dir", default="log", help="where 'latest' looks")
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir)
    model, ckpt = load_model_from_checkpoint(args.checkpoint, args.log_dir)
    export(model, args.out_dir)
    print(f"wrote {args.out_dir} from {ckpt.path} (step {ckpt['step']})")


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
