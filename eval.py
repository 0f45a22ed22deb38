"""Evaluate a checkpoint with pycocotools, draw detections, or run on any images.

    python eval.py CKPT [--data DIR | --val-images DIR --val-json FILE] [--output-dir DIR]
    python eval.py CKPT --data DIR --vis 8 --score-thr 0.3     # also save 8 pictures with detections
    python eval.py CKPT --image a.jpg photos/ "more/*.png"    # detections on any images: files, folders, globs
    python eval.py CKPT --video in.mp4 --output out.mp4       # every frame's detections drawn (PyAV)
    python eval.py CKPT --image huge.jpg --slice 640          # sliced inference (SAHI): small objects in large images
    python eval.py dino.onnx --data DIR [--runtime openvino]  # the exported file's AP (export.py wrote it)
    python eval.py dino.int8.xml --data DIR                    # its INT8 copy's AP, in OpenVINO

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.ops import box_convert, box_iou

from appendix import plots
from config import Config, ConfigError, TooFewTokens
from appendix.cpu_memory import heap_kept
from data import CocoDetection, DataError, collate, make_transforms, split_paths
from appendix.inference import Detector, check_options, image_sources, merge_detections
from model import postprocess
from appendix.onnx_detect import RUNTIMES, graph_inputs, open_session
from appendix.precision import amp_autocast, at_least_float32
from appendix.runs import replace_atomically, writable, write_atomically
from appendix.video import VideoReader, VideoWriter

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


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


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int], score_thr: float = 0.3) -> dict:
    """COCO box metrics of `detections` (COCO result dicts) on `image_ids`, with AP per category, and what the
    plots draw (plots.py): "pr_curves", pycocotools' interpolated precision at its 101 recall points per
    category, at IoU 0.5 and averaged over 0.5:0.95 (maxDets 100, all areas); "confusion_matrix" of the
    detections scoring `score_thr` or more (confusion_counts)."""
    metrics = {name: 0.0 for name in METRIC_NAMES}
    names = {c: coco_gt.cats[c]["name"] for c in sorted(coco_gt.cats)}
    # None for a class without objects in these images (pycocotools' -1: the mean AP leaves it out)
    present = {a["category_id"] for i in image_ids for a in coco_gt.imgToAnns[i] if not a.get("iscrowd", 0)}
    metrics["per_class_AP"] = {name: 0.0 if c in present else None for c, name in names.items()}
    recall = [i / 100 for i in range(101)]
    metrics["pr_curves"] = {"recall": recall, "classes": {}}
    metrics["confusion_matrix"] = {"score_thr": score_thr, "iou": 0.5, "classes": [*names.values(), "background"],
                                   "counts": confusion_counts(coco_gt, detections, image_ids, score_thr).tolist()}
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


def confusion_counts(coco_gt, detections: list[dict], image_ids: list[int], score_thr: float,
                     iou_thr: float = 0.5) -> np.ndarray:
    """(K + 1, K + 1) counts, rows the true class, columns the predicted one, the last of each background:
    per image, each detection scoring score_thr or more, best first, takes the unmatched ground-truth box
    it overlaps most, whatever its class, if by IoU >= iou_thr (a count in [true, predicted]); one left
    without is a false detection ([background, predicted]) unless it lies on a crowd region (not counted);
    a box no detection takes was missed ([true, background])."""
    index = {c: i for i, c in enumerate(sorted(coco_gt.cats))}
    K = len(index)
    counts = np.zeros((K + 1, K + 1), dtype=np.int64)
    by_image = {i: [] for i in image_ids}
    for d in detections:
        if d["score"] >= score_thr and d["image_id"] in by_image:
            by_image[d["image_id"]].append(d)
    xyxy = lambda boxes: box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")
    for image_id, found in by_image.items():
        anns = coco_gt.imgToAnns[image_id]
        truth = [a for a in anns if not a.get("iscrowd", 0)]
        found.sort(key=lambda d: -d["score"])
        iou = box_iou(xyxy([d["bbox"] for d in found]), xyxy([a["bbox"] for a in truth]))
        crowd = box_iou(xyxy([d["bbox"] for d in found]), xyxy([a["bbox"] for a in anns if a.get("iscrowd", 0)]))
        taken = torch.zeros(len(truth), dtype=torch.bool)
        for i, d in enumerate(found):
            overlap = iou[i].masked_fill(taken, -1)
            j = int(overlap.argmax()) if len(truth) else -1
            if j >= 0 and overlap[j] >= iou_thr:
                taken[j] = True
                counts[index[truth[j]["category_id"]], index[d["category_id"]]] += 1
            elif not (crowd.shape[1] and crowd[i].max() >= iou_thr):
                counts[K, index[d["category_id"]]] += 1
        for j in (~taken).nonzero().flatten().tolist():
            counts[index[truth[j]["category_id"]], K] += 1
    return counts


def format_metrics(metrics: dict) -> str:
    """The seed's table: AP, AP50, AP75, APs, APm, APl, then AP per class, in percent ("-": no such objects)."""
    percent = lambda v: f"{100 * v:5.1f}" if v is not None and v >= 0 else "    -"  # pycocotools: -1 for no objects
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
             amp: bool = False, classes: list[int] | None = None) -> dict | None:
    """COCO metrics of `model` on the loader's CocoDetection dataset, detecting only `classes` (the category
    ids the model was trained on; None: every class); under torch.distributed each process evaluates its
    share and rank 0 returns the metrics (the others None)."""
    predicted = predict(model, loader, device, num_select, amp, classes)
    return coco_metrics(loader.dataset.coco, *predicted) if predicted is not None else None


