"""Multi-scale deformable attention in plain PyTorch: the reference every kernel is checked against.

Deformable DETR (arXiv 2010.04159v4) Eq. 3, the sum over levels l and points k of
A_mlqk * W'_m x_l(phi_l(p_q) + Delta p_mlqk), after the value projection W'_m has been applied.
Bilinear sampling is `F.grid_sample(align_corners=False, padding_mode="zeros")`: a location
(x, y) in [0, 1] of level l samples pixel coordinates (x * W_l - 0.5, y * H_l - 0.5), and
neighbours outside the map count as zero.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (B, S, M, D): S = sum_l H_l * W_l tokens, M heads of D channels each;
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


def ms_deform_attn_gather(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """ms_deform_attn_reference written with row gathers and arithmetic only, for export: the exported
    graph then holds Gather, Floor and MatMul where the reference leaves GridSample, which some runtimes
    compile wrongly (NVIDIA/TensorRT#4813). The same sampling as
    `F.grid_sample(align_corners=False, padding_mode="zeros")`: location (x, y) of level l is the pixel
    coordinate (x * W_l - 0.5, y * H_l - 0.5); its four neighbouring pixels are read, each weighted by
    its bilinear weight times the point's attention weight, a neighbour outside the map by zero.
    Same arguments and result as ms_deform_attn_reference."""
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    rows = value.to(dtype).reshape(B * S * M, D)  # row (b * S + token) * M + m: head m's channels of a token
    heads = torch.arange(M, device=value.device).view(1, 1, M, 1)
    batch_rows = (torch.arange(B, device=value.device) * S).view(B, 1, 1, 1)
    out = 0
    for lvl, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        xy = sampling_locations[:, :, :, lvl].to(dtype)  # (B, Q, M, P, 2)
        x, y = xy[..., 0] * W - 0.5, xy[..., 1] * H - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        corners = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                   (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
        cx, cy, bilinear = (torch.stack(t, -1) for t in zip(*corners))  # (B, Q, M, P, 4) each
        inside = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
        tokens = start + cy.clamp(0, H - 1).long() * W + cx.clamp(0, W - 1).long()
        index = ((batch_rows + tokens.flatten(3)) * M + heads)  # (B, Q, M, P * 4)
        sampled = rows.index_select(0, index.flatten()).view(B, Q, M, P * 4, D)
        weights = (attention_weights[:, :, :, lvl].to(dtype)[..., None] * bilinear * inside).view(B, Q, M, 1, P * 4)
        out = out + (weights @ sampled).view(B, Q, M * D)  # the weighted sum of the level's 4P corners
    return out.to(out_dtype)
