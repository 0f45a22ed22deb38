"""export.py and onnx_detect.py: a DINO leaves PyTorch as one ONNX graph, images to detections, and ONNX
Runtime then gives PyTorch's detections; the deployment example needs no torch."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from appendix import export
from appendix import onnx_detect
from appendix.checkpoints import convert_official_state_dict
from conftest import tiny_dino
from data import CocoDetection, coco_paths, make_shapes_dataset, make_transforms
from eval import coco_metrics
from appendix.detect import letterboxed_results
from eval import main as eval_main
from appendix.inference import compare_detections
from model import build_dino, postprocess
from test_checkpoints import REFERENCE, fake_official_state_dict
from test_eval import Oracle

ROOT = Path(__file__).resolve().parents[1]
H, W = 96, 128  # the tiny model's export size


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = tiny_dino(num_classes=5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": dict(model.cfg.__dict__)}, path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_checkpoint):
    """The tiny model exported with a dynamic batch (checked by export.py itself on three images)."""
    path = tiny_checkpoint.with_suffix(".onnx")
    export.main([str(tiny_checkpoint), "--output", str(path), "--height", str(H), "--width", str(W), "--dynamic-batch"])
    return path, export.check(path, export.Deployable(load_tiny(tiny_checkpoint), 300), H, W, batch=3,
                              runtimes=("onnxruntime", "openvino"))


def load_tiny(path):
    model = tiny_dino(num_classes=5)
    model.load_state_dict(torch.load(path)["model"])
    return model


def test_the_deployable_detector_is_the_model_on_the_padded_batch():
    """Deployable's uint8 letterboxed images and valid sizes mean what model(images, mask) means."""
    model = tiny_dino().eval()
    images, valid, orig = export.random_inputs(3, H, W, seed=4)
    assert len({tuple(v) for v in valid.tolist()}) == 3  # three aspect ratios
    with torch.no_grad():
        scores, labels, boxes = export.Deployable(model, 50)(images, valid, orig)
        mask = torch.ones(3, H, W, dtype=torch.bool)
        for b, (h, w) in enumerate(valid.tolist()):
            mask[b, :h, :w] = False
        mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        x = ((images.float() / 255 - mean) / std).masked_fill(mask[:, None], 0.0)
        want = postprocess(model(x, mask), orig, 50, clip=True)
    for b in range(3):
        assert torch.equal(scores[b], want[b]["scores"]) and torch.equal(labels[b], want[b]["labels"])
        assert torch.equal(boxes[b], want[b]["boxes"])
        h, w = orig[b].tolist()
        assert (boxes[b] >= 0).all() and (boxes[b][:, 0::2] <= w).all() and (boxes[b][:, 1::2] <= h).all()


def test_both_runtimes_give_pytorchs_detections_for_batch_1_and_a_dynamic_batch_of_3(tiny_checkpoint, exported, capsys):
    path, report = exported
    assert [line.split(",")[0] for line in report] == ["ONNX Runtime against PyTorch"] * 2 + ["OpenVINO against PyTorch"] * 2
    for line in report:
        matched, required = map(int, re.search(r"(\d+) of (\d+) detections matched", line).groups())
        assert matched == required >= 400, line  # of 3 x 150
    fixed = tiny_checkpoint.with_name("fixed.onnx")
    export.main([str(tiny_checkpoint), "--output", str(fixed), "--height", str(H), "--width", str(W)])
    assert "OpenVINO against PyTorch, generated image: query selection within" in capsys.readouterr().out
    deployable = export.Deployable(load_tiny(tiny_checkpoint), 300)
    for runtime in onnx_detect.RUNTIMES:
        session = onnx_detect.Session(path, runtime)
        for batch in (1, 3):
            inputs = export.random_inputs(batch, H, W, seed=batch)
            with torch.no_grad():
                want = [t.numpy() for t in deployable(*inputs)]
            got = session({k: v.numpy() for k, v in zip(export.INPUTS, inputs)})
            diff = compare_detections(got, want, inputs[2], tol=1e-4)
            assert diff.matched == 1.0 and diff.score <= 1e-4 and diff.box <= 1e-4, (runtime, diff)


