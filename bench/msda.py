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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import msda_cuda  # noqa: E402
from deformable_attn import ms_deform_attn_reference  # noqa: E402
from msda_cuda import level_start_index_of, ms_deform_attn  # noqa: E402

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
M, D, P = 8, 32, 4


def device_time(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn() over iters runs, after warm-up: CUDA events on a GPU, the host clock
    (after the work is done) elsewhere."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = device_time(lambda: y.copy_(x), 20, device)
    return 2 * x.numel() / (ms / 1e3)


def inputs(B: int, Q: int, dtype: torch.dtype, levels, device: torch.device):
    spatial_shapes = torch.tensor(levels, dtype=torch.long, device=device)
    level_start_index = level_start_index_of(spatial_shapes)
    S, L = int(spatial_shapes.prod(1).sum()), len(levels)
    value = torch.randn(B, S, M, D, device=device, dtype=dtype, requires_grad=True)
    locations = torch.rand(B, Q, M, L, P, 2, device=device, requires_grad=True)  # float32, as the model gives them
    weights = torch.rand(B, Q, M, L, P, device=device).softmax(-1).requires_grad_()
    return value, spatial_shapes, level_start_index, locations, weights


def minimum_bytes(value, locations, weights, backward: bool) -> int:
    B, Q = locations.shape[:2]
    out = B * Q * M * D * value.element_size()
    read = value.numel() * value.element_size() + locations.numel() * 4 + weights.numel() * 4
    if not backward:
        return read + out
    return 2 * read + out  # reads the inputs and grad_output; writes the three gradients (the inputs' sizes)


def measure(iters: int = 50, levels=LEVELS, decoder_queries: int = 1100, device: torch.device | str = "cuda",
            peak_megabytes: int = 512) -> tuple[float, list[dict]]:
    """(copy bandwidth in bytes/s, one row per case and implementation): times in ms, the floors, and
    the reference's forward + backward time over this one's ("speed-up")."""
    device = torch.device(device)
    peak = peak_bandwidth(device, peak_megabytes)
    rows = []
    for name, Q in (("encoder", sum(h * w for h, w in levels)), ("decoder", decoder_queries)):
        for B in (1, 2):
            for dtype in (torch.float32, torch.bfloat16):
                value, ss, lsi, loc, w = inputs(B, Q, dtype, levels, device)
                grad = torch.randn(B, Q, M * D, device=device, dtype=dtype)
                fwd_bytes, bwd_bytes = minimum_bytes(value, loc, w, False), minimum_bytes(value, loc, w, True)
                times = {}
                for impl, fn in (("kernel", ms_deform_attn), ("reference", ms_deform_attn_reference)):
                    def forward():
                        with torch.no_grad():
                            fn(value, ss, lsi, loc, w)

                    def forward_backward():  # autograd.grad: no accumulation into .grad timed along
                        torch.autograd.grad(fn(value, ss, lsi, loc, w), (value, loc, w), grad)
                    times[impl] = (device_time(forward, iters, device), device_time(forward_backward, iters, device))
                for impl, (fwd, both) in times.items():
                    rows.append(dict(case=f"{name} B={B} {str(dtype)[6:]}", impl=impl, fwd_ms=fwd,
                                     fwd_gbps=fwd_bytes / fwd / 1e6, fwd_floor_ms=fwd_bytes / peak * 1e3,
                                     both_ms=both, bwd_floor_ms=bwd_bytes / peak * 1e3,
                                     speedup=times["reference"][1] / both))
    return peak, rows


def format_rows(rows: list[dict]) -> list[str]:
    lines = [f"{'case':28s} {'impl':9s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'floor ms':>9s} {'x floor':>8s} "
             f"{'fwd+bwd ms':>11s} {'bwd floor':>10s} {'x floor':>8s} {'speed-up':>9s}"]
    for r in rows:
        lines.append(f"{r['case']:28s} {r['impl']:9s} {r['fwd_ms']:8.3f} {r['fwd_gbps']:9.0f} {r['fwd_floor_ms']:9.3f} "
                     f"{r['fwd_ms'] / r['fwd_floor_ms']:8.1f} {r['both_ms']:11.3f} {r['bwd_floor_ms']:10.3f} "
                     f"{(r['both_ms'] - r['fwd_ms']) / r['bwd_floor_ms']:8.1f} {r['speedup']:9.1f}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/msda.py needs a CUDA GPU")
    if msda_cuda._kernel() is None:  # ms_deform_attn would time the reference twice
        sys.exit(f"bench/msda.py: the kernel did not build ({msda_cuda._build_errors.get('CUDA')})")
    peak, rows = measure(args.iters)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {peak / 1e12:.2f} TB/s")
    print("\n".join(format_rows(rows)))


if __name__ == "__main__":
    main()
