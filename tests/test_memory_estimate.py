"""bench/memory_estimate.py: its bookkeeping of live memory, and what its estimates must show."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_estimate  # noqa: E402
from memory_estimate import BLOCK, PeakMemory, estimate  # noqa: E402

from conftest import TINY  # noqa: E402

TINY = {**TINY, "amp": True}


def test_live_memory_counts_each_storage_once_and_frees_it():
    tracker = PeakMemory()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes: 8 blocks of 512
        view = a[10:]  # the same storage
        b = a * 2
        del a, view
        after_free = tracker.current
        del b
    assert tracker.peak == 2 * 8 * BLOCK
    assert after_free == 8 * BLOCK and tracker.current == 0


def test_each_checkpointing_option_lowers_the_estimated_peak():
    size = (256, 384)
    plain = estimate(TINY, size, 2)[0]
    encoder = estimate({**TINY, "encoder_checkpointing": True}, size, 2)[0]
    backbone = estimate({**TINY, "encoder_checkpointing": True, "backbone_checkpointing": True}, size, 2)[0]
    assert plain > encoder > backbone > 0


def test_the_estimate_leaves_the_real_functions_in_place():
    import losses
    import msda_cuda
    originals = (F.layer_norm, torch.Tensor.softmax, F.scaled_dot_product_attention, torch.nn.init.trunc_normal_,
                 msda_cuda.ms_deform_attn, losses.hungarian_assign)
    estimate(TINY, (128, 192), 1)
    assert originals == (F.layer_norm, torch.Tensor.softmax, F.scaled_dot_product_attention,
                         torch.nn.init.trunc_normal_, msda_cuda.ms_deform_attn, losses.hungarian_assign)
    assert msda_cuda._level_layouts.cache_info().currsize == 0  # no fake tensors left for real forwards
