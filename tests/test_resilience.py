"""Runs that survive: a stop on SIGTERM or Ctrl-C, a kill -9, a failing evaluation, a corrupt image and a
torchrun restart each lose at most the work since the last checkpoint, and a resumed run then gives
exactly the losses of one that never stopped (mid-epoch, batch 2, 2 data workers)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from appendix.checkpoints import read_checkpoint
from conftest import tiny_flags
from data import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
FLAGS = tiny_flags() + ["--scale", "0.1", "--batch-size", "2", "--num-workers", "2", "--lr", "1e-3", "--epochs", "2",
                        "--eval-every", "2"]  # 4 iterations an epoch on 8 images


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, size=(64, 96))


@pytest.fixture(scope="module")
def straight_run(shapes, tmp_path_factory):
    """The output folder of a run that never stopped, and a copy of the folder as it stood at each write
    of its last epoch's end: just before the file was renamed into place (its temporary file written),
    and at the end."""
    out = tmp_path_factory.mktemp("straight")
    snapshots, rename = [], os.replace

    def snapshot_then_rename(source, destination):
        if Path(destination).parent == out:
            last_epoch_done = Path(destination).name == "checkpoint.pth" and read_checkpoint(source)["next"] == (2, 0)
            if snapshots or last_epoch_done:
                snapshots.append((Path(destination).name, copy_of(out, tmp_path_factory)))
        rename(source, destination)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", snapshot_then_rename)
        train.main(["--data", str(shapes), "--output-dir", str(out), *FLAGS])
    return out, snapshots + [("", copy_of(out, tmp_path_factory))]


def copy_of(folder: Path, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("snapshot") / "out"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


@pytest.fixture(scope="module")
def straight(straight_run):
    """The log of a run that never stopped."""
    return read_log(straight_run[0])


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def same_losses(log: list[dict], straight: list[dict]):
    assert [r["epoch"] for r in log] == [r["epoch"] for r in straight]
    for r, s in zip(log, straight):
        assert r["train"] == s["train"]  # exactly: the same batches, augmentations and random draws


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_mid_epoch_then_resume_gives_the_losses_of_a_run_that_never_stopped(shapes, straight, tmp_path, signum,
                                                                                 monkeypatch, capsys):
    steps = []
    real_step = train.train_step

    def step_then_signal(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:  # the third iteration of epoch 0
            os.kill(os.getpid(), signum)
        return terms
    monkeypatch.setattr(train, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS])
    assert exit_info.value.code == 128 + signum and len(steps) == 3  # the step finished, no further
    out = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} at epoch 0, iteration 3 of 4" in out
    assert "resume with the same command and --resume" in out
    checkpoint = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert checkpoint["next"] == (0, 3) and checkpoint["partial"]["counts"]["loss"] == 3
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS, "--resume"])
    assert "resumed from" in capsys.readouterr().out
    same_losses(read_log(tmp_path), straight)


def test_a_run_killed_mid_epoch_resumes_where_its_last_checkpoint_was(shapes, straight, tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(shapes), "--output-dir", str(tmp_path),
               *FLAGS, "--checkpoint-minutes", "0.00001"]  # a checkpoint after every step
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (tmp_path / "checkpoint.pth").exists() and read_checkpoint(str(tmp_path / "checkpoint.pth"))["next"] >= (0, 2):
            break
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    position = tuple(read_checkpoint(str(tmp_path / "checkpoint.pth"))["next"])
    assert position >= (0, 2) and position < (2, 0)  # stopped mid-run, after at least two steps
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {position[0]}, iteration {position[1]}" in resumed.stdout  # nothing before it redone
    same_losses(read_log(tmp_path), straight)


def test_an_evaluation_that_fails_loses_no_training(shapes, straight, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("evaluation crashed")
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS])
    checkpoint = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert checkpoint["next"] == (2, 0) and checkpoint["pending"]["epoch"] == 1  # trained, evaluation owed
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    metrics = train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS, "--resume"])
    log = read_log(tmp_path)
    assert "AP" in metrics and "val" in log[-1] and log[-1]["epoch"] == 1
    same_losses(log, straight)
    assert read_checkpoint(str(tmp_path / "checkpoint.pth"))["pending"] is None


def test_a_corrupt_image_mid_epoch_stops_with_its_name_and_the_progress_kept(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    train_json = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    bad = data / "train2017" / train_json["images"][5]["file_name"]
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8 not a JPEG")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(data), "--output-dir", str(tmp_path / "out"), *FLAGS])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "are saved: fix the image, then --resume" in err and len(err.strip().splitlines()) == 1
    position = tuple(read_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))["next"])
    assert position[0] == 0
    bad.write_bytes(good)
    train.main(["--data", str(data), "--output-dir", str(tmp_path / "out"), *FLAGS, "--resume"])
    assert len(read_log(tmp_path / "out")) == 2


def test_a_torchrun_restart_resumes_by_itself(shapes, straight, tmp_path, monkeypatch, capsys):
    train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS[:-4], "--epochs", "1"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train.main(["--data", str(shapes), "--output-dir", str(tmp_path), *FLAGS])  # no --resume
    assert "torchrun restart 1: resuming from" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]


def test_sigterm_stops_every_torchrun_process_at_the_same_iteration(tmp_path):
    # 12 iterations an epoch, and the run niced: however busy the machine (make test runs two workers), the
    # loop below sees the first checkpoint and signals long before the run could end by itself
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=48, num_val=2, size=(64, 96))
    command = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--data", str(shapes), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
               *FLAGS, "--checkpoint-minutes", "0.00001"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoint.exists() and read_checkpoint(str(checkpoint))["next"] >= (0, 1)):
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both processes
    output = run.communicate(timeout=240)[0]
    assert run.returncode != 0
    assert "stopped by SIGTERM at epoch" in output, output[-3000:]
    stopped = read_checkpoint(str(checkpoint))
    assert len(stopped["rng"]) == 2 and tuple(stopped["next"]) < (2, 0)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_log(tmp_path / "out")] == [0, 1]


def test_a_second_ctrl_c_aborts_at_once():
    script = ("import os, signal, sys, time; sys.path.insert(0, {root!r}); from appendix.runs import StopSignals\n"
              "with StopSignals():\n"
              "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1); os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5); print('not aborted')").format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT and "not aborted" not in result.stdout
    assert "SIGINT: stopping after this step" in result.stdout and "aborted by a second Ctrl-C" in result.stderr



def test_a_kill_at_any_step_of_an_epochs_end_is_completed_by_resume(shapes, straight_run, capsys):
    """The end of the last epoch writes checkpoint.pth (evaluation owed), best.pth, metrics.json, log.jsonl,
    the plots and checkpoint.pth (nothing owed), in that order. Killed before each of these renames (its
    temporary file written) and after the last, --resume leaves the files of the run that never stopped:
    the same best.pth, metrics.json and log.jsonl (the epoch's seconds aside), and nothing owed."""
    out, snapshots = straight_run
    names = [name for name, _ in snapshots]
    assert names[:4] == ["checkpoint.pth", "best.pth", "metrics.json", "log.jsonl"] and names[-2:] == ["checkpoint.pth", ""]
    expected_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock")
    want_best = read_checkpoint(str(out / "best.pth"))
    for killed_before, folder in snapshots:
        train.main(["--data", str(shapes), "--output-dir", str(folder), *FLAGS, "--resume"])
        where = f"killed before {killed_before or 'nothing'}"
        without_seconds = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
        assert without_seconds(read_log(folder)) == without_seconds(read_log(out)), where
        assert json.loads((folder / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text()), where
        best = read_checkpoint(str(folder / "best.pth"))
        assert best["best_ap"] == want_best["best_ap"] and best["pending"] is None, where
        assert all(torch.equal(best["model"][k], v) for k, v in want_best["model"].items()), where
        checkpoint = read_checkpoint(str(folder / "checkpoint.pth"))
        assert checkpoint["pending"] is None and tuple(checkpoint["next"]) == (2, 0), where
        assert sorted(p.relative_to(folder) for p in folder.rglob("*") if p.name != ".lock") == expected_files, where
    out = capsys.readouterr().out
    assert out.count("resumed from") == len(snapshots)
    assert out.count("nothing left to train") == 1  # the run that was killed after its last write


def test_torchrun_processes_survive_batches_in_which_some_images_have_no_objects(tmp_path):
    """8 training images, 7 of them without objects: at some step one process's batch has objects and the
    other's none (their graphs differ: no denoising queries there), at another neither has any."""
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=2, size=(64, 96))
    train_json = shapes / "annotations" / "instances_train2017.json"
    data = json.loads(train_json.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    train_json.write_text(json.dumps(data))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
               "--data", str(shapes), "--output-dir", str(tmp_path / "out"), "--device", "cpu", *FLAGS[:-4], "--num-workers",
               "0", "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = read_log(tmp_path / "out")
    assert "AP" in record["val"] and all(math.isfinite(v) for v in record["train"].values())
