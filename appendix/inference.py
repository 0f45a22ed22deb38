"""Inference (an appendix, not in the paper): from any image, folder, video or very large image to named
detections, and the checks that two runs of one model detect the same things.

    from appendix.inference import Detector
    detector = Detector.load("runs/shapes/best.pth")    # ours, or an official DINO-4scale release
    print(detector("street.jpg").names)                 # -> ['person', 'car', ...], best first

`Detector` runs each image as eval.py does (alone, resized as in validation, post-processed as official
DINO, boxes clipped to the image) and returns `Detections`. Sliced inference (`slice=SIZE`) is SAHI's
(Akyon et al., arXiv 2202.06934v5): overlapping tiles plus the whole image, each detected alone, the
boxes mapped back and merged per class. eval.py, export.py and train.py draw, compile and compare
through this file.
"""
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor
from torchvision.ops import box_area
from torchvision.transforms.v2 import functional as TF

from appendix.checkpoints import model_from_checkpoint
from config import Config, ConfigError
from appendix.cpu_memory import heap_kept
from data import collate, eval_canvas, make_transforms
from appendix.image_io import DataError, image_files, read_image, rgb
from model import postprocess, select_detections
from appendix.precision import amp_autocast, at_least_float32
from appendix.video import VideoReader


# --- what a detector returns -------------------------------------------------------------------------

LABEL_COLOUR = (220, 30, 30)


@dataclass
class Detections:
    """The detections of one image, best first."""
    boxes: Tensor   # (N, 4) x1y1x2y2 in the image's pixels
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) the data's category ids
    names: list[str]  # (N,) the categories' names (the id as text where the checkpoint names none)
    image: Tensor | None = field(default=None, repr=False)  # (3, H, W) uint8, what they were found on
    source: str = ""  # the file, or what the image was given as

    def __len__(self) -> int:
        return len(self.scores)

    def draw(self) -> Image.Image:
        """The image with the boxes and their names and scores drawn on it."""
        categories = dict(zip(self.labels.tolist(), self.names))
        return draw_detections(self.image, {"boxes": self.boxes, "scores": self.scores, "labels": self.labels},
                               categories, score_thr=float("-inf"))

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result dicts (bbox x, y, width, height), as pycocotools' loadRes and the COCO server take."""
        xywh = self.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        return [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
                for label, box, score in zip(self.labels.tolist(), xywh.tolist(), self.scores.tolist())]

    def to_dict(self) -> dict:
        """Plain Python lists, for JSON."""
        return {"boxes": [[round(v, 2) for v in b] for b in self.boxes.tolist()], "scores": self.scores.tolist(),
                "labels": self.labels.tolist(), "names": list(self.names)}

    def to_supervision(self):
        """As supervision's `Detections` (class names under data["class_name"]); needs `pip install supervision`."""
        try:
            import supervision
        except ImportError:
            raise ImportError("to_supervision needs supervision: pip install supervision") from None
        return supervision.Detections(xyxy=self.boxes.numpy().astype(np.float32), confidence=self.scores.numpy(),
                                      class_id=self.labels.numpy(), data={"class_name": np.array(self.names, dtype=str)})


def draw_detections(image: Tensor, detection: dict, categories: dict[int, str], score_thr: float,
                    colour: tuple[int, int, int] = LABEL_COLOUR, scores: bool = True) -> Image.Image:
    """image (3, H, W) uint8; detection from postprocess in the image's pixels; each label with its score
    unless not `scores`. The boxes and their labels scale with the image, so that a 4000-pixel picture reads
    as a 400-pixel one does."""
    picture = TF.to_pil_image(image)
    draw = ImageDraw.Draw(picture)
    side = max(picture.size)
    width, font = max(1, round(side / 300)), ImageFont.load_default(size=max(10, round(side / 40)))
    keep = (detection["scores"] >= score_thr).nonzero().flatten().tolist()
    for i in reversed(keep):  # the best drawn last, on top
        box = detection["boxes"][i].tolist()
        text = str(categories.get(int(detection["labels"][i]), int(detection["labels"][i])))
        text += f" {float(detection['scores'][i]):.2f}" if scores else ""
        draw.rectangle(box, outline=colour, width=width)
        x1, y1, x2, y2 = draw.textbbox((box[0], box[1]), text, font=font)
        top = box[1] - (y2 - y1) - 2 * width if box[1] - (y2 - y1) - 2 * width >= 0 else box[1]  # above, if it fits
        draw.rectangle([x1, top, x2 + 2 * width, top + (y2 - y1) + 2 * width], fill=colour)
        draw.text((box[0] + width, top + width - (y1 - box[1])), text, fill="white", font=font)
    return picture


