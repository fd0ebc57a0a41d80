// src/cuda/kernels/losses.cuh: the stock auxiliary losses of the MoE layer (moe/losses.hpp's five terms,
// semantics §4) and the sums behind its routing statistics (§6), on the device, per routing group; and the
// router's logit gradient of the backward pass. The per-token formulas are moe/formulas.hpp's, the same
// functions the host terms call; only the order of the sums over tokens differs from the host's (chunks of
// kLossChunk tokens summed in order, then the chunks in order: fixed, so the same bits on every run).
//
// A call's tokens are cut into groups of group_size rows (the last may be shorter); padding (modality kPad)
// takes no part. Per group the sums are, at offsets of a row of loss_quantities(E) doubles:
//   [0, E)  clean gates G of the routed tokens   [E, 2E)  the load loss's 1 - Phi(z)
//   [2E, 3E), [3E, 4E)  G of the image, text tokens
//   [4E, 5E), [5E, 6E)  accepted choices per expert of image, text tokens
//   [6E, 7E), [7E, 8E)  dropped choices per (chosen) expert of image, text tokens
//   8E + 0, 1  image, text tokens     8E + 2, 3  their entropies H(G)     8E + 4  logsumexp(logits)^2
//   8E + 5, 6  image, text tokens with no accepted choice
// No atomics; compiled by nvcc and, in the tests, by g++ through cuda_emu.hpp.
#pragma once

#include <cstdint>

#include "limoe/core/enums.hpp"
#include "limoe/math/balance.hpp"
#include "limoe/math/softmax.hpp"
#include "limoe/moe/formulas.hpp"

namespace limoe::cuda::kernels {

namespace layout = moe::formulas::loss_layout;
inline constexpr std::int64_t kLossChunk = 256;  // tokens per partial sum
LIMOE_HD inline int loss_quantities(int E) { return layout::size(E); }
inline constexpr int kLossValues = layout::kValues;
inline constexpr int kLossCoefs = 7;  // per group: importance, load, local[2], global[2], z (0: no gradient)

// The loss set's terms (moe::StockLossMask's bits) and weights, as the kernels read them.
struct LossParams {
  int terms = 0;  // 1 importance, 2 load, 4 local entropy, 8 global entropy, 16 z
  double importance_weight = 0, load_weight = 0, z_weight = 0;
  double local_weight[2] = {0, 0}, global_weight[2] = {0, 0}, global_tau[2] = {0, 0};
  double sigma = 0;  // the router's noise scale; 0: no noise (no load term)
  double scale = 1;  // 1 / groups
};

// One thread per token: its entropy H(G), logsumexp(logits), and the load loss's 1 - Phi(z) per expert (with
// noise only); zeros for padding.
template <class T>
__global__ void loss_token_terms(const T* __restrict__ logits, const T* __restrict__ noisy, const T* __restrict__ probs,
                                 const std::int32_t* __restrict__ choice, const std::uint8_t* __restrict__ modality,
                                 std::int64_t N, int E, int K, double sigma, double* __restrict__ H,
                                 double* __restrict__ lse, double* __restrict__ sf) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N; t += stride) {
    const bool pad = modality[t] == kPad;
    H[t] = pad ? 0.0 : math::entropy(probs + t * E, E);
    lse[t] = pad ? 0.0 : math::logsumexp_row(logits + t * E, E);
    const bool load = !pad && sigma > 0;
    const T thr = load ? noisy[t * E + choice[t * K + K - 1]] : T(0);
    for (int e = 0; e < E; ++e) sf[t * E + e] = load ? moe::formulas::load_prob(thr, logits[t * E + e], sigma) : 0.0;
  }
}

// The families of loss_chunk_sums below (quantity q / E for the per-expert ones) follow the layout.
static_assert(layout::load(1, 0) == 1 && layout::gates_of(1, 0, 0) == 2 && layout::routed(1, 0, 0) == 4 &&
              layout::dropped(1, 0, 0) == 6 && layout::tokens(1, 0) == 8 && layout::entropy(1, 0) == 10 &&
              layout::lse2(1) == 12 && layout::fully_dropped(1, 0) == 13 && layout::size(1) == 15);

