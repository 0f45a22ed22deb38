"""Train DINO on COCO-format data: the seed's recipe, a demo that learns, checkpoints you can trust.

    python train.py --data DIR                        # DINO-4scale R50, AdamW 1e-4 / backbone 1e-5, batch 1, 100 epochs
    python train.py --data DIR --backbone swinl --lr 5e-5 --scale 1.5 --pretrained-backbone swin_large_patch4_window12_384_22k.pth
    python train.py --data DIR --pretrained checkpoint0011_4scale.pth   # fine-tune an official checkpoint
    torchrun --nproc_per_node 8 train.py --data DIR   # multi-GPU (and multi-node) training
    python train.py --demo                            # generated shapes, a small model, CPU, about 10 minutes

Every Config field is a flag (`--hidden-dim 64`, `--num-queries 300`, `--no-amp`). Each epoch ends
with OUTPUT_DIR/checkpoint.pth (written to a temporary file, then renamed: a crash never leaves a
broken file), a line in OUTPUT_DIR/log.jsonl and, every --eval-every epochs, COCO metrics on the
validation set; the best AP so far is kept in OUTPUT_DIR/best.pth. --resume continues from
checkpoint.pth with the optimiser, schedule, epoch and random state, giving the same losses as a
run that never stopped.

Read it from the recipe outwards: train_step (forward, loss terms, weighted sum, backward, clip, step)
-> train_one_epoch -> train (the epoch loop; evaluate_and_save ends each epoch) -> build_state (model, AdamW,
step schedule, EMA) -> main. What a product adds around the recipe is in the appendix: run_setup.py (set_up:
processes, the output folder, the data and its checks, the config), safe_step.py (the step's backward, clip
and step made safe for long runs), runs.py (checkpoints, resuming, signals), progress.py (the progress line,
TensorBoard).
"""
import argparse
import contextlib
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from config import Config, ConfigError, TooFewTokens, flag
from data import DataError
from denoising import pad_targets
from eval import METRIC_NAMES, evaluate, format_metrics
from losses import Criterion
from model import DINO, build_dino
from appendix import plots, safe_step
from appendix.checkpoints import load_pretrained, load_pretrained_backbone
from appendix.detect import save_pictures, write_plots
from appendix.inference import Detector, detected_classes
from appendix.precision import amp_autocast
from appendix.progress import RunningLoss, epoch_to_board, report, tensorboard_writer
from appendix.run_setup import Setup, set_up
from appendix.runs import CheckpointClock, StopSignals, Stopped, TrainState, save_atomically, signals_held, write_atomically
from appendix.safe_step import NonFiniteLoss, make_grad_scaler, raise_if_skipped
from appendix.static_shapes import compiled, criterion_for, target_slots

# the demo: a small DINO-4scale on ResNet-18 from scratch, on generated shapes at a quarter of COCO's sizes
DEMO = dict(backbone="r18", hidden_dim=128, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512,
            num_queries=100, dn_number=50, lr=2e-4, lr_backbone=2e-4, batch_size=4, epochs=6, lr_drop=5,
            scale=0.25, num_workers=2)


def lr_at_epoch(cfg: Config, epoch: int) -> float:
    """The step schedule as a factor of the base rates: 1, then 0.1 after cfg.lr_drop epochs."""
    return 0.1 if epoch >= cfg.lr_drop else 1.0


def train_step(model, criterion, optimizer, scaler: torch.amp.GradScaler, images: Tensor, mask: Tensor,
               targets: list[dict], cfg: Config) -> dict[str, Tensor]:
    """One batch of the seed's recipe, as DETR's engine.train_one_epoch: forward, loss terms, weighted sum,
    backward, clip, step. Returns the unweighted terms and "loss", their weighted sum.

    The last three are appendix/safe_step.py's: loss scaling under fp16, and a step whose loss or gradients
    are not finite in any process is not taken (NonFiniteLoss, raised then or at the next step's backward)."""
    # the targets as tensors, once for the denoising queries and the criterion (to more slots under --compile)
    padded = pad_targets(targets, target_slots(max(len(t["labels"]) for t in targets), cfg.compile))
    with amp_autocast(images.device, cfg.amp):
        outputs = model(images, mask, padded)
    terms = criterion(outputs, targets, padded)  # float32: the criterion casts the predictions
    optimizer.zero_grad(set_to_none=True)
    safe_step.backward(terms["loss"], optimizer, scaler)
    norm = safe_step.clip(model.parameters(), cfg.clip_max_norm, optimizer, scaler, cfg.compile)  # to 0.1
    safe_step.step(optimizer, scaler, terms, norm)
    return terms


