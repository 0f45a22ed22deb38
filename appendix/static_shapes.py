"""Appendix to train.py: a training batch in fixed shapes, for a compiled training step (train.py --compile).

torch.compile makes one program per shape of its inputs; a training batch varies in three ways, each
fixed here so that a run compiles a handful of programs, not one per batch:
- the objects per image: the targets become padded tensors (denoising.PaddedTargets), G slots per image
  with a mask of the real ones. G is the batch's largest object count rounded up to a power of two (at
  least 8) under --compile, and exactly that count (at least 1) otherwise;
- the denoising queries: always 2 * max(dn_number, G) of them (denoising.py), the slots beyond the
  batch's groups unused;
- the image size: batches are padded up to a multiple of `SIZE_STEP` pixels (times --scale) on each
  side (`bucket_step`, data.collate), the step chosen by bench/size_buckets.py's measure of padding against
  the number of sizes.
Eager training uses the same code with the tightest shapes, so the compiled step computes what the
eager one does.
"""
import math

import torch

from config import Config
from losses import Criterion

MIN_SLOTS = 8
SIZE_STEP = 128  # pixels at scale 1: bench/size_buckets.py
PROGRAMS = 256  # compiled programs allowed per function: image sizes x target slot counts (dynamo allows 8)


def target_slots(largest: int, compiled: bool) -> int:
    """G for a batch whose most crowded image has `largest` objects: that count (at least 1) eagerly, a power
    of two (at least MIN_SLOTS) under --compile, so that a run compiles a handful of programs."""
    if not compiled:
        return max(largest, 1)
    return max(MIN_SLOTS, 2 ** math.ceil(math.log2(max(largest, 1))))


def bucket_step(scale: float, pixels: int = SIZE_STEP) -> int:
    """The multiple of pixels that a compiled run pads each side of its batches to: `pixels` at scale 1, a
    multiple of 32 (the backbone's stride: every level then has whole cells)."""
    return max(32, 32 * round(pixels * scale / 32))


def compiled(function):
    """torch.compile for fixed shapes: one program per shape of the inputs, up to PROGRAMS of them."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, PROGRAMS)
    return torch.compile(function, dynamic=False)


def criterion_for(cfg: Config) -> Criterion:
    """The criterion of a run: under --compile, its costs and terms computed by compiled programs."""
    return Criterion(cfg, compiled if cfg.compile else None)
