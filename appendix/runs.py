"""Plumbing for runs that last days (not in the paper): one run per output folder, everything a run needs
to go on exactly where it stopped (TrainState, the one place a checkpoint's contents are written and read),
an epoch order that a run can resume anywhere in, and stopping in order on SIGTERM and Ctrl-C.

`claim_output_dir` takes an exclusive lock on OUTPUT_DIR/.lock with flock(2). A second run into the
same folder is refused while the lock is held; the operating system releases it when the holding
process ends, however it ends (Ctrl-C, SIGTERM, kill -9, a crash), so a dead run never leaves a false
claim behind and no stale-lock cleaning is needed. The file holds the holder's pid and host, for the
refusal's message. (Where flock does not exist, on Windows, runs are not locked.)
"""
import contextlib
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


_held_locks = []  # the lock files this process holds open


def claim_output_dir(folder: Path):
    """Create `folder` and lock it for this process; returns the open lock file: the lock lasts until it is
    closed (it is a context manager) or the process ends. Raises ConfigError if another run holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+")
    except OSError as e:  # a read-only place, a path through a file, ...
        raise ConfigError(f"--output-dir {folder}: cannot write there ({e.strerror or e})") from None
    if fcntl is None:
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"--output-dir {folder} is in use by a run that is still going ({holder}): wait for "
                          f"it to end, or choose another --output-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _held_locks.append(lock)
    return lock


class WriteError(ConfigError):
    """A file a run writes could not be written (a full disk, no permission); the previous one is kept."""


def replace_atomically(path: Path, write) -> None:
    """write(temporary path) beside `path`, then rename it to `path`: a kill at any instant leaves either the
    old file or the new one, never a part of one. A write that fails (a full disk) removes its temporary
    file and raises WriteError, one line naming the file; the old file stays as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise WriteError(f"cannot write {path}: {e.strerror or e}{kept}") from None
    except BaseException:  # the writer's own error (a video that stops decoding), Ctrl-C: no half file left
        tmp.unlink(missing_ok=True)
        raise


def save_atomically(obj, path: Path) -> None:
    def save(tmp: Path):
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer raises its own error while handling a failed write's
                if isinstance(e.__context__, OSError):  # ("unexpected pos ..."): the OSError says what happened
                    raise e.__context__ from None
                raise
    replace_atomically(path, save)


def write_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


EMA_WARMED_UP = 2 ** 40  # an EMA step count at which train.make_ema's warm-up is long over


@dataclass
class TrainState:
    """What a run changes as it trains, all of which a checkpoint holds: the weights, the optimiser, the lr
    schedule, the loss scaler, the EMA of the weights (and the steps it has averaged), where training goes
    on (`epoch`, and `iteration` of it: the next one to run), the best AP so far and the evaluations since
    it (--patience), the epoch's running loss sums (`running`, {"sums", "counts"}, when it stopped
    mid-epoch), a finished epoch's log record whose evaluation is still owed (`pending`), and every
    process's random state. `contents` and `restore` are the checkpoint's one writer and one reader; its
    keys are those of the checkpoints train.py has always written (and "ema_updates")."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    epoch: int = 0
    iteration: int = 0
    best_ap: float = -1.0
    stale: int = 0  # evaluations since the best AP (--patience)
    running: dict | None = None
    pending: dict | None = None

    def contents(self, config: dict, categories: dict[int, str], is_main: bool) -> dict | None:
        """The checkpoint as a dict (rank 0; None in the other processes). Every process calls it: it gathers
        their random states."""
        rng = [rng_state()]
        if dist.is_available() and dist.is_initialized():
            rng = [None] * dist.get_world_size()
            dist.all_gather_object(rng, rng_state())
        if not is_main:
            return None
        return {
            "model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "config": config, "categories": categories, "rng": rng,
            "best_ap": self.best_ap, "stale": self.stale, "next": (self.epoch, self.iteration), "partial": self.running,
            "pending": self.pending, "ema_updates": self.ema.n_averaged.item() if self.ema is not None else None,
            "epoch": self.epoch if self.iteration else self.epoch - 1,  # the epoch of the last iteration run
        }

    def restore(self, checkpoint: dict, rank: int) -> None:
        """Load a checkpoint that `save` wrote (or train.py before it: "next" is newer than "epoch")."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
            # the steps averaged so far, which the decay's warm-up reads (train.make_ema); checkpoints from
            # before the warm-up have none: their average goes on with the constant decay it had
            self.ema.n_averaged.fill_(checkpoint.get("ema_updates") or EMA_WARMED_UP)
        self.epoch, self.iteration = checkpoint.get("next", (checkpoint["epoch"] + 1, 0))
        self.running, self.pending = checkpoint.get("partial"), checkpoint.get("pending")
        self.best_ap, self.stale = checkpoint["best_ap"], checkpoint.get("stale", 0)  # (older checkpoints: no "stale")
        rng = checkpoint["rng"]
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])


