"""Evaluate a checkpoint with pycocotools: the COCO box metrics of DETR's and DINO's tables.

    python eval.py CKPT [--data DIR | --val-images DIR --val-json FILE] [--output-dir DIR]
    python eval.py CKPT --data DIR --vis 8 --plots         # also pictures of detections, PR curves, confusion matrix
    python eval.py CKPT --data DIR --slice 640             # the AP of sliced inference (SAHI), beside the whole image's
    python eval.py dino.onnx --data DIR [--runtime openvino]  # an exported file's AP (python -m appendix.export)

Prints AP, AP50, AP75, APs, APm, APl and the AP of each class, and writes them to OUTPUT_DIR/metrics.json.
CKPT is one of ours (train.py) or an official DINO-4scale release checkpoint (R50 or Swin-L, 91 COCO
classes, detected from its parameter names). Detections on images and videos: python -m appendix.detect
(`--image` and `--video` given here go there).
"""
import argparse
import contextlib
import functools
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from config import Config, ConfigError, TooFewTokens
from data import CocoDetection, DataError, collate, make_transforms, split_paths
from model import postprocess
from appendix import detect, plots
from appendix.cpu_memory import heap_kept
from appendix.inference import Detections, Detector
from appendix.onnx_detect import RUNTIMES, open_session
from appendix.precision import amp_autocast, at_least_float32
from appendix.progress import evaluating_line, with_progress
from appendix.runs import writable, write_atomically

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int], score_thr: float = 0.3) -> dict:
    """COCO box metrics of `detections` (COCO result dicts) on `image_ids`, with AP per category, and what the
    plots draw (plots.py): "pr_curves", pycocotools' interpolated precision at its 101 recall points per
    category, at IoU 0.5 and averaged over 0.5:0.95 (maxDets 100, all areas); "confusion_matrix" of the
    detections scoring `score_thr` or more (plots.confusion_counts)."""
    metrics = {name: 0.0 for name in METRIC_NAMES}
    names = {c: coco_gt.cats[c]["name"] for c in sorted(coco_gt.cats)}
    # None for a class without objects in these images (pycocotools' -1: the mean AP leaves it out)
    present = {a["category_id"] for i in image_ids for a in coco_gt.imgToAnns[i] if not a.get("iscrowd", 0)}
    metrics["per_class_AP"] = {name: 0.0 if c in present else None for c, name in names.items()}
    recall = [i / 100 for i in range(101)]
    metrics["pr_curves"] = {"recall": recall, "classes": {}}
    metrics["confusion_matrix"] = {"score_thr": score_thr, "iou": 0.5, "classes": [*names.values(), "background"],
                                   "counts": plots.confusion_counts(coco_gt, detections, image_ids, score_thr).tolist()}
    if not detections:
        return metrics
    evaluator = run_cocoeval(coco_gt, detections, image_ids)
    metrics.update({name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)})
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall, classes, areas, max dets)
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():  # -1: the category has no ground truth here
            metrics["per_class_AP"][names[cat_id]] = float(p[p > -1].mean())
            metrics["pr_curves"]["classes"][names[cat_id]] = {"iou_0.5": p[0].clip(0).tolist(),
                                                              "iou_0.5:0.95": p.clip(0).mean(0).tolist()}
    return metrics


def run_cocoeval(coco_gt, detections: list[dict], image_ids: list[int]):
    """pycocotools' COCOeval of the detections, evaluated, accumulated and summarised."""
    from pycocotools.cocoeval import COCOeval  # here, not at the top: see data.load_coco
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it is given
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def format_metrics(metrics: dict) -> str:
    """The seed's table: AP, AP50, AP75, APs, APm, APl, then AP per class, in percent ("-": no such objects)."""
    percent = lambda v: f"{100 * v:5.1f}" if v is not None and v >= 0 else "    -"  # pycocotools: -1 for no objects
    lines = ["  ".join(f"{name} {percent(metrics[name])}" for name in METRIC_NAMES[:6]), "AP per class:"]
    lines += [f"  {name:20s} {percent(ap)}" for name, ap in metrics["per_class_AP"].items()]
    return "\n".join(lines)


