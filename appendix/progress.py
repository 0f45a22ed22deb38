"""Progress of a training run (not in the paper): the running means of the loss terms, the progress line,
and TensorBoard, an optional dependency (--tensorboard: a one-line error before any work where it is missing).
"""
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from config import ConfigError


class RunningLoss:
    """An epoch's sums of every unweighted loss term so far, kept where they are computed (reading them back
    would wait for the GPU at every step); `saved()` gives them as floats for a mid-epoch checkpoint."""

    def __init__(self, saved: dict | None = None):
        self.sums = dict(saved["sums"]) if saved else {}
        self.counts = dict(saved["counts"]) if saved else {}

    def add(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach()
            self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, name: str) -> float:
        return float(self.sums[name] / self.counts[name])

    def saved(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def epoch_means(self, device: torch.device) -> dict[str, float]:
        """The mean of every term, over all processes under torch.distributed (the log holds theirs, not
        rank 0's alone)."""
        names = sorted(self.sums)
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device) / self.counts[k]
                             for k in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        return dict(zip(names, means.tolist()))


def report(setup, state, losses: RunningLoss, rate: float, board) -> None:
    """The progress line (and TensorBoard's running means): iteration state.iteration of the epoch done."""
    total, done, lr = setup.iterations, state.iteration, state.optimizer.param_groups[0]["lr"]
    if board is not None:
        step = state.epoch * total + done
        for name in losses.sums:
            board.add_scalar(f"train/{name}", losses.mean(name), step)
        board.add_scalar("train/lr", lr, step)
        board.add_scalar("train/iterations_per_second", rate, step)
    left = (total - done + (setup.cfg.epochs - state.epoch - 1) * total) / rate
    print(f"epoch {state.epoch} [{done}/{total}] loss {losses.mean('loss'):.3f} (ce {losses.mean('loss_ce'):.3f} "
          f"bbox {losses.mean('loss_bbox'):.3f} giou {losses.mean('loss_giou'):.3f}) lr {lr:.2e} {rate:.2f} it/s, "
          f"epoch ends in {(total - done) / rate:.0f} s, training in {left / 3600:.1f} h", flush=True)


def tensorboard_writer(folder: Path | None):
    """TensorBoard's SummaryWriter for `folder` (None: only check that it can be had). TensorBoard is an
    optional dependency: without it, --tensorboard is a one-line error before any work."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs TensorBoard: pip install tensorboard") from None
    return SummaryWriter(str(folder)) if folder is not None else None


def epoch_to_board(board, losses: dict[str, float], metrics: dict[str, float], step: int) -> None:
    """TensorBoard: the epoch's mean losses and its metrics (none if it was not evaluated), at the step it ended."""
    for name, value in losses.items():
        board.add_scalar(f"epoch/{name}", value, step)
    for name, value in metrics.items():
        board.add_scalar(f"val/{name}", value, step)


def with_progress(items, every: float, line) -> Iterator:
    """`items`, one by one, with a progress line `line(done, seconds so far)` printed at most every `every`
    seconds (long validation sets, videos)."""
    start = last_print = time.time()
    for done, item in enumerate(items):
        if done and time.time() - last_print > every:
            last_print = time.time()
            print(line(done, last_print - start), flush=True)
        yield item


def evaluating_line(total: int):
    return lambda done, seconds: f"evaluating [{done}/{total}], {(total - done) * seconds / done:.0f} s left"
