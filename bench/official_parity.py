"""Parity with the official DINO, in float64 on the CPU: the same weights, the same padded batch, every output
(each decoder layer's logits and boxes, the encoder's selected proposals), and every loss term of the
official criterion against ours on the same predictions (denoising included).

    git clone https://github.com/IDEA-Research/DINO /somewhere/DINO    # outside this repository (faa8520)
    python bench/official_parity.py --official /somewhere/DINO [--backbone r50|swinl]

The official code needs a compiled op and timm, neither of which this runs: its MultiScaleDeformableAttention
is replaced by the official pure-PyTorch `ms_deform_attn_core_pytorch`, and timm's three layers by
equivalents (identity stochastic depth: both models are compared in eval mode). Its `.cuda()` calls are
made no-ops. The official model is built from its own config file (config/DINO/DINO_4scale*.py) with random
weights, every parameter and frozen batch-norm statistic perturbed (so that no zero initialisation hides
a path), and loaded into ours through checkpoints.load_checkpoint, as a release checkpoint would be.
Exit status 1 if an output differs by more than 1e-12 or a loss term by more than 1e-13.
"""
import argparse
import contextlib
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from appendix.checkpoints import load_checkpoint  # noqa: E402
from losses import Criterion  # noqa: E402
from model import build_dino  # noqa: E402

CONFIGS = {"r50": "DINO_4scale.py", "swinl": "DINO_4scale_swin.py"}


def stand_ins() -> None:
    """Modules the official code imports and this machine lacks: the compiled attention op, timm's layers."""
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = lambda drop_prob=0.0: nn.Identity()  # eval mode: stochastic depth is the identity
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = nn.init.trunc_normal_
        for name in ("timm", "timm.models"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["timm.models.layers"] = layers


@contextlib.contextmanager
def on_the_cpu():
    """The official code's .cuda() and .to('cuda') calls (its denoising, in training), and its deprecated
    torch.range, for the length of a call."""
    cuda, to, had_range = torch.Tensor.cuda, torch.Tensor.to, hasattr(torch, "range")
    old_range = getattr(torch, "range", None)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = lambda self, *args, **kwargs: to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)
    torch.range = lambda start, end, *args, **kwargs: torch.arange(start, end + 1, *args, **kwargs)
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = cuda, to
        if had_range:
            torch.range = old_range


def official_args(official: Path, backbone: str, **overrides) -> argparse.Namespace:
    """The official config file (and its _base_), as the Namespace its build_dino reads, with `overrides`."""
    folder, values, base = official / "config" / "DINO", {}, {}
    exec((folder / CONFIGS[backbone]).read_text(), {}, values)
    for name in values.get("_base_", []):  # the file's own list of the files it builds on
        exec((folder / name).read_text(), {}, base)
    values = {k: v for k, v in {**base, **values}.items() if not k.startswith("_")}
    values.update(device="cpu", masks=False, frozen_weights=None, dataset_file="coco", num_classes=91,
                  dn_labelbook_size=91, **overrides)
    return argparse.Namespace(**values)


def official_model(official: Path, backbone: str, own_op: bool = False, **overrides):
    """The official (model, criterion), random weights perturbed, float64, eval mode; `overrides` replace
    values of the official config. Its attention runs through its pure-PyTorch version, or with own_op
    through its compiled CUDA op where one is built (`import MultiScaleDeformableAttention` succeeds)."""
    sys.path.insert(0, str(official))
    if own_op:
        try:
            import MultiScaleDeformableAttention  # noqa: F401  (the official models/dino/ops, built)
        except ImportError:
            own_op = False
    stand_ins()
    import models.dino.backbone as official_backbone
    from models.dino.dino import build_dino as build_official
    from models.dino.ops.functions import ms_deform_attn_func
    from models.dino.ops.modules import ms_deform_attn as official_msda
    official_backbone.is_main_process = lambda: False  # no ImageNet download for the ResNet
    core = ms_deform_attn_func.ms_deform_attn_core_pytorch
    # the compiled op's apply(value, shapes, level_start_index, locations, weights, im2col_step), on the
    # official pure-PyTorch version
    if not own_op:
        official_msda.MSDeformAttnFunction = types.SimpleNamespace(apply=lambda *a: core(a[0], a[1], a[3], a[4]))
    torch.manual_seed(0)
    with on_the_cpu():
        model, criterion, _ = build_official(official_args(official, backbone, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", ".bias", ".weight")):
                b.add_(torch.randn_like(b) * 0.02)
    return model.double().eval(), criterion


def padded_batch():
    """Two images of different sizes, zero-padded as the official NestedTensor pads them."""
    from util.misc import nested_tensor_from_tensor_list
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 256, 320, generator=g, dtype=torch.float64),
              torch.randn(3, 224, 352, generator=g, dtype=torch.float64)]
    return nested_tensor_from_tensor_list(images)


