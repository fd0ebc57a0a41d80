// src/cuda/kernels/rows.cuh: the CUDA backend's row kernels: LayerNorm forward and backward, the (scaled,
// masked) softmax of a row and its backward, bias + GELU and the GELU backward (semantics §1). Each calls the formulas of limoe/math/ (the ones ref:: and cpu:: call);
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
#include "limoe/math/softmax.hpp"
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

// One block per row of x [rows, n]: y = softmax(scale x) over the unmasked entries (mask [rows, n] or null;
// a row with none gives zeros), as math::softmax_row.
template <int kThreads>
__global__ void softmax_forward(const float* __restrict__ x, std::int64_t n, float scale,
                                const std::uint8_t* __restrict__ mask, float* __restrict__ y) {
  __shared__ float red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const float* xr = x + r * n;
  const std::uint8_t* mr = mask ? mask + r * n : nullptr;
  float* yr = y + r * n;
  float m = math::neg_inf<float>();
  for (std::int64_t j = t; j < n; j += kThreads)
    if ((!mr || mr[j]) && xr[j] > m) m = xr[j];
  m = block_max<kThreads>(red, m);
  if (m == math::neg_inf<float>()) {  // the same for every thread of the block: no barrier is skipped by some
    for (std::int64_t j = t; j < n; j += kThreads) yr[j] = 0.0f;
    return;
  }
  float s = 0;
  for (std::int64_t j = t; j < n; j += kThreads) {
    const float e = math::softmax_term(xr[j], m, scale, !mr || mr[j]);
    yr[j] = e;
    s += e;
  }
  const float inv = 1.0f / block_sum<kThreads>(red, s);
  for (std::int64_t j = t; j < n; j += kThreads) yr[j] *= inv;
}

// One block per row: dx = y (dy - <dy, y>) (dx may alias dy).
template <int kThreads>
__global__ void softmax_backward(const float* __restrict__ y, const float* dy, std::int64_t n, float* dx) {
  __shared__ float red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  float dot = 0;
  for (std::int64_t j = t; j < n; j += kThreads) dot += dy[r * n + j] * y[r * n + j];
  dot = block_sum<kThreads>(red, dot);
  for (std::int64_t j = t; j < n; j += kThreads) dx[r * n + j] = y[r * n + j] * (dy[r * n + j] - dot);
}

}  // namespace limoe::cuda::kernels
