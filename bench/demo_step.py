"""The demo's training step on the CPU (train.py --demo: DINO-4scale on ResNet-18, hidden 128, batch 4 of
quarter-size images), as it runs now against as it ran before the CPU work: the attention through the CPU
kernel, fused AdamW and the ResNet on channels-last tensors, against the PyTorch reference attention,
AdamW's loop over the parameters and the ResNet on NCHW tensors.

Usage: python bench/demo_step.py [--pairs 5] [--threads N]
Two copies of the same model take steps on the same generated batch (20 boxes per image, 200x333 pixels,
the demo's largest), in turn: old, new, old, new, ... after two warm-up steps each. It prints the median
step time of each and the median of the per-pair ratios old / new, after checking that their first steps
gave the same loss.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import make_config  # noqa: E402
from losses import Criterion  # noqa: E402
from model import build_dino  # noqa: E402
from train import DEMO, build_optimizer, train_step  # noqa: E402
from appendix.safe_step import make_grad_scaler  # noqa: E402
from inference_cpu import attention, nchw_backbone  # noqa: E402
from train_step import batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config(**DEMO)
    torch.manual_seed(0)
    new_model = build_dino(**vars(cfg)).train()
    old_model = copy.deepcopy(new_model)
    new_optimizer = build_optimizer(new_model, cfg)
    old_optimizer = torch.optim.AdamW(  # the same groups, without fused=True: a loop over the parameters
        [{**group, "params": [dict(old_model.named_parameters())[name] for name in names], "fused": None}
         for group, names in zip(new_optimizer.param_groups, group_names(new_model, new_optimizer))],
        weight_decay=cfg.weight_decay)
    criterion, scaler = Criterion(cfg), make_grad_scaler(torch.device("cpu"), cfg)
    images, mask, targets = batch((200, 333), cfg.batch_size, torch.device("cpu"), cfg.num_classes)

    def step(which: str) -> float:
        model, optimizer = (new_model, new_optimizer) if which == "new" else (old_model, old_optimizer)
        with attention("reference" if which == "old" else "kernel"), nchw_backbone(model, which == "old"):
            start = time.perf_counter()
            loss = train_step(model, criterion, optimizer, scaler, images, mask, targets, cfg)["loss"].item()
            return time.perf_counter() - start, loss

    torch.manual_seed(1)  # the denoising queries are drawn at random: the same draws for both first steps
    _, old_loss = step("old")
    torch.manual_seed(1)
    _, new_loss = step("new")
    print(f"first step's loss: old {old_loss:.6f}, new {new_loss:.6f}")
    if abs(old_loss - new_loss) > 1e-4 * abs(old_loss):
        sys.exit("bench/demo_step.py: the two steps disagree")
    step("old"), step("new")
    times = {"old": [], "new": []}
    for _ in range(args.pairs):
        for which in ("old", "new"):
            times[which].append(step(which)[0])
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
    print(f"demo training step, batch {cfg.batch_size} of 200x333, {args.threads} CPU threads, torch {torch.__version__}: "
          f"old {statistics.median(times['old']):.3f} s, new {statistics.median(times['new']):.3f} s "
          f"(median of {args.pairs} pairs): new {ratio:.2f}x as fast")


def group_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each of optimizer's groups."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


if __name__ == "__main__":
    main()
