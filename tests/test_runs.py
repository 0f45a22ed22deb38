"""runs.py: one run per output folder, no false claims left by runs that died, files written whole, and a
SIGTERM however it comes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from config import ConfigError
from appendix.checkpoints import read_checkpoint
from conftest import tiny_flags
from data import make_shapes_dataset
from appendix.runs import EpochOrder, WriteError, claim_output_dir, save_atomically

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_folder_is_refused_and_free_again_once_released(tmp_path):
    with claim_output_dir(tmp_path / "run"):
        with pytest.raises(ConfigError, match=rf"in use by a run that is still going \(pid {os.getpid()} on "):
            claim_output_dir(tmp_path / "run")
    claim_output_dir(tmp_path / "run").close()


def test_a_killed_run_leaves_no_false_claim(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from appendix.runs import claim_output_dir; from pathlib import Path; "
                               f"lock = claim_output_dir(Path({str(tmp_path / 'run')!r})); print('held', flush=True); "
                               f"import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        claim_output_dir(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    claim_output_dir(tmp_path / "run").close()  # the kernel released it with the process


def test_a_second_training_run_into_the_same_folder_is_refused(tmp_path, capsys):
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, size=(64, 96))
    with claim_output_dir(tmp_path / "out"):  # a run that is still going
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--data", str(shapes), "--output-dir", str(tmp_path / "out"), *tiny_flags(), "--scale", "0.1"])
    assert exit_info.value.code == 2
    assert "is in use by a run that is still going" in capsys.readouterr().err


@pytest.fixture
def small_filesystem(tmp_path):
    """A 40 MB filesystem of its own (a tmpfs: needs root, as CI and the developers' machines run), smaller
    than the tiny model's checkpoint with its optimiser state."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(folder)],
                                                    capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_run_that_fills_its_disk_stops_with_one_line_and_leaves_no_partial_file(small_filesystem, tmp_path, capsys):
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, size=(64, 96))
    out = small_filesystem / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(shapes), "--output-dir", str(out), *tiny_flags(), "--scale", "0.1", "--epochs", "1",
                    "--num-workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith(f"error: cannot write {out / 'checkpoint.pth'}: No space left on device")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no partial temporary file filling the disk


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux), a disk that is always full")


@needs_dev_full
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """The temporary file of the write is /dev/full, where every write fails with ENOSPC."""
    path = tmp_path / "checkpoint.pth"
    save_atomically({"epoch": 1}, path)
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")
    with pytest.raises(WriteError, match=rf"cannot write {path}: No space left on device; the previous checkpoint.pth is kept"):
        save_atomically({"epoch": 2, "weights": torch.zeros(100_000)}, path)
    assert not (tmp_path / "checkpoint.pth.tmp").exists()  # the partial temporary file is removed
    assert torch.load(path) == {"epoch": 1}


def test_a_kill_at_any_instant_of_a_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """A child process writes best.pth over and over (save_atomically, as train.py keeps its best checkpoint)
    and is killed with SIGKILL at six instants: every time, best.pth is a complete checkpoint."""
    writer = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; from appendix.runs import save_atomically\n"
              f"checkpoint = {{'weights': torch.arange(2_000_000)}}\n"
              f"print('writing', flush=True)\n"
              f"while True: save_atomically(checkpoint, Path({str(tmp_path / 'best.pth')!r}))")
    for delay in [0.02 * k for k in range(6)]:
        child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if (tmp_path / "best.pth").exists():
            assert torch.equal(torch.load(tmp_path / "best.pth")["weights"], torch.arange(2_000_000))


@pytest.mark.parametrize("where", ["through a file", "read-only"])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, where):
    if where == "through a file":
        (tmp_path / "file").write_text("")
        output_dir = tmp_path / "file" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        output_dir = tmp_path / "ro" / "run"
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, size=(64, 96))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(shapes), "--output-dir", str(output_dir), *tiny_flags(), "--scale", "0.1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--output-dir {output_dir}: cannot write there" in err


