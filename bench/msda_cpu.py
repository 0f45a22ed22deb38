"""Multi-scale deformable attention on the CPU: the C++ kernel against the PyTorch reference, at DINO-4scale
shapes of one 800x1333 image (encoder: Q = S = 22,223 queries; decoder: 900 + 200 queries), float32, batch 1.

Two kinds of sampling locations: uniform over each level (as bench/msda.py: every sample a cache miss), and
local, as the model samples: around each query's reference point (its own pixel in the encoder, a random
point in the decoder), a few pixels away (normal, 3 pixels on each level).

Usage: python bench/msda_cpu.py [--pairs 5] [--threads N]
Each case runs kernel, reference, kernel, reference, ... (one warm-up of each first) and prints the median
of the pairwise ratios reference / kernel, for the forward and for forward + backward.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import msda_cuda  # noqa: E402
from deformable_attn import ms_deform_attn_reference  # noqa: E402
from msda import LEVELS, inputs  # noqa: E402


ENCODER_QUERIES = sum(h * w for h, w in LEVELS)


def local_locations(shape, encoder: bool) -> torch.Tensor:
    """(1, Q, M, L, P, 2) locations: a reference point per query plus 3-pixel normal offsets on each level."""
    _, Q, M, L, P, _ = shape
    if encoder:  # every token's pixel centre, level after level
        reference = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                          indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
    else:
        reference = torch.rand(Q, 2)
    pixel = 1 / torch.tensor(LEVELS).flip(-1).view(1, 1, 1, L, 1, 2)  # (x, y) size of a pixel per level
    return reference.view(1, Q, 1, 1, 1, 2) + 3 * pixel * torch.randn(shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extension = msda_cuda._cpu_kernel()
    if extension is None:
        sys.exit(f"bench/msda_cpu.py: the CPU kernel did not build ({msda_cuda._build_errors.get('CPU')})")
    kernel = lambda *a: msda_cuda._MSDeformAttnFunction.apply(extension, *a)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}; times in ms, kernel / reference")
    for name, Q, where in (("encoder", ENCODER_QUERIES, "uniform"), ("decoder", 1100, "uniform"),
                           ("encoder", ENCODER_QUERIES, "local"), ("decoder", 1100, "local")):
        value, ss, lsi, loc, w = inputs(1, Q, torch.float32, LEVELS, torch.device("cpu"))
        if where == "local":
            loc = local_locations(loc.shape, encoder=name == "encoder").requires_grad_()
        grad = torch.randn(1, Q, value.shape[2] * value.shape[3])
        for what in ("forward", "forward + backward"):
            def run(fn):
                if what == "forward":
                    with torch.no_grad():
                        fn(value, ss, lsi, loc, w)
                else:
                    torch.autograd.grad(fn(value, ss, lsi, loc, w), (value, loc, w), grad)
            times = {"kernel": [], "reference": []}
            run(kernel), run(ms_deform_attn_reference)
            for _ in range(args.pairs):
                for impl, fn in (("kernel", kernel), ("reference", ms_deform_attn_reference)):
                    start = time.perf_counter()
                    run(fn)
                    times[impl].append(1e3 * (time.perf_counter() - start))
            ratio = statistics.median(r / k for k, r in zip(times["kernel"], times["reference"]))
            print(f"  {name:8s} {where:8s} {what:19s} {statistics.median(times['kernel']):9.1f} / "
                  f"{statistics.median(times['reference']):9.1f}   kernel {ratio:5.1f}x as fast", flush=True)


if __name__ == "__main__":
    main()
