import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train
from config import make_config
from conftest import TINY, tiny_dino, tiny_flags
from data import CocoDetection, coco_paths, collate, make_shapes_dataset, make_transforms
from eval import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=6, size=(64, 96))


class Oracle(nn.Module):
    """Predicts the validation targets themselves, batch by batch in loader order, with box noise."""

    def __init__(self, dataset, noise: float, num_queries: int = 10, num_classes: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.outputs = []
        for i in range(len(dataset)):
            target = dataset[i][1]
            logits = torch.full((1, num_queries, num_classes), -10.0)
            boxes = torch.full((1, num_queries, 4), 0.5)
            n = len(target["labels"])
            logits[0, torch.arange(n), target["labels"]] = 5.0
            boxes[0, :n] = (target["boxes"] + noise * torch.randn(n, 4, generator=g)).clamp(0.01, 1)
            self.outputs.append((logits, boxes))

    def forward(self, images, mask):
        batch = [self.outputs.pop(0) for _ in range(images.shape[0])]
        return {"pred_logits": torch.cat([b[0] for b in batch]), "pred_boxes": torch.cat([b[1] for b in batch])}


def test_ap_is_one_for_perfect_predictions_and_drops_as_they_degrade(shapes):
    dataset = CocoDetection(*coco_paths(shapes, "val"), make_transforms(False, 0.1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    aps = [evaluate(Oracle(dataset, noise), loader, torch.device("cpu"))["AP"] for noise in (0.0, 0.02, 0.08)]
    assert aps[0] == pytest.approx(1.0)
    assert 1.0 > aps[1] > aps[2]


def test_the_evaluation_ranks_only_the_checkpoints_categories(shapes):
    """A row of the class head that is no category (index 0 here), scoring highest everywhere, takes none of
    the num_select places: the evaluation gives the oracle's AP of 1 with 4 detections kept per image."""
    dataset = CocoDetection(*coco_paths(shapes, "val"), make_transforms(train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    oracle = Oracle(dataset, noise=0.0)
    for logits, _ in oracle.outputs:
        logits[..., 0] = 9.0
    metrics = evaluate(oracle, loader, torch.device("cpu"), num_select=4, classes=[1, 2, 3])  # objects: 4 at most
    assert metrics["AP50"] == pytest.approx(1.0)


def test_eval_command_on_a_trained_checkpoint(shapes, tmp_path):
    train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "run"), *tiny_flags(), "--scale", "0.1",
                "--epochs", "1", "--num-workers", "0"])
    image = next((shapes / "val2017").iterdir())
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(tmp_path / "run" / "checkpoint.pth"),
                             "--data", str(shapes), "--output-dir", str(out), "--vis", "2", "--score-thr", "0.0",
                             "--num-workers", "0", "--save-results", "results.json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    assert set(metrics["per_class_AP"]) == {"square", "circle", "triangle"}
    assert "AP50" in result.stdout and "triangle" in result.stdout
    assert len(list((out / "vis").glob("*.png"))) == 2
    results = json.loads((out / "results.json").read_text())  # COCO results, as the test-dev server takes them
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    from data import load_coco
    load_coco(shapes / "annotations" / "instances_val2017.json").loadRes(results)
    result = subprocess.run([sys.executable, "-m", "appendix.detect", str(tmp_path / "run" / "checkpoint.pth"),
                             "--image", str(image), str(shapes / "train2017"), "--output-dir", str(out),
                             "--score-thr", "0.0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = 1 + len(list((shapes / "train2017").iterdir()))  # val2017/000001.jpg and train2017/000001.jpg too
    assert f"{image}:" in result.stdout and result.stdout.count(" detections with score >= 0.0") == inputs
    assert len(list(out.glob("*_detections.png"))) == inputs  # none drawn over another
    eager = result.stdout
    # the older spelling: eval.py passes --image on to appendix.detect
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(tmp_path / "run" / "checkpoint.pth"),
                             "--image", str(image), "--output-dir", str(out), "--score-thr", "0.0", "--compile"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--compile" not in result.stderr  # no fallback to eager
    # as many detections; not the same ones: padded to the compiled canvas, this barely trained model's
    # near-zero scores move (the input projections' GroupNorm sees the padding, as in official DINO)
    assert result.stdout.splitlines()[0] == eager.splitlines()[0]


def test_pictures_of_images_with_the_same_name_do_not_overwrite_each_other():
    from appendix.detect import picture_names
    assert picture_names(["a/img.jpg", "b/img.jpg", "c.png"]) == ["a_img", "b_img", "c"]
    names = picture_names(["x/d.jpg", "x/d.png", "d.gif"])
    assert len(set(names)) == 3


def test_image_arguments_take_files_folders_and_globs(tmp_path):
    from appendix.image_io import DataError, image_files
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) that are not images by their names: notes.txt$"):
        assert image_files([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert image_files([str(tmp_path / "**" / "*.jpg")]) == [tmp_path / "b.jpg", tmp_path / "sub" / "c.jpg"]
    assert image_files([str(tmp_path / "notes.txt")]) == [tmp_path / "notes.txt"]  # a file is taken as given
    with pytest.raises(DataError, match=r"--image .*\*.gif: no image files"):
        image_files([str(tmp_path / "*.gif")])


def test_labels_scale_with_the_picture():
    """The label of a box covers the same share of a 4000-pixel picture as of a 400-pixel one."""
    from appendix.inference import LABEL_COLOUR, draw_detections
    shares = []
    for side in (400, 4000):
        image = torch.full((3, side, side), 128, dtype=torch.uint8)
        detection = {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                     "boxes": torch.tensor([[0.3, 0.3, 0.6, 0.6]]) * side}
        pixels = torch.as_tensor(np.array(draw_detections(image, detection, {1: "person"}, 0.5)))
        shares.append((pixels == torch.tensor(LABEL_COLOUR)).all(-1).float().mean().item())
    assert 0.5 < shares[1] / shares[0] < 2, shares


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A checkpoint of one epoch on the shapes."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--data", str(shapes), "--output-dir", str(out), *tiny_flags(), "--scale", "0.1", "--epochs", "1",
                "--num-workers", "0"])
    return out / "checkpoint.pth"


def eval_main(*argv):
    import eval as evaluation
    return evaluation.main([*argv, *(["--num-workers", "0"] if "--data" in argv else [])])


def test_save_results_into_a_new_folder_creates_it(shapes, trained, tmp_path):
    eval_main(str(trained), "--data", str(shapes), "--output-dir", str(tmp_path), "--save-results", "sub/res.json")
    assert json.loads((tmp_path / "sub" / "res.json").read_text())


def test_eval_plots_and_their_missing_matplotlib(shapes, trained, tmp_path, monkeypatch, capsys):
    eval_main(str(trained), "--data", str(shapes), "--output-dir", str(tmp_path), "--plots", "--score-thr", "0.1")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion_matrix.png", "per_class_ap.png", "pr_curves.png", "predictions.jpg"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["confusion_matrix"]["score_thr"] == 0.1 and len(metrics["pr_curves"]["recall"]) == 101
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_info:
        eval_main(str(trained), "--data", str(shapes), "--output-dir", str(tmp_path / "again"), "--plots")
    assert exit_info.value.code == 2 and "plots need matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "again" / "metrics.json").exists()  # refused before the evaluation


def test_an_output_path_that_cannot_be_written_stops_before_the_evaluation(shapes, trained, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        eval_main(str(trained), "--data", str(shapes), "--output-dir", str(tmp_path), "--save-results", "file/res.json")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--save-results {tmp_path / 'file' / 'res.json'}: cannot write there" in err
    assert not (tmp_path / "metrics.json").exists()  # nothing was evaluated


def test_vis_draws_images_of_the_same_file_name_into_distinct_pictures(shapes, trained, tmp_path):
    data = json.loads((shapes / "annotations" / "instances_val2017.json").read_text())
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in {i["id"] for i in data["images"]}]
    for folder, info in zip("ab", data["images"]):
        (tmp_path / "images" / folder).mkdir(parents=True)
        (tmp_path / "images" / folder / "img.jpg").write_bytes((shapes / "val2017" / info["file_name"]).read_bytes())
        info["file_name"] = f"{folder}/img.jpg"
    (tmp_path / "val.json").write_text(json.dumps(data))
    eval_main(str(trained), "--val-images", str(tmp_path / "images"), "--val-json", str(tmp_path / "val.json"),
              "--output-dir", str(tmp_path / "out"), "--vis", "2")
    assert sorted(p.name for p in (tmp_path / "out" / "vis").glob("*.png")) == ["a_img.png", "b_img.png"]


def test_images_too_small_for_the_queries_are_one_line_naming_the_size_needed(shapes, trained, tmp_path, capsys):
    image = next((shapes / "val2017").iterdir())
    with pytest.raises(SystemExit) as exit_info:  # --scale 0.02: 16 pixels on the shorter side, 7 tokens for 30 queries
        eval_main(str(trained), "--image", str(image), "--scale", "0.02", "--output-dir", str(tmp_path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--scale 0.02 resizes an image to 16 pixels on its shorter side, whose 7 encoder tokens are fewer than " \
           "the 30 queries the model keeps: give --scale 0.05 or more" in err.splitlines()[0]


def test_an_image_smaller_than_its_scale_promised_is_one_line_naming_the_size_needed(tmp_path):
    """A thin strip (the shorter side is --scale's, the longer one capped) still gives too few tokens: the
    forward's own check, the pixels it needs."""
    from appendix.inference import Detector
    from config import TooFewTokens
    detector = Detector(tiny_dino(num_queries=30).eval(), make_config(**TINY, scale=0.06), {}, "cpu")  # 48: 52 tokens
    with pytest.raises(TooFewTokens, match="fewer than the 30 queries the model keeps: it needs about 39x39 pixels"):
        detector(torch.zeros(3, 10, 400, dtype=torch.uint8))  # 48 x 80 at most: 1333 x 0.06