def to_coco_results(detections: list[dict], targets: list[dict], category_ids: set[int]) -> list[dict]:
    """postprocess output (boxes x1y1x2y2 in original pixels) -> COCO result dicts (boxes xywh), of the data's
    categories only (a label that is no category can never be right)."""
    return [r for det, target in zip(detections, targets)
            for r in Detections(det["boxes"], det["scores"], det["labels"], []).to_coco(target["image_id"])
            if r["category_id"] in category_ids]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_select: int = Config.num_select,
             amp: bool = False, classes: list[int] | None = None) -> dict | None:
    """COCO metrics of `model` on the loader's CocoDetection dataset, detecting only `classes` (the category
    ids the model was trained on; None: every class); under torch.distributed each process evaluates its
    share and rank 0 returns the metrics (the others None)."""
    predicted = predict(model, loader, device, num_select, amp, classes)
    return coco_metrics(loader.dataset.coco, *predicted) if predicted is not None else None


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, num_select: int = Config.num_select,
            amp: bool = False, classes: list[int] | None = None) -> tuple[list[dict], list[int]] | None:
    """The detections of `model` on the loader's CocoDetection dataset, among `classes` (None: all), as COCO
    results (what pycocotools' loadRes and the COCO test-dev server take), and the image ids they cover;
    under torch.distributed, rank 0 returns every process's (the others None)."""
    dataset = loader.dataset
    model.eval()
    results, image_ids = [], []
    shows_progress = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    batches = with_progress(loader, 10, evaluating_line(len(loader))) if shows_progress else loader
    for images, mask, targets in batches:
        with amp_autocast(device, amp), heap_kept(device):
            outputs = model(images.to(device), mask.to(device))
        outputs = {k: at_least_float32(outputs[k]) for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        found = postprocess(outputs, sizes, num_select, classes=classes)
        detections = [{k: v.cpu() for k, v in d.items()} for d in found]
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


def write_evaluation(metrics: dict, results: list[dict], image_count: int, output_dir: Path, results_path: Path | None):
    """OUTPUT_DIR/metrics.json, and with --save-results the COCO results (an absolute FILE replaces output_dir)."""
    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(f"wrote {output_dir / 'metrics.json'}")
    if results_path is not None:
        write_atomically(results_path, json.dumps(results))
        print(f"wrote {len(results)} detections of {image_count} images to {results_path}")


def evaluate_data(detector: Detector, args: argparse.Namespace, paths: tuple[Path, Path], output_dir: Path,
                  results_path: Path | None):
    """--data (or --val-images, --val-json): COCO metrics printed and written to OUTPUT_DIR/metrics.json;
    with --slice, those of sliced inference and of the whole image alone, both at --score-thr."""
    cfg = detector.cfg
    dataset = CocoDetection(*paths, make_transforms(train=False, scale=cfg.scale))
    if args.slice:
        results, whole, image_ids = detect.predict_sliced(detector, dataset, args.slice, args.overlap, args.score_thr)
        whole_metrics = coco_metrics(dataset.coco, whole, image_ids, args.score_thr)
        print(f"whole images alone, detections with score >= {args.score_thr}:\n{format_metrics(whole_metrics)}\n"
              f"sliced ({args.slice}x{args.slice} tiles, overlap {args.overlap}, and the whole image), merged:")
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                             collate_fn=functools.partial(collate, canvas=detector.canvas))
        results, image_ids = predict(detector.model, loader, detector.device, cfg.num_select, args.amp,
                                     detector.classes)
    metrics = coco_metrics(dataset.coco, results, image_ids, args.score_thr)
    print(format_metrics(metrics))
    if args.slice:
        metrics["whole_image"] = whole_metrics
    write_evaluation(metrics, results, len(image_ids), output_dir, results_path)
    if args.vis:
        detect.save_pictures(detector, dataset, args.vis, args.score_thr, output_dir / "vis")
    if args.plots:
        written = detect.write_plots(detector, dataset, metrics, output_dir / "plots", args.score_thr)
        print(f"plots: {', '.join(str(p) for p in written)}")


