"""How far to pad a compiled run's training batches: the padding each size step costs against the number of
batch shapes it leaves (each one compiled once: static_shapes.SIZE_STEP).

    python bench/size_buckets.py                       # a stand-in for COCO's image sizes, batch 2
    python bench/size_buckets.py --data DIR --batch-size 4

Draws --batches batches of the training augmentation's output sizes (data.make_transforms(train=True):
random shortest side 480..800, longest at most 1333, half of them after a random crop; times --scale)
from the images' original sizes: COCO_SIZES, a rounded stand-in for COCO train2017's mix, or the sizes
listed in DIR's annotations. For each step it prints the extra pixels the padding adds (the batch
padded to a multiple of the step on each side, against the batch's largest height and width, which an
eager step pads to), the number of distinct shapes in all the batches and how many of them cover 99%
of the batches.
"""
import argparse
import collections
import random
import sys
from pathlib import Path

import torch
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import load_coco, make_transforms, split_paths  # noqa: E402
from appendix.static_shapes import bucket_step  # noqa: E402

# (width, height): weight, a rounded stand-in for the sizes of COCO train2017's images
COCO_SIZES = {(640, 480): 0.35, (640, 427): 0.25, (480, 640): 0.12, (427, 640): 0.08, (640, 640): 0.05,
              (500, 375): 0.05, (640, 360): 0.05, (375, 500): 0.05}
STEPS = (1, 32, 64, 128, 256)


def original_sizes(data: Path | None) -> tuple[list[tuple[int, int]], list[float]]:
    if data is None:
        return list(COCO_SIZES), list(COCO_SIZES.values())
    coco = load_coco(*reversed(split_paths("train", str(data), None, None)), log=lambda *a: None)
    return [(i["width"], i["height"]) for i in coco.imgs.values()], [1.0] * len(coco.imgs)


def augmented_sizes(sizes, weights, count: int, scale: float) -> list[tuple[int, int]]:
    """(height, width) after the training augmentation, for `count` images drawn from the sizes."""
    resize = make_transforms(train=True, scale=scale).transforms[1]  # the random resizes and crops
    out = []
    for width, height in random.choices(sizes, weights, k=count):
        image = tv_tensors.Image(torch.zeros(1, height, width, dtype=torch.uint8))
        boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, width, height]]), format="XYXY",
                                         canvas_size=(height, width))
        out.append(tuple(resize(image, boxes)[0].shape[-2:]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a dataset folder (train.py --data): its images' sizes")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    sizes = augmented_sizes(*original_sizes(args.data), args.batches * args.batch_size, args.scale)
    batches = [sizes[i:i + args.batch_size] for i in range(0, len(sizes), args.batch_size)]
    print(f"{args.batches} batches of {args.batch_size}, scale {args.scale}: extra pixels padded against the "
          f"batch's largest sides, distinct batch shapes")
    print(f"{'step':>5s} {'extra pixels':>13s} {'shapes':>7s} {'shapes for 99%':>15s}")
    for step in sorted({step if step == 1 else bucket_step(args.scale, step) for step in STEPS}):
        extra, shapes = 0.0, collections.Counter()
        for batch in batches:
            H, W = max(h for h, _ in batch), max(w for _, w in batch)
            padded = (-(-H // step) * step, -(-W // step) * step)
            extra += padded[0] * padded[1] / (H * W) - 1
            shapes[padded] += 1
        covered, needed = 0, 0
        for _, n in shapes.most_common():
            covered, needed = covered + n, needed + 1
            if covered >= 0.99 * len(batches):
                break
        print(f"{step:5d} {100 * extra / len(batches):12.1f}% {len(shapes):7d} {needed:15d}")


if __name__ == "__main__":
    main()