def writable(path: Path, flag: str) -> Path:
    """`path`, a file a run will write, checked before any work: its folder is created if need be, and a
    ConfigError naming `flag` says why it cannot be written there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a path through a file, a read-only place
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file name")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write there (no permission in {path.parent})")
    return path


class EpochOrder(torch.utils.data.Sampler):
    """The training samples of one epoch, from the `skip`-th on, each as (index, augmentation seed).

    The order depends on the seed and the epoch alone: a random permutation, and under torch.distributed
    this process's share of it, split as DistributedSampler splits (padded by repeating, then every
    world-th). Each sample's augmentation seed depends on the seed, the epoch and the index alone
    (data.CocoDetection draws the sample's augmentation from it), so a run resumed at any iteration
    sees exactly the batches of one that never stopped, whatever the number of data workers.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.size, self.seed, self.epoch, self.rank, self.world, self.skip = size, seed, epoch, rank, world, skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = math.ceil(self.size / self.world) * self.world
        order = (order * math.ceil(total / max(self.size, 1)))[:total][self.rank::self.world]
        for index in order[self.skip:]:
            yield index, (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index

    def __len__(self) -> int:
        return max(math.ceil(self.size / self.world) - self.skip, 0)


def data_worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: a stop signal, however it is sent, reaches the main process, which stops the
    run in order (StopSignals); a worker killed by it would crash the loader, at a different step in each
    process, with nothing saved.

    A worker moves to a process group of its own, so that a signal to the run's group (Ctrl-C in a terminal;
    `kill -- -PGID`) reaches only the main process; it ignores SIGINT; and a thread of its own waits for
    SIGTERM (blocked since the worker was forked: runs.signals_held) and passes it on to the main process
    (scancel and other batch schedulers signal every process of a job; an operator may signal a worker),
    unless the main process sent it (the DataLoader ending a worker that did not stop by itself): then
    the worker ends. A forked worker also closes its copy of the output folder's lock, so that the lock
    ends with the run, not with its last worker."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    for lock in _held_locks:
        lock.close()
    if hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_pass_sigterm_on, args=(os.getppid(),), daemon=True).start()


def _pass_sigterm_on(main_process: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == main_process:
            os._exit(128 + signal.SIGTERM)
        os.kill(main_process, signal.SIGTERM)


@contextlib.contextmanager
def signals_held():
    """SIGTERM and SIGINT held back (pending) for the length of the block, then delivered: data workers
    started inside it are forked with them blocked, so none can die of one before data_worker_init runs."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) for the length of a run: the first asks it to stop after the current step
    (`received` holds it; train.py then writes a checkpoint and exits); a second SIGINT aborts at once.
    Outside the main thread (where Python cannot take signals) it takes nothing over."""

    def __init__(self, log=print):
        self.received, self.log, self.previous = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                print("aborted by a second Ctrl-C: what was trained since the last checkpoint is lost",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        self.received = signum
        self.log(f"{signal.Signals(signum).name}: stopping after this step, once the checkpoint is written "
                 f"(Ctrl-C again aborts at once)")


class Stopped(Exception):
    """The run stopped on a signal, its checkpoint written; the message says where and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointClock:
    """When to write a checkpoint mid-epoch: every `minutes` (0: never), and at once when a stop signal
    came. Every process must agree, since writing one gathers every process's random state: under
    torch.distributed each step ends with one small all_reduce of both questions."""

    def __init__(self, minutes: float, signals: StopSignals, device: torch.device):
        self.minutes, self.signals, self.device = minutes, signals, device
        self.last = time.monotonic()

    def due(self) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after it), the same in every process."""
        stop = self.signals.received is not None
        timed = self.minutes > 0 and time.monotonic() - self.last >= 60 * self.minutes
        if dist.is_available() and dist.is_initialized():
            flags = torch.tensor([stop, timed], dtype=torch.float32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, timed = (bool(v) for v in flags.tolist())
        return stop or timed, stop

    def written(self):
        self.last = time.monotonic()

    def stopped(self, where: str) -> "Stopped":
        """The Stopped to raise once the checkpoint of a stop is written (in a process that did not receive
        the signal itself, another one did)."""
        received = self.signals.received
        name = signal.Signals(received).name if received is not None else "a signal to another process"
        return Stopped(f"stopped by {name} {where}", received or signal.SIGTERM)
