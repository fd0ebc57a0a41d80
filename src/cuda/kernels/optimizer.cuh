// src/cuda/kernels/optimizer.cuh: AdamW with global-norm clipping on the device (semantics §5), in three
// launches with no atomics, so a step is the same on every run:
//   1. sum_squares_partial: block b sums g^2 over its fixed grid-stride share (a block tree) -> partial[b];
//   2. sum_squares_final:   one block sums the partials in a fixed tree -> sum;
//   3. adamw_update:        per parameter, math::adamw_element (the formula AdamW::update calls on the CPU)
//                           with clip = min(1, clip_norm / sqrt(sum)), computed from `sum` by every thread.
#pragma once

#include <cstdint>

#include "limoe/math/adamw.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

template <int kThreads>
__global__ void sum_squares_partial(const float* __restrict__ g, std::int64_t n, float* __restrict__ partial) {
  __shared__ float red[kThreads];
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  float s = 0;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    s += g[i] * g[i];
  s = block_sum<kThreads>(red, s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// One block: sum of partial[0, blocks).
template <int kThreads>
__global__ void sum_squares_final(const float* __restrict__ partial, int blocks, float* __restrict__ sum) {
  __shared__ float red[kThreads];
  float s = 0;
  for (int i = static_cast<int>(threadIdx.x); i < blocks; i += kThreads) s += partial[i];
  s = block_sum<kThreads>(red, s);
  if (threadIdx.x == 0) *sum = s;
}

// w, m, v updated in place; decay[i] != 0 where weight decay applies; st.clip is replaced by the clip factor
// computed from *sum_sq and clip_norm (<= 0: no clipping).
__global__ void adamw_update(math::AdamWStep<float> st, float clip_norm, const float* __restrict__ sum_sq,
                             const std::uint8_t* __restrict__ decay, const float* __restrict__ g, std::int64_t n,
                             float* __restrict__ w, float* __restrict__ m, float* __restrict__ v) {
  const float norm = sqrtf(*sum_sq);
  st.clip = (clip_norm > 0.0f && norm > clip_norm) ? clip_norm / norm : 1.0f;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    math::adamw_element(st, decay[i] != 0, g[i], w[i], m[i], v[i]);
}

}  // namespace limoe::cuda::kernels
