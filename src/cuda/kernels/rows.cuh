// src/cuda/kernels/rows.cuh: the CUDA backend's row kernels: LayerNorm forward and backward, bias + GELU and
// the GELU backward (semantics §1). Each calls the formulas of limoe/math/ (the ones ref:: and cpu:: call);
// the kernels add the launch geometry and the reductions, nothing else.
//
// Compiled twice from this one source: by nvcc into limoe_cuda (src/cuda/rows.cu), and by g++ with
// tests/support/cuda_emu.hpp, which runs them on host threads in CI (and under ThreadSanitizer), against the
// Ref backend.
//
// Determinism: reductions are fixed trees in shared memory (no warp shuffles, no atomics), and the parameter
// gradients of LayerNorm are summed by one thread per column over the rows in row order, so results do not
// depend on timing.
#pragma once

#include <cstdint>

#include "limoe/core/enums.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/math/layernorm.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

// One block of kThreads per row: y[r] = LN(x[r]) g + b (b may be null), mean[r], rstd[r].
template <int kThreads>
__global__ void layernorm_forward(const float* __restrict__ x, const float* __restrict__ g, const float* b, float eps,
                                  std::int64_t D, float* __restrict__ y, float* __restrict__ mean,
                                  float* __restrict__ rstd) {
  __shared__ float red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const float* xr = x + r * D;
  float s = 0;
  for (std::int64_t d = t; d < D; d += kThreads) s += xr[d];
  const float m = math::layernorm_mean(block_sum<kThreads>(red, s), D);
  float q = 0;
  for (std::int64_t d = t; d < D; d += kThreads) q += (xr[d] - m) * (xr[d] - m);
  const math::RowStats<float> st{m, math::layernorm_rstd(block_sum<kThreads>(red, q), D, eps)};
  for (std::int64_t d = t; d < D; d += kThreads)
    math::layernorm_row(xr + d, std::int64_t{1}, st, g + d, b ? b + d : nullptr, y + r * D + d);
  if (t == 0) mean[r] = st.mean, rstd[r] = st.rstd;
}

// One block per row: dx[r] (overwritten) from dy[r] and the forward's mean and rstd.
template <int kThreads>
__global__ void layernorm_backward_input(const float* __restrict__ x, const float* __restrict__ g,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const float* __restrict__ dy, std::int64_t D, float* __restrict__ dx) {
  __shared__ float red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const float* xr = x + r * D;
  const float* dyr = dy + r * D;
  const math::RowStats<float> st{mean[r], rstd[r]};
  float a = 0, c = 0;
  for (std::int64_t d = t; d < D; d += kThreads) {
    const float gx = dyr[d] * g[d];
    a += gx;
    c += gx * (xr[d] - st.mean) * st.rstd;
  }
  const float mean_gx = block_sum<kThreads>(red, a) / static_cast<float>(D);
  const float mean_gx_xhat = block_sum<kThreads>(red, c) / static_cast<float>(D);
  for (std::int64_t d = t; d < D; d += kThreads)
    dx[r * D + d] = math::layernorm_dx(xr[d], dyr[d], g[d], st, mean_gx, mean_gx_xhat);
}

// One thread per column d: dg[d] += sum_r dy xhat, db[d] += sum_r dy, rows in order (accumulated, as every
// parameter gradient). dg or db may be null.
__global__ void layernorm_backward_params(const float* __restrict__ x, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, const float* __restrict__ dy,
                                                 std::int64_t rows, std::int64_t D, float* dg, float* db) {
  const std::int64_t d = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float sg = 0, sb = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float g = dy[r * D + d];
    sg += g * (x[r * D + d] - mean[r]) * rstd[r];
    sb += g;
  }
  if (dg) dg[d] += sg;
  if (db) db[d] += sb;
}

// Elementwise over rows x M (grid-stride): pre += b (per column), y = GELU(pre).
__global__ void bias_gelu_forward(GeluKind kind, const float* __restrict__ b, std::int64_t n, std::int64_t M,
                                         float* __restrict__ pre, float* __restrict__ y) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float h = pre[i] + (b ? b[i % M] : 0.0f);
    pre[i] = h;
    y[i] = math::gelu(kind, h);
  }
}

// dx = dy GELU'(x), elementwise (dx may alias dy).
__global__ void gelu_backward(GeluKind kind, const float* __restrict__ x, const float* dy, std::int64_t n,
                                     float* dx) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = dy[i] * math::gelu_grad(kind, x[i]);
}

}  // namespace limoe::cuda::kernels
