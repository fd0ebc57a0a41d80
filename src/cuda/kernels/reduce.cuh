// src/cuda/kernels/reduce.cuh: the block reduction every kernel of the CUDA backend uses: a fixed tree in shared
// memory (no warp shuffles, no atomics), so a sum does not depend on timing, and the CPU emulation of the tests
// (tests/support/cuda_emu.hpp) runs it unchanged.
#pragma once

namespace limoe::cuda::kernels {

// The sum of v over the block's kThreads threads (a power of two), returned to every thread. red is the
// block's shared scratch of kThreads floats; it is free again when this returns.
template <int kThreads>
__device__ __forceinline__ float block_sum(float* red, float v) {
  static_assert(kThreads >= 1 && kThreads <= 1024 && (kThreads & (kThreads - 1)) == 0, "a power of two <= 1024");
  const int t = static_cast<int>(threadIdx.x);
  red[t] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (t < w) red[t] += red[t + w];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();  // every thread has read the total before red is written again
  return total;
}

// The maximum of v over the block, returned to every thread (the same tree as block_sum).
template <int kThreads>
__device__ __forceinline__ float block_max(float* red, float v) {
  const int t = static_cast<int>(threadIdx.x);
  red[t] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (t < w && red[t + w] > red[t]) red[t] = red[t + w];
    __syncthreads();
  }
  const float m = red[0];
  __syncthreads();
  return m;
}

}  // namespace limoe::cuda::kernels
