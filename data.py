"""COCO-format detection data: reading, the seed's augmentation, batching, and a generated dataset.

The augmentation is DETR's (arXiv 2005.12872v3 Sec. A.4), as DINO (arXiv 2203.03605v4 Sec. 4.1)
uses it: random horizontal flip, then either a random resize of the shorter side to 480..800
(step 32, longer side at most 1333) or resize to 400/500/600, a random crop of 384..600 and the
same random resize. Validation resizes to 800 (longer side at most 1333). `scale` multiplies every
size (1.5 for the Swin-L fine-tuning: 720..1200, at most 2000).

Targets follow DETR: labels are the annotations' category ids as they are (so num_classes = the
largest id + 1 and predictions map straight back), boxes are (cx, cy, w, h) normalised by the
augmented image's size; crowd annotations are left out of the training targets, boxes are clipped
to the image and empty ones dropped. Images without annotations are kept.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from config import ConfigError
from appendix.image_io import DataError, read_image, stored_image_size
from appendix.layouts import Converted, converted
from appendix.runs import writable, write_atomically

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- reading --------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _listed(problems: list[str]) -> str:
    return "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")


def read_coco_json(ann_file: Path | Converted) -> dict:
    """The parsed annotation file (or a YOLO or VOC split, converted), with its three lists and unique integer
    ids checked."""
    if isinstance(ann_file, Converted):
        data = copy.deepcopy(ann_file.data)  # the repairs below change the dicts they are given
    else:
        try:
            data = json.loads(ann_file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"annotation file {ann_file} does not exist") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{ann_file}: not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: no list '{key}' (not a COCO-format annotation file)")
    for key, what in (("images", "image"), ("categories", "category"), ("annotations", "annotation")):
        seen = set()
        for entry in data[key]:
            if not (isinstance(entry, dict) and _is_int(entry.get("id"))):
                raise DataError(f"{ann_file}: {what} {entry.get('id') if isinstance(entry, dict) else entry!r} in "
                                f"'{key}' has no integer 'id'")
            if entry["id"] in seen:
                raise DataError(f"{ann_file}: {what} id {entry['id']} appears twice in '{key}' (ids must be unique)")
            seen.add(entry["id"])
    negative = [c["id"] for c in data["categories"] if c["id"] < 0]
    if negative:
        raise DataError(f"{ann_file}: category id {negative[0]} is negative (category ids are class indices, 0 or more)")
    return data


def checked_annotations(data: dict, images: dict[int, dict], ann_file: Path, log) -> list[dict]:
    """The annotations that are kept, checked and repaired as load_coco says, each repair logged."""
    category_ids = {c["id"] for c in data["categories"]}
    invalid, filled, clipped, kept = [], {"area": 0, "iscrowd": 0}, 0, []
    for ann in data["annotations"]:
        where = f"annotation {ann['id']}"
        if ann.get("image_id") not in images:
            raise DataError(f"{ann_file}: {where} has image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{ann_file}: {where} has category_id {ann.get('category_id')!r}, which is not in "
                            f"'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            invalid.append(f"{where}: bbox {bbox!r} is not [x, y, width, height] of finite numbers")
            continue
        x, y, w, h = bbox
        if w < 0 or h < 0:
            invalid.append(f"{where}: bbox {bbox} has a negative width or height (x1, y1, x2, y2 instead of "
                           f"x, y, width, height?)")
            continue
        if w == 0 or h == 0:
            continue  # empty: dropped
        img = images[ann["image_id"]]
        if _is_int(img.get("width")) and _is_int(img.get("height")):
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, img["width"]), min(y + h, img["height"])
            if x2 <= x1 or y2 <= y1:
                invalid.append(f"{where}: bbox {bbox} lies outside its {img['width']}x{img['height']} image")
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                ann["bbox"], clipped = [x1, y1, x2 - x1, y2 - y1], clipped + 1
        for key, value in (("area", ann["bbox"][2] * ann["bbox"][3]), ("iscrowd", 0)):
            if key not in ann:
                ann[key], filled[key] = value, filled[key] + 1
        kept.append(ann)
    if invalid:
        raise DataError(f"{ann_file}: {len(invalid)} invalid box(es): {_listed(invalid)}")
    if filled["area"]:
        log(f"{ann_file}: {filled['area']} annotation(s) without 'area': set to the box's width x height")
    if filled["iscrowd"]:
        log(f"{ann_file}: {filled['iscrowd']} annotation(s) without 'iscrowd': set to 0")
    if clipped:
        log(f"{ann_file}: {clipped} box(es) reach beyond their image: clipped to it, for training and evaluation")
    if len(kept) < len(data["annotations"]):
        log(f"{ann_file}: {len(data['annotations']) - len(kept)} empty box(es) (zero width or height): left out "
            f"of training and evaluation")
    return kept


def load_coco(ann_file: str | Path | Converted, image_dir: str | Path | None = None, log=print):
    """pycocotools' COCO index of `ann_file`, checked and repaired first, so that training and evaluation
    read the same, right annotations or stop before any work.

    Refused, with a DataError naming the file, the entry and the field: ids that are not integers, image,
    annotation or category ids given twice, annotations of unknown images or categories, boxes that are
    not four finite numbers, have a negative width or height, or lie entirely outside their image.
    Repaired, with one line each in `log`: a missing `area` (the box's width x height) or `iscrowd` (0),
    boxes that reach beyond their image, clipped to it, and empty boxes (zero width or height), dropped.
    The repairs are made in the index itself, so training targets and the evaluation's ground truth are
    the same boxes. Images whose width and height the file omits get them from the files in `image_dir`.
    """
    # imported here, as in eval.coco_metrics: the model, the training step and the benchmarks import this
    # module but read no annotation files (GPU machines without pycocotools run them)
    from pycocotools.coco import COCO
    ann_file = ann_file if isinstance(ann_file, Converted) else Path(ann_file)
    data = read_coco_json(ann_file)
    images = {img["id"]: img for img in data["images"]}
    if image_dir is not None:
        for img in images.values():
            if not (_is_int(img.get("width")) and _is_int(img.get("height"))) and (Path(image_dir) / img["file_name"]).is_file():
                img["width"], img["height"] = stored_image_size(Path(image_dir) / img["file_name"])
    data["annotations"] = checked_annotations(data, images, ann_file, log)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class RandomSizeCrop(v2.Transform):
    """Crop a random region with each side drawn from [min_size, min(max_size, image side)] (DETR's)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        randint = lambda low, high: int(torch.randint(low, high + 1, ()))  # torch's generator, like v2's own
        h = randint(min(self.min_size, height), min(height, self.max_size))
        w = randint(min(self.min_size, width), min(width, self.max_size))
        return dict(top=randint(0, height - h), left=randint(0, width - w), height=h, width=w)

    def transform(self, inpt, params: dict):
        return TF.crop(inpt, **params)


def make_transforms(train: bool, scale: float = 1.0) -> v2.Transform:
    """The seed's augmentation (see the module docstring); sizes multiplied by `scale`."""
    s = lambda size: int(round(size * scale))
    scales, max_size = [s(x) for x in range(480, 801, 32)], s(1333)
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return v2.Compose([v2.Resize(s(800), max_size=max_size), *normalise])
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([
            v2.RandomShortestSize(scales, max_size),
            v2.Compose([v2.RandomShortestSize([s(400), s(500), s(600)]),
                        RandomSizeCrop(s(384), s(600)),
                        v2.RandomShortestSize(scales, max_size)]),
        ]),
        *normalise,
    ])


