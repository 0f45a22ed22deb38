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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
