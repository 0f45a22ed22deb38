"""Multi-scale deformable attention: one entry point, `ms_deform_attn`.

Today every call runs the pure-PyTorch reference in `reference.py`; the CUDA kernel that
replaces it for CUDA tensors is issue #4.
"""
from torch import Tensor

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (B, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (B, Q, M, L, P, 2) in [0, 1], attention_weights (B, Q, M, L, P) -> (B, Q, M * D).
    """
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)