class CocoDetection(torch.utils.data.Dataset):
    """(image (3, H, W) normalised, target) pairs of a COCO-format dataset.

    target: "labels" (G,) int64 category ids, "boxes" (G, 4) normalised cxcywh, "image_id",
    "orig_size" and "size", (height, width) before and after augmentation.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path | Converted, transforms: v2.Transform, log=print):
        ann_file = ann_file if isinstance(ann_file, Converted) else Path(ann_file)
        self.image_dir, self.ann_file, self.transforms = Path(image_dir), ann_file, transforms
        self.coco = load_coco(ann_file, image_dir, log)
        self.ids = sorted(self.coco.imgs)
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {ann_file} are not in {self.image_dir}: "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")

    @property
    def category_names(self) -> dict[int, str]:
        return {c: self.coco.cats[c]["name"] for c in self.coco.cats}

    @property
    def num_classes(self) -> int:
        """Largest category id + 1, as official DINO (COCO: 91)."""
        return max(self.coco.cats, default=0) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def original(self, image_id: int) -> tuple[Tensor, dict]:
        """Image `image_id` as read for training and evaluation ((3, H, W) uint8, before any transform) and its
        ground truth in its pixels: {"boxes" (G, 4) x1y1x2y2, "labels" (G,)}. Crowd regions are left out: no
        training targets (COCOeval reads them from the annotation file itself)."""
        info = self.coco.imgs[image_id]
        json_size = (info["width"], info["height"]) if "width" in info and "height" in info else None
        image = TF.pil_to_tensor(read_image(self.image_dir / info["file_name"], json_size))
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        return image, {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, dict]:
        """item: an index, or (index, seed): then the augmentation draws from a generator of this sample's own,
        so that it is the same whichever process or worker reads the sample, and whenever (runs.EpochOrder)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image_id = self.ids[index]
        image, truth = self.original(image_id)
        H, W = image.shape[1:]
        sample = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(truth["boxes"], format="XYXY", canvas_size=(H, W)),
                  "labels": truth["labels"]}
        sample["boxes"] = TF.clamp_bounding_boxes(sample["boxes"])
        if seed is None:
            sample = self.transforms(sample)
        else:
            with torch.random.fork_rng(devices=[]):  # v2's random transforms draw from torch's generator
                torch.manual_seed(seed)
                sample = self.transforms(sample)
        image, boxes = sample["image"], sample["boxes"]
        # drop boxes cropped away or degenerate, as official DINO: any positive width and height stays.
        # (v2.SanitizeBoundingBoxes would also drop boxes under one pixel, and its min_size cannot go lower)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        h, w = image.shape[-2:]
        target = {"labels": sample["labels"][keep],
                  "boxes": box_convert(boxes[keep].as_subclass(Tensor), "xyxy", "cxcywh") / torch.tensor([w, h, w, h]),
                  "image_id": image_id, "orig_size": torch.tensor([H, W]), "size": torch.tensor([h, w])}
        return image.as_subclass(Tensor), target


