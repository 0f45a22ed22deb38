"""Our training step against the official code's, the same weights and batches: step time and images/s.

    git clone https://github.com/IDEA-Research/DINO /somewhere/DINO    # outside this repository (faa8520)
    python bench/official_step.py --official /somewhere/DINO                       # R50, 200x333, batch 2, CPU
    python bench/official_step.py --official /somewhere/DINO --demo-sized          # the demo's transformer, batch 4
    python bench/official_step.py --official /somewhere/DINO --compile             # and our compiled step
    python bench/official_step.py --official /somewhere/DINO --device cuda --size 800 1333 --pairs 10
    python bench/official_step.py --official /somewhere/DINO --device cuda --backbone swinl --size 1200 2000 --batch-size 1

DINO-4scale R50 (the official code builds no other ResNet) or Swin-L at the official DINO_4scale*.py
configuration: hidden 256, 900 queries, 6 + 6 layers, denoising on; with --demo-sized, the transformer of
train.py --demo (3 + 3 layers, FFN 512, 100 queries, 50 denoising) in both, at hidden 256, the only width
the official code builds. The official model (official_parity.official_model: its own builder, random
weights perturbed) is loaded into ours. Its attention runs through its CUDA op on a GPU where that op is
built (models/dino/ops: `python setup.py build install`), otherwise through its pure-PyTorch
`ms_deform_attn_core_pytorch` (the op has no CPU code); the line before the figures says which. Each step
is what each code's training loop does, in float32 (the official Swin-L config's activation checkpointing
of the backbone in both): forward with the targets, the criterion, the
weighted sum, backward, clipping to 0.1 and AdamW (the official main.py's two groups; on the CPU its
`.cuda()` and `.to('cuda')` made no-ops; torch's default AdamW for the official code,
train.build_optimizer's fused one for ours). They take steps in turn on the same generated batch (20
boxes per image), after a first step each; it prints each one's median step time, images/s, and the
median of the per-pair ratios official / ours. Last, on the CPU, the bound any float32 code of this model
has there: our step's matrix products, convolutions and attention alone, run again back to back on the
same operands (`dense_floor`), and the official step's time over it.
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from appendix.checkpoints import load_checkpoint  # noqa: E402
from config import make_config  # noqa: E402
from model import build_dino  # noqa: E402
from official_parity import official_args, official_model, on_the_cpu  # noqa: E402
from appendix.static_shapes import compiled, criterion_for  # noqa: E402
from train import DEMO, build_optimizer, train_step  # noqa: E402
from appendix.safe_step import make_grad_scaler  # noqa: E402
from train_step import batch, timed  # noqa: E402


# the official code builds no hidden size but 256 (its positional query's sine embedding has 128 features
# per coordinate, whatever hidden_dim says): the demo's transformer otherwise
DEMO_TRANSFORMER = ("nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "dn_number")
DENSE = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}


class DenseOps(TorchDispatchMode):
    """Records the matrix products, convolutions and fused attention dispatched while active, with their
    operands, to run them again alone."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in DENSE:
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def dense_floor(step, repeats: int = 3) -> tuple[float, float, int]:
    """The time this CPU takes for one `step`'s dense arithmetic alone: every matrix product, convolution
    (forward and backward) and fused attention the step dispatches, run again back to back on the same
    operands, without anything else of the step between them (median of `repeats`). No code doing the same
    arithmetic in float32 takes less. Returns (seconds, GFLOP of the step as FlopCounterMode counts them,
    number of dense calls)."""
    with DenseOps() as recorded:
        step()
    with FlopCounterMode(display=False) as flops:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for func, args, kwargs in recorded.calls:
            func(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), flops.get_total_flops() / 1e9, len(recorded.calls)


