"""The pictures of the paper's mechanisms (appendix/explain.py) draw the model's own data: the sampling of the last
decoder layer, each layer's boxes, the top-Q tokens as anchors, the denoising queries the model received."""
import sys

import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from appendix import explain
from conftest import TINY, tiny_dino
from data import make_shapes_dataset
from deformable_attn import MSDeformAttn
from model import postprocess

H, W = 96, 128


@pytest.fixture(scope="module")
def model():
    """A tiny model whose attention and decoder boxes depend on the query (freshly initialised, every head
    samples the same pattern with uniform weights, and no layer moves its box: the layers would look alike)."""
    torch.manual_seed(0)
    model = tiny_dino(num_classes=4).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MSDeformAttn):
                module.sampling_offsets.weight.normal_(std=0.05)
                module.attention_weights.weight.normal_(std=0.5)
        model.box_head.layers[-1].weight.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_the_sampling_drawn_is_the_last_decoder_layers_own(model, pixels):
    """Locations and weights of a query equal what the last layer's MSDeformAttn computes from its inputs
    (Deformable DETR Eq. 3: the box's centre plus offsets scaled by its half size / P; softmax over L * P)."""
    attention, seen = model.decoder.layers[-1].cross_attn, {}
    hook = attention.register_forward_pre_hook(lambda m, args: seen.update(query=args[0], reference=args[1]))
    found = explain.trace(model, pixels)
    hook.remove()
    M, L, P = attention.n_heads, attention.n_levels, attention.n_points
    for q in (0, 7, TINY["num_queries"] - 1):
        with torch.no_grad():
            offsets = attention.sampling_offsets(seen["query"][0, q]).view(M, L, P, 2)
            weights = attention.attention_weights(seen["query"][0, q]).view(M, L * P).softmax(-1).view(M, L, P)
        box = seen["reference"][0, q]  # (L, 4)
        locations = box[None, :, None, :2] + offsets / P * box[None, :, None, 2:] / 2
        torch.testing.assert_close(found.locations[q], locations, rtol=0, atol=1e-12)
        torch.testing.assert_close(found.weights[q], weights, rtol=0, atol=1e-12)
        torch.testing.assert_close(found.reference_boxes[q], box, rtol=0, atol=0)


def test_each_layers_box_is_the_decoders_and_the_last_is_the_detection(model, pixels):
    """boxes_per_layer: the anchor the decoder received, then every layer's box as the decoder returned it; the
    last is the box postprocess reports for the query's detection, and its score is the query's."""
    seen = {}
    hook = model.decoder.register_forward_hook(lambda m, args, out: seen.update(anchors=args[1], boxes=out[1]))
    found = explain.trace(model, pixels)
    hook.remove()
    detections = postprocess(found.outputs, [(H, W)], 10)[0]
    for rank in range(3):
        q = found.query_of(detections["boxes"][rank])
        boxes = found.boxes_per_layer(q)
        assert len(boxes) == 1 + TINY["dec_layers"]
        torch.testing.assert_close(boxes[0], seen["anchors"][0, q], rtol=0, atol=1e-12)
        for layer, box in zip(seen["boxes"], boxes[1:]):
            torch.testing.assert_close(box, layer[0, q], rtol=0, atol=0)
        xyxy = box_convert(boxes[-1], "cxcywh", "xyxy") * torch.tensor([W, H, W, H], dtype=boxes.dtype)
        torch.testing.assert_close(xyxy, detections["boxes"][rank], rtol=0, atol=1e-9)
        score = found.outputs["pred_logits"][0, q, detections["labels"][rank]].sigmoid()
        torch.testing.assert_close(score, detections["scores"][rank], rtol=0, atol=1e-12)