def build_optimizer(model: DINO, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with two groups as official DINO: the backbone at lr_backbone, everything else at lr.
    On GPUs and CPUs, torch's fused AdamW: one kernel for all parameters instead of a loop over them, and
    no temporaries the size of them."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    return torch.optim.AdamW([{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone}],
                             weight_decay=cfg.weight_decay, fused=rest[0].device.type in ("cuda", "cpu") or None)


EMA_WARMUP = 2000  # tau, in steps, of the EMA's decay warm-up: RT-DETR's and ultralytics' ModelEMA


def make_ema(model: DINO, decay: float) -> AveragedModel:
    """Exponential moving average of the weights, ema = d_t * ema + (1 - d_t) * weights after step t, with
    the decay warmed up as RT-DETR and ultralytics do, d_t = decay * (1 - exp(-t / EMA_WARMUP)): the first
    steps' weights are followed closely, and the average reaches `decay`'s window of 1 / (1 - decay) steps
    only after a few thousand. (Official DINO's EMA keeps `decay` from the first step: after 600 steps at
    0.9997, 84% of its average is still the random initial weights, whose AP is 0.) torch's AveragedModel,
    one foreach lerp over all parameters; ema.module is the averaged DINO, and ema.n_averaged counts t
    from 1. Buffers are copied, never averaged: frozen batch-norm statistics do not change, and Swin's
    integer position indices must not."""
    def update(averaged: list[Tensor], current: list[Tensor], steps: Tensor):
        decay_now = decay * (1 - torch.exp(-steps.double() / EMA_WARMUP))  # on the device: no wait for it
        torch._foreach_lerp_(averaged, current, (1 - decay_now).to(averaged[0].dtype))

    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=False)
    ema.n_averaged.fill_(1)  # it starts from the initial weights: AveragedModel would copy the first step's
    return ema.requires_grad_(False)


def minutes(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="dataset folder: COCO (train2017/, val2017/, annotations/instances_{train,val}2017.json), "
                      "YOLO (data.yaml, or the .yaml file itself) or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/)")
    for split in ("train", "val"):
        data.add_argument(f"--{split}-images", help=f"{split} image folder (any layout; with --{split}-json)")
        data.add_argument(f"--{split}-json", help=f"COCO-format annotation file of --{split}-images")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help="checkpoints, log.jsonl, metrics.json (default: outputs, demo_output)")
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    run.add_argument("--pretrained", metavar="CKPT", help="start from a checkpoint (ours or official DINO)")
    run.add_argument("--pretrained-backbone", metavar="FILE", help="'imagenet' (torchvision, ResNets) or a weights file")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--checkpoint-minutes", type=minutes, default=10.0, metavar="M",
                     help="also write checkpoint.pth every M minutes mid-epoch (0: at epoch ends only; default 10)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log every loss term, the lr, iterations/s and AP to OUTPUT_DIR/tensorboard "
                          "(needs: pip install tensorboard)")
    run.add_argument("--demo", action="store_true", help="train a small model on generated shapes (CPU, ~10 min)")
    hyper = parser.add_argument_group("hyperparameters (config.py; defaults are the seed's)")
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            hyper.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"default {f.default}")
        else:
            hyper.add_argument(flag(f.name), type=type(f.default), default=argparse.SUPPRESS,
                               help=f"default {f.default}")
    return parser


# --- a run: its set-up, one epoch, the epoch loop --------------------------------------------------------

