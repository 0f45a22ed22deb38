"""Compiled inference (inference.CompiledModel, `eval.py --compile`) gives the eager model's detections, on the
CPU and, with `pytest -m cuda`, on a GPU; a compiled model that disagrees is caught on the first batch."""
import pytest
import torch

import inference
from conftest import tiny_dino
from data import collate, eval_canvas
from inference import output_agreement
from model import postprocess

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])]


def two_images(device):
    """A batch of two landscape images of different sizes, padded to the compiled canvas of scale 0.1."""
    g = torch.Generator().manual_seed(0)
    images = [(torch.randn(3, 72, 120, generator=g), None), (torch.randn(3, 64, 96, generator=g), None)]
    batch, mask, _ = collate(images, eval_canvas(0.1))
    assert batch.shape[-2:] == (80, 133) and mask[1, 64:].all()
    return batch.to(device), mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_inference_gives_the_eager_detections(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 on both paths of a GPU
    model = tiny_dino().to(device).eval()
    images, mask = two_images(device)
    compiled = inference.CompiledModel(model)
    with torch.inference_mode():
        got = compiled(images, mask)
        again = compiled(images, mask)
        want = model(images, mask)
    assert not compiled.fell_back  # the first batch's check passed: it stays compiled
    sizes = [(72, 120), (64, 96)]
    for out in (got, again):
        for d, e in zip(postprocess(out, sizes), postprocess(want, sizes)):
            assert torch.equal(d["labels"], e["labels"])
            torch.testing.assert_close(d["scores"], e["scores"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(d["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)


def test_a_compiled_model_that_disagrees_is_replaced_by_the_eager_one(monkeypatch):
    def miscompiled(model, mode=None):
        def run(images, mask):
            out = model(images, mask)
            return {**out, "pred_boxes": (out["pred_boxes"] + 0.05).clamp(0, 1)}
        return run
    monkeypatch.setattr(inference, "compile_model", miscompiled)
    model = tiny_dino().eval()
    images, mask = two_images("cpu")
    compiled = inference.CompiledModel(model)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="found 0% of the eager model's 100 best detections"):
            first = compiled(images, mask)
        second = compiled(images, mask)
        want = model(images, mask)
    assert compiled.fell_back
    for out in (first, second):
        assert torch.equal(out["pred_boxes"], want["pred_boxes"])


def test_detection_agreement_ignores_the_order_of_query_slots():
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 30, 5, generator=g) * 3, "pred_boxes": torch.rand(2, 30, 4, generator=g)}
    order = torch.randperm(30, generator=g)
    shuffled = {k: v[:, order] for k, v in out.items()}
    assert output_agreement(shuffled, out) == (1.0, 0.0, 0.0)
    moved = {**out, "pred_boxes": out["pred_boxes"].clone()}
    moved["pred_boxes"][1] += 0.1  # every box of the second image
    assert output_agreement(moved, out)[0] == pytest.approx(0.5)
    rescored = {**out, "pred_logits": out["pred_logits"] + 1.0}  # scores move, least where they saturate
    assert output_agreement(rescored, out).matched < 0.2


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("msda", ["kernel", "reference"])
def test_the_gpu_gives_the_cpu_detections(msda, monkeypatch):
    """Eager float32 on the GPU (cuDNN's TF32 off) against the CPU, same weights and images: the model,
    not only the attention kernel, computes the same function on both."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if msda == "reference":
        monkeypatch.setenv("DINO_MSDA", "reference")
    model = tiny_dino().eval()
    images, mask = two_images("cpu")
    with torch.inference_mode():
        want = model(images, mask)
        got = model.to("cuda")(images.cuda(), mask.cuda())
    got = {k: got[k].cpu() for k in ("pred_logits", "pred_boxes")}
    assert output_agreement(got, want)[0] == 1.0
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=1e-4, atol=1e-4)
