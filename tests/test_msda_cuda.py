"""The CUDA kernel of msda_cuda: it builds wherever nvcc exists; with a GPU (`pytest -m cuda`) it is
checked against the reference: gradcheck in float64, and forward plus all three gradients in
float32, float16 and bfloat16 on DINO-like shapes."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import msda_cuda
from msda_cuda import ms_deform_attn, ms_deform_attn_reference

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def nvcc_major() -> int | None:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        return None
    version = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return int(version[1]) if version else None


def test_kernel_builds(monkeypatch):
    """Compiles ms_deform_attn.cu with nvcc (about a minute; cached), also on machines without a GPU."""
    major = nvcc_major()
    if major is None:
        pytest.skip("no nvcc on this machine")
    if torch.version.cuda is None or int(torch.version.cuda.split(".")[0]) != major:
        pytest.skip(f"torch was built for CUDA {torch.version.cuda}, nvcc here is {major}.x: torch refuses to mix them")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # no device to ask: build for Hopper
    extension = msda_cuda.build_extension()
    assert callable(extension.forward) and callable(extension.backward)


def shapes_and_index(shapes, device):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    return spatial_shapes, torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])


def random_inputs(shapes, B, Q, M, D, P, dtype, device, requires_grad=False):
    spatial_shapes, level_start_index = shapes_and_index(shapes, device)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(B, S, M, D, dtype=dtype, device=device)
    # beyond [0, 1] as well: zero padding outside every level
    locations = torch.rand(B, Q, M, L, P, 2, dtype=coord, device=device) * 1.3 - 0.15
    weights = torch.rand(B, Q, M, L, P, dtype=coord, device=device)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    for t in (value, locations, weights):
        t.requires_grad_(requires_grad)
    return value, spatial_shapes, level_start_index, locations, weights


def test_inputs_that_disagree_are_refused():
    value, ss, lsi, loc, w = random_inputs([(6, 4), (3, 2)], 2, 5, 2, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, ss, lsi, loc, w[:, :4])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, ss, lsi, loc[:1], w)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, ss, torch.tensor([0, 20]), loc, w)
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn(value[:, :-1], ss, lsi, loc, w)
    with pytest.raises(ValueError, match="one device"):
        ms_deform_attn(value, ss, lsi, loc.to("meta"), w)


@cuda
@needs_gpu
def test_kernel_gradcheck_float64():
    inputs = random_inputs([(3, 5), (2, 3)], B=2, Q=3, M=2, D=4, P=2, dtype=torch.float64, device="cuda",
                           requires_grad=True)
    value, ss, lsi, loc, w = inputs
    fn = lambda v, l, a: ms_deform_attn(v, ss, lsi, l, a)
    assert torch.autograd.gradcheck(fn, (value, loc, w))


DINO_LIKE = [(13, 17), (7, 9), (4, 5), (2, 3)]  # odd sizes, 4 levels


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("D", [32, 16])
def test_kernel_matches_the_reference(dtype, tol, B, D):
    torch.manual_seed(0)
    value, ss, lsi, loc, w = random_inputs(DINO_LIKE, B=B, Q=37, M=8, D=D, P=4, dtype=dtype, device="cuda",
                                           requires_grad=True)
    out = ms_deform_attn(value, ss, lsi, loc, w)
    reference_inputs = [t.detach().double().requires_grad_() for t in (value, loc, w)]
    expected = ms_deform_attn_reference(reference_inputs[0], ss, lsi, *reference_inputs[1:])
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    scale = lambda t: t.abs().max().item() + 1e-6
    assert (out.double() - expected).abs().max() <= tol * scale(expected)
    for got, want in zip((value.grad, loc.grad, w.grad), (t.grad for t in reference_inputs)):
        assert got.dtype == (dtype if got is value.grad else loc.dtype)
        assert (got.double() - want).abs().max() <= tol * scale(want)


@cuda
@needs_gpu
def test_environment_variable_forces_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(msda_cuda, "ms_deform_attn_reference", lambda *a: calls.append(1) or ms_deform_attn_reference(*a))
    inputs = random_inputs(DINO_LIKE, B=1, Q=4, M=2, D=32, P=2, dtype=torch.float32, device="cuda")
    ms_deform_attn(*inputs)
    assert not calls
    monkeypatch.setenv("DINO_MSDA", "reference")
    ms_deform_attn(*inputs)
    assert calls