def train_one_epoch(setup: Setup, state: TrainState, model: torch.nn.Module, criterion: Criterion,
                    clock: CheckpointClock, board=None) -> dict[str, float]:
    """Epoch state.epoch from iteration state.iteration on: train_step on every batch, the EMA after it,
    the running means of the loss terms. `model` is state.model, or its DistributedDataParallel wrapper.
    A checkpoint is written mid-epoch when the clock says so, and Stopped raised after one that a signal
    asked for. Returns the epoch's mean of every term over all processes."""
    cfg, device, epoch, total = setup.cfg, setup.device, state.epoch, setup.iterations
    losses = RunningLoss(state.running if state.iteration else None)
    model.train()
    start = last_print = time.time()
    first = state.iteration
    with signals_held():  # the workers start here (runs.data_worker_init)
        batches = iter(setup.loader(True, epoch, skip=first))
    try:
        for images, mask, targets in batches:
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            try:
                terms = train_step(model, criterion, state.optimizer, state.scaler, images, mask, targets, cfg)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e} (epoch {epoch}, iteration {state.iteration})") from None
            if state.ema is not None:
                state.ema.update_parameters(state.model)
            losses.add(terms)
            state.iteration += 1
            write, stop = clock.due()
            if state.iteration < total and write:  # the epoch's end writes its checkpoint anyway, and stops there
                raise_if_skipped(state.optimizer)  # never save the weights of a run that has gone wrong
                state.running = losses.saved()
                setup.save(state)
                clock.written()
                if stop:
                    raise clock.stopped(f"at epoch {epoch}, iteration {state.iteration} of {total}")
            if setup.is_main and (time.time() - last_print > 10 or state.iteration == total):
                last_print = time.time()
                report(setup, state, losses, (state.iteration - first) / (last_print - start), board)
        try:
            raise_if_skipped(state.optimizer)  # the epoch's last step
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e} (epoch {epoch}, its last iteration)") from None
    except DataError as e:  # an image that cannot be read, found mid-epoch: keep what was trained
        reason = str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")  # from a worker: its traceback
        if not setup.distributed:  # (other processes would wait for this one)
            state.running = losses.saved()
            setup.save(state)
            reason += (f"; the {state.iteration} iterations of epoch {epoch} before it are saved: fix the image, "
                       f"then --resume")
        raise DataError(reason) from None
    return losses.epoch_means(device)


def evaluate_and_save(setup: Setup, state: TrainState, evaluated: torch.nn.Module) -> dict:
    """Finish the epoch whose log record is state.pending: evaluate `evaluated` if the record says it is due,
    then write what depends on the epoch, and last the checkpoint that says nothing is owed. Returns the
    metrics ({} without an evaluation).

    The order makes the end of an epoch one recoverable sequence: best.pth (if the AP is the best so far),
    metrics.json, the record in log.jsonl and the plots come first, and while checkpoint.pth still owes the
    evaluation, a kill at any instant is completed by --resume, which does it all again: the same weights
    give the same AP and the same choice of best.pth, and the log's record of the epoch is replaced, not
    repeated (STYLE.md, point 15)."""
    record = dict(state.pending)
    metrics, best = {}, False
    if record.pop("evaluate"):
        metrics = evaluate(evaluated, setup.loader(False), setup.device, setup.cfg.num_select, setup.cfg.amp,
                           detected_classes(setup.train_set.category_names, setup.cfg.num_classes)) or {}
        if setup.is_main:  # rank 0 alone has the metrics
            setup.log(format_metrics(metrics))
            record["val"] = {k: metrics[k] for k in (*METRIC_NAMES, "per_class_AP")}  # not the curves
            best = metrics["AP"] > state.best_ap
            state.best_ap, state.stale = max(state.best_ap, metrics["AP"]), 0 if best else state.stale + 1
        if setup.distributed:  # every process stops early (--patience) at the same epoch
            shared = [state.best_ap, state.stale]
            dist.broadcast_object_list(shared, src=0)
            state.best_ap, state.stale = shared
    state.pending = None
    checkpoint = setup.contents(state)  # every process: it gathers their random states
    if not setup.is_main:
        return metrics
    if best:
        save_atomically(checkpoint, setup.output_dir / "best.pth")
        write_atomically(setup.output_dir / "metrics.json", json.dumps(metrics, indent=2))
    log_text = log_with(setup.output_dir / "log.jsonl", record)
    write_atomically(setup.output_dir / "log.jsonl", log_text)  # rewritten whole: no half line after a kill
    if setup.plots:
        run_plots(setup, evaluated, log_text, metrics if best else None)
    save_atomically(checkpoint, setup.checkpoint_path)  # the epoch is done: last
    return metrics