// One thread per (chunk, quantity): the chunk's sum of the quantity over its routed tokens in order. Chunk c is
// group c / cpg's (cpg = chunks per group) tokens [j kLossChunk, (j + 1) kLossChunk), j = c % cpg.
template <class T>
__global__ void loss_chunk_sums(const T* __restrict__ probs, const std::int32_t* __restrict__ choice,
                                const std::int32_t* __restrict__ route, const std::uint8_t* __restrict__ modality,
                                const double* __restrict__ H, const double* __restrict__ lse,
                                const double* __restrict__ sf, std::int64_t N, int E, int K, std::int64_t group_size,
                                std::int64_t chunks, std::int64_t cpg, double* __restrict__ part) {
  const int Q = loss_quantities(E);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks * Q; i += stride) {
    const std::int64_t c = i / Q, g = c / cpg, j = c % cpg;
    const int q = static_cast<int>(i % Q);
    const std::int64_t gend = (g + 1) * group_size < N ? (g + 1) * group_size : N;
    const std::int64_t t0 = g * group_size + j * kLossChunk;
    const std::int64_t t1 = t0 + kLossChunk < gend ? t0 + kLossChunk : gend;
    const int block = q < 8 * E ? q / E : 8;  // which quantity family
    const int e = q < 8 * E ? q % E : q - 8 * E;  // its expert, or the scalar's index
    double s = 0;
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::uint8_t mod = modality[t];
      if (mod == kPad) continue;
      const int m = mod == kText ? 1 : 0;
      switch (block) {
        case 0: s += static_cast<double>(probs[t * E + e]); break;
        case 1: s += sf[t * E + e]; break;
        case 2: case 3: if (m == block - 2) s += static_cast<double>(probs[t * E + e]); break;
        case 4: case 5:
          if (m == block - 4)
            for (int k = 0; k < K; ++k) s += route[t * K + k] == e ? 1.0 : 0.0;
          break;
        case 6: case 7:
          if (m == block - 6)
            for (int k = 0; k < K; ++k) s += route[t * K + k] < 0 && choice[t * K + k] == e ? 1.0 : 0.0;
          break;
        default:
          if (e < 2) s += m == e ? 1.0 : 0.0;
          else if (e < 4) s += m == e - 2 ? H[t] : 0.0;
          else if (e == 4) s += lse[t] * lse[t];
          else if (m == e - 5) {
            bool any = false;
            for (int k = 0; k < K; ++k) any = any || route[t * K + k] >= 0;
            s += any ? 0.0 : 1.0;
          }
      }
    }
    part[i] = s;
  }
}

// One thread per group: its sums (the chunks' in order) into tot [G, Q]; the terms' values, weighted into
// values [G, kLossValues] as moe/losses.hpp adds them (scale = 1 / groups); the gradient coefficients coef
// [G, kLossCoefs] and vectors vec [G, 4E] (d importance, d load, log pbar of image and of text) token_grads
// reads. A group without routed tokens gets zeros.
template <int = 0>  // a template: defined in a header, compiled in one unit per program
__global__ void loss_group_finish(const double* __restrict__ part, std::int64_t G, std::int64_t cpg, int E,
                                  LossParams lp, double* __restrict__ tot, double* __restrict__ values,
                                  double* __restrict__ coef, double* __restrict__ vec) {
  const int Q = loss_quantities(E);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t g = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < G; g += stride) {
    double* s = tot + g * Q;
    for (int q = 0; q < Q; ++q) {
      double a = 0;
      for (std::int64_t j = 0; j < cpg; ++j) a += part[(g * cpg + j) * Q + q];
      s[q] = a;
    }
    double* v = values + g * kLossValues;
    double* c = coef + g * kLossCoefs;
    double* dimp = vec + g * 4 * E;
    double* dload = dimp + E;
    for (int i = 0; i < kLossValues; ++i) v[i] = 0;
    for (int i = 0; i < kLossCoefs; ++i) c[i] = 0;
    const double n0 = s[layout::tokens(E, 0)], n1 = s[layout::tokens(E, 1)], n = n0 + n1;
    if (!(n > 0)) continue;
    const double sc = lp.scale;
    if (lp.terms & 1) {
      const double L = math::cv_squared(s, E, dimp);
      v[layout::kImportance] += sc * L, v[layout::kTotal] += sc * lp.importance_weight * L;
      if (lp.importance_weight > 0) c[0] = sc * lp.importance_weight;
    }
    if ((lp.terms & 2) && lp.sigma > 0) {
      double* load = s + layout::load(E, 0);  // the sums become means in place (not a statistic)
      for (int e = 0; e < E; ++e) load[e] /= n;
      const double L = math::cv_squared(load, E, dload);
      v[layout::kLoad] += sc * L, v[layout::kTotal] += sc * lp.load_weight * L;
      if (lp.load_weight > 0) c[1] = sc * lp.load_weight / n / lp.sigma;
    }
    // Per modality m, called with m a constant (no array indexed at run time: no stack frame).
    auto local = [&](int m, double nm, double w) {
      if (!(nm > 0)) return;
      const double L = s[layout::entropy(E, m)] / nm;
      v[layout::kLocal + m] += sc * L, v[layout::kTotal] += sc * w * L;
      if (w > 0) c[2 + m] = sc * w / nm;
    };
    auto global = [&](int m, double nm, double w, double tau) {
      if (!(nm > 0)) return;
      double* du = dimp + (2 + m) * E;  // pbar first, then log pbar where the gradient flows
      for (int e = 0; e < E; ++e) du[e] = s[layout::gates_of(E, m, e)] / nm;
      const double Hp = math::entropy(du, E);
      const double L = tau - Hp > 0 ? tau - Hp : 0.0;
      v[layout::kGlobal + m] += sc * L, v[layout::kTotal] += sc * w * L;
      if (!(w > 0) || !(L > 0)) return;
      for (int e = 0; e < E; ++e) du[e] = math::safe_log(du[e]);
      c[4 + m] = sc * w / nm;
    };
    if (lp.terms & 4) local(0, n0, lp.local_weight[0]), local(1, n1, lp.local_weight[1]);
    if (lp.terms & 8)
      global(0, n0, lp.global_weight[0], lp.global_tau[0]), global(1, n1, lp.global_weight[1], lp.global_tau[1]);
    if (lp.terms & 16) {
      const double L = s[layout::lse2(E)] / n;
      v[layout::kZ] += sc * L, v[layout::kTotal] += sc * lp.z_weight * L;
      if (lp.z_weight > 0) c[6] = sc * lp.z_weight * 2.0 / n;
    }
  }
}

