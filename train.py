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
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from checkpoints import load_pretrained, load_pretrained_backbone, pretrained_architecture, read_checkpoint
from config import Config, ConfigError, make_config
from data import CocoDetection, DataError, collate, make_shapes_dataset, make_transforms, split_paths
from eval import device_from_flag, evaluate, format_metrics, save_pictures
from losses import Criterion
from model import DINO, build_dino
from precision import amp_autocast, amp_dtype
from runs import CheckpointClock, EpochOrder, StopSignals, Stopped, claim_output_dir, data_worker_init

# the demo: a small DINO-4scale on ResNet-18 from scratch, on generated shapes at a quarter of COCO's sizes
DEMO = dict(backbone="r18", hidden_dim=128, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512,
            num_queries=100, dn_number=50, lr=2e-4, lr_backbone=2e-4, batch_size=4, epochs=6, lr_drop=5,
            scale=0.25, num_workers=2)


class NonFiniteLoss(RuntimeError):
    pass


def make_ema(model: DINO, decay: float) -> AveragedModel:
    """Exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights after every
    step: torch's AveragedModel, one foreach lerp over all parameters; ema.module is the averaged DINO.
    It starts from the model's initial weights (n_averaged = 1: AveragedModel would otherwise take the
    first step's weights as they are). Buffers are copied, never averaged: frozen batch-norm statistics
    do not change, and Swin's integer position indices must not."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.n_averaged.fill_(1)
    return ema.requires_grad_(False)


def save_atomically(obj, path: Path):
    """Write to a temporary file beside `path`, then rename: `path` is always a complete checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at_epoch(cfg: Config, epoch: int) -> float:
    """The step schedule as a factor of the base rates: 1, then 0.1 after cfg.lr_drop epochs."""
    return 0.1 if epoch >= cfg.lr_drop else 1.0


def train_step(model, criterion, optimizer, scaler: torch.amp.GradScaler, images: Tensor, mask: Tensor,
               targets: list[dict], cfg: Config) -> dict[str, Tensor]:
    """forward (autocast under --amp), loss terms, weighted sum, backward, clip, step. Returns the terms;
    raises NonFiniteLoss, before the step, if the loss is not finite in any process."""
    with amp_autocast(images.device, cfg.amp):
        outputs = model(images, mask, targets)
    terms = criterion(outputs, targets)  # in float32: the criterion casts the predictions
    loss = terms["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_max_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
    # the one wait for the GPU besides the matching's, once the backward is queued: the GPU stays busy
    # while the host queues it (reading the loss right after the forward would leave it idle meanwhile)
    check = loss.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(check)  # every process stops together
    if not math.isfinite(check.item()):
        raise NonFiniteLoss(f"loss is {check.item()} (this process's terms: "
                            f"{ {k: round(v.item(), 4) for k, v in terms.items()} })")
    scaler.step(optimizer)
    scaler.update()
    return terms


def make_grad_scaler(device: torch.device, cfg: Config) -> torch.amp.GradScaler:
    """Loss scaling, on only where --amp runs in fp16 (GPUs without bf16): bf16 needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.amp) == torch.float16)


def partial(sums: dict, counts: dict) -> dict:
    """An epoch's running loss sums, for a checkpoint written mid-epoch (floats: read back once, here)."""
    return {"sums": {k: float(v) for k, v in sums.items()}, "counts": dict(counts)}


def train_one_epoch(model, criterion, loader, optimizer, cfg: Config, epoch: int, device, ema: AveragedModel | None,
                    scaler: torch.amp.GradScaler, is_main: bool, first: int, total: int, sums: dict, counts: dict,
                    clock: CheckpointClock, save, board=None) -> dict:
    """The epoch's iterations first..total-1 with train_step (the loader yields those). Adds every unweighted
    loss term to sums and counts; writes a checkpoint through save(epoch, next iteration, partial sums)
    when the clock says so, and raises Stopped after one that a signal asked for; `board`, a TensorBoard
    SummaryWriter or None, gets the running means with each progress line. Returns the epoch's mean of
    every term over all processes."""
    model.train()
    start = last_print = time.time()
    done = first  # iterations of this epoch finished
    try:
        for it, (images, mask, targets) in enumerate(loader, start=first):
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            try:
                terms = train_step(model, criterion, optimizer, scaler, images, mask, targets, cfg)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e} at epoch {epoch}, iteration {it}") from None
            if ema is not None:
                ema.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
                counts[name] = counts.get(name, 0) + 1
            done = it + 1
            write, stop = clock.due()
            if done == total:  # the epoch's end writes its checkpoint anyway, and stops there if asked to
                write = stop = False
            if write:
                save(epoch, done, partial(sums, counts))
                clock.written()
            if stop:
                raise clock.stopped(f"at epoch {epoch}, iteration {done} of {total}")
            now = time.time()
            if is_main and (now - last_print > 10 or it + 1 == total):
                last_print = now
                rate = (it + 1 - first) / (now - start)
                main = {k: float(sums[k] / counts[k]) for k in ("loss", "loss_ce", "loss_bbox", "loss_giou")}
                left = (total - it - 1 + (cfg.epochs - epoch - 1) * total) / rate
                if board is not None:
                    step = epoch * total + it + 1
                    for name in sums:
                        board.add_scalar(f"train/{name}", float(sums[name] / counts[name]), step)
                    board.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                    board.add_scalar("train/iterations_per_second", rate, step)
                print(f"epoch {epoch} [{it + 1}/{total}] loss {main['loss']:.3f} (ce {main['loss_ce']:.3f} "
                      f"bbox {main['loss_bbox']:.3f} giou {main['loss_giou']:.3f}) lr {optimizer.param_groups[0]['lr']:.2e} "
                      f"{rate:.2f} it/s, epoch ends in {(total - it - 1) / rate:.0f} s, training in "
                      f"{left / 3600:.1f} h", flush=True)
    except DataError as e:  # an image that cannot be read, found mid-epoch: keep what was trained
        reason = str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")  # from a worker: its traceback
        if not (dist.is_available() and dist.is_initialized()):  # (other processes would wait for this one)
            save(epoch, done, partial(sums, counts))
            reason += f"; the {done} iterations of epoch {epoch} before it are saved: fix the image, then --resume"
        raise DataError(reason) from None
    names = sorted(sums)
    means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) / counts[k] for k in names])
    if dist.is_available() and dist.is_initialized():  # the log holds every process's mean, not rank 0's alone
        dist.all_reduce(means)
        means /= dist.get_world_size()
    return dict(zip(names, means.tolist()))


