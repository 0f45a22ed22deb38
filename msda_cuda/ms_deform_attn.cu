// Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159v4, Eq. 3): forward and backward.
//
// Shapes (B batch, S = sum_l H_l*W_l tokens, M heads, D channels per head, Q queries, L levels, P points):
//   value              (B, S, M, D)        scalar_t: double, float, half or bfloat16
//   spatial_shapes     (L, 2)              int64, (H_l, W_l)
//   level_start_index  (L,)                int64, first token of level l
//   sampling_locations (B, Q, M, L, P, 2)  coord_t (double for double values, float otherwise), (x, y) in [0, 1]
//   attention_weights  (B, Q, M, L, P)     coord_t
//   output             (B, Q, M*D)         scalar_t; sums are accumulated in acc_t (double or float)
//
// Bilinear sampling, as F.grid_sample(align_corners=False, padding_mode="zeros"):
//   a location (x, y) of level l sits at pixel coordinates px = x * W - 0.5, py = y * H - 0.5.
//   With x0 = floor(px), y0 = floor(py), fx = px - x0, fy = py - y0, the four neighbours and weights are
//     v00 = v[y0][x0]   (1-fy)(1-fx)      v01 = v[y0][x0+1]   (1-fy) fx
//     v10 = v[y0+1][x0] fy (1-fx)         v11 = v[y0+1][x0+1] fy fx
//   and a neighbour outside the H x W map counts as v = 0.
//   sample = sum_k c_k v_k, out[d] = sum_{l,p} a_lp sample_lp[d].
// Gradients, for the loss gradient g[d] = dLoss/dout[d]:
//   dL/da_lp      = sum_d g[d] sample_lp[d]
//   dL/dv_k[d]   += a_lp c_k g[d]                                   (scattered: atomic adds)
//   d sample/d px = (1-fy)(v01 - v00) + fy (v11 - v10),  d px/dx = W
//   d sample/d py = (1-fx)(v10 - v00) + fx (v11 - v01),  d py/dy = H
//   dL/dx_lp      = a_lp W sum_d g[d] d sample/d px,  dL/dy_lp = a_lp H sum_d g[d] d sample/d py
//
// Work split: a group of threads_per_head = D / V threads owns one (b, q, m); each thread owns V
// consecutive channels, read and written as one 16-byte vector (V = 4 floats, 8 halves, 2 doubles), so a
// group reads a whole value row of the head at once, coalesced. Reductions over the channels (the
// gradients of the locations and weights) are warp shuffles inside the group: threads_per_head is a power
// of two dividing 32, and each (b, q, m, l, p) result has exactly one writer, so only grad_value needs
// atomics. grad_value for half types accumulates in a float32 buffer.
//
// Built with -DMSDA_EMULATE, this file is plain C++ and its kernels run on the CPU under
// tests/cuda_emulation.h: that is how the tests check the kernels on machines without a GPU.
#include <torch/extension.h>
#ifdef MSDA_EMULATE
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void load(const scalar_t* p, acc_t (&out)[V]) {
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);  // one 16-byte load
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(pack.v[i]);
}

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void store(scalar_t* p, const acc_t (&in)[V]) {
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = pack;
}

template <typename grad_t, typename acc_t, int V>
__device__ __forceinline__ void atomic_add(grad_t* p, const acc_t (&in)[V], acc_t scale) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(MSDA_EMULATE)  // the emulator takes Hopper's path
  constexpr bool vector_atomic = std::is_same_v<grad_t, float> && V % 4 == 0;  // 16-byte atomics on Hopper
#else
  constexpr bool vector_atomic = false;
#endif
  if constexpr (vector_atomic) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i),
                make_float4(in[i] * scale, in[i + 1] * scale, in[i + 2] * scale, in[i + 3] * scale));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, static_cast<grad_t>(in[i] * scale));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

struct Dims {
  int64_t groups;  // B * Q * M
  int S, M, D, Q, L, P;
};

// Where (x, y) lands on a level: the pixel coordinates and whether any neighbour is inside the map.
template <typename acc_t>
struct Bilinear {
  int x0, y0;
  acc_t fx, fy;
  bool inside;
  __device__ __forceinline__ Bilinear(acc_t x, acc_t y, int H, int W) {
    const acc_t px = x * W - acc_t(0.5), py = y * H - acc_t(0.5);
    inside = px > acc_t(-1) && py > acc_t(-1) && px < acc_t(W) && py < acc_t(H);
    const acc_t fpx = floor(px), fpy = floor(py);
    x0 = static_cast<int>(inside ? fpx : acc_t(0));
    y0 = static_cast<int>(inside ? fpy : acc_t(0));
    fx = px - fpx;
    fy = py - fpy;
  }
};

