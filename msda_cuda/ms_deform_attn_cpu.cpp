// Multi-scale deformable attention on the CPU (Deformable DETR, arXiv 2010.04159v4, Eq. 3): forward and
// backward, the arithmetic of ms_deform_attn.cu (whose opening comment gives the formulas and the shapes),
// as C++ loops over torch's intra-op threads (at::get_num_threads(), through OpenMP), with the channel
// loops left to the compiler to vectorise (msda_cuda/__init__.py compiles for the CPU's vector instructions).
// float and double values, summed in their own precision.
//
// Work split:
//   forward   one (b, q) row per iteration: each writes its own output row, nothing is shared.
//   backward  one (b, m, l) per iteration: the iteration that owns head m of image b on level l is the only
//             one that reads and writes value's gradient at that head's channels of that level's tokens,
//             and the only writer of the locations' and weights' gradients of (b, *, m, l, *). The
//             scattered sums into grad_value are therefore race-free without atomics, and B * M * L
//             iterations (32 for one image) keep the threads of a laptop or a server busy.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Dims {
  int64_t B, S, M, D, Q, L, P;
};

// Where (x, y) lands on an H x W level, as in the CUDA kernel: pixel coordinates, the top-left neighbour,
// the fractions, and whether any of the four neighbours is inside the map.
template <typename scalar_t>
struct Bilinear {
  int64_t x0, y0;
  scalar_t fx, fy;
  bool inside;
  Bilinear(scalar_t x, scalar_t y, int64_t H, int64_t W) {
    const scalar_t px = x * W - scalar_t(0.5), py = y * H - scalar_t(0.5);
    inside = px > scalar_t(-1) && py > scalar_t(-1) && px < scalar_t(W) && py < scalar_t(H);
    const scalar_t fpx = std::floor(px), fpy = std::floor(py);
    x0 = inside ? static_cast<int64_t>(fpx) : 0;
    y0 = inside ? static_cast<int64_t>(fpy) : 0;
    fx = px - fpx;
    fy = py - fpy;
  }
};

// kD > 0: the channels per head known when compiling (32 in DINO, 16 in the demo's smaller model), so that a
// head's sums and gradients stay in vector registers; kD = 0: any number, read from d.D.
template <typename scalar_t, int kD>
void forward_rows(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                  const scalar_t* weights, scalar_t* out, const Dims d) {
  const int64_t D = kD > 0 ? kD : d.D, row = d.M * D;  // row: one token's channels, all heads
#pragma omp parallel num_threads(at::get_num_threads())
  {
  std::vector<scalar_t> heap(kD > 0 ? 0 : D);
  scalar_t registers[kD > 0 ? kD : 1];
  scalar_t* acc = kD > 0 ? registers : heap.data();  // one head's sums
#pragma omp for schedule(static)
  for (int64_t bq = 0; bq < d.B * d.Q; ++bq) {
    const int64_t b = bq / d.Q;
    for (int64_t m = 0; m < d.M; ++m) {
      std::fill(acc, acc + D, scalar_t(0));
      const int64_t group = bq * d.M + m;  // (b * Q + q) * M + m
      const scalar_t* loc = locations + group * d.L * d.P * 2;
      const scalar_t* att = weights + group * d.L * d.P;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        const scalar_t* value_l = value + (b * d.S + starts[l]) * row + m * D;
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t k = l * d.P + p;
          const Bilinear<scalar_t> s(loc[2 * k], loc[2 * k + 1], H, W);
          if (!s.inside) continue;
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t dy = corner >> 1, dx = corner & 1, yy = s.y0 + dy, xx = s.x0 + dx;
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            const scalar_t w = att[k] * (dy ? s.fy : 1 - s.fy) * (dx ? s.fx : 1 - s.fx);
            const scalar_t* v = value_l + (yy * W + xx) * row;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc[i] += w * v[i];
          }
        }
      }
      scalar_t* o = out + group * D;
      for (int64_t i = 0; i < D; ++i) o[i] = acc[i];
    }
  }
  }
}

