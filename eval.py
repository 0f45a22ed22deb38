"""Evaluate a checkpoint with pycocotools, draw detections, or run on any images.

    python eval.py CKPT [--data DIR | --val-images DIR --val-json FILE] [--output-dir DIR]
    python eval.py CKPT --data DIR --vis 8 --score-thr 0.3     # also save 8 pictures with detections
    python eval.py CKPT --image a.jpg photos/ "more/*.png"    # detections on any images: files, folders, globs

Prints the COCO box metrics (AP, AP50, AP75, APs, APm, APl and AP per class) and writes them to
OUTPUT_DIR/metrics.json. CKPT is one of ours (train.py) or an official DINO-4scale release
checkpoint (R50 or Swin-L, 91 COCO classes, detected from its parameter names).
"""
import argparse
import contextlib
import functools
import io
import json
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from checkpoints import model_from_checkpoint
from config import Config, ConfigError
from cpu_memory import heap_kept
from data import CocoDetection, DataError, collate, eval_canvas, make_transforms, read_image, split_paths
from image_io import image_files
from inference import output_agreement
from model import TooFewTokens, postprocess
from precision import amp_autocast, at_least_float32
from runs import replace_atomically, writable, write_atomically

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def compile_model(model: torch.nn.Module, mode: str | None = None):
    """The model under torch.compile, for inference at fixed image sizes: one graph per input shape, with
    no graph breaks and no reads back to the host inside (the deformable attention is one opaque operator,
    msda_cuda). mode "reduce-overhead" adds CUDA graphs (GPUs)."""
    return torch.compile(model, dynamic=False, mode=mode)


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


class CompiledModel(torch.nn.Module):
    """`model` through compile_model, for inference; its first batch also runs eagerly, and if fewer than
    `min_agreement` of the eager detections come out of the compiled run too (inference.output_agreement), it
    warns and runs eagerly from then on: a compiler bug never silently changes the detections."""

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


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int]) -> dict:
    """COCO box metrics of `detections` (COCO result dicts) on `image_ids`, with AP per category."""
    from pycocotools.cocoeval import COCOeval  # here, not at the top: see data.load_coco
    metrics = {name: 0.0 for name in METRIC_NAMES}
    metrics["per_class_AP"] = {coco_gt.cats[c]["name"]: 0.0 for c in sorted(coco_gt.cats)}
    if not detections:
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it is given
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics.update({name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)})
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall, classes, areas, max dets)
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        metrics["per_class_AP"][coco_gt.cats[cat_id]["name"]] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return metrics


def format_metrics(metrics: dict) -> str:
    """The seed's table: AP, AP50, AP75, APs, APm, APl, then AP per class, in percent ("-": no such objects)."""
    percent = lambda v: f"{100 * v:5.1f}" if v >= 0 else "    -"  # pycocotools gives -1 for an empty area range
    lines = ["  ".join(f"{name} {percent(metrics[name])}" for name in METRIC_NAMES[:6]), "AP per class:"]
    lines += [f"  {name:20s} {percent(ap)}" for name, ap in metrics["per_class_AP"].items()]
    return "\n".join(lines)


def to_coco_results(detections: list[dict], targets: list[dict], category_ids: set[int]) -> list[dict]:
    """postprocess output (boxes x1y1x2y2 in original pixels) -> COCO result dicts (boxes xywh)."""
    results = []
    for det, target in zip(detections, targets):
        boxes = det["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), boxes.tolist()):
            if label in category_ids:  # a label that is no category can never be right
                results.append({"image_id": target["image_id"], "category_id": label, "bbox": box, "score": score})
    return results


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_select: int = Config.num_select,
             amp: bool = False) -> dict | None:
    """COCO metrics of `model` on the loader's CocoDetection dataset; under torch.distributed each
    process evaluates its share and rank 0 returns the metrics (the others None)."""
    predicted = predict(model, loader, device, num_select, amp)
    return coco_metrics(loader.dataset.coco, *predicted) if predicted is not None else None


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, num_select: int = Config.num_select,
            amp: bool = False) -> tuple[list[dict], list[int]] | None:
    """The detections of `model` on the loader's CocoDetection dataset as COCO results (what pycocotools'
    loadRes and the COCO test-dev server take), and the image ids they cover; under torch.distributed,
    rank 0 returns every process's (the others None)."""
    dataset = loader.dataset
    model.eval()
    results, image_ids = [], []
    shows_progress = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    start = last_print = time.time()
    for i, (images, mask, targets) in enumerate(loader):
        if shows_progress and time.time() - last_print > 10:  # long validation sets: a line every 10 s
            last_print = time.time()
            left = (len(loader) - i) * (last_print - start) / i
            print(f"evaluating [{i}/{len(loader)}], {left:.0f} s left", flush=True)
        with amp_autocast(device, amp), heap_kept(device):
            outputs = model(images.to(device), mask.to(device))
        outputs = {k: at_least_float32(outputs[k]) for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = [{k: v.cpu() for k, v in d.items()} for d in postprocess(outputs, sizes, num_select)]
        results += to_coco_results(detections, targets, set(dataset.coco.cats))
        image_ids += [t["image_id"] for t in targets]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, image_ids))
        if dist.get_rank() != 0:
            return None
        # the distributed sampler repeats images to even out the shards: keep each image once
        seen, results, image_ids = set(), [], []
        for rank_results, rank_ids in gathered:
            fresh = set(rank_ids) - seen
            results += [r for r in rank_results if r["image_id"] in fresh]
            image_ids += sorted(fresh)
            seen |= fresh
    return results, image_ids


