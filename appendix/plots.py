"""Pictures of a run (an appendix): training curves, precision-recall curves, AP per class, the confusion
matrix and a grid of validation images with their ground truth and detections.

Each is a function from data train.py and eval.py already hold (log.jsonl's records; the metrics of an
evaluation, which carry pycocotools' precision arrays and the confusion counts: eval.coco_metrics) to
one file, written through a temporary file and a rename. matplotlib is optional: without it,
`require_matplotlib` names the pip command. Figures grow with the number of classes, so that 80 read
as well as 2: legends and numbers in cells are left out where they would not fit.
"""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_convert, box_iou

from config import ConfigError
from appendix.inference import draw_detections
from appendix.runs import replace_atomically

GROUND_TRUTH_COLOUR = (30, 160, 60)


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


def require_matplotlib():
    """matplotlib's Figure class, or a ConfigError naming the pip command."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    return Figure


def save_figure(figure, path: Path) -> Path:
    """`figure` as PNG, or as JPEG (quality 85: photographs' noise compresses 5x better) where `path` ends in .jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="jpeg" if jpeg else "png", dpi=100,
                                                        **({"pil_kwargs": {"quality": 85}} if jpeg else {})))
    return path


def training_plot(records: list[dict], path: Path) -> Path:
    """Every loss term (the final layer's, each decoder layer's, the encoder's proposals', the denoising
    queries'), the learning rate, and AP and AP50 of the evaluated epochs, against the epoch."""
    Figure = require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    epochs = [r["epoch"] for r in records]
    terms = sorted({k for r in records for k in r["train"]})
    for ax, kind in zip(axes, ("loss", "loss_ce", "loss_bbox", "loss_giou")):
        names = ["loss"] if kind == "loss" else [t for t in terms if t == kind or t.startswith(kind + "_")]
        for name in names:
            ax.plot(epochs, [r["train"].get(name, np.nan) for r in records], marker=".",
                    linewidth=2.5 if name == kind else 1, label=name.removeprefix(kind).lstrip("_") or "final")
        ax.set(title=kind if kind != "loss" else "loss (weighted sum)", xlabel="epoch")
        if len(names) > 1:
            ax.legend(fontsize=7, ncols=2)
    axes[4].plot(epochs, [r["lr"] for r in records], marker=".")
    axes[4].set(title="learning rate", xlabel="epoch", yscale="log")
    evaluated = [r for r in records if "val" in r]
    for name in ("AP", "AP50"):
        axes[5].plot([r["epoch"] for r in evaluated], [r["val"][name] for r in evaluated], marker="o", label=name)
    axes[5].set(title="validation", xlabel="epoch", ylim=(0, 1))
    axes[5].legend()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not -0.04
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # one epoch too: not a range of 0.09 around it
    return save_figure(figure, path)