def eval_canvas(scale: float = 1.0) -> tuple[int, int]:
    """(shorter, longer) side that every evaluation image fits in after make_transforms(train=False)."""
    return int(round(800 * scale)), int(round(1333 * scale))


def collate(batch: list[tuple[Tensor, dict]], canvas: tuple[int, int] | None = None,
            multiple: int = 1) -> tuple[Tensor, Tensor, list[dict]]:
    """Zero-pad the images to the batch's largest height and width, each rounded up to a multiple of
    `multiple` (a compiled training step's size buckets, appendix/static_shapes.py); or, given a canvas
    (shorter, longer) side, to one of three fixed sizes, as compiled inference wants: (shorter, longer)
    when every image is landscape, (longer, shorter) when every one is portrait, else (longer, longer).
    Returns images (B, 3, H, W), mask (B, H, W) True on padding, targets."""
    images, targets = zip(*batch)
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    H, W = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    if canvas is not None:
        short, long = canvas
        landscape = all(i.shape[1] <= i.shape[2] for i in images)
        portrait = all(i.shape[1] >= i.shape[2] for i in images)
        size = (short, long) if landscape else (long, short) if portrait else (long, long)
        if H > size[0] or W > size[1]:
            raise ValueError(f"a batch of images up to {H}x{W} does not fit the canvas {size[0]}x{size[1]}")
        H, W = size
    padded = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for b, image in enumerate(images):
        padded[b, :, :image.shape[1], :image.shape[2]] = image
        mask[b, :image.shape[1], :image.shape[2]] = False
    return padded, mask, list(targets)


# --- a generated dataset ------------------------------------------------------------------------------

SHAPES = ("square", "circle", "triangle")


