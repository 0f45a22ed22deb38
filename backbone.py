"""Backbones: ResNet-50 and Swin-L, giving DINO its three feature maps of strides 8, 16 and 32.

DINO (arXiv 2203.03605v4) Sec. 4.1 uses an ImageNet ResNet-50 with frozen batch norm, and
Sec. 4.3 a Swin-L (Liu et al., arXiv 2103.14030v2) pre-trained on ImageNet-22k at 384 pixels.
`r18` is ResNet-18 with the same three strides, small enough for tests and demos.

The Swin-L here is written out (window attention with a relative position bias, shifted windows,
patch merging) and follows the detection variant the official DINO uses: inputs of any size are
zero-padded to whole windows and patches, and the padded tokens are attended to, not masked.
Differences from official DINO: no `timm` dependency (stochastic depth is torchvision's
`stochastic_depth`). The official Swin classification weights load through appendix/checkpoints.py.

The maps' positions are encoded as in DETR (arXiv 2005.12872v3 Sec. 3.2): `sine_position_embedding`.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

from config import BACKBONES


def sine_position_embedding(mask: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Sine encoding of each pixel's position, normalised to the image's valid size (DETR Sec. 3.2).

    mask (B, H, W), True on padding. Returns (B, 2 * num_feats, H, W) float32: y features then x,
    sin and cos interleaved. Computed in float32, as official DINO, whatever the model's dtype.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t  # (B, H, W, F)
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def run_layer(layer: nn.Module, checkpointed: bool, *args):
    """layer(*args), recomputed in the backward pass instead of stored when `checkpointed` (training only)."""
    if checkpointed and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def channels_last_on_cpu(images: Tensor) -> Tensor:
    """The same images, in channels-last (NHWC) memory on the CPU: oneDNN's convolutions, batch norm and max
    pooling are faster there (R50 at 800x1333, the backbone 1.3-1.5x as fast, bench/inference_cpu.py). The
    weights may stay as they are; the features come out channels-last, and the encoder's flattening reads
    them as is. Other devices get the images as they are."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


# --- ResNet ------------------------------------------------------------------------------------