# --- what a detector takes -------------------------------------------------------------------------------

class Source(NamedTuple):
    name: str  # the file, or what the image was given as
    read: Callable[[], Tensor]  # -> (3, H, W) uint8


def image_sources(x, where: str = "input") -> tuple[list[Source], bool]:
    """Detector's inputs as (name, reader) pairs, read one at a time as they are detected; and whether `x`
    was one image (a list, a folder or a glob gives a list of detections, even of one). A wrong input is a
    DataError naming it."""
    if isinstance(x, (list, tuple)):
        return [s for i, item in enumerate(x) for s in image_sources(item, f"{where}[{i}]")[0]], False
    if isinstance(x, (str, Path)):
        files = image_files([str(x)], where)
        one = len(files) == 1 and files[0] == Path(x)
        return [Source(str(f), lambda f=f: TF.pil_to_tensor(read_image(f, None))) for f in files], one
    if isinstance(x, Image.Image):
        return [Source(f"{where} (PIL image)", lambda: TF.pil_to_tensor(rgb(ImageOps.exif_transpose(x))))], True
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise DataError(f"{where}: a numpy image must be (H, W, 3) uint8 RGB, got {x.shape} {x.dtype}")
        return [Source(f"{where} (numpy array)", lambda: torch.from_numpy(np.array(x)).permute(2, 0, 1))], True
    if isinstance(x, Tensor):
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise DataError(f"{where}: a tensor image must be (3, H, W) uint8 RGB, got {tuple(x.shape)} {x.dtype}")
        return [Source(f"{where} (tensor)", lambda: x.cpu())], True
    raise DataError(f"{where}: {type(x).__name__} is no image: give a path, a folder, a glob, a PIL image, "
                    f"an (H, W, 3) uint8 numpy array, a (3, H, W) uint8 tensor or a list of these")


# --- sliced inference (SAHI) ---------------------------------------------------------------------------------

def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where the tiles of `size` pixels begin along a side of `length`, each overlapping the next by at least
    `overlap` pixels, the last one ending on the image's edge (SAHI's rule); [0] for a side within one tile."""
    if length <= size:
        return [0]
    return list(range(0, length - size, size - overlap)) + [length - size]


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """The tiles (x1, y1, x2, y2) of SAHI's sliced inference on an image; overlap is a share of `size`."""
    step = int(overlap * size)
    return [(x, y, min(x + size, width), min(y + size, height))
            for y in tile_starts(height, size, step) for x in tile_starts(width, size, step)]


def merge_detections(found: list[Detections], min_ios: float = 0.5) -> Detections:
    """SAHI's merge (greedy non-maximum merging, its default): per class, the best detection left takes in
    every other whose box lies at least `min_ios` inside it or it inside that one (intersection over the
    smaller box), and its box grows to their union. An object cut by a tile's edge is seen whole by the
    whole image or a neighbouring tile, and as a part of itself (intersection over the smaller: about 1) by
    this tile: it is reported once, with its whole box."""
    boxes, scores = torch.cat([d.boxes for d in found]), torch.cat([d.scores for d in found])
    labels, names = torch.cat([d.labels for d in found]), [n for d in found for n in d.names]
    kept_boxes, kept = [], []
    for label in labels.unique().tolist():
        index = (labels == label).nonzero().flatten()
        index = index[scores[index].argsort(descending=True, stable=True)]
        b, left = boxes[index], torch.ones(len(index), dtype=torch.bool)
        area = box_area(b).clamp(min=1e-9)
        for i in range(len(index)):  # a row at a time: thousands of tiles' detections need no N x N matrix
            if left[i]:
                inter = (torch.minimum(b[i, 2:], b[:, 2:]) - torch.maximum(b[i, :2], b[:, :2])).clamp(min=0).prod(-1)
                group = left & (inter / torch.minimum(area[i], area) >= min_ios)
                left &= ~group
                kept.append(int(index[i]))
                kept_boxes.append(torch.cat([b[group, :2].amin(0), b[group, 2:].amax(0)]))
    order = scores[kept].argsort(descending=True, stable=True).tolist()
    return Detections(torch.stack(kept_boxes)[order] if kept else boxes[:0], scores[kept][order],
                      labels[kept][order], [names[kept[i]] for i in order], found[0].image, found[0].source)


# --- the detector ------------------------------------------------------------------------------------------

