import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from data import (IMAGENET_MEAN, IMAGENET_STD, CocoDetection, DataError, RandomSizeCrop, collate,
                  make_shapes_dataset, make_transforms, read_image)
from torchvision.transforms import v2

COLOURS = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], dtype=torch.uint8)


def painted_sample(H=300, W=400, seed=0):
    """An image with 4 non-overlapping boxes, each filled with its own colour; label = colour index."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, H, W), 128, dtype=torch.uint8)
    boxes = []
    for k, (cx, cy) in enumerate([(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]):
        w, h = (0.15 + 0.2 * torch.rand(2, generator=g)).tolist()
        x1, y1, x2, y2 = int((cx - w / 2) * W), int((cy - h / 2) * H), int((cx + w / 2) * W), int((cy + h / 2) * H)
        image[:, y1:y2, x1:x2] = COLOURS[k][:, None, None]
        boxes.append([x1, y1, x2, y2])
    return {"image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(H, W)),
            "labels": torch.arange(4)}


def assert_boxes_follow_their_content(out):
    image = out["image"]
    if image.is_floating_point():  # undo the normalisation
        image = (image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]) * 255
    H, W = image.shape[-2:]
    assert tuple(out["boxes"].canvas_size) == (H, W)
    for box, label in zip(out["boxes"], out["labels"]):
        x1, y1, x2, y2 = box.tolist()
        assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H
        if x2 - x1 < 4 or y2 - y1 < 4:  # a sliver left by a crop: too thin to sample
            continue
        centre = image[:, int((y1 + y2) / 2), int((x1 + x2) / 2)].float()
        torch.testing.assert_close(centre, COLOURS[label].float(), atol=12, rtol=0)


@pytest.mark.parametrize("transform", [v2.RandomHorizontalFlip(p=1.0), v2.RandomShortestSize([200, 480], 500),
                                       RandomSizeCrop(100, 250), v2.Resize(150, max_size=180)],
                         ids=["flip", "shortest-size", "size-crop", "resize"])
def test_each_transform_keeps_boxes_on_their_objects(transform):
    for seed in range(5):
        torch.manual_seed(seed)
        assert_boxes_follow_their_content(transform(painted_sample(seed=seed)))


@pytest.mark.parametrize("train, scale", [(True, 1.0), (True, 0.5), (False, 1.0), (False, 1.5)])
def test_the_seeds_augmentation_keeps_boxes_on_their_objects(train, scale):
    transform = make_transforms(train, scale)
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(painted_sample(seed=seed))
        assert_boxes_follow_their_content(out)
        short, long = sorted(out["image"].shape[-2:])
        if not train:
            assert short == round(800 * scale) or long == round(1333 * scale)
        else:
            assert long <= round(1333 * scale) and short <= round(800 * scale)


def test_collate_pads_to_the_largest_image_and_masks_the_padding():
    a, b = torch.randn(3, 20, 30), torch.randn(3, 25, 10)
    images, mask, targets = collate([(a, {"id": 0}), (b, {"id": 1})])
    assert images.shape == (2, 3, 25, 30) and mask.shape == (2, 25, 30)
    assert torch.equal(images[0, :, :20, :30], a) and torch.equal(images[1, :, :25, :10], b)
    assert (images[0, :, 20:] == 0).all() and (images[1, :, :, 10:] == 0).all()
    assert not mask[0, :20, :30].any() and mask[0, 20:].all()
    assert not mask[1, :, :10].any() and mask[1, :, 10:].all()
    assert [t["id"] for t in targets] == [0, 1]


def test_collate_pads_a_compiled_runs_batches_to_a_multiple_of_the_size_step():
    """train.py --compile: each side rounded up to static_shapes.bucket_step(scale) pixels (128 at scale 1, 32
    at the demo's 0.25), padding masked; a side already on a multiple stays."""
    from appendix.static_shapes import bucket_step
    assert bucket_step(1.0) == 128 and bucket_step(0.25) == 32 and bucket_step(1.5) == 192
    a, b = torch.randn(3, 20, 64), torch.randn(3, 33, 10)
    images, mask, _ = collate([(a, {}), (b, {})], multiple=32)
    assert images.shape == (2, 3, 64, 64)
    assert torch.equal(images[0, :, :20, :64], a) and not mask[0, :20].any() and mask[0, 20:].all()
    assert torch.equal(images[1, :, :33, :10], b) and mask[1, 33:].all() and mask[1, :, 10:].all()


def write_awkward_dataset(root):
    """Non-contiguous category ids, EXIF rotation, grayscale, RGBA, palette, an image without
    annotations, a crowd annotation and a zero-width box."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    # a 60x40 (w x h) picture, red square at x 10..30, y 5..25 as displayed, stored rotated with EXIF orientation 6
    shown = Image.new("RGB", (60, 40), (128, 128, 128))
    shown.paste((255, 0, 0), (10, 5, 30, 25))
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 270 to display
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(images_dir / "exif.jpg", exif=exif, quality=95)
    Image.new("L", (50, 50), 90).save(images_dir / "gray.png")
    Image.new("RGBA", (50, 50), (10, 200, 10, 100)).save(images_dir / "rgba.png")
    Image.new("P", (50, 50), 3).save(images_dir / "palette.png")
    Image.new("RGB", (50, 50)).save(images_dir / "empty.png")
    images = [{"id": 1, "file_name": "exif.jpg", "width": 60, "height": 40},
              {"id": 2, "file_name": "gray.png", "width": 50, "height": 50},
              {"id": 7, "file_name": "rgba.png", "width": 50, "height": 50},
              {"id": 9, "file_name": "palette.png", "width": 50, "height": 50},
              {"id": 11, "file_name": "empty.png", "width": 50, "height": 50}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 17, "bbox": [10, 5, 20, 20], "iscrowd": 0, "area": 400},
                   {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 20], "iscrowd": 0, "area": 400},
                   {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1, "area": 2500},
                   {"id": 4, "image_id": 7, "category_id": 17, "bbox": [10, 10, 0, 20], "iscrowd": 0, "area": 0},
                   {"id": 5, "image_id": 9, "category_id": 3, "bbox": [40, 40, 30, 30], "iscrowd": 0, "area": 900}]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 3, "name": "three"}, {"id": 17, "name": "seventeen"}]}))
    return images_dir, ann_file


def identity_transform():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def test_dataset_on_awkward_data(tmp_path):
    dataset = CocoDetection(*write_awkward_dataset(tmp_path), identity_transform())
    assert len(dataset) == 5 and dataset.num_classes == 18  # largest id + 1
    by_id = {dataset.ids[i]: dataset[i] for i in range(len(dataset))}
    image, target = by_id[1]  # EXIF applied: 40 high, 60 wide, the box on the red square
    assert image.shape == (3, 40, 60)
    assert target["labels"].tolist() == [17]
    torch.testing.assert_close(target["boxes"], torch.tensor([[20 / 60, 15 / 40, 20 / 60, 20 / 40]]))
    assert image[0, 15, 20] > 0.9 and image[1, 15, 20] < 0.1
    image, target = by_id[2]  # grayscale -> RGB; the crowd annotation is not a target
    assert image.shape == (3, 50, 50) and target["labels"].tolist() == [3]
    image, target = by_id[7]  # RGBA -> RGB; the zero-width box is dropped
    assert image.shape == (3, 50, 50) and len(target["labels"]) == 0
    image, target = by_id[9]  # palette -> RGB; the box is clipped to the image
    assert image.shape == (3, 50, 50)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.9, 0.9, 0.2, 0.2]]))
    image, target = by_id[11]  # kept without annotations
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64
    assert target["orig_size"].tolist() == [50, 50] and target["image_id"] == 11


def edit_annotations(ann_file, change) -> None:
    """Rewrite the annotation file with change(data) applied to its parsed JSON."""
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


def test_annotations_made_on_the_stored_pixels_are_kept_unrotated(tmp_path):
    images_dir, ann_file = write_awkward_dataset(tmp_path)
    edit_annotations(ann_file, lambda d: d["images"][0].update(width=40, height=60))  # the stored orientation
    image, _ = CocoDetection(images_dir, ann_file, identity_transform())[0]
    assert image.shape == (3, 60, 40)


def test_missing_image_is_named(tmp_path):
    images_dir, ann_file = write_awkward_dataset(tmp_path)
    (images_dir / "gray.png").unlink()
    with pytest.raises(DataError, match="gray.png"):
        CocoDetection(images_dir, ann_file, identity_transform())


def test_corrupt_image_is_named(tmp_path):
    images_dir, ann_file = write_awkward_dataset(tmp_path)
    (images_dir / "rgba.png").write_bytes(b"\x89PNG not really")
    dataset = CocoDetection(images_dir, ann_file, identity_transform())
    with pytest.raises(ValueError, match="rgba.png"):
        dataset[dataset.ids.index(7)]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(image_id=99), "annotation 1 has image_id 99"),
    (lambda d: d["annotations"][1].update(category_id=5), "annotation 2 has category_id 5"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), r"annotation 3: bbox \[1, 2, 3\] is not"),
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d["annotations"][2].update(id=1), "annotation id 1 appears twice"),
    (lambda d: d["categories"][0].update(id="3"), "category '3' in 'categories' has no integer 'id'"),
    (lambda d: d["annotations"][0].update(id=None), "annotation None in 'annotations' has no integer 'id'"),
    (lambda d: d["images"][1].update(id=1.0), "image 1.0 in 'images' has no integer 'id'"),
    (lambda d: d["annotations"][1].update(bbox=[5, 5, -20, 20]), "annotation 2: bbox .* negative width"),
    (lambda d: d["annotations"][1].update(bbox=[5, float("nan"), 20, 20]), "annotation 2: bbox .* finite numbers"),
    (lambda d: d["annotations"][1].update(bbox=[60, 5, 20, 20]), "annotation 2: bbox .* outside its 50x50 image"),
    (lambda d: d["annotations"][1].update(bbox=[50, 5, 20, 20]), "annotation 2: bbox .* outside its 50x50 image"),
    (lambda d: d["annotations"][1].update(bbox=[5, -30, 20, 30]), "annotation 2: bbox .* outside its 50x50 image"),
    (lambda d: d["annotations"][1].update(bbox=[5, 5, 20, -20]), "annotation 2: bbox .* negative width or height"),
])
def test_bad_annotations_are_named(tmp_path, change, message):
    images_dir, ann_file = write_awkward_dataset(tmp_path)
    edit_annotations(ann_file, change)
    with pytest.raises(DataError, match=f"{ann_file}: .*{message}"):
        CocoDetection(images_dir, ann_file, identity_transform())


def test_generated_dataset_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_train=5, num_val=2, seed=3)
    b = make_shapes_dataset(tmp_path / "b", num_train=5, num_val=2, seed=3)
    for rel in ("annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017/000003.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    data = json.loads((a / "annotations/instances_train2017.json").read_text())
    assert {c["id"] for c in data["categories"]} == {1, 2, 3} and len(data["images"]) == 5
    dataset = CocoDetection(a / "train2017", a / "annotations/instances_train2017.json", make_transforms(True, 0.25))
    image, target = dataset[0]
    assert image.shape[0] == 3 and len(target["labels"]) >= 1


def test_annotations_without_area_or_iscrowd_are_completed_and_evaluated(tmp_path):
    """Converted datasets often lack both: pycocotools' evaluation needs them (KeyError: 'area')."""
    from eval import coco_metrics
    images_dir, ann_file = write_awkward_dataset(tmp_path)

    def without_area_or_iscrowd(data):
        for ann in data["annotations"]:
            del ann["area"], ann["iscrowd"]
    edit_annotations(ann_file, without_area_or_iscrowd)
    notes = []
    dataset = CocoDetection(images_dir, ann_file, identity_transform(), log=notes.append)
    assert any("4 annotation(s) without 'area'" in n for n in notes), notes
    assert any("4 annotation(s) without 'iscrowd': set to 0" in n for n in notes), notes
    assert dataset.coco.anns[1]["area"] == 400 and dataset.coco.anns[5]["area"] == 100  # clipped to 10 x 10
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in dataset.coco.anns.values()]
    assert coco_metrics(dataset.coco, perfect, dataset.ids)["AP"] == pytest.approx(1.0)


