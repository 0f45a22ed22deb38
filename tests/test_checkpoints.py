"""checkpoints.py: our checkpoints and the official DINO and Swin ones, loaded strictly, with errors that
name the problem; and every official parameter name kept in that one file."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from backbone import Swin, build_backbone
from appendix.checkpoints import load_checkpoint, load_swin_checkpoint, model_from_checkpoint
from conftest import tiny_dino
from model import build_dino
from scripts.param_count import official_parameter_count

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
# names that only official DINO checkpoints use (ours: class_head, box_head, dn_label_embed, ...)
OFFICIAL_ONLY = ("transformer.", "class_embed", "bbox_embed", "label_enc", "backbone.0", "tgt_embed", "enc_out_",
                 "ref_point_head")


def test_official_names_live_in_checkpoints_py_alone():
    sources = [p for p in [*ROOT.glob("*.py"), *ROOT.glob("appendix/*.py"), *ROOT.glob("bench/*.py"),
                           *ROOT.glob("scripts/*.py")] if p.name != "checkpoints.py"]
    found = [(p.name, name) for p in sources for name in OFFICIAL_ONLY if name in p.read_text()]
    assert not found
    assert all(name in (ROOT / "appendix" / "checkpoints.py").read_text() for name in OFFICIAL_ONLY)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_dino().eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = tiny_dino().eval()
    assert load_checkpoint(fresh, str(path)) == []
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images)["pred_logits"], model(images)["pred_logits"], rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = tiny_dino()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, str(tmp_path / "nope.pth"))
    state = model.state_dict()
    del state["level_embed"]
    with pytest.raises(ValueError, match="missing.*level_embed"):
        load_checkpoint(model, state)
    other = tiny_dino(num_classes=7).state_dict()
    with pytest.raises(ValueError, match="ignore_class_heads"):
        load_checkpoint(model, other)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(model, str(tmp_path / "junk.pth"))


def test_fine_tuning_to_another_number_of_classes_keeps_the_new_heads():
    source = tiny_dino(num_classes=7)
    model = tiny_dino(num_classes=3)
    head_before = model.class_head.weight.clone()
    kept = load_checkpoint(model, {"model": source.state_dict()}, ignore_class_heads=True)
    assert set(kept) == {"class_head.weight", "class_head.bias", "enc_class_head.weight", "enc_class_head.bias",
                         "dn_label_embed.weight"}
    assert torch.equal(model.class_head.weight, head_before)
    assert torch.equal(model.level_embed, source.level_embed)


def fake_official_state_dict(key_list: dict) -> dict:
    """Random tensors under every official name, in order; the shared heads' 12 aliases share one tensor."""
    shared = {}
    state = {}
    for name, shape in key_list.items():
        alias = re.match(r"^(transformer\.decoder\.)?(class|bbox)_embed\.\d+\.(.*)$", name)
        if alias:
            state[name] = shared.setdefault(f"{alias[2]}.{alias[3]}", torch.randn(shape))
        elif name.endswith("relative_position_index"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        else:
            state[name] = torch.randn(shape)
    return state


@pytest.mark.parametrize("backbone, key_file", [("r50", "official_r50_keys.json"), ("swinl", "official_swinl_keys.json")])
def test_official_checkpoints_load_strictly(backbone, key_file, tmp_path):
    key_list = json.loads((REFERENCE / key_file).read_text())
    official = fake_official_state_dict(key_list)
    assert list(official) == list(key_list)
    model = build_dino(backbone)
    source = {"model": official, "epoch": 11}
    if backbone == "r50":  # through a file as well (Swin-L's would be 870 MB)
        source = tmp_path / "checkpoint0011_4scale.pth"
        torch.save({"model": official, "epoch": 11}, source)
        source = str(source)
    assert load_checkpoint(model, source) == []
    assert torch.equal(model.class_head.weight, official["class_embed.0.weight"])
    assert torch.equal(model.box_head.layers[2].bias, official["transformer.decoder.bbox_embed.5.layers.2.bias"])
    assert torch.equal(model.decoder.layers[3].self_attn_norm.weight, official["transformer.decoder.layers.3.norm2.weight"])
    assert torch.equal(model.content_queries.weight, official["transformer.tgt_embed.weight"])
    assert torch.equal(model.dn_label_embed.weight, official["label_enc.weight"])
    first_backbone_key = next(k for k in key_list if k.startswith("backbone.0."))
    ours = model.state_dict()[first_backbone_key.replace("backbone.0.body.", "backbone.body.").replace("backbone.0.", "backbone.body.")]
    assert torch.equal(ours, official[first_backbone_key])
    count = sum(p.numel() for p in model.parameters())
    assert count == official_parameter_count(key_list) == {"r50": 46_893_182, "swinl": 217_230_066}[backbone]


def test_official_checkpoint_with_unshared_heads_is_refused():
    key_list = json.loads((REFERENCE / "official_r50_keys.json").read_text())
    official = fake_official_state_dict(key_list)
    official["class_embed.3.weight"] = torch.randn_like(official["class_embed.3.weight"])
    with pytest.raises(ValueError, match="class_embed.3.weight"):
        load_checkpoint(build_dino("r50"), official)


def fake_swin_classification_checkpoint(swin: Swin) -> dict:
    """What microsoft/Swin-Transformer's swin_large_patch4_window12_384_22k.pth holds: our stages' weights
    plus the classifier (head, 21841 classes), its final norm and the shifted blocks' attn_mask buffers."""
    state = {k: torch.randn_like(v.float()) if v.is_floating_point() else v.clone()
             for k, v in swin.body.state_dict().items() if not k.startswith(("norm1", "norm2", "norm3"))}
    for i, depth in enumerate((2, 2, 18)):
        for j in range(1, depth, 2):
            state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 144, 144)
    state.update({"norm.weight": torch.ones(1536), "norm.bias": torch.zeros(1536),
                  "head.weight": torch.zeros(21841, 1536), "head.bias": torch.zeros(21841)})
    return {"model": state}


def test_swin_checkpoint_loads():
    swin = build_backbone("swinl")
    checkpoint = fake_swin_classification_checkpoint(swin)
    norm_before = swin.body.norm2.weight.clone()
    report = load_swin_checkpoint(swin, checkpoint)
    assert "head.weight" in report["skipped"] and "layers.0.blocks.1.attn_mask" in report["skipped"]
    assert report["initialised"] == [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    state = checkpoint["model"]
    assert torch.equal(swin.body.layers[2].blocks[17].mlp.fc2.weight, state["layers.2.blocks.17.mlp.fc2.weight"])
    assert torch.equal(swin.body.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(swin.body.norm2.weight, norm_before)


def test_swin_checkpoint_of_another_window_size_is_refused():
    swin = build_backbone("swinl")
    checkpoint = fake_swin_classification_checkpoint(swin)
    checkpoint["model"]["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 6)  # window 7
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        load_swin_checkpoint(swin, checkpoint)


def test_official_checkpoint_is_recognised(tmp_path):
    official = fake_official_state_dict(json.loads((REFERENCE / "official_r50_keys.json").read_text()))
    torch.save({"model": official, "args": argparse.Namespace(backbone="resnet50")}, tmp_path / "o.pth")
    model, cfg, categories = model_from_checkpoint(str(tmp_path / "o.pth"))
    assert (cfg.backbone, cfg.num_classes, len(categories)) == ("r50", 91, 80)  # COCO's names, by id
    assert (categories[1], categories[13], categories[90]) == ("person", "stop sign", "toothbrush") and 12 not in categories
    assert torch.equal(model.class_head.weight, official["class_embed.0.weight"])

