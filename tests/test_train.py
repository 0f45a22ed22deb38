import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from appendix.checkpoints import read_checkpoint
from config import Config
from conftest import TINY, tiny_dino, tiny_flags
from data import make_shapes_dataset
from appendix.runs import TrainState

ROOT = Path(__file__).resolve().parents[1]
# the tiny model, trained fast on small images
FLAGS = tiny_flags() + ["--scale", "0.1", "--batch-size", "2", "--num-workers", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2, size=(64, 96))


def run(shapes, output_dir, *extra):
    return train.main(["--data", str(shapes), "--output-dir", str(output_dir), *FLAGS, *extra])


def test_every_config_field_is_a_flag():
    """Each field of Config, with a value other than its default, parsed from its flag; unset flags are absent
    (they keep the default, or a resumed run's saved value)."""
    parser = train.build_parser()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            value, argv = not f.default, [flag if not f.default else "--no-" + flag[2:]]
        else:
            value = "gelu" if isinstance(f.default, str) else f.default + 3  # not the default, of its type
            argv = [flag, str(value)]
        assert getattr(parser.parse_args(argv), f.name) == value, flag
    assert not any(hasattr(parser.parse_args([]), f.name) for f in dataclasses.fields(Config))


def test_two_iteration_training_run_writes_checkpoint_log_and_metrics(shapes, tmp_path):
    metrics = run(shapes, tmp_path, "--epochs", "1")
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    checkpoint = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert checkpoint["epoch"] == 0 and checkpoint["config"]["hidden_dim"] == 64
    assert checkpoint["config"]["num_classes"] == 4  # from the data: category ids 1..3
    assert checkpoint["categories"] == {1: "square", 2: "circle", 3: "triangle"}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"loss", "loss_ce", "loss_bbox_dn", "loss_giou_interm"} <= set(log[0]["train"])
    assert "AP" in log[0]["val"]
    assert (tmp_path / "best.pth").exists() and json.loads((tmp_path / "metrics.json").read_text())["AP"] == metrics["AP"]
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [  # the best model's evaluation, the curves
        "confusion_matrix.png", "per_class_ap.png", "pr_curves.png", "predictions.jpg", "training.png"]


def test_without_matplotlib_training_says_so_once_and_goes_on(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run(shapes, tmp_path, "--epochs", "1")
    assert capsys.readouterr().out.count("plots need matplotlib: pip install matplotlib: no plots in this run") == 1
    assert (tmp_path / "best.pth").exists() and not (tmp_path / "plots").exists()


def test_training_evaluates_one_image_at_a_time_as_eval_py(shapes, tmp_path, monkeypatch):
    """A padded batch changes the detections a little: the AP in log.jsonl must be what eval.py (--batch-size 1
    by default) gives for the checkpoint."""
    calls, evaluate = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, loader, *a: calls.append((loader.batch_size, a[-1]))
                        or evaluate(model, loader, *a))
    run(shapes, tmp_path, "--epochs", "1")  # FLAGS train at batch size 2
    assert calls == [(1, [1, 2, 3])]  # one image at a time, detecting the data's category ids alone


