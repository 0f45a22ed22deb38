// CUDA's thread model on the CPU, for the few parts of it that msda_cuda/ms_deform_attn.cu uses, so that
// its kernels run, unchanged, on a machine without a GPU: the tests build the .cu as C++ with
// -DMSDA_EMULATE (tests/msda_emulation.py) and check it against the PyTorch reference, under
// AddressSanitizer as well, which catches any read or write outside a tensor.
//
// A launch runs its blocks one after another and a block its warps one after another. The 32 lanes of a
// warp are fibers (ucontext) on one thread, run in lock step: each lane runs to its next warp shuffle,
// then the next lane does, and once every lane has arrived they all read each other's values and go on,
// as on a GPU. What a GPU leaves undefined is an error here: a shuffle over a partial mask (not
// emulated), and a shuffle that some lane of the warp has returned before (it would read a register
// nobody wrote). It checks indexing, arithmetic and the shuffle protocol on small shapes; not speed,
// memory ordering or races between writers.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>  // tell ASan when the stack changes under it
#define EMULATION_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMULATION_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define EMULATION_START_SWITCH(save, bottom, size)
#define EMULATION_FINISH_SWITCH(save, bottom, size)
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// the built-in variables, per lane
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 << 10;  // per lane; ASan's frames are larger than plain ones

enum class LaneState { running, at_shuffle, returned };

// One warp: the scheduler's context, 32 lane fibers, and the registers their shuffles exchange.
struct Warp {
  ucontext_t scheduler;
  ucontext_t lanes[kWarpSize];
  LaneState state[kWarpSize];
  std::string error[kWarpSize];
  alignas(16) unsigned char slots[kWarpSize][16];
  std::vector<char> stacks = std::vector<char>(kWarpSize * kStackBytes);
  const void* scheduler_stack = nullptr;  // for ASan
  size_t scheduler_stack_size = 0;
  void* fake_stack[kWarpSize + 1] = {};
};

inline thread_local Warp* this_warp = nullptr;
inline thread_local int this_lane = 0;

// From a lane: back to the scheduler until every lane has reached the same point.
inline void yield_to_scheduler(LaneState state) {
  Warp& warp = *this_warp;
  const int lane = this_lane;
  warp.state[lane] = state;
  EMULATION_START_SWITCH(state == LaneState::returned ? nullptr : &warp.fake_stack[lane], warp.scheduler_stack,
                         warp.scheduler_stack_size);
  swapcontext(&warp.lanes[lane], &warp.scheduler);
  EMULATION_FINISH_SWITCH(warp.fake_stack[lane], &warp.scheduler_stack, &warp.scheduler_stack_size);
}

template <typename Kernel>
struct LaneEntry {
  static inline thread_local const Kernel* kernel = nullptr;
  static void run() {
    EMULATION_FINISH_SWITCH(nullptr, &this_warp->scheduler_stack, &this_warp->scheduler_stack_size);
    try {
      (*kernel)();
    } catch (const std::exception& e) {
      this_warp->error[this_lane] = e.what();
    }
    yield_to_scheduler(LaneState::returned);  // never resumed
  }
};

// Runs kernel(args...) on a grid of `blocks` x `threads` (1-D), warp by warp as described above.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 blocks, dim3 threads, Args... args) {
  if (blocks.y != 1 || blocks.z != 1 || threads.y != 1 || threads.z != 1 || threads.x % kWarpSize != 0) {
    throw std::invalid_argument("cuda_emulation: only 1-D launches of whole warps are emulated");
  }
  const auto body = [&] { kernel(args...); };
  using Entry = LaneEntry<decltype(body)>;
  Entry::kernel = &body;
  Warp warp;
  this_warp = &warp;
  blockDim = threads;
  gridDim = blocks;
  for (unsigned block = 0; block < blocks.x; ++block) {
    blockIdx = dim3(block);
    for (unsigned first = 0; first < threads.x; first += kWarpSize) {
      for (int lane = 0; lane < kWarpSize; ++lane) {
        getcontext(&warp.lanes[lane]);
        warp.lanes[lane].uc_stack.ss_sp = warp.stacks.data() + lane * kStackBytes;
        warp.lanes[lane].uc_stack.ss_size = kStackBytes;
        warp.lanes[lane].uc_link = nullptr;
        makecontext(&warp.lanes[lane], &Entry::run, 0);
        warp.state[lane] = LaneState::running;
      }
      // each round runs every lane to its next shuffle (or to its end): the lanes move in lock step
      for (bool done = false; !done;) {
        for (int lane = 0; lane < kWarpSize; ++lane) {
          if (warp.state[lane] == LaneState::returned) continue;
          this_lane = lane;
          threadIdx = dim3(first + lane);
          EMULATION_START_SWITCH(&warp.fake_stack[kWarpSize], warp.stacks.data() + lane * kStackBytes, kStackBytes);
          swapcontext(&warp.scheduler, &warp.lanes[lane]);
          EMULATION_FINISH_SWITCH(warp.fake_stack[kWarpSize], nullptr, nullptr);
        }
        int returned = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) {
          if (!warp.error[lane].empty()) {
            throw std::runtime_error("cuda_emulation: block " + std::to_string(block) + ", thread " +
                                     std::to_string(first + lane) + ": " + warp.error[lane]);
          }
          returned += warp.state[lane] == LaneState::returned;
        }
        if (returned > 0 && returned < kWarpSize) {
          throw std::runtime_error("cuda_emulation: block " + std::to_string(block) + ": " +
                                   std::to_string(kWarpSize - returned) + " lanes of the warp from thread " +
                                   std::to_string(first) + " entered a full-warp shuffle after the other " +
                                   std::to_string(returned) + " had returned");
        }
        done = returned == kWarpSize;
      }
    }
  }
}

}  // namespace cuda_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = cuda_emulation::kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "cuda_emulation: shuffle of a large type");
  using namespace cuda_emulation;
  if (mask != 0xffffffffu || width != kWarpSize) throw std::invalid_argument("only full-warp shuffles are emulated");
  std::memcpy(this_warp->slots[this_lane], &value, sizeof(T));
  yield_to_scheduler(LaneState::at_shuffle);  // every lane has written
  T other;
  std::memcpy(&other, this_warp->slots[this_lane ^ lane_mask], sizeof(T));
  yield_to_scheduler(LaneState::at_shuffle);  // every lane has read
  return other;
}

// One thread runs all lanes, so a read-modify-write is atomic as it stands.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float4 atomicAdd(float4* address, float4 value) {  // sm_90's 16-byte atomic
  const float4 old = *address;
  *address = make_float4(old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w);
  return old;
}
