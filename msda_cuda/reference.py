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
