"""Pictures of a run (plots.py): every file written and readable, and the data behind them right: the
precision-recall curves are pycocotools' (their means are the AP), the confusion matrix counts a hand-made
case as it should."""
import sys

import pytest
import torch
from PIL import Image

from appendix import plots
from config import ConfigError
from eval import coco_metrics
from appendix.plots import confusion_counts


def coco(categories: list[str], images: list[list[tuple[str, list[float]]]], crowd=()):
    """A pycocotools index: `images` lists each image's (category name, [x, y, w, h]) boxes."""
    from pycocotools.coco import COCO
    ids = {name: i + 1 for i, name in enumerate(categories)}
    index = COCO()
    index.dataset = {"categories": [{"id": i, "name": n} for n, i in ids.items()],
                     "images": [{"id": i + 1, "width": 400, "height": 300} for i in range(len(images))],
                     "annotations": [{"id": k + 1, "image_id": i + 1, "category_id": ids[n], "bbox": b, "area": b[2] * b[3],
                                      "iscrowd": int((i, n) in crowd)}
                                     for k, (i, n, b) in enumerate((i, n, b) for i, boxes in enumerate(images) for n, b in boxes)]}
    index.createIndex()
    return index


def result(image_id: int, category_id: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def test_the_pr_curves_are_pycocotools_and_their_means_the_ap(tmp_path):
    gt = coco(["a", "b"], [[("a", [10, 10, 50, 50]), ("a", [200, 100, 60, 60]), ("b", [0, 200, 100, 100])]])
    found = [result(1, 1, [10, 10, 50, 50], 0.9), result(1, 1, [300, 10, 40, 40], 0.8),  # a: hit, miss,
             result(1, 1, [200, 100, 60, 60], 0.7),                                        # hit
             result(1, 2, [0, 200, 100, 52], 0.9)]  # b: IoU 0.52, a hit at IoU 0.5 only
    metrics = coco_metrics(gt, found, [1])
    curves = plots.pr_curve_plot(metrics, tmp_path / "pr.png")
    recall, a50, a_all = curves["a"]
    assert len(recall) == 101
    assert a50.mean() == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-3)  # precision 1 to recall 0.5, then 2/3
    assert curves["b"][1].mean() == pytest.approx(1.0, abs=1e-3) and curves["b"][2].mean() == pytest.approx(0.1, abs=1e-3)
    for name in ("a", "b"):
        assert curves[name][2].mean() == pytest.approx(metrics["per_class_AP"][name], abs=1e-3)
    Image.open(tmp_path / "pr.png").verify()


def test_the_confusion_matrix_counts_a_hand_made_case():
    gt = coco(["a", "b"], [[("a", [0, 0, 50, 50]), ("b", [100, 100, 50, 50]), ("a", [300, 200, 40, 40])],
                           [("b", [10, 10, 80, 80])], [("a", [0, 0, 100, 100])]])
    found = [result(1, 1, [0, 0, 50, 50], 0.9),       # a on a
             result(1, 1, [100, 100, 50, 52], 0.8),   # a on b
             result(1, 2, [200, 0, 50, 50], 0.7),     # b on nothing
             result(1, 1, [300, 200, 40, 40], 0.1),   # under the threshold: the a it covers is missed
             result(2, 2, [10, 10, 80, 80], 0.5),     # b on b
             result(2, 2, [12, 10, 80, 80], 0.4),     # b on the b already taken: a false detection
             result(3, 1, [50, 50, 100, 100], 0.9)]   # IoU 0.14 with the a there: false, and the a missed
    counts = confusion_counts(gt, found, [1, 2, 3], score_thr=0.3)
    #                        predicted a  b  background
    assert counts.tolist() == [[1, 0, 2],   # true a
                               [1, 1, 0],   # true b
                               [1, 2, 0]]   # background


def test_a_detection_on_a_crowd_region_is_not_counted():
    gt = coco(["a"], [[("a", [0, 0, 50, 50]), ("a", [100, 100, 80, 80])]], crowd={(0, "a")})
    # both annotations of image 0 are crowd here (crowd is per (image, class)): nothing to find, nothing false
    counts = confusion_counts(gt, [result(1, 1, [100, 100, 80, 80], 0.9)], [1], score_thr=0.3)
    assert counts.tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("num_classes", [2, 80])