def compile_model(model: torch.nn.Module, mode: str | None = None):
    """The model under torch.compile, for inference at fixed image sizes: one graph per input shape, with
    no graph breaks and no reads back to the host inside (the deformable attention is one opaque operator,
    msda_cuda). mode "reduce-overhead" adds CUDA graphs (GPUs)."""
    return torch.compile(model, dynamic=False, mode=mode)


class CompiledModel(torch.nn.Module):
    """`model` through compile_model, for inference; its first batch also runs eagerly, and if fewer than
    `min_agreement` of the eager detections come out of the compiled run too (output_agreement), it warns
    and runs eagerly from then on: a compiler bug never silently changes the detections."""

    def __init__(self, model: torch.nn.Module, mode: str | None = None, min_agreement: float = 0.95):
        super().__init__()
        self.model, self.min_agreement = model, min_agreement
        self.compiled = compile_model(model, mode)
        self.checked = self.fell_back = False

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        if self.fell_back:
            return self.model(images, mask)
        outputs = self.compiled(images, mask)
        if not self.checked:
            self.checked = True
            reference = self.model(images, mask)
            agreement, score_gap, _ = output_agreement(outputs, reference)
            if agreement < self.min_agreement:
                warnings.warn(f"--compile: the compiled model found {100 * agreement:.0f}% of the eager model's "
                              f"100 best detections on the first batch (largest score difference "
                              f"{score_gap:.1e}); running eagerly instead")
                self.fell_back = True
                return reference
        return outputs


MIN_TILE = 64  # pixels: a smaller tile, enlarged to 800 x scale pixels, holds less than one token of level 4
MAX_OVERLAP = 0.75  # more makes every pixel part of 16 tiles or more, for no object the tiles would not see
MANY_TILES = 100  # an image sliced into more tiles is said to be, with the count: each tile is a forward pass


