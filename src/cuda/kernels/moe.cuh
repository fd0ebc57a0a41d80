// src/cuda/kernels/moe.cuh: the MoE layer's data movement on the device, over the dispatch plan of
// moe/ops.hpp (offsets, row -> token, row -> slot, slot -> row): dispatch (gather) and its backward, combine
// (the gate-weighted sum of each token's accepted rows) and its backward. Same semantics and gradient rule as
// moe::ref:: / moe::cpu:: (dispatch_backward accumulates into dx; the rest overwrite).
//
// No atomics: every output element is written by one thread, and a token's rows are summed in choice order k,
// so results are the same on every run. Compiled by nvcc and, in the tests, by g++ through cuda_emu.hpp.
#pragma once

#include <cstdint>

#include "limoe/core/enums.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/math/bf16.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/math/softmax.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

// xe[r, :] = x[row_token[r], :] for the A rows, 0 for an empty row of a fixed-capacity plan (row_token -1)
// (grid-stride over A * D).
template <class T>
__global__ void dispatch_forward(const std::int64_t* __restrict__ row_token, std::int64_t A, std::int64_t D,
                                 const T* __restrict__ x, T* __restrict__ xe) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < A * D; i += stride) {
    const std::int64_t t = row_token[i / D];
    xe[i] = t >= 0 ? x[t * D + i % D] : T(0);
  }
}

// dx[t, :] += sum over k of dxe[slot_row[t, k], :] (accepted choices only), k in order.
template <class T>
__global__ void dispatch_backward(const std::int64_t* __restrict__ slot_row, std::int64_t N, int K, std::int64_t D,
                                  const T* __restrict__ dxe, T* __restrict__ dx) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * D; i += stride) {
    const std::int64_t t = i / D, d = i % D;
    T acc = dx[i];
    for (int k = 0; k < K; ++k) {
      const std::int64_t r = slot_row[t * K + k];
      if (r >= 0) acc += dxe[r * D + d];
    }
    dx[i] = acc;
  }
}

// y[t, :] = sum over accepted k of gates[t, route[t, k]] * ye[slot_row[t, k], :] (0 for a token with none).
template <class T>
__global__ void combine_forward(const std::int64_t* __restrict__ slot_row, const std::int32_t* __restrict__ route,
                                const T* __restrict__ gates, std::int64_t N, int E, int K, std::int64_t D,
                                const T* __restrict__ ye, T* __restrict__ y) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * D; i += stride) {
    const std::int64_t t = i / D, d = i % D;
    T acc = 0;
    for (int k = 0; k < K; ++k) {
      const std::int64_t r = slot_row[t * K + k];
      if (r >= 0) acc += gates[t * E + route[t * K + k]] * ye[r * D + d];
    }
    y[i] = acc;
  }
}

// One block per row r: dye[r, :] = gate * dy[t, :], dgate[r] = <dy[t, :], ye[r, :]> (a block sum); zeros for
// an empty row of a fixed-capacity plan (row_token -1: the whole block returns, so no barrier is skipped by
// part of it), so its expert products add nothing to the weight gradients.
template <int kThreads, class T>
__global__ void combine_backward(const std::int64_t* __restrict__ row_token, const std::int64_t* __restrict__ row_slot,
                                 const std::int32_t* __restrict__ route, const T* __restrict__ gates, int E,
                                 std::int64_t D, const T* __restrict__ ye, const T* __restrict__ dy,
                                 T* __restrict__ dye, T* __restrict__ dgate) {
  __shared__ T red[kThreads];
  const std::int64_t r = blockIdx.x, t = row_token[r];
  if (t < 0) {
    for (std::int64_t d = threadIdx.x; d < D; d += kThreads) dye[r * D + d] = T(0);
    if (threadIdx.x == 0) dgate[r] = T(0);
    return;
  }
  const T gate = gates[t * E + route[row_slot[r]]];
  T acc = 0;
  for (std::int64_t d = threadIdx.x; d < D; d += kThreads) {
    dye[r * D + d] = gate * dy[t * D + d];
    acc += dy[t * D + d] * ye[r * D + d];
  }
  const T total = block_sum<kThreads>(red, acc);
  if (threadIdx.x == 0) dgate[r] = total;
}

