"""Training-step speed and peak memory, each memory option on and off; what a step costs the host, eager and
compiled; inference FPS.

    python bench/train_step.py --backbone swinl --scale 1.5 --batch-size 2   # the seed's Swin-L recipe, batch 2
    python bench/train_step.py --backbone r50 --batch-size 2                 # R50-4scale at 800x1333
    python bench/train_step.py --count-ops --device cpu                      # operators per step, eager and compiled
    python bench/train_step.py --compiled-speed --device cpu                 # step time, compiled against eager
    python bench/train_step.py --inference                                   # R50-4scale FPS at 800x1333

Training runs --iters steps of train.train_step (forward, loss, backward, clip, AdamW step, with
train.py's optimiser and loss scaling) on generated images of the recipe's largest size (800x1333
times --scale) with 20 random boxes each, after 2 warm-up steps, for each configuration: plain
float32, then bf16 autocast, then adding activation checkpointing of the backbone, the encoder and
the decoder one at a time. It prints iterations/s, images/s and peak memory
(torch.cuda.max_memory_allocated). --inference times the whole detector, image tensor on the device
to post-processed boxes on the host, batch 1, in float32 and under eval.py's --amp autocast (bf16;
fp16 on GPUs without bf16), eager and, with --compile, through inference.compile_model.

--count-ops counts what one training step (after two warm-up steps) asks of the host, eagerly and with
--compile's compiled step (train.py --compile: the model, the matching costs and the loss through
torch.compile, the batch padded as static_shapes.py pads it): the operators dispatched, as a
TorchDispatchMode sees them (eager only: Dynamo runs a compiled function eagerly under such a mode), and
the aten operators the host calls, as torch.profiler records them (those called by no other operator: in a
compiled step, the ones the compiled programs call, such as matrix products and convolutions, and
everything outside them). On a GPU it also counts the kernel launches and the host's waits for the
device (torch.cuda.set_sync_debug_mode) per step. --compiled-speed times eager steps, eager steps on the
batch padded as the compiled step pads it, and compiled steps in turn (--iters rounds), and prints each
one's median of the per-round ratios to eager, and the compiled first step's time (compilation included)
and loss against the eager one's.
"""
import argparse
import collections
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import make_config, parse_overrides  # noqa: E402
from appendix.inference import compile_model  # noqa: E402
from model import build_dino, postprocess  # noqa: E402
from appendix.precision import amp_autocast, amp_dtype, at_least_float32  # noqa: E402
from appendix.static_shapes import bucket_step, compiled, criterion_for  # noqa: E402
from train import build_optimizer, train_step  # noqa: E402
from appendix.safe_step import make_grad_scaler  # noqa: E402

