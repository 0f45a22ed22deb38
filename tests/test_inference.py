"""The detector API (inference.Detector): every kind of input gives eval.py --image's detections, named;
video through PyAV; SAHI's sliced inference finds what the whole image misses, each object once."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn
from torchvision.ops import box_convert, box_iou

import eval as evaluation
import train
from config import ConfigError, make_config
from conftest import tiny_dino, tiny_flags
from data import coco_category_names, make_shapes_dataset
from appendix.image_io import DataError
from appendix.inference import Detections, Detector, merge_detections, tile_windows


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=3, size=(64, 96))


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A checkpoint of one epoch on the shapes, and its detector."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--data", str(shapes), "--output-dir", str(out), *tiny_flags(), "--scale", "0.1", "--epochs", "1",
                "--num-workers", "0"])
    return out / "checkpoint.pth", Detector.load(out / "checkpoint.pth", device="cpu")


def eval_image_results(checkpoint, image, tmp_path) -> dict:
    """eval.py --image's detections of one file, from its --save-results JSON line."""
    evaluation.main([str(checkpoint), "--image", str(image), "--score-thr", "0", "--output-dir", str(tmp_path),
                     "--save-results", "found.jsonl", "--device", "cpu"])
    [line] = (tmp_path / "found.jsonl").read_text().splitlines()
    return json.loads(line)


def assert_same(found: Detections, want: dict):
    assert len(found) == len(want["scores"]) > 0
    assert found.labels.tolist() == want["labels"] and found.names == want["names"]
    torch.testing.assert_close(found.scores, torch.tensor(want["scores"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(found.boxes, torch.tensor(want["boxes"]), rtol=0, atol=0.006)  # JSON: 2 decimals


def test_every_kind_of_input_gives_the_detections_of_eval_image(shapes, trained, tmp_path):
    checkpoint, detector = trained
    path = sorted((shapes / "val2017").iterdir())[0]
    want = eval_image_results(checkpoint, path, tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / path.name).write_bytes(path.read_bytes())
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    for single in (str(path), path, pil, array, tensor):
        assert_same(detector(single, score_thr=0), want)
    for many in (tmp_path / "one", str(tmp_path / "one" / "*.jpg"), [path]):
        [found] = detector(many, score_thr=0)
        assert_same(found, want)
    mixed = detector([str(path), tmp_path / "one", pil, array, tensor], score_thr=0)
    assert len(mixed) == 5
    for found in mixed:
        assert_same(found, want)
    assert [found.source for found in mixed[:2]] == [str(path), str(tmp_path / "one" / path.name)]
    assert not (detector(path, score_thr=0.5).scores < 0.5).any()


def test_a_pil_image_is_turned_by_its_exif_orientation_as_a_file_is(shapes, trained, tmp_path):
    _, detector = trained
    image = Image.open(sorted((shapes / "val2017").iterdir())[0])
    exif = image.getexif()
    exif[0x0112] = 6  # stored turned: shown 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif)
    from_file, from_pil = detector(tmp_path / "turned.jpg", score_thr=0), detector(Image.open(tmp_path / "turned.jpg"), score_thr=0)
    assert from_pil.image.shape == from_file.image.shape == (3, *image.size)  # (W, H) stored: turned
    assert torch.equal(from_pil.boxes, from_file.boxes)


def test_names_come_from_our_checkpoint(trained):
    _, detector = trained
    assert detector.categories == {1: "square", 2: "circle", 3: "triangle"}
    found = detector(torch.zeros(3, 64, 96, dtype=torch.uint8), score_thr=0)
    assert found.names == [{1: "square", 2: "circle", 3: "triangle"}.get(label, str(label)) for label in found.labels.tolist()]


def test_detections_name_only_the_categories_the_checkpoint_was_trained_on(tmp_path):
    """Category ids 3 and 9 alone: a class head of 10 rows, 8 of them no category, never reported, whatever
    the threshold, nor named by their index."""
    model = tiny_dino(num_classes=10)
    torch.save({"model": model.state_dict(), "config": dict(model.cfg.__dict__), "categories": {3: "block", 9: "disc"}},
               tmp_path / "two.pth")
    found = Detector.load(tmp_path / "two.pth", device="cpu")(torch.zeros(3, 64, 96, dtype=torch.uint8), score_thr=0)
    assert set(found.labels.tolist()) == {3, 9} and set(found.names) == {"block", "disc"}
    assert len(found) == 60  # 30 queries x 2 categories: num_select 300 is more than there are


def test_an_official_checkpoint_gets_the_coco_names(tmp_path):
    from test_checkpoints import REFERENCE, fake_official_state_dict
    official = fake_official_state_dict(json.loads((REFERENCE / "official_r50_keys.json").read_text()))
    torch.save({"model": official}, tmp_path / "official.pth")
    detector = Detector.load(tmp_path / "official.pth", device="cpu", scale=0.3)
    assert detector.categories == coco_category_names() and detector.categories[1] == "person"
    found = detector(torch.zeros(3, 240, 360, dtype=torch.uint8), score_thr=0)
    coco = coco_category_names()
    assert set(found.labels.tolist()) <= set(coco) and found.names == [coco[label] for label in found.labels.tolist()]


def test_wrong_inputs_are_named(shapes, trained, tmp_path):
    _, detector = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(next((shapes / "val2017").iterdir()).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="left out 1 file.* notes.txt"):
        assert len(detector(folder)) == 1
    (folder / "b.jpg").write_text("not an image either")
    with pytest.raises(DataError, match=f"cannot read image {folder / 'b.jpg'}"):
        detector(str(folder / "b.jpg"))
    with pytest.raises(DataError, match=r"input\[1\]: a numpy image must be \(H, W, 3\) uint8 RGB, got \(4, 4\) float64"):
        detector([folder / "a.jpg", np.zeros((4, 4))])
    with pytest.raises(DataError, match=r"a tensor image must be \(3, H, W\) uint8"):
        detector(torch.rand(3, 8, 8))
    with pytest.raises(DataError, match="int is no image"):
        detector(3)


def test_detections_convert_to_coco_and_supervision(trained):
    _, detector = trained
    found = detector(torch.zeros(3, 64, 96, dtype=torch.uint8), score_thr=0)
    coco = found.to_coco(7)
    x1, y1, x2, y2 = found.boxes[0].tolist()
    assert coco[0] == {"image_id": 7, "category_id": int(found.labels[0]), "bbox": pytest.approx([x1, y1, x2 - x1, y2 - y1]),
                       "score": pytest.approx(float(found.scores[0]))}
    sv = found.to_supervision()
    assert len(sv) == len(found) and np.allclose(sv.xyxy, found.boxes.numpy())
    assert sv.class_id.tolist() == found.labels.tolist() and list(sv.data["class_name"]) == found.names
    assert found.draw().size == (96, 64)


# --- video ---------------------------------------------------------------------------------------------

def write_clip(path, frames: list[np.ndarray], fps: int = 5):
    """A video written with PyAV directly (not through video.py)."""
    import av
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def frame_count(path) -> int:
    import av
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def clip(shapes, tmp_path_factory):
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shapes / "train2017").iterdir())]
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(path, frames)
    return path


