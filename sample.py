"""
Talk to a trained model: text from a checkpoint of train_gpt2.py, a Hugging Face GPT-2 directory or
OpenAI's weights, generated with a key/value cache and streamed to the terminal as it comes.

    python sample.py --checkpoint log/model_19073.pt --prompt "Hello, I'm a language model," \\
        --num_samples 4 --max_new_tokens 200
    python sample.py --checkpoint latest --log_dir log          # the newest checkpoint
    python sample.py --init_from gpt2 --prompt "..."             # OpenAI's weights: a name or a dir
    python sample.py --checkpoint ... --prompt @file.txt          # the prompt from a file
    python sample.py --checkpoint ... --interactive 1             # a prompt loop in the terminal

--seed makes the samples reproducible, --temperature 0 is greedy; tokens/s go to stderr at the end.
"""

import codecs
import sys
import time
from dataclasses import dataclass

import torch

import generation
from generation import NonFiniteLogits
from support.checkpoints import latest_checkpoint
from support.cli import (
    DTYPES,
    ON_OFF,
    check_input_file,
    parse_settings,
    quiet_exit_when_stdout_closes,
    setting,
)
from support.datafiles import EOT, get_tokenizer
from support.devices import autocast_dtype, check_device, default_device, out_of_memory, synchronize
from train_gpt2 import GPT, load_model_from_checkpoint


@dataclass
class SampleConfig:
    """Every setting of sample.py; each field is also a command-line flag (--name value)."""

    checkpoint: str = setting("latest", "a train_gpt2.py checkpoint, or 'latest' in --log_dir")
    log_dir: str = setting("log", "where --checkpoint latest looks")
    init_from: str = setting("", "instead: gpt2[-medium|-large|-xl] or a Hugging Face GPT-2 dir")
    prompt: str = setting("Hello, I'm a language model,", "the text to continue; @FILE reads FILE")
    num_samples: int = setting(1, "continuations of the prompt", minimum=1)
    max_new_tokens: int = setting(200, "tokens per continuation (the context caps it)", minimum=1)
    temperature: float = setting(1.0, "softmax temperature; 0: the likeliest token", minimum=0)
    top_k: int = setting(50, "sample among the top_k likeliest tokens (0: all)", minimum=0)
    top_p: float = setting(
        1.0, "and the fewest of them reaching this probability", above=0, maximum=1
    )
    stop_at_eot: int = setting(
        1, "end a sample at <|endoftext|>, the end of a document", choices=ON_OFF
    )
    stream: int = setting(
        1, "1: print each sample as it comes; 0: all at once, batched", choices=ON_OFF
    )
    interactive: int = setting(0, "ask for prompts in the terminal until Ctrl-D", choices=ON_OFF)
    seed: int = setting(1337, "seed of the sampling", minimum=0, maximum=2**32 - 1)
    device: str = setting("", "cuda, cuda:1, mps or cpu (default: the best available)")
    dtype: str = setting("auto", "auto: bf16 where the device has it", choices=("auto", *DTYPES))
    compile: int = setting(0, "torch.compile the model (pays on a GPU)", choices=ON_OFF)


def parse_args(argv=None):
    return parse_settings(SampleConfig, __doc__.strip().split("\n")[0], argv)


def model_to_sample(cfg):
    """The model to sample from, and a line that says what it is."""
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
        return model, cfg.init_from
    if cfg.checkpoint == "latest" and latest_checkpoint(cfg.log_dir) is None:
        raise SystemExit(
            f"no checkpoint (model_*.pt) in {cfg.log_dir}: train first, or pass --checkpoint "
            "PATH or --init_from gpt2"
        )
    model, checkpoint = load_model_from_checkpoint(cfg.checkpoint, cfg.log_dir)
    return model, f"{checkpoint.path} (step {checkpoint['step']}, {model.config.recipe})"