CONFIGS = [
    ("fp32", dict()),
    ("bf16", dict(amp=True)),
    ("bf16 + backbone ckpt", dict(amp=True, backbone_checkpointing=True)),
    ("bf16 + backbone, encoder ckpt", dict(amp=True, backbone_checkpointing=True, encoder_checkpointing=True)),
    ("bf16 + all ckpt", dict(amp=True, backbone_checkpointing=True, encoder_checkpointing=True,
                             decoder_checkpointing=True)),
]


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    """Seconds one call of `step` takes, the device's queued work before and its own work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def batch(size: tuple[int, int], batch_size: int, device: torch.device, num_classes: int = 91, boxes: int = 20):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *size, generator=g).to(device)
    mask = torch.zeros(batch_size, *size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(0, num_classes, (boxes,), generator=g).to(device),
                "boxes": torch.cat([torch.rand(boxes, 2, generator=g) * 0.6 + 0.2,
                                    torch.rand(boxes, 2, generator=g) * 0.3 + 0.05], -1).to(device)}
               for _ in range(batch_size)]
    return images, mask, targets


def build_on(device: torch.device, **overrides):
    """build_dino with its parameters made on `device` directly (a Swin-L takes seconds to initialise on
    the host)."""
    torch.manual_seed(0)
    with device:
        return build_dino(**overrides)


def training_step(overrides: dict, size, batch_size: int, device: torch.device, padded: bool | None = None):
    """A function taking one train.train_step of the configuration on a fixed generated batch, returning its
    terms; under overrides["compile"] as train.py --compile takes it (compiled model, criterion's compiled
    programs, the images padded to static_shapes' size bucket). `padded` (default: when compiled) pads the
    images to the size bucket. The model is made with seed 0 either way."""
    cfg = make_config(**overrides)
    model = build_on(device, **dataclasses.asdict(cfg)).train()
    criterion, optimizer, scaler = criterion_for(cfg), build_optimizer(model, cfg), make_grad_scaler(device, cfg)
    images, mask, targets = batch(size, batch_size, device, cfg.num_classes)
    if cfg.compile if padded is None else padded:
        step = bucket_step(cfg.scale)
        padding = (0, -size[1] % step, 0, -size[0] % step)
        images, mask = F.pad(images, padding), F.pad(mask, padding, value=True)
    if cfg.compile:
        model = compiled(model)
    return lambda: train_step(model, criterion, optimizer, scaler, images, mask, targets, cfg)


class DispatchCount(TorchDispatchMode):
    """Counts the operators dispatched below autograd while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def host_costs(step, device: torch.device, dispatch_mode: bool) -> dict[str, int]:
    """What one call of `step` asks of the host: aten operators called by no other (torch.profiler), CUDA kernel
    launches and waits for the device on a GPU, and with dispatch_mode the operators a TorchDispatchMode sees."""
    costs = {}
    if dispatch_mode:
        with DispatchCount() as counter:
            step()
        costs["dispatched"] = counter.count
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.events()
    costs["host aten calls"] = sum(1 for e in events if e.name.startswith("aten::") and
                                   (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    if device.type == "cuda":
        names = collections.Counter(e.name for e in events)
        costs["kernel launches"] = names["cudaLaunchKernel"] + names["cuLaunchKernel"] + names["cudaLaunchKernelExC"]
        waits = []
        torch.cuda.set_sync_debug_mode("warn")
        try:
            import warnings
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            waits = [w for w in caught if "synchroniz" in str(w.message)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        costs["waits for the device"] = len(waits)
    return costs


def count_ops(overrides: dict, size, batch_size: int, device: torch.device) -> None:
    results = {}
    for name, compile_step in (("eager", False), ("compiled", True)):
        step = training_step({**overrides, "compile": compile_step}, size, batch_size, device)
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        step()
        results[name] = host_costs(step, device, dispatch_mode=not compile_step)
        print(f"{name}: {results[name]} (first step {first:.0f} s)", flush=True)
    eager, compiled_costs = results["eager"], results["compiled"]
    for key in compiled_costs:
        print(f"{key}: eager {eager[key]}, compiled {compiled_costs[key]}, {eager[key] / max(compiled_costs[key], 1):.1f}x fewer")


def compiled_speed(overrides: dict, size, batch_size: int, pairs: int, device: torch.device) -> None:
    """Eager steps, eager steps on the compiled step's padded batch and compiled steps in turn, after a first
    step each (the compiled one compiles)."""
    eager, compiled_step = (training_step({**overrides, "compile": c}, size, batch_size, device) for c in (False, True))
    steps = {"eager": eager, "eager padded": training_step(overrides, size, batch_size, device, padded=True),
             "compiled": compiled_step}
    torch.manual_seed(1)
    want = eager()["loss"].item()
    torch.manual_seed(1)
    start = time.perf_counter()
    got = compiled_step()["loss"].item()
    print(f"first compiled step {time.perf_counter() - start:.0f} s (compilation included); its loss {got:.6f}, "
          f"eager {want:.6f}")
    steps["eager padded"]()
    times = {name: [] for name in steps}
    for _ in range(pairs):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    for name, seconds in times.items():
        ratio = statistics.median(e / c for e, c in zip(times["eager"], seconds))
        print(f"{name:13s} {statistics.median(seconds):.3f} s/step (median of {pairs}), {ratio:.2f}x eager's speed "
              f"(median of the rounds' ratios), {batch_size / statistics.median(seconds):.2f} images/s")


def time_training(overrides: dict, size, batch_size: int, iters: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per iteration, peak GiB or None off CUDA) for one configuration."""
    cfg = make_config(**overrides)
    model = build_on(device, **dataclasses.asdict(cfg)).train()
    criterion, optimizer, scaler = criterion_for(cfg), build_optimizer(model, cfg), make_grad_scaler(device, cfg)
    images, mask, targets = batch(size, batch_size, device, cfg.num_classes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(iters + 2):
        if i == 2:  # after the warm-up
            synchronize(device)
            start = time.perf_counter()
        train_step(model, criterion, optimizer, scaler, images, mask, targets, cfg)
    synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del model, optimizer
    return seconds, peak


def time_inference(backbone: str, size, iters: int, device: torch.device, amp: bool, compile_mode: str | None = None,
                   compiled: bool = False, **overrides) -> tuple[float, float, dict]:
    """(images per second, seconds of the first call: compilation when `compiled`, the last call's
    pred_logits and pred_boxes in float32 on the host), batch 1, end to end."""
    model = build_on(device, backbone=backbone, **overrides).eval()
    run = compile_model(model, compile_mode) if compiled else model
    images, mask, _ = batch(size, 1, device)
    with torch.inference_mode():
        for i in range(iters + 3):
            if i in (0, 3):
                synchronize(device)
                start = time.perf_counter()
            with amp_autocast(device, amp):  # as eval.py runs it
                out = run(images, mask)
            out = {k: at_least_float32(out[k]) for k in ("pred_logits", "pred_boxes")}
            detections = postprocess(out, [size])
            [{k: v.cpu() for k, v in d.items()} for d in detections]  # on the host, where a user reads them
            if i == 0:
                first = time.perf_counter() - start
    synchronize(device)
    return iters / (time.perf_counter() - start), first, {k: v.cpu() for k, v in out.items()}


def precision_name(device: torch.device, amp: bool) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device, amp)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--scale", type=float, default=1.0, help="image size 800x1333 times this")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--inference", action="store_true", help="time inference instead (fp32 and bf16)")
    parser.add_argument("--compile", action="store_true", help="with --inference: also through inference.compile_model")
    parser.add_argument("--count-ops", action="store_true", help="operators per training step, eager and compiled")
    parser.add_argument("--compiled-speed", action="store_true", help="step time, compiled against eager")
    parser.add_argument("--only", help="run only the configuration with this name (e.g. 'bf16 + all ckpt')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model overrides for a quick run, e.g. hidden_dim=64 num_queries=100")
    args = parser.parse_args()
    try:
        extra = parse_overrides(args.set)
    except ValueError as e:
        parser.error(f"--set {e}")
    device = torch.device(args.device)
    size = (round(800 * args.scale), round(1333 * args.scale))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, DINO-4scale {args.backbone}, images {size[0]}x{size[1]}")
    model_overrides = {"backbone": args.backbone, "scale": args.scale, **extra}
    if args.count_ops:
        count_ops(model_overrides, size, args.batch_size, device)
        return
    if args.compiled_speed:
        compiled_speed(model_overrides, size, args.batch_size, args.iters, device)
        return
    if args.inference:
        for through_compiler in (False, True) if args.compile else (False,):
            for amp in (False, True):
                fps, first, _ = time_inference(args.backbone, size, args.iters, device, amp, compiled=through_compiler,
                                               **extra)
                how = f"compiled (first call {first:.0f} s)" if through_compiler else "eager"
                print(f"inference batch 1, {precision_name(device, amp)}, {how}: {fps:.1f} images/s", flush=True)
        return
    print(f"training, batch {args.batch_size} per step, {args.iters} steps")
    print(f"{'configuration':32s} {'it/s':>7s} {'images/s':>9s} {'peak GiB':>9s}")
    for config_name, options in CONFIGS:
        if args.only and config_name != args.only:
            continue
        seconds, peak = time_training({"backbone": args.backbone, "scale": args.scale, **extra, **options},
                                      size, args.batch_size, args.iters, device)
        peak_text = f"{peak:9.2f}" if peak is not None else "      n/a"
        print(f"{config_name:32s} {1 / seconds:7.2f} {args.batch_size / seconds:9.2f} {peak_text}", flush=True)


if __name__ == "__main__":
    main()
