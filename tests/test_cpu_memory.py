"""cpu_memory.heap_kept, measured on the process itself: within it, a large block that was freed is reused
without the kernel faulting its pages in again; on the way out, the freed pages go back to the kernel."""
import resource
import types

import pytest
import torch

import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory._libc is None, reason="glibc's malloc only (elsewhere heap_kept does nothing)")

MB = 1 << 20
PAGE = 4096


def page_faults_of_a_layer() -> int:
    """The minor page faults of the last of three 64 MB blocks, made after the first two were freed (as a
    forward's layers free their outputs and the next layer makes its own)."""
    first, second = torch.ones(16 * MB), torch.ones(16 * MB)
    del first, second
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    third = torch.ones(16 * MB)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del third
    return faults


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_within_heap_kept_freed_blocks_are_reused_without_page_faults():
    outside = sum(page_faults_of_a_layer() for _ in range(5))  # glibc maps each afresh: 16,384 faults each
    with cpu_memory.heap_kept(torch.device("cpu")):
        inside = sum(page_faults_of_a_layer() for _ in range(5))
    assert inside < outside / 2


def test_heap_kept_gives_the_freed_pages_back_on_the_way_out():
    before = resident_bytes()
    with cpu_memory.heap_kept(torch.device("cpu")):
        block = torch.ones(64 * MB)
        del block  # the heap keeps it
        inside = resident_bytes()
    after = resident_bytes()
    assert inside - before > 200 * MB  # kept for the rest of the forward
    assert after - before < 32 * MB


def test_heap_kept_changes_nothing_off_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_libc", types.SimpleNamespace(mallopt=lambda *a: calls.append(a),
                                                                  malloc_trim=lambda *a: calls.append(a)))
    with cpu_memory.heap_kept(torch.device("meta")):
        pass
    assert not calls
    with cpu_memory.heap_kept(torch.device("cpu")):
        pass
    assert len(calls) == len(cpu_memory.KEEP) + len(cpu_memory.DEFAULT) + 1
