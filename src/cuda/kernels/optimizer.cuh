// src/cuda/kernels/optimizer.cuh: AdamW with global-norm clipping on the device (semantics §5), with no atomics,
// so a step is the same on every run:
//   1. sum_squares_partial: block b sums g^2 (in double, as the CPU optimizer) over its fixed grid-stride share
//      in a block tree -> partial[b];
//   2. sum_squares_final:   one block sums the partials in a fixed tree -> sum (the host takes the norm, checks
//      it is finite and computes the clip factor with math::adamw_clip, as AdamW::update does);
//   3. adamw_update:        per parameter, math::adamw_element (the formula AdamW::update calls on the CPU).
#pragma once

#include <cstdint>

#include "limoe/math/adamw.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

template <int kThreads, class T>
__global__ void sum_squares_partial(const T* __restrict__ g, std::int64_t n, double* __restrict__ partial) {
  __shared__ double red[kThreads];
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  double s = 0;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    s += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  s = block_sum<kThreads>(red, s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// One block: sum of partial[0, blocks).
template <int kThreads>
__global__ void sum_squares_final(const double* __restrict__ partial, int blocks, double* __restrict__ sum) {
  __shared__ double red[kThreads];
  double s = 0;
  for (int i = static_cast<int>(threadIdx.x); i < blocks; i += kThreads) s += partial[i];
  s = block_sum<kThreads>(red, s);
  if (threadIdx.x == 0) *sum = s;
}

// w, m, v updated in place; decay[i] != 0 where weight decay applies; st carries the step's constants and
// the clip factor.
template <class T>
__global__ void adamw_update(math::AdamWStep<T> st, const std::uint8_t* __restrict__ decay, const T* __restrict__ g,
                             std::int64_t n, T* __restrict__ w, T* __restrict__ m, T* __restrict__ v) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    math::adamw_element(st, decay[i] != 0, g[i], w[i], m[i], v[i]);
}

}  // namespace limoe::cuda::kernels