// The expert that owns row r of the experts' blocks: offsets [E + 1] (expert e owns rows [offsets[e],
// offsets[e + 1])), so the last e with offsets[e] <= r < offsets[e + 1] (binary search; empty experts skipped).
LIMOE_HD inline int expert_of_row(const std::int64_t* __restrict__ offsets, int E, std::int64_t r) {
  int lo = 0, hi = E;  // offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The experts' first bias and activation over all A rows at once (grid-stride over A * M), after the products
// wrote hpre = xe W1_e^T: hpre += b1[e(r)], h = GELU(hpre), and, when h16 is not null, h16 = bf16(h) (the
// operand of the second product under the bf16 policy, rounded here instead of in a pass of its own).
template <class T>
__global__ void expert_bias_gelu(const std::int64_t* __restrict__ offsets, int E, std::int64_t A, std::int64_t M,
                                 GeluKind kind, const T* __restrict__ b1, T* __restrict__ hpre, T* __restrict__ h,
                                 std::uint16_t* __restrict__ h16) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < A * M; i += stride) {
    const std::int64_t r = i / M, m = i % M;
    const T v = hpre[i] + b1[static_cast<std::int64_t>(expert_of_row(offsets, E, r)) * M + m];
    const T g = math::gelu(kind, v);
    hpre[i] = v;
    h[i] = g;
    if (h16) h16[i] = math::bf16_round(static_cast<float>(g));
  }
}

// ye[r, :] += b2[e(r), :] over all A rows (grid-stride over A * D).
template <class T>
__global__ void expert_bias_add(const std::int64_t* __restrict__ offsets, int E, std::int64_t A, std::int64_t D,
                                const T* __restrict__ b2, T* __restrict__ ye) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < A * D; i += stride)
    ye[i] += b2[static_cast<std::int64_t>(expert_of_row(offsets, E, i / D)) * D + i % D];
}

// The experts' bias gradients in one launch: acc[e, c] += sum over expert e's rows r (in order) of g[r, c], one
// thread per (e, c): blockIdx.y = e, columns over blockIdx.x (g [A, C]; acc [E, C]).
template <class T>
__global__ void expert_column_sums(const std::int64_t* __restrict__ offsets, std::int64_t C, const T* __restrict__ g,
                                   T* __restrict__ acc) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t e = blockIdx.y;
  if (c >= C) return;
  T s = 0;
  for (std::int64_t r = offsets[e]; r < offsets[e + 1]; ++r) s += g[r * C + c];
  acc[e * C + c] += s;
}

// The stock router's gates for every token of a call (one thread per token; moe/router.hpp's GaussianNoise and
// softmax, the layer's packing of padding): probs = softmax(logits), the clean gates the losses read; a routed
// token (pos[t] >= 0: its place in its group's packed order, counted from the call's first token) gets
// noisy = logits + sigma * N(0, 1) drawn at counter pos[t] * E + e (sigma 0: no noise) and gates =
// softmax(noisy); a padding token (pos[t] < 0) keeps noisy = logits and gates = probs.
template <class T>
__global__ void router_gates(const T* __restrict__ logits, const std::int64_t* __restrict__ pos, std::int64_t N,
                             int E, Rng rng, double sigma, T* __restrict__ noisy, T* __restrict__ gates,
                             T* __restrict__ probs) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N; t += stride) {
    const T* l = logits + t * E;
    T* z = noisy + t * E;
    math::softmax_row(l, E, probs + t * E);
    const std::int64_t p = pos[t];
    const auto base = static_cast<std::uint64_t>(p) * static_cast<std::uint64_t>(E);
    for (int e = 0; e < E; ++e)
      z[e] = p >= 0 && sigma > 0 ? l[e] + static_cast<T>(sigma * rng.normal(0, base + static_cast<std::uint64_t>(e)))
                                 : l[e];
    math::softmax_row(z, E, gates + t * E);
  }
}

}  // namespace limoe::cuda::kernels