@pytest.mark.parametrize("msda, holds, lacks", [("gather", "Gather", "GridSample"), ("grid_sample", "GridSample", None)])
def test_the_attention_is_exported_as_chosen(tiny_checkpoint, tmp_path, msda, holds, lacks):
    """--msda gather (the default) leaves no GridSample in the graph, which TensorRT may compile wrongly."""
    import onnx
    path = tmp_path / f"{msda}.onnx"
    export.export(export.Deployable(load_tiny(tiny_checkpoint), 300), path, H, W, 1, False, 17, msda)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert holds in ops and lacks not in ops


def test_the_check_resolves_near_ties_as_the_runtime_did_and_catches_a_wrong_choice(tiny_checkpoint):
    """A runtime that keeps the first token left out instead of the last kept one (a near tie: within the
    tolerance) agrees; one that keeps a far worse token, or computes other detections, does not."""
    deployable = export.Deployable(load_tiny(tiny_checkpoint), 300)
    inputs = export.random_inputs(1, H, W, seed=5)
    model, seen = deployable.model, []
    handle = model.enc_class_head.register_forward_hook(lambda module, args, logits: seen.append(logits.max(-1)[0]))
    with torch.no_grad():
        deployable(*inputs)
    handle.remove()
    scores = seen[0][0]
    order = scores.argsort(descending=True)
    Q = deployable.model.cfg.num_queries
    swapped = torch.cat([order[:Q - 1], order[Q:Q + 1]])  # the (Q+1)-th best in place of the Q-th
    gap = (scores[order[Q - 1]] - scores[order[Q]]).item()

    def runtime(tokens, nudge=0.0):  # what a runtime that kept `tokens` gives
        with torch.no_grad(), export.forced_selection(deployable.model, tokens[None], []):
            out = [t.numpy() for t in deployable(*inputs)]
        out[2] = out[2] + nudge
        return out + [tokens[None].numpy()]
    agrees, report = export.compare_with_ties_resolved(deployable, inputs, runtime(swapped), tol=gap * 1.01 + 1e-7)
    assert agrees, report
    assert not export.compare_with_ties_resolved(deployable, inputs, runtime(swapped), tol=gap * 0.5)[0]
    worse = torch.cat([order[:Q - 1], order[-1:]])  # the worst token of all
    assert not export.compare_with_ties_resolved(deployable, inputs, runtime(worse), tol=gap * 1.01 + 1e-7)[0]
    assert not export.compare_with_ties_resolved(deployable, inputs, runtime(order[:Q], nudge=0.5), tol=1e-4)[0]


def test_forced_selection_keeps_the_tokens_given_in_their_order(tiny_checkpoint):
    """PyTorch made to keep the best Q tokens in reverse order selects exactly the anchors it selects unforced,
    reversed; and the scores it records are the unforced ones."""
    model = load_tiny(tiny_checkpoint).eval()
    images = export.random_inputs(1, H, W, seed=5)[0].float() / 255
    with torch.no_grad():
        free = model(images)["interm_outputs"]["pred_boxes"]
        seen, handle = [], model.enc_class_head.register_forward_hook(lambda m, a, logits: seen.append(logits.max(-1)[0]))
        model(images)
        handle.remove()
        Q = model.cfg.num_queries
        recorded = []
        with export.forced_selection(model, seen[0].topk(Q, dim=1)[1].flip(1), recorded):
            forced = model(images)["interm_outputs"]["pred_boxes"]
    torch.testing.assert_close(forced, free.flip(1), rtol=0, atol=0)
    torch.testing.assert_close(recorded[0], seen[0], rtol=0, atol=0)


