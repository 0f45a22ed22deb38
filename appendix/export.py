"""Export a trained DINO to ONNX: the whole detector, from images to post-processed detections.

    python -m appendix.export CKPT [--output dino.onnx] [--height H --width W] [--batch N | --dynamic-batch] [--opset 17]
                          [--msda gather|grid_sample] [--check-ap DIR] [--int8 --calibration DIR]

CKPT is one of ours or an official DINO-4scale release checkpoint (R50 or Swin-L). The graph takes
    images       (B, 3, H, W) uint8 RGB: each image scaled to fit H x W with its aspect ratio kept, at
                 the top left, zero-padded (letterboxed: onnx_detect.letterbox)
    valid_sizes  (B, 2) int64: the (height, width) each image fills
    orig_sizes   (B, 2) int64: the (height, width) of each original image
and gives, best first, N = num_select (300) of each image's detections:
    scores (B, N) float32, labels (B, N) int64 category ids, boxes (B, N, 4) float32 x1y1x2y2 in the
    original image's pixels, clipped to it.
It computes what `model(images, mask)` computes on the same padded batch, the mask being the padding:
normalisation, the model, and model.select_detections, all in the graph.

How (plumbing, not the paper): torch's TorchScript-based exporter (`dynamo=False`), which writes opset
17 itself (LayerNormalization as one op) and traces R50 in seconds; the level layout, anchors and
reference points are constants of the fixed input size, top-k takes a constant k. The deformable
attention is never the CUDA kernel: by default it is traced as gathers and arithmetic
(msda_cuda.ms_deform_attn_gather: Gather, Floor, MatMul, no GridSample, which some TensorRT versions
compile wrongly: NVIDIA/TensorRT#4813), or with --msda grid_sample as the reference (F.grid_sample,
ONNX GridSample, opset 16 on).
After writing the file, export.py runs it in ONNX Runtime, and in OpenVINO where it is installed, on
random images and on a generated one, and compares with PyTorch, near ties resolved as the runtime
resolved them (`compare_with_ties_resolved`); it exits non-zero if they differ. --check-ap DIR then
compares their AP on DIR's validation images; --int8 writes an INT8 copy for OpenVINO (NNCF).
"""
import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import random
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from appendix.checkpoints import model_from_checkpoint
from config import ConfigError
from data import (IMAGENET_MEAN, IMAGENET_STD, CocoDetection, DataError, eval_canvas, make_transforms, shapes_image,
                  split_paths)
from eval import coco_metrics
from appendix.detect import letterboxed_results
from appendix.image_io import image_files, read_image
from appendix.inference import Agreement, compare_detections, detected_classes
from model import select_detections
from msda_cuda import TRACED_FORMULATIONS, traced_as
from appendix.onnx_detect import RUNTIMES, Session, graph_inputs, letterbox
from appendix.runs import replace_atomically, writable

# the newest opset torch's TorchScript-based exporter writes (20 in torch 2.14)
MAX_OPSET = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
INPUTS, OUTPUTS = ["images", "valid_sizes", "orig_sizes"], ["scores", "labels", "boxes"]


class Mismatch(Exception):
    """The exported file does not compute what PyTorch computes."""


