"""Plumbing for inference on the CPU (not in the paper): glibc's malloc keeps the memory an image's forward
frees, for the rest of that forward.

glibc serves each allocation above its mmap threshold (at most 32 MB) with a fresh mapping from the
kernel, and unmaps it when it is freed. A forward at 800x1333 allocates and frees tensors of 20 to 180 MB
dozens of times (the backbone's feature maps, the encoder's values and feed-forward activations, layer
after layer), and the kernel pays a page fault and a page of zeroes for every 4 KB of each new mapping when
it is first touched. jemalloc and tcmalloc, which torch's CPU tuning guide suggests preloading, avoid
this by caching freed memory. `heap_kept` asks glibc for the same during one forward: every block from
the heap, freed blocks kept there for the next layer. On the way out, where the heap holds more than
TRIM_ABOVE free, malloc_trim hands the freed pages back, so that memory does not pile up from image to
image; a small image's forward (whose blocks glibc keeps in its heap anyway) is left alone.

Measured (R50, 2 cores): 800x1333, 1.11-1.15x as fast (bench/inference_cpu.py); 60 images of mixed sizes around
800x1333, 177 s against 207 s, peak memory 2.2 GB against 3.2 GB (glibc's heap fragments over the images).
Kept for the whole process instead, the process grew by about 50 MB per image; trimmed after every image
however small, the demo's 100 validation images (200x333) took 1.4x as long.
"""
import contextlib
import ctypes
import os
import sys

import torch

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no mappings; never give the heap's top back
# glibc's defaults as they stand once its threshold has adapted to large blocks: mappings from 32 MB,
# the heap's top trimmed above 64 MB
DEFAULT = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
TRIM_ABOVE = 256 << 20  # free bytes in the heap above which the way out hands them back


def _glibc():
    """The C library if it is glibc (Linux, not musl; not macOS or Windows, whose allocators differ), else None."""
    if sys.platform != "linux" or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        return None
    return ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = _glibc()
if _libc is not None and hasattr(_libc, "mallinfo2"):
    _libc.mallinfo2.restype = _Mallinfo2


def _free_heap_bytes() -> float:
    """The free bytes in malloc's heap (mallinfo2, glibc 2.33 and newer; infinity where it is missing). They
    include pages already handed back: after one large image, every later forward ends with a trim."""
    return _libc.mallinfo2().fordblks if hasattr(_libc, "mallinfo2") else float("inf")


@contextlib.contextmanager
def heap_kept(device: torch.device):
    """Within: malloc keeps freed memory for reuse, on the CPU under glibc (elsewhere, nothing changes).
    On the way out, glibc's behaviour again, and the freed pages given back where more than TRIM_ABOVE is free."""
    if _libc is None or device.type != "cpu":
        yield
        return
    for parameter, value in KEEP.items():
        _libc.mallopt(parameter, value)
    try:
        yield
    finally:
        for parameter, value in DEFAULT.items():
            _libc.mallopt(parameter, value)
        if _free_heap_bytes() > TRIM_ABOVE:
            _libc.malloc_trim(0)