def worker_pids(pid: int) -> list[int]:
    """The child processes of `pid` (its DataLoader workers), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the data workers through /proc (Linux)")
@pytest.mark.parametrize("delivery", ["process group", "a data worker"])
def test_a_sigterm_to_the_group_or_to_a_data_worker_stops_the_run_in_order(tmp_path, delivery):
    """What SLURM's scancel, torchrun and `kill -- -PGID` do reaches the data workers too: the run still
    finishes its step, writes its checkpoint and exits 128 + SIGTERM, and resumes from it."""
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=32, num_val=2, size=(64, 96))
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(shapes), "--output-dir", str(tmp_path / "out"),
               *tiny_flags(), "--scale", "0.1", "--batch-size", "2", "--num-workers", "2", "--lr", "1e-3",
               "--epochs", "1", "--checkpoint-minutes", "0.00001"]  # 16 iterations
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           start_new_session=True)  # a process group of its own, as a batch job has
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoint.exists() and read_checkpoint(str(checkpoint))["next"] >= (0, 1)
                                          and worker_pids(run.pid)):
        time.sleep(0.2)
    if delivery == "process group":
        os.killpg(run.pid, signal.SIGTERM)
    else:
        os.kill(worker_pids(run.pid)[0], signal.SIGTERM)
    output = run.communicate(timeout=240)[0]
    assert run.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM at epoch" in output and "Traceback" not in output, output[-3000:]
    assert tuple(read_checkpoint(str(checkpoint))["next"]) < (1, 0)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()] == [0]


def test_each_epoch_visits_every_sample_once_in_an_order_and_with_augmentations_of_its_own():
    """The order and the augmentation seeds change from epoch to epoch (a run that repeated them would see
    one epoch many times), and are the same for the same seed and epoch (a resumed run sees the batches of
    one that never stopped); each sample's seed is its own."""
    epochs = [list(EpochOrder(10, seed=3, epoch=e)) for e in range(3)]
    for samples in epochs:
        assert sorted(i for i, _ in samples) == list(range(10)) and len({s for _, s in samples}) == 10
    orders = [[i for i, _ in samples] for samples in epochs]
    assert orders[0] != orders[1] != orders[2] and list(EpochOrder(10, seed=3, epoch=1)) == epochs[1]
    seeds = [dict(samples) for samples in epochs]
    assert all(seeds[0][i] != seeds[1][i] != seeds[2][i] for i in range(10))
    assert [i for i, _ in EpochOrder(10, seed=4, epoch=0)] != orders[0]
    assert list(EpochOrder(10, seed=3, epoch=1, skip=4)) == epochs[1][4:]


def test_torchrun_processes_share_an_epoch_between_them():
    """Two processes: disjoint halves of the epoch's order (11 samples: one repeated to even them out)."""
    shares = [list(EpochOrder(11, seed=3, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 6 == len(EpochOrder(11, 3, 2, rank=1, world=2))
    assert sorted({i for share in shares for i, _ in share}) == list(range(11))
    whole = [i for i, _ in EpochOrder(11, seed=3, epoch=2)]
    assert [i for i, _ in shares[0]] == whole[0::2] and [i for i, _ in shares[1]] == (whole + whole[:1])[1::2]


def test_a_samples_augmentation_is_drawn_from_its_own_seed(tmp_path):
    from data import CocoDetection, coco_paths, make_transforms
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, size=(64, 96))
    dataset = CocoDetection(*coco_paths(shapes, "train"), make_transforms(train=True, scale=0.2), log=lambda *a: None)
    torch.manual_seed(0)
    first = dataset[(1, 123)]
    torch.manual_seed(1)  # the process's generator plays no part
    again = dataset[(1, 123)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    others = [dataset[(1, seed)][0] for seed in range(124, 130)]
    assert any(other.shape != first[0].shape or not torch.equal(other, first[0]) for other in others)