class Deployable(nn.Module):
    """The detector as export.py writes it: uint8 letterboxed images, their valid and original sizes ->
    scores, labels, boxes (see the module docstring)."""

    def __init__(self, model: nn.Module, num_select: int, classes: list[int] | None = None):
        super().__init__()
        self.model, self.num_select = model, num_select
        # the class indices that are the checkpoint's categories (inference.detected_classes), a constant of the graph
        self.register_buffer("classes", torch.tensor(classes) if classes is not None else None, persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()  # for good: the exporter puts back the mode it found, and training mode turns on Swin's drop path

    def forward(self, images: Tensor, valid_sizes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, _, H, W = images.shape
        rows = torch.arange(H, device=images.device)[None, :, None]
        cols = torch.arange(W, device=images.device)[None, None, :]
        mask = (rows >= valid_sizes[:, :1, None]) | (cols >= valid_sizes[:, 1:, None])  # (B, H, W) True on padding
        x = (images.float() / 255 - self.mean) / self.std  # data.make_transforms' normalisation
        out = self.model(x.masked_fill(mask[:, None], 0.0), mask)  # padded with zeros after it, as data.collate
        return select_detections(out["pred_logits"], out["pred_boxes"], orig_sizes, self.num_select, True, self.classes)


def export(deployable: Deployable, path: Path, height: int, width: int, batch: int, dynamic_batch: bool,
           opset: int, msda: str = "gather", categories: dict[int, str] | None = None) -> float:
    """Write the ONNX file, the deformable attention traced as `msda` (msda_cuda.traced_as), and the
    category names by id in its metadata ("categories", JSON: onnx_detect.py prints them); returns the
    seconds it took."""
    example = random_inputs(batch, height, width, seed=0)
    start = time.perf_counter()

    traced = io.BytesIO()  # the graph in memory, its metadata added, then written once
    with torch.no_grad(), warnings.catch_warnings(), traced_as(msda):
        # tracing warns at every shape it turns into a constant: fixed input sizes are the point
        warnings.simplefilter("ignore")
        torch.onnx.export(deployable, example, traced, dynamo=False, opset_version=opset, input_names=INPUTS,
                          output_names=OUTPUTS, do_constant_folding=True,
                          dynamic_axes={name: {0: "batch"} for name in INPUTS + OUTPUTS} if dynamic_batch else None)
    import onnx
    graph = onnx.load_from_string(traced.getvalue())
    onnx.helper.set_model_props(graph, {"categories": json.dumps(categories or {})})
    replace_atomically(path, lambda tmp: onnx.save(graph, str(tmp)))
    return time.perf_counter() - start


def random_inputs(batch: int, height: int, width: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Letterboxed random images of random aspect ratios: (images, valid_sizes, orig_sizes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, height, width, dtype=torch.uint8)
    valid, orig = [], []
    for b in range(batch):
        h0, w0 = (int(v) for v in torch.randint(64, 2000, (2,), generator=g))
        scale = min(height / h0, width / w0)
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        images[b, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        valid.append((h, w))
        orig.append((h0, w0))
    return images, torch.tensor(valid), torch.tensor(orig)


def generated_inputs(batch: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """A generated picture of coloured shapes (data.shapes_image), letterboxed as onnx_detect does, in every
    slot of the batch."""
    image, _ = shapes_image(random.Random(0), 560, 420)
    pixels, valid = letterbox(image, height, width)
    return (torch.from_numpy(pixels)[None].repeat(batch, 1, 1, 1), torch.tensor([valid] * batch),
            torch.tensor([[image.height, image.width]] * batch))


def query_selection_output(path: Path) -> str:
    """The name, in the exported graph, of the tokens the mixed query selection keeps (the top-Q of
    model.mixed_query_selection): the indices of the graph's first TopK (the second is select_detections')."""
    import onnx
    tops = [node for node in onnx.load(str(path)).graph.node if node.op_type == "TopK"]
    if len(tops) != 2:
        raise Mismatch(f"{path} holds {len(tops)} TopK operators, not the query selection's and the detections'")
    return tops[0].output[1]


@contextlib.contextmanager
def forced_selection(model: nn.Module, tokens: Tensor, scores: list[Tensor]):
    """Within it, `model` keeps `tokens` (B, Q) in its mixed query selection, in that order, and appends the
    token scores (B, S) it would have chosen from to `scores`. A hook on the encoder's class head records each
    token's best class logit, then lifts the kept tokens' logits above every other, in their order: the
    top-Q are then `tokens` (the selected logits themselves feed only the encoder's auxiliary outputs)."""
    def keep(module: nn.Module, inputs, logits: Tensor) -> Tensor:  # logits (B, S, K)
        scores.append(logits.max(-1)[0])
        Q = tokens.shape[1]
        above = logits.amax() + 1 + torch.arange(Q, 0, -1, device=logits.device, dtype=logits.dtype)  # (Q,)
        return logits.scatter(1, tokens[..., None].expand(-1, -1, logits.shape[-1]),
                              above[None, :, None].expand(len(tokens), -1, logits.shape[-1]))
    handle = model.enc_class_head.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def compare_with_ties_resolved(deployable: Deployable, inputs, got: list, tol: float) -> tuple[bool, str]:
    """Whether a runtime's outputs `got` (scores, labels, boxes, the query selection's tokens) are PyTorch's on
    `inputs`, with near ties resolved as the runtime resolved them: the tokens it kept must be a top-k of
    PyTorch's token scores (in its order, each score within `tol` of the k best), and PyTorch, made to keep
    the same tokens, must give the same detections: every one within `tol` (score, box over the image's
    size), except those within `tol` of the last kept score, which may trade places with ones just below.
    On random weights near ties are everywhere; this compares what is comparable. Returns (agrees, report)."""
    tokens, token_scores = torch.from_numpy(got[3]).long(), []
    with torch.no_grad(), forced_selection(deployable.model, tokens, token_scores):
        want = deployable(*inputs)
    best = token_scores[0].topk(tokens.shape[1], dim=1)
    selection_gap = (token_scores[0].gather(1, tokens) - best.values).abs().max().item()
    swapped = int((tokens != best.indices).sum())
    required = matched = 0
    worst = Agreement(1.0, 0.0, 0.0)
    for b in range(len(tokens)):
        keep = want[0][b] > want[0][b, -1] + tol  # not tied with the last kept
        diff = compare_detections([g[b:b + 1] for g in got[:3]], [w[b:b + 1, keep] for w in want], inputs[2][b:b + 1], tol)
        required, matched = required + int(keep.sum()), matched + round(diff.matched * int(keep.sum()))
        worst = Agreement(1.0, max(worst.score, diff.score), max(worst.box, diff.box))
    agrees = selection_gap <= tol and matched == required
    return agrees, (f"query selection within {selection_gap:.0e} ({swapped} near-tied tokens kept in another order); "
                    f"{matched} of {required} detections matched within {tol:g} ({want[0].numel() - required} tied with "
                    f"the last kept not required), largest differences: score {worst.score:.1e}, box {worst.box:.1e}")


def check(path: Path, deployable: Deployable, height: int, width: int, batch: int, runtimes: tuple[str, ...],
          tol: float = 1e-4) -> list[str]:
    """Run the file in each runtime on random and generated inputs and compare with PyTorch, near ties
    resolved as the runtime resolved them (compare_with_ties_resolved); returns the report's lines; raises
    Mismatch when any differs."""
    selection = query_selection_output(path)
    lines, failed = [], []
    for runtime in runtimes:
        session = Session(path, runtime, extra_outputs=(selection,))
        for name, inputs in (("random images", random_inputs(batch, height, width, seed=1)),
                             ("generated image", generated_inputs(batch, height, width))):
            agrees, report = compare_with_ties_resolved(
                deployable, inputs, session({k: v.numpy() for k, v in zip(INPUTS, inputs)}), tol)
            lines.append(f"{RUNTIMES[runtime]} against PyTorch, {name}: {report}")
            if not agrees:
                failed.append(f"{RUNTIMES[runtime]} on the {name}")
    if failed:
        raise Mismatch(f"the export disagrees with PyTorch: {', '.join(failed)}:\n" + "\n".join(lines))
    return lines


# kept float32 by --int8: the scores and the boxes (the class and box heads, the encoder's too: the query
# selection's top-k and the box regression in inverse-sigmoid space), and where the attention looks and how
# much (its offsets, and its weights, which read the same input)
KEPT_FLOAT = ("class_head", "box_head", "sampling_offsets", "attention_weights")
CALIBRATION_IMAGES = 300


def int8_nodes(model) -> list[str]:
    """The nodes --int8 quantises: every Conv, and every MatMul or Gemm by a constant weight (the linear layers;
    not the attention's weighted sums of sampled values), except the layers of KEPT_FLOAT. The
    post-processing has none of these: it stays float32."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {name for node in model.graph.node if node.op_type == "Constant" for name in node.output}
    return [node.name for node in model.graph.node
            if (node.op_type == "Conv" or node.op_type in ("MatMul", "Gemm") and node.input[1] in constants)
            and not any(part in node.name for part in KEPT_FLOAT)]


def quantize_int8(path: Path, output: Path, images: list[Path]) -> float:
    """Write an INT8 copy of the exported file `path` for OpenVINO to `output` (.xml, its weights in the .bin
    beside it): NNCF's post-training quantisation (int8 weights and activations, ranges from the values seen
    on `images`, letterboxed as the graph takes them, then its fast bias correction) of int8_nodes, every
    other layer left float32. Returns the seconds it took."""
    import nncf
    import onnx
    import openvino
    model = onnx.load(str(path), load_external_data=False)
    _, _, height, width = (d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)  # "images"
    quantised = set(int8_nodes(model))
    kept = [re.escape(node.name) + ".*" for node in model.graph.node
            if node.op_type in ("Conv", "MatMul", "Gemm") and node.name not in quantised]
    nncf.set_log_level(logging.WARNING)  # not a line per layer it leaves float
    start = time.perf_counter()
    feeds = nncf.Dataset(images, lambda image: graph_inputs(read_image(image, None), height, width))
    int8 = nncf.quantize(openvino.Core().read_model(str(path)), feeds, subset_size=len(images),
                         model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(patterns=kept, validate=False))
    with tempfile.TemporaryDirectory(dir=output.parent) as folder:  # the .bin first: a new .xml never meets an old .bin
        openvino.save_model(int8, str(Path(folder) / output.name))
        os.replace(Path(folder) / output.with_suffix(".bin").name, output.with_suffix(".bin"))
        os.replace(Path(folder) / output.name, output)
    return time.perf_counter() - start


def check_ap(path: Path, deployable: Deployable, dataset, runtimes: tuple[str, ...], batch: int,
             int8: Path | None = None, most: float = 0.002) -> list[str]:
    """The AP of the file in each runtime, of its `int8` copy in OpenVINO, and of PyTorch (`deployable`)
    on `dataset`, every image letterboxed to the file's size (the same inputs for all); raises Mismatch
    when a runtime's AP of the float32 file is more than `most` from PyTorch's (INT8's difference is
    reported). A fixed batch of `batch` images gets each image `batch` times."""
    def batched(run):
        return lambda feed: [t[:1] for t in run({k: np.repeat(v, batch, 0) for k, v in feed.items()})]

    def pytorch(feed):
        with torch.no_grad():
            return [t.numpy() for t in deployable(*(torch.from_numpy(feed[k]) for k in INPUTS))]
    sessions = {RUNTIMES[r]: Session(path, r) for r in runtimes}
    runs = {"PyTorch": batched(pytorch)} | {name: batched(session) for name, session in sessions.items()}
    if int8 is not None:
        runs["INT8 in OpenVINO"] = Session(int8, "openvino")
    _, _, height, width = next(iter(sessions.values())).input_shape
    results = letterboxed_results(runs, dataset, (height, width))
    ap = {name: coco_metrics(dataset.coco, found, dataset.ids)["AP"] for name, found in results.items()}
    lines = [f"AP on {len(dataset.ids)} validation images letterboxed to {height}x{width}: PyTorch {ap['PyTorch']:.4f}, "
             + ", ".join(f"{name} {value:.4f} ({value - ap['PyTorch']:+.4f})" for name, value in ap.items() if name != "PyTorch")]
    off = [name for name, value in ap.items() if abs(value - ap["PyTorch"]) > most and not name.startswith("INT8")]
    if off:
        raise Mismatch(f"{' and '.join(off)}: AP more than {most} from PyTorch's\n" + lines[0])
    return lines


def int8_options(args: argparse.Namespace) -> tuple[Path | None, list[Path]]:
    """(the INT8 file to write, the calibration images) of --int8 and --calibration, checked; (None, [])
    without --int8."""
    if args.calibration and not args.int8:
        raise ConfigError("--calibration is for --int8")
    if not args.int8:
        return None, []
    if not args.calibration:
        raise ConfigError("--int8 needs --calibration DIR: a few hundred images like yours, e.g. your validation images")
    if args.batch > 1:
        raise ConfigError("--int8 calibrates one image at a time: export with --batch 1 or --dynamic-batch")
    output = Path(args.output)
    if any(importlib.util.find_spec(name) is None for name in ("nncf", "openvino")):
        raise ConfigError("--int8 needs NNCF and OpenVINO: pip install nncf openvino")
    int8 = writable(output.with_name(output.name.removesuffix(".onnx") + ".int8.xml"), "--output")
    return int8, image_files([args.calibration], "--calibration")[:CALIBRATION_IMAGES]


def check_size(args: argparse.Namespace) -> None:
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 32:
            raise ConfigError(f"{flag} must be >= 32, got {value}")


def checked_flags(args: argparse.Namespace) -> tuple[Path | None, list[Path], CocoDetection | None]:
    """Every flag checked before the export: (the INT8 file, its calibration images, --check-ap's dataset)."""
    check_size(args)
    for flag, value, least in (("--batch", args.batch, 1), ("--opset", args.opset, 17)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.opset > MAX_OPSET:
        raise ConfigError(f"--opset must be at most {MAX_OPSET} (torch's TorchScript exporter), got {args.opset}")
    writable(Path(args.output), "--output")
    int8, calibration = int8_options(args)
    dataset = (CocoDetection(*split_paths("val", args.check_ap, None, None), make_transforms(train=False))
               if args.check_ap else None)
    return int8, calibration, dataset


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:4]))
    parser.add_argument("checkpoint", help="ours (train.py) or an official DINO-4scale release checkpoint")
    parser.add_argument("--output", default="dino.onnx")
    parser.add_argument("--height", type=int, help="the fixed input height (default: the checkpoint's validation "
                        "size, 800 x its --scale)")
    parser.add_argument("--width", type=int, help="the fixed input width (default: 1333 x the checkpoint's --scale)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="a fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="any batch size")
    parser.add_argument("--opset", type=int, default=17,
                        help=f"ONNX opset, 17 to {MAX_OPSET} (default 17; LayerNorm needs 17, the exporter stops at {MAX_OPSET})")
    parser.add_argument("--msda", choices=sorted(TRACED_FORMULATIONS), default="gather",
                        help="the deformable attention as gathers and arithmetic (default) or as GridSample, "
                             "which some TensorRT versions compile wrongly")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 copy for OpenVINO, OUTPUT's name "
                        "ending in .int8.xml (and .bin): NNCF's post-training quantisation, calibrated on --calibration")
    parser.add_argument("--calibration", metavar="DIR", help=f"--int8: images like yours (a folder or a glob; the first "
                        f"{CALIBRATION_IMAGES} by name), e.g. your validation images")
    parser.add_argument("--check-ap", metavar="DIR", help="then evaluate the file (in each runtime) and PyTorch on "
                        "DIR's validation split (any layout --data takes), the same letterboxed images: their AP "
                        "must agree within 0.002")
    args = parser.parse_args(argv)
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        parser.exit(2, "export.py needs ONNX and ONNX Runtime: pip install onnx onnxruntime\n")
    try:
        int8, calibration, dataset = checked_flags(args)
        model, cfg, categories = model_from_checkpoint(args.checkpoint)
        default_height, default_width = eval_canvas(cfg.scale)  # the size it was trained and validated at
        args.height, args.width = args.height or default_height, args.width or default_width
        check_size(args)
        deployable = Deployable(model, cfg.num_select, detected_classes(categories, cfg.num_classes))
        path = Path(args.output)
        seconds = export(deployable, path, args.height, args.width, args.batch, args.dynamic_batch, args.opset,
                         args.msda, categories)
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.0f} MiB, opset {args.opset}, {args.height}x{args.width}, "
              f"batch {'dynamic' if args.dynamic_batch else args.batch}, attention as {args.msda}) in {seconds:.0f} s")
        checked = 3 if args.dynamic_batch else args.batch  # a dynamic batch is checked with three images
        runtimes = ("onnxruntime",) + (("openvino",) if importlib.util.find_spec("openvino") else ())
        for line in check(path, deployable, args.height, args.width, checked, runtimes):
            print("  " + line)
        if int8 is not None:
            seconds = quantize_int8(path, int8, calibration)
            print(f"wrote {int8} ({int8.stat().st_size / 2 ** 20:.0f} MiB, INT8, calibrated on {len(calibration)} images) "
                  f"in {seconds:.0f} s")
        if dataset is not None:
            for line in check_ap(path, deployable, dataset, runtimes, 1 if args.dynamic_batch else args.batch, int8):
                print("  " + line)
    except (ConfigError, DataError, FileNotFoundError, Mismatch) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
