"""Inference plumbing (an appendix, not in the paper): whether two sets of detections agree.

Two runs of one model (compiled and eager, GPU and CPU, ONNX Runtime and PyTorch) never agree bit for
bit; what must agree is what they detect. `compare_detections` is the one test of that, used by
eval.py's compiled model, export.py's check and the GPU benchmarks.
"""
from typing import NamedTuple

import torch

from model import select_detections
from precision import at_least_float32


class Agreement(NamedTuple):
    matched: float  # the share of the reference's detections found in the other run
    score: float    # the largest score difference among the matched ones
    box: float      # the largest box coordinate difference among them, in units of the image's size


def compare_detections(got, want, sizes, tol: float) -> Agreement:
    """How far the detections `got` are from the reference `want`, both (scores (B, n), labels (B, n), boxes
    (B, n, 4) x1y1x2y2) as tensors or arrays, on images of `sizes` (B, 2) (height, width).

    A detection of `want` is matched by one of `got` with the same label, a score within `tol` and a box
    within `tol` of the image's size, one to one, wherever it ranks: rounding may order near-tied scores
    differently. Some may find no match at all: the model keeps num_queries of its encoder's tokens by
    score (mixed query selection), and where the last kept and the first left out are near-tied, two runs
    can keep different ones, whose detections then differ."""
    matched, total, worst_score, worst_box = 0, 0, 0.0, 0.0
    for b in range(len(sizes)):
        s1, l1, x1 = (torch.as_tensor(t[b]) for t in got)
        s2, l2, x2 = (torch.as_tensor(t[b]) for t in want)
        h, w = torch.as_tensor(sizes[b]).tolist()
        scale = torch.tensor([w, h, w, h], dtype=x2.dtype)
        box_gap = (x2[:, None] - x1[None]).abs().div(scale).amax(-1)  # (want, got)
        score_gap = (s2[:, None] - s1[None]).abs()
        close = (l2[:, None] == l1[None]) & (box_gap <= tol) & (score_gap <= tol)
        free = torch.ones(len(s1), dtype=torch.bool)
        for i in range(len(s2)):
            candidates = (close[i] & free).nonzero().flatten()
            if len(candidates):
                j = candidates[score_gap[i, candidates].argmin()]
                free[j] = False
                matched += 1
                worst_score, worst_box = max(worst_score, score_gap[i, j].item()), max(worst_box, box_gap[i, j].item())
        total += len(s2)
    return Agreement(matched / max(total, 1), worst_score, worst_box)


@torch.no_grad()
def output_agreement(outputs: dict, reference: dict, top: int = 100, tol: float = 1e-2) -> Agreement:
    """compare_detections on two model outputs for the same batch ("pred_logits", "pred_boxes"): the
    reference's `top` best (query, class) pairs per image, boxes in units of the image."""
    def best(out):
        logits, boxes = at_least_float32(out["pred_logits"]), at_least_float32(out["pred_boxes"])
        sizes = torch.ones(len(logits), 2, dtype=boxes.dtype, device=boxes.device)
        return tuple(t.cpu() for t in select_detections(logits, boxes, sizes, top))
    return compare_detections(best(outputs), best(reference), torch.ones(len(reference["pred_logits"]), 2), tol)
