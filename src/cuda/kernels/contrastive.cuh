// src/cuda/kernels/contrastive.cuh: the contrastive loss around its logits product (ops/contrastive.hpp), on
// the device: per-row and per-column softmax statistics in double (as the CPU backend), the loss and the
// accuracies summed by one block in a fixed order, the logits' gradient and the temperature's partial sums.
// First maxima win ties (the accuracies' rule). No atomics.
#pragma once

#include <cmath>
#include <cstdint>

#include "reduce.cuh"

namespace limoe::cuda::kernels {

// The maximum of row li[0, n) over the block, returned to every thread (red: kThreads values of shared scratch).
template <int kThreads, class T>
__device__ __forceinline__ T row_max(const T* li, std::int64_t n, T* red) {
  T m = li[0];
  for (std::int64_t j = threadIdx.x; j < n; j += kThreads) m = li[j] > m ? li[j] : m;
  return block_max<kThreads>(red, m);
}

// One block per row i of logits [n, n]: loss_i = log sum_j exp(l_ij - m) + m - l_ii, hit_i = (first argmax == i).
template <int kThreads, class T>
__global__ void contrastive_rows(const T* __restrict__ logits, std::int64_t n, double* __restrict__ loss,
                                 double* __restrict__ hit) {
  __shared__ T red_t[kThreads];
  __shared__ double red_d[kThreads];
  __shared__ std::int64_t red_i[kThreads];
  using std::exp;
  using std::log;
  const std::int64_t i = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* li = logits + i * n;
  const T m = row_max<kThreads>(li, n, red_t);
  std::int64_t arg = n;
  double s = 0;
  for (std::int64_t j = t; j < n; j += kThreads) {
    if (li[j] == m && j < arg) arg = j;
    s += exp(static_cast<double>(li[j] - m));
  }
  arg = block_reduce<kThreads>(red_i, arg, MinOp{});
  s = block_sum<kThreads>(red_d, s);
  if (t == 0) {
    loss[i] = log(s) + static_cast<double>(m) - static_cast<double>(li[i]);
    hit[i] = arg == i ? 1.0 : 0.0;
  }
}

// One thread per column j: cmax_j, csum_j = sum_i exp(l_ij - cmax_j) (double); with loss and hit non-null,
// also the column's cross-entropy and whether its first argmax is j.
template <class T>
__global__ void contrastive_columns(const T* __restrict__ logits, std::int64_t n, T* __restrict__ cmax,
                                    double* __restrict__ csum, double* loss, double* hit) {
  using std::exp;
  using std::log;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  T m = logits[j];
  std::int64_t arg = 0;
  for (std::int64_t i = 1; i < n; ++i)
    if (logits[i * n + j] > m) m = logits[i * n + j], arg = i;
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += exp(static_cast<double>(logits[i * n + j] - m));
  cmax[j] = m;
  csum[j] = s;
  if (loss) {
    loss[j] = log(s) + static_cast<double>(m) - static_cast<double>(logits[j * n + j]);
    hit[j] = arg == j ? 1.0 : 0.0;
  }
}

// One block: out[k] = sum_i parts[k * n + i] for k < count, i in a fixed tree order.
template <int kThreads>
__global__ void sum_parts(const double* __restrict__ parts, std::int64_t n, int count, double* __restrict__ out) {
  __shared__ double red[kThreads];
  for (int k = 0; k < count; ++k) {
    double s = 0;
    for (std::int64_t i = threadIdx.x; i < n; i += kThreads) s += parts[k * n + i];
    s = block_sum<kThreads>(red, s);
    if (threadIdx.x == 0) out[k] = s;
  }
}

// One block per row i: G_ij = w (rowsoftmax_ij + colsoftmax_ij - 2 [i == j]) and theta_part_i = sum_j G_ij l_ij.
template <int kThreads, class T>
__global__ void contrastive_grad(const T* __restrict__ logits, std::int64_t n, const T* __restrict__ cmax,
                                 const double* __restrict__ csum, T w, T* __restrict__ G,
                                 double* __restrict__ theta_part) {
  __shared__ T red_t[kThreads];
  __shared__ double red_d[kThreads];
  using std::exp;
  const std::int64_t i = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const T* li = logits + i * n;
  const T m = row_max<kThreads>(li, n, red_t);
  double s = 0;
  for (std::int64_t j = t; j < n; j += kThreads) s += exp(static_cast<double>(li[j] - m));
  const double inv = 1.0 / block_sum<kThreads>(red_d, s);
  double tp = 0;
  for (std::int64_t j = t; j < n; j += kThreads) {
    const double row_sm = exp(static_cast<double>(li[j] - m)) * inv;
    const double col_sm = exp(static_cast<double>(li[j] - cmax[j])) / csum[j];
    const T g = static_cast<T>(static_cast<double>(w) * (row_sm + col_sm - (i == j ? 2.0 : 0.0)));
    G[i * n + j] = g;
    tp += static_cast<double>(g) * static_cast<double>(li[j]);
  }
  tp = block_sum<kThreads>(red_d, tp);
  if (t == 0) theta_part[i] = tp;
}

}  // namespace limoe::cuda::kernels
