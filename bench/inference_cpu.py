"""Eval-mode inference latency of DINO-4scale on the CPU, end to end (image tensor to boxes): the attention
through the CPU kernel against the PyTorch reference (what every CPU run used before the kernel), and the
kernel under eval.py's --amp (bf16 autocast) where the CPU has bf16 instructions.

Usage: python bench/inference_cpu.py [--backbone r50] [--size 800 1333] [--pairs 3] [--threads N]
After one warm-up of each, the variants run in turn (reference, kernel, kernel + bf16, reference, ...), and
it prints each one's median time, the median of the per-round ratios reference / variant, and how much of
the float32 time is the backbone with the input projections. The model has random weights: the bf16 line
says how many of the float32 run's 100 best detections it keeps (same label, IoU >= 0.9), a measure of how
far bf16 moves the query selection, not of accuracy (eval.py --amp on trained weights measures that).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import build_dino, postprocess  # noqa: E402
from precision import amp_autocast  # noqa: E402


@contextlib.contextmanager
def attention(implementation: str):
    """DINO_MSDA=reference for the reference, unset for the kernel (msda_cuda reads it on every call)."""
    before = os.environ.pop("DINO_MSDA", None)
    if implementation == "reference":
        os.environ["DINO_MSDA"] = "reference"
    try:
        yield
    finally:
        os.environ.pop("DINO_MSDA", None)
        if before is not None:
            os.environ["DINO_MSDA"] = before


def kept(detections: dict, reference: dict, top: int = 100) -> float:
    """The share of reference's `top` best detections that detections also has (same label, IoU >= 0.9)."""
    want = reference["scores"].argsort(descending=True)[:top]
    got = detections["scores"].argsort(descending=True)[:top]
    iou = box_iou(reference["boxes"][want], detections["boxes"][got])
    same = reference["labels"][want, None] == detections["labels"][None, got]
    return ((iou >= 0.9) & same).any(1).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--pairs", type=int, default=3, help="timed rounds of all variants")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_dino(args.backbone).eval()
    H, W = args.size
    images = torch.randn(1, 3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    variants = {"reference": ("reference", False), "kernel": ("kernel", False)}
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        variants["kernel + bf16 (--amp)"] = ("kernel", True)

    def run(name):
        implementation, amp = variants[name]
        with attention(implementation), torch.inference_mode(), amp_autocast(images.device, amp):
            start = time.perf_counter()
            srcs, masks = model.multi_scale_features(images, mask)
            middle = time.perf_counter()
            detections = postprocess(model.detect_from_features(srcs, masks), [(H, W)])[0]
            return time.perf_counter() - start, middle - start, detections

    first = {name: run(name)[2] for name in variants}  # warm-up (and the kernel's build)
    times, backbone = {name: [] for name in variants}, []
    for _ in range(args.pairs):
        for name in variants:
            seconds, features, _ = run(name)
            times[name].append(seconds)
            if name == "kernel":
                backbone.append(features)
    print(f"DINO-4scale {args.backbone} {H}x{W}, batch 1, {args.threads} CPU threads, torch {torch.__version__}; "
          f"median of {args.pairs} rounds")
    for name in variants:
        ratio = statistics.median(r / t for r, t in zip(times["reference"], times[name]))
        line = f"  {name:22s} {statistics.median(times[name]):6.2f} s/image   {ratio:4.2f}x the reference's speed"
        if name != "reference":
            line += f"   keeps {100 * kept(first[name], first['reference']):.0f}% of its 100 best detections"
        print(line)
    print(f"  kernel, float32: backbone + input projections {statistics.median(backbone):.2f} s of "
          f"{statistics.median(times['kernel']):.2f} s")


if __name__ == "__main__":
    main()