def official_step(official: Path, backbone: str, images, mask, targets, transformer: dict):
    """The official model's training step (main.py's train_one_epoch: forward, criterion, weighted sum,
    backward, clip 0.1, AdamW with the backbone at 1e-5), the model, and which attention it runs."""
    on_gpu = images.device.type == "cuda"
    model, criterion = official_model(official, backbone, own_op=on_gpu, **transformer)  # puts it on sys.path
    from models.dino.ops.modules import ms_deform_attn
    from util.misc import NestedTensor
    attention = ("its pure-PyTorch attention" if isinstance(ms_deform_attn.MSDeformAttnFunction, SimpleNamespace)
                 else "its CUDA attention op")
    model, samples = model.float().train().to(images.device), NestedTensor(images, mask)
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4)
    weights = criterion.weight_dict

    def step():
        with contextlib.nullcontext() if on_gpu else on_the_cpu():
            criterion.train()
            outputs = model(samples, targets)
            loss_dict = criterion(outputs, targets)
            loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return loss
    return step, model, attention


def our_step(state: dict, backbone: str, images, mask, targets, overrides: dict, compile_step: bool):
    cfg = make_config(backbone=backbone, num_classes=91, compile=compile_step, **overrides)
    model = build_dino(**vars(cfg))
    load_checkpoint(model, state)
    model = model.train().to(images.device)
    criterion, optimizer, scaler = criterion_for(cfg), build_optimizer(model, cfg), make_grad_scaler(images.device, cfg)
    run = compiled(model) if compile_step else model
    return lambda: train_step(run, criterion, optimizer, scaler, images, mask, targets, cfg)["loss"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of IDEA-Research/DINO")
    parser.add_argument("--backbone", choices=("r50", "swinl"), default="r50")
    parser.add_argument("--size", type=int, nargs=2, default=(200, 333), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, help="default: 2, with --demo-sized the demo's 4")
    parser.add_argument("--demo-sized", action="store_true",
                        help="the demo's transformer (train.py --demo) instead of the official one")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also our compiled step (train.py --compile)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    transformer = {k: DEMO[k] for k in DEMO_TRANSFORMER} if args.demo_sized else {}
    args.batch_size = args.batch_size or (DEMO["batch_size"] if args.demo_sized else 2)
    images, mask, targets = batch(tuple(args.size), args.batch_size, device)
    theirs, model, attention = official_step(args.official.resolve(), args.backbone, images, mask, targets, transformer)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    # the same work: the official Swin-L config recomputes each Swin block in the backward (use_checkpoint)
    ours = {**transformer, "backbone_checkpointing": official_args(args.official, args.backbone).use_checkpoint}
    steps = {"official": theirs, "ours": our_step(state, args.backbone, images, mask, targets, ours, False)}
    if args.compile:
        steps["ours compiled"] = our_step(state, args.backbone, images, mask, targets, ours, True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"DINO-4scale {args.backbone}, {transformer or 'the official transformer'}, backbone checkpointing "
          f"{ours['backbone_checkpointing']}, {where}, batch "
          f"{args.batch_size} of {args.size[0]}x{args.size[1]}, float32, the official code with {attention}; "
          f"first steps:")
    for name, step in steps.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        loss = step().item()
        print(f"  {name}: {time.perf_counter() - start:.1f} s, loss {loss:.4f}", flush=True)
    times = {name: [] for name in steps}
    for _ in range(args.pairs):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    for name, seconds in times.items():
        ratio = statistics.median(o / s for o, s in zip(times["official"], seconds))
        print(f"{name:14s} {statistics.median(seconds):7.3f} s/step {args.batch_size / statistics.median(seconds):6.2f} "
              f"images/s  {ratio:.2f}x the official code's speed (median of {args.pairs} pairs)")
    if device.type == "cpu":
        floor, gflop, calls = dense_floor(steps["ours"])
        official = statistics.median(times["official"])
        print(f"our step's dense arithmetic alone ({calls} matrix products, convolutions and attention calls, "
              f"{gflop:.0f} GFLOP), run back to back: {floor:.3f} s, {gflop / floor:.0f} GFLOP/s; a float32 step "
              f"of this model on this CPU is at most {official / floor:.2f}x the official code's speed")


if __name__ == "__main__":
    main()
