import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

from backbone import SwinTransformer, build_backbone

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


@pytest.mark.parametrize("name, channels", [("r18", [128, 256, 512]), ("r50", [512, 1024, 2048])])
def test_resnet_gives_strides_8_16_32(name, channels):
    backbone = build_backbone(name).eval()
    assert backbone.num_channels == channels
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(f.shape[1:]) for f in features] == [(channels[0], 13, 19), (channels[1], 7, 10), (channels[2], 4, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_runs_channels_last_on_the_cpu_and_computes_what_it_computes_on_nchw(dtype):
    """The CPU's features come out channels-last (oneDNN is faster on them), equal to the stages run on the
    NCHW images as they come, with and without gradients."""
    torch.manual_seed(0)
    backbone = build_backbone("r18").train().to(dtype)
    images = torch.randn(2, 3, 64, 96, dtype=dtype)
    features = backbone(images)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
    nchw = backbone.stages(images)
    assert all(f.is_contiguous() for f in nchw)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for got, want in zip(features, nchw):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grads = torch.autograd.grad(sum(f.square().mean() for f in features), backbone.body.layer2[0].conv1.weight)
    want = torch.autograd.grad(sum(f.square().mean() for f in nchw), backbone.body.layer2[0].conv1.weight)
    torch.testing.assert_close(grads, want, rtol=tol, atol=tol)


def test_swin_l_gives_strides_8_16_32_on_odd_sizes():
    backbone = build_backbone("swinl").eval()
    assert backbone.num_channels == [384, 768, 1536]
    official = json.loads((REFERENCE / "official_swinl_keys.json").read_text())
    official_count = sum(math.prod(shape) for name, shape in official.items()
                         if name.startswith("backbone.0.") and not name.endswith("relative_position_index"))
    assert sum(p.numel() for p in backbone.parameters()) == official_count
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(f.shape[1:]) for f in features] == [(384, 13, 19), (768, 7, 10), (1536, 4, 5)]


def small_swin(**overrides):
    return SwinTransformer(**{**dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4),
                              **overrides})


def test_swin_shifted_windows_do_not_mix_regions():
    """A token's output depends only on tokens of its own window (W-MSA) or shifted window (SW-MSA);
    with one block, changing a far corner leaves the opposite corner untouched."""
    swin = small_swin(depths=(1, 1, 1, 1), drop_path_rate=0.0).eval().double()
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    changed = image.clone()
    changed[..., 48:, 48:] += 1.0  # bottom-right patch of the 16x16 token grid
    stage0 = lambda img: swin.layers[0].blocks[0](swin.patch_embed.norm(swin.patch_embed.proj(img).flatten(2).transpose(1, 2)), 16, 16, None)
    a, b = stage0(image).view(16, 16, -1), stage0(changed).view(16, 16, -1)
    torch.testing.assert_close(a[:12, :12], b[:12, :12], rtol=0, atol=0)
    assert not torch.allclose(a[12:, 12:], b[12:, 12:])


def test_swin_activation_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = small_swin(drop_path_rate=0.3).train()
    checkpointed = small_swin(drop_path_rate=0.3).train()
    checkpointed.load_state_dict(plain.state_dict())
    for stage in checkpointed.layers:
        stage.activation_checkpointing = True
    image = torch.randn(2, 3, 50, 70)
    torch.manual_seed(1)
    out_plain = plain(image)
    torch.manual_seed(1)
    out_ckpt = checkpointed(image)
    for a, b in zip(out_plain, out_ckpt):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out_plain).backward()
    sum(o.sum() for o in out_ckpt).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_resnet_loads_torchvision_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """The real `pretrained=True` path, fed from a cache file (no download): torchvision's weights file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18()  # plain BatchNorm, as in torchvision's file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    backbone = build_backbone("r18", pretrained=True)
    assert torch.equal(backbone.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(backbone.body.bn1.running_var, reference.bn1.running_var)


def test_swin_has_no_torchvision_download():
    with pytest.raises(ValueError, match="load_swin_checkpoint"):
        build_backbone("swinl", pretrained=True)


@pytest.mark.parametrize("shifted", [False, True])
def test_swin_window_attention_is_official_swins_formula(shifted):
    """The fused attention equals Swin's softmax(q k^T * scale + bias + mask) v, written out as the official
    code does, in float64: outputs and the gradients of the input and of every parameter."""
    from backbone import WindowAttention
    torch.manual_seed(0)
    attention = WindowAttention(dim=24, window_size=3, num_heads=3).double()
    B, nW, N = 2, 4, 9
    x = torch.randn(B * nW, N, 24, dtype=torch.float64, requires_grad=True)
    mask = (torch.randint(0, 2, (nW, N, N)) * -100.0).double() if shifted else None

    def written_out(x):
        qkv = attention.qkv(x).view(B * nW, N, 3, 3, 8).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * attention.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = attention.relative_position_bias_table[attention.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            attn = (attn.view(B, nW, 3, N, N) + mask[None, :, None]).view(B * nW, 3, N, N)
        return attention.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B * nW, N, 24))

    grad = torch.randn(B * nW, N, 24, dtype=torch.float64)
    results = []
    for fn in (attention, written_out):
        attention.zero_grad()
        x.grad = None
        out = fn(x, mask) if fn is attention else fn(x)
        out.backward(grad)
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in attention.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_frozen_batch_norm_is_the_same_with_and_without_gradients(dtype):
    """One fused op where no gradient flows, the explicit form where one does: the same numbers, in the
    input's dtype."""
    from backbone import FrozenBatchNorm2d
    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(6)
    bn.weight.normal_(), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    bn = bn.double() if dtype == torch.float64 else bn  # statistics stay float32 under bf16, as in autocast
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    want = (x - bn.running_mean.double()[:, None, None]) / (bn.running_var.double()[:, None, None] + bn.eps).sqrt()
    want = want * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    with torch.no_grad():
        fused = bn(x.to(dtype))
    explicit = bn(x.to(dtype).requires_grad_())
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    for got in (fused, explicit):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
