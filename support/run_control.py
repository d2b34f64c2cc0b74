"""
How a run stops, and what its ranks decide together: whether to stop, and whether each one's
start-up worked.

Stop requests while training are preemption (SIGTERM), Ctrl-C (SIGINT), a reader of stdout that
has gone (SIGPIPE) and a terminal that has closed (SIGHUP). train_gpt2.py asks for them between
micro-steps, evaluation batches and samples, and before checkpoints: it then saves the last
completed step and exits with 128 + the signal's number. Under torchrun the ranks agree on the
stop, and on every start-up step a rank takes alone, on a CPU (gloo) group that never waits for a
GPU.
"""

import contextlib
import os
import signal
import sys

import torch
import torch.distributed as dist

from support import devices
from support.cli import first_line, stop_at_start_up


class StopNow(BaseException):
    """A stop request that cannot wait: nothing is lost by stopping at once."""

    def __init__(self, signum, why):
        super().__init__(why)
        self.signum = signum


class StopSignal:
    """SIGTERM and SIGINT (preemption, Ctrl-C) while training; also SIGPIPE (stdout's reader has
    gone: `python train_gpt2.py | head`) and SIGHUP (its terminal closed), unless the run was
    started to ignore it (`nohup`). The run stops for them as if preempted.

    Until a step of this run has completed, a stop loses nothing: the run stops at once (even in
    the middle of torch.compile). After, the signal is remembered, and the run asks for it with
    requested() between micro-steps, evaluation batches and samples and before checkpoints, then
    saves the last completed step and exits. A second Ctrl-C stops at once.
    """

    SIGNALS = tuple(
        getattr(signal, name)
        for name in ("SIGTERM", "SIGINT", "SIGPIPE", "SIGHUP")
        if hasattr(signal, name)  # Windows has neither SIGPIPE nor SIGHUP
    )

    def __init__(self, env):
        self.env = env
        self.signum = 0
        self.deferred = False  # whether a signal waits for the run to save

    def __enter__(self):
        # nohup starts a run with SIGHUP ignored: it is meant to outlive its terminal
        nohup = hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signals = [s for s in self.SIGNALS if not (nohup and s == signal.SIGHUP)]
        self.previous = {s: signal.signal(s, self._handler) for s in signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferred:
            raise StopNow(signum, f"stopped by {name} before the first step: nothing to save")
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise StopNow(signum, "stopped at once by a second Ctrl-C, without saving")
        self.signum = signum

    def defer(self):
        """From now on a signal waits for the run to save its state."""
        self.deferred = True

    def requested(self):
        """The signal every rank agrees to stop for, or 0. Under DDP a collective (on the CPU
        group): every rank calls it at the same points."""
        signum = self.signum
        if self.env.distributed:
            flag = torch.tensor(signum)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.env.cpu_group)
            signum = int(flag)
        return signum


def rendezvous_store():
    """How the processes of a run find each other (init_process_group's store, rank and
    world_size): for one process, a store in its own memory; under torchrun, its agent's store,
    with the keys of this attempt apart from those of the attempts before it. A group that
    torchrun restarts (--max-restarts) would otherwise read its peers' old addresses, and hang."""
    if "RANK" not in os.environ:
        return dict(store=dist.HashStore(), rank=0, world_size=1)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agents = dist.TCPStore(address, port, world_size, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(
        store=dist.PrefixStore(f"attempt_{attempt}", agents), rank=rank, world_size=world_size
    )


def agree(env, action):
    """Run action() on this rank, then agree with every rank on how it went: its result if it
    worked on all of them, else SystemExit on all of them with the message of the lowest rank
    that failed, printed once per node. A rank that acts alone on local state (a download, a
    file, a parse) thus never leaves the others waiting in a collective."""
    error, result = None, None
    try:
        result = action()
    except SystemExit as e:
        error = str(e.code)
    error = next((e for e in gather(env, error) if e is not None), None)
    if error is not None:
        raise SystemExit(error if env.local_rank == 0 else 1)
    return result


def gather(env, value):
    """Every rank's value, in rank order: on the CPU group, so no rank waits for a GPU."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value, group=env.cpu_group)
    return values


@contextlib.contextmanager
def exits_in_one_line(out_of_memory):
    """Around a run: what ends it early ends it in one line, as refused input does (status 1),
    or with 128 + the number of the signal that stopped it. A stop that cannot wait says why; a
    Ctrl-C before the run's own handlers are in place loses nothing; running out of memory (the
    host's, or a GPU's) says the line out_of_memory (after the allocator's first). Under
    torchrun every process of a node fails alike: only the node's first says why, the others
    exit with 1."""
    try:
        try:
            yield
        except StopNow as e:
            with contextlib.suppress(OSError):  # `2>&1 | head`, a closed terminal: stderr is gone
                print(e, file=sys.stderr, flush=True)
            raise SystemExit(128 + e.signum) from None
        except KeyboardInterrupt:
            stop_at_start_up()
        except Exception as e:
            if not devices.out_of_memory(e):
                raise
            raise SystemExit(f"out of memory ({first_line(e)}): {out_of_memory}") from None
    except SystemExit as e:
        if isinstance(e.code, str) and os.environ.get("LOCAL_RANK", "0") != "0":
            raise SystemExit(1) from None
        raise
