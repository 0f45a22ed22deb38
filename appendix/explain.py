"""See the paper happen: one picture per mechanism of DINO, drawn from a real model's own forward pass.

    python -m appendix.explain CKPT IMAGE [--data DIR] [--query N] [--output-dir DIR]

writes, for a checkpoint (ours or an official release) and one image, in OUTPUT_DIR (default explain_output):
  query_selection.jpg       mixed query selection (DINO Sec. 3.4): the encoder's score of every token on each
                            level, the top-Q proposals kept as anchors, the final detections
  look_forward_twice.jpg    look forward twice (Sec. 3.5): the best detections' boxes, from the anchor through
                            every decoder layer
  deformable_attention.jpg  deformable attention (Deformable DETR Eq. 3): where the last decoder layer's
                            cross-attention samples for one query, on each level, per head, sized by weight
  denoising.jpg             contrastive denoising (Sec. 3.3), with --data DIR holding IMAGE's annotations: one
                            group's positive and negative queries around each object, and the attention mask

The data is the model's own, read during its forward with forward hooks, never computed beside it: the
encoder's class logits from `enc_class_head`, the level sizes from `input_proj`, what the last decoder layer's
cross-attention hands `msda_cuda.ms_deform_attn` (its sampling locations and attention weights) and the boxes it
reads, and the model's outputs themselves (the anchors are "interm_outputs", each layer's boxes "aux_outputs",
the denoising queries "dn_queries" of a training-mode forward with the image's annotations). matplotlib draws
them (optional: without it, one line names the pip command before any work).
"""
import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as TF

import msda_cuda
from config import ConfigError, TooFewTokens
from data import IMAGENET_MEAN, IMAGENET_STD, CocoDetection, DataError, make_transforms, split_paths
from model import postprocess
from appendix.image_io import read_image
from appendix.inference import Detector, device_from_flag
from appendix.plots import require_matplotlib, save_figure
from appendix.runs import writable

LAYER_COLOURS = "viridis"  # anchor dark, last layer bright


# --- what the forward computed ----------------------------------------------------------------------------

@dataclass
class Trace:
    """One image's forward (batch 1), as the pictures read it."""
    image: Tensor             # (3, H, W) uint8: the image as the model saw it (resized as in evaluation)
    level_shapes: list        # [(H_l, W_l)] * L
    token_scores: Tensor      # (S,) sigmoid of each encoder token's best class logit: what the selection ranks
    outputs: dict             # the model's outputs
    reference_boxes: Tensor   # (Q, L, 4) cxcywh in [0, 1]: the boxes the last decoder layer's cross-attention read
    locations: Tensor         # (Q, M, L, P, 2) its sampling locations, (x, y) in [0, 1] of each level
    weights: Tensor           # (Q, M, L, P) its attention weights

    def level_maps(self) -> list[Tensor]:
        """token_scores as L maps (H_l, W_l), the tokens being the levels' pixels, level by level, row by row."""
        sizes = [H * W for H, W in self.level_shapes]
        return [s.view(H, W) for s, (H, W) in zip(self.token_scores.split(sizes), self.level_shapes)]

    def boxes_per_layer(self, query: int) -> Tensor:
        """(1 + decoder layers, 4) cxcywh in [0, 1]: query's anchor, then the box each layer predicts for it."""
        layers = [aux["pred_boxes"][0, query] for aux in self.outputs["aux_outputs"]]
        return torch.stack([self.outputs["interm_outputs"]["pred_boxes"][0, query], *layers,
                            self.outputs["pred_boxes"][0, query]])

    def query_of(self, box_xyxy: Tensor) -> int:
        """The query whose last-layer box is `box_xyxy` (a detection's, in the image's pixels)."""
        H, W = self.image.shape[1:]
        boxes = box_convert(self.outputs["pred_boxes"][0].cpu(), "cxcywh", "xyxy") * torch.tensor([W, H, W, H])
        return int((boxes - box_xyxy.cpu()).abs().amax(-1).argmin())


