"""The CUDA kernel of msda_cuda, checked against the reference: gradcheck in float64, and forward plus
all three gradients in float32, float16 and bfloat16 on DINO-like shapes.

Each check runs twice: on a GPU (`pytest -m cuda`; skipped without one) and on the CPU, where the same
kernel source runs under an emulation of CUDA's threads and warp shuffles (tests/cuda_emulation.h), also
under AddressSanitizer. The build with nvcc is tested wherever nvcc exists.
"""
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import msda_cuda
import deformable_attn
from deformable_attn import ms_deform_attn_reference
from msda_cuda import level_start_index_of, ms_deform_attn
from msda_emulation import ROOT, asan_environment, build_emulated_extension

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def emulated_extension():
    """ms_deform_attn.cu built as C++ (about 40 s; cached): its kernels run on the CPU."""
    return build_emulated_extension()


def skip_unless_covered(extension, dtype: torch.dtype):
    if extension is msda_cuda._builds.get("CPU") and dtype not in (torch.float32, torch.float64):
        pytest.skip("the CPU kernel takes float32 and float64 values (others go to the reference)")


@pytest.fixture(params=[pytest.param("cuda", marks=[cuda, needs_gpu]), pytest.param("emulated", marks=needs_cxx),
                        pytest.param("cpu", marks=needs_cxx)])
def kernel(request, monkeypatch):
    """(device, extension, ms_deform_attn through the kernel) for the CUDA kernel on the GPU, for the same
    kernel emulated on the CPU, and for the CPU kernel (ms_deform_attn_cpu.cpp)."""
    if request.param == "cpu":
        extension = msda_cuda._cpu_kernel()
        assert extension is not None, f"the CPU kernel did not build: {msda_cuda._build_errors.get('CPU')}"
        threads = torch.get_num_threads()  # several threads, whatever the machine: the backward's split is tested
        torch.set_num_threads(4)
        request.addfinalizer(lambda: torch.set_num_threads(threads))

        def through_cpu_kernel(*inputs):
            msda_cuda._check(*inputs)
            skip_unless_covered(extension, inputs[0].dtype)
            return msda_cuda._MSDeformAttnFunction.apply(extension, *inputs)
        return "cpu", extension, through_cpu_kernel
    if request.param == "cuda":
        extension = msda_cuda._kernel()
        assert extension is not None, f"the kernel did not build: {msda_cuda._build_errors.get('CUDA')}"
        return "cuda", extension, ms_deform_attn
    extension = request.getfixturevalue("emulated_extension")

    def through_kernel(*inputs):  # what ms_deform_attn does with CUDA tensors
        msda_cuda._check(*inputs)
        return msda_cuda._MSDeformAttnFunction.apply(extension, *inputs)
    return "cpu", extension, through_kernel


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


def random_inputs(shapes, B=2, Q=5, M=2, D=3, P=3, dtype=torch.float64, device="cpu", requires_grad=False):
    """ms_deform_attn's five arguments for levels `shapes` [(H_l, W_l)]; locations and weights in float32
    for lower-precision values, as the model gives them. (Also used by test_deformable_attn.py, and by
    the AddressSanitizer child process, which must not import torchvision.)"""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    level_start_index = level_start_index_of(spatial_shapes)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(B, S, M, D, dtype=dtype, device=device)
    # beyond [0, 1] as well: zero padding outside every level
    locations = torch.rand(B, Q, M, L, P, 2, dtype=coord, device=device) * 1.4 - 0.2
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


def test_kernel_gradcheck_float64(kernel):
    device, _, attend = kernel
    inputs = random_inputs([(3, 5), (2, 3)], B=2, Q=3, M=2, D=4, P=2, dtype=torch.float64, device=device,
                           requires_grad=True)
    value, ss, lsi, loc, w = inputs
    fn = lambda v, l, a: attend(v, ss, lsi, l, a)
    assert torch.autograd.gradcheck(fn, (value, loc, w))