template <typename scalar_t, typename coord_t, int V>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index, const coord_t* __restrict__ locations,
                               const coord_t* __restrict__ weights, scalar_t* __restrict__ out, Dims d) {
  using acc_t = typename AccType<scalar_t>::type;
  const int threads_per_head = d.D / V;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t group = thread / threads_per_head;  // (b * Q + q) * M + m
  if (group >= d.groups) return;
  const int m = group % d.M;
  const int64_t b = group / d.M / d.Q;
  const int c = (thread % threads_per_head) * V;
  const int64_t row = static_cast<int64_t>(d.M) * d.D;  // one token's channels, all heads
  const scalar_t* value_bm = value + b * d.S * row + m * d.D + c;
  const coord_t* loc = locations + group * d.L * d.P * 2;
  const coord_t* att = weights + group * d.L * d.P;

  acc_t acc[V] = {};
  for (int l = 0; l < d.L; ++l) {
    const int H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
    const scalar_t* value_l = value_bm + level_start_index[l] * row;
#pragma unroll 4
    for (int p = 0; p < d.P; ++p) {
      const int k = l * d.P + p;
      const Bilinear<acc_t> s(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), H, W);
      if (!s.inside) continue;
      const acc_t a = static_cast<acc_t>(att[k]);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        const int dy = corner >> 1, dx = corner & 1, yy = s.y0 + dy, xx = s.x0 + dx;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
        const acc_t w = a * (dy ? s.fy : 1 - s.fy) * (dx ? s.fx : 1 - s.fx);
        acc_t v[V];
        load<scalar_t, acc_t, V>(value_l + (static_cast<int64_t>(yy) * W + xx) * row, v);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w * v[i];
      }
    }
  }
  store<scalar_t, acc_t, V>(out + group * d.D + c, acc);
}

template <typename scalar_t, typename coord_t, typename grad_t, int V>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start_index, const coord_t* __restrict__ locations,
                                const coord_t* __restrict__ weights, const scalar_t* __restrict__ grad_out,
                                grad_t* __restrict__ grad_value, coord_t* __restrict__ grad_locations,
                                coord_t* __restrict__ grad_weights, Dims d) {
  using acc_t = typename AccType<scalar_t>::type;
  const int threads_per_head = d.D / V;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t group = thread / threads_per_head;
  // threads past the end stay to the end with nothing to do: the group shuffles need every lane of the warp
  const bool active = group < d.groups;
  const int64_t g = active ? group : 0;
  const int m = g % d.M;
  const int64_t b = g / d.M / d.Q;
  const int c = (thread % threads_per_head) * V;
  const bool writer = c == 0;
  const int64_t row = static_cast<int64_t>(d.M) * d.D;
  const scalar_t* value_bm = value + b * d.S * row + m * d.D + c;
  grad_t* grad_value_bm = grad_value + b * d.S * row + m * d.D + c;
  const coord_t* loc = locations + g * d.L * d.P * 2;
  const coord_t* att = weights + g * d.L * d.P;

  acc_t go[V];
  load<scalar_t, acc_t, V>(grad_out + g * d.D + c, go);
  for (int l = 0; l < d.L; ++l) {
    const int H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
    const int64_t start = level_start_index[l] * row;
    for (int p = 0; p < d.P; ++p) {
      const int k = l * d.P + p;
      const Bilinear<acc_t> s(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), H, W);
      const acc_t a = static_cast<acc_t>(att[k]);
      acc_t dot_sample = 0, dot_dx = 0, dot_dy = 0;
      if (active && s.inside) {
        acc_t v[4][V];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          const int yy = s.y0 + (corner >> 1), xx = s.x0 + (corner & 1);
          if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
#pragma unroll
            for (int i = 0; i < V; ++i) v[corner][i] = 0;  // outside the map: zero
            continue;
          }
          const int64_t offset = start + (static_cast<int64_t>(yy) * W + xx) * row;
          load<scalar_t, acc_t, V>(value_bm + offset, v[corner]);
          const acc_t w = (corner >> 1 ? s.fy : 1 - s.fy) * (corner & 1 ? s.fx : 1 - s.fx);
          atomic_add<grad_t, acc_t, V>(grad_value_bm + offset, go, a * w);
        }
        const acc_t w00 = (1 - s.fy) * (1 - s.fx), w01 = (1 - s.fy) * s.fx, w10 = s.fy * (1 - s.fx), w11 = s.fy * s.fx;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t sample = w00 * v[0][i] + w01 * v[1][i] + w10 * v[2][i] + w11 * v[3][i];
          dot_sample += go[i] * sample;
          dot_dx += go[i] * ((1 - s.fy) * (v[1][i] - v[0][i]) + s.fy * (v[3][i] - v[2][i]));
          dot_dy += go[i] * ((1 - s.fx) * (v[2][i] - v[0][i]) + s.fx * (v[3][i] - v[1][i]));
        }
      }
      dot_sample = group_sum(dot_sample, threads_per_head);
      dot_dx = group_sum(dot_dx, threads_per_head);
      dot_dy = group_sum(dot_dy, threads_per_head);
      if (active && writer) {
        grad_weights[g * d.L * d.P + k] = static_cast<coord_t>(dot_sample);
        grad_locations[(g * d.L * d.P + k) * 2] = static_cast<coord_t>(a * W * dot_dx);
        grad_locations[(g * d.L * d.P + k) * 2 + 1] = static_cast<coord_t>(a * H * dot_dy);
      }
    }
  }
}