def test_the_anchors_are_the_top_q_tokens_of_the_scores_drawn(model, pixels):
    """On a fresh model the encoder's box head predicts no refinement, so each anchor is its token's proposal:
    centred on the token's pixel, 0.05 * 2^level wide. The Q best tokens of the drawn level maps, in order, are
    the anchors the decoder started from."""
    found = explain.trace(model, pixels)
    ranked = sorted(((float(score), lvl, i, j) for lvl, scores in enumerate(found.level_maps())
                     for (i, j), score in zip(torch.cartesian_prod(*map(torch.arange, scores.shape)).tolist(),
                                              scores.flatten())), reverse=True)
    Q = TINY["num_queries"]
    maps = found.level_maps()
    want = torch.tensor([[(j + 0.5) / maps[lvl].shape[1], (i + 0.5) / maps[lvl].shape[0], 0.05 * 2 ** lvl,
                          0.05 * 2 ** lvl] for _, lvl, i, j in ranked[:Q]], dtype=torch.float64)
    # (proposals are made in float32; a token of another level or place is 1 / W_l away or more)
    torch.testing.assert_close(found.outputs["interm_outputs"]["pred_boxes"][0], want, rtol=0, atol=1e-6)
    assert [m.shape for m in maps] == [torch.Size(s) for s in found.level_shapes]


def test_the_denoising_boxes_drawn_lie_in_their_bands_and_are_the_ones_the_model_received(model, pixels):
    """Group 0's positives move each corner by less than lambda times the half size, the negatives by lambda to 2
    lambda (objects well inside the image: no clipping); and they are the boxes the decoder was given."""
    target = {"labels": torch.tensor([1, 2, 3]), "boxes": torch.tensor(
        [[0.3, 0.35, 0.2, 0.25], [0.65, 0.6, 0.25, 0.3], [0.5, 0.5, 0.1, 0.1]], dtype=torch.float64)}
    seen = {}
    hook = model.decoder.register_forward_pre_hook(lambda m, args: seen.update(anchors=args[1]))
    dn = explain.denoising_queries(model, pixels, target, seed=3)
    hook.remove()
    assert not model.training  # left as it was
    positives, negatives, positive_labels, negative_labels = explain.first_group(dn, 3)
    torch.testing.assert_close(seen["anchors"][0, :6], torch.cat([positives, negatives]), rtol=0, atol=1e-12)
    lam = model.cfg.dn_box_noise_scale
    truth = box_convert(target["boxes"], "cxcywh", "xyxy")
    half = torch.cat([target["boxes"][:, 2:]] * 2, -1) / 2
    moved = lambda boxes: (box_convert(boxes, "cxcywh", "xyxy") - truth).abs() / half  # noqa: E731
    assert (moved(positives) < lam + 1e-9).all()
    assert (moved(negatives) >= lam - 1e-9).all() and (moved(negatives) < 2 * lam + 1e-9).all()
    assert positive_labels.shape == negative_labels.shape == (3,)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_dino(num_classes=4, scale=0.2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": dict(model.cfg.__dict__),
                "categories": {1: "square", 2: "circle", 3: "triangle"}}, path)
    return path


def test_the_command_writes_every_picture_and_skips_denoising_without_annotations(checkpoint, tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", num_train=1, num_val=2, size=(160, 224))
    image = sorted((data / "val2017").iterdir())[0]
    written = explain.main([str(checkpoint), str(image), "--data", str(data), "--output-dir", str(tmp_path / "out")])
    assert [p.name for p in written] == ["query_selection.jpg", "look_forward_twice.jpg", "deformable_attention.jpg",
                                         "denoising.jpg"]
    for path in written:
        with Image.open(path) as picture:
            picture.verify()
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere.jpg"  # in no annotation file
    elsewhere.write_bytes(image.read_bytes())
    for argv in ([str(image)], [str(elsewhere), "--data", str(data)]):
        written = explain.main([str(checkpoint), *argv, "--output-dir", str(tmp_path / "plain")])
        assert len(written) == 3
        lines = capsys.readouterr().out.splitlines()
        assert sum("no denoising picture" in line for line in lines) == 1, lines
    for argv, message in ((["--query", "30"], "--query must be a query index in [0, 30), got 30"),
                          (["--data", str(tmp_path / "nothing")], "does not exist")):
        with pytest.raises(SystemExit):
            explain.main([str(checkpoint), str(image), *argv, "--output-dir", str(tmp_path / "q")])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_without_matplotlib_one_line_names_the_pip_command_before_any_work(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_info:
        explain.main([str(checkpoint), str(tmp_path / "any.jpg"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "need matplotlib: pip install matplotlib" in err[0]
    assert not (tmp_path / "out").exists()