def pr_curve_plot(metrics: dict, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Precision against recall per class at IoU 0.5 and averaged over IoU 0.5:0.95 (pycocotools' own
    interpolated precision at 101 recall points: the mean of a curve is that class's AP). Returns the curves
    drawn, {class: (recall, precision at 0.5, precision over 0.5:0.95)}."""
    Figure = require_matplotlib()
    recall, classes = np.array(metrics["pr_curves"]["recall"]), metrics["pr_curves"]["classes"]
    curves = {name: (recall, np.array(c["iou_0.5"]), np.array(c["iou_0.5:0.95"])) for name, c in classes.items()}
    figure = Figure(figsize=(16, 6), layout="constrained")
    for ax, column, title in zip(figure.subplots(1, 2), (1, 2), ("IoU 0.5", "IoU 0.5:0.95 (mean)")):
        for name, curve in curves.items():
            ax.plot(recall, curve[column], linewidth=1 if len(curves) <= 20 else 0.5, alpha=1 if len(curves) <= 20 else 0.4,
                    label=f"{name} {curve[column].mean():.3f}")
        if curves:
            mean = np.mean([curve[column] for curve in curves.values()], axis=0)
            ax.plot(recall, mean, color="black", linewidth=3, label=f"all classes {mean.mean():.3f}")
        ax.set(title=f"precision-recall, {title}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7 if len(curves) <= 20 else 9, loc="upper left", bbox_to_anchor=(1.01, 1),  # beside: on no curve
                  handles=ax.get_lines() if len(curves) <= 20 else ax.get_lines()[-1:])
    save_figure(figure, path)
    return curves


def per_class_ap_plot(metrics: dict, path: Path) -> Path:
    """AP (IoU 0.5:0.95) per class, best first, one bar each; a class without validation objects (AP None)
    last, without a bar, marked "no objects"; the figure grows with the classes."""
    Figure = require_matplotlib()
    ranked = sorted(metrics["per_class_AP"].items(), key=lambda item: -item[1] if item[1] is not None else 1)
    figure = Figure(figsize=(8, 1.5 + 0.22 * len(ranked)), layout="constrained")
    ax = figure.subplots()
    ax.barh(range(len(ranked)), [ap or 0.0 for _, ap in ranked], color="tab:blue")
    ax.set_yticks(range(len(ranked)), [name if ap is not None else f"{name} (no objects)" for name, ap in ranked],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="AP (IoU 0.5:0.95)", title=f"AP per class (all: {metrics['AP']:.3f})")
    return save_figure(figure, path)


def confusion_matrix_plot(metrics: dict, path: Path) -> Path:
    """The confusion matrix (eval.confusion_counts) as counts and normalised per true class (row)."""
    Figure = require_matplotlib()
    confusion = metrics["confusion_matrix"]
    counts, labels = np.array(confusion["counts"], dtype=float), confusion["classes"]
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(6.0, 0.25 * len(labels) + 2)
    figure = Figure(figsize=(2 * side + 1, side), layout="constrained")
    for ax, values, title in zip(figure.subplots(1, 2), (counts, rows), ("counts", "share of each true class")):
        image = ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8 if len(labels) <= 30 else 7)
        ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 30 else 7)
        ax.set(xlabel="predicted", ylabel="true", title=f"{title}: score >= {confusion['score_thr']}, IoU >= {confusion['iou']}")
        if len(labels) <= 30:
            for (i, j), v in np.ndenumerate(values):
                if v:
                    ax.text(j, i, f"{v:.0f}" if values is counts else f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > values.max() / 2 else "black")
        figure.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(figure, path)


def predictions_grid(samples: list[tuple[torch.Tensor, dict, dict]], categories: dict[int, str], path: Path,
                     score_thr: float, height: int = 240) -> Path:
    """Validation images, each as its ground truth (green) beside its detections (red), two pairs a row, each
    picture `height` pixels high, under a line saying so, as one JPEG. samples: (image (3, H, W) uint8, ground
    truth {"boxes", "labels"} in pixels, detections {"boxes", "scores", "labels"} in pixels, scoring
    `score_thr` or more)."""
    pictures = []
    for image, truth, found in samples:
        truth = {**truth, "scores": torch.ones(len(truth["labels"]))}
        pair = [draw_detections(image, truth, categories, 0.0, colour=GROUND_TRUTH_COLOUR, scores=False),
                draw_detections(image, found, categories, 0.0)]
        pictures.append([p.resize((max(1, round(p.width * height / p.height)), height)) for p in pair])
    columns = 2
    width = max(sum(p.width for p in pair) for pair in pictures) + 10
    header = 30
    grid = Image.new("RGB", (columns * width, header + math.ceil(len(pictures) / columns) * (height + 10)), "white")
    ImageDraw.Draw(grid).text((5, 5), f"each pair: ground truth (green), then the detections scoring {score_thr} or "
                              f"more (red)", fill="black", font=ImageFont.load_default(size=16))
    for i, (truth, found) in enumerate(pictures):
        x, y = (i % columns) * width, header + (i // columns) * (height + 10)
        grid.paste(truth, (x, y))
        grid.paste(found, (x + truth.width + 2, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: grid.save(tmp, format="JPEG", quality=90))
    return path


def evaluation_plots(metrics: dict, folder: Path) -> list[Path]:
    """pr_curves.png, per_class_ap.png and confusion_matrix.png of an evaluation, in `folder`."""
    pr_curve_plot(metrics, folder / "pr_curves.png")
    return [folder / "pr_curves.png", per_class_ap_plot(metrics, folder / "per_class_ap.png"),
            confusion_matrix_plot(metrics, folder / "confusion_matrix.png")]
