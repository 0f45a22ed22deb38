"""YOLO and Pascal VOC datasets (layouts.py): read into the COCO index that training and evaluation use, the
same boxes as the COCO file they were written from, every malformed label named by file and line."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_flags
from data import CocoDetection, load_coco, make_shapes_dataset, make_transforms, split_paths
from appendix.image_io import DataError
from appendix.layouts import label_file

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["circle", "square", "triangle"]  # sorted, as VOC numbers them; YOLO writes them in this order too
TO_SORTED = {1: 1, 2: 0, 3: 2}  # the shapes' COCO ids (square 1, circle 2, triangle 3) -> index in NAMES


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The shapes in COCO's layout, category ids renumbered to NAMES' order, so that the YOLO class indices
    and VOC's sorted names give the same ids."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("coco"), num_train=4, num_val=3, size=(64, 96))
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        data["categories"] = [{"id": i, "name": name} for i, name in enumerate(NAMES)]
        for ann in data["annotations"]:
            ann["category_id"] = TO_SORTED[ann["category_id"]]
        path.write_text(json.dumps(data))
    return root


def coco_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def write_yolo(coco_root: Path, out: Path, names=NAMES, line_end="\n") -> Path:
    for split in ("train", "val"):
        data = coco_split(coco_root, split)
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for image in data["images"]:
            shutil.copy(coco_root / f"{split}2017" / image["file_name"], out / "images" / split / image["file_name"])
            W, H = image["width"], image["height"]
            lines = [f"{a['category_id']} {(a['bbox'][0] + a['bbox'][2] / 2) / W!r} {(a['bbox'][1] + a['bbox'][3] / 2) / H!r} "
                     f"{a['bbox'][2] / W!r} {a['bbox'][3] / H!r}" for a in data["annotations"] if a["image_id"] == image["id"]]
            (out / "labels" / split / image["file_name"]).with_suffix(".txt").write_bytes(
                "".join(line + line_end for line in lines).encode())
    names_yaml = json.dumps(names) if isinstance(names, list) else "".join(f"\n  {k}: {v}" for k, v in names.items())
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names_yaml}\n")
    return out


def voc_xml(file_name: str, width: int, height: int, objects: list[tuple[str, list[float], bool]]) -> str:
    """objects: (name, [xmin, ymin, xmax, ymax] VOC's 1-based inclusive pixels, difficult)."""
    body = "".join(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for name, b, difficult in objects)
    return (f"<annotation><filename>{file_name}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def write_voc(coco_root: Path, out: Path) -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / folder).mkdir(parents=True)
    for split in ("train", "val"):
        data = coco_split(coco_root, split)
        ids = []
        for image in data["images"]:
            stem = f"{split}_{Path(image['file_name']).stem}"
            ids.append(stem)
            shutil.copy(coco_root / f"{split}2017" / image["file_name"], out / "JPEGImages" / f"{stem}.jpg")
            objects = [(NAMES[a["category_id"]], [a["bbox"][0] + 1, a["bbox"][1] + 1, a["bbox"][0] + a["bbox"][2],
                                                  a["bbox"][1] + a["bbox"][3]], False)
                       for a in data["annotations"] if a["image_id"] == image["id"]]
            (out / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", image["width"], image["height"], objects))
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return out


def boxes_by_image(data_dir, split: str) -> list[list[tuple[int, list[float]]]]:
    coco = load_coco(*reversed(split_paths(split, str(data_dir), None, None)), log=lambda _: None)
    return [sorted((a["category_id"], a["bbox"]) for a in coco.imgToAnns[i]) for i in sorted(coco.imgs)]


@pytest.mark.parametrize("write", [write_yolo, write_voc])
def test_yolo_and_voc_give_the_coco_files_boxes(shapes, write, tmp_path):
    want = {split: boxes_by_image(shapes, split) for split in ("train", "val")}
    data_dir = write(shapes, tmp_path / "data")
    for split in ("train", "val"):
        got = boxes_by_image(data_dir, split)
        assert len(got) == len(want[split]) and sum(map(len, got)) > 0
        for g, w in zip(got, want[split]):
            assert [label for label, _ in g] == [label for label, _ in w]
            torch.testing.assert_close(torch.tensor([b for _, b in g], dtype=torch.float64).reshape(-1, 4),
                                       torch.tensor([b for _, b in w], dtype=torch.float64).reshape(-1, 4), rtol=0, atol=1e-6)
    _, ann = split_paths("val", str(data_dir), None, None)
    assert [c["name"] for c in load_coco(ann).dataset["categories"]] == NAMES


def test_the_three_layouts_train_and_evaluate_alike(shapes, tmp_path):
    runs = {}
    for name, data_dir in [("coco", shapes), ("yolo", write_yolo(shapes, tmp_path / "yolo")),
                           ("voc", write_voc(shapes, tmp_path / "voc"))]:
        out = tmp_path / f"run_{name}"
        train.main(["--data", str(data_dir), "--output-dir", str(out), *tiny_flags(), "--scale", "0.1", "--epochs", "1",
                    "--num-workers", "0"])
        runs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert torch.load(out / "checkpoint.pth", weights_only=True)["categories"] == dict(enumerate(NAMES))
    assert runs["coco"][0]["train"] == runs["yolo"][0]["train"] == runs["voc"][0]["train"]  # every loss term
    assert runs["coco"][0]["val"] == runs["yolo"][0]["val"] == runs["voc"][0]["val"]  # AP, AP per class, ...


def test_yolo_names_as_a_dict_and_label_files_missing_empty_or_with_windows_line_ends(shapes, tmp_path):
    data_dir = write_yolo(shapes, tmp_path / "yolo", names={0: "circle", 1: "square", 2: "triangle"}, line_end="\r\n")
    labels = sorted((data_dir / "labels" / "val").iterdir())
    labels[0].unlink()
    labels[1].write_text("")
    images, ann = split_paths("val", str(data_dir), None, None)
    coco = load_coco(ann, images)
    assert [c["name"] for c in coco.dataset["categories"]] == NAMES
    counts = [len(coco.imgToAnns[i]) for i in sorted(coco.imgs)]
    assert counts[:2] == [0, 0] and len(counts) == 3 and counts[2] > 0
    assert coco.imgs[1]["file_name"] == "images/val/000001.jpg"


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.1 0.1", r"line 2: class 3 is not an index of 'names' \(0..2\)"),
    ("0 0.5 0.5 0.1", r"line 2: 4 numbers; a box is 5"),
    ("0 0.5 0.5 0.1 0.1 0.3", r"line 2: 6 numbers; a box is 5"),
    ("0 12 30 5 8", r"line 2: coordinates \['12', '30', '5', '8'\] outside \[0, 1\]"),
    ("0 0.5 0.5 0.1 O.1", r"line 2: '0 0.5 0.5 0.1 O.1' is not numbers"),
])
def test_a_bad_yolo_label_line_is_named_by_file_and_line(shapes, tmp_path, line, message):
    data_dir = write_yolo(shapes, tmp_path / "yolo")
    label = sorted((data_dir / "labels" / "val").iterdir())[0]
    label.write_text("1 0.5 0.5 0.2 0.2\n" + line + "\n")
    with pytest.raises(DataError, match=f"{label}, {message}"):
        split_paths("val", str(data_dir), None, None)


def test_yolo_polygons_give_their_enclosing_box(tmp_path):
    from PIL import Image
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.2 0.5 0.2 0.3 0.9\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: {0: thing}\n")
    coco = load_coco(*reversed(split_paths("val", str(tmp_path / "data.yaml"), None, None)))
    assert coco.anns[1]["bbox"] == pytest.approx([10, 10, 40, 35])
    assert label_file(Path("d/images/train/images/x.jpg")) == Path("d/images/train/labels/x.txt")  # the last images/


def test_voc_difficult_objects_are_crowd_and_pixels_are_one_based(tmp_path):
    from PIL import Image
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / folder).mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "JPEGImages" / "x.jpg")
    (tmp_path / "Annotations" / "x.xml").write_text(voc_xml("x.jpg", 40, 30, [("dog", [1, 1, 10, 20], False),
                                                                            ("cat", [5, 6, 40, 30], True)]))
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("x\n")
    images, ann = split_paths("val", str(tmp_path), None, None)
    coco = load_coco(ann, images)
    assert [(coco.cats[a["category_id"]]["name"], a["bbox"], a["iscrowd"]) for a in coco.anns.values()] == [
        ("dog", [0, 0, 10, 20], 0), ("cat", [4, 5, 36, 25], 1)]  # the cat reaches the image's last pixel
    _, target = CocoDetection(images, ann, make_transforms(False, 1.0))[0]
    assert target["labels"].tolist() == [1]  # the difficult cat is no training target (dog 1, cat 0)