def with_progress(items, every: float, line) -> Iterator:
    """`items`, one by one, with a progress line `line(done, seconds so far)` printed at most every `every`
    seconds (long validation sets, videos)."""
    start = last_print = time.time()
    for done, item in enumerate(items):
        if done and time.time() - last_print > every:
            last_print = time.time()
            print(line(done, last_print - start), flush=True)
        yield item


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


def evaluating_line(total: int):
    return lambda done, seconds: f"evaluating [{done}/{total}], {(total - done) * seconds / done:.0f} s left"


def predict_sliced(detector: Detector, dataset: CocoDetection, size: int, overlap: float,
                   score_thr: float) -> tuple[list[dict], list[dict], list[int]]:
    """COCO results of SAHI's sliced inference on every image of the dataset, and of the whole image alone
    (its first pass), both with the detections under score_thr dropped; and the image ids."""
    sliced, whole = [], []
    for image_id in with_progress(dataset.ids, 10, evaluating_line(len(dataset))):
        passes = detector.tiles(dataset.original(image_id)[0], size, overlap, score_thr)
        sliced += [r for r in merge_detections(passes).to_coco(image_id) if r["category_id"] in dataset.coco.cats]
        whole += [r for r in passes[0].to_coco(image_id) if r["category_id"] in dataset.coco.cats]
    return sliced, whole, list(dataset.ids)


# --- pictures, video, command line ---------------------------------------------------------------------