def test_compare_detections_forgives_reordered_ties_not_wrong_boxes():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.3]])
    labels, boxes = torch.tensor([[1, 2, 3, 1]]), torch.rand(1, 4, 4, generator=g) * 100
    sizes = torch.tensor([[100, 100]])
    swapped = [t[:, [0, 2, 1, 3]] for t in (scores, labels, boxes)]  # a tie in another order
    assert compare_detections(swapped, (scores, labels, boxes), sizes, tol=1e-4).matched == 1.0
    moved = (scores, labels, boxes + torch.tensor([0.0, 0.0, 0.0, 1.0]))  # 1 px on a 100 px image
    assert compare_detections(moved, (scores, labels, boxes), sizes, tol=1e-4).matched == 0.0


def test_an_official_checkpoint_exports(tmp_path, capsys):
    """Official names and layout (reference/), with the values of an initialised model: random values
    everywhere would overflow."""
    official = fake_official_state_dict(json.loads((REFERENCE / "official_r50_keys.json").read_text()))
    values = build_dino("r50").state_dict()
    official = {k: values[next(iter(convert_official_state_dict({k: v})))] for k, v in official.items()}
    torch.save({"model": official}, tmp_path / "checkpoint0011_4scale.pth")
    export.main([str(tmp_path / "checkpoint0011_4scale.pth"), "--output", str(tmp_path / "official.onnx"),
                 "--height", "256", "--width", "320"])  # enough tokens for 900 queries
    out = capsys.readouterr().out
    assert "wrote" in out and "generated image:" in out


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch fails
sys.path.insert(0, {root!r})
from PIL import Image
from appendix import onnx_detect
session = onnx_detect.Session({model!r}, "openvino")
print(onnx_detect.detect(session, Image.open({image!r}), score_thr=0.0)[:3])
sys.argv = ["onnx_detect.py", {model!r}, {image!r}, "--score-thr", "0"]
onnx_detect.main()
"""


def test_the_deployment_example_needs_no_torch(exported, tmp_path):
    import random
    from data import shapes_image
    image, _ = shapes_image(random.Random(1), 200, 150)
    image.save(tmp_path / "shapes.png")
    script = TORCH_FREE.format(root=str(ROOT), model=str(exported[0]), image=str(tmp_path / "shapes.png"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("[(") and "shapes.png: 150 detections with score >= 0.0" in result.stdout  # 30 x 5


def test_missing_onnx_runtime_is_one_line_naming_the_pip_command(tiny_checkpoint, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_checkpoint), "--output", "never.onnx"])
    assert exit_info.value.code == 2
    assert "export.py needs ONNX and ONNX Runtime: pip install onnx onnxruntime" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from appendix import onnx_detect
    with pytest.raises(SystemExit, match="onnx_detect.py needs ONNX Runtime: pip install onnxruntime"):
        onnx_detect.Session("any.onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SystemExit, match="onnx_detect.py needs OpenVINO: pip install openvino"):
        onnx_detect.Session("any.onnx", "openvino")


def test_the_export_leaves_the_model_in_eval_mode(tiny_checkpoint, tmp_path):
    """The exporter puts back the mode it found: training mode would turn on Swin's drop path afterwards."""
    deployable = export.Deployable(load_tiny(tiny_checkpoint), 300)
    export.export(deployable, tmp_path / "m.onnx", H, W, 1, False, 17)
    assert not deployable.training and not any(m.training for m in deployable.modules())


def test_swin_exports_where_its_windows_need_padding(tmp_path):
    """Sizes that are no multiple of the window: the padding arithmetic must survive tracing (a negative
    floor division, -(-n // w), became a truncation in ONNX and the shifted-window masks the wrong size)."""
    import onnxruntime
    import warnings
    from backbone import SwinTransformer
    swin = SwinTransformer(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=12, out_indices=(0, 1)).eval()
    images = torch.randn(1, 3, 4 * 30, 4 * 44)  # 30 x 44 tokens: 3 x 4 windows of 12, padded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(swin, (images,), str(tmp_path / "swin.onnx"), dynamo=False, opset_version=17,
                          input_names=["images"])
    got = onnxruntime.InferenceSession(str(tmp_path / "swin.onnx")).run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = swin(images)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


