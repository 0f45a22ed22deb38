"""Mixed precision: one rule for the model, the matching, the losses, evaluation and the attention kernel.

Under --amp, autocast runs the network's matrix products and convolutions in bf16 (fp16, with loss
scaling, on GPUs without bf16), where their rounding is harmless. What rounding would harm stays in
float32, and float64 stays float64 (the parity checks run the whole model in float64):
  - geometry: the sine position embeddings, valid ratios, reference points and encoder proposals (made
    in float32 whatever the model's dtype, as official DINO), and the deformable attention's sampling
    locations and weights (bf16 has 8 bits of mantissa: a location on a 167-pixel-wide map would be off
    by up to a third of a pixel);
  - sums of many small terms: the matching costs and the losses;
  - what leaves the model: the scores and boxes of post-processing and evaluation.
`at_least_float32` is that upcast, for tensors and for dtypes.
"""
import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def at_least_float32(x: Tensor | torch.dtype) -> Tensor | torch.dtype:
    """bf16 and fp16 -> float32; float32 and float64 unchanged. A tensor or a dtype."""
    if isinstance(x, torch.dtype):
        return torch.float32 if x in HALF else x
    return x.float() if x.dtype in HALF else x


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype for --amp: bf16 where the device supports it, else fp16 (CUDA); None without --amp."""
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def amp_autocast(device: torch.device, amp: bool):
    """The autocast context of --amp (amp_dtype), or a no-op without it."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
