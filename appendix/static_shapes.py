"""Appendix to train.py: a training batch in fixed shapes, for a compiled training step (train.py --compile).

torch.compile makes one program per shape of its inputs; a training batch varies in three ways, each
fixed here so that a run compiles a handful of programs, not one per batch:
- the objects per image: the targets become padded tensors (`PaddedTargets`), G slots per image with
  a mask of the real ones. G is the batch's largest object count rounded up to a power of two (at
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
from typing import NamedTuple

import torch
from torch import Tensor

MIN_SLOTS = 8
SIZE_STEP = 128  # pixels at scale 1: bench/size_buckets.py
PROGRAMS = 256  # compiled programs allowed per function: image sizes x target slot counts (dynamo allows 8)


class PaddedTargets(NamedTuple):
    labels: Tensor  # (B, G) int64 class ids; 0 in padding slots
    boxes: Tensor   # (B, G, 4) cxcywh in [0, 1]; (0.5, 0.5, 1, 1) in padding slots, a box with an area
    valid: Tensor   # (B, G) bool, True on the image's objects (the first G_b slots)


def target_slots(largest: int, compiled: bool) -> int:
    """G for a batch whose most crowded image has `largest` objects."""
    if not compiled:
        return max(largest, 1)
    return max(MIN_SLOTS, 2 ** math.ceil(math.log2(max(largest, 1))))


def pad_targets(targets: list[dict], slots: int) -> PaddedTargets:
    """targets [{"labels": (G_b,), "boxes": (G_b, 4)}] * B, on one device -> PaddedTargets of G = slots."""
    device = targets[0]["labels"].device
    dtype = targets[0]["boxes"].dtype
    B = len(targets)
    labels = torch.zeros(B, slots, dtype=torch.int64, device=device)
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=dtype, device=device).repeat(B, slots, 1)
    valid = torch.zeros(B, slots, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :n], boxes[b, :n], valid[b, :n] = t["labels"], t["boxes"], True
    return PaddedTargets(labels, boxes, valid)


def bucket_step(scale: float, pixels: int = SIZE_STEP) -> int:
    """The multiple of pixels that a compiled run pads each side of its batches to: `pixels` at scale 1, a
    multiple of 32 (the backbone's stride: every level then has whole cells)."""
    return max(32, 32 * round(pixels * scale / 32))


def compiled(function):
    """torch.compile for fixed shapes: one program per shape of the inputs, up to PROGRAMS of them."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, PROGRAMS)
    return torch.compile(function, dynamic=False)