DINO_LIKE = [(13, 17), (7, 9), (4, 5), (2, 3)]  # odd sizes, 4 levels
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def assert_matches_the_reference(attend, inputs):
    """Forward and all three gradients of `attend` against the float64 reference, to the dtype's tolerance."""
    value, ss, lsi, loc, w = inputs
    out = attend(value, ss, lsi, loc, w)
    reference_inputs = [t.detach().double().requires_grad_() for t in (value, loc, w)]
    expected = ms_deform_attn_reference(reference_inputs[0], ss, lsi, *reference_inputs[1:])
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    tol = TOLERANCE[value.dtype]
    scale = lambda t: t.abs().max().item() + 1e-6
    assert out.dtype == value.dtype
    assert (out.double() - expected).abs().max() <= tol * scale(expected)
    for got, want in zip((value.grad, loc.grad, w.grad), (t.grad for t in reference_inputs)):
        assert got.dtype == (value.dtype if got is value.grad else loc.dtype)
        assert (got.double() - want).abs().max() <= tol * scale(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("D", [32, 16])
def test_kernel_matches_the_reference(kernel, dtype, B, D):
    device, _, attend = kernel
    torch.manual_seed(0)
    assert_matches_the_reference(attend, random_inputs(DINO_LIKE, B=B, Q=37, M=8, D=D, P=4, dtype=dtype,
                                                       device=device, requires_grad=True))


@pytest.mark.parametrize("dtype, D", [(torch.float64, 1), (torch.float32, 2), (torch.float16, 4),
                                      (torch.bfloat16, 4), (torch.float64, 32)])
def test_kernel_matches_the_reference_with_one_channel_per_thread(kernel, dtype, D):
    """Heads narrower than a 16-byte vector take one channel per thread: groups of D threads (1 to 32)."""
    device, _, attend = kernel
    torch.manual_seed(1)
    assert_matches_the_reference(attend, random_inputs(DINO_LIKE, B=2, Q=9, M=3, D=D, P=3, dtype=dtype,
                                                       device=device, requires_grad=True))


def test_kernel_samples_the_borders_of_every_level(kernel):
    """Points a hundredth of a pixel either side of each place where a neighbour enters or leaves the map
    (pixel coordinates -1, 0, W - 1 and W, in x and y): the zero padding, exactly as grid_sample's.
    Not on those places themselves: sampling has a kink there, whose side float32 rounding decides."""
    device, _, attend = kernel
    value, ss, lsi, _, _ = random_inputs(DINO_LIKE, B=1, Q=1, M=2, D=32, P=1, dtype=torch.float32, device=device)
    delta = 0.01
    sizes = ss.flip(-1).double()  # (L, 2): (W, H), matching (x, y)
    crossings = torch.stack([torch.zeros_like(sizes) - 1, torch.zeros_like(sizes), sizes - 1, sizes], -1)
    pixels = torch.cat([crossings - delta, crossings + delta], -1)  # (L, 2, 8) pixel coordinates per axis
    x, y = pixels[:, 0, :, None].expand(-1, 8, 8), pixels[:, 1, None, :].expand(-1, 8, 8)  # all 64 pairs
    locations = (torch.stack([x, y], -1).reshape(4, 64, 2) + 0.5) / sizes[:, None]  # (L, Q, 2) in [0, 1] units
    locations = locations.permute(1, 0, 2).reshape(1, 64, 1, 4, 1, 2).expand(1, 64, 2, 4, 1, 2)
    loc = locations.float().contiguous().to(device).requires_grad_()
    w = torch.rand(1, 64, 2, 4, 1, device=device).requires_grad_()
    assert_matches_the_reference(attend, [value.requires_grad_(), ss, lsi, loc, w])


def test_kernel_backward_takes_a_gradient_that_is_not_vector_aligned(kernel):
    """grad_output may start mid-vector (a view): the backward then reads one channel per thread."""
    device, extension, _ = kernel
    value, ss, lsi, loc, w = random_inputs(DINO_LIKE, B=2, Q=5, M=2, D=32, P=4, dtype=torch.float32, device=device)
    grad = torch.randn(2 * 5 * 64 + 1, device=device)[1:].view(2, 5, 64)  # 4 bytes past 16-byte alignment
    assert grad.data_ptr() % 16 != 0
    got = extension.backward(value, ss, lsi, loc, w, grad)
    want = extension.backward(value, ss, lsi, loc, w, grad.clone())
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-6)


