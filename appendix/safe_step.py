"""The backward, clip and step of train.train_step, made safe and fast for long GPU runs (not in the paper).

The recipe is DETR's: loss.backward(), clip_grad_norm_(parameters, 0.1), optimizer.step(). Written out here
is what a run of days adds to those three lines:
- loss scaling where --amp runs in fp16 (GPUs without bf16): `backward` scales the loss, `clip` unscales the
  gradients first, and the scaler skips a step whose scaled gradients overflowed;
- a step whose loss or gradients are not finite is never taken, in any process (the verdict is all-reduced),
  and NonFiniteLoss stops the run, whose last good checkpoint stays; with fused AdamW and no loss scaling
  the optimiser skips such a step on the device itself, so that nothing waits for the verdict, which the
  next step's `backward` reads once the matching has waited for the device anyway;
- under --compile, the clipping compiled into one program (eagerly it is a few operators per parameter).
"""
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from appendix.precision import amp_dtype
from appendix.static_shapes import compiled
from config import Config


class NonFiniteLoss(RuntimeError):
    """A training step whose loss or gradients were not finite; it was not taken."""


def make_grad_scaler(device: torch.device, cfg: Config) -> torch.amp.GradScaler:
    """Loss scaling, on only where --amp runs in fp16 (GPUs without bf16): bf16 needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.amp) == torch.float16)


def backward(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """loss.backward(), the loss scaled under fp16; first, NonFiniteLoss if the last step was skipped."""
    raise_if_skipped(optimizer)  # the last step's verdict, long computed: the matching waited for this forward
    scaler.scale(loss).backward()


def clip(parameters, max_norm: float, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         compile: bool) -> Tensor | None:
    """clip_grad_norm_(parameters, max_norm) on the unscaled gradients (compiled under --compile); returns the
    norm before clipping, or None where max_norm is 0 (no clipping)."""
    if max_norm <= 0:
        return None
    scaler.unscale_(optimizer)
    clip_grad_norm = compiled_clipping() if compile else torch.nn.utils.clip_grad_norm_
    return clip_grad_norm(list(parameters), max_norm)


def step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, terms: dict[str, Tensor],
         norm: Tensor | None) -> None:
    """optimizer.step(), taken only where the loss and the gradients' norm are finite in every process.
    Under fp16 loss scaling, gradients that overflow are the scaler's to skip (it lowers the scale)."""
    loss = terms["loss"]
    finite = torch.isfinite(loss)
    if norm is not None and not scaler.is_enabled():
        finite &= torch.isfinite(norm)
    skipped = (~finite).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)  # every process skips and stops together
    if optimizer.defaults.get("fused") and not scaler.is_enabled():
        optimizer.found_inf = skipped  # fused AdamW's own skip, as GradScaler uses it (torch.optim.adamw)
    elif skipped.item():
        raise NonFiniteLoss(f"the loss ({loss.item()}) or a gradient is not finite; this process's terms: "
                            f"{ {k: round(v.item(), 4) for k, v in terms.items()} }")
    scaler.step(optimizer)
    scaler.update()


def raise_if_skipped(optimizer: torch.optim.Optimizer) -> None:
    """NonFiniteLoss if the optimiser's last step was skipped for a loss or gradient that was not finite."""
    skipped = getattr(optimizer, "found_inf", None)
    if skipped is not None and skipped.item():
        raise NonFiniteLoss("the loss or a gradient was not finite at the last step, which was not taken")


@functools.cache
def compiled_clipping():
    """clip_grad_norm_ compiled: one program for every gradient's norm and scaling."""
    return compiled(torch.nn.utils.clip_grad_norm_)