def test_video_gives_one_result_per_frame_as_its_frames_alone_give(trained, clip):
    _, detector = trained
    import av
    with av.open(str(clip)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    results = list(detector.video(clip, score_thr=0))
    assert [index for index, _ in results] == list(range(len(frames))) == list(range(4))
    for (_, found), frame in zip(results, frames):
        alone = detector(frame, score_thr=0)
        assert torch.equal(found.scores, alone.scores) and torch.equal(found.boxes, alone.boxes)


def test_eval_video_writes_the_drawn_video_and_a_json_line_per_frame(trained, clip, tmp_path, capsys):
    checkpoint, _ = trained
    evaluation.main([str(checkpoint), "--video", str(clip), "--output", str(tmp_path / "out.mp4"), "--device", "cpu",
                     "--output-dir", str(tmp_path), "--save-results", "frames.jsonl", "--score-thr", "0.01"])
    assert frame_count(tmp_path / "out.mp4") == 4
    lines = [json.loads(line) for line in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3] and {"boxes", "scores", "names"} <= set(lines[0])
    assert "4 frames in" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.jsonl", "out.mp4"]  # no temporary files left


def eval_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_videos_and_a_missing_pyav_are_one_line(trained, tmp_path, capsys, monkeypatch):
    checkpoint, _ = trained
    (tmp_path / "notes.mp4").write_text("not a video")
    out = ["--output-dir", str(tmp_path / "out")]
    assert f"{tmp_path / 'notes.mp4'} is not a video PyAV can read" in eval_error(capsys, str(checkpoint), "--video", str(tmp_path / "notes.mp4"), *out)
    import wave
    with wave.open(str(tmp_path / "sound.wav"), "w") as sound:
        sound.setnchannels(1), sound.setsampwidth(2), sound.setframerate(8000), sound.writeframes(b"\0\0" * 800)
    assert "sound.wav has no video stream" in eval_error(capsys, str(checkpoint), "--video", str(tmp_path / "sound.wav"), *out)
    assert "video nope.mp4 does not exist" in eval_error(capsys, str(checkpoint), "--video", "nope.mp4", *out)
    assert "end the name with one of .mp4" in eval_error(capsys, str(checkpoint), "--video", "nope.mp4", "--output", str(tmp_path / "o.gif"))
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert "video needs PyAV (the FFmpeg binding): pip install av" in eval_error(capsys, str(checkpoint), "--video", str(tmp_path / "notes.mp4"), *out)


# --- sliced inference ---------------------------------------------------------------------------------------

class BrightSpots(nn.Module):
    """A model that detects bright squares (class 1) of at least MIN pixels a side in the image it is given,
    as a detector trained at one scale misses objects far smaller than those it was trained on."""
    MIN = 6

    def forward(self, images, mask):
        B, Q = len(images), 40
        logits, boxes = torch.full((B, Q, 2), -10.0), torch.full((B, Q, 4), 0.5)
        for b in range(B):
            H, W = int((~mask[b]).any(1).sum()), int((~mask[b]).any(0).sum())
            spots, _ = ndimage.label((images[b, :, :H, :W].mean(0) > 0.5).numpy())
            found = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(spots)]
            found = torch.tensor([f for f in found if min(f[2] - f[0], f[3] - f[1]) >= self.MIN], dtype=torch.float32)
            if len(found):
                logits[b, :len(found), 1] = 5.0
                boxes[b, :len(found)] = box_convert(found / torch.tensor([W, H, W, H]), "xyxy", "cxcywh")
        return {"pred_logits": logits, "pred_boxes": boxes}


