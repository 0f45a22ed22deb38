"""Detections from an exported DINO (export.py) with ONNX Runtime or OpenVINO, numpy and Pillow only: no torch.

    python -m appendix.onnx_detect dino.onnx street.jpg [more.jpg photos/ 'shots/**/*.png' ...] [--score-thr 0.3]
                          [--runtime onnxruntime|openvino]

Images are read as training and eval.py read them (image_io.read_image: EXIF orientation, RGB, 16-bit
scaled to 8 bits); folders and glob patterns as eval.py --image takes them.

The exported graph takes images letterboxed to its fixed size (scaled to fit with their aspect ratio
kept, zero-padded at the bottom and right), the size each fills and its original size, and gives the
best detections in the original image's pixels. `letterbox` here resizes with Pillow's bilinear filter,
eval.py with torchvision's, so their detections can differ by as much as the two resizings do.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from appendix.image_io import DataError, image_files, read_image, rgb


RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}  # --runtime (the module and the pip package) -> name


class Session:
    """The exported model in one runtime, on the CPU: `session(feed)` -> its outputs as numpy arrays, in the
    graph's order, then `extra_outputs` (names of intermediate tensors, for export.py's check);
    `session.categories`, the category names by id that export.py wrote into the file ({} if none).

    OpenVINO computes in float32 as exported (its default on CPUs with bf16 units is bf16)."""

    def __init__(self, path: str | Path, runtime: str = "onnxruntime", extra_outputs: tuple[str, ...] = (),
                 threads: int | None = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}, got {runtime!r}")
        try:
            __import__(runtime)
        except ImportError:
            sys.exit(f"onnx_detect.py needs {RUNTIMES[runtime]}: pip install {runtime}")
        self.runtime, self.path = runtime, Path(path)
        self.run = self._onnxruntime(extra_outputs, threads) if runtime == "onnxruntime" else self._openvino(extra_outputs, threads)

    def _onnxruntime(self, extra_outputs, threads):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
        if threads:
            options.intra_op_num_threads = threads
        model = str(self.path)
        if extra_outputs:  # ONNX Runtime gives graph outputs only: add them to a copy of the graph
            import onnx
            proto = onnx.load(model)
            proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
            model = proto.SerializeToString()
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_shape = session.get_inputs()[0].shape
        self.categories = named(session.get_modelmeta().custom_metadata_map.get("categories"))
        return lambda feed: session.run(None, feed)

    def _openvino(self, extra_outputs, threads):
        import openvino
        core = openvino.Core()
        model = core.read_model(str(self.path))
        if extra_outputs:
            model.add_outputs(list(extra_outputs))
        self.input_shape = [d.get_length() if d.is_static else "batch" for d in model.inputs[0].get_partial_shape()]
        where = ["framework", "categories"]  # where OpenVINO keeps an ONNX file's metadata, and saves it on
        self.categories = named(model.get_rt_info(where).astype(str) if model.has_rt_info(where) else None)
        config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
        compiled = core.compile_model(model, "CPU", config)
        return lambda feed: list(compiled(feed).values())

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run(feed)


def named(metadata: str | None) -> dict[int, str]:
    """export.py's "categories" metadata (JSON, names by id) as {id: name}."""
    return {int(k): v for k, v in json.loads(metadata).items()} if metadata else {}


def letterbox(image: Image.Image, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` scaled to fit height x width with its aspect ratio kept, at the top left of a zero canvas:
    (3, height, width) uint8 RGB, and the (height, width) it fills."""
    scale = min(height / image.height, width / image.width)
    h, w = max(1, round(image.height * scale)), max(1, round(image.width * scale))
    canvas = np.zeros((3, height, width), np.uint8)
    canvas[:, :h, :w] = np.asarray(rgb(image).resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)
    return canvas, (h, w)


def graph_inputs(image: Image.Image, height: int, width: int) -> dict[str, np.ndarray]:
    """The exported graph's inputs for one image: {"images": (1, 3, height, width) uint8 letterboxed,
    "valid_sizes": (1, 2) and "orig_sizes": (1, 2) int64}."""
    pixels, valid = letterbox(image, height, width)
    return {"images": pixels[None], "valid_sizes": np.array([valid], dtype=np.int64),
            "orig_sizes": np.array([[image.height, image.width]], dtype=np.int64)}


def detect(session, image: Image.Image, score_thr: float = 0.3) -> list[tuple[float, int, list[float]]]:
    """[(score, category id, [x1, y1, x2, y2] in the image's pixels)], best first, score >= score_thr."""
    _, _, height, width = session.input_shape  # the export's fixed size (the batch may be named)
    scores, labels, boxes = session(graph_inputs(image, height, width))[:3]
    keep = scores[0] >= score_thr
    return [(float(s), int(l), b.tolist()) for s, l, b in zip(scores[0][keep], labels[0][keep], boxes[0][keep])]


def open_session(path: str, runtime: str) -> Session:
    """Session for a file a user named, or a DataError (one line) saying why it is none."""
    if not Path(path).is_file():
        raise DataError(f"model {path} does not exist (export.py writes it)")
    if Path(path).suffix not in (".onnx", ".xml"):
        raise DataError(f"model {path} is not an exported file: python -m appendix.export CKPT writes a .onnx "
                        f"file (and --int8 a .xml one); a checkpoint is run by eval.py CKPT --image ...")
    if Path(path).suffix == ".xml" and runtime != "openvino":
        raise DataError(f"model {path} is an OpenVINO file: add --runtime openvino")
    try:
        return Session(path, runtime)
    except Exception as e:  # the runtime's own error on a file it cannot read: many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"model {path}: {RUNTIMES[runtime]} cannot load it ({first[:300]})") from None


def score_threshold(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file export.py wrote (or its --int8 .xml, with --runtime openvino)")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--score-thr", type=score_threshold, default=0.3)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="onnxruntime")
    args = parser.parse_args()
    try:
        session = open_session(args.model, args.runtime)
        for path in image_files(args.images, "image"):
            detections = detect(session, read_image(path, None), args.score_thr)
            print(f"{path}: {len(detections)} detections with score >= {args.score_thr}")
            for score, label, box in detections:
                print(f"  {session.categories.get(label, label)}  {score:.3f}  x1y1x2y2 {[round(v, 1) for v in box]}")
    except (DataError, FileNotFoundError) as e:  # a missing or wrong model, a missing or unreadable image: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
