"""Checkpoints, ours and the official releases', in and out: an appendix to the paper's chapters.

Every official parameter name lives in this file: official DINO's (IDEA-Research/DINO at faa8520, the
names inside checkpoint0011_4scale.pth and its Swin-L sibling; `reference/` lists them all) and those
of the official Swin classification checkpoint that the Swin-L backbone starts from. Our own
checkpoints (train.py, written from runs.TrainState.contents) hold {"model", "ema", "ema_updates",
"optimizer", "lr_scheduler", "scaler", "epoch", "next", "partial", "pending", "config", "categories",
"rng", "best_ap", "stale"}.
"""
import argparse
import dataclasses
import re
from pathlib import Path

import torch
from torch import Tensor

from backbone import Swin, build_backbone
from config import ARCHITECTURE, Config, make_config
from data import DataError, coco_category_names
from model import DINO, build_dino

# Official DINO parameter names (IDEA-Research/DINO, as in checkpoint0011_4scale.pth) -> ours. Applied in
# order, first match wins. The official model registers its shared heads under 12 aliases
# (class_embed.{0..5} and transformer.decoder.class_embed.{0..5}, likewise bbox_embed); all map to one tensor.
OFFICIAL_NAME_MAP = [
    (r"^backbone\.0\.body\.", "backbone.body."),                    # ResNet
    (r"^backbone\.0\.", "backbone.body."),                          # Swin
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.self_attn_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.ffn_norm."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.linear(\d)\.", r"\1coder.layers.\2.ffn.linear\3."),
    (r"^transformer\.encoder\.", "encoder."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.cross_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.self_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.ffn_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "decoder.query_pos_head."),
    (r"^(transformer\.decoder\.)?class_embed\.\d+\.", "class_head."),
    (r"^(transformer\.decoder\.)?bbox_embed\.\d+\.", "box_head."),
    (r"^transformer\.decoder\.", "decoder."),
    (r"^transformer\.tgt_embed\.", "content_queries."),
    (r"^transformer\.enc_output\.", "enc_output."),
    (r"^transformer\.enc_output_norm\.", "enc_output_norm."),
    (r"^transformer\.enc_out_class_embed\.", "enc_class_head."),
    (r"^transformer\.enc_out_bbox_embed\.", "enc_box_head."),
    (r"^label_enc\.", "dn_label_embed."),
    (r"^input_proj\.", "input_proj."),
]
# tensors whose size depends on the number of classes: re-initialised when fine-tuning to other classes
CLASS_SPECIFIC = ("class_head.", "enc_class_head.", "dn_label_embed.")



def unwrap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without DistributedDataParallel's "module." prefix."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def is_official(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("transformer.") for k in state)


def num_classes_of(state: dict[str, Tensor]) -> int | None:
    """The class head's number of classes, from official names or ours; None without a class head."""
    head = state.get("class_embed.0.weight", state.get("class_head.weight"))
    return None if head is None else head.shape[0]


def convert_official_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official DINO state dict -> ours (see OFFICIAL_NAME_MAP). Aliases of a shared tensor must agree."""
    ours: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in official.items():
        for pattern, replacement in OFFICIAL_NAME_MAP:
            new_name, n = re.subn(pattern, replacement, name)
            if n:
                break
        else:
            unknown.append(name)
            continue
        if new_name in ours and not torch.equal(ours[new_name], tensor):
            raise DataError(f"official key {name} is an alias of {new_name} but holds different values: "
                             f"a model without shared decoder heads is not supported")
        ours[new_name] = tensor
    if unknown:
        raise DataError(f"official DINO keys with no counterpart here: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    return ours


def read_checkpoint(path: str) -> dict:
    """A checkpoint file as torch.load reads it, tensors only; a file that is none, one line saying so."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip file (older ones, a pickle)
        exported = " (an exported file: eval.py and appendix.onnx_detect take it)" if Path(path).suffix in (".onnx", ".xml") else ""
        raise DataError(f"{path} is not a PyTorch checkpoint{exported}: give a .pth file that train.py or official "
                        f"DINO wrote")
    # official checkpoints also hold their argparse.Namespace of settings: allow just that class
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's messages run to many lines of advice: its first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {first}); if it holds "
                            f"objects other than tensors, re-save just its state dict") from None