# --- pictures, command line ---------------------------------------------------------------

LABEL_COLOUR = (220, 30, 30)

def picture_names(paths: list[str]) -> list[str]:
    """A distinct file name stem for each input image: its own stem, or where two share one (a/img.jpg and
    b/img.jpg), its path with the folders joined by '_' (a_img, b_img), and an index if even that repeats."""
    names = [Path(p).stem for p in paths]
    names = [n if names.count(n) == 1 else "_".join(Path(p).with_suffix("").parts).strip("/_") for n, p in zip(names, paths)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def draw_detections(image: Tensor, detection: dict, categories: dict[int, str], score_thr: float) -> Image.Image:
    """image (3, H, W) uint8; detection from postprocess in the image's pixels. The boxes and their labels
    scale with the image, so that a 4000-pixel picture reads as a 400-pixel one does."""
    picture = TF.to_pil_image(image)
    draw = ImageDraw.Draw(picture)
    side = max(picture.size)
    width, font = max(1, round(side / 300)), ImageFont.load_default(size=max(10, round(side / 40)))
    keep = (detection["scores"] >= score_thr).nonzero().flatten().tolist()
    for i in reversed(keep):  # the best drawn last, on top
        box = detection["boxes"][i].tolist()
        text = f"{categories.get(int(detection['labels'][i]), int(detection['labels'][i]))} {float(detection['scores'][i]):.2f}"
        draw.rectangle(box, outline=LABEL_COLOUR, width=width)
        x1, y1, x2, y2 = draw.textbbox((box[0], box[1]), text, font=font)
        top = box[1] - (y2 - y1) - 2 * width if box[1] - (y2 - y1) - 2 * width >= 0 else box[1]  # above, if it fits
        draw.rectangle([x1, top, x2 + 2 * width, top + (y2 - y1) + 2 * width], fill=LABEL_COLOUR)
        draw.text((box[0] + width, top + width - (y1 - box[1])), text, fill="white", font=font)
    return picture


@torch.no_grad()
def detect_images(model: torch.nn.Module, cfg: Config, images: list[Tensor], device: torch.device, amp: bool = False,
           canvas: tuple[int, int] | None = None) -> list[dict]:
    """Detections on uint8 images (3, H, W), one at a time, in each image's own pixels; each image padded
    to `canvas` (data.collate) if given."""
    transform = make_transforms(train=False, scale=cfg.scale)
    model.eval()
    detections = []
    for image in images:
        batch, mask, _ = collate([(transform(image), None)], canvas)
        with amp_autocast(device, amp), heap_kept(device):
            out = model(batch.to(device), mask.to(device))
        out = {k: at_least_float32(out[k]) for k in ("pred_logits", "pred_boxes")}
        detected = postprocess(out, [image.shape[1:]], cfg.num_select, clip=True)[0]  # boxes inside the image
        detections.append({k: v.cpu() for k, v in detected.items()})
    return detections


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Evaluate a DINO checkpoint (ours or official) with pycocotools.")
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="COCO-layout folder (val2017/, annotations/instances_val2017.json)")
    parser.add_argument("--val-images", help="image folder, with --val-json, for any other layout")
    parser.add_argument("--val-json", help="COCO-format annotation file of --val-images")
    parser.add_argument("--image", nargs="+", default=[], metavar="FILE",
                        help="run on these images instead: files, folders, glob patterns ('photos/**/*.jpg')")
    parser.add_argument("--save-results", metavar="FILE",
                        help="also write the detections as COCO results JSON (what the COCO test-dev server takes), "
                             "in --output-dir unless FILE is absolute")
    parser.add_argument("--output-dir", default="eval_output")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="save N validation images with detections")
    parser.add_argument("--score-thr", type=float, default=0.3, help="score threshold of the drawn detections")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--scale", type=float, help="image size factor (default: the checkpoint's)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (a minute or more to start; much faster on GPUs): images "
                             "are padded to a fixed size, and the first batch is checked against eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        run(parser, args)
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    device = device_from_flag(args.device)
    output_dir = Path(args.output_dir)
    writable(output_dir / "metrics.json", "--output-dir")
    results_path = writable(output_dir / args.save_results, "--save-results") if args.save_results else None
    overrides = {"scale": args.scale} if args.scale is not None else {}
    model, cfg, categories = model_from_checkpoint(args.checkpoint, **overrides)
    model.to(device).eval()
    canvas = eval_canvas(cfg.scale) if args.compile else None
    if args.compile:
        torch._logging.set_logs(recompiles=True)  # say which frame recompiles, and why
        model = CompiledModel(model, mode="reduce-overhead" if device.type == "cuda" else None)  # + CUDA graphs

    if args.image:
        files = image_files(args.image)
        images = [TF.pil_to_tensor(read_image(path, None)) for path in files]
        detections = detect_images(model, cfg, images, device, args.amp, canvas)
        for path, name, image, det in zip(files, picture_names([str(f) for f in files]), images, detections):
            keep = det["scores"] >= args.score_thr
            print(f"{path}: {int(keep.sum())} detections with score >= {args.score_thr}")
            for s, l, b in zip(det["scores"][keep], det["labels"][keep], det["boxes"][keep]):
                print(f"  {categories.get(int(l), int(l))}  {float(s):.3f}  x1y1x2y2 {[round(v, 1) for v in b.tolist()]}")
            out = output_dir / f"{name}_detections.png"
            save_picture(draw_detections(image, det, categories, args.score_thr), out)
            print(f"  drawn in {out}")
        return

    paths = split_paths("val", args.data, args.val_images, args.val_json)
    if paths is None:
        parser.error("give --data DIR, or --val-images and --val-json, or --image FILE...")
    images_dir, ann_file = paths
    dataset = CocoDetection(images_dir, ann_file, make_transforms(train=False, scale=cfg.scale))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=functools.partial(collate, canvas=canvas))
    results, image_ids = predict(model, loader, device, cfg.num_select, args.amp)
    metrics = coco_metrics(dataset.coco, results, image_ids)
    print(format_metrics(metrics))
    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(f"wrote {output_dir / 'metrics.json'}")
    if results_path is not None:  # (an absolute FILE replaces output_dir)
        write_atomically(results_path, json.dumps(results))
        print(f"wrote {len(results)} detections of {len(image_ids)} images to {results_path}")
    if args.vis:
        save_pictures(model, cfg, dataset, args.vis, args.score_thr, output_dir / "vis", device, args.amp, canvas)


def save_pictures(model: torch.nn.Module, cfg: Config, dataset: CocoDetection, count: int, score_thr: float,
                  folder: Path, device: torch.device, amp: bool = False,
                  canvas: tuple[int, int] | None = None) -> list[Path]:
    """Draw the detections on the first `count` images of the dataset, in their original pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {c: dataset.coco.cats[c]["name"] for c in dataset.coco.cats}
    infos = [dataset.coco.imgs[image_id] for image_id in dataset.ids[:count]]
    saved = []
    for info, stem in zip(infos, picture_names([info["file_name"] for info in infos])):  # a/x.jpg, b/x.jpg: 2 files
        path = dataset.image_dir / info["file_name"]
        image = TF.pil_to_tensor(read_image(path, (info["width"], info["height"]) if "width" in info else None))
        saved.append(folder / f"{stem}.png")
        picture = draw_detections(image, detect_images(model, cfg, [image], device, amp, canvas)[0], names, score_thr)
        save_picture(picture, saved[-1])
    return saved


def save_picture(picture: Image.Image, path: Path) -> None:
    replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


if __name__ == "__main__":
    main()
