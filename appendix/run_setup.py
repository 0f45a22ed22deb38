"""A training run's set-up (not in the paper): what train.py does before its first step.

Processes (one per GPU under torchrun), the output folder (locked for the run; a restarted torchrun resumes),
the data (COCO, YOLO or VOC; the demo's generated shapes made first) and its checks against the config (the
class head holds every category id, the two files name each id alike), the config itself (a resumed run's saved
one, with the flags that may change; a pretrained checkpoint's architecture), and `Setup`, which holds it all
for the epoch loop and makes its data loaders.
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from appendix import plots
from appendix.checkpoints import pretrained_architecture, read_checkpoint
from appendix.inference import check_scale, device_from_flag
from appendix.progress import tensorboard_writer
from appendix.runs import EpochOrder, TrainState, claim_output_dir, data_worker_init, save_atomically
from appendix.static_shapes import bucket_step
from config import CHANGEABLE_ON_RESUME, MAX_CLASSES, Config, ConfigError, flag, make_config
from data import CocoDetection, DataError, collate, make_shapes_dataset, make_transforms, split_paths


@dataclass
class Setup:
    """How a run is set up, fixed for its whole length: what the epoch loop reads and never changes.
    (What it changes, and a checkpoint keeps, is runs.TrainState.)"""
    cfg: Config
    device: torch.device
    output_dir: Path
    rank: int
    world: int
    distributed: bool
    train_set: CocoDetection
    val_set: CocoDetection
    log: Callable
    plots: bool = False  # OUTPUT_DIR/plots/ (rank 0, where matplotlib is installed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pth"

    @property
    def iterations(self) -> int:
        """Training iterations per epoch, in every process."""
        samples = len(EpochOrder(len(self.train_set), self.cfg.seed, 0, self.rank, self.world))
        return math.ceil(samples / self.cfg.batch_size)

    def loader(self, train: bool, epoch: int = 0, skip: int = 0) -> torch.utils.data.DataLoader:
        """The training batches of `epoch` from iteration `skip` on, in an order that a resumed run continues
        exactly, augmentation included (runs.EpochOrder); or the validation set, one image at a time, as
        eval.py: an image padded to its batch's largest is detected a little differently (the demo's AP is
        0.528 evaluated in batches of 4, 0.564 one by one), and a checkpoint's AP must not depend on the
        batches it was evaluated in. Worker seeds come from a generator of the loader's own: loading never
        shifts the training's random stream."""
        cfg = self.cfg
        if train:
            sampler = EpochOrder(len(self.train_set), cfg.seed, epoch, self.rank, self.world, skip * cfg.batch_size)
        elif self.distributed:
            sampler = torch.utils.data.DistributedSampler(self.val_set, shuffle=False)
        else:
            sampler = torch.utils.data.SequentialSampler(self.val_set)
        fixed = functools.partial(collate, multiple=bucket_step(cfg.scale)) if train and cfg.compile else collate
        return torch.utils.data.DataLoader(self.train_set if train else self.val_set, sampler=sampler,
                                           batch_size=cfg.batch_size if train else 1, collate_fn=fixed,
                                           num_workers=cfg.num_workers, worker_init_fn=data_worker_init,
                                           generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                           pin_memory=self.device.type == "cuda")

    def contents(self, state: TrainState) -> dict | None:
        """The checkpoint of `state` with this run's config and category names (rank 0; every process calls it)."""
        return state.contents(dataclasses.asdict(self.cfg), self.train_set.category_names, self.is_main)

    def save(self, state: TrainState) -> None:
        """checkpoint.pth from `state` (every process calls it)."""
        checkpoint = self.contents(state)
        if checkpoint is not None:
            save_atomically(checkpoint, self.checkpoint_path)


def start_processes(device_flag: str) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, distributed): under torchrun, one process group, one GPU per process."""
    device = device_from_flag(device_flag)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not distributed:
        return device, 0, 1, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), True


def claim_output(parser: argparse.ArgumentParser, args: argparse.Namespace, is_main: bool,
                 held: contextlib.ExitStack, log) -> Path:
    """The output folder, locked for this run (rank 0 holds the lock until the process ends); sets
    args.resume when torchrun restarted the run. Refuses a folder that holds another run's checkpoint."""
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
    if is_main:
        try:
            held.enter_context(claim_output_dir(output_dir))
        except ConfigError as e:
            refusal = str(e)
    if dist.is_available() and dist.is_initialized():  # every process stops if rank 0 was refused
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise ConfigError(refusal)
    return output_dir


