"""Where the GPU's detections depart from the CPU's, part by part: step 6 of bench/gpu_check.py.

The reference is the CPU's float32 eager run of the model that gpu_check times (made on the device
from seed 0, then copied to the CPU), on the same image. Each run on the device says how far it is
from the reference at every stage: the multi-scale features (after input_proj) and the encoder's
memory as ||a - b|| / ||b||, the encoder's selected detections ("interm") and each decoder layer's as
inference.output_agreement (the share of the reference's 100 best detections it also finds). A float64
run says how far the reference itself is from exact; the compiled runs compile the whole model
(inference.compile_model) or one part at a time, so that a departure can be pinned to the backbone, the
encoder, the decoder or the code between them (what none of the parts holds: that is how the
proposals' border test, which a compiler's approximate division moved, was found on an H100).
"""
import copy
import time
from typing import NamedTuple

import torch

from appendix.inference import compile_model
from appendix.inference import output_agreement
from train_step import batch, build_on

# (name, dtype, cuDNN TF32, what is compiled: None, "whole" or a part)
RUNS = [("eager float64", torch.float64, False, None),
        ("eager", torch.float32, False, None),
        ("eager, cuDNN TF32 (torch's default)", torch.float32, True, None),
        ("compiled whole", torch.float32, False, "whole"),
        ("compiled backbone only", torch.float32, False, "backbone"),
        ("compiled encoder only", torch.float32, False, "encoder"),
        ("compiled decoder only", torch.float32, False, "decoder")]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def staged(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, whole: bool) -> dict:
    """The model's outputs, plus (unless the model is compiled whole) its features and memory."""
    if whole:
        return {"outputs": compile_model(model)(images, mask)}
    seen = {}
    features = model.multi_scale_features

    def capture_features(images, mask):
        seen["features"], masks = features(images, mask)
        return seen["features"], masks
    model.multi_scale_features = capture_features
    handle = model.encoder.register_forward_hook(lambda module, args, memory: seen.__setitem__("memory", memory))
    try:
        seen["outputs"] = model(images, mask)
    finally:
        handle.remove()
        del model.multi_scale_features
    return seen


def boxes_and_logits(out: dict) -> dict:
    return {k: out[k].float().cpu() for k in ("pred_logits", "pred_boxes")}


def compare(got: dict, want: dict) -> list[str]:
    """The table's cells for `got` against the reference `want` (both from staged)."""
    cells = []
    for key in ("features", "memory"):
        if key not in got:  # a model compiled whole shows only its outputs
            cells.append("")
            continue
        pairs = zip(got[key], want[key]) if key == "features" else [(got[key], want[key])]  # L maps; one tensor
        cells.append(f"{max(relative_error(a, b) for a, b in pairs):.1e}")
    layers = lambda s: [s["outputs"]["interm_outputs"], *s["outputs"]["aux_outputs"], s["outputs"]]  # noqa: E731
    for g, w in zip(layers(got), layers(want)):
        cells.append(f"{100 * output_agreement(boxes_and_logits(g), boxes_and_logits(w))[0]:.0f}%")
    score_gap = output_agreement(boxes_and_logits(got["outputs"]), boxes_and_logits(want["outputs"]))[1]
    return cells + [f"{score_gap:.1e}"]


class Reference(NamedTuple):
    model: torch.nn.Module  # on the CPU, float32, eval mode
    images: torch.Tensor  # (1, 3, H, W)
    mask: torch.Tensor  # (1, H, W)
    seen: dict  # staged(model, images, mask): outputs, features, memory


def cpu_reference(device: torch.device, backbone: str, size: tuple[int, int], overrides: dict) -> Reference:
    """The model that gpu_check times (train_step.build_on: made on `device` from seed 0), copied to the
    CPU, with train_step.batch's image, and its float32 eager run there, stage by stage."""
    model = build_on(device, backbone=backbone, **overrides).cpu().eval()
    images, mask, _ = batch(size, 1, torch.device("cpu"))
    with torch.inference_mode():
        return Reference(model, images, mask, staged(model, images, mask, whole=False))


def measure(device: torch.device, backbone: str, reference: Reference) -> list[str]:
    """The markdown table of every run in RUNS on `device` against the CPU's float32 eager run."""
    model, images, mask, want = reference
    layers = len(want["outputs"]["aux_outputs"]) + 1
    H, W = images.shape[-2:]
    lines = [f"{backbone} {H}x{W}, batch 1, each run on {device} against the CPU's float32 eager run:", "",
             "| run | features | memory | interm | " + " | ".join(f"layer {i + 1}" for i in range(layers))
             + " | largest score gap | seconds |", "| --- " * (layers + 6) + "|"]
    cudnn = torch.backends.cudnn
    for name, dtype, tf32, compiled in RUNS:
        start = time.perf_counter()
        run = copy.deepcopy(model).to(device, dtype)
        if compiled in ("encoder", "decoder", "backbone"):
            setattr(run, compiled, compile_model(getattr(run, compiled)))
        torch._dynamo.reset()
        tf32_before, cudnn.allow_tf32 = cudnn.allow_tf32, tf32
        try:
            with torch.inference_mode():
                got = staged(run, images.to(device, dtype), mask.to(device), whole=compiled == "whole")
            cells = compare(got, want)
        except Exception as e:  # noqa: BLE001 - a run that breaks is reported and the others go on
            cells = [f"failed: {type(e).__name__}: {str(e)[:200]}"] + [""] * (layers + 3)
        finally:
            cudnn.allow_tf32 = tf32_before
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
        del run
    return lines + [""]
