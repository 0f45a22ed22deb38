import torch

from appendix.precision import amp_autocast, amp_dtype, at_least_float32


def test_at_least_float32_widens_half_types_only():
    for dtype, want in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        assert at_least_float32(dtype) == want
        x = torch.ones(2, dtype=dtype)
        assert at_least_float32(x).dtype == want
    x = torch.ones(2)
    assert at_least_float32(x) is x  # no copy where nothing changes


def test_amp_is_bf16_on_the_cpu_and_off_without_the_flag():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, False) is None and amp_dtype(cpu, True) == torch.bfloat16
    with amp_autocast(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with amp_autocast(cpu, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