def test_patience_stops_when_ap_has_not_improved_for_that_many_evaluations(shapes, tmp_path, monkeypatch, capsys):
    from eval import METRIC_NAMES, coco_metrics
    aps = iter([0.1, 0.3, 0.2, 0.4, 0.35, 0.4, 0.9, 0.9, 0.9])  # the best at epochs 0, 1, 3; 4 and 5 no better
    evaluated = []
    def evaluate(model, loader, *args):  # the metrics of no detections, with the AP of the list
        evaluated.append(next(aps))
        return {**coco_metrics(loader.dataset.coco, [], loader.dataset.ids), **dict.fromkeys(METRIC_NAMES, evaluated[-1])}
    monkeypatch.setattr(train, "evaluate", evaluate)
    run(shapes, tmp_path, "--epochs", "9", "--patience", "2")
    assert evaluated == [0.1, 0.3, 0.2, 0.4, 0.35, 0.4]  # equal is no better
    out = capsys.readouterr().out
    assert "stopping early, before epoch 6: AP has not improved for 2 evaluations (--patience 2); the best, AP 0.400" in out
    assert read_checkpoint(str(tmp_path / "best.pth"))["epoch"] == 3
    run(shapes, tmp_path, "--resume", "--patience", "2")  # stays stopped
    assert len(evaluated) == 6 and "stopping early, before epoch 6" in capsys.readouterr().out
    run(shapes, tmp_path, "--resume", "--patience", "3")  # more patience: on, to the end or the next stall
    assert evaluated == [0.1, 0.3, 0.2, 0.4, 0.35, 0.4, 0.9, 0.9, 0.9]


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(shapes, tmp_path):
    run(shapes, tmp_path / "straight", "--epochs", "3", "--eval-every", "5")
    run(shapes, tmp_path / "resumed", "--epochs", "2", "--eval-every", "5")
    run(shapes, tmp_path / "resumed", "--epochs", "3", "--eval-every", "5", "--resume")
    straight = [json.loads(l) for l in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for a, b in zip(straight, resumed):
        assert a["train"] == b["train"] and a["lr"] == b["lr"]
    assert "val" in straight[-1] and straight[-1]["val"]["AP"] == resumed[-1]["val"]["AP"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    run(shapes, tmp_path, "--epochs", "1")
    good = (tmp_path / "checkpoint.pth").read_bytes()

    class Exploding(train.Criterion):
        def __call__(self, outputs, targets, padded=None):
            terms = super().__call__(outputs, targets, padded)
            terms["loss"] = terms["loss"] * float("nan")
            return terms
    monkeypatch.setattr(train, "criterion_for", Exploding)
    with pytest.raises(SystemExit) as exit_info:
        run(shapes, tmp_path, "--epochs", "2", "--resume")
    assert exit_info.value.code == 1
    assert "the loss or a gradient was not finite at the last step, which was not taken" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


def test_fine_tuning_from_a_checkpoint_with_other_classes(shapes, tmp_path, capsys):
    source = tiny_dino(num_classes=91)
    torch.save({"model": source.state_dict()}, tmp_path / "coco.pth")
    run(shapes, tmp_path / "out", "--epochs", "1", "--pretrained", str(tmp_path / "coco.pth"))
    assert "has 91 classes, this model 4: re-initialised class_head.bias" in capsys.readouterr().out
    tuned = read_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))["model"]
    assert tuned["class_head.weight"].shape == (4, 64)


def test_ema_amp_and_backbone_checkpointing_on_the_cpu(shapes, tmp_path):
    run(shapes, tmp_path, "--epochs", "1", "--ema", "--ema-decay", "0.5", "--amp", "--backbone-checkpointing")
    checkpoint = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert checkpoint["ema"] is not None
    assert not torch.equal(checkpoint["ema"]["level_embed"], checkpoint["model"]["level_embed"])