def test_onnx_detect_reads_16_bit_images_as_training_does(tmp_path):
    """A 16-bit grayscale ramp letterboxed as a ramp (onnx_detect.letterbox read it all white before)."""
    from PIL import Image
    ramp = (np.arange(64 * 32) * 32).reshape(32, 64).astype("uint16")  # 0 .. 65504
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels, (h, w) = onnx_detect.letterbox(Image.open(tmp_path / "deep.png"), 32, 64)
    assert (h, w) == (32, 64) and np.array_equal(pixels[0], (ramp >> 8).astype(np.uint8))


def onnx_detect_run(*args):
    return subprocess.run([sys.executable, "-m", "appendix.onnx_detect", *map(str, args), "--score-thr", "0.5"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_onnx_detect_takes_folders_and_globs_and_names_a_bad_image_in_one_line(exported, tmp_path):
    import random
    from data import shapes_image
    for name in ("a.png", "b.jpg"):
        shapes_image(random.Random(1), 120, 90)[0].save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    result = onnx_detect_run(exported[0], tmp_path, tmp_path / "*.jpg")  # the folder's 2 images, then b.jpg again
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")] == \
        [str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "b.jpg")]
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "b.jpg").read_bytes()[:300])  # truncated
    for bad, message in [(tmp_path / "missing.jpg", "image .*missing.jpg does not exist"),
                         (tmp_path / "notes.txt", "cannot read image .*notes.txt"),
                         (tmp_path / "cut.jpg", "cannot read image .*cut.jpg"),
                         (tmp_path / "*.gif", r"\*.gif: no image files there")]:
        result = onnx_detect_run(exported[0], bad)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert re.search(message, result.stderr), result.stderr
    result = onnx_detect_run(tmp_path / "none.onnx", tmp_path / "a.png")
    assert result.returncode == 2 and "model " in result.stderr and "does not exist" in result.stderr
    by_runtime = [onnx_detect_run(exported[0], tmp_path / "a.png", "--runtime", runtime).stdout
                  for runtime in ("onnxruntime", "openvino")]
    assert by_runtime[0].splitlines()[0] == by_runtime[1].splitlines()[0]  # as many detections >= 0.5
    (tmp_path / "m.xml").write_text("<net/>")
    result = onnx_detect_run(tmp_path / "m.xml", tmp_path / "a.png")
    assert result.returncode == 2 and "is an OpenVINO file: add --runtime openvino" in result.stderr


@pytest.mark.parametrize("flags, message", [(["--opset", "99"], "--opset must be at most 20"),
                                            (["--opset", "16"], "--opset must be >= 17, got 16")])
def test_export_flags_out_of_range_are_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_checkpoint), "--output", str(tmp_path / "x.onnx"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=1, num_val=4, size=(64, 96))


def test_the_exported_files_ap_is_pytorchs_and_a_different_model_is_caught(exported, tiny_checkpoint, shapes):
    """export.check_ap: the same letterboxed images through PyTorch and both runtimes give the same AP; an
    oracle of the ground truth (AP 1 through the letterboxing and the COCO conversion) against the tiny
    export is more than 0.002 apart, and said so."""
    dataset = CocoDetection(*coco_paths(shapes, "val"), make_transforms(train=False))
    deployable = export.Deployable(load_tiny(tiny_checkpoint), 300)
    (line,) = export.check_ap(exported[0], deployable, dataset, ("onnxruntime", "openvino"), batch=1)
    pytorch, ort, ov = (float(v) for v in re.findall(r"(?:PyTorch|ONNX Runtime|OpenVINO) ([\d.]+)", line))
    assert pytorch == ort == ov, line
    oracle = export.Deployable(Oracle(dataset, noise=0.0), 300)
    with pytest.raises(export.Mismatch, match=r"ONNX Runtime: AP more than 0.002 from PyTorch's\n.*PyTorch 1.0000"):
        export.check_ap(exported[0], oracle, dataset, ("onnxruntime",), batch=1)


