"""Multi-scale deformable attention at DINO-4scale shapes: the CUDA kernel against the reference.

Shapes of one 800x1333 image: levels 100x167, 50x84, 25x42, 13x21 (S = 22,223 tokens), 8 heads of
32 channels, 4 levels x 4 points. Encoder: Q = S; decoder: Q = 900 matching + 200 denoising queries.
For each case it prints the time of the forward and of forward + backward, the achieved bandwidth
(minimum bytes moved / time) and the floor: those minimum bytes at the peak bandwidth measured here
with a device-to-device copy. Minimum bytes: forward reads value, locations and weights once and
writes the output; backward reads those and the output gradient and writes the three gradients.

Usage: python bench/msda.py [--iters 50]       (needs a CUDA GPU)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import msda_cuda  # noqa: E402
from msda_cuda import level_start_index_of, ms_deform_attn, ms_deform_attn_reference  # noqa: E402

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
M, D, P = 8, 32, 4


def cuda_time(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (ms / 1e3)


def inputs(B: int, Q: int, dtype: torch.dtype):
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.long, device="cuda")
    level_start_index = level_start_index_of(spatial_shapes)
    S, L = int(spatial_shapes.prod(1).sum()), len(LEVELS)
    value = torch.randn(B, S, M, D, device="cuda", dtype=dtype, requires_grad=True)
    locations = torch.rand(B, Q, M, L, P, 2, device="cuda", requires_grad=True)  # float32, as the model gives them
    weights = torch.rand(B, Q, M, L, P, device="cuda").softmax(-1).requires_grad_()
    return value, spatial_shapes, level_start_index, locations, weights


def minimum_bytes(value, locations, weights, backward: bool) -> int:
    B, Q = locations.shape[:2]
    out = B * Q * M * D * value.element_size()
    read = value.numel() * value.element_size() + locations.numel() * 4 + weights.numel() * 4
    if not backward:
        return read + out
    return 2 * read + out  # reads the inputs and grad_output; writes the three gradients (the inputs' sizes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/msda.py needs a CUDA GPU")
    if msda_cuda._kernel() is None:  # ms_deform_attn would time the reference twice
        sys.exit(f"bench/msda.py: the kernel did not build ({msda_cuda._build_error})")
    peak = peak_bandwidth()
    S = sum(h * w for h, w in LEVELS)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {peak / 1e12:.2f} TB/s")
    print(f"{'case':28s} {'impl':9s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'floor ms':>9s} {'x floor':>8s} "
          f"{'fwd+bwd ms':>11s} {'bwd floor':>10s} {'x floor':>8s} {'speed-up':>9s}")
    for name, Q in (("encoder", S), ("decoder", 1100)):
        for B in (1, 2):
            for dtype in (torch.float32, torch.bfloat16):
                value, ss, lsi, loc, w = inputs(B, Q, dtype)
                grad = torch.randn(B, Q, M * D, device="cuda", dtype=dtype)
                fwd_bytes, bwd_bytes = minimum_bytes(value, loc, w, False), minimum_bytes(value, loc, w, True)
                results = {}
                for impl, fn in (("kernel", ms_deform_attn), ("reference", ms_deform_attn_reference)):
                    def forward():
                        with torch.no_grad():
                            fn(value, ss, lsi, loc, w)

                    def forward_backward():  # autograd.grad: no accumulation into .grad timed along
                        torch.autograd.grad(fn(value, ss, lsi, loc, w), (value, loc, w), grad)
                    results[impl] = (cuda_time(forward, args.iters), cuda_time(forward_backward, args.iters))
                for impl, (fwd, both) in results.items():
                    case = f"{name} B={B} {str(dtype)[6:]}"
                    speedup = results["reference"][1] / both
                    print(f"{case:28s} {impl:9s} {fwd:8.3f} {fwd_bytes / fwd / 1e6:9.0f} "
                          f"{fwd_bytes / peak * 1e3:9.3f} {fwd / (fwd_bytes / peak * 1e3):8.1f} "
                          f"{both:11.3f} {bwd_bytes / peak * 1e3:10.3f} {(both - fwd) / (bwd_bytes / peak * 1e3):8.1f} "
                          f"{speedup:9.1f}")


if __name__ == "__main__":
    main()
