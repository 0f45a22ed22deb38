"""Builds msda_cuda/ms_deform_attn.cu as plain C++ whose kernels run on the CPU under tests/cuda_emulation.h,
so that the kernels' indexing, arithmetic and warp shuffles are checked on machines without a GPU.

`build_emulated_extension()` gives a module with the CUDA extension's `forward` and `backward`, taking CPU
tensors; with `sanitize=True` it is built with AddressSanitizer, which must then be loaded first
(`asan_environment()`), so that run in a child process.
"""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from msda_cuda import _ninja_on_path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "msda_cuda" / "ms_deform_attn.cu"
EMULATOR = ROOT / "tests" / "cuda_emulation.h"
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def build_emulated_extension(sanitize: bool = False, mutation: tuple[str, str] | None = None):
    """mutation (old, new): build a copy of the kernel source with `old` replaced by `new` (once, and it
    must be there): a deliberately broken kernel, for the tests of its self-check."""
    from torch.utils import cpp_extension
    _ninja_on_path()
    cflags = ["-O1", "-g", "-Wno-unknown-pragmas"] + (ASAN_FLAGS if sanitize else [])
    source, include = KERNEL.read_text(), KERNEL.parent
    if mutation is not None:
        assert source.count(mutation[0]) == 1, f"{mutation[0]!r} is not in {KERNEL.name} exactly once"
        source = source.replace(*mutation)
    # the sources come in through #include, which torch does not hash: name the build after their contents
    digest = hashlib.sha256(source.encode() + EMULATOR.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    if mutation is not None:
        include = Path(cpp_extension._get_build_directory(f"dino_msda_mutant_{digest}", verbose=False))
        (include / KERNEL.name).write_text(source)
    return cpp_extension.load_inline(
        name=f"dino_msda_emulated_{digest}", cpp_sources=['#define MSDA_EMULATE\n#include "ms_deform_attn.cu"\n'],
        extra_include_paths=[str(include), str(EMULATOR.parent)], extra_cflags=cflags,
        extra_ldflags=ASAN_FLAGS if sanitize else [], with_cuda=False)


def asan_environment() -> dict[str, str] | None:
    """The environment for a child process that loads the sanitized build, or None where gcc has no ASan."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    runtime = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(runtime).is_file():
        return None
    # leaks: Python and torch keep allocations alive until exit, by design
    return {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"}
