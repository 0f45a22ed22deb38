"""cpu_memory.heap_kept. Measured in a fresh process (the heap of a long test session is anything but
fresh): within it, large blocks that were freed are reused without the kernel faulting their pages in
again; on the way out, the freed pages go back to the kernel. With a stand-in C library: when it trims,
and that it does nothing off the CPU."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from appendix import cpu_memory

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20

MEASURE = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from appendix import cpu_memory

MB = 1 << 20


def page_faults_of_a_layer():
    # the minor page faults of the last of three 64 MB blocks, made after the first two were freed (as a
    # forward's layers free their outputs and the next layer makes its own)
    first, second = torch.ones(16 * MB), torch.ones(16 * MB)
    del first, second
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    third = torch.ones(16 * MB)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del third
    return faults


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


outside = sum(page_faults_of_a_layer() for _ in range(5))
before = resident()
with cpu_memory.heap_kept(torch.device("cpu")):
    for _ in range(4):  # the heap grows until the blocks fit (glibc's aligned blocks leave gaps)
        page_faults_of_a_layer()
    inside = sum(page_faults_of_a_layer() for _ in range(5))
    block = torch.ones(64 * MB)
    del block  # the heap keeps it
    kept = resident()
after = resident()
print(json.dumps(dict(outside=outside, inside=inside, before=before, kept=kept, after=after)))
"""


@pytest.fixture(scope="module")
def measured():
    if cpu_memory._libc is None:
        pytest.skip("glibc's malloc only (elsewhere heap_kept does nothing)")
    result = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT))], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_within_heap_kept_freed_blocks_are_reused_without_page_faults(measured):
    # glibc maps each block afresh: 16,384 faults a block in 4 KB pages (fewer with transparent huge pages)
    assert measured["inside"] < measured["outside"] / 10


def test_heap_kept_gives_the_freed_pages_back_on_the_way_out(measured):
    assert measured["kept"] - measured["before"] > 200 * MB  # kept for the rest of the forward
    assert measured["after"] - measured["before"] < 32 * MB


def fake_glibc(monkeypatch, free_bytes: int) -> list:
    """cpu_memory's C library replaced by one that records the calls and reports `free_bytes` free."""
    calls = []
    libc = types.SimpleNamespace(mallopt=lambda *a: calls.append(("mallopt", *a)),
                                 malloc_trim=lambda *a: calls.append(("malloc_trim", *a)),
                                 mallinfo2=lambda: types.SimpleNamespace(fordblks=free_bytes))
    monkeypatch.setattr(cpu_memory, "_libc", libc)
    return calls


def test_heap_kept_changes_nothing_off_the_cpu(monkeypatch):
    calls = fake_glibc(monkeypatch, free_bytes=1 << 30)
    with cpu_memory.heap_kept(torch.device("meta")):
        pass
    assert not calls


@pytest.mark.parametrize("free_mb, trimmed", [(1024, True), (16, False)])
def test_heap_kept_trims_on_the_way_out_only_when_much_is_free(monkeypatch, free_mb, trimmed):
    """After a small image's forward the heap keeps its pages: trimming after each of the demo's 100
    validation images made their evaluation 1.4x slower."""
    calls = fake_glibc(monkeypatch, free_bytes=free_mb * MB)
    with cpu_memory.heap_kept(torch.device("cpu")):
        assert [c[0] for c in calls] == ["mallopt"] * len(cpu_memory.KEEP)
    assert [c[0] for c in calls] == (["mallopt"] * (len(cpu_memory.KEEP) + len(cpu_memory.DEFAULT))
                                     + ["malloc_trim"] * trimmed)