def log_with(log_file: Path, record: dict) -> str:
    """log.jsonl's text with `record` as its last line: the earlier epochs' records, and this epoch's once,
    however often a kill made its end run again."""
    earlier = log_file.read_text().splitlines() if log_file.exists() else []
    kept = [line for line in earlier if json.loads(line)["epoch"] < record["epoch"]]
    return "".join(line + "\n" for line in [*kept, json.dumps(record)])


def run_plots(setup: Setup, evaluated: torch.nn.Module, log_text: str, best_metrics: dict | None) -> None:
    """OUTPUT_DIR/plots/training.png after every epoch; the evaluation's plots of the best model so far
    (pr_curves, per_class_ap, confusion_matrix, predictions) when it is new."""
    folder = setup.output_dir / "plots"
    plots.training_plot([json.loads(line) for line in log_text.splitlines()], folder / "training.png")
    if best_metrics is not None:
        detector = Detector(evaluated, setup.cfg, setup.train_set.category_names, setup.device, setup.cfg.amp)
        write_plots(detector, setup.val_set, best_metrics, folder, 0.3)


def train(setup: Setup, state: TrainState, criterion: Criterion, checkpoint_minutes: float, board,
          held: contextlib.ExitStack) -> dict:
    """The epoch loop, from where `state` stands to cfg.epochs; returns the last evaluation's metrics."""
    cfg, evaluated = setup.cfg, state.ema.module if state.ema is not None else state.model
    model = (DistributedDataParallel(state.model, device_ids=[setup.device.index] if setup.device.type == "cuda"
                                     else None, find_unused_parameters=True)  # the DN label book may be unused
             if setup.distributed else state.model)
    if cfg.compile:  # one program per batch shape, its shapes fixed (appendix/static_shapes.py); state.model eager
        model = compiled(model)
        if setup.device.type == "cpu":
            setup.log("--compile on the CPU: each new batch shape compiles for minutes, and a compiled step is no "
                      "faster than an eager one there (BENCHMARKS.md); it is meant for GPUs")
    finished = state.epoch >= cfg.epochs and state.pending is None
    metrics = evaluate_and_save(setup, state, evaluated) if state.pending is not None else {}  # one owed from before
    if finished:
        setup.log(f"nothing left to train: {setup.checkpoint_path} has finished all {cfg.epochs} epochs; give a "
                  f"larger --epochs to train on")
    clock = CheckpointClock(checkpoint_minutes, held.enter_context(StopSignals(setup.log)), setup.device)
    try:
        for epoch in range(state.epoch, cfg.epochs):
            if cfg.patience and state.stale >= cfg.patience:
                setup.log(f"stopping early, before epoch {epoch}: AP has not improved for {state.stale} evaluations "
                          f"(--patience {cfg.patience}); the best, AP {state.best_ap:.3f}, is in "
                          f"{setup.output_dir / 'best.pth'}")
                break
            started = time.time()
            losses = train_one_epoch(setup, state, model, criterion, clock, board)
            record = {"epoch": epoch, "train": losses, "lr": state.optimizer.param_groups[0]["lr"],
                      "seconds": time.time() - started,
                      "evaluate": (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs}
            state.scheduler.step()
            state.epoch, state.iteration, state.running, state.pending = epoch + 1, 0, None, record
            setup.save(state)  # before the evaluation, which then cannot lose the epoch
            evaluated_now = evaluate_and_save(setup, state, evaluated)
            metrics = evaluated_now or metrics
            clock.written()
            if board is not None:
                epoch_to_board(board, losses, {k: evaluated_now[k] for k in METRIC_NAMES if evaluated_now},
                               (epoch + 1) * setup.iterations)
            if clock.due()[1] and epoch + 1 < cfg.epochs:  # a stop asked for during the last step or evaluation
                raise clock.stopped(f"after epoch {epoch}")
    except NonFiniteLoss as e:
        kept = (f"the last good checkpoint, {setup.checkpoint_path}, is kept" if setup.checkpoint_path.exists()
                else "no checkpoint yet")
        setup.log(f"stopping: {e}; {kept}")
        sys.exit(1)
    except Stopped as e:
        setup.log(f"{e}; checkpoint written to {setup.checkpoint_path}: resume with the same command and --resume")
        sys.exit(e.exit_code)
    return metrics


def build_state(setup: Setup, args: argparse.Namespace, checkpoint: dict | None) -> TrainState:
    """The model, optimiser, schedule, loss scaler and EMA, from scratch (seeded), from pretrained weights, or
    as a resumed checkpoint left them."""
    cfg = setup.cfg
    torch.manual_seed(cfg.seed + setup.rank)
    random.seed(cfg.seed + setup.rank)
    model = build_dino(**dataclasses.asdict(cfg)).to(setup.device)
    if args.pretrained and not args.resume:
        load_pretrained(model, checkpoint, args.pretrained, setup.log)
    if args.pretrained_backbone and not args.resume:
        load_pretrained_backbone(model, args.pretrained_backbone, setup.log)
    optimizer = build_optimizer(model, cfg)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_at_epoch(cfg, e)),
                       make_grad_scaler(setup.device, cfg), make_ema(model, cfg.ema_decay) if cfg.ema else None)
    if args.resume:
        state.restore(checkpoint, setup.rank)
        set_rates(state, cfg, checkpoint["config"])
        setup.log(f"resumed from {setup.checkpoint_path} at epoch {state.epoch}, iteration {state.iteration}")
    return state