def test_distributed_training_with_two_processes(shapes, tmp_path):
    """torchrun, gloo on the CPU: both processes train, only rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), "--data", str(shapes), "--output-dir", str(tmp_path),
                             "--device", "cpu", *FLAGS, "--epochs", "1"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    assert read_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 0


def test_train_step_benchmark_runs(tmp_path):
    """bench/train_step.py end to end on a toy configuration (its real figures need a GPU)."""
    common = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--backbone", "r18", "--scale", "0.1",
              "--iters", "1", "--device", "cpu", "--set", *[f"{k}={v}" for k, v in TINY.items() if k != "backbone"]]
    result = subprocess.run(common + ["--batch-size", "1", "--only", "bf16 + all ckpt"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bf16 + all ckpt" in result.stdout and "images/s" in result.stdout
    result = subprocess.run(common + ["--inference"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "inference batch 1, bf16" in result.stdout


def test_a_new_run_never_overwrites_an_earlier_one(shapes, tmp_path):
    run(shapes, tmp_path, "--epochs", "1")
    with pytest.raises(SystemExit):
        run(shapes, tmp_path, "--epochs", "1")
    assert read_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 0


def tiny_training_step():
    """(train_step's arguments) for a small DINO on two images, one of them padded."""
    from config import make_config
    from losses import Criterion

    cfg = make_config(**{**TINY, "dec_layers": 3, "num_classes": 5})
    model = tiny_dino(dec_layers=3).train()
    criterion, optimizer = Criterion(cfg), train.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 80:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return model, criterion, optimizer, scaler, images, mask, targets, cfg


def test_a_training_step_makes_no_float64_tensor():
    """float64 is slow on GPUs; the matching's costs travel in float32 and scipy widens them on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float64Ops(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in torch.utils._pytree.tree_leaves(out)):
                self.found.append(func.overloadpacket.__name__)
            return out
    step = tiny_training_step()
    with Float64Ops() as mode:
        train.train_step(*step)
    assert mode.found == []


def test_a_training_step_reads_back_from_the_device_only_after_the_matching(monkeypatch):
    """On a GPU every read of a tensor's value by the host (item, tolist, bool, float, cpu, numpy) waits
    for all queued work. A training step reads twice, both at the one point where it must wait anyway:
    the matching's costs, in one transfer for every decoder layer and the proposals, and right after it
    whether the step before was skipped for a loss that was not finite (computed long before). Counted
    here on the CPU, where the same calls are made, by their caller; the second step reuses the level
    layout."""
    step = tiny_training_step()
    train.train_step(*step)  # makes the level layout

    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            file = Path(caller.f_code.co_filename)
            # ours, not torch's optimizer's (host-side steps); and not the attention reference's, which
            # a GPU replaces by the kernel
            if file.is_relative_to(ROOT) and "site-packages" not in file.parts and caller.f_code.co_name != "ms_deform_attn_reference":
                reads.append((file.name, caller.f_code.co_name, name))
            return original(self, *args, **kwargs)
        return read
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    train.train_step(*step)
    monkeypatch.undo()
    assert reads == [("matcher.py", "hungarian_assign", "cpu"),
                     ("matcher.py", "hungarian_assign", "numpy"),  # of the host copy
                     ("safe_step.py", "raise_if_skipped", "item")]


def test_a_step_with_a_gradient_that_is_not_finite_is_not_taken_and_the_next_one_raises():
    """A finite loss whose backward makes one gradient NaN: clip_grad_norm_'s total is NaN, the fused AdamW
    skips the step on the device (no weight, no moment, no step count changes), the next step raises."""
    model, criterion, optimizer, scaler, images, mask, targets, cfg = step = tiny_training_step()
    train.train_step(*step)  # the optimiser's state exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    hook = model.class_head.bias.register_hook(lambda grad: grad * float("nan"))
    train.train_step(*step)
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(moments, optimizer.state.values()) for k in a)
    with pytest.raises(train.NonFiniteLoss, match="not finite at the last step, which was not taken"):
        train.train_step(*step)


def test_ema_starts_from_the_initial_weights_and_moves_by_one_minus_the_warmed_up_decay():
    """Step t moves the average by 1 - d_t, d_t = decay * (1 - exp(-t / EMA_WARMUP)); decay 0.9, not 0.5:
    swapping the weights of the average would show."""
    model = tiny_dino()
    ema = train.make_ema(model, decay=0.9)
    expected = model.level_embed.detach().clone()
    for t in (1, 2, 3):
        with torch.no_grad():
            model.level_embed.add_(1.0)
            model.backbone.body.bn1.running_mean.add_(3.0)  # a buffer: copied, not averaged
        ema.update_parameters(model)
        d = 0.9 * (1 - math.exp(-t / train.EMA_WARMUP))
        expected = d * expected + (1 - d) * model.level_embed.detach()
        torch.testing.assert_close(ema.module.level_embed, expected)
    assert torch.equal(ema.module.backbone.body.bn1.running_mean, model.backbone.body.bn1.running_mean)
    assert not any(p.requires_grad for p in ema.parameters())


def test_the_ema_reaches_its_decay_after_the_warm_up():
    model = tiny_dino()
    ema = train.make_ema(model, decay=0.9)
    ema.n_averaged.fill_(50 * train.EMA_WARMUP)
    initial = model.level_embed.detach().clone()
    with torch.no_grad():
        model.level_embed.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.level_embed, 0.9 * initial + 0.1 * model.level_embed)


def test_a_checkpoint_keeps_the_steps_the_ema_has_averaged():
    """The warm-up goes on where it stopped: a resumed run's average is the uninterrupted one's."""
    def state():
        model = tiny_dino()
        optimizer = train.build_optimizer(model, Config())
        return TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
                          torch.amp.GradScaler("cpu", enabled=False), train.make_ema(model, 0.9997))
    saved, resumed = state(), state()
    for _ in range(3):
        saved.ema.update_parameters(saved.model)
    resumed.restore(saved.contents({}, {}, is_main=True), rank=0)
    assert resumed.ema.n_averaged.item() == 4
    with torch.no_grad():
        saved.model.level_embed.add_(1.0)
        resumed.model.level_embed.add_(1.0)
    saved.ema.update_parameters(saved.model)
    resumed.ema.update_parameters(resumed.model)
    assert torch.equal(saved.ema.module.level_embed, resumed.ema.module.level_embed)


@pytest.mark.parametrize("flags, message", [
    (["--num-queries", "0"], "--num-queries must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--scale", "0"], "--scale must be > 0, got 0.0"),
    (["--hidden-dim", "48"], "--hidden-dim must be a positive multiple of 32"),
    (["--device", "gpu7"], "--device 'gpu7' is no device torch knows"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA GPU is available here")]))
def test_bad_flags_stop_before_any_work_with_one_line(shapes, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_broken_annotation_file_stops_training_with_one_line(shapes, tmp_path, capsys):
    data = json.loads((shapes / "annotations" / "instances_train2017.json").read_text())
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--train-images", str(shapes / "train2017"), "--train-json", str(bad),
                    "--val-images", str(shapes / "val2017"), "--val-json", str(shapes / "annotations" / "instances_val2017.json"),
                    "--output-dir", str(tmp_path / "out"), *FLAGS])
    assert exit_info.value.code == 2
    assert f"{bad}: annotation id {data['annotations'][0]['id']} appears twice" in capsys.readouterr().err


def test_fine_tuning_from_our_checkpoint_takes_its_architecture(shapes, tmp_path, capsys):
    run(shapes, tmp_path / "a", "--epochs", "1", "--enc-layers", "1", "--num-queries", "20")
    capsys.readouterr()
    data_only = ["--scale", "0.1", "--batch-size", "2", "--num-workers", "0", "--epochs", "1"]  # no architecture flag
    train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "b"), *data_only,
                "--pretrained", str(tmp_path / "a" / "checkpoint.pth")])
    out = capsys.readouterr().out
    assert f"architecture from {tmp_path / 'a' / 'checkpoint.pth'}: backbone r18, hidden_dim 64" in out
    assert read_checkpoint(str(tmp_path / "b" / "checkpoint.pth"))["config"]["enc_layers"] == 1
    with pytest.raises(SystemExit):  # a flag that contradicts the weights: the error names the file
        train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "c"), *data_only, "--hidden-dim", "96",
                    "--nheads", "4", "--pretrained", str(tmp_path / "a" / "checkpoint.pth")])
    assert f"{tmp_path / 'a' / 'checkpoint.pth'} does not fit this model" in capsys.readouterr().err


def test_tensorboard_gets_every_loss_term_the_lr_speed_and_ap(shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(shapes, tmp_path, "--epochs", "1", "--tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_giou_dn", "train/lr", "train/iterations_per_second", "epoch/loss_ce",
            "val/AP", "val/AP50"} <= tags


def test_tensorboard_missing_is_one_line_before_any_work(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit):
        run(shapes, tmp_path / "out", "--tensorboard")
    assert "--tensorboard needs TensorBoard: pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_flag_given_with_resume_takes_effect_and_is_saved(shapes, tmp_path, capsys):
    """--lr and --epochs may change on --resume: the log says so, the next epoch trains at the new rate, and
    the checkpoint's config is what the run does."""
    run(shapes, tmp_path, "--epochs", "1")
    run(shapes, tmp_path, "--epochs", "2", "--lr", "5e-4", "--resume")
    assert "--resume with --lr 0.001 -> 0.0005, --epochs 1 -> 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [1e-3, 5e-4]
    checkpoint = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert checkpoint["config"]["lr"] == 5e-4 and checkpoint["optimizer"]["param_groups"][0]["lr"] == 5e-4


@pytest.mark.parametrize("flags, named", [(["--num-queries", "20"], "--num-queries"),
                                          (["--batch-size", "1"], "--batch-size")])
def test_a_flag_that_would_make_another_run_is_refused_on_resume(shapes, tmp_path, capsys, flags, named):
    run(shapes, tmp_path, "--epochs", "1")
    with pytest.raises(SystemExit) as exit_info:
        run(shapes, tmp_path, "--epochs", "2", "--resume", *flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume: {named} cannot change in a resumed run" in err and "--pretrained" in err


def edited_copy(shapes, folder, split, change):
    """A copy of the shapes dataset with change(data) applied to the split's annotation file."""
    import shutil
    shutil.copytree(shapes, folder)
    path = folder / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return folder


def rename_category(data, old, new, name):
    data["categories"] = [{**c, "id": new, "name": name} if c["id"] == old else c for c in data["categories"]]
    for a in data["annotations"]:
        a["category_id"] = new if a["category_id"] == old else a["category_id"]


@pytest.mark.parametrize("split, change, flags, message", [
    ("val", lambda d: None, ["--num-classes", "3"],
     "--num-classes 3 is too small for category id 3 of the data .* it must be at least 4"),
    ("train", lambda d: rename_category(d, 3, 10**9, "triangle"), [],
     r"instances_train2017.json: category id 1000000000 \('triangle'\) would need a class head of 1000000001 outputs"),
    ("val", lambda d: rename_category(d, 3, 3, "wedge"), [],
     "category id 3 is 'triangle' in .*instances_train2017.json but 'wedge' in .*instances_val2017.json"),
    ("val", lambda d: d["categories"].append({"id": -1, "name": "x"}), [], "category id -1 is negative"),
], ids=["num-classes too small", "huge category id", "renamed category", "negative category id"])
def test_categories_that_do_not_fit_stop_before_training_with_one_line(shapes, tmp_path, capsys, split, change, flags,
                                                                      message):
    data = edited_copy(shapes, tmp_path / "data", split, change)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(data), "--output-dir", str(tmp_path / "out"), *FLAGS, *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_validation_categories_never_trained_on_are_named_before_training(shapes, tmp_path, capsys):
    def only_squares_and_circles(data):
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]
    data = edited_copy(shapes, tmp_path / "data", "train", only_squares_and_circles)
    train.main(["--data", str(data), "--output-dir", str(tmp_path / "out"), *FLAGS, "--epochs", "1"])
    out = capsys.readouterr().out
    warning = "warning: validation categories 'triangle' have no training annotations"
    assert warning in out and out.index(warning) < out.index("epoch 0 [")
