"""Eval-mode inference latency of DINO-4scale on the CPU, end to end (image tensor to boxes).

Usage: python bench/inference_cpu.py [--backbone r50] [--size 800 1333] [--runs 3] [--threads N]
Prints the median over --runs timed runs (after one warm-up) of the whole forward plus
post-processing, and how it splits between the backbone + input projections and the rest.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import build_dino, postprocess  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_dino(args.backbone).eval()
    H, W = args.size
    images = torch.randn(1, 3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.bool)

    totals, features = [], []
    with torch.inference_mode():
        for run in range(args.runs + 1):
            start = time.perf_counter()
            srcs, masks = model.multi_scale_features(images, mask)
            mid = time.perf_counter()
            postprocess(model.detect_from_features(srcs, masks), [(H, W)])
            end = time.perf_counter()
            if run:  # the first run warms up
                totals.append(end - start)
                features.append(mid - start)
    total, feat = statistics.median(totals), statistics.median(features)
    print(f"DINO-4scale {args.backbone} {H}x{W}, batch 1, float32, {args.threads} CPU threads, torch {torch.__version__}")
    print(f"  end to end: {total:.2f} s/image (median of {args.runs}; runs {', '.join(f'{t:.2f}' for t in totals)})")
    print(f"  backbone + input projections: {feat:.2f} s, encoder + query selection + decoder + heads: {total - feat:.2f} s")


if __name__ == "__main__":
    main()