def picture_names(paths: list[str]) -> list[str]:
    """A distinct file name stem for each input image: its own stem, or where two share one (a/img.jpg and
    b/img.jpg), its path with the folders joined by '_' (a_img, b_img), and an index if even that repeats."""
    names = [Path(p).stem for p in paths]
    names = [n if names.count(n) == 1 else "_".join(Path(p).with_suffix("").parts).strip("/_") for n, p in zip(names, paths)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def prediction_samples(detector: Detector, dataset: CocoDetection, count: int,
                       score_thr: float) -> list[tuple[torch.Tensor, dict, dict]]:
    """(image, ground truth, detections scoring score_thr or more) of the first `count` validation images, in
    their own pixels: what plots.predictions_grid draws. Crowd regions are not drawn as ground truth."""
    samples = []
    for image_id in dataset.ids[:count]:
        image, truth = dataset.original(image_id)
        found = detector(image, score_thr)
        samples.append((image, truth, {"boxes": found.boxes, "scores": found.scores, "labels": found.labels}))
    return samples


def write_plots(detector: Detector, dataset: CocoDetection, metrics: dict, folder: Path, score_thr: float) -> list[Path]:
    """An evaluation's plots (plots.evaluation_plots) and predictions.jpg, 8 validation images, in `folder`."""
    samples = prediction_samples(detector, dataset, 8, score_thr)
    return plots.evaluation_plots(metrics, folder) + [
        plots.predictions_grid(samples, dataset.category_names, folder / "predictions.jpg", score_thr)]


def save_pictures(detector: Detector, dataset: CocoDetection, count: int, score_thr: float, folder: Path) -> list[Path]:
    """Draw the detections on the first `count` images of the dataset, in their original pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = dataset.ids[:count]
    saved = []
    for image_id, stem in zip(ids, picture_names([dataset.coco.imgs[i]["file_name"] for i in ids])):  # a/x.jpg, b/x.jpg: 2 files
        saved.append(folder / f"{stem}.png")
        save_picture(detector(dataset.original(image_id)[0], score_thr).draw(), saved[-1])
    return saved


def save_picture(picture: Image.Image, path: Path) -> None:
    replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def detect_files(detector: Detector, args: argparse.Namespace, output_dir: Path, results_path: Path | None):
    """--image: each image's detections printed and drawn in OUTPUT_DIR/NAME_detections.png; with
    --save-results, one JSON line per image."""
    sources = image_sources(args.image, "--image")[0]
    names = picture_names([source.name for source in sources])
    lines = []
    for name, found in zip(names, detector.detect_sources(sources, args.score_thr, args.slice, args.overlap, args.batch_size)):
        print(f"{found.source}: {len(found)} detections with score >= {args.score_thr}")
        for score, label, box in zip(found.scores.tolist(), found.names, found.boxes.tolist()):
            print(f"  {label}  {score:.3f}  x1y1x2y2 {[round(v, 1) for v in box]}")
        out = output_dir / f"{name}_detections.png"
        save_picture(found.draw(), out)
        print(f"  drawn in {out}")
        H, W = found.image.shape[1:]
        lines.append(json.dumps({"image": found.source, "height": H, "width": W, **found.to_dict()}))
    if results_path is not None:
        write_atomically(results_path, "".join(line + "\n" for line in lines))
        print(f"wrote the detections of {len(lines)} images to {results_path}")


def detect_video(detector: Detector, args: argparse.Namespace, output: Path, results_path: Path | None):
    """--video: the video with the detections drawn into `output`, a progress line with frames per second;
    with --save-results, one JSON line per frame."""
    with VideoReader(args.video) as reader:
        fps, total = reader.fps, reader.frames
    lines, start = [], time.time()
    frames_line = lambda done, seconds: f"frame {done}/{total or '?'}: {done / seconds:.2f} frames/s"

    def write(tmp: Path):
        with VideoWriter(tmp, fps, output.suffix) as writer:
            frames = detector.video(args.video, args.score_thr, args.slice, args.overlap)
            for index, found in with_progress(frames, 5, frames_line):
                writer.write(np.asarray(found.draw()))
                lines.append(json.dumps({"frame": index, "time": round(index / fps, 3), **found.to_dict()}))

    replace_atomically(output, write)
    print(f"{len(lines)} frames in {time.time() - start:.1f} s ({len(lines) / (time.time() - start):.2f} frames/s); "
          f"wrote {output}")
    if results_path is not None:
        write_atomically(results_path, "".join(line + "\n" for line in lines))
        print(f"wrote the detections of {len(lines)} frames to {results_path}")


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
        results, whole, image_ids = predict_sliced(detector, dataset, args.slice, args.overlap, args.score_thr)
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
        save_pictures(detector, dataset, args.vis, args.score_thr, output_dir / "vis")
    if args.plots:
        written = write_plots(detector, dataset, metrics, output_dir / "plots", args.score_thr)
        print(f"plots: {', '.join(str(p) for p in written)}")


def letterboxed_results(runs: dict, dataset: CocoDetection, size: tuple[int, int]) -> dict[str, list[dict]]:
    """Each of `runs` (name -> a callable taking the exported graph's inputs as numpy arrays, {"images",
    "valid_sizes", "orig_sizes"}, and giving its outputs, scores, labels and boxes first) on every image of
    `dataset`, letterboxed to `size` (height, width) as the exported graph takes them
    (onnx_detect.letterbox): name -> the COCO results of all images."""
    results = {name: [] for name in runs}
    for image_id in with_progress(dataset.ids, 10, evaluating_line(len(dataset.ids))):
        image, _ = dataset.original(image_id)
        feed = graph_inputs(Image.fromarray(image.permute(1, 2, 0).numpy()), *size)
        for name, run in runs.items():
            scores, labels, boxes = (torch.from_numpy(np.asarray(t)) for t in run(feed)[:3])
            found = {"scores": scores[0], "labels": labels[0], "boxes": boxes[0]}
            results[name] += to_coco_results([found], [{"image_id": image_id}], set(dataset.coco.cats))
    return results


def evaluate_exported(args: argparse.Namespace, paths: tuple[Path, Path], output_dir: Path,
                      results_path: Path | None):
    """CKPT is an exported file (.onnx, or --int8's .xml): its COCO metrics on --data in --runtime, each image
    letterboxed to the file's size, printed and written as evaluate_data writes them."""
    session = open_session(args.checkpoint, args.runtime)
    _, _, height, width = session.input_shape
    dataset = CocoDetection(*paths, make_transforms(train=False))
    results = letterboxed_results({"file": session}, dataset, (height, width))["file"]
    metrics = coco_metrics(dataset.coco, results, dataset.ids, args.score_thr)
    print(f"{args.checkpoint} in {RUNTIMES[session.runtime]}, images letterboxed to {height}x{width}:\n"
          f"{format_metrics(metrics)}")
    write_evaluation(metrics, results, len(dataset.ids), output_dir, results_path)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Evaluate a DINO checkpoint (ours or official) with pycocotools, "
                                                 "or run it on images and videos.")
    parser.add_argument("checkpoint", help="ours (train.py), an official release, or a file export.py wrote (.onnx, "
                        "or --int8's .xml; then evaluated on --data in --runtime)")
    parser.add_argument("--data", help="dataset folder: COCO (val2017/, annotations/instances_val2017.json), YOLO "
                        "(data.yaml, or the .yaml file) or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/val.txt)")
    parser.add_argument("--val-images", help="image folder, with --val-json, for any other layout")
    parser.add_argument("--val-json", help="COCO-format annotation file of --val-images")
    parser.add_argument("--image", nargs="+", default=[], metavar="FILE",
                        help="run on these images instead: files, folders, glob patterns ('photos/**/*.jpg')")
    parser.add_argument("--video", metavar="FILE", help="run on a video (needs PyAV: pip install av)")
    parser.add_argument("--output", metavar="FILE", help="--video: the video with the detections drawn "
                                                          "(default OUTPUT_DIR/NAME_detections.mp4)")
    parser.add_argument("--slice", type=int, metavar="SIZE", help="sliced inference (SAHI) for large images with "
                        "small objects: SIZE x SIZE tiles plus the whole image, merged; with --data, detections "
                        "under --score-thr are dropped, and the whole image's AP alone is printed beside")
    parser.add_argument("--overlap", type=float, default=0.2, help="--slice: tiles overlap by this share of SIZE")
    parser.add_argument("--save-results", metavar="FILE",
                        help="also write the detections: COCO results JSON with --data (what the COCO test-dev "
                             "server takes), JSON lines with --image (one per image) and --video (one per "
                             "frame); in --output-dir unless FILE is absolute")
    parser.add_argument("--output-dir", default="eval_output")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="save N validation images with detections")
    parser.add_argument("--plots", action="store_true", help="with --data: precision-recall curves, AP per class, "
                        "the confusion matrix (at --score-thr) and 8 images with ground truth and detections, in "
                        "OUTPUT_DIR/plots/ (needs matplotlib)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="score threshold of the drawn detections "
                        "(and of the confusion matrix, and of --slice's merge)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--scale", type=float, help="image size factor (default: the checkpoint's)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (a minute or more to start; much faster on GPUs): images "
                             "are padded to a fixed size, and the first batch is checked against eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runtime", choices=sorted(RUNTIMES),
                        help="the runtime an exported file is evaluated in (default onnxruntime; openvino for .xml)")
    args = parser.parse_args(argv)
    try:
        run(parser, args)
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    device = device_from_flag(args.device)
    check_options(args.score_thr, args.slice, args.overlap, args.batch_size)
    if args.image and args.video:
        parser.error("give --image or --video, not both")
    if args.output and not args.video:
        parser.error("--output is --video's output video")
    if args.plots:
        if args.image or args.video:
            parser.error("--plots is for evaluations (--data): they plot the ground truth against the detections")
        plots.require_matplotlib()
    paths = None if args.image or args.video else split_paths("val", args.data, args.val_images, args.val_json)
    if paths is None and not (args.image or args.video):
        parser.error("give --data DIR, or --val-images and --val-json, or --image FILE..., or --video FILE")
    output_dir = Path(args.output_dir)
    writable(output_dir / "metrics.json", "--output-dir")
    results_path = writable(output_dir / args.save_results, "--save-results") if args.save_results else None
    suffix = Path(args.checkpoint).suffix
    if suffix in (".onnx", ".xml"):  # export.py's file, or the OpenVINO INT8 copy of --int8
        unused = [flag for flag, value in (("--image", args.image), ("--video", args.video), ("--slice", args.slice),
                                           ("--vis", args.vis), ("--plots", args.plots), ("--amp", args.amp),
                                           ("--compile", args.compile), ("--scale", args.scale)) if value]
        if unused:
            parser.error(f"{unused[0]} is for checkpoints: an exported file is evaluated on --data (python -m "
                         f"appendix.onnx_detect runs it on images)")
        args.runtime = args.runtime or ("openvino" if suffix == ".xml" else "onnxruntime")
        if suffix == ".xml" and args.runtime != "openvino":
            parser.error(f"{args.checkpoint} is an OpenVINO file: --runtime openvino runs it")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"{args.checkpoint} does not exist")
        return evaluate_exported(args, paths, output_dir, results_path)
    if args.runtime:
        parser.error("--runtime is for an exported file (export.py's .onnx, or its --int8 .xml)")
    if args.video:
        video_out = writable(Path(args.output or output_dir / f"{Path(args.video).stem}_detections.mp4"), "--output")
        VideoWriter.check_suffix(video_out.suffix, "--output")
    detector = Detector.load(args.checkpoint, device, args.amp, args.compile,
                             **({"scale": args.scale} if args.scale is not None else {}))
    if args.compile:
        torch._logging.set_logs(recompiles=True)  # say which frame recompiles, and why
    if args.image:
        detect_files(detector, args, output_dir, results_path)
    elif args.video:
        detect_video(detector, args, video_out, results_path)
    else:
        evaluate_data(detector, args, paths, output_dir, results_path)


if __name__ == "__main__":
    main()
