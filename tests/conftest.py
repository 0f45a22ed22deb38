import os

import pytest
import torch

from model import build_dino

# the one small configuration of the tests: ResNet-18, 2+2 layers, 64 channels, 30 queries
TINY = dict(backbone="r18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
            num_queries=30, dn_number=10)


def tiny_dino(num_classes: int = 5, **overrides):
    """TINY as a model."""
    return build_dino(num_classes=num_classes, **{**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """TINY as train.py flags (`--hidden-dim 64 ...`)."""
    return [item for name, value in {**TINY, **overrides}.items()
            for item in (f"--{name.replace('_', '-')}", str(value))]


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `pytest -n auto`), the workers share the cores instead of each
    taking all of them (torch's threads spin while they wait, and several sets of them on one core crawl),
    and the train.py processes a test starts take the same number of threads as the test itself: sums
    split over another number of threads round differently, and the resumption tests compare exactly."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