def set_rates(state: TrainState, cfg: Config, saved: dict) -> None:
    """A resumed run given another --lr, --lr-backbone, --lr-drop or --weight-decay: the optimiser and the
    schedule take the new values from where the run goes on (the restored ones are the saved run's)."""
    if all(saved.get(k) == getattr(cfg, k) for k in ("lr", "lr_backbone", "lr_drop", "weight_decay")):
        return  # untouched: the restored state, bit for bit
    state.scheduler.base_lrs = [cfg.lr, cfg.lr_backbone]
    for group, base in zip(state.optimizer.param_groups, state.scheduler.base_lrs):
        group["initial_lr"], group["weight_decay"] = base, cfg.weight_decay
        group["lr"] = base * lr_at_epoch(cfg, state.scheduler.last_epoch)


def main(argv: list[str] | None = None) -> dict:
    """train.py: returns the last evaluation's metrics."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
            setup, checkpoint = set_up(parser, args, {**DEMO, **given} if args.demo else given, held)
            state = build_state(setup, args, checkpoint)
            cfg = setup.cfg
            setup.log(f"DINO-4scale {cfg.backbone}, {cfg.num_classes} classes, "
                      f"{sum(p.numel() for p in state.model.parameters()):,} parameters; {len(setup.train_set)} "
                      f"training / {len(setup.val_set)} validation images; {setup.world} process(es) on {setup.device}")
            board = (held.enter_context(tensorboard_writer(setup.output_dir / "tensorboard"))
                     if args.tensorboard and setup.is_main else None)
            metrics = train(setup, state, criterion_for(cfg), args.checkpoint_minutes, board, held)
            if setup.is_main and args.demo:
                demo_pictures(setup, state, metrics)
            if setup.distributed:
                dist.destroy_process_group()
            return metrics
    except (ConfigError, DataError, FileNotFoundError, TooFewTokens) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def demo_pictures(setup: Setup, state: TrainState, metrics: dict) -> None:
    evaluated = state.ema.module if state.ema is not None else state.model
    detector = Detector(evaluated, setup.cfg, setup.train_set.category_names, setup.device, setup.cfg.amp)
    saved = save_pictures(detector, setup.val_set, 8, 0.3, setup.output_dir / "vis")
    setup.log(f"demo: AP50 {metrics.get('AP50', 0.0):.3f}, AP {metrics.get('AP', 0.0):.3f} on the generated "
              f"validation split; pictures of the detections in {saved[0].parent}")


if __name__ == "__main__":
    main()