@contextlib.contextmanager
def sampling_recorded(attention: nn.Module, record: dict):
    """Within it, each forward of `attention` (an MSDeformAttn) records in `record` the boxes it reads
    ("reference") and the sampling locations and attention weights it hands msda_cuda.ms_deform_attn."""
    original = msda_cuda.ms_deform_attn

    def recording(value, spatial_shapes, level_start_index, locations, weights):
        record["locations"], record["weights"] = locations, weights
        return original(value, spatial_shapes, level_start_index, locations, weights)

    def start(module, args):
        record["reference"] = args[1]
        msda_cuda.ms_deform_attn = recording

    hooks = [attention.register_forward_pre_hook(start),
             attention.register_forward_hook(lambda *_: setattr(msda_cuda, "ms_deform_attn", original))]
    try:
        yield
    finally:
        msda_cuda.ms_deform_attn = original
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def trace(model: nn.Module, pixels: Tensor) -> Trace:
    """The model's forward on `pixels` (3, H, W), normalised as in evaluation, with its intermediates."""
    record, shapes = {}, []
    hooks = [model.enc_class_head.register_forward_hook(lambda m, a, logits: record.__setitem__("logits", logits)),
             *(proj.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[-2:])))
               for proj in model.input_proj)]
    try:
        with sampling_recorded(model.decoder.layers[-1].cross_attn, record):
            outputs = model.eval()(pixels[None])
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(unnormalised(pixels), shapes, record["logits"][0].max(-1)[0].sigmoid(), outputs,
                 record["reference"][0], record["locations"][0], record["weights"][0])