def large_image_with_small_squares():
    """600x900 pixels, 16-pixel squares, one lying across the edge between two tiles of 100 pixels (x 80-180
    and 160-260) and cut by both; and a square of 300 pixels that no tile holds whole."""
    squares = torch.tensor([[37, 411, 53, 427], [700, 90, 716, 106], [444, 520, 460, 536], [150, 300, 190, 316],
                            [450, 200, 750, 500]])
    image = torch.zeros(3, 600, 900, dtype=torch.uint8)
    for x1, y1, x2, y2 in squares.tolist():
        image[:, y1:y2, x1:x2] = 255
    return image, squares.float()


def test_slicing_finds_the_small_objects_the_whole_image_misses_each_once():
    image, squares = large_image_with_small_squares()
    detector = Detector(BrightSpots(), make_config(scale=0.1, num_select=20), {1: "spot"}, "cpu")
    assert len(detector(image)) == 1  # 600 pixels shown as 80: the small squares are 2 pixels
    found = detector(image, slice=100, overlap=0.2)
    assert len(found) == len(squares) and found.names == ["spot"] * 5
    iou = box_iou(squares, found.boxes)
    assert (iou.max(1).values > 0.6).all(), (squares, found.boxes)


@pytest.mark.parametrize("options, message", [(dict(slice=63), "at least 64"), (dict(slice=64.0), "at least 64"),
                                             (dict(slice=640, overlap=0.8), r"overlap \(--overlap\) is a share of the tile in \[0, 0.75\], got 0.8"),
                                             (dict(slice=640, overlap=-0.1), "got -0.1")])
def test_slicing_refuses_tiles_too_small_or_overlapping_too_much(options, message):
    detector = Detector(BrightSpots(), make_config(scale=0.1), {1: "spot"}, "cpu")
    with pytest.raises(ConfigError, match=message):
        detector(torch.zeros(3, 100, 100, dtype=torch.uint8), **options)


def test_slicing_into_many_tiles_says_how_many_before_it_starts():
    detector = Detector(BrightSpots(), make_config(scale=0.1, num_select=20), {1: "spot"}, "cpu")
    with pytest.warns(UserWarning, match=r"900x600 pixels sliced into 150 tiles of 64, overlap 0.0: 151 forward passes"):
        detector(torch.zeros(3, 600, 900, dtype=torch.uint8), slice=64, overlap=0.0)


def test_tiles_cover_the_image_and_overlap_as_asked():
    for H, W, size in [(600, 900, 100), (100, 250, 100), (50, 70, 100), (333, 1000, 128)]:
        windows = tile_windows(H, W, size, 0.2)
        covered = torch.zeros(H, W, dtype=torch.int)
        for x1, y1, x2, y2 in windows:
            assert (x2 - x1, y2 - y1) == (min(size, W), min(size, H))
            covered[y1:y2, x1:x2] += 1
        assert (covered > 0).all()
        xs = sorted({w[0] for w in windows})
        assert all(b - a <= size - 20 for a, b in zip(xs, xs[1:]))  # neighbours share at least 20 pixels


def test_merging_takes_a_part_into_its_whole_and_keeps_other_classes_and_places_apart():
    def found(boxes, scores, labels):
        return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(labels),
                          [str(label) for label in labels])
    whole = found([[10, 10, 50, 50]], [0.6], [1])
    part = found([[30, 12, 52, 49], [10, 10, 50, 50], [200, 200, 220, 220]], [0.9, 0.8, 0.7], [1, 2, 1])
    merged = merge_detections([whole, part])
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert merged.boxes.tolist() == [[10, 10, 52, 50], [10, 10, 50, 50], [200, 200, 220, 220]]
    assert merged.labels.tolist() == [1, 2, 1]


def test_eval_data_with_slices_reports_both_aps(shapes, trained, tmp_path, capsys):
    checkpoint, _ = trained
    evaluation.main([str(checkpoint), "--data", str(shapes), "--slice", "64", "--score-thr", "0.05",
                     "--output-dir", str(tmp_path), "--device", "cpu", "--num-workers", "0"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "AP" in metrics and "AP" in metrics["whole_image"]
    assert "whole images alone, detections with score >= 0.05" in capsys.readouterr().out