def _background(rng: random.Random, W: int, H: int) -> Image.Image:
    """A colour gradient with blurred blotches and fine noise, so that plain colour does not give shapes away."""
    base = Image.new("RGB", (2, 2))
    base.putdata([tuple(rng.randrange(40, 216) for _ in range(3)) for _ in range(4)])
    image = base.resize((W, H), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y, r = rng.randrange(W), rng.randrange(H), rng.randint(3, max(4, min(W, H) // 8))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(40, 216) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(radius=max(2, min(W, H) // 20)))  # no crisp distractor shapes
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    noise = (torch.randn(H, W, 1, generator=g) * 24 + 128).clamp(0, 255).to(torch.uint8).expand(H, W, 3)
    return Image.blend(image, Image.fromarray(noise.contiguous().numpy()), 0.15)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)


def shapes_image(rng: random.Random, W: int, H: int, max_objects: int = 4) -> tuple[Image.Image, list]:
    """A W x H picture of 1..max_objects non-overlapping coloured shapes on a textured background, drawn from
    `rng`. Returns it and [((x1, y1, x2, y2), shape index into SHAPES)]."""
    image = _background(rng, W, H)
    draw = ImageDraw.Draw(image)
    placed = []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(20):  # shapes do not overlap, so every box is fully visible
            side = rng.randint(min(W, H) // 6, min(W, H) // 3)
            w, h = side, int(side * rng.uniform(0.8, 1.25))
            x, y = rng.randint(0, W - w), rng.randint(0, min(H - h, H - 1))
            box = (x, y, x + w, min(y + h, H))
            if all(box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1] for p, _ in placed):
                placed.append((box, rng.randrange(len(SHAPES))))
                break
    for box, shape in placed:
        _draw_shape(draw, SHAPES[shape], box, tuple(rng.randrange(0, 256) for _ in range(3)))
    return image, placed


def make_shapes_dataset(root: str | Path, num_train: int = 400, num_val: int = 100, size: tuple[int, int] = (160, 224),
                        max_objects: int = 4, seed: int = 0) -> Path:
    """Write a COCO-format dataset of coloured squares, circles and triangles (category ids 1..3) on
    textured backgrounds: root/{train2017,val2017}/*.jpg and root/annotations/instances_{train,val}2017.json.
    Deterministic from `seed`; images are size[0]..size[1] pixels on each side. Returns root."""
    root = Path(root)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        rng = random.Random(split_seed)
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            W, H = rng.randint(*size), rng.randint(*size)
            image, placed = shapes_image(rng, W, H, max_objects)
            for box, shape in placed:
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": shape + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            file_name = f"{image_id:06d}.jpg"
            image.save(root / f"{split}2017" / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": W, "height": H})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def coco_category_names() -> dict[int, str]:
    """The 80 COCO 2017 categories by id (1..90, with gaps), as official DINO's 91 classes number them;
    from torchvision's table."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
    names = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]  # indexed by id, "N/A" in the gaps
    return {i: name for i, name in enumerate(names) if name not in ("__background__", "N/A")}


def coco_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` ("train" or "val") in the COCO 2017 layout."""
    data_dir = Path(data_dir)
    return data_dir / f"{split}2017", data_dir / "annotations" / f"instances_{split}2017.json"


def split_paths(split: str, data_dir: str | None, images: str | None,
                ann_file: str | None) -> tuple[Path, Path | Converted] | None:
    """(image folder, annotation file) of `split`: from a dataset folder (--data: COCO layout, or YOLO or VOC,
    read into COCO's format: appendix/layouts.py), else from --{split}-images and --{split}-json; None when neither
    is given."""
    if data_dir:
        if not Path(data_dir).exists():
            raise FileNotFoundError(f"--data {data_dir} does not exist")
        return converted(Path(data_dir), split) or coco_paths(data_dir, split)
    if images and ann_file:
        return Path(images), Path(ann_file)
    return None


def main(argv: list[str] | None = None):
    """python data.py DIR --to-coco OUT.json [--split val]: a dataset in any layout --data reads, checked and
    repaired as training reads it, written as one COCO annotation file."""
    parser = argparse.ArgumentParser(description="Write a COCO, YOLO or VOC dataset's split as a COCO annotation file.")
    parser.add_argument("data", help="dataset folder (COCO, YOLO or Pascal VOC layout) or YOLO .yaml file")
    parser.add_argument("--to-coco", required=True, metavar="OUT.json")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    args = parser.parse_args(argv)
    try:
        image_dir, ann_file = split_paths(args.split, args.data, None, None)
        coco = load_coco(ann_file, image_dir)
        write_atomically(writable(Path(args.to_coco), "--to-coco"), json.dumps(coco.dataset))
    except (DataError, FileNotFoundError, ConfigError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.to_coco}: {len(coco.imgs)} images, {len(coco.anns)} boxes, {len(coco.cats)} categories "
          f"(file names relative to {image_dir})")


if __name__ == "__main__":
    main()
