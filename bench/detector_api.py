"""What the detector API (inference.Detector) costs over calling the model directly, and video frames/s.

  model          model(images, mask) + postprocess on an image already normalised and padded (what the
                 README's low-level example does, with the input made outside the timing)
  API, tensor    detector(uint8 tensor): resizing, normalising, padding, the model, post-processing, names
  API, file      detector("image.jpg"): the same, plus reading the JPEG
  video          Detector.video(clip.mp4): decoding each frame with PyAV, then as the API

Usage: python bench/detector_api.py [--backbone r50] [--size 800 1333] [--pairs 5] [--frames 6]
R50 with random weights (the time does not depend on them). The variants run in turn after one warm-up
each; it prints each one's median time and the median of the per-round ratios variant / model. The
video is generated (--frames frames of 360x640, resized by the model's transform to 750x1333) and its
frames/s is printed beside the model's on the same decoded frames.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import make_config  # noqa: E402
from appendix.cpu_memory import heap_kept  # noqa: E402
from data import coco_category_names, collate  # noqa: E402
from appendix.inference import Detector  # noqa: E402
from model import build_dino, postprocess  # noqa: E402
from appendix.video import VideoReader, VideoWriter  # noqa: E402


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random picture (H, W, 3) uint8: JPEG-compressible, unlike noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 32 + 1, width // 32 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)
    return (smooth[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = make_config(backbone=args.backbone, num_classes=91)
    detector = Detector(build_dino(args.backbone, num_classes=91), cfg, coco_category_names(), "cpu")
    pixels = picture(*args.size)
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    folder = Path(tempfile.mkdtemp())
    Image.fromarray(pixels).save(folder / "image.jpg", quality=90)
    batch, mask, _ = collate([(detector.transform(image), None)])
    assert batch.shape[-2:] == image.shape[-2:], "choose a size the transform keeps (800 x at most 1333)"

    @torch.no_grad()
    def model_alone():
        with heap_kept(detector.device):
            postprocess(detector.model(batch, mask), [tuple(args.size)], cfg.num_select, clip=True)

    variants = {"model": model_alone, "API, tensor": lambda: detector(image),
                "API, file": lambda: detector(folder / "image.jpg")}
    for run in variants.values():
        run()  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.pairs):
        for name, run in variants.items():
            times[name].append(timed(run))
    print(f"{args.backbone} at {args.size[0]}x{args.size[1]}, CPU, {torch.get_num_threads()} threads, "
          f"{args.pairs} rounds, interleaved")
    for name, values in times.items():
        ratio = statistics.median(v / m for v, m in zip(values, times["model"]))
        print(f"  {name:12s} {statistics.median(values):6.3f} s/image  {1 / statistics.median(values):6.3f} images/s  "
              f"time / model's {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    video_frames(detector, folder, args.frames)


def video_frames(detector: Detector, folder: Path, count: int):
    with VideoWriter(folder / "clip.mp4", 25, ".mp4") as writer:
        for i in range(count):
            writer.write(picture(360, 640, seed=i + 1))
    with VideoReader(folder / "clip.mp4") as reader:
        frames = [torch.from_numpy(f).permute(2, 0, 1) for f in reader]
    start = time.perf_counter()
    done = sum(1 for _ in detector.video(folder / "clip.mp4"))
    video = time.perf_counter() - start
    start = time.perf_counter()
    for frame in frames:
        detector(frame)
    alone = time.perf_counter() - start
    print(f"video: {done} frames of 360x640 (run at 750x1333): Detector.video {done / video:.3f} frames/s, "
          f"the API on the decoded frames {len(frames) / alone:.3f} frames/s")


if __name__ == "__main__":
    main()