def voc_folder(root: Path, objects: list, stem: str = "x") -> Path:
    """A VOC dataset of one 40x30 image, `stem`.jpg (str: made of the file system's bytes), in the val split;
    its annotation names no <filename> (VOC's image is then JPEGImages/ID.jpg)."""
    from PIL import Image
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / f"{stem}.xml").write_text(re.sub("<filename>.*</filename>", "", voc_xml("", 40, 30, objects)))
    (root / "ImageSets" / "Main" / "val.txt").write_bytes(os.fsencode(stem) + b"\n")
    return root


@pytest.mark.parametrize("box, message", [([10, 1, 5, 20], "has xmin 10 > xmax 5"), ([1, 20, 10, 4], "has ymin 20 > ymax 4")])
def test_a_voc_box_whose_corners_are_swapped_names_its_file_and_object(tmp_path, box, message):
    voc_folder(tmp_path, [("dog", [1, 1, 10, 20], False), ("cat", box, False)])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'Annotations' / 'x.xml'}: object 2 \('cat'\) {message}$"):
        split_paths("val", str(tmp_path), None, None)


def test_a_voc_image_whose_name_is_not_utf8_is_read(tmp_path):
    stem = os.fsdecode(b"caf\xe9")  # Latin-1, as an older Windows tool names it
    images, ann = split_paths("val", str(voc_folder(tmp_path, [("dog", [1, 1, 10, 20], False)], stem)), None, None)
    image, target = CocoDetection(images, ann, make_transforms(False, 1.0))[0]
    assert image.shape[1:] == (800, 1066) and target["labels"].tolist() == [0]  # resized for validation


def test_an_unknown_layout_says_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="no dataset layout recognised: expected annotations/"):
        split_paths("val", str(tmp_path), None, None)


def test_to_coco_writes_a_file_pycocotools_loads(shapes, tmp_path):
    data_dir = write_voc(shapes, tmp_path / "voc")
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), str(data_dir), "--split", "val", "--to-coco",
                             str(tmp_path / "new" / "val.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr  # its folder created, as every output path of a command
    from pycocotools.coco import COCO
    coco = COCO(str(tmp_path / "new" / "val.json"))
    assert len(coco.imgs) == 3 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
    assert boxes_by_image(data_dir, "val") == [sorted((a["category_id"], a["bbox"]) for a in coco.imgToAnns[i])
                                               for i in sorted(coco.imgs)]
