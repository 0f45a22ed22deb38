"""Multi-scale deformable attention: Deformable DETR (arXiv 2010.04159v4) Sec. 4.1, Eq. 3.

Each query looks at P learned sampling points around its reference on each of the L feature
levels, per head; the points' values are mixed with softmax weights predicted from the query.
DINO (arXiv 2203.03605v4) uses it as the encoder's self-attention, with reference points at
pixel centres, and as the decoder's cross-attention, with reference *boxes*: there the offsets
are scaled by the box's half size (Sec. 3.1, the anchor box modulates the sampling).

`ms_deform_attn_reference` is Eq. 3 itself in plain PyTorch, the form every kernel is checked against;
MSDeformAttn computes it through `msda_cuda.ms_deform_attn`, which runs a compiled kernel where one
covers the call (and agreed with this form on its self-check) and this form everywhere else.
Bilinear sampling is `F.grid_sample(align_corners=False, padding_mode="zeros")`: a location (x, y) in
[0, 1] of level l samples pixel coordinates (x * W_l - 0.5, y * H_l - 0.5), and neighbours outside the
map count as zero.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import msda_cuda


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Deformable DETR Eq. 3 after the value projection W'_m: the sum over levels l and points k of
    A_mlqk * x_l(phi_l(p_q) + Delta p_mlqk), per head m, in plain PyTorch.

    value (B, S, M, D): S = sum_l H_l * W_l tokens, M heads of D channels each;
    spatial_shapes (L, 2) long, (H_l, W_l) per level; level_start_index (L,) long, first token of each level;
    sampling_locations (B, Q, M, L, P, 2), (x, y) normalised to [0, 1] per level;
    attention_weights (B, Q, M, L, P), softmax-normalised over (L, P) by the caller.
    Returns (B, Q, M * D) in value's dtype; computed in the wider of value's and the locations' dtypes
    (bf16 values with float32 locations: float32, as under autocast).
    """
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, sampling_locations = value.to(dtype), sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    out = value.new_zeros(B * M, D, Q)
    for lvl, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*M, D, Q, P)
        weights_l = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Q, P)
        out = out + (sampled * weights_l).sum(-1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous().to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR Eq. 3) with its four projections.

    d_model   C, the channels of queries and values (hidden dimension); divisible by n_heads
    n_levels  L, the number of feature levels
    n_heads   M, the attention heads, each of D = C / M channels
    n_points  P, the sampling points per head and level
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Deformable DETR's initialisation: head m starts looking along the direction 2*pi*m/M,
        # point k at distance k+1 (pixels for the encoder, fraction of the half box for the decoder).
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the square's border
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)  # uniform weights over the L*P points
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """
        query              (B, Q, C) the queries, position embedding included
        reference_points   (B, Q, L, 2) points (x, y) for the encoder, or (B, Q, L, 4) boxes (cx, cy, w, h) for
                           the decoder, in [0, 1] of each level's padded map (top left (0, 0), bottom right (1, 1))
        value              (B, S, C) the flattened maps of all levels, S = sum_l H_l * W_l
        spatial_shapes     (L, 2) long, (H_l, W_l) of each level
        level_start_index  (L,) long, where each level starts in S: [0, H_0*W_0, H_0*W_0 + H_1*W_1, ...]
        padding_mask       (B, S) bool, True on padding tokens (their values count as 0); None: no padding
        Returns (B, Q, C).
        """
        B, Q, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)  # padding contributes nothing
        value = value.view(B, S, M, self.d_model // M)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: location = reference point + offset / (W_l, H_l)
            locations = points_plus_pixel_offsets(reference_points, offsets, spatial_shapes)
        elif reference_points.shape[-1] == 4:
            # offsets are in units of the box's half size, divided by P so the P points spread inside it
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}")
        out = msda_cuda.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)  # (B, Q, C)
        return self.output_proj(out)


def points_plus_pixel_offsets(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """reference_points (B, Q, L, 2) + offsets (B, Q, M, L, P, 2) / (W_l, H_l) -> (B, Q, M, L, P, 2), i.e.
        reference_points[:, :, None, :, None] + offsets / size_wh[:, None]
    with both small operands first repeated over the P points, so that each broadcast runs over whole
    (L, P, 2) rows: 5-9x as fast on the CPU as broadcasting over the middle dimensions of a 6-d view, the
    same values."""
    P = offsets.shape[-2]
    size_wh = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1)  # (L, 2)
    per_point = lambda t: t.unsqueeze(-2).expand(*t.shape[:-1], P, 2).contiguous()  # noqa: E731
    return per_point(reference_points)[:, :, None] + offsets / per_point(size_wh)
