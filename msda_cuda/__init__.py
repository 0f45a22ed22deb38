"""Multi-scale deformable attention: one entry point, `ms_deform_attn`.

CUDA tensors go through the kernel in ms_deform_attn.cu, CPU tensors through the one in
ms_deform_attn_cpu.cpp (C++ and OpenMP over torch's threads; bf16 and fp16 values in float32), each
compiled just in time on first use (about a minute; cached by torch in ~/.cache/torch_extensions
afterwards); every case a kernel does not cover goes through the reference, Eq. 3 in plain PyTorch
(`deformable_attn.ms_deform_attn_reference`, the chapter's own form). If a build fails, one warning says
why and the reference is used. DINO_MSDA=reference forces the reference. Anything traced for export goes
through one of two formulations, `traced_as("gather")` (gather.py: gathers and arithmetic) or
`traced_as("grid_sample")` (the reference).

The chapter imports this package, and this package reads the chapter's reference when it runs (`_reference`),
not when it is imported: either can be imported first.

Each kernel checks itself: the first time it meets a dtype and head size in a process, it runs a small
random problem (an odd batch, every level, points beyond the borders) through itself and through the
reference, forward and all three gradients; if they disagree beyond the dtype's tolerance, one warning
gives the error and the reference takes over for that case. It costs a few milliseconds once;
DINO_MSDA_SELF_CHECK=0 turns it off.

Under torch.compile the attention is one opaque operator, `torch.ops.dino.ms_deform_attn`, so the
compiler neither traces the kernel nor the host reads of the level layout.
"""
import contextlib
import functools
import os
import shutil
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from appendix.precision import at_least_float32

from .gather import ms_deform_attn_gather

__all__ = ["ms_deform_attn", "ms_deform_attn_gather", "level_layout",
           "level_start_index_of", "build_extension", "build_cpu_extension", "traced_as", "TRACED_FORMULATIONS"]

_SOURCE = Path(__file__).with_name("ms_deform_attn.cu")
_CPU_SOURCE = Path(__file__).with_name("ms_deform_attn_cpu.cpp")
_builds: dict[str, object] = {}  # "CUDA" / "CPU" -> the compiled extension, None if it failed
_build_errors: dict[str, str] = {}
_checked_metadata: dict[int, tuple] = {}  # id(spatial_shapes) -> (weak reference to it, what was checked)
TRACED_FORMULATIONS = ("gather", "grid_sample")
_traced = ["grid_sample"]  # the formulation a trace records (export.py chooses it with traced_as)


def _reference():
    """Eq. 3 in plain PyTorch, `deformable_attn.ms_deform_attn_reference`: what every case a kernel does not
    cover runs, and what each kernel's self-check compares against. Imported on use: deformable_attn imports
    this package."""
    from deformable_attn import ms_deform_attn_reference
    return ms_deform_attn_reference


def _formulation(name: str):
    """The function a trace records for TRACED_FORMULATIONS' `name`."""
    return ms_deform_attn_gather if name == "gather" else _reference()


@contextlib.contextmanager
def traced_as(formulation: str):
    """Within it, a trace (torch.onnx.export) records the attention as `formulation`, one of TRACED_FORMULATIONS:
    "gather" (gather.py) or "grid_sample" (the reference)."""
    if formulation not in TRACED_FORMULATIONS:
        raise ValueError(f"formulation must be one of {sorted(TRACED_FORMULATIONS)}, got {formulation!r}")
    _traced.append(formulation)
    try:
        yield
    finally:
        _traced.pop()


def level_start_index_of(spatial_shapes: Tensor) -> Tensor:
    """spatial_shapes (L, 2) long, (H_l, W_l) -> level_start_index (L,): the first token of each level
    in value's S = sum_l H_l * W_l tokens, levels one after another."""
    return torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])


def _level_layout(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # usable by autograd even if first made under inference mode
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long).to(device)
        return spatial_shapes, level_start_index_of(spatial_shapes)


_level_layouts = functools.lru_cache(maxsize=256)(_level_layout)


