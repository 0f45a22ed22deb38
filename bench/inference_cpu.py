"""Eval-mode inference latency of DINO-4scale on the CPU, end to end (image tensor to boxes), as it ran before
the CPU work of issue 13 and as it runs now, with each change on its own in between:
  before               the attention through the PyTorch reference, the backbone on NCHW tensors, glibc's malloc as is
  + CPU kernel         the attention through the CPU kernel (msda_cuda)
  + channels-last      the ResNet on channels-last tensors (backbone.py)
  + heap kept (now)    malloc keeps the memory freed during the forward (cpu_memory.heap_kept, as eval.py runs)
  now + bf16 (--amp)   the same under eval.py's --amp (bf16 autocast), where the CPU has bf16 instructions

Usage: python bench/inference_cpu.py [--backbone r50] [--size 800 1333] [--pairs 3] [--threads N]
After one warm-up of each, the variants run in turn (before, + CPU kernel, ..., before, ...), and it prints
each one's median time, the median of the per-round ratios before / variant, and how much of each time is
the backbone with the input projections. The model has random weights: each line says how many of the
"before" run's 100 best detections it keeps (same label, IoU >= 0.9), a measure of how far the variant
moves the query selection, not of accuracy (eval.py --amp on trained weights measures that).
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
from backbone import ResNet  # noqa: E402
from appendix.cpu_memory import heap_kept  # noqa: E402
from model import build_dino, postprocess  # noqa: E402
from appendix.precision import amp_autocast  # noqa: E402


@contextlib.contextmanager
def nchw_backbone(model, on: bool):
    """Within, if `on`: the ResNet's stages run on the NCHW images as they come, as before backbone.py made
    them channels-last on the CPU."""
    resnet = model.backbone
    if on and isinstance(resnet, ResNet):
        resnet.forward = resnet.stages
    try:
        yield
    finally:
        resnet.__dict__.pop("forward", None)


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
    variants = {  # name: (attention, channels-last ResNet, heap kept, bf16)
        "before": ("reference", False, False, False),
        "+ CPU kernel": ("kernel", False, False, False),
        "+ channels-last": ("kernel", True, False, False),
        "+ heap kept (now)": ("kernel", True, True, False),
    }
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        variants["now + bf16 (--amp)"] = ("kernel", True, True, True)

    def run(name):
        implementation, channels_last, kept_heap, amp = variants[name]
        with attention(implementation), nchw_backbone(model, not channels_last), torch.inference_mode():
            start = time.perf_counter()
            with amp_autocast(images.device, amp), heap_kept(images.device) if kept_heap else contextlib.nullcontext():
                srcs, masks = model.multi_scale_features(images, mask)
                middle = time.perf_counter()
                detections = postprocess(model.detect_from_features(srcs, masks), [(H, W)])[0]
            return time.perf_counter() - start, middle - start, detections  # heap_kept's trim included

    first = {name: run(name)[2] for name in variants}  # warm-up (and the kernel's build)
    times, backbone = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(args.pairs):
        for name in variants:
            seconds, features, _ = run(name)
            times[name].append(seconds)
            backbone[name].append(features)
    print(f"DINO-4scale {args.backbone} {H}x{W}, batch 1, {args.threads} CPU threads, torch {torch.__version__}; "
          f"median of {args.pairs} rounds")
    for name in variants:
        ratio = statistics.median(b / t for b, t in zip(times["before"], times[name]))
        line = (f"  {name:20s} {statistics.median(times[name]):6.2f} s/image (backbone + input projections "
                f"{statistics.median(backbone[name]):5.2f} s)   {ratio:4.2f}x the speed before")
        if name != "before":
            line += f"   keeps {100 * kept(first[name], first['before']):.0f}% of its 100 best detections"
        print(line)


if __name__ == "__main__":
    main()
