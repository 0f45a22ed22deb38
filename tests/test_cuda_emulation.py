"""tests/cuda_emulation.h itself, on small kernels of its own: the kernel tests trust it to number threads,
to shuffle and add as a GPU does, and to refuse what a GPU leaves undefined."""
import shutil
import subprocess

import pytest

from msda_emulation import EMULATOR

PROGRAM = r"""
#include <cstdio>
#include "cuda_emulation.h"

__global__ void number_threads(int* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1000 * blockIdx.x + threadIdx.x;
}

__global__ void group_sums(float* out, int lanes) {  // the butterfly the MSDA backward uses
  float x = threadIdx.x;
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  out[threadIdx.x] = x;
}

__global__ void add_up(float* total, float4* totals) {
  atomicAdd(total, 1.0f);
  atomicAdd(totals, make_float4(1, 2, 3, 4));
}

__global__ void shuffle_after_a_return(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

int main() {
  std::vector<int> numbers(3 * 64);
  cuda_emulation::launch(number_threads, dim3(3), dim3(64), numbers.data());
  for (int i : numbers) printf("%d ", i);
  printf("\n");
  std::vector<float> sums(64);
  cuda_emulation::launch(group_sums, dim3(1), dim3(64), sums.data(), 8);
  for (float s : sums) printf("%g ", s);
  printf("\n");
  float total = 0;
  float4 totals = make_float4(0, 0, 0, 0);
  cuda_emulation::launch(add_up, dim3(2), dim3(128), &total, &totals);
  printf("%g %g %g %g %g\n", total, totals.x, totals.y, totals.z, totals.w);
  try {
    cuda_emulation::launch(shuffle_after_a_return, dim3(1), dim3(32), sums.data());
    printf("no error\n");
  } catch (const std::exception& e) {
    printf("error: %s\n", e.what());
  }
}
"""


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    folder = tmp_path_factory.mktemp("emulation")
    (folder / "program.cpp").write_text(PROGRAM)
    subprocess.run([compiler, "-std=c++17", "-I", str(EMULATOR.parent), "-o", str(folder / "program"),
                    str(folder / "program.cpp")], check=True)
    return subprocess.run([str(folder / "program")], check=True, capture_output=True, text=True).stdout.splitlines()


def test_threads_are_numbered_as_on_a_gpu(output):
    assert [int(i) for i in output[0].split()] == [1000 * b + t for b in range(3) for t in range(64)]


def test_xor_shuffles_sum_each_group_of_lanes(output):
    sums = [float(s) for s in output[1].split()]
    assert sums == [sum(range(t // 8 * 8, t // 8 * 8 + 8)) for t in range(64)]


def test_atomics_add_every_thread(output):
    assert [float(x) for x in output[2].split()] == [256, 256, 512, 768, 1024]


def test_a_shuffle_after_a_lane_returned_is_an_error(output):
    assert output[3].startswith("error:") and "16 lanes" in output[3] and "after the other 16 had returned" in output[3]