def test_boxes_beyond_the_image_are_clipped_and_empty_ones_dropped_for_training_and_evaluation(tmp_path):
    notes = []
    dataset = CocoDetection(*write_awkward_dataset(tmp_path), identity_transform(), log=notes.append)
    assert dataset.coco.anns[5]["bbox"] == [40, 40, 10, 10]  # what evaluation reads
    _, target = dataset[dataset.ids.index(9)]  # what training reads
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.9, 0.9, 0.2, 0.2]]))
    assert 4 not in dataset.coco.anns  # the zero-width box, in neither
    assert any("1 box(es) reach beyond their image" in n for n in notes)
    assert any("1 empty box(es)" in n for n in notes)


def test_boxes_are_clipped_to_the_width_in_x_and_the_height_in_y(tmp_path):
    """On a non-square image (image 1: 60 wide, 40 high once EXIF-rotated): a box beyond the right edge
    stops at the width, one beyond the bottom edge at the height."""
    images_dir, ann_file = write_awkward_dataset(tmp_path)
    edit_annotations(ann_file, lambda d: d["annotations"].extend([
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [50, 5, 20, 10], "iscrowd": 0, "area": 200},
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [5, 30, 20, 20], "iscrowd": 0, "area": 400}]))
    dataset = CocoDetection(images_dir, ann_file, identity_transform(), log=lambda _: None)
    assert dataset.coco.anns[6]["bbox"] == [50, 5, 10, 10]
    assert dataset.coco.anns[7]["bbox"] == [5, 30, 20, 10]


def test_images_without_a_size_in_the_file_get_it_from_the_image(tmp_path):
    images_dir, ann_file = write_awkward_dataset(tmp_path)

    def without_sizes(data):
        for img in data["images"]:
            del img["width"], img["height"]
    edit_annotations(ann_file, without_sizes)
    dataset = CocoDetection(images_dir, ann_file, identity_transform(), log=lambda _: None)
    assert (dataset.coco.imgs[1]["width"], dataset.coco.imgs[1]["height"]) == (60, 40)  # EXIF-rotated
    assert dataset.coco.anns[5]["bbox"] == [40, 40, 10, 10]  # so boxes are still checked against it


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = (torch.arange(64 * 32) * 32).reshape(32, 64).numpy().astype("uint16")  # 0 .. 65504
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = torch.as_tensor(np.array(read_image(tmp_path / "deep.png", None)))
    assert image.shape == (32, 64, 3)
    assert torch.equal(image[..., 0], torch.as_tensor(ramp.astype("int64") >> 8).to(torch.uint8))
    assert image.float().std() > 50  # a ramp, not white
