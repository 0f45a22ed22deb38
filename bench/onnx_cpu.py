"""ONNX Runtime against PyTorch eager on the CPU: DINO-4scale, batch 1, end to end (uint8 letterboxed image to
post-processed detections: export.Deployable in both), as a ratio measured in one run, interleaved.

Usage: python bench/onnx_cpu.py [--backbone r50] [--height 800 --width 1333] [--pairs 3] [--threads N]
Exports a randomly initialised model (the cost is the same as a trained one's), then times eager, ONNX
Runtime, eager, ONNX Runtime, ... after one warm-up of each, and prints each time and the median of the
pairwise ratios. Needs onnx and onnxruntime.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
from model import build_dino  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import onnxruntime
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    deployable = export.Deployable(build_dino(args.backbone), 300)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dino.onnx"
        seconds = export.export(deployable, path, args.height, args.width, 1, False, 17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = export.generated_inputs(1, args.height, args.width)
    feed = {k: v.numpy() for k, v in zip(export.INPUTS, inputs)}

    def eager():
        with torch.inference_mode():
            deployable(*inputs)

    def ort():
        session.run(export.OUTPUTS, feed)
    eager(), ort()  # warm-up
    times = {"eager": [], "onnxruntime": []}
    for _ in range(args.pairs):
        for name, fn in (("eager", eager), ("onnxruntime", ort)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [e / o for e, o in zip(times["eager"], times["onnxruntime"])]
    print(f"DINO-4scale {args.backbone} {args.height}x{args.width}, batch 1, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__} (export took {seconds:.0f} s)")
    for name, values in times.items():
        print(f"  {name:12s} " + ", ".join(f"{v:.2f}" for v in values) + f" s (median {statistics.median(values):.2f} s)")
    print(f"  ONNX Runtime is {statistics.median(ratios):.2f}x as fast as eager (median of {args.pairs} interleaved pairs: "
          + ", ".join(f"{r:.2f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
