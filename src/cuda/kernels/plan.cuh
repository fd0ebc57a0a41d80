// src/cuda/kernels/plan.cuh: the MoE dispatch plan on the device (moe/ops.hpp's make_dispatch_plan: a
// counting sort of the accepted choices by expert, call order inside an expert), without atomics. Included by
// one translation unit per program (src/cuda/backend.cu, or an emulated test): the kernels are static.
#pragma once

#include <cstdint>

namespace limoe::cuda::kernels {

// The dispatch plan of moe/ops.hpp's counting sort, without atomics: thread e < E counts the slots routed to e
// (counts[e]); thread E counts the invalid entries (neither -1 nor an expert), which the host turns into an
// error.
static __global__ void plan_count(const std::int32_t* __restrict__ route, std::int64_t slots, int E,
                                  std::int64_t* __restrict__ counts) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e > E) return;
  std::int64_t c = 0;
  for (std::int64_t s = 0; s < slots; ++s) {
    const std::int32_t r = route[s];
    c += e < E ? (r == e) : (r < -1 || r >= E);
  }
  counts[e] = c;
}

// Thread e < E walks the slots in order and gives its choices the rows offsets[e], offsets[e] + 1, ... (call
// order inside the expert's block, as the CPU plan); thread E marks the dropped slots -1.
static __global__ void plan_assign(const std::int32_t* __restrict__ route, std::int64_t slots, int K, int E,
                                   const std::int64_t* __restrict__ offsets, std::int64_t* __restrict__ row_token,
                                   std::int64_t* __restrict__ row_slot, std::int64_t* __restrict__ slot_row) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e > E) return;
  if (e == E) {
    for (std::int64_t s = 0; s < slots; ++s)
      if (route[s] < 0) slot_row[s] = -1;
    return;
  }
  std::int64_t r = offsets[e];
  for (std::int64_t s = 0; s < slots; ++s)
    if (route[s] == e) {
      slot_row[s] = r;
      row_slot[r] = s;
      row_token[r] = s / K;
      ++r;
    }
}

}  // namespace limoe::cuda::kernels
