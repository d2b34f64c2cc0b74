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
import socket
import sys
import threading
import time

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

    def __init__(self, env, saved=lambda: "no checkpoint was saved"):
        self.env, self.saved = env, saved  # saved(): what a stop leaves, checkpoints.last_saved
        self.signum = 0
        self.deferred = False  # whether a signal waits for the run to save
        self.agreed = threading.Event()
        self.watch = None

    def __enter__(self):
        # nohup starts a run with SIGHUP ignored: it is meant to outlive its terminal
        nohup = hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signals = [s for s in self.SIGNALS if not (nohup and s == signal.SIGHUP)]
        self.previous = {s: signal.signal(s, self._handler) for s in signals}
        if self.env.distributed and self.env.world_size > 1 and "MASTER_ADDR" in os.environ:
            self.watch = StallWatch(self.env, self.agreed, self.stop_unagreed)
        return self

    def __exit__(self, kind, error, traceback):
        if self.watch is not None:
            self.watch.close()
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.env.distributed and lost_a_peer(error):
            raise SystemExit(
                f"rank {self.env.rank}: a collective failed, another rank is gone "
                f"({peer_error(error)}); {self.saved()}"
            )

    def stop_unagreed(self, signum, silent):
        """A stop request the ranks have not agreed on in STOP_AGREE_SECONDS while ranks `silent`
        do not answer (stopped, or their machine gone): the agreement would wait in a collective
        until its timeout, minutes, past a preemption's grace time. End this rank now."""
        ranks = ", ".join(map(str, silent))
        print(
            f"rank {self.env.rank}: stopped by {signal.Signals(signum).name} without saving: "
            f"rank {ranks} does not answer, so no step can be agreed on; {self.saved()}",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(128 + signum)

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
        if signum:
            self.agreed.set()
        return signum


def lost_a_peer(error):
    """Whether an error is a collective's whose peer has gone: NCCL's errors are
    DistBackendError, gloo's a RuntimeError of its transport (connection reset or closed)."""
    return isinstance(error, dist.DistBackendError) or (
        isinstance(error, RuntimeError) and "gloo/transport" in str(error)
    )


def peer_error(error):
    """The backend's own words, without its source location and advice."""
    text = first_line(error)
    return text.rsplit("] ", 1)[-1].split(". ")[0]


STOP_AGREE_SECONDS = 5.0  # a stop request not agreed on by then: are all the ranks there?
BEAT_SECONDS = 0.5


class StallWatch:
    """Whether every rank of a run still answers, kept outside its collectives: each rank's
    thread counts beats in torchrun's store (a connection of its own), and on a stop signal a
    second thread, woken at once by the signal itself (Python's wakeup fd, which needs no free
    main thread), looks for ranks whose count stands still. A rank stopped (SIGSTOP) or whose
    machine is gone beats no more; a rank that is only busy (a long step, compiling, saving)
    does. While all answer the stop waits for the ranks to agree, however long that takes."""

    def __init__(self, env, agreed, on_silent):
        self.world_size, self.agreed, self.on_silent = env.world_size, agreed, on_silent
        self.store = this_attempts_store(env.world_size, "/beats")  # a connection of its own
        self.key = f"rank_{env.rank}"
        self.closed = threading.Event()
        self.woken, wakeup = socket.socketpair()
        wakeup.setblocking(False)
        self.wakeup = wakeup
        signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
        for target in (self.beat, self.wait_for_signals):
            threading.Thread(target=target, daemon=True).start()

    def beat(self):
        while not self.closed.wait(BEAT_SECONDS):
            with contextlib.suppress(Exception):  # the store gone: the run is ending anyway
                self.store.add(self.key, 1)

    def beats(self):
        return [self.store.add(f"rank_{r}", 0) for r in range(self.world_size)]

    def silent_ranks(self):
        """The ranks whose beats stood still for a few beats."""
        before = self.beats()
        time.sleep(4 * BEAT_SECONDS)
        return [r for r, (a, b) in enumerate(zip(before, self.beats())) if a == b]

    def wait_for_signals(self):
        while data := self.woken.recv(64):
            stops = [s for s in data if s in StopSignal.SIGNALS]
            while stops and not self.agreed.wait(STOP_AGREE_SECONDS) and not self.closed.is_set():
                silent = self.silent_ranks()
                if silent and not self.agreed.is_set():
                    self.on_silent(stops[0], silent)

    def close(self):
        self.closed.set()
        signal.set_wakeup_fd(-1)
        self.wakeup.close()
        self.woken.shutdown(socket.SHUT_RDWR)


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
    return dict(store=this_attempts_store(world_size), rank=rank, world_size=world_size)


def this_attempts_store(world_size, name=""):
    """A new connection to the store at MASTER_ADDR:MASTER_PORT (torchrun's agent's, or rank 0's),
    its keys under those of this attempt of a job that torchrun may restart."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(address, port, world_size, is_master=False)
    return dist.PrefixStore(f"attempt_{attempt}{name}", client)


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
