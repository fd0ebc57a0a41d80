// src/cuda/kernels/reduce.cuh: the block reductions every kernel of the CUDA backend uses: a fixed tree in
// shared memory (no warp shuffles, no atomics), so a sum does not depend on timing, and the CPU emulation of the
// tests (tests/support/cuda_emu.hpp) runs it unchanged.
#pragma once

namespace limoe::cuda::kernels {

// op(v) over the block's kThreads threads (a power of two), returned to every thread. red is the block's
// shared scratch of kThreads values of V; it is free again when this returns. op combines two partials
// (commutative and associative up to rounding; the tree is fixed, so the rounding is too).
template <int kThreads, class V, class Op>
__device__ __forceinline__ V block_reduce(V* red, V v, Op op) {
  static_assert(kThreads >= 1 && kThreads <= 1024 && (kThreads & (kThreads - 1)) == 0, "a power of two <= 1024");
  const int t = static_cast<int>(threadIdx.x);
  red[t] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (t < w) red[t] = op(red[t], red[t + w]);
    __syncthreads();
  }
  const V total = red[0];
  __syncthreads();  // every thread has read the total before red is written again
  return total;
}

struct SumOp {
  template <class V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  template <class V>
  __device__ __forceinline__ V operator()(V a, V b) const { return b > a ? b : a; }
};
struct MinOp {
  template <class V>
  __device__ __forceinline__ V operator()(V a, V b) const { return b < a ? b : a; }
};

template <int kThreads, class V>
__device__ __forceinline__ V block_sum(V* red, V v) {
  return block_reduce<kThreads>(red, v, SumOp{});
}

template <int kThreads, class V>
__device__ __forceinline__ V block_max(V* red, V v) {
  return block_reduce<kThreads>(red, v, MaxOp{});
}

}  // namespace limoe::cuda::kernels