def data_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, output_dir: Path, is_main: bool, log):
    """(train, val) (image folder, annotation file) pairs; the demo's generated dataset made first."""
    if args.demo:
        data_dir = output_dir / "data"
        if is_main and not (data_dir / "annotations" / "instances_val2017.json").exists():
            log(f"generating the shapes dataset in {data_dir}")
            make_shapes_dataset(data_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        args.data = str(data_dir)
    paths = [split_paths(split, args.data, getattr(args, f"{split}_images"), getattr(args, f"{split}_json"))
             for split in ("train", "val")]
    if None in paths:
        parser.error("give --data DIR (COCO layout), or --train-images/--train-json/--val-images/--val-json, or --demo")
    return paths


def run_config(given: dict, resumed: dict | None, pretrained: dict | None, args: argparse.Namespace, log) -> Config:
    """The flags given over a resumed run's saved config, or over a pretrained checkpoint's architecture."""
    if resumed is not None:
        saved = resumed["config"]
        changed = {k: v for k, v in given.items() if saved.get(k) != v}
        refused = [k for k in changed if k not in CHANGEABLE_ON_RESUME]
        if refused:
            raise ConfigError(f"--resume: {', '.join(flag(k) for k in refused)} cannot change in a resumed run (it "
                              f"was {', '.join(str(saved.get(k)) for k in refused)}); drop the flag, or start a new "
                              f"run from its weights: --pretrained {args.output_dir or 'OUTPUT_DIR'}/checkpoint.pth")
        if changed:
            log("--resume with " + ", ".join(f"{flag(k)} {saved.get(k)} -> {v}" for k, v in changed.items()))
        return make_config(**{**saved, **changed})
    saved = pretrained_architecture(pretrained) if pretrained is not None else {}
    cfg = make_config(**{**saved, **given})  # our checkpoint's architecture, unless a flag says otherwise
    if saved:
        log(f"architecture from {args.pretrained}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in saved))
    return cfg


def check_category_ids(*datasets: CocoDetection) -> int:
    """The number of classes the datasets' category ids need (the largest id + 1: ids are class indices)."""
    largest, where = max(((max(d.coco.cats, default=0), d) for d in datasets), key=lambda pair: pair[0])
    if largest + 1 > MAX_CLASSES:
        raise DataError(f"{where.ann_file}: category id {largest} ('{where.coco.cats[largest]['name']}') would need a "
                        f"class head of {largest + 1} outputs (category ids are the class indices): number the "
                        f"categories 1..{len(where.coco.cats)}")
    return largest + 1


def check_categories(cfg: Config, needed: int, train_set: CocoDetection, val_set: CocoDetection, log) -> None:
    """Before training: the class head holds every category id (`needed` classes, check_category_ids); the
    two files name each id alike; a warning for validation categories that the training data never shows
    (the model cannot learn them: AP 0)."""
    if cfg.num_classes < needed:
        raise ConfigError(f"--num-classes {cfg.num_classes} is too small for category id {needed - 1} of the data "
                          f"(category ids are the class indices): it must be at least {needed}")
    train_cats, val_cats = train_set.coco.cats, val_set.coco.cats
    for c in sorted(train_cats.keys() & val_cats.keys()):
        if train_cats[c].get("name") != val_cats[c].get("name"):
            raise DataError(f"category id {c} is {train_cats[c].get('name')!r} in {train_set.ann_file} but "
                            f"{val_cats[c].get('name')!r} in {val_set.ann_file}: the files number their categories "
                            f"differently")
    unseen = sorted({a["category_id"] for a in val_set.coco.anns.values()}
                    - {a["category_id"] for a in train_set.coco.anns.values()})
    if unseen:
        log(f"warning: validation categories {', '.join(repr(val_cats[c]['name']) for c in unseen)} have no "
            f"training annotations: the model cannot learn them, and their AP will be 0")


def set_up(parser: argparse.ArgumentParser, args: argparse.Namespace, given: dict, held: contextlib.ExitStack):
    """Setup, and the resumed checkpoint or the pretrained one (None if neither), for train.py's flags `args`
    and the Config fields `given` (the flags given, over the demo's); every flag is checked before any work."""
    if not args.resume:  # (a resumed run's flags are checked once merged with its saved config)
        make_config(**given)
    if args.tensorboard:
        tensorboard_writer(None)
    device, rank, world, distributed = start_processes(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    output_dir = claim_output(parser, args, rank == 0, held, log)
    train_paths, val_paths = data_paths(parser, args, output_dir, rank == 0, log)
    resumed = pretrained = None
    if args.resume:
        if not (output_dir / "checkpoint.pth").exists():
            parser.error(f"--resume: {output_dir / 'checkpoint.pth'} does not exist")
        resumed = read_checkpoint(str(output_dir / "checkpoint.pth"))
    elif args.pretrained:
        pretrained = read_checkpoint(args.pretrained)
    cfg = run_config(given, resumed, pretrained, args, log)
    train_set = CocoDetection(*train_paths, make_transforms(train=True, scale=cfg.scale), log)
    val_set = CocoDetection(*val_paths, make_transforms(train=False, scale=cfg.scale), log)
    needed = check_category_ids(train_set, val_set)
    if "num_classes" not in given and resumed is None:
        cfg = dataclasses.replace(cfg, num_classes=needed)
    check_categories(cfg, needed, train_set, val_set, log)
    check_scale(cfg, " (or fewer --num-queries)")
    setup = Setup(cfg, device, output_dir, rank, world, distributed, train_set, val_set, log,
                  plots=rank == 0 and plots_available(log))
    return setup, resumed or pretrained


def plots_available(log) -> bool:
    try:
        plots.require_matplotlib()
        return True
    except ConfigError as e:
        log(f"{e}: no plots in this run")
        return False
