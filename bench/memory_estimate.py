"""Peak training memory of a configuration, estimated without a GPU: one training step on fake tensors.

    python bench/memory_estimate.py --backbone swinl --scale 1.5 --batch-size 2   # the seed's Swin-L recipe
    python bench/memory_estimate.py --backbone r50 --batch-size 2                 # R50-4scale at 800x1333

On a GPU, bench/train_step.py measures the real figure (torch.cuda.max_memory_allocated); this script
answers "will it fit?" anywhere, in seconds. It runs train.py's step (forward under bf16 autocast,
criterion, backward, clip, AdamW step) twice under FakeTensorMode, which gives every tensor its shape
and dtype but computes no values, for each memory option as bench/train_step.py does, and adds up the
bytes of every live tensor storage (rounded up to the CUDA allocator's 512-byte blocks), keeping the peak.

It differs from a GPU run in what fake tensors on the CPU cannot do:
- autocast is the CPU's, with CUDA's float32 list on top (layer and group norm, softmax, exp, log, pow
  run in float32, as under CUDA autocast);
- the deformable attention is a stand-in that allocates exactly what msda_cuda's kernel and its autograd
  Function do (output; float32 locations and weights; in the backward a float32 grad_value buffer);
- the Hungarian matching needs values, so query i takes object i; the loss allocates as after a matching;
- F.scaled_dot_product_attention (Swin's, the decoder's) is a stand-in with the allocations of CUDA's
  memory-efficient kernel; other ops run the CPU's kernels, which may keep other things for their
  backward than cuDNN's or cuBLAS's;
- not counted: library workspaces (cuBLAS, cuDNN), the allocator's rounding beyond 512-byte blocks,
  CUDA context memory (which max_memory_allocated does not count either).
"""
import argparse
import contextlib
import dataclasses
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
import msda_cuda  # noqa: E402
from config import make_config  # noqa: E402
from model import build_dino  # noqa: E402
from appendix.precision import amp_autocast  # noqa: E402
from appendix.static_shapes import criterion_for  # noqa: E402
from train import build_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import CONFIGS, batch  # noqa: E402

BLOCK = 512  # bytes: the CUDA caching allocator's smallest block