def test_eval_evaluates_an_exported_file_in_either_runtime(exported, tiny_checkpoint, shapes, tmp_path, capsys):
    dataset = CocoDetection(*coco_paths(shapes, "val"), make_transforms(train=False))
    session = onnx_detect.Session(exported[0])
    want = coco_metrics(dataset.coco, letterboxed_results({"file": session}, dataset, (H, W))["file"], dataset.ids)
    for runtime in onnx_detect.RUNTIMES:
        out = tmp_path / runtime
        eval_main([str(exported[0]), "--data", str(shapes), "--runtime", runtime, "--output-dir", str(out)])
        got = json.loads((out / "metrics.json").read_text())
        assert got["AP"] == pytest.approx(want["AP"], abs=1e-9) and got["AP50"] == pytest.approx(want["AP50"], abs=1e-9)
    for flags, message in ((["--image", "a.jpg"], "--image is for checkpoints"),  # eval.py passes it to appendix.detect
                           (["--data", str(shapes), "--amp"], "--amp is for checkpoints")):
        with pytest.raises(SystemExit):
            eval_main([str(exported[0]), "--output-dir", str(tmp_path), *flags])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([str(tiny_checkpoint), "--data", str(shapes), "--runtime", "openvino", "--output-dir", str(tmp_path)])
    assert "--runtime is for an exported file" in capsys.readouterr().err