def test_kernel_takes_queries_without_work(kernel):
    """Q = 0: empty outputs and zero gradients, nothing launched."""
    device, extension, _ = kernel
    value, ss, lsi, loc, w = random_inputs(DINO_LIKE, B=2, Q=0, M=2, D=32, P=4, dtype=torch.float32, device=device)
    assert extension.forward(value, ss, lsi, loc, w).shape == (2, 0, 64)
    grad_value, grad_loc, grad_w = extension.backward(value, ss, lsi, loc, w, torch.zeros(2, 0, 64, device=device))
    assert not grad_value.any() and grad_loc.shape == loc.shape and grad_w.shape == w.shape


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_dino_trains_through_the_kernel_as_through_the_reference(kernel, monkeypatch, amp):
    """The model's own calls reach the kernel (under bf16 autocast: bf16 values, float32 locations and
    weights) and give the reference's outputs and parameter gradients."""
    import deformable_attn
    from conftest import tiny_dino
    device, _, attend = kernel
    # float32 means float32: cuDNN's convolutions otherwise round to TF32 on the GPU, whose 1e-3 steps make
    # the two runs' gradients differ by 1.1e-5 (seen on an H100) before the attention is even reached
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = tiny_dino().to(device).train()
    for module in model.modules():
        if isinstance(module, deformable_attn.MSDeformAttn):
            # off the initial integer pixel offsets, where sampling has kinks (one-sided gradients whose
            # side float32 rounding picks: kernel and reference may pick differently there)
            torch.nn.init.normal_(module.sampling_offsets.weight, std=0.01)
    images = torch.randn(2, 3, 64, 96, device=device)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool, device=device)
    mask[1, 40:] = True
    targets = [{"labels": torch.tensor([1, 3], device=device),
                "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]], device=device)},
               {"labels": torch.tensor([2], device=device), "boxes": torch.tensor([[0.5, 0.3, 0.4, 0.4]], device=device)}]

    def train_step(msda):
        monkeypatch.setattr(msda_cuda, "ms_deform_attn", msda)
        model.zero_grad()
        torch.manual_seed(1)  # the same denoising noise
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = model(images, mask, targets)
        outputs = torch.cat([out["pred_logits"].float().flatten(), out["pred_boxes"].float().flatten()])
        (outputs * torch.linspace(-1, 1, len(outputs), device=device)).sum().backward()
        return outputs.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    want_outputs, want_grads = train_step(ms_deform_attn_reference)
    got_outputs, got_grads = train_step(attend)
    tol = 1e-2 if amp else 1e-5
    assert (got_outputs - want_outputs).abs().max() <= tol * want_outputs.abs().max()
    assert (got_grads - want_grads).norm() <= tol * want_grads.norm()


# --- the self-check -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(msda_cuda.SELF_CHECK_TOLERANCE))
def test_the_self_check_passes_a_correct_kernel(kernel, dtype):
    device, extension, _ = kernel
    skip_unless_covered(extension, dtype)
    error = msda_cuda.self_check_error(extension, torch.device(device), dtype, 8, 32)
    assert error <= msda_cuda.SELF_CHECK_TOLERANCE[dtype]
    assert error > 0 or dtype == torch.float64  # it really compared two computations


@pytest.fixture
def kernel_on_the_cpu(monkeypatch):
    """ms_deform_attn dispatching CPU tensors to whatever extension the test puts in place of the CPU kernel
    (msda_cuda._cpu_kernel); every self-check verdict forgotten."""
    monkeypatch.setattr(msda_cuda, "_verdicts", {})
    monkeypatch.delenv("DINO_MSDA_SELF_CHECK", raising=False)
    monkeypatch.delenv("DINO_MSDA", raising=False)
    calls = []
    apply = msda_cuda._MSDeformAttnFunction.apply
    monkeypatch.setattr(msda_cuda._MSDeformAttnFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@needs_cxx
def test_a_correct_kernel_is_used_after_its_self_check(emulated_extension, kernel_on_the_cpu, monkeypatch, recwarn):
    monkeypatch.setattr(msda_cuda, "_cpu_kernel", lambda: emulated_extension)
    inputs = random_inputs(DINO_LIKE, B=2, Q=6, M=2, D=32, P=3, dtype=torch.float32)
    out = ms_deform_attn(*inputs)
    assert len(kernel_on_the_cpu) > 1  # the self-check's call, then the real one
    assert not [w for w in recwarn if "msda_cuda" in str(w.message)]
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-5, atol=1e-5)


# a kernel wrong only near the right border of each level: the self-check must catch it
BORDER_BUG = ("px < acc_t(W) &&", "px < acc_t(W - 1) &&")


@needs_cxx
def test_a_broken_kernel_is_caught_by_its_self_check_and_the_reference_takes_over(kernel_on_the_cpu, monkeypatch):
    broken = build_emulated_extension(mutation=BORDER_BUG)
    monkeypatch.setattr(msda_cuda, "_cpu_kernel", lambda: broken)
    inputs = random_inputs(DINO_LIKE, B=2, Q=6, M=2, D=32, P=3, dtype=torch.float32)
    inputs[3].data[..., 0] = 0.995  # beside the right border, where the broken kernel is wrong
    assert (broken.forward(*inputs) - ms_deform_attn_reference(*inputs)).abs().max() > 1e-2
    with pytest.warns(UserWarning, match=r"disagrees with the reference .* float32 values .*relative error"):
        out = ms_deform_attn(*inputs)
    calls = len(kernel_on_the_cpu)
    assert torch.equal(out, ms_deform_attn_reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not again
        assert torch.equal(ms_deform_attn(*inputs), out)
    assert len(kernel_on_the_cpu) == calls  # the kernel is not called again
    monkeypatch.setenv("DINO_MSDA_SELF_CHECK", "0")  # the switch: no check, the kernel as it is
    monkeypatch.setattr(msda_cuda, "_verdicts", {})
    assert not torch.equal(ms_deform_attn(*inputs), out)


def test_the_self_check_is_cheap_and_leaves_the_random_stream_alone(kernel):
    device, extension, _ = kernel
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    start = time.perf_counter()
    msda_cuda.self_check_error(extension, torch.device(device), torch.float32, 8, 32)
    if device == "cuda":  # the emulation runs threads as fibers: its time says nothing
        assert time.perf_counter() - start < 0.1
    assert torch.equal(torch.rand(3), expected)


EXERCISE = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import msda_cuda
from msda_emulation import build_emulated_extension
from test_msda_cuda import DINO_LIKE, random_inputs
extension = build_emulated_extension(sanitize=True)
if sys.argv[1] == "exercise":
    for dtype, D in [(torch.float64, 4), (torch.float32, 32), (torch.float32, 2), (torch.float16, 16), (torch.bfloat16, 4)]:
        for B in (1, 3):
            inputs = random_inputs(DINO_LIKE, B=B, Q=7, M=3, D=D, P=4, dtype=dtype, device="cpu", requires_grad=True)
            inputs[3].data.mul_(1.2).sub_(0.1)  # well beyond the borders, too
            msda_cuda._MSDeformAttnFunction.apply(extension, *inputs).sum().backward()
    print("exercised")
else:  # a value tensor two tokens short: the reads past its end must be caught
    value, ss, lsi, loc, w = random_inputs(DINO_LIKE, B=1, Q=5, M=2, D=16, P=4, dtype=torch.float32, device="cpu")
    loc.fill_(0.99)  # the bottom-right pixel of every level: the last token
    extension.forward(value[:, :-2].clone(), ss, lsi, loc, w)
    print("not caught")
"""


@needs_cxx
def test_emulated_kernel_stays_inside_its_tensors():
    """Under AddressSanitizer: no read or write outside a tensor, for every dtype, vector width and
    batch size; and a deliberately short value tensor is caught, so the sanitizer is really watching."""
    env = asan_environment()
    if env is None:
        pytest.skip("no AddressSanitizer runtime for this compiler")
    script = EXERCISE.format(root=str(ROOT), tests=str(ROOT / "tests"))
    run = lambda mode: subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True)
    exercised = run("exercise")
    assert exercised.returncode == 0 and "exercised" in exercised.stdout, exercised.stderr[-4000:]
    assert "AddressSanitizer" not in exercised.stderr, exercised.stderr[-4000:]
    caught = run("canary")
    assert caught.returncode != 0 and "not caught" not in caught.stdout
    assert "heap-buffer-overflow" in caught.stderr and "ms_deform_attn.cu" in caught.stderr, caught.stderr[-4000:]


@cuda
@needs_gpu
def test_environment_variable_forces_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(deformable_attn, "ms_deform_attn_reference", lambda *a: calls.append(1) or ms_deform_attn_reference(*a))
    inputs = random_inputs(DINO_LIKE, B=1, Q=4, M=2, D=32, P=2, dtype=torch.float32, device="cuda")
    ms_deform_attn(*inputs)
    assert not calls
    monkeypatch.setenv("DINO_MSDA", "reference")
    ms_deform_attn(*inputs)
    assert calls


@needs_cxx
def test_cpu_tensors_go_through_the_cpu_kernel_bf16_and_fp16_in_float32(monkeypatch):
    calls = []
    apply = msda_cuda._MSDeformAttnFunction.apply
    monkeypatch.setattr(msda_cuda._MSDeformAttnFunction, "apply",
                        lambda *a: calls.append((a[0], a[1].dtype)) or apply(*a))
    cpu_kernel = msda_cuda._cpu_kernel()
    assert cpu_kernel is not None
    for dtype, computed in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        calls.clear()
        value, *rest = random_inputs(DINO_LIKE, B=1, Q=4, M=2, D=8, P=2, dtype=dtype)
        value.requires_grad_()
        out = ms_deform_attn(value, *rest)
        assert calls[-1:] == [(cpu_kernel, computed)]  # after the self-check's own calls, on first use
        assert out.dtype == dtype
        out.sum().backward()
        assert value.grad.dtype == dtype
        want = ms_deform_attn_reference(value.detach().double(), *rest[:2], *(t.double() for t in rest[2:]))
        assert (out.double() - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()
    monkeypatch.setenv("DINO_MSDA", "reference")
    calls.clear()
    ms_deform_attn(*random_inputs(DINO_LIKE, B=1, Q=4, M=2, D=8, P=2, dtype=torch.float32))
    assert not calls


def test_a_cpu_kernel_that_does_not_build_warns_once_and_the_reference_works(monkeypatch):
    def no_compiler(verbose=False):
        raise RuntimeError("Error building extension 'dino_msda_cpu': c++: not found")
    monkeypatch.setattr(msda_cuda, "build_cpu_extension", no_compiler)
    monkeypatch.setattr(msda_cuda, "_builds", {})
    monkeypatch.setattr(msda_cuda, "_build_errors", {})
    inputs = random_inputs(DINO_LIKE, B=1, Q=4, M=2, D=8, P=2, dtype=torch.float32)
    with pytest.warns(UserWarning, match="the CPU kernel could not be built .*c\\+\\+: not found.*using the PyTorch reference"):
        out = ms_deform_attn(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ms_deform_attn(*inputs), out)  # once
    assert torch.equal(out, ms_deform_attn_reference(*inputs))


@needs_cxx
def test_the_first_call_may_come_under_inference_mode(monkeypatch):
    """The self-check makes its tensors outside inference mode: it needs their gradients."""
    monkeypatch.setattr(msda_cuda, "_verdicts", {})
    inputs = random_inputs(DINO_LIKE, B=1, Q=4, M=3, D=8, P=2, dtype=torch.float32)
    with torch.inference_mode():
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-5, atol=1e-5)


@needs_cxx
def test_the_first_call_may_come_inside_activation_checkpointing(monkeypatch):
    """The self-check's own saved tensors are not counted as the checkpointed layer's (which would make the
    recomputation in the backward disagree with the forward)."""
    monkeypatch.setattr(msda_cuda, "_verdicts", {})
    value, *rest = random_inputs(DINO_LIKE, B=1, Q=4, M=3, D=8, P=2, dtype=torch.float32, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(lambda v: ms_deform_attn(v, *rest), value, use_reentrant=False)
    out.sum().backward()
    assert msda_cuda._verdicts  # the self-check ran, inside the checkpoint
    want = torch.autograd.grad(ms_deform_attn_reference(value, *rest).sum(), value)[0]
    torch.testing.assert_close(value.grad, want, rtol=1e-5, atol=1e-5)
