"""Detections on images, folders and videos, and the pictures of a run (not in the paper).

    python -m appendix.detect CKPT --image a.jpg photos/ "more/*.png"   # files, folders, globs
    python -m appendix.detect CKPT --video in.mp4 --output out.mp4      # every frame's detections drawn (PyAV)
    python -m appendix.detect CKPT --image huge.jpg --slice 640         # sliced inference (SAHI): small objects

Each image's detections are printed and drawn in OUTPUT_DIR/NAME_detections.png; --save-results also writes
them as JSON lines (one per image or frame). CKPT is one of ours (train.py) or an official DINO-4scale release.
This is the command line of appendix/inference.py's Detector; eval.py (COCO metrics) draws its --vis pictures,
its --plots and its sliced evaluation through this file, and forwards --image and --video here.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from appendix import plots
from appendix.inference import Detections, Detector, check_options, device_from_flag, image_sources, merge_detections
from appendix.onnx_detect import graph_inputs
from appendix.progress import evaluating_line, with_progress
from appendix.runs import replace_atomically, writable, write_atomically
from appendix.video import VideoReader, VideoWriter
from config import ConfigError, TooFewTokens
from data import CocoDetection, DataError

EXPORTED = (".onnx", ".xml")  # appendix/export.py's file, or its --int8 OpenVINO copy


# --- the pictures of a run and of an evaluation ---------------------------------------------------------

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


# --- images, folders, videos, slices -----------------------------------------------------------------

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
            found = Detections(boxes[0], scores[0], labels[0], [])
            results[name] += [r for r in found.to_coco(image_id) if r["category_id"] in dataset.coco.cats]
    return results


# --- the command line --------------------------------------------------------------------------------

def add_detector_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of running a checkpoint, eval.py's and this command's alike."""
    parser.add_argument("--slice", type=int, metavar="SIZE", help="sliced inference (SAHI) for large images with "
                        "small objects: SIZE x SIZE tiles plus the whole image, merged; in an evaluation, detections "
                        "under --score-thr are dropped, and the whole image's AP alone is printed beside")
    parser.add_argument("--overlap", type=float, default=0.2, help="--slice: tiles overlap by this share of SIZE")
    parser.add_argument("--score-thr", type=float, default=0.3, help="score threshold of the drawn detections "
                        "(and of the confusion matrix, and of --slice's merge)")
    parser.add_argument("--save-results", metavar="FILE",
                        help="also write the detections: COCO results JSON in an evaluation (what the COCO test-dev "
                             "server takes), JSON lines with --image (one per image) and --video (one per frame); "
                             "in --output-dir unless FILE is absolute")
    parser.add_argument("--output-dir", default="eval_output")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--scale", type=float, help="image size factor (default: the checkpoint's)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (a minute or more to start; much faster on GPUs): images "
                             "are padded to a fixed size, and the first batch is checked against eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_detector(args: argparse.Namespace) -> Detector:
    """The checkpoint's Detector as the flags ask (add_detector_flags)."""
    detector = Detector.load(args.checkpoint, device_from_flag(args.device), args.amp, args.compile,
                             **({"scale": args.scale} if args.scale is not None else {}))
    if args.compile:
        torch._logging.set_logs(recompiles=True)  # say which frame recompiles, and why
    return detector


def main(argv: list[str] | None = None, prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog or "python -m appendix.detect", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("checkpoint", help="ours (train.py) or an official DINO-4scale release")
    parser.add_argument("--image", nargs="+", default=[], metavar="FILE",
                        help="files, folders, glob patterns ('photos/**/*.jpg')")
    parser.add_argument("--video", metavar="FILE", help="a video (needs PyAV: pip install av)")
    parser.add_argument("--output", metavar="FILE", help="--video: the video with the detections drawn "
                                                          "(default OUTPUT_DIR/NAME_detections.mp4)")
    add_detector_flags(parser)
    args = parser.parse_args(argv)
    try:
        run(parser, args)
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def check_flags(args: argparse.Namespace) -> None:
    """add_detector_flags' values checked before any work: one line for the first wrong one."""
    device_from_flag(args.device)
    check_options(args.score_thr, args.slice, args.overlap, args.batch_size)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    check_flags(args)
    if bool(args.image) == bool(args.video):
        parser.error("give --image FILE... or --video FILE (one of them)")
    if args.output and not args.video:
        parser.error("--output is --video's output video")
    if Path(args.checkpoint).suffix in EXPORTED:
        parser.error(f"{'--image' if args.image else '--video'} is for checkpoints: an exported file is evaluated on "
                     f"--data by eval.py, and python -m appendix.onnx_detect runs it on images")
    output_dir = Path(args.output_dir)
    results_path = writable(output_dir / args.save_results, "--save-results") if args.save_results else None
    if args.video:
        video_out = writable(Path(args.output or output_dir / f"{Path(args.video).stem}_detections.mp4"), "--output")
        VideoWriter.check_suffix(video_out.suffix, "--output")
    else:
        writable(output_dir / "detections.png", "--output-dir")
    detector = load_detector(args)
    if args.image:
        detect_files(detector, args, output_dir, results_path)
    else:
        detect_video(detector, args, video_out, results_path)


if __name__ == "__main__":
    main()