def build_optimizer(model: DINO, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with two groups as official DINO: the backbone at lr_backbone, everything else at lr.
    On GPUs and CPUs, torch's fused AdamW: one kernel for all parameters instead of a loop over them, and
    no temporaries the size of them."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    return torch.optim.AdamW([{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone}],
                             weight_decay=cfg.weight_decay, fused=rest[0].device.type in ("cuda", "cpu") or None)


def tensorboard_writer(folder: Path | None):
    """TensorBoard's SummaryWriter for `folder` (None: only check that it can be had). TensorBoard is an
    optional dependency: without it, --tensorboard is a one-line error before any work."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs TensorBoard: pip install tensorboard") from None
    return SummaryWriter(str(folder)) if folder is not None else None


def minutes(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="COCO-layout folder: train2017/, val2017/, annotations/instances_{train,val}2017.json")
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
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            hyper.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"default {f.default}")
        else:
            hyper.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=f"default {f.default}")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however run() ends
            return run(parser, args, held)
    except (ConfigError, DataError, FileNotFoundError) as e:  # the user's data, files or flags: one line
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, held: contextlib.ExitStack) -> dict:
    """train.py with parsed flags; returns the last evaluation's metrics."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    if not args.resume:  # every flag checked before any work (a resumed run's, once merged with its saved config)
        make_config(**({**DEMO, **given} if args.demo else given))
    if args.tensorboard:
        tensorboard_writer(None)

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = device_from_flag(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)

    output_dir = Path(args.output_dir or ("demo_output" if args.demo else "outputs"))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (output_dir / "checkpoint.pth").exists():
        args.resume = True  # restarted by torchrun --max-restarts: go on from the checkpoint
        log(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from {output_dir / 'checkpoint.pth'}")
    if args.demo and not args.output_dir and not args.resume:  # a repeated `make demo` keeps the earlier one
        n = 1
        while (output_dir / "checkpoint.pth").exists():
            n += 1
            output_dir = Path(f"demo_output_{n}")
    if (output_dir / "checkpoint.pth").exists() and not args.resume:
        parser.error(f"{output_dir} already holds a run's checkpoint: pass --resume to continue it, "
                     f"or choose another --output-dir")
    refusal = None
    if is_main:  # one run per output folder: rank 0 holds the lock until the process ends
        try:
            held.enter_context(claim_output_dir(output_dir))
        except ConfigError as e:
            refusal = str(e)
    if distributed:  # every process stops if rank 0 was refused
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise ConfigError(refusal)
    if args.demo:
        data_dir = output_dir / "data"
        if is_main and not (data_dir / "annotations" / "instances_val2017.json").exists():
            log(f"generating the shapes dataset in {data_dir}")
            make_shapes_dataset(data_dir)
        if distributed:
            dist.barrier()
        given = {**DEMO, **given}
        args.data = str(data_dir)
    train_paths, val_paths = (split_paths(split, args.data, getattr(args, f"{split}_images"),
                                          getattr(args, f"{split}_json")) for split in ("train", "val"))
    if train_paths is None or val_paths is None:
        parser.error("give --data DIR (COCO layout), or --train-images/--train-json/--val-images/--val-json, or --demo")

    checkpoint_path = output_dir / "checkpoint.pth"
    resumed = None
    if args.resume:
        if not checkpoint_path.exists():
            parser.error(f"--resume: {checkpoint_path} does not exist")
        resumed = read_checkpoint(str(checkpoint_path))
        cfg = make_config(**{**resumed["config"], **given})  # flags given now override the saved ones
    else:
        pretrained = read_checkpoint(args.pretrained) if args.pretrained else None
        saved = pretrained_architecture(pretrained) if pretrained is not None else {}
        cfg = make_config(**{**saved, **given})  # our checkpoint's architecture, unless a flag says otherwise
        if saved:
            log(f"architecture from {args.pretrained}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in saved))
    train_set = CocoDetection(*train_paths, make_transforms(train=True, scale=cfg.scale), log)
    val_set = CocoDetection(*val_paths, make_transforms(train=False, scale=cfg.scale), log)
    if "num_classes" not in given and resumed is None:
        cfg = dataclasses.replace(cfg, num_classes=max(train_set.num_classes, val_set.num_classes))
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    model = build_dino(**dataclasses.asdict(cfg)).to(device)
    if args.pretrained and resumed is None:
        load_pretrained(model, pretrained, args.pretrained, log)
    if args.pretrained_backbone and resumed is None:
        load_pretrained_backbone(model, args.pretrained_backbone, log)
    ema = make_ema(model, cfg.ema_decay) if cfg.ema else None
    evaluated = ema.module if ema is not None else model  # the weights that are evaluated and drawn
    criterion = Criterion(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_at_epoch(cfg, epoch))
    scaler = make_grad_scaler(device, cfg)
    # where training goes on: (epoch, iteration), the epoch's running loss sums, an evaluation still owed
    start_epoch, start_iteration, running, pending, best_ap = 0, 0, None, None, -1.0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["lr_scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed.get("ema") is not None:
            ema.module.load_state_dict(resumed["ema"])
        start_epoch, start_iteration = resumed.get("next", (resumed["epoch"] + 1, 0))
        running, pending, best_ap = resumed.get("partial"), resumed.get("pending"), resumed["best_ap"]
        set_rng_state(resumed["rng"][rank] if rank < len(resumed["rng"]) else resumed["rng"][0])
        log(f"resumed from {checkpoint_path} at epoch {start_epoch}, iteration {start_iteration}")
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True) if distributed else model
    # find_unused_parameters: the denoising label book is unused in a batch without objects

    def loader(dataset, train: bool, epoch: int = 0, skip: int = 0):
        if train:  # an order that a resumed run continues exactly, augmentation included (runs.EpochOrder)
            sampler = EpochOrder(len(dataset), cfg.seed, epoch, rank, world, skip * cfg.batch_size)
        elif distributed:
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
        else:
            sampler = torch.utils.data.SequentialSampler(dataset)
        # evaluation one image at a time, as eval.py: an image padded to its batch's largest is detected a little
        # differently (the demo's AP is 0.528 evaluated in batches of 4, 0.564 one by one), and a checkpoint's
        # AP must not depend on the batches it was evaluated in.
        # Worker seeds from a generator of the loader's own: loading never shifts the training's random stream.
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size if train else 1, sampler=sampler,
                                           drop_last=False, num_workers=cfg.num_workers, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                           worker_init_fn=data_worker_init, pin_memory=device.type == "cuda")

    categories = {c: train_set.coco.cats[c]["name"] for c in train_set.coco.cats}

    def iterations(epoch: int) -> int:
        return len(loader(train_set, True, epoch))

    def save(epoch: int, iteration: int, partial: dict | None = None, pending: dict | None = None):
        """Write checkpoint.pth (rank 0; every process calls it, for the random states): training goes on at
        `iteration` of `epoch` (the next epoch's first when the epoch is done), with its running loss sums
        `partial`; `pending`, the epoch's log record whose evaluation has not finished yet."""
        done = iteration == iterations(epoch)
        rng = [None] * world
        if distributed:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if is_main:
            save_atomically({"model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                             "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch, "config": dataclasses.asdict(cfg),
                             "categories": categories, "rng": rng, "best_ap": best_ap,
                             "next": (epoch + 1, 0) if done else (epoch, iteration),
                             "partial": None if done else partial, "pending": pending}, checkpoint_path)

    def evaluate_and_save(epoch: int, record: dict) -> dict:
        """Evaluate the finished `epoch` (when its record says it is due), write the checkpoint again, now
        with no evaluation owed, keep it as best.pth if its AP is the best, append the record to log.jsonl."""
        nonlocal best_ap
        metrics, best = {}, False
        if record.pop("evaluate"):
            metrics = evaluate(evaluated, loader(val_set, False), device, cfg.num_select, cfg.amp) or {}  # rank 0's
            if is_main:
                log(format_metrics(metrics))
                record["val"] = metrics
            best = is_main and metrics["AP"] > best_ap
            best_ap = max(best_ap, metrics.get("AP", best_ap))
        save(epoch, iterations(epoch))
        if best:
            shutil.copyfile(checkpoint_path, output_dir / "best.pth")
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if is_main:
            with open(output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics

    log(f"DINO-4scale {cfg.backbone}, {cfg.num_classes} classes, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; {len(train_set)} training / {len(val_set)} validation images; {world} process(es) on {device}")
    metrics = {}
    if pending is not None:  # the last run stopped after an epoch's checkpoint, before its evaluation ended
        metrics = evaluate_and_save(start_epoch - 1, pending)
    signals = held.enter_context(StopSignals(log))
    board = held.enter_context(tensorboard_writer(output_dir / "tensorboard")) if args.tensorboard and is_main else None
    clock = CheckpointClock(args.checkpoint_minutes, signals, device)
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        skip = start_iteration if epoch == start_epoch else 0
        sums, counts = (dict(running["sums"]), dict(running["counts"])) if skip and running else ({}, {})
        try:
            losses = train_one_epoch(train_model, criterion, loader(train_set, True, epoch, skip), optimizer, cfg,
                                     epoch, device, ema, scaler, is_main, skip, iterations(epoch), sums, counts,
                                     clock, save, board)
            record = {"epoch": epoch, "train": losses, "lr": optimizer.param_groups[0]["lr"],  # this epoch's
                      "seconds": time.time() - epoch_start,
                      "evaluate": (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs}
            scheduler.step()
            save(epoch, iterations(epoch), pending=dict(record))  # before the evaluation, which then cannot lose it
            metrics = evaluate_and_save(epoch, record) or metrics
            clock.written()
            if board is not None:  # the epoch's means and its AP, at the step the epoch ended
                step = (epoch + 1) * iterations(epoch)
                for name, value in losses.items():
                    board.add_scalar(f"epoch/{name}", value, step)
                for name, value in record.get("val", {}).items():
                    if name != "per_class_AP":
                        board.add_scalar(f"val/{name}", value, step)
            if clock.due()[1] and epoch + 1 < cfg.epochs:  # a stop asked for during the epoch's last step or evaluation
                raise clock.stopped(f"after epoch {epoch}")
        except NonFiniteLoss as e:
            kept = f"the last good checkpoint, {checkpoint_path}, is kept" if checkpoint_path.exists() else "no checkpoint yet"
            log(f"stopping: {e}; {kept}")
            sys.exit(1)
        except Stopped as e:
            log(f"{e}; checkpoint written to {checkpoint_path}: resume with the same command and --resume")
            sys.exit(e.exit_code)
    if is_main and args.demo:
        saved = save_pictures(evaluated, cfg, val_set, 8, 0.3, output_dir / "vis", device, cfg.amp)
        log(f"demo: AP50 {metrics.get('AP50', 0.0):.3f}, AP {metrics.get('AP', 0.0):.3f} on the generated validation "
            f"split; pictures of the detections in {saved[0].parent}")
    if distributed:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