def level_layout(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """spatial_shapes (L, 2) and level_start_index (L,) for the (H_l, W_l) in `shapes`, on `device`: made
    once per layout in eager forwards, the same two tensors every forward, so that neither copying them to
    the GPU nor ms_deform_attn's check of them (a read back to the host) waits for the GPU again. (A
    compiled forward makes them inside its graph, where they are constants.)"""
    return _level_layout(shapes, device) if torch.compiler.is_compiling() else _level_layouts(shapes, device)


def _ninja_on_path() -> None:
    """torch's extension builds run `ninja`: the pip package's binary, when the virtual environment that
    holds it is not activated, is not on PATH."""
    if shutil.which("ninja") is None:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_extension(verbose: bool = False):
    """Compile (or load the cached build of) the CUDA kernel. Raises if the build fails."""
    from torch.utils import cpp_extension
    _ninja_on_path()
    # torch guesses CUDA_HOME from where `nvcc` is; when that is a wrapper script (e.g. /usr/local/bin/nvcc)
    # the guess holds no headers or libcudart: take the standard install location instead
    if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h").exists():
        if Path("/usr/local/cuda/include/cuda_runtime.h").exists():
            cpp_extension.CUDA_HOME = "/usr/local/cuda"
    return cpp_extension.load(name="dino_msda", sources=[str(_SOURCE)], verbose=verbose,
                              extra_cuda_cflags=["-O3"])


# the vector instructions the CPU kernel is compiled for, by torch's reading of this CPU: 3x the speed of a
# build for the x86-64 baseline (SSE2). Each set is its own build, so a cache shared by different CPUs
# never hands one a build it cannot run.
_CPU_INSTRUCTIONS = {"AVX2": ["-mavx2", "-mfma"],
                     "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]}


def build_cpu_extension(verbose: bool = False):
    """Compile (or load the cached build of) the CPU kernel with the host's C++ compiler and OpenMP, for the
    vector instructions this CPU has. Raises if the build fails."""
    from torch.utils import cpp_extension
    _ninja_on_path()
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CPU_INSTRUCTIONS.get(capability, [])
    name = "dino_msda_cpu" + (f"_{capability.lower()}" if flags else "")
    return cpp_extension.load(name=name, sources=[str(_CPU_SOURCE)], verbose=verbose,
                              extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])


def _built(kind: str, build):
    """The extension `build` makes, built once per process; None (with one warning) if it cannot be."""
    if kind not in _builds:
        print(f"msda_cuda: compiling the multi-scale deformable attention {kind} kernel (once; cached afterwards)...",
              flush=True)
        try:
            _builds[kind] = build()
        except Exception as e:  # noqa: BLE001 - any build failure falls back to the reference
            _builds[kind] = None
            _build_errors[kind] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"msda_cuda: the {kind} kernel could not be built ({_build_errors[kind]}); "
                          f"using the PyTorch reference, which is slower", stacklevel=6)
    return _builds[kind]


def _kernel():
    """The compiled CUDA extension, or None (with one warning) if it cannot be built."""
    return _built("CUDA", build_extension)


def _cpu_kernel():
    """The compiled CPU extension, or None (with one warning) if it cannot be built."""
    return _built("CPU", build_cpu_extension)


def _vector_width(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def _kernel_covers(value: Tensor) -> bool:
    """The kernel's group of threads per head, D / V, must be a power of two of at most 32."""
    D = value.shape[-1]
    V = _vector_width(value.dtype)
    threads_per_head = D // V if D % V == 0 else D
    return (value.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) and threads_per_head <= 32
            and threads_per_head & (threads_per_head - 1) == 0)