class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's frozen batch norm, computing in the input's dtype: under bf16 autocast its float32
    statistics would otherwise promote every activation after it to float32 (twice the memory).
    Where no gradient flows (inference; the frozen stem and layer1 in training) it is F.batch_norm, one
    op instead of seven (an inference forward launches ~370 fewer kernels); where one does, the
    explicit form, whose backward computes no gradients for the frozen statistics."""

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


class ResNet(nn.Module):
    """torchvision ResNet with frozen batch norm; returns the outputs of layer2, layer3, layer4."""

    def __init__(self, depth: int, pretrained: bool = False, activation_checkpointing: bool = False):
        super().__init__()
        weights = None
        if pretrained:  # downloads on first use, like official DINO (torchvision's ImageNet weights)
            weights = {50: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                       18: torchvision.models.ResNet18_Weights.IMAGENET1K_V1}[depth]
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=weights, norm_layer=FrozenBatchNorm2d)
        # as official DINO: the stem and layer1 stay frozen, layer2..4 are fine-tuned
        for name, p in resnet.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        # the stem and the four stages, under torchvision's names (checkpoints keep them); no pooling, no classifier
        self.body = nn.ModuleDict({name: module for name, module in resnet.named_children()
                                   if name not in ("avgpool", "fc")})
        width = 4 if depth >= 50 else 1  # bottleneck expansion
        self.num_channels = [128 * width, 256 * width, 512 * width]
        self.activation_checkpointing = activation_checkpointing

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.stages(channels_last_on_cpu(images))

    def stages(self, x: Tensor) -> list[Tensor]:
        """The stem and the four stages on x (B, 3, H, W) in the memory layout it comes in: the outputs of
        layer2, layer3 and layer4."""
        outs = []
        for name, module in self.body.items():
            x = run_layer(module, self.activation_checkpointing and name.startswith("layer"), x)
            if name in ("layer2", "layer3", "layer4"):
                outs.append(x)
        return outs


# --- Swin Transformer ---------------------------------------------------------------------------

def window_partition(x: Tensor, w: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * H/w * W/w, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: Tensor, w: int, H: int, W: int) -> Tensor:
    """Inverse of window_partition: (B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a w x w window plus a learned relative position bias (Swin Sec. 3.2)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # token i = (r_i, c_i) in the window; the bias of pair (i, j) is looked up at (r_i - r_j, c_i - c_j)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # (2, w*w, w*w), shifted to >= 0
        self.register_buffer("relative_position_index", rel[0] * (2 * window_size - 1) + rel[1])  # in official checkpoints
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (nW*B, N, C) with N = w*w; mask (nW, N, N) of 0 / -100, or None. Returns (nW*B, N, C).

        softmax(q k^T * scale + bias + mask) v, by F.scaled_dot_product_attention: on a GPU a fused kernel
        that never stores the (N, N) attention of every window and head (differs from official Swin,
        which does; at DINO's 1.5x training scale that was gigabytes per image)."""
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B_, heads, N, C/heads)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, h)
        bias = bias.permute(2, 0, 1).contiguous()  # (heads, N, N), the same for every window and image
        if mask is not None:  # shifted windows: each of the nW windows has its own mask; images share them
            # 4-D for the fused kernels: (B, nW * heads, N, C/heads), masks broadcast over the images
            nW = mask.shape[0]
            q, k, v = (t.reshape(B_ // nW, nW * h, N, C // h) for t in (q, k, v))
            bias = (bias + mask[:, None]).view(1, nW * h, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        return self.proj(x.reshape(B_, h, N, C // h).transpose(1, 2).reshape(B_, N, C))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, drop_path: float):
        super().__init__()
        self.window_size, self.shift, self.drop_path = window_size, shift, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()  # names fc1 / fc2 as in the Swin checkpoints
        self.mlp.add_module("fc1", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, H: int, W: int, shift_mask: Tensor) -> Tensor:
        """x (B, H*W, C) -> (B, H*W, C)."""
        B, _, C = x.shape
        w = self.window_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        # pad to whole windows; official Swin lets the zero tokens take part in attention
        x = F.pad(x, (0, 0, 0, (w - W % w) % w, 0, (w - H % w) % w))
        Hp, Wp = x.shape[1:3]
        if self.shift:  # SW-MSA: roll so the next windows straddle the previous ones' borders
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, w), shift_mask if self.shift else None)
        x = window_reverse(x, w, Hp, Wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, H * W, C)
        x = shortcut + stochastic_depth(x, self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C) and projected to 2C: the stride doubles."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        # order (0,0), (1,0), (0,1), (1,1) as in the Swin checkpoints' reduction weights
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int,
                 drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        self.activation_checkpointing = False

    def shift_mask(self, H: int, W: int, like: Tensor) -> Tensor:
        """(nW, w*w, w*w) additive mask: after the cyclic shift, tokens from different image regions
        share a window; they must not attend to each other (-100, as official Swin, not -inf)."""
        w, s = self.window_size, self.window_size // 2
        Hp, Wp = (H + w - 1) // w * w, (W + w - 1) // w * w  # no negative floor division: traced (ONNX
        # export), it would truncate towards zero
        region = like.new_zeros(1, Hp, Wp, 1)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                region[:, hs, ws] = cnt
                cnt += 1
        region = window_partition(region, w).squeeze(-1)  # (nW, w*w)
        diff = region[:, None, :] - region[:, :, None]
        return diff.masked_fill(diff != 0, -100.0)

    def forward(self, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor | None]:
        """x (B, H*W, C) -> this stage's output (B, H*W, C) and the merged input of the next stage."""
        mask = self.shift_mask(H, W, x)
        for block in self.blocks:
            x = run_layer(block, self.activation_checkpointing, x, H, W, mask)
        return x, (self.downsample(x, H, W) if self.downsample is not None else None)


class SwinTransformer(nn.Module):
    """Swin backbone; returns the normalised outputs of stages 1, 2, 3 (strides 8, 16, 32)."""

    def __init__(self, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (6, 12, 24, 48), window_size: int = 12,
                 drop_path_rate: float = 0.2, out_indices: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.patch_embed = nn.Module()  # names proj / norm as in the Swin checkpoints
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=4, stride=4)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        # stochastic depth grows linearly from 0 to drop_path_rate over all blocks (Swin Sec. 4.1)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.layers = nn.ModuleList(
            SwinStage(dims[i], depths[i], num_heads[i], window_size, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                      downsample=i < len(depths) - 1)
            for i in range(len(depths)))
        self.out_indices = tuple(out_indices)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.num_channels = [dims[i] for i in self.out_indices]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = F.pad(images, (0, (4 - images.shape[-1] % 4) % 4, 0, (4 - images.shape[-2] % 4) % 4))  # whole patches
        x = self.patch_embed.proj(x)  # (B, C, H/4, W/4)
        H, W = x.shape[-2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, H*W, C)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x, H, W)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, H, W, out.shape[-1]).permute(0, 3, 1, 2).contiguous())
            H, W = (H + 1) // 2, (W + 1) // 2
        return outs


class Swin(nn.Module):
    """Swin-L (patch 4, window 12, pre-trained at 384, embed 192, depths 2-2-18-2, heads 6-12-24-48)."""

    def __init__(self, drop_path_rate: float = 0.2, activation_checkpointing: bool = False):
        super().__init__()
        self.body = SwinTransformer(drop_path_rate=drop_path_rate)
        for stage in self.body.layers:
            stage.activation_checkpointing = activation_checkpointing
        self.num_channels = self.body.num_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.body(images)


def build_backbone(name: str, pretrained: bool = False, drop_path_rate: float = 0.2,
                   activation_checkpointing: bool = False) -> nn.Module:
    """name in BACKBONES. `pretrained` fetches torchvision's ImageNet weights for the ResNets;
    the Swin-L weights come from a file, see checkpoints.load_swin_checkpoint."""
    if name == "r50":
        return ResNet(50, pretrained, activation_checkpointing)
    if name == "r18":
        return ResNet(18, pretrained, activation_checkpointing)
    if name == "swinl":
        if pretrained:
            raise ValueError("Swin-L weights are not downloadable from torchvision: pass the file "
                             "swin_large_patch4_window12_384_22k.pth to checkpoints.load_swin_checkpoint instead")
        return Swin(drop_path_rate, activation_checkpointing)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
