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

#include <cmath>
#include <cstdint>

#include "limoe/core/enums.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/math/layernorm.hpp"
#include "limoe/math/softmax.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

// One block of kThreads per row: y[r] = LN(x[r]) g + b (b may be null), mean[r], rstd[r].
template <int kThreads, class T>
__global__ void layernorm_forward(const T* __restrict__ x, const T* __restrict__ g, const T* b, T eps,
                                  std::int64_t D, T* __restrict__ y, T* __restrict__ mean,
                                  T* __restrict__ rstd) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* xr = x + r * D;
  T s = 0;
  for (std::int64_t d = t; d < D; d += kThreads) s += xr[d];
  const T m = math::layernorm_mean(block_sum<kThreads>(red, s), D);
  T q = 0;
  for (std::int64_t d = t; d < D; d += kThreads) q += (xr[d] - m) * (xr[d] - m);
  const math::RowStats<T> st{m, math::layernorm_rstd(block_sum<kThreads>(red, q), D, eps)};
  for (std::int64_t d = t; d < D; d += kThreads)
    math::layernorm_row(xr + d, std::int64_t{1}, st, g + d, b ? b + d : nullptr, y + r * D + d);
  if (t == 0) mean[r] = st.mean, rstd[r] = st.rstd;
}

// One block per row: dx[r] (overwritten) from dy[r] and the forward's mean and rstd.
template <int kThreads, class T>
__global__ void layernorm_backward_input(const T* __restrict__ x, const T* __restrict__ g,
                                         const T* __restrict__ mean, const T* __restrict__ rstd,
                                         const T* __restrict__ dy, std::int64_t D, T* __restrict__ dx) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* xr = x + r * D;
  const T* dyr = dy + r * D;
  const math::RowStats<T> st{mean[r], rstd[r]};
  T a = 0, c = 0;
  for (std::int64_t d = t; d < D; d += kThreads) {
    const T gx = dyr[d] * g[d];
    a += gx;
    c += gx * (xr[d] - st.mean) * st.rstd;
  }
  const T mean_gx = block_sum<kThreads>(red, a) / static_cast<T>(D);
  const T mean_gx_xhat = block_sum<kThreads>(red, c) / static_cast<T>(D);
  for (std::int64_t d = t; d < D; d += kThreads)
    dx[r * D + d] = math::layernorm_dx(xr[d], dyr[d], g[d], st, mean_gx, mean_gx_xhat);
}

// One thread per column d: dg[d] += sum_r dy xhat, db[d] += sum_r dy, rows in order (accumulated, as every
// parameter gradient). dg or db may be null.
template <class T>
__global__ void layernorm_backward_params(const T* __restrict__ x, const T* __restrict__ mean,
                                                 const T* __restrict__ rstd, const T* __restrict__ dy,
                                                 std::int64_t rows, std::int64_t D, T* dg, T* db) {
  const std::int64_t d = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  T sg = 0, sb = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const T g = dy[r * D + d];
    sg += g * (x[r * D + d] - mean[r]) * rstd[r];
    sb += g;
  }
  if (dg) dg[d] += sg;
  if (db) db[d] += sb;
}

// Elementwise over rows x M (grid-stride): pre += b (per column), y = GELU(pre).
template <class T>
__global__ void bias_gelu_forward(GeluKind kind, const T* __restrict__ b, std::int64_t n, std::int64_t M,
                                         T* __restrict__ pre, T* __restrict__ y) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T h = pre[i] + (b ? b[i % M] : T(0));
    pre[i] = h;
    y[i] = math::gelu(kind, h);
  }
}

// dx = dy GELU'(x), elementwise (dx may alias dy).
template <class T>
__global__ void gelu_backward(GeluKind kind, const T* __restrict__ x, const T* dy, std::int64_t n,
                                     T* dx) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = dy[i] * math::gelu_grad(kind, x[i]);
}

// One block per row of x [rows, n]: y = softmax(scale x) over the unmasked entries, as math::softmax_row. The
// mask (or null) has a row of n per mask_period rows of x: row r uses mask row r / mask_period (1: a mask per
// row; attention's B*H*Nq score rows share their example's key mask with mask_period = H*Nq). A row with no
// unmasked entry gives zeros.
template <int kThreads, class T>
__global__ void softmax_forward(const T* __restrict__ x, std::int64_t n, T scale,
                                const std::uint8_t* __restrict__ mask, std::int64_t mask_period, T* __restrict__ y) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* xr = x + r * n;
  const std::uint8_t* mr = mask ? mask + (r / mask_period) * n : nullptr;
  T* yr = y + r * n;
  T m = math::neg_inf<T>();
  for (std::int64_t j = t; j < n; j += kThreads)
    if ((!mr || mr[j]) && xr[j] > m) m = xr[j];
  m = block_max<kThreads>(red, m);
  if (m == math::neg_inf<T>()) {  // the same for every thread of the block: no barrier is skipped by some
    for (std::int64_t j = t; j < n; j += kThreads) yr[j] = T(0);
    return;
  }
  T s = 0;
  for (std::int64_t j = t; j < n; j += kThreads) {
    const T e = math::softmax_term(xr[j], m, scale, !mr || mr[j]);
    yr[j] = e;
    s += e;
  }
  const T inv = T(1) / block_sum<kThreads>(red, s);
  for (std::int64_t j = t; j < n; j += kThreads) yr[j] *= inv;
}

// One block per row: dx = y (dy - <dy, y>) (dx may alias dy).
template <int kThreads, class T>
__global__ void softmax_backward(const T* __restrict__ y, const T* dy, std::int64_t n, T* dx) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  T dot = 0;
  for (std::int64_t j = t; j < n; j += kThreads) dot += dy[r * n + j] * y[r * n + j];
  dot = block_sum<kThreads>(red, dot);
  for (std::int64_t j = t; j < n; j += kThreads) dx[r * n + j] = y[r * n + j] * (dy[r * n + j] - dot);
}

// One block per row of u [rows, D]: norms[r] = ||u_r||, z_r = u_r / (||u_r|| + kL2NormEps) (ops/l2norm.hpp).
template <int kThreads, class T>
__global__ void l2_normalize_forward(const T* __restrict__ u, std::int64_t D, T eps, T* __restrict__ z,
                                     T* __restrict__ norms) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* ur = u + r * D;
  T ss = 0;
  for (std::int64_t d = t; d < D; d += kThreads) ss += ur[d] * ur[d];
  using std::sqrt;
  const T n = sqrt(block_sum<kThreads>(red, ss));
  const T inv = T(1) / (n + eps);
  for (std::int64_t d = t; d < D; d += kThreads) z[r * D + d] = ur[d] * inv;
  if (t == 0) norms[r] = n;
}

// One block per row: du = dz / s - z <dz, z> / n with n = norms[r], s = n + eps (0 for the second term at
// n = 0). du may alias dz.
template <int kThreads, class T>
__global__ void l2_normalize_backward(const T* __restrict__ z, const T* __restrict__ norms, const T* dz,
                                      std::int64_t D, T eps, T* du) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  T dot = 0;
  for (std::int64_t d = t; d < D; d += kThreads) dot += dz[r * D + d] * z[r * D + d];
  dot = block_sum<kThreads>(red, dot);
  const T n = norms[r], s = n + eps;
  const T c = n > T(0) ? dot / n : T(0);
  for (std::int64_t d = t; d < D; d += kThreads) du[r * D + d] = dz[r * D + d] / s - z[r * D + d] * c;
}

}  // namespace limoe::cuda::kernels