def unnormalised(pixels: Tensor) -> Tensor:
    """(3, H, W) ImageNet-normalised float -> uint8, the image the model saw."""
    mean, std = (torch.tensor(v, dtype=pixels.dtype).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((pixels.cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def denoising_queries(model: nn.Module, pixels: Tensor, target: dict, seed: int = 0):
    """The contrastive denoising queries the model builds for this image and its annotations (a training-mode
    forward, its noise drawn from `seed`): denoising.DNQueries, batch 1."""
    training = model.training
    try:
        with torch.random.fork_rng(devices=[pixels.device] if pixels.is_cuda else []):
            torch.manual_seed(seed)
            return model.train()(pixels[None], None, [target]).get("dn_queries")  # None: no denoising
    finally:
        model.train(training)


# --- the pictures ---------------------------------------------------------------------------------------------

def pixels_xyxy(boxes_cxcywh: Tensor, image: Tensor) -> Tensor:
    """(..., 4) cxcywh in [0, 1] -> x1y1x2y2 in the image's pixels."""
    H, W = image.shape[1:]
    return box_convert(boxes_cxcywh.float().cpu(), "cxcywh", "xyxy") * torch.tensor([W, H, W, H])


def draw_box(ax, box, colour, **style) -> None:
    from matplotlib.patches import Rectangle
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, **style))


def show(ax, image: Tensor, title: str) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def query_selection_picture(trace: Trace, detections: dict, names: dict, path: Path) -> Path:
    """The encoder's score of every token on each level, the Q anchors kept, and the detections (Sec. 3.4)."""
    Figure = require_matplotlib()
    maps = trace.level_maps()
    figure = Figure(figsize=(4 * (len(maps) + 2), 4.2), layout="constrained")
    axes = figure.subplots(1, len(maps) + 2)
    H, W = trace.image.shape[1:]
    for lvl, (ax, scores) in enumerate(zip(axes, maps)):
        show(ax, trace.image, f"level {lvl}: {scores.shape[0]}x{scores.shape[1]} tokens, stride {8 * 2 ** lvl}")
        ax.imshow(scores.float().cpu().numpy(), cmap="magma", alpha=0.6, extent=(0, W, H, 0), vmin=0,
                  vmax=float(trace.token_scores.max()))
    anchors = pixels_xyxy(trace.outputs["interm_outputs"]["pred_boxes"][0], trace.image)
    show(axes[-2], trace.image, f"the {len(anchors)} anchors: the top-Q tokens' refined proposals")
    for box in anchors:
        draw_box(axes[-2], box, "cyan", linewidth=0.6, alpha=0.5)
    show(axes[-1], trace.image, f"the detections (score >= {detections['threshold']:.2f})")
    for box, label, score in reversed(list(zip(detections["boxes"], detections["labels"].tolist(),
                                               detections["scores"].tolist()))):  # the best drawn last, on top
        draw_box(axes[-1], box, "red", linewidth=1.5)
        axes[-1].text(float(box[0]), float(box[1]), f"{names.get(label, label)} {score:.2f}", color="white",
                      fontsize=7, backgroundcolor="red", va="bottom")
    figure.suptitle("Mixed query selection (DINO Sec. 3.4): every encoder token is scored and proposes a box; the Q "
                    "best become the decoder's anchors (positions), while the content queries stay learned. "
                    "Look for the high scores on the objects, on the level that matches their size.", fontsize=10, wrap=True)
    return save_figure(figure, path)


def look_forward_twice_picture(trace: Trace, queries: dict[int, str], path: Path) -> Path:
    """Each query's box from its anchor through every decoder layer (Sec. 3.5); queries: index -> caption."""
    Figure = require_matplotlib()
    from matplotlib import colormaps
    figure = Figure(figsize=(5 * len(queries), 5.2), layout="constrained")
    axes = figure.subplots(1, len(queries), squeeze=False)[0]
    for ax, (query, caption) in zip(axes, queries.items()):
        boxes = pixels_xyxy(trace.boxes_per_layer(query), trace.image)
        show(ax, trace.image, f"query {query}: {caption}")
        colours = colormaps[LAYER_COLOURS](torch.linspace(0, 1, len(boxes)).tolist())
        for i, (box, colour) in enumerate(zip(boxes, colours)):
            draw_box(ax, box, colour, linewidth=1.2 if i else 1.8, linestyle="--" if i == 0 else "-",
                     label="anchor" if i == 0 else f"layer {i}")
        # zoomed on all the boxes, with half the final box's larger side around them
        (x1, y1), (x2, y2) = boxes[:, :2].min(0).values.tolist(), boxes[:, 2:].max(0).values.tolist()
        pad = (boxes[-1, 2:] - boxes[-1, :2]).max().item() / 2
        H, W = trace.image.shape[1:]
        ax.set_xlim(max(0, x1 - pad), min(W, x2 + pad))
        ax.set_ylim(min(H, y2 + pad), max(0, y1 - pad))
        ax.legend(fontsize=7, loc="lower right")
    figure.suptitle("Look forward twice (DINO Sec. 3.5): each decoder layer refines the box of the layer before it, and "
                    "its loss also trains that earlier layer's prediction. Look for the anchor (dashed) moving onto the "
                    "object in the first layers, then settling.", fontsize=10, wrap=True)
    return save_figure(figure, path)


def deformable_attention_picture(trace: Trace, query: int, path: Path) -> Path:
    """Where the last decoder layer's cross-attention samples for `query`, on each level (Deformable DETR Eq. 3)."""
    Figure = require_matplotlib()
    from matplotlib import colormaps
    locations, weights = trace.locations[query].float().cpu(), trace.weights[query].float().cpu()  # (M, L, P, 2), (M, L, P)
    M, L, P = weights.shape
    H, W = trace.image.shape[1:]
    figure = Figure(figsize=(4.5 * L, 5), layout="constrained")
    axes = figure.subplots(1, L)
    colours = colormaps["tab10"](range(M))
    for lvl, ax in enumerate(axes):
        H_l, W_l = trace.level_shapes[lvl]
        share = 100 * weights[:, lvl].sum() / M  # each head's weights sum to 1 over the levels and points
        show(ax, trace.image, f"level {lvl} ({H_l}x{W_l}): {share:.0f}% of the weight")
        draw_box(ax, pixels_xyxy(trace.reference_boxes[query, lvl], trace.image), "white", linewidth=1.5, linestyle="--")
        for head in range(M):
            xy = locations[head, lvl] * torch.tensor([W, H])  # (P, 2) in the image's pixels
            ax.scatter(xy[:, 0], xy[:, 1], s=600 * weights[head, lvl] / weights.max(), color=colours[head],
                       edgecolors="black", linewidths=0.4, label=f"head {head}" if lvl == 0 else None)
    axes[0].legend(fontsize=7, loc="lower left", ncols=2)
    figure.suptitle(f"Deformable attention (Deformable DETR Eq. 3) of query {query} in the last decoder layer: each of "
                    f"the {M} heads samples {P} points on every level around the box it reads (dashed), each sized by "
                    f"its attention weight. Look for the points on the object's parts and edges, coarse levels for "
                    f"context.", fontsize=10, wrap=True)
    return save_figure(figure, path)


def band(box: Tensor, scale: float) -> Tensor:
    """box (4,) x1y1x2y2 with every corner moved outwards by `scale` times the half width and height."""
    half = (box[2:] - box[:2]) / 2 * scale
    return box + torch.cat([-half, half])


def first_group(dn, objects: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group 0's queries of an image with `objects` annotated objects (batch 1): the positives' and the negatives'
    boxes (objects, 4) cxcywh, and the labels they carry (objects,). Slots run (group, polarity, object):
    positives 0..objects-1, negatives objects..2 objects-1 (denoising.group_layout)."""
    return (dn.boxes[0, :objects], dn.boxes[0, objects:2 * objects], dn.labels[0, :objects],
            dn.labels[0, objects:2 * objects])


def denoising_picture(image: Tensor, target: dict, dn, noise_scale: float, names: dict, path: Path) -> Path:
    """Group 0's positive and negative queries around each object, and the attention mask (Sec. 3.3)."""
    Figure = require_matplotlib()
    figure = Figure(figsize=(13, 6), layout="constrained")
    ax, mask_ax = figure.subplots(1, 2, width_ratios=[1.4, 1])
    show(ax, image, f"group 0 of {int(dn.num_groups)}: positives (green) within lambda = {noise_scale},\n"
                    f"negatives (red) within [lambda, 2 lambda), of the half size")
    truth = pixels_xyxy(target["boxes"], image)
    positives, negatives, positive_labels, negative_labels = first_group(dn, len(truth))
    for j, box in enumerate(truth):
        for scale, style in ((noise_scale, ":"), (-noise_scale, ":"), (2 * noise_scale, "--"), (-2 * noise_scale, "--")):
            draw_box(ax, band(box, scale), "white", linewidth=0.6, linestyle=style)
        draw_box(ax, box, "white", linewidth=2)
        for noised, label, colour in ((positives[j], positive_labels[j], "lime"), (negatives[j], negative_labels[j], "red")):
            noised, label, truth_label = pixels_xyxy(noised, image), int(label), int(target["labels"][j])
            draw_box(ax, noised, colour, linewidth=1.3)
            if label != truth_label:  # the label noise: a flipped class the query must still reconstruct or reject
                ax.text(float(noised[0]), float(noised[1]), f"{names.get(truth_label, truth_label)} -> "
                        f"{names.get(label, f'class {label}')}", color="white", fontsize=7, backgroundcolor=colour,
                        va="bottom")
    mask = dn.attn_mask.cpu()
    mask_ax.imshow(mask.numpy(), cmap="gray_r", interpolation="nearest")
    Q_dn = dn.boxes.shape[1]
    for edge in (Q_dn - 0.5,):
        mask_ax.axhline(edge, color="red", linewidth=0.8)
        mask_ax.axvline(edge, color="red", linewidth=0.8)
    mask_ax.set(title=f"attention mask of the {mask.shape[0]} queries (black: may not attend):\n{Q_dn} denoising "
                      f"first, in groups blind to each other;\nthe matching queries see none of them",
                xlabel="key", ylabel="query")
    mask_ax.title.set_fontsize(9)
    figure.suptitle("Contrastive denoising (DINO Sec. 3.3): each object gives a positive query to reconstruct and a "
                    "negative, noised further, to reject as 'no object'. Look for the positives inside the dotted band "
                    "and the negatives between the dotted and dashed ones.", fontsize=10, wrap=True)
    return save_figure(figure, path)


# --- the command line -----------------------------------------------------------------------------------------

def annotated(data: str, image: Path, scale: float) -> tuple[Tensor, dict] | None:
    """(pixels, target) of `image` (by file name) in --data's validation or training annotations, transformed as in
    evaluation; None if neither holds it."""
    for split in ("val", "train"):
        try:
            paths = split_paths(split, data, None, None)
            dataset = CocoDetection(*paths, make_transforms(train=False, scale=scale))
        except FileNotFoundError:
            continue
        for index, image_id in enumerate(dataset.ids):
            if Path(dataset.coco.imgs[image_id]["file_name"]).name == image.name:
                return dataset[index]
    return None


def denoising(args: argparse.Namespace, detector: Detector, folder: Path) -> list[Path]:
    """denoising.jpg for --data's annotations of IMAGE, or one line saying why there is none."""
    sample = annotated(args.data, Path(args.image), detector.cfg.scale) if args.data else None
    if sample is None or not len(sample[1]["labels"]):
        why = ("no --data" if not args.data else f"{args.image} is in no annotation file of {args.data}"
               if sample is None else f"{args.image} has no annotated objects")
        print(f"{why}: no denoising picture (it needs the image's annotations)")
        return []
    pixels, target = sample
    target = {k: target[k].to(detector.device) for k in ("labels", "boxes")}
    dn = denoising_queries(detector.model, pixels.to(detector.device), target)
    if dn is None:
        print("the model adds no denoising queries (dn_number 0): no denoising picture")
        return []
    return [denoising_picture(unnormalised(pixels), target, dn, detector.cfg.dn_box_noise_scale, detector.categories,
                              folder / "denoising.jpg")]


def explain(args: argparse.Namespace) -> list[Path]:
    """Every picture for the flags; returns the files written."""
    require_matplotlib()
    if args.data and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    folder = Path(args.output_dir)
    writable(folder / "query_selection.jpg", "--output-dir")
    detector = Detector.load(args.checkpoint, device_from_flag(args.device))
    cfg = detector.cfg
    if args.query is not None and not 0 <= args.query < cfg.num_queries:
        raise ConfigError(f"--query must be a query index in [0, {cfg.num_queries}), got {args.query}")
    if args.detections < 1:
        raise ConfigError(f"--detections must be at least 1, got {args.detections}")
    pixels = detector.transform(TF.pil_to_tensor(read_image(Path(args.image), None))).to(detector.device)
    found = trace(detector.model, pixels)
    H, W = found.image.shape[1:]
    detections = {k: v.cpu() for k, v in postprocess(found.outputs, [(H, W)], cfg.num_select,
                                                     classes=detector.classes)[0].items()}
    best = {}  # the best detections' queries, each once (a query may report several classes): their captions
    for box, label, score in zip(detections["boxes"], detections["labels"].tolist(), detections["scores"].tolist()):
        if len(best) < args.detections:
            best.setdefault(found.query_of(box), f"{detector.categories.get(label, label)} {score:.2f}")
    shown = {k: v[detections["scores"] >= args.score_thr] for k, v in detections.items()} | {"threshold": args.score_thr}
    written = [query_selection_picture(found, shown, detector.categories, folder / "query_selection.jpg"),
               look_forward_twice_picture(found, best, folder / "look_forward_twice.jpg"),
               deformable_attention_picture(found, next(iter(best)) if args.query is None else args.query,
                                            folder / "deformable_attention.jpg")]
    return written + denoising(args, detector, folder)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m appendix.explain", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="ours (train.py) or an official DINO-4scale release")
    parser.add_argument("image", help="one image file")
    parser.add_argument("--data", metavar="DIR", help="a dataset (COCO, YOLO or VOC) whose annotations hold IMAGE: "
                        "then the denoising picture too")
    parser.add_argument("--query", type=int, help="the query whose deformable attention is drawn (default: the best "
                        "detection's)")
    parser.add_argument("--detections", type=int, default=3, help="look forward twice: the N best detections")
    parser.add_argument("--score-thr", type=float, default=0.3, help="the detections drawn beside the query selection")
    parser.add_argument("--output-dir", default="explain_output")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        written = explain(args)
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
