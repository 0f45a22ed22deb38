import pytest
import torch

from model import build_dino

TINY = dict(hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=30,
            dn_number=10)


def tiny_dino(num_classes: int = 5, **overrides):
    """A small DINO on ResNet-18: 2+2 layers, 64 channels, 30 queries."""
    return build_dino("r18", num_classes=num_classes, **{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