def load_checkpoint(model: DINO, path_or_state_dict, ignore_class_heads: bool = False, name: str | None = None) -> list[str]:
    """Load our checkpoints or official DINO release checkpoints into `model`.

    Accepts a file path, a `{"model": state_dict, ...}` dict or a bare state dict, with official names
    (mapped by OFFICIAL_NAME_MAP) or ours, optionally prefixed "module." (DistributedDataParallel).
    Strict: a missing, unexpected or differently shaped tensor is an error, except that with
    ignore_class_heads=True the class-specific tensors (CLASS_SPECIFIC) are left as they are, for
    fine-tuning to another number of classes. Returns the names left at their initial values. Errors name
    the file (or `name`, for a checkpoint already read).
    """
    source = path_or_state_dict
    where = name or (source if isinstance(source, str) else "the given state dict")
    if isinstance(source, str):
        source = read_checkpoint(source)
    state = source.get("model", source) if isinstance(source, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{where} holds no state dict (expected tensors under 'model' or at the top level)")
    state = unwrap(state)
    if is_official(state):
        state = convert_official_state_dict(state)
    own = model.state_dict()
    kept = []
    if ignore_class_heads:
        kept = sorted(k for k in own if k.startswith(CLASS_SPECIFIC))
        state = {k: v for k, v in state.items() if not k.startswith(CLASS_SPECIFIC)}
    missing = sorted(own.keys() - state.keys() - set(kept))
    unexpected = sorted(state.keys() - own.keys())
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(own.keys() & state.keys())
             if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        hint = ""
        if wrong and all(k.startswith(CLASS_SPECIFIC) for k, *_ in wrong):
            hint = " (another number of classes: pass ignore_class_heads=True to fine-tune)"
        raise DataError(f"{where} does not fit this model{hint}: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, wrong shape (checkpoint, model) {wrong[:8]}")
    model.load_state_dict(state, strict=not ignore_class_heads)
    return kept


def load_swin_checkpoint(swin: Swin, path_or_state_dict) -> dict[str, list[str]]:
    """Load the official Swin classification checkpoint (e.g. swin_large_patch4_window12_384_22k.pth,
    `{"model": state_dict}`) into `swin`. Skipped: the classifier (`head.*`), its final `norm.*`, the
    precomputed `attn_mask` and `relative_position_index` buffers (rebuilt here). The three output norms
    norm1..norm3 are not in a classification checkpoint and keep their initialisation, as in official
    DINO. Anything else missing, unexpected or of another shape is an error.
    Returns {"skipped": [...], "initialised": [...]}.
    """
    source = path_or_state_dict
    if not isinstance(source, dict):
        source = read_checkpoint(source)
    state = unwrap(source.get("model", source))
    skip = lambda k: k.startswith(("head.", "norm.")) or k.endswith(("attn_mask", "relative_position_index"))
    skipped = sorted(k for k in state if skip(k))
    state = {k: v for k, v in state.items() if not skip(k)}
    own = swin.body.state_dict()
    own_norms = [k for k in own if k.startswith("norm")]
    expected = {k for k in own if not k.endswith("relative_position_index") and k not in own_norms}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    wrong = sorted(k for k in expected & state.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        where = path_or_state_dict if isinstance(path_or_state_dict, str) else "the Swin state dict"
        raise DataError(f"{where} does not fit Swin-L (patch 4, window 12): missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}, wrong shape "
                         f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}")
    swin.body.load_state_dict(state, strict=False)
    return {"skipped": skipped, "initialised": own_norms}


# --- what train.py and eval.py load ---------------------------------------------------------------------

def pretrained_architecture(checkpoint: dict) -> dict:
    """The architecture fields (config.ARCHITECTURE) a checkpoint of ours was trained with; {} for others."""
    return {k: v for k, v in checkpoint.get("config", {}).items() if k in ARCHITECTURE}


def load_pretrained(model: DINO, checkpoint: dict, path: str, log) -> None:
    """Fine-tune from `checkpoint` (read from `path`; ours or official DINO); class-specific heads are
    re-initialised when the number of classes differs."""
    classes = num_classes_of(unwrap(checkpoint.get("model", checkpoint)))
    different = classes is not None and classes != model.cfg.num_classes
    kept = load_checkpoint(model, checkpoint, ignore_class_heads=different, name=path)
    if different:
        log(f"{path} has {classes} classes, this model {model.cfg.num_classes}: "
            f"re-initialised {', '.join(kept)}; loaded everything else")
    else:
        log(f"loaded {path}")


def load_pretrained_backbone(model: DINO, spec: str, log) -> None:
    """`imagenet`: torchvision's ImageNet weights (ResNets; downloads once). A file: the official Swin
    classification checkpoint for swinl, a torchvision ResNet state dict for the ResNets."""
    if spec == "imagenet":
        if model.cfg.backbone == "swinl":
            raise DataError("--pretrained-backbone imagenet is for ResNets; Swin-L needs the file "
                             "swin_large_patch4_window12_384_22k.pth")
        pretrained = build_backbone(model.cfg.backbone, pretrained=True)
        model.backbone.load_state_dict(pretrained.state_dict())
        log("backbone: torchvision ImageNet weights")
    elif model.cfg.backbone == "swinl":
        report = load_swin_checkpoint(model.backbone, spec)
        log(f"backbone: {spec} (skipped {len(report['skipped'])} classifier entries; "
            f"initialised {', '.join(report['initialised'])})")
    else:
        state = read_checkpoint(spec)
        state = {k: v for k, v in unwrap(state.get("model", state)).items() if not k.startswith("fc.")}
        missing, unexpected = model.backbone.body.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DataError(f"{spec} is not a torchvision ResNet state dict: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        log(f"backbone: {spec}")


def model_from_checkpoint(path: str, **overrides) -> tuple[DINO, Config, dict[int, str]]:
    """Build the model a checkpoint was trained with and load its weights (the EMA weights if it kept
    them). Returns (model, config, category names by id)."""
    checkpoint = read_checkpoint(path)
    if "config" in checkpoint:  # ours
        cfg = make_config(**{**checkpoint["config"], **overrides})
        categories = {int(k): v for k, v in checkpoint.get("categories", {}).items()}
        state = checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]
    else:  # official DINO: R50 or Swin-L by the backbone's parameter names, classes from the class head
        state = unwrap(checkpoint.get("model", checkpoint))
        backbone = "swinl" if any(k.startswith("backbone.0.patch_embed") for k in state) else "r50"
        cfg = make_config(backbone=backbone, num_classes=num_classes_of(state) or 91, **overrides)
        categories = coco_category_names() if cfg.num_classes == 91 else {}  # the release checkpoints' classes
    model = build_dino(**dataclasses.asdict(cfg))
    load_checkpoint(model, state)
    return model, cfg, categories
