"""Multi-scale deformable attention written with row gathers and arithmetic only, for export.

The same sum as `deformable_attn.ms_deform_attn_reference` (Deformable DETR Eq. 3), with the bilinear
sampling spelled out instead of `F.grid_sample`.
"""
import torch
from torch import Tensor


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