def _check(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
           attention_weights: Tensor) -> None:
    """The arguments' shapes and devices (no data is read: this runs under torch.compile too)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got {tuple(value.shape)}")
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, M, L, P, 2), got {tuple(sampling_locations.shape)}")
    _, Q, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} disagrees with value "
                         f"{tuple(value.shape)} in batch or heads")
    if attention_weights.shape != (B, Q, M, L, P):
        raise ValueError(f"attention_weights must be (B, Q, M, L, P) = {(B, Q, M, L, P)}, "
                         f"got {tuple(attention_weights.shape)}")
    if spatial_shapes.shape != (L, 2) or level_start_index.shape != (L,):
        raise ValueError(f"spatial_shapes must be (L, 2) and level_start_index (L,) with L = {L} levels, got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) > 1:
        raise ValueError(f"value, sampling_locations and attention_weights must be on one device, got {devices}")


def _check_layout(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> None:
    """level_start_index and the token count agree with spatial_shapes. That reads them (a device-to-host
    copy), once per tensor: a model passes the same two tensors to all its layers."""
    S = value.shape[1]
    cacheable = not (spatial_shapes.is_inference() or level_start_index.is_inference())  # no version counter
    if cacheable:
        checked = (spatial_shapes._version, id(level_start_index), level_start_index._version, S)
        seen = _checked_metadata.get(id(spatial_shapes))
        if seen is not None and seen[0]() is spatial_shapes and seen[1] == checked:
            return
    shapes = spatial_shapes.cpu()
    starts = level_start_index_of(shapes).tolist()
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
                         f"{shapes.tolist()} (expected {starts})")
    if int(shapes.prod(1).sum()) != S:
        raise ValueError(f"spatial_shapes {shapes.tolist()} hold {int(shapes.prod(1).sum())} tokens but value has S = {S}")
    if not cacheable:
        return
    if len(_checked_metadata) > 256:  # entries of freed tensors
        _checked_metadata.clear()
    _checked_metadata[id(spatial_shapes)] = (weakref.ref(spatial_shapes), checked)


def _aligned(t: Tensor) -> Tensor:
    """Contiguous and 16-byte aligned, for the kernel's vector loads (a view may start mid-vector)."""
    t = _dense(t)
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _dense(t: Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """t in dtype, on device, contiguous, with no operator called where it already is (each one costs the host a
    dispatch, in every layer of every step)."""
    if (dtype is not None and t.dtype != dtype) or (device is not None and t.device != device):
        t = t.to(device=device, dtype=dtype)
    return t if t.is_contiguous() else t.contiguous()


class _MSDeformAttnFunction(torch.autograd.Function):
    """The attention through a compiled `extension` (the CUDA kernel, the CPU kernel, or in the tests the
    CUDA kernel emulated on the CPU): its forward, and its backward for the gradients."""

    @staticmethod
    def forward(ctx, extension, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        coord = at_least_float32(value.dtype)  # locations and weights: float32 at least (appendix/precision.py)
        ctx.extension, ctx.dtypes = extension, (sampling_locations.dtype, attention_weights.dtype)
        value = _aligned(value)
        locations, weights = _dense(sampling_locations, coord), _dense(attention_weights, coord)
        spatial_shapes, level_start_index = _dense(spatial_shapes, device=value.device), _dense(level_start_index, device=value.device)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        return extension.forward(value, spatial_shapes, level_start_index, locations, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.backward(
            value, spatial_shapes, level_start_index, locations, weights, _aligned(grad_output))
        return None, grad_value, None, None, _dense(grad_locations, ctx.dtypes[0]), _dense(grad_weights, ctx.dtypes[1])


# --- the self-check ---------------------------------------------------------------------------------------

# largest error allowed, relative to the largest reference value, of the forward and of each gradient:
# about 20x what a correct kernel shows (fp32 8.6e-7, fp16 4.2e-4, bf16 3.6e-3 in tests/test_msda_cuda.py)
SELF_CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SELF_CHECK_LEVELS = [(7, 9), (4, 5), (2, 3), (1, 1)]  # odd sizes and a 1x1 level
_verdicts: dict[tuple, bool] = {}  # (device, dtype, M, D) -> the kernel agreed with the reference


def self_check_error(extension, device: torch.device, dtype: torch.dtype, heads: int, channels: int) -> float:
    """Largest relative error of the compiled `extension` on `device` against the float64
    reference, over the forward and the gradients of value, locations and weights, on a small random
    problem: batch 3, every level of SELF_CHECK_LEVELS, locations 20% beyond each border. Draws from a
    generator of its own: the caller's random stream is untouched."""
    # tensors made under inference mode take no gradient; inside activation checkpointing, the checkpoint's
    # saved-tensor hooks would count the self-check's saved tensors as the layer's: hooks of its own
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                                                     lambda t: t):
        g = torch.Generator().manual_seed(0)
        shapes = torch.tensor(SELF_CHECK_LEVELS)
        S, L, B, Q, P = int(shapes.prod(1).sum()), len(SELF_CHECK_LEVELS), 3, 5, 2
        coord = at_least_float32(dtype)
        value = torch.randn(B, S, heads, channels, generator=g)
        locations = torch.rand(B, Q, heads, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
        weights = torch.rand(B, Q, heads, L, P, generator=g, dtype=torch.float64)
        grad = torch.randn(B, Q, heads * channels, generator=g, dtype=torch.float64)
        spatial_shapes = shapes.to(device)
        level_start_index = level_start_index_of(spatial_shapes)
        results = []
        for run, values, coords in ((functools.partial(_MSDeformAttnFunction.apply, extension), dtype, coord),
                                    (_reference(), torch.float64, torch.float64)):
            inputs = [t.to(device, d).requires_grad_() for t, d in ((value, values), (locations, coords),
                                                                   (weights, coords))]
            out = run(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
            grads = torch.autograd.grad(out, inputs, grad.to(device, out.dtype))
            results.append([t.detach().double() for t in (out, *grads)])
    errors = [((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
              for got, want in zip(*results)]
    return max(errors) if all(e == e for e in errors) else float("nan")


def _kernel_trusted(extension, device: torch.device, dtype: torch.dtype, heads: int, channels: int) -> bool:
    """Whether the kernel passed its self-check for this device, dtype and head shape (run on the first
    call). A kernel that fails it warns once and is not used for that case again in this process."""
    if os.environ.get("DINO_MSDA_SELF_CHECK") == "0":
        return True
    key = (device, dtype, heads, channels)
    if key not in _verdicts:
        error = self_check_error(extension, device, dtype, heads, channels)
        _verdicts[key] = error <= SELF_CHECK_TOLERANCE[dtype]  # NaN: False
        if not _verdicts[key]:
            warnings.warn(f"msda_cuda: the kernel disagrees with the reference on {device} for "
                          f"{str(dtype).removeprefix('torch.')} values with {heads} heads of {channels} channels "
                          f"(relative error {error:.2e}, tolerance {SELF_CHECK_TOLERANCE[dtype]:.0e}); "
                          f"using the PyTorch reference instead. Please report this with your "
                          f"{'GPU' if device.type == 'cuda' else 'CPU'} and torch version.", stacklevel=5)
    return _verdicts[key]


# --- dispatch -------------------------------------------------------------------------------------------------

def _kernel_for(value: Tensor) -> tuple[object, torch.dtype]:
    """(the compiled kernel that computes this call, the dtype it computes in), or (None, None) for the
    reference: the CUDA kernel for the CUDA tensors it covers, in their dtype; the CPU kernel for CPU
    tensors, in float32 for bf16 and fp16 values (as their sums are anyway; the kernel is several times
    faster than the reference in either); each once it built and passed its self-check. Never while
    tracing (ONNX export: the graph holds the formulation traced_as chose), nor with DINO_MSDA=reference."""
    if os.environ.get("DINO_MSDA") == "reference" or torch.jit.is_tracing():
        return None, None
    if value.is_cuda and _kernel_covers(value):
        extension, dtype = _kernel(), value.dtype
    elif value.device.type == "cpu" and value.dtype in SELF_CHECK_TOLERANCE:
        extension, dtype = _cpu_kernel(), at_least_float32(value.dtype)
    else:
        return None, None
    if extension is None or not _kernel_trusted(extension, value.device, dtype, *value.shape[2:]):
        return None, None
    return extension, dtype


def _run(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
         attention_weights: Tensor, check_layout: bool = True) -> Tensor:
    """The attention through a kernel or the reference, on real tensors."""
    if check_layout:
        _check_layout(value, spatial_shapes, level_start_index)
    extension, dtype = _kernel_for(value)
    if extension is None:
        formulation = _formulation(_traced[-1]) if torch.jit.is_tracing() else _reference()
        return formulation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _dense(_MSDeformAttnFunction.apply(extension, _dense(value, dtype), spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights), value.dtype)


@torch.library.custom_op("dino::ms_deform_attn", mutates_args=())
def _compiled_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor) -> Tensor:
    """What torch.compile sees: one operator, run eagerly. Its output is a new tensor, never a view.
    The level layout is not read back here: a compiled graph makes it anew each call, and a read would
    stop the host at every layer (and is not allowed at all while CUDA graphs are being captured)."""
    with torch.no_grad():
        return _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    check_layout=False)


@_compiled_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, M, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], M * D)


def _op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("dino::ms_deform_attn_backward", mutates_args=())
def _compiled_op_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of value, sampling_locations and attention_weights, as one operator run eagerly (a compiled
    training step's backward): the kernel's own backward where a kernel computes the forward, else autograd
    through the reference, run again."""
    extension, dtype = _kernel_for(value)
    if extension is not None:
        coord = at_least_float32(dtype)
        grads = extension.backward(_aligned(_dense(value, dtype)), _dense(spatial_shapes), _dense(level_start_index),
                                   _dense(sampling_locations, coord), _dense(attention_weights, coord),
                                   _aligned(_dense(grad_output, dtype)))  # new tensors: none is an input's alias
        return tuple(_dense(g, t.dtype) for g, t in zip(grads, (value, sampling_locations, attention_weights)))
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
        out = _reference()(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
        return torch.autograd.grad(out, inputs, grad_output)


@_compiled_op_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _op_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
    grads = _compiled_op_backward(grad_output, value, spatial_shapes, level_start_index, locations, weights)
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    value_grad, location_grad, weight_grad = (g if need else None for g, need in zip(grads, needed))
    return value_grad, None, None, location_grad, weight_grad


_compiled_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (B, S, M, D), spatial_shapes (L, 2) long, level_start_index (L,) long,
    sampling_locations (B, Q, M, L, P, 2) in [0, 1], attention_weights (B, Q, M, L, P) -> (B, Q, M * D).
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.compiler.is_compiling():
        return _compiled_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
