"""
What the scripts' command lines share, without torch: flags made from a dataclass of settings,
each setting's allowed range checked before anything slow, errors in one line, a quiet exit when
the reader of stdout goes away (`python script.py | head`), and a Ctrl-C before anything started.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import typing

ON_OFF = (0, 1)  # the values of a switch
DTYPES = ("float32", "bfloat16", "float16")  # the autocast dtypes a flag may ask for


def setting(default, help, *, choices=None, minimum=None, maximum=None, above=None, **flag):
    """A field of a settings dataclass, and so a --flag: its help, the values it may take
    (choices, or a range: minimum <= value <= maximum, value > above) and what else the flag
    needs: `parse`, the function that reads it where the field's type cannot; `aliases`, other
    names (-m); `nargs`, as argparse's."""
    metadata = dict(help=help, choices=choices, minimum=minimum, maximum=maximum, above=above)
    return dataclasses.field(default=default, metadata=dict(metadata, **flag))


def parse_auto_or_int(value):
    """A flag that takes a number or 'auto' (None: the script decides)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {value!r}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in one line and status 1, as every other refused input of these
    scripts (argparse's own is 2)."""

    def error(self, message):
        self.exit(1, f"{self.prog}: {message} (--help lists the flags)\n")


def add_flags(parser, settings_class):
    """A --name flag for every field of a settings dataclass. Flags not given are left out of
    the parsed namespace, so that a caller can tell them from a default."""
    for f in dataclasses.fields(settings_class):
        kinds = [t for t in typing.get_args(f.type) if t is not type(None)]  # int | None -> int
        help = f.metadata["help"]
        if "default" not in help:  # else the help says what the default means
            default = repr(f.default) if isinstance(f.default, str) else f.default
            help = f"{help} (default: {default})"
        nargs = f.metadata.get("nargs")
        kind = kinds[0] if kinds else f.type
        parser.add_argument(
            *f.metadata.get("aliases", ()),
            f"--{f.name}",
            type=f.metadata.get("parse") or (str if nargs else kind),
            nargs=nargs,
            default=argparse.SUPPRESS,
            choices=f.metadata["choices"],
            help=help,
        )
    return parser


def parse_settings(settings_class, description, argv=None):
    """A settings dataclass from the command line: its defaults, with the flags given."""
    parser = add_flags(ArgumentParser(description=description), settings_class)
    settings = settings_class(**vars(parser.parse_args(argv)))
    check_ranges(settings)
    return settings


def check_ranges(settings):
    """Refuse, in one line, every numeric setting that is not finite or is out of its range."""
    errors = []
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            errors.append(f"--{f.name} {value}: must be a finite number")
        elif not in_range(value, meta["minimum"], meta["maximum"], meta["above"]):
            errors.append(f"--{f.name} {value}: {describe_range(meta)}")
    if errors:
        raise SystemExit("; ".join(errors))


def in_range(value, minimum, maximum, above):
    return (
        (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
        and (above is None or value > above)
    )


def describe_range(meta):
    minimum, maximum, above = meta["minimum"], meta["maximum"], meta["above"]
    if minimum == 1 and maximum is None:
        return "must be positive"
    if minimum is not None and maximum is not None:
        return f"must be between {minimum} and {maximum}"
    if above is not None and maximum is not None:
        return f"must be in ({above}, {maximum}]"
    bounds = [f">= {minimum}"] * (minimum is not None) + [f"> {above}"] * (above is not None)
    bounds += [f"<= {maximum}"] * (maximum is not None)
    return f"out of range (must be {' and '.join(bounds)})"


def check_input_file(path, what):
    """Refuse, in one line, an input file that is missing or is a directory."""
    if os.path.isdir(path):
        raise SystemExit(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise SystemExit(f"{what} {path} does not exist")


def check_output_file(path, what):
    """Refuse, before any work, an output file that could not be written: a path that is a
    directory, or whose directory is missing, is a file, or cannot be written to."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"{what} {path} is a directory, not a file")
    if not os.path.isdir(directory):
        why = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise SystemExit(f"{what} {path}: {directory} {why}")
    if not os.access(directory, os.W_OK):
        raise SystemExit(f"{what} {path}: {directory} is not writable")


def check_output_dir(path, what):
    """Refuse, before any work, a directory that could not be made or written to: a file in its
    place, a link to nothing, or the nearest directory that exists above it not writable."""
    if os.path.islink(path) and not os.path.exists(path):
        raise SystemExit(f"{what} {path} is a link to {os.readlink(path)}, which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{what} {path} is a file, not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the directory it will be made in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise SystemExit(f"cannot write to {what} {path}: {existing} is not a writable directory")


def check_written(path, what):
    """A file a script is about to announce must exist: refuse to claim one that does not."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise SystemExit(f"{what} {path} was not written")


def error_chain(error):
    """An exception and those it was raised from or during, innermost last."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def first_line(error):
    """The first line of an exception's message (its type's name if it has none): what a
    one-line error quotes of a library's many-line account."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def discard_stdout():
    """Send what is still to be printed to /dev/null: stdout's pipe or terminal is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def quiet_exit_when_stdout_closes():
    """`python script.py | head`: once head has its lines and leaves, exit as `cat` would, with
    SIGPIPE's status 141 and no traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        raise SystemExit(141) from None


def stop_at_start_up(signum=signal.SIGINT, frame=None):
    """End a run that has not begun its first step, at a Ctrl-C, in one line and with status 130
    (128 + SIGINT): nothing is lost. A signal handler for the second or two that torch takes to
    import (train_gpt2.py installs it before), and what the trainer does on a KeyboardInterrupt
    until its own handlers are in place."""
    print("interrupted (Ctrl-C) during start-up: nothing to save", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)