def device_from_flag(name: str) -> torch.device:
    """--device NAME as a torch.device; a ConfigError (one line) for a name torch does not know or a GPU
    that is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is no device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} GPU(s)")
    return device


def check_options(score_thr: float, slice: int | None, overlap: float, batch_size: int) -> None:
    if not 0 <= score_thr <= 1:
        raise ConfigError(f"score_thr (--score-thr) must be in [0, 1], got {score_thr}")
    if slice is not None and (not isinstance(slice, int) or slice < MIN_TILE):
        raise ConfigError(f"slice (--slice) is a tile's side in pixels, at least {MIN_TILE} (each tile is enlarged "
                          f"to the model's input size), got {slice!r}")
    if not 0 <= overlap <= MAX_OVERLAP:
        raise ConfigError(f"overlap (--overlap) is a share of the tile in [0, {MAX_OVERLAP}], got {overlap}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size) must be a positive integer, got {batch_size!r}")


def detected_classes(categories: dict[int, str], num_classes: int) -> list[int] | None:
    """The class indices a model with these categories reports: their ids (category ids are class indices;
    the other rows of the class head are no category), or None, every class, where it names none."""
    if not categories:
        return None
    outside = [c for c in categories if not 0 <= c < num_classes]
    if outside:
        raise ConfigError(f"category id {outside[0]} ({categories[outside[0]]!r}) is outside the model's "
                          f"{num_classes} classes")
    return sorted(categories)


def encoder_tokens(height: int, width: int) -> int:
    """About how many encoder tokens an image of height x width pixels gives: its 4 levels, strides 8 to 64."""
    return sum(math.ceil(height / stride) * math.ceil(width / stride) for stride in (8, 16, 32, 64))


def check_scale(cfg: Config, fewer_queries: str = "") -> None:
    """A ConfigError before any work if cfg.scale resizes a square image (the fewest tokens a usual image
    gives at a size) to fewer encoder tokens than the cfg.num_queries that mixed query selection keeps,
    naming the --scale that gives enough (and `fewer_queries`, where the command can change them)."""
    side = round(800 * cfg.scale)
    if encoder_tokens(side, side) >= cfg.num_queries:
        return
    needed = next(n / 20 for n in itertools.count(1) if encoder_tokens(*[round(40 * n)] * 2) >= cfg.num_queries)
    raise ConfigError(f"--scale {cfg.scale:g} resizes an image to {side} pixels on its shorter side, whose "
                      f"{encoder_tokens(side, side)} encoder tokens are fewer than the {cfg.num_queries} queries the "
                      f"model keeps: give --scale {needed:g} or more{fewer_queries}")


class Detector:
    """A trained DINO, from images to named detections:

        detector = Detector.load("best.pth")           # our checkpoints, or official DINO-4scale R50 / Swin-L
        found = detector("street.jpg")                  # a Detections: boxes, scores, labels, names; draw()
        found = detector(["a.jpg", "photos/", "b/*.png", pil_image, numpy_rgb, uint8_tensor])  # a list
        for index, found in detector.video("clip.mp4"): ...

    Each image is run alone, as eval.py runs it: resized as validation images are (shorter side 800 x the
    checkpoint's scale, longer at most 1333 x scale), post-processed as official DINO (the cfg.num_select
    best (query, class) pairs, among the classes that are the checkpoint's categories), the boxes clipped
    to the image, those scoring under `score_thr` dropped.
    `batch_size` > 1 runs that many consecutive images as one batch (throughput on a GPU; give images of
    one size together): each is zero-padded to its batch's largest, which the input projections' GroupNorm
    and the encoder's proposals see, so its detections move a little from its own run alone. `compile`:
    torch.compile, every image padded to one canvas (as eval.py --compile), checked against eager once.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, categories: dict[int, str], device=None,
                 amp: bool = False, compile: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg, self.categories, self.amp = model.to(self.device).eval(), cfg, categories, amp
        self.classes = detected_classes(categories, cfg.num_classes)
        self.canvas = eval_canvas(cfg.scale) if compile else None
        if compile:
            self.model = CompiledModel(self.model, mode="reduce-overhead" if self.device.type == "cuda" else None)
        self.transform = make_transforms(train=False, scale=cfg.scale)

    @classmethod
    def load(cls, checkpoint: str | Path, device=None, amp: bool = False, compile: bool = False,
             **overrides) -> "Detector":
        """The model a checkpoint was trained with (ours: its EMA weights where it kept them), named by its
        categories (official COCO releases: COCO's 80 names). `overrides`: config fields, e.g. scale=1.5."""
        model, cfg, categories = model_from_checkpoint(str(checkpoint), **overrides)
        check_scale(cfg)
        return cls(model, cfg, categories, device, amp, compile)

    def __call__(self, x, score_thr: float = 0.3, slice: int | None = None, overlap: float = 0.2,
                 batch_size: int = 1) -> "Detections | list[Detections]":
        """Detections of x: a path, a folder, a glob, a PIL image, an (H, W, 3) uint8 RGB numpy array, a
        (3, H, W) uint8 tensor, or a list of these. One image gives one Detections; a list, a folder or a
        glob a list, in order. `slice`=SIZE: SAHI's sliced inference, tiles of SIZE x SIZE pixels
        overlapping by `overlap` of a tile, plus the whole image (see merge_detections)."""
        sources, one = image_sources(x)
        found = list(self.detect_sources(sources, score_thr, slice, overlap, batch_size))
        return found[0] if one else found

    def stream(self, x, score_thr: float = 0.3, slice: int | None = None, overlap: float = 0.2,
               batch_size: int = 1) -> Iterator[Detections]:
        """As calling the detector, one Detections at a time, each image read as it comes (large folders)."""
        return self.detect_sources(image_sources(x)[0], score_thr, slice, overlap, batch_size)

    def video(self, path: str | Path, score_thr: float = 0.3, slice: int | None = None,
              overlap: float = 0.2) -> Iterator[tuple[int, Detections]]:
        """(frame index, Detections) for each frame of a video (PyAV; `pip install av`), as for images."""
        check_options(score_thr, slice, overlap, 1)
        with VideoReader(path) as reader:
            for index, frame in enumerate(reader):
                image = torch.from_numpy(frame).permute(2, 0, 1)
                source = Source(f"{path} frame {index}", lambda image=image: image)
                yield index, next(self.detect_sources([source], score_thr, slice, overlap, 1))

    def detect_sources(self, sources: list[Source], score_thr: float, slice: int | None, overlap: float,
                       batch_size: int) -> Iterator[Detections]:
        check_options(score_thr, slice, overlap, batch_size)
        step = 1 if slice else batch_size  # tiles are run alone
        for start in range(0, len(sources), step):
            chunk = sources[start:start + step]
            images = [source.read() for source in chunk]
            if slice:
                yield merge_detections(self.tiles(images[0], slice, overlap, score_thr, chunk[0].name))
            else:
                for source, image, detected in zip(chunk, images, self.run(images)):
                    yield self.named(detected, image, source.name, score_thr)

    @torch.no_grad()
    def run(self, images: list[Tensor]) -> list[dict]:
        """postprocess's detections of `images` (3, H, W) uint8 as one batch, boxes clipped to each image."""
        batch, mask, _ = collate([(self.transform(image), None) for image in images], self.canvas)
        with amp_autocast(self.device, self.amp), heap_kept(self.device):
            out = self.model(batch.to(self.device), mask.to(self.device))
        out = {k: at_least_float32(out[k]) for k in ("pred_logits", "pred_boxes")}
        sizes = [tuple(image.shape[1:]) for image in images]
        found = postprocess(out, sizes, self.cfg.num_select, True, self.classes)
        return [{k: v.cpu() for k, v in d.items()} for d in found]

    def named(self, detected: dict, image: Tensor, source: str, score_thr: float) -> Detections:
        keep = detected["scores"] >= score_thr
        labels = detected["labels"][keep]
        return Detections(detected["boxes"][keep], detected["scores"][keep], labels,
                          [self.categories.get(label, str(label)) for label in labels.tolist()], image, source)

    def tiles(self, image: Tensor, size: int, overlap: float, score_thr: float, source: str = "") -> list[Detections]:
        """SAHI's passes over one image, each run alone: the whole image first, then each tile (tile_windows),
        the tiles' boxes moved into the image's pixels."""
        H, W = image.shape[1:]
        windows = tile_windows(H, W, size, overlap)
        if len(windows) > MANY_TILES:
            warnings.warn(f"{source or 'the image'}: {W}x{H} pixels sliced into {len(windows)} tiles of {size}, "
                          f"overlap {overlap}: {len(windows) + 1} forward passes")
        found = [self.named(self.run([image])[0], image, source, score_thr)]
        for x1, y1, x2, y2 in windows:
            if (x2 - x1, y2 - y1) != (W, H):  # a tile that is the whole image was run already
                tile = self.named(self.run([image[:, y1:y2, x1:x2]])[0], image, source, score_thr)
                tile.boxes = tile.boxes + torch.tensor([x1, y1, x1, y1], dtype=tile.boxes.dtype)
                found.append(tile)
        return found


# --- do two runs agree? ----------------------------------------------------------------------------------

class Agreement(NamedTuple):
    matched: float  # the share of the reference's detections found in the other run
    score: float    # the largest score difference among the matched ones
    box: float      # the largest box coordinate difference among them, in units of the image's size


def compare_detections(got, want, sizes, tol: float) -> Agreement:
    """How far the detections `got` are from the reference `want`, both (scores (B, n), labels (B, n), boxes
    (B, n, 4) x1y1x2y2) as tensors or arrays, on images of `sizes` (B, 2) (height, width).

    A detection of `want` is matched by one of `got` with the same label, a score within `tol` and a box
    within `tol` of the image's size, one to one, wherever it ranks: rounding may order near-tied scores
    differently. Some may find no match at all: the model keeps num_queries of its encoder's tokens by
    score (mixed query selection), and where the last kept and the first left out are near-tied, two runs
    can keep different ones, whose detections then differ."""
    matched, total, worst_score, worst_box = 0, 0, 0.0, 0.0
    for b in range(len(sizes)):
        s1, l1, x1 = (torch.as_tensor(t[b]) for t in got)
        s2, l2, x2 = (torch.as_tensor(t[b]) for t in want)
        h, w = torch.as_tensor(sizes[b]).tolist()
        scale = torch.tensor([w, h, w, h], dtype=x2.dtype)
        box_gap = (x2[:, None] - x1[None]).abs().div(scale).amax(-1)  # (want, got)
        score_gap = (s2[:, None] - s1[None]).abs()
        close = (l2[:, None] == l1[None]) & (box_gap <= tol) & (score_gap <= tol)
        free = torch.ones(len(s1), dtype=torch.bool)
        for i in range(len(s2)):
            candidates = (close[i] & free).nonzero().flatten()
            if len(candidates):
                j = candidates[score_gap[i, candidates].argmin()]
                free[j] = False
                matched += 1
                worst_score, worst_box = max(worst_score, score_gap[i, j].item()), max(worst_box, box_gap[i, j].item())
        total += len(s2)
    return Agreement(matched / max(total, 1), worst_score, worst_box)


@torch.no_grad()
def output_agreement(outputs: dict, reference: dict, top: int = 100, tol: float = 1e-2) -> Agreement:
    """compare_detections on two model outputs for the same batch ("pred_logits", "pred_boxes"): the
    reference's `top` best (query, class) pairs per image, boxes in units of the image."""
    def best(out):
        logits, boxes = at_least_float32(out["pred_logits"]), at_least_float32(out["pred_boxes"])
        sizes = torch.ones(len(logits), 2, dtype=boxes.dtype, device=boxes.device)
        return tuple(t.cpu() for t in select_detections(logits, boxes, sizes, top))
    return compare_detections(best(outputs), best(reference), torch.ones(len(reference["pred_logits"]), 2), tol)