def read_prompt(text):
    """The prompt's text: the flag's value, or the contents of the file after @."""
    if not text.startswith("@"):
        return text
    check_input_file(text[1:], "the prompt file")
    try:
        with open(text[1:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise SystemExit(f"cannot read the prompt file {text[1:]}: {reason}") from None


def encode_prompt(text, block_size):
    """The prompt's tokens; an empty prompt starts a new document (<|endoftext|>)."""
    tokens = get_tokenizer().encode_ordinary(text) or [EOT]
    if len(tokens) >= block_size:
        raise SystemExit(
            f"the prompt has {len(tokens)} tokens: the model's context is {block_size}, "
            "with room for at least one new token"
        )
    return tokens


class TextStream:
    """Prints tokens as text as they come: a character that spans several tokens is printed once
    its last byte has arrived."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.enc = get_tokenizer()

    def write(self, tokens):
        data = b"".join(self.enc.decode_single_token_bytes(t) for t in tokens)
        self.out.write(self.decoder.decode(data))
        self.out.flush()

    def close(self):
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()


def print_continuations(model, cfg, prompt, generator, device):
    """Print cfg.num_samples continuations of the prompt; returns the number of new tokens."""
    max_new = min(cfg.max_new_tokens, model.config.block_size - len(prompt))
    options = dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        generator=generator,
        stop_token=EOT if cfg.stop_at_eot else None,
    )
    new_tokens = 0
    if cfg.stream:
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1} of {cfg.num_samples}")
            text = TextStream()
            text.write(prompt)
            for (token,) in generation.stream(model, [prompt], max_new, **options):
                text.write([token])
                new_tokens += 1
            text.close()
    else:
        rows = generation.generate(model, [prompt] * cfg.num_samples, max_new, **options)
        for i, row in enumerate(rows):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1} of {cfg.num_samples}")
            text = TextStream()
            text.write(row)
            text.close()
            new_tokens += len(row) - len(prompt)
    synchronize(device)
    return new_tokens


def interact(model, cfg, generator, device):
    """Prompts from the terminal until Ctrl-D; Ctrl-C stops the sample being written."""
    print("type a prompt and Enter; Ctrl-C stops a sample, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        try:
            prompt = encode_prompt(text, model.config.block_size)
            print_continuations(model, cfg, prompt, generator, device)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except SystemExit as e:  # a prompt too long for the context: say so, ask again
            print(e, file=sys.stderr)


def main(argv=None):
    cfg = parse_args(argv)
    device = check_device(cfg.device or default_device())
    dtype = autocast_dtype(cfg.dtype, device.split(":")[0])
    if not cfg.interactive:
        prompt_text = read_prompt(cfg.prompt)
    model, name = model_to_sample(cfg)
    # inference only: the weights themselves in the fast dtype, no autocast copy at every step
    model.to(device=device, dtype=dtype).eval()
    if cfg.compile:
        model.compile(dynamic=True)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = None if cfg.interactive else encode_prompt(prompt_text, model.config.block_size)
    print(f"{name} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    try:
        if cfg.interactive:
            interact(model, cfg, generator, device)
            return
        if cfg.max_new_tokens > model.config.block_size - len(prompt):
            print(
                f"--max_new_tokens {cfg.max_new_tokens} capped to "
                f"{model.config.block_size - len(prompt)}: the model's context is "
                f"{model.config.block_size} tokens",
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        new_tokens = print_continuations(model, cfg, prompt, generator, device)
        seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        print("\n(stopped)", file=sys.stderr)
        raise SystemExit(130) from None
    except NonFiniteLogits as e:
        raise SystemExit(
            f"{name}: {e}: the model has diverged, there is nothing to sample"
        ) from None
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise SystemExit(
            f"out of memory generating {cfg.num_samples} samples of {cfg.max_new_tokens} tokens "
            "at once: use fewer (--num_samples) or one after another (--stream 1)"
        ) from None
    print(
        f"{new_tokens} tokens in {seconds:.2f}s: {new_tokens / seconds:.1f} tokens/s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    with quiet_exit_when_stdout_closes():
        main()