constexpr int kThreads = 256;

#ifdef MSDA_EMULATE
constexpr auto kDeviceType = at::kCPU;  // where the emulated kernels find their tensors
#else
constexpr auto kDeviceType = at::kCUDA;
#endif

// Every launch: `threads` threads in 1-D blocks of kThreads, on the current stream of `like`'s device.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t threads, const at::Tensor& like, Args... args) {
  const dim3 blocks((threads + kThreads - 1) / kThreads);
#ifdef MSDA_EMULATE
  cuda_emulation::launch(kernel, blocks, dim3(kThreads), args...);
#else
  const at::cuda::OptionalCUDAGuard guard(like.device());
  kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// V: channels per thread. 16-byte vectors where the channels of a head allow it, else one at a time;
// either way the group size D / V must be a power of two dividing 32 (checked by the caller).
template <typename scalar_t>
int vector_width(int D, const void* ptr) {
  const int V = 16 / static_cast<int>(sizeof(scalar_t));
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  const int width = (aligned && D % V == 0) ? V : 1;
  const int threads_per_head = D / width;
  TORCH_CHECK(threads_per_head <= 32 && (threads_per_head & (threads_per_head - 1)) == 0, "ms_deform_attn: the kernel needs D / ", width, " = ", threads_per_head,
              " threads per head to be a power of two of at most 32 (D = ", D, ")");
  return width;
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& locations, const at::Tensor& weights) {
  TORCH_CHECK(value.device().type() == kDeviceType, "ms_deform_attn: value must be a ", kDeviceType,
              " tensor, got one on ", value.device());
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &locations, &weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all tensors must be on ", value.device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: tensors must be contiguous");
  }
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto coord = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(locations.scalar_type() == coord && weights.scalar_type() == coord,
              "ms_deform_attn: sampling_locations and attention_weights must be ", coord, " for ", value.scalar_type(), " values");
  TORCH_CHECK(value.dim() == 4 && locations.dim() == 6 && weights.dim() == 5, "ms_deform_attn: wrong number of dimensions");
}

Dims dims_of(const at::Tensor& value, const at::Tensor& locations) {
  Dims d;
  d.S = value.size(1); d.M = value.size(2); d.D = value.size(3);
  d.Q = locations.size(1); d.L = locations.size(3); d.P = locations.size(4);
  d.groups = value.size(0) * static_cast<int64_t>(d.Q) * d.M;
  return d;
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& locations,
                                  const at::Tensor& weights) {
  check_inputs(value, spatial_shapes, level_start_index, locations, weights);
  const Dims d = dims_of(value, locations);
  auto out = at::empty({value.size(0), d.Q, d.M * d.D}, value.options());
  if (d.groups == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward", [&] {
    using coord_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int VW = 16 / sizeof(scalar_t);
    const int V = vector_width<scalar_t>(d.D, value.data_ptr());
    const int64_t threads = d.groups * (d.D / V);
    launch(V == VW ? forward_kernel<scalar_t, coord_t, VW> : forward_kernel<scalar_t, coord_t, 1>, threads, value,
           value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
           locations.data_ptr<coord_t>(), weights.data_ptr<coord_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index, const at::Tensor& locations,
                                                const at::Tensor& weights, const at::Tensor& grad_out) {
  check_inputs(value, spatial_shapes, level_start_index, locations, weights);
  const Dims d = dims_of(value, locations);
  TORCH_CHECK(grad_out.device() == value.device() && grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type()
              && grad_out.numel() == value.size(0) * d.Q * d.M * d.D,
              "ms_deform_attn: grad_output must be a contiguous (B, Q, M * D) tensor like the output");
  const bool half = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // scattered sums need float32 at least; every other output is written exactly once
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(half ? at::kFloat : value.scalar_type()));
  auto grad_locations = at::empty_like(locations);
  auto grad_weights = at::empty_like(weights);
  if (d.groups > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward", [&] {
      using coord_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      using grad_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      constexpr int VW = 16 / sizeof(scalar_t);
      const int V = std::min(vector_width<scalar_t>(d.D, value.data_ptr()), vector_width<scalar_t>(d.D, grad_out.data_ptr()));
      const int64_t threads = d.groups * (d.D / V);
      launch(V == VW ? backward_kernel<scalar_t, coord_t, grad_t, VW> : backward_kernel<scalar_t, coord_t, grad_t, 1>,
             threads, value, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
             level_start_index.data_ptr<int64_t>(), locations.data_ptr<coord_t>(), weights.data_ptr<coord_t>(),
             grad_out.data_ptr<scalar_t>(), grad_value.data_ptr<grad_t>(), grad_locations.data_ptr<coord_t>(),
             grad_weights.data_ptr<coord_t>(), d);
    });
  }
  return {half ? grad_value.to(value.scalar_type()) : grad_value, grad_locations, grad_weights};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention, forward (CUDA)");
  m.def("backward", &ms_deform_attn_backward, "multi-scale deformable attention, backward (CUDA)");
}