def test_int8_export_runs_end_to_end_and_keeps_scores_and_boxes_float(tiny_checkpoint, shapes, tmp_path):
    """--int8: NNCF's INT8 copy for OpenVINO, calibrated on the shapes' images, whose convolutions and linear
    layers read int8 (FakeQuantize) inputs except the class and box heads and the attention's offsets and
    weights; its AP is reported beside PyTorch's."""
    import openvino
    output = tmp_path / "tiny.onnx"
    # a process of its own, as users run it: after NNCF had quantised in a pytest worker, the torchrun
    # SIGTERM test (test_resilience.py) took that worker down with it
    result = subprocess.run([sys.executable, "-m", "appendix.export", str(tiny_checkpoint), "--output", str(output),
                             "--height", str(H), "--width", str(W), "--int8", "--calibration", str(shapes / "val2017"),
                             "--check-ap", str(shapes)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"wrote .*tiny\.int8\.xml \(\d+ MiB, INT8, calibrated on 4 images\)", out), out
    assert re.search(r"INT8 in OpenVINO [\d.]+ \([+-][\d.]+\)", out), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.int8.bin", "tiny.int8.xml", "tiny.onnx"]
    layers = [op for op in openvino.Core().read_model(str(tmp_path / "tiny.int8.xml")).get_ordered_ops()
              if op.get_type_name() in ("Convolution", "MatMul")]
    quantised = {op.get_friendly_name() for op in layers
                 if any(op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(op.get_input_size()))}
    kept = {op.get_friendly_name() for op in layers if any(part in op.get_friendly_name() for part in export.KEPT_FLOAT)}
    assert kept and not kept & quantised, kept & quantised
    assert any("backbone" in name for name in quantised) and any("ffn" in name for name in quantised)
    session = onnx_detect.Session(tmp_path / "tiny.int8.xml", "openvino")
    scores, labels, boxes = session(export_feed(export.generated_inputs(1, H, W)))
    assert scores.dtype == np.float32 and boxes.shape == (1, 150, 4) and np.isfinite(boxes).all()  # 30 queries x 5
    eval_main([str(tmp_path / "tiny.int8.xml"), "--data", str(shapes), "--output-dir", str(tmp_path / "ap")])  # OpenVINO's
    assert "AP" in json.loads((tmp_path / "ap" / "metrics.json").read_text())


def export_feed(inputs):
    return {k: v.numpy() for k, v in zip(export.INPUTS, inputs)}


@pytest.mark.parametrize("flags, message", [(["--int8"], "--int8 needs --calibration DIR"),
                                            (["--calibration", "x"], "--calibration is for --int8"),
                                            (["--int8", "--calibration", "EMPTY"], "--calibration EMPTY: no image files there"),
                                            (["--int8", "--calibration", "x", "--batch", "2"], "--int8 calibrates one image at a time")])
def test_int8_flags_are_checked_before_the_export(tiny_checkpoint, tmp_path, capsys, flags, message):
    (tmp_path / "EMPTY").mkdir()
    flags = [str(tmp_path / "EMPTY") if f == "EMPTY" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_checkpoint), "--output", str(tmp_path / "x.onnx"), *flags])
    err = capsys.readouterr().err.replace(str(tmp_path / "EMPTY"), "EMPTY")
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_int8_without_nncf_is_one_line_naming_the_pip_command(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(SystemExit):
        export.main([str(tiny_checkpoint), "--output", str(tmp_path / "x.onnx"), "--int8", "--calibration", str(tmp_path)])
    assert "--int8 needs NNCF and OpenVINO: pip install nncf openvino" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
    """A checkpoint whose data had category ids 3 and 9 alone, trained at --scale 0.1: a class head of 10
    rows, 8 of which are no category."""
    model = tiny_dino(num_classes=10, scale=0.1)
    path = tmp_path_factory.mktemp("two") / "best.pth"
    torch.save({"model": model.state_dict(), "config": dict(model.cfg.__dict__), "categories": {3: "block", 9: "disc"}},
               path)
    return path


def test_the_export_takes_the_checkpoints_size_and_reports_only_its_categories_by_name(two_categories, tmp_path):
    output = tmp_path / "two.onnx"
    export.main([str(two_categories), "--output", str(output)])  # no --height, --width: the checkpoint's 80x133
    for runtime in onnx_detect.RUNTIMES:
        session = onnx_detect.Session(output, runtime)
        assert session.input_shape[2:] == [80, 133] and session.categories == {3: "block", 9: "disc"}
        scores, labels, _ = session(export_feed(export.generated_inputs(1, 80, 133)))
        assert set(labels.flatten().tolist()) == {3, 9} and scores.shape == (1, 60)  # 30 queries x 2 categories
    import random
    from data import shapes_image
    shapes_image(random.Random(1), 120, 90)[0].save(tmp_path / "a.png")
    result = subprocess.run([sys.executable, "-m", "appendix.onnx_detect", str(output), str(tmp_path / "a.png"),
                             "--score-thr", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    names = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert result.returncode == 0 and names == {"block", "disc"}, result.stdout[-2000:] + result.stderr[-2000:]


def test_files_that_are_not_what_a_command_takes_are_one_line(two_categories, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(picture)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(picture), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{picture} is not a PyTorch checkpoint" in err
    for args, message in [((two_categories, picture), f"model {two_categories} is not an exported file"),
                          ((picture.with_suffix(".onnx"), picture), "cannot load it"),
                          ((two_categories, picture, "--score-thr", "2"), "--score-thr: must be in [0, 1], got 2")]:
        if args[0].suffix == ".onnx":
            args[0].write_bytes(b"not a protobuf")
        result = subprocess.run([sys.executable, "-m", "appendix.onnx_detect", *map(str, args)], capture_output=True,
                                text=True, timeout=120, cwd=ROOT)
        lines = [line for line in result.stderr.strip().splitlines() if not line.startswith((" ", "usage:"))]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr  # (argparse: usage too)
