"""runs.py: one run per output folder, and no false claims left by runs that died."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train
from config import ConfigError
from conftest import tiny_flags
from data import make_shapes_dataset
from runs import claim_output_dir

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_folder_is_refused_and_free_again_once_released(tmp_path):
    with claim_output_dir(tmp_path / "run"):
        with pytest.raises(ConfigError, match=rf"in use by a run that is still going \(pid {os.getpid()} on "):
            claim_output_dir(tmp_path / "run")
    claim_output_dir(tmp_path / "run").close()


def test_a_killed_run_leaves_no_false_claim(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from runs import claim_output_dir; from pathlib import Path; "
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
