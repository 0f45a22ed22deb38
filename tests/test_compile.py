"""Compiled inference (inference.CompiledModel, `eval.py --compile`) gives the eager model's detections, on the
CPU and, with `pytest -m cuda`, on a GPU; a compiled model that disagrees is caught on the first batch."""
import pytest
import torch

from appendix import inference
from conftest import tiny_dino
from data import collate, eval_canvas
from appendix.inference import output_agreement
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


def test_a_compiled_training_step_gives_the_eager_steps_losses_and_weights(monkeypatch):
    """train_step with cfg.compile (the model, the matching costs and the loss through torch.compile, on
    static_shapes' padded targets) against the eager step from the same weights, on three batches whose
    object counts differ: the same terms and weights, and no program compiled twice (5 programs: the
    model, the costs, the matched and the denoising losses, the gradient clipping). AOT autograd's eager backend, so that the
    same operators run in both: this checks what our code gives the compiler (no graph break, shapes
    that do not vary, the attention's backward operator); test_compiled_inference_gives_the_eager_detections
    checks inductor's code."""
    import copy
    import functools
    from torch._dynamo.utils import counters

    import train
    from config import make_config
    from conftest import TINY
    from appendix.static_shapes import criterion_for
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    eager_cfg = make_config(**TINY, num_classes=5)
    compiled_cfg = make_config(**TINY, num_classes=5, compile=True)
    torch.manual_seed(0)
    eager = tiny_dino().train()
    model = copy.deepcopy(eager)
    runs = [(m, criterion_for(c), train.build_optimizer(m, c), torch.amp.GradScaler("cpu", enabled=False), c)
            for m, c in [(eager, eager_cfg), (model, compiled_cfg)]]
    runs[1] = (train.compiled(model), *runs[1][1:])  # the optimiser's groups come from the plain module's names
    g = torch.Generator().manual_seed(0)
    images, mask = torch.randn(2, 3, 96, 128, generator=g), torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    for step, counts in enumerate([(3, 1), (2, 2), (5, 0)]):
        targets = [{"labels": torch.randint(0, 5, (n,), generator=g),
                    "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], -1)}
                   for n in counts]
        terms = []
        for m, criterion, optimizer, scaler, cfg in runs:
            torch.manual_seed(step)  # the same denoising noise
            terms.append(train.train_step(m, criterion, optimizer, scaler, images, mask, targets, cfg))
        assert terms[0].keys() == terms[1].keys()
        for name in terms[0]:
            torch.testing.assert_close(terms[1][name], terms[0][name], rtol=0, atol=0, msg=name)
    for a, b in zip(eager.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] == 5 and not counters["graph_break"]


def test_train_py_compile_runs_an_epoch_on_padded_batches(tmp_path, monkeypatch, capsys):
    """`train.py --compile` end to end (AOT autograd's eager backend, as above): the training batches padded to
    multiples of 32 pixels (the size step at --scale 0.1), the model compiled, an epoch logged and evaluated,
    and the user told that on the CPU it does not pay."""
    import functools
    import json

    import train
    from conftest import tiny_flags
    from data import make_shapes_dataset
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, size=(64, 96))
    seen = []
    original = train.train_step

    def spy(model, criterion, optimizer, scaler, images, mask, targets, cfg):
        seen.append((tuple(images.shape[-2:]), type(model).__name__))
        return original(model, criterion, optimizer, scaler, images, mask, targets, cfg)
    monkeypatch.setattr(train, "train_step", spy)
    metrics = train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "out"), *tiny_flags(), "--scale", "0.1",
                          "--batch-size", "2", "--num-workers", "0", "--epochs", "1", "--compile"])
    assert len(seen) == 2 and all(h % 32 == 0 and w % 32 == 0 and kind == "OptimizedModule" for (h, w), kind in seen)
    log = json.loads((tmp_path / "out" / "log.jsonl").read_text())
    assert log["train"]["loss"] > 0 and "AP" in metrics
    assert "--compile on the CPU: each new batch shape compiles for minutes" in capsys.readouterr().out