template <typename scalar_t, int kD>
void backward_heads(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                    const scalar_t* weights, const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_locations,
                    scalar_t* grad_weights, const Dims d) {
  const int64_t D = kD > 0 ? kD : d.D, row = d.M * D;
#pragma omp parallel num_threads(at::get_num_threads())
  {
  std::vector<scalar_t> heap(kD > 0 ? 0 : D);
  scalar_t registers[kD > 0 ? kD : 1];
  scalar_t* go = kD > 0 ? registers : heap.data();  // the output's gradient at (b, q, m)
#pragma omp for schedule(dynamic)
  for (int64_t bml = 0; bml < d.B * d.M * d.L; ++bml) {
    const int64_t l = bml % d.L, m = bml / d.L % d.M, b = bml / d.L / d.M;
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t offset_l = (b * d.S + starts[l]) * row + m * D;  // this task's tokens, at head m
    const scalar_t* value_l = value + offset_l;
    scalar_t* grad_value_l = grad_value + offset_l;
    for (int64_t q = 0; q < d.Q; ++q) {
      const int64_t group = (b * d.Q + q) * d.M + m;
      std::copy(grad_out + group * D, grad_out + (group + 1) * D, go);
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t k = (group * d.L + l) * d.P + p;  // index into the weights; locations at 2k
        const Bilinear<scalar_t> s(locations[2 * k], locations[2 * k + 1], H, W);
        const scalar_t a = weights[k];
        scalar_t dot_sample = 0, dot_dx = 0, dot_dy = 0;
        if (s.inside) {
          const scalar_t corner_weight[4] = {(1 - s.fy) * (1 - s.fx), (1 - s.fy) * s.fx, s.fy * (1 - s.fx), s.fy * s.fx};
          // d sample / d px and / d py of each corner's value: (1-fy)(v01-v00) + fy(v11-v10), (1-fx)(v10-v00) + fx(v11-v01)
          const scalar_t dx_weight[4] = {-(1 - s.fy), 1 - s.fy, -s.fy, s.fy};
          const scalar_t dy_weight[4] = {-(1 - s.fx), -s.fx, 1 - s.fx, s.fx};
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t yy = s.y0 + (corner >> 1), xx = s.x0 + (corner & 1);
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;  // outside the map: zero, no gradient
            const scalar_t* v = value_l + (yy * W + xx) * row;
            scalar_t* gv = grad_value_l + (yy * W + xx) * row;
            const scalar_t scale = a * corner_weight[corner];
            scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; ++i) {
              gv[i] += scale * go[i];
              dot += go[i] * v[i];
            }
            dot_sample += corner_weight[corner] * dot;
            dot_dx += dx_weight[corner] * dot;
            dot_dy += dy_weight[corner] * dot;
          }
        }
        grad_weights[k] = dot_sample;
        grad_locations[2 * k] = a * W * dot_dx;
        grad_locations[2 * k + 1] = a * H * dot_dy;
      }
    }
  }
  }
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& locations, const at::Tensor& weights) {
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &locations, &weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn (CPU): all tensors must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn (CPU): tensors must be contiguous");
  }
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn (CPU): spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn (CPU): value must be float32 or float64");
  TORCH_CHECK(locations.scalar_type() == value.scalar_type() && weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn (CPU): sampling_locations and attention_weights must have value's dtype");
  TORCH_CHECK(value.dim() == 4 && locations.dim() == 6 && weights.dim() == 5, "ms_deform_attn (CPU): wrong number of dimensions");
}

Dims dims_of(const at::Tensor& value, const at::Tensor& locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), locations.size(1), locations.size(3),
          locations.size(4)};
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& locations,
                                  const at::Tensor& weights) {
  check_inputs(value, spatial_shapes, level_start_index, locations, weights);
  const Dims d = dims_of(value, locations);
  auto out = at::empty({d.B, d.Q, d.M * d.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto forward = d.D == 32   ? forward_rows<scalar_t, 32>
                         : d.D == 16 ? forward_rows<scalar_t, 16>
                                     : forward_rows<scalar_t, 0>;
    forward(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
            locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index, const at::Tensor& locations,
                                                const at::Tensor& weights, const at::Tensor& grad_out) {
  check_inputs(value, spatial_shapes, level_start_index, locations, weights);
  const Dims d = dims_of(value, locations);
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type()
              && grad_out.numel() == d.B * d.Q * d.M * d.D,
              "ms_deform_attn (CPU): grad_output must be a contiguous (B, Q, M * D) tensor like the output");
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::empty_like(locations);
  auto grad_weights = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const auto backward = d.D == 32   ? backward_heads<scalar_t, 32>
                          : d.D == 16 ? backward_heads<scalar_t, 16>
                                      : backward_heads<scalar_t, 0>;
    backward(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
             locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
             grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), d);
  });
  return {grad_value, grad_locations, grad_weights};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention, forward (CPU)");
  m.def("backward", &ms_deform_attn_backward, "multi-scale deformable attention, backward (CPU)");
}