def layers_of(out: dict) -> dict:
    """name -> tensor for every set of predictions in an output dict."""
    named = {"last": out, "interm": out["interm_outputs"], **{f"aux {i}": a for i, a in enumerate(out["aux_outputs"])}}
    return {f"{name} {key}": o[key] for name, o in named.items() for key in ("pred_logits", "pred_boxes")}


def compare_outputs(theirs: nn.Module, ours: nn.Module, batch) -> float:
    with torch.no_grad(), on_the_cpu():
        want = layers_of(theirs(batch))
        got = layers_of(ours(batch.tensors, batch.mask))
    worst = 0.0
    for name in want:
        gap = (got[name] - want[name]).abs().max().item()
        worst = max(worst, gap)
        print(f"  {name:24s} {gap:.1e} (values up to {want[name].abs().max().item():.1f})")
    return worst


def compare_losses(criterion, ours: nn.Module, batch) -> tuple[float, int]:
    """Our training outputs (denoising queries included) through both criteria."""
    targets = [{"labels": torch.tensor([1, 17, 62]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.2, 0.5]],
                                      dtype=torch.float64)},
               {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]], dtype=torch.float64)}]
    torch.manual_seed(2)
    out = ours.train()(batch.tensors, batch.mask, targets)
    dn = out["dn_queries"]
    used = int(dn.trained.sum())  # the official code has no unused DN slots (denoising.py: fixed shapes)
    dn_out = {k: v[:, :used] for k, v in out["dn_outputs"].items() if k != "aux_outputs"}
    dn_out["aux_outputs"] = [{k: v[:, :used] for k, v in aux.items()} for aux in out["dn_outputs"]["aux_outputs"]]
    official_out = {**out, "dn_meta": {"output_known_lbs_bboxes": dn_out, "num_dn_group": int(dn.num_groups),
                                       "pad_size": used}}
    with torch.no_grad(), on_the_cpu():
        criterion.train()
        want = criterion(official_out, targets)
        got = Criterion(ours.cfg)(out, targets)
    common = sorted(set(got) & set(want))
    gaps = {k: abs(float(got[k]) - float(want[k])) for k in common}
    for k in common:
        print(f"  {k:24s} ours {float(got[k]):.6f} official {float(want[k]):.6f} gap {gaps[k]:.1e}")
    return max(gaps.values()), len(common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of IDEA-Research/DINO")
    parser.add_argument("--backbone", choices=sorted(CONFIGS), default="r50")
    args = parser.parse_args()
    theirs, criterion = official_model(args.official.resolve(), args.backbone)
    ours = build_dino(args.backbone, num_classes=91).double().eval()
    load_checkpoint(ours, theirs.state_dict())
    batch = padded_batch()
    print(f"DINO-4scale {args.backbone}, float64, a padded batch of 2 images {tuple(batch.tensors.shape)}; outputs:")
    out_gap = compare_outputs(theirs, ours, batch)
    print("loss terms (ours given our training outputs, denoising on):")
    loss_gap, terms = compare_losses(criterion, ours, batch)
    print(f"largest differences: outputs {out_gap:.1e}, {terms} loss terms {loss_gap:.1e}")
    sys.exit(0 if out_gap <= 1e-12 and loss_gap <= 1e-13 and math.isfinite(out_gap + loss_gap) else 1)


if __name__ == "__main__":
    main()
