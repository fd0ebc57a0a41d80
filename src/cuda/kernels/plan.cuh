// src/cuda/kernels/plan.cuh: the MoE dispatch plan on the device (moe/ops.hpp's make_dispatch_plan: a
// counting sort of the accepted choices by expert, call order inside an expert), without atomics. Included by
// one translation unit per program (src/cuda/backend.cu, or an emulated test): the kernels are static.
//
// The slots are cut into chunks of kPlanChunk; block c handles chunk c, its thread e expert e (striding by the
// block's size when E is larger), so no thread walks more than one chunk. plan_count fills the table of
// per-(chunk, expert) counts; the host scans it (experts in order, chunks in order inside an expert) into each
// (chunk, expert)'s first row (for a fixed-capacity plan plan_fixed_starts does it on the device, from expert
// e's first row e C); plan_assign walks each chunk again and hands out the rows in slot order. The rows of an
// expert are therefore its choices in slot order, as the CPU plan's.
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

// The fixed-capacity plan's offsets, offsets[e] = e * cap for e <= E, written on the device (an upload from the
// host would wait for the work queued before it).
static __global__ void plan_fixed_offsets(int E, std::int64_t cap, std::int64_t* __restrict__ offsets) {
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); e <= E; e += stride)
    offsets[e] = static_cast<std::int64_t>(e) * cap;
}

// The fixed-capacity plan's first rows, on the device (no host scan): thread e walks the chunks in order from
// row e * cap, starts[c * E + e] = e * cap + expert e's choices in the chunks before c.
static __global__ void plan_fixed_starts(const std::int64_t* __restrict__ counts, std::int64_t chunks, int E,
                                         std::int64_t cap, std::int64_t* __restrict__ starts) {
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); e < E; e += stride) {
    std::int64_t r = static_cast<std::int64_t>(e) * cap;
    for (std::int64_t c = 0; c < chunks; ++c) {
      starts[c * E + e] = r;
      r += counts[c * (E + 1) + e];
    }
  }
}

// starts[c * E + e]: the first row of expert e's choices in chunk c. Thread e gives those choices the rows
// starts[c * E + e], + 1, ... in slot order; lane E marks the dropped slots -1. cap > 0 (a fixed-capacity plan):
// expert e's rows end at (e + 1) cap, and a choice past them is treated as dropped (the stock router never
// routes one: its routes respect the capacity).
static __global__ void plan_assign(const std::int32_t* __restrict__ route, std::int64_t slots, int K, int E,
                                   const std::int64_t* __restrict__ starts, std::int64_t cap,
                                   std::int64_t* __restrict__ row_token, std::int64_t* __restrict__ row_slot,
                                   std::int64_t* __restrict__ slot_row) {
  for (std::int64_t c = blockIdx.x; c * kPlanChunk < slots; c += gridDim.x) {
    const std::int64_t s0 = c * kPlanChunk, s1 = slots < s0 + kPlanChunk ? slots : s0 + kPlanChunk;
    for (int e = static_cast<int>(threadIdx.x); e <= E; e += static_cast<int>(blockDim.x)) {
      if (e == E) {
        for (std::int64_t s = s0; s < s1; ++s)
          if (route[s] < 0) slot_row[s] = -1;
        continue;
      }
      std::int64_t r = starts[c * E + e];
      const std::int64_t end = cap > 0 ? (static_cast<std::int64_t>(e) + 1) * cap : INT64_MAX;
      for (std::int64_t s = s0; s < s1; ++s)
        if (route[s] == e) {
          if (r >= end) {
            slot_row[s] = -1;
            continue;
          }
          slot_row[s] = r;
          row_slot[r] = s;
          row_token[r] = s / K;
          ++r;
        }
    }
  }
}

}  // namespace limoe::cuda::kernels