class PeakMemory(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, with the ops that made what was live then."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.live: dict[int, tuple[weakref.ref, int, str]] = {}
        self.at_peak: Counter = Counter()

    def add(self, t: Tensor, made_by: str):
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = -(-storage.nbytes() // BLOCK) * BLOCK

        def free(_, key=key, nbytes=nbytes):
            self.current -= nbytes
            del self.live[key]
        self.live[key] = (weakref.ref(storage, free), nbytes, made_by)
        self.current += nbytes
        if self.current > self.peak:
            if self.current > 1.01 * sum(self.at_peak.values()):  # a breakdown now and then, not on every byte
                self.at_peak = Counter()
                for _, size, op in self.live.values():
                    self.at_peak[op] += size
            self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.add(t, func.overloadpacket.__name__)
        return out


@contextlib.contextmanager
def cuda_float32_ops():
    """Makes these run in float32 under autocast, as CUDA's autocast does (the CPU's leaves them in bf16).
    Patched where they live, not a TorchFunctionMode: activation checkpointing recomputes outside modes."""
    ops = [(F, "layer_norm"), (F, "group_norm"), (F, "softmax"), (F, "log_softmax"), (torch, "softmax"),
           (torch, "log_softmax"), (Tensor, "softmax"), (Tensor, "log_softmax"), (torch, "exp"), (Tensor, "exp"),
           (torch, "log"), (Tensor, "log"), (torch, "pow"), (Tensor, "pow"), (Tensor, "__pow__")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in ops]

    def in_float32(op):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map(lambda x: x.float() if isinstance(x, Tensor) and x.dtype in
                                        (torch.bfloat16, torch.float16) else x, (args, kwargs))
            return op(*args, **kwargs)
        return run
    for owner, name, op in originals:
        setattr(owner, name, in_float32(op))
    try:
        yield
    finally:
        for owner, name, op in originals:
            setattr(owner, name, op)


class KernelAllocations(torch.autograd.Function):
    """msda_cuda's _MSDeformAttnFunction with the kernel's outputs left empty: the same allocations."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        coord = torch.float64 if value.dtype == torch.float64 else torch.float32
        ctx.dtypes = sampling_locations.dtype, attention_weights.dtype
        locations, weights = sampling_locations.to(coord).contiguous(), attention_weights.to(coord).contiguous()
        ctx.save_for_backward(value, locations, weights)
        B, S, M, D = value.shape
        return value.new_empty(B, locations.shape[1], M * D)

    @staticmethod
    def backward(ctx, grad_output):
        value, locations, weights = ctx.saved_tensors
        half = value.dtype in (torch.float16, torch.bfloat16)
        grad_value = torch.zeros(value.shape, dtype=torch.float32 if half else value.dtype, device=value.device)
        return (grad_value.to(value.dtype), None, None, torch.empty_like(locations).to(ctx.dtypes[0]),
                torch.empty_like(weights).to(ctx.dtypes[1]))


class EfficientAttentionAllocations(torch.autograd.Function):
    """F.scaled_dot_product_attention as CUDA's memory-efficient kernel allocates (the one a GPU picks for
    Swin's masked attention; the CPU would run the math path, which stores the whole attention):
    output and float32 log-sum-exp kept for the backward; there, the gradients of q, k, v and one of the
    mask at the broadcast size (B, heads, N, N), reduced to the mask's own."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(*q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, attn_mask, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, _, _ = ctx.saved_tensors
        grad_mask = None
        if ctx.needs_input_grad[3]:
            grad_mask = attn_mask.new_empty(*q.shape[:-1], k.shape[-2]).sum_to_size(attn_mask.shape)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_mask

    @staticmethod
    def call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return EfficientAttentionAllocations.apply(q, k, v, attn_mask)


def first_queries_match(costs, counts):
    """Stands in for hungarian_assign: query i of every set takes object i."""
    S, B, Q, _ = costs.shape
    query = torch.arange(Q, device=costs.device)
    return torch.where(query < torch.tensor(counts, device=costs.device)[:, None], query, -1).expand(S, B, Q)


def estimate(overrides: dict, size: tuple[int, int], batch_size: int) -> tuple[float, Counter]:
    """Peak GiB of the second of two training steps of the configuration, and what was live at the peak."""
    cfg = make_config(**overrides)
    patches = [(msda_cuda, "ms_deform_attn", KernelAllocations.apply),
               (losses, "hungarian_assign", first_queries_match),
               (F, "scaled_dot_product_attention", EfficientAttentionAllocations.call),
               # torch's truncated normal redraws until its values fit, which fake tensors have none of
               (torch.nn.init, "trunc_normal_", torch.nn.init.normal_)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, replacement in patches:
        setattr(module, name, replacement)
    tracker = PeakMemory()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), cuda_float32_ops():
            torch.manual_seed(0)
            model = build_dino(**dataclasses.asdict(cfg)).train()
            criterion, optimizer = criterion_for(cfg), build_optimizer(model, cfg)
            for group in optimizer.param_groups:  # as build_optimizer makes it on a GPU
                group.update(fused=True, foreach=None)
            images, mask, targets = batch(size, batch_size, torch.device("cpu"))
            for t in list(model.parameters()) + list(model.buffers()):
                tracker.add(t, "parameters and buffers")
            with tracker:
                for _ in range(2):  # the second step holds the optimizer's state from the start, as in training
                    with amp_autocast(torch.device("cpu"), cfg.amp):  # bf16, as on a GPU that has it
                        outputs = model(images, mask, targets)
                    loss = criterion(outputs, targets)["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm, foreach=True)
                    optimizer.step()
                    del outputs, loss
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        msda_cuda._level_layouts.cache_clear()  # it holds fake tensors now
    return tracker.peak / 2 ** 30, tracker.at_peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--scale", type=float, default=1.0, help="image size 800x1333 times this")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--only", help="estimate only the configuration with this name (e.g. 'bf16 + all ckpt')")
    parser.add_argument("--breakdown", action="store_true", help="the largest holders of memory at each peak")
    args = parser.parse_args()
    size = (round(800 * args.scale), round(1333 * args.scale))
    print(f"DINO-4scale {args.backbone}, images {size[0]}x{size[1]}, batch {args.batch_size}: estimated peak "
          f"training memory (fake tensors, no GPU; see the docstring for what it leaves out)")
    for name, options in CONFIGS:
        if args.only and name != args.only:
            continue
        peak, breakdown = estimate({"backbone": args.backbone, "scale": args.scale, **options}, size, args.batch_size)
        print(f"{name:32s} {peak:6.2f} GiB", flush=True)
        if args.breakdown:
            print("    " + ", ".join(f"{op} {n / 2 ** 30:.2f}" for op, n in breakdown.most_common(8)))


if __name__ == "__main__":
    main()