// One thread per token: the weighted gradient of every term with respect to its clean logits, in the host
// terms' order (importance, load, local entropy, global entropy, z); 0 for padding.
template <class T>
__global__ void loss_token_grads(const T* __restrict__ logits, const T* __restrict__ noisy, const T* __restrict__ probs,
                                 const std::int32_t* __restrict__ choice, const std::uint8_t* __restrict__ modality,
                                 const double* __restrict__ H, const double* __restrict__ lse,
                                 const double* __restrict__ coef, const double* __restrict__ vec, std::int64_t N, int E,
                                 int K, std::int64_t group_size, double sigma, double* __restrict__ dl) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N; t += stride) {
    double* d = dl + t * E;
    for (int e = 0; e < E; ++e) d[e] = 0;
    if (modality[t] == kPad) continue;
    const int m = modality[t] == kText ? 1 : 0;
    const std::int64_t g = t / group_size;
    const double* c = coef + g * kLossCoefs;
    const double* dimp = vec + g * 4 * E;
    const T* G = probs + t * E;
    if (c[0] > 0) moe::formulas::add_softmax_grad(G, dimp, E, c[0], d);
    if (c[1] > 0)
      moe::formulas::add_load_grad(logits + t * E, noisy + t * E, choice + t * K, E, K, sigma, dimp + E, c[1], d);
    if (c[2 + m] > 0) moe::formulas::add_local_entropy_grad(G, E, H[t], c[2 + m], d);
    if (c[4 + m] > 0) moe::formulas::add_softmax_grad(G, dimp + (2 + m) * E, E, c[4 + m], d);
    if (c[6] > 0) moe::formulas::add_z_grad(G, E, lse[t], c[6], d);
  }
}

// One thread per token: the router's logit gradient (moe/formulas.hpp's router_logit_grad) from the rows' gate
// gradients and the auxiliary losses' (weighted by aux_scale).
template <class T>
__global__ void router_backward(const T* __restrict__ gates, const std::int32_t* __restrict__ route,
                                const std::int64_t* __restrict__ slot_row, const T* __restrict__ row_dgate,
                                const double* __restrict__ aux, double aux_scale, std::int64_t N, int E, int K,
                                T* __restrict__ dlogits) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < N; t += stride)
    moe::formulas::router_logit_grad(gates + t * E, route + t * K, slot_row + t * K, row_dgate, E, K, aux_scale,
                                     aux + t * E, dlogits + t * E);
}

}  // namespace limoe::cuda::kernels