def test_every_plot_is_written_and_reads_with_2_and_80_classes(tmp_path, num_classes):
    names = [f"class {i}" for i in range(num_classes)]
    g = torch.Generator().manual_seed(0)
    images = [[(names[int(torch.randint(num_classes, (), generator=g))], (torch.rand(4, generator=g) * 100 + 20).tolist())
               for _ in range(3)] for _ in range(20)]
    gt = coco(names, images)
    found = [result(i + 1, gt.getCatIds(catNms=[n])[0], [v + float(torch.randn((), generator=g)) * 5 for v in b],
                    float(torch.rand((), generator=g))) for i, boxes in enumerate(images) for n, b in boxes]
    metrics = coco_metrics(gt, found, list(range(1, 21)))
    written = plots.evaluation_plots(metrics, tmp_path)
    assert [p.name for p in written] == ["pr_curves.png", "per_class_ap.png", "confusion_matrix.png"]
    for path in written:
        with Image.open(path) as picture:
            picture.verify()
            assert picture.format == "PNG"
    records = [{"epoch": e, "lr": 1e-4, "train": {"loss": 9.0 - e, "loss_ce": 1.0, "loss_ce_0": 1.1, "loss_ce_dn": 0.9,
                                                  "loss_bbox": 0.5, "loss_giou": 0.4, "loss_giou_interm": 0.6},
                **({"val": {"AP": 0.1 * e, "AP50": 0.2 * e}} if e % 2 else {})} for e in range(4)]
    with Image.open(plots.training_plot(records, tmp_path / "training.png")) as picture:
        assert picture.format == "PNG"
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    sample = (image, {"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([1])},
              {"boxes": torch.tensor([[6.0, 5, 41, 40]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])})
    with Image.open(plots.predictions_grid([sample] * 3, {1: "class 0"}, tmp_path / "predictions.jpg", 0.3)) as picture:
        assert picture.format == "JPEG" and picture.size == (2 * (2 * 360 + 10), 30 + 2 * 250)  # 3 pairs: 2 rows of 2
    assert not list(tmp_path.glob("*.tmp"))


def test_without_matplotlib_the_plots_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError, match="plots need matplotlib: pip install matplotlib"):
        plots.require_matplotlib()


def test_a_class_without_validation_objects_has_no_ap_not_an_ap_of_zero(tmp_path, monkeypatch):
    """pycocotools leaves such a class out of the mean (-1): it is shown as "-", null in metrics.json, and
    "no objects" without a bar in the plot; a class with objects but no detection keeps its AP of 0."""
    from eval import format_metrics
    gt = coco(["a", "b", "c"], [[("a", [10, 10, 50, 50]), ("c", [100, 100, 50, 50])]])
    for found, a in (([result(1, 1, [10, 10, 50, 50], 0.9)], 1.0), ([], 0.0)):
        metrics = coco_metrics(gt, found, [1])
        assert metrics["per_class_AP"] == {"a": pytest.approx(a), "b": None, "c": 0.0}
    assert [line.split() for line in format_metrics(metrics).splitlines()[2:]] == [["a", "0.0"], ["b", "-"], ["c", "0.0"]]
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure) or path)
    plots.per_class_ap_plot(metrics, tmp_path / "ap.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert labels == ["a", "c", "b (no objects)"]


def test_one_epochs_axis_is_around_it_and_the_legends_lie_beside_the_curves(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure) or path)
    plots.training_plot([{"epoch": 0, "lr": 1e-4, "train": {"loss": 9.0}, "val": {"AP": 0.1, "AP50": 0.2}}], tmp_path / "t.png")
    assert all(ax.get_xlim() == (-0.5, 0.5) for ax in figures[0].axes)
    gt = coco(["a", "b"], [[("a", [10, 10, 50, 50]), ("b", [0, 200, 100, 100])]])
    plots.pr_curve_plot(coco_metrics(gt, [result(1, 1, [10, 10, 50, 50], 0.9), result(1, 2, [0, 200, 90, 100], 0.8)], [1]),
                        tmp_path / "pr.png")
    figures[1].draw_without_rendering()
    for ax in figures[1].axes:
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # on no curve
