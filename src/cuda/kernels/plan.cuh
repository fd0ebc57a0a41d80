// src/cuda/kernels/plan.cuh: the MoE dispatch plan on the device (moe/ops.hpp's make_dispatch_plan: a
// counting sort of the accepted choices by expert, call order inside an expert), without atomics. Included by
// one translation unit per program (src/cuda/backend.cu, or an emulated test): the kernels are static.
//
// The slots are cut into chunks of kPlanChunk; block c handles chunk c, its thread e expert e (striding by the
// block's size when E is larger), so no thread walks more than one chunk. plan_count fills the table of
// per-(chunk, expert) counts; the host scans it (experts in order, chunks in order inside an expert) into each
// (chunk, expert)'s first row; plan_assign walks each chunk again and hands out the rows in slot order. The
// rows of an expert are therefore its choices in slot order, as the CPU plan's.
#pragma once

#include <cstdint>

namespace limoe::cuda::kernels {

constexpr std::int64_t kPlanChunk = 512;

// counts[c * (E + 1) + e]: the slots of chunk c routed to expert e; lane E counts the invalid entries (neither
// -1 nor an expert), which the host turns into an error.
static __global__ void plan_count(const std::int32_t* __restrict__ route, std::int64_t slots, int E,
                                  std::int64_t* __restrict__ counts) {
  for (std::int64_t c = blockIdx.x; c * kPlanChunk < slots; c += gridDim.x) {
    const std::int64_t s0 = c * kPlanChunk, s1 = slots < s0 + kPlanChunk ? slots : s0 + kPlanChunk;
    for (int e = static_cast<int>(threadIdx.x); e <= E; e += static_cast<int>(blockDim.x)) {
      std::int64_t n = 0;
      for (std::int64_t s = s0; s < s1; ++s) {
        const std::int32_t r = route[s];
        n += e < E ? (r == e) : (r < -1 || r >= E);
      }
      counts[c * (E + 1) + e] = n;
    }
  }
}

// starts[c * E + e]: the first row of expert e's choices in chunk c. Thread e gives those choices the rows
// starts[c * E + e], + 1, ... in slot order; lane E marks the dropped slots -1.
static __global__ void plan_assign(const std::int32_t* __restrict__ route, std::int64_t slots, int K, int E,
                                   const std::int64_t* __restrict__ starts, std::int64_t* __restrict__ row_token,
                                   std::int64_t* __restrict__ row_slot, std::int64_t* __restrict__ slot_row) {
  for (std::int64_t c = blockIdx.x; c * kPlanChunk < slots; c += gridDim.x) {
    const std::int64_t s0 = c * kPlanChunk, s1 = slots < s0 + kPlanChunk ? slots : s0 + kPlanChunk;
    for (int e = static_cast<int>(threadIdx.x); e <= E; e += static_cast<int>(blockDim.x)) {
      if (e == E) {
        for (std::int64_t s = s0; s < s1; ++s)
          if (route[s] < 0) slot_row[s] = -1;
        continue;
      }
      std::int64_t r = starts[c * E + e];
      for (std::int64_t s = s0; s < s1; ++s)
        if (route[s] == e) {
          slot_row[s] = r;
          row_slot[r] = s;
          row_token[r] = s / K;
          ++r;
        }
    }
  }
}

}  // namespace limoe::cuda::kernels