def evaluate_exported(args: argparse.Namespace, paths: tuple[Path, Path], output_dir: Path,
                      results_path: Path | None):
    """CKPT is an exported file (.onnx, or --int8's .xml): its COCO metrics on --data in --runtime, each image
    letterboxed to the file's size, printed and written as evaluate_data writes them."""
    session = open_session(args.checkpoint, args.runtime)
    _, _, height, width = session.input_shape
    dataset = CocoDetection(*paths, make_transforms(train=False))
    results = detect.letterboxed_results({"file": session}, dataset, (height, width))["file"]
    metrics = coco_metrics(dataset.coco, results, dataset.ids, args.score_thr)
    print(f"{args.checkpoint} in {RUNTIMES[session.runtime]}, images letterboxed to {height}x{width}:\n"
          f"{format_metrics(metrics)}")
    write_evaluation(metrics, results, len(dataset.ids), output_dir, results_path)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] in ("--image", "--video") for a in argv):  # detections on images, videos: appendix/detect.py
        return detect.main(argv, prog="eval.py")
    parser = argparse.ArgumentParser(description="Evaluate a DINO checkpoint (ours or official) with pycocotools.",
                                     epilog="Detections on images and videos: python -m appendix.detect CKPT --image FILE")
    parser.add_argument("checkpoint", help="ours (train.py), an official release, or a file appendix/export.py wrote "
                        "(.onnx, or --int8's .xml; then evaluated in --runtime)")
    parser.add_argument("--data", help="dataset folder: COCO (val2017/, annotations/instances_val2017.json), YOLO "
                        "(data.yaml, or the .yaml file) or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/val.txt)")
    parser.add_argument("--val-images", help="image folder, with --val-json, for any other layout")
    parser.add_argument("--val-json", help="COCO-format annotation file of --val-images")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="save N validation images with detections")
    parser.add_argument("--plots", action="store_true", help="precision-recall curves, AP per class, the confusion "
                        "matrix (at --score-thr) and 8 images with ground truth and detections, in OUTPUT_DIR/plots/ "
                        "(needs matplotlib)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES),
                        help="the runtime an exported file is evaluated in (default onnxruntime; openvino for .xml)")
    detect.add_detector_flags(parser)
    args = parser.parse_args(argv)
    try:
        run(parser, args)
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    detect.check_flags(args)
    if args.plots:
        plots.require_matplotlib()
    paths = split_paths("val", args.data, args.val_images, args.val_json)
    if paths is None:
        parser.error("give --data DIR, or --val-images and --val-json (detections on images: python -m appendix.detect)")
    output_dir = Path(args.output_dir)
    writable(output_dir / "metrics.json", "--output-dir")
    results_path = writable(output_dir / args.save_results, "--save-results") if args.save_results else None
    suffix = Path(args.checkpoint).suffix
    if suffix in detect.EXPORTED:
        unused = [flag for flag, value in (("--slice", args.slice), ("--vis", args.vis), ("--plots", args.plots),
                                           ("--amp", args.amp), ("--compile", args.compile), ("--scale", args.scale))
                  if value]
        if unused:
            parser.error(f"{unused[0]} is for checkpoints: an exported file is evaluated as it is")
        args.runtime = args.runtime or ("openvino" if suffix == ".xml" else "onnxruntime")
        if suffix == ".xml" and args.runtime != "openvino":
            parser.error(f"{args.checkpoint} is an OpenVINO file: --runtime openvino runs it")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"{args.checkpoint} does not exist")
        return evaluate_exported(args, paths, output_dir, results_path)
    if args.runtime:
        parser.error("--runtime is for an exported file (appendix/export.py's .onnx, or its --int8 .xml)")
    evaluate_data(detect.load_detector(args), args, paths, output_dir, results_path)


if __name__ == "__main__":
    main()
