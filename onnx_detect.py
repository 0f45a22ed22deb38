"""Detections from an exported DINO (export.py) with ONNX Runtime, numpy and Pillow only: no torch.

    python onnx_detect.py dino.onnx street.jpg [more.jpg photos/ 'shots/**/*.png' ...] [--score-thr 0.3]

Images are read as training and eval.py read them (image_io.read_image: EXIF orientation, RGB, 16-bit
scaled to 8 bits); folders and glob patterns as eval.py --image takes them.

The exported graph takes images letterboxed to its fixed size (scaled to fit with their aspect ratio
kept, zero-padded at the bottom and right), the size each fills and its original size, and gives the
best detections in the original image's pixels. `letterbox` here resizes with Pillow's bilinear filter,
eval.py with torchvision's, so their detections can differ by as much as the two resizings do.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from image_io import DataError, image_files, read_image, rgb


def load(path: str):
    """An ONNX Runtime session of the exported model, on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        sys.exit("onnx_detect.py needs ONNX Runtime: pip install onnxruntime")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def letterbox(image: Image.Image, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` scaled to fit height x width with its aspect ratio kept, at the top left of a zero canvas:
    (3, height, width) uint8 RGB, and the (height, width) it fills."""
    scale = min(height / image.height, width / image.width)
    h, w = max(1, round(image.height * scale)), max(1, round(image.width * scale))
    canvas = np.zeros((3, height, width), np.uint8)
    canvas[:, :h, :w] = np.asarray(rgb(image).resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)
    return canvas, (h, w)


def detect(session, image: Image.Image, score_thr: float = 0.3) -> list[tuple[float, int, list[float]]]:
    """[(score, category id, [x1, y1, x2, y2] in the image's pixels)], best first, score >= score_thr."""
    _, _, height, width = session.get_inputs()[0].shape  # the export's fixed size (the batch may be named)
    pixels, valid = letterbox(image, height, width)
    scores, labels, boxes = session.run(None, {"images": pixels[None],
                                               "valid_sizes": np.array([valid], dtype=np.int64),
                                               "orig_sizes": np.array([[image.height, image.width]], dtype=np.int64)})
    keep = scores[0] >= score_thr
    return [(float(s), int(l), b.tolist()) for s, l, b in zip(scores[0][keep], labels[0][keep], boxes[0][keep])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file export.py wrote")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--score-thr", type=float, default=0.3)
    args = parser.parse_args()
    if not Path(args.model).is_file():
        parser.error(f"model {args.model} does not exist (export.py writes it)")
    session = load(args.model)
    try:
        for path in image_files(args.images, "image"):
            detections = detect(session, read_image(path, None), args.score_thr)
            print(f"{path}: {len(detections)} detections with score >= {args.score_thr}")
            for score, label, box in detections:
                print(f"  {label}  {score:.3f}  x1y1x2y2 {[round(v, 1) for v in box]}")
    except (DataError, FileNotFoundError) as e:  # a missing, unreadable or truncated image: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
