// limoe/moe/formulas.hpp: the MoE layer's per-token formulas of the auxiliary losses' gradients (semantics §4) and
// of the router's logit gradient (§3), once, for the host and the device (LIMOE_HD): the stock loss terms
// (moe/losses.hpp) and the layer's backward (moe/layer.hpp) call them on the CPU, the CUDA backend's kernels
// (src/cuda/kernels/losses.cuh) on the GPU. Each adds to or writes one token's row of E values; none keeps a
// per-expert array of its own, so a kernel thread needs no scratch.
#pragma once

#include <cstdint>

#include "limoe/math/balance.hpp"
#include "limoe/math/host_device.hpp"
#include "limoe/math/normal.hpp"

namespace limoe::moe::formulas {

// dl[e] += coef * G_e (du_e - <du, G>): the softmax's backward of du through G = softmax(logits), scaled and
// added (the importance and global entropy terms; math::softmax_row_backward's arithmetic).
template <class T>
LIMOE_HD inline void add_softmax_grad(const T* G, const double* du, int E, double coef, double* dl) {
  double dot = 0;
  for (int e = 0; e < E; ++e) dot += du[e] * static_cast<double>(G[e]);
  for (int e = 0; e < E; ++e) dl[e] += coef * (static_cast<double>(G[e]) * (du[e] - dot));
}

// The load loss's probability that expert e stays among a token's top K under fresh noise: 1 - Phi(z),
// z = (thr - logit_e) / sigma, thr the token's K-th largest noisy logit.
template <class T>
LIMOE_HD LIMOE_INLINE double load_prob(T thr, T logit, double sigma) {
  return math::normal_sf((static_cast<double>(thr) - static_cast<double>(logit)) / sigma);
}

// One (token, expert) term of the load loss's gradient: coef * dload_e * phi(z), z = (thr - logit) / sigma
// (dL/dp_e * phi(z) / sigma, coef = scale * weight / S / sigma).
template <class T>
LIMOE_HD LIMOE_INLINE double load_grad_term(double thr, T logit, double sigma, double dload_e, double coef) {
  const double z = (thr - static_cast<double>(logit)) / sigma;
  return coef * dload_e * math::normal_pdf(z);
}
// The load loss's gradient for one token from its terms d_e = term_of(e): d_e into logit e (d p / d logits[e]
// = +phi / sigma), and minus their sum into the logit of the token's K-th choice (d p / d thr = -phi / sigma:
// thr is that noisy logit itself, as in vmoe).
template <class TermOf>
LIMOE_HD inline void add_load_grad_with(const std::int32_t* choice, int E, int K, double* dl, TermOf term_of) {
  const int kth = choice[K - 1];
  double to_thr = 0;
  for (int e = 0; e < E; ++e) {
    const double d = term_of(e);
    dl[e] += d;
    to_thr -= d;
  }
  dl[kth] += to_thr;
}
// ... with the terms taken here (a device thread); the CPU's loss term takes a token's E terms in one
// vectorised pass first and passes them to add_load_grad_with.
template <class T>
LIMOE_HD inline void add_load_grad(const T* logits, const T* noisy, const std::int32_t* choice, int E, int K,
                                   double sigma, const double* dload, double coef, double* dl) {
  const double thr = static_cast<double>(noisy[choice[K - 1]]);
  add_load_grad_with(choice, E, K, dl, [=](int e) { return load_grad_term(thr, logits[e], sigma, dload[e], coef); });
}

// The local entropy's gradient for one token of entropy H: dl[e] -= coef * G_e (log G_e + H), coef = scale *
// weight / (the modality's tokens in the group).
template <class T>
LIMOE_HD LIMOE_INLINE void add_local_entropy_grad(const T* G, int E, double H, double coef, double* dl) {
  for (int e = 0; e < E; ++e) {
    const double p = static_cast<double>(G[e]);
    dl[e] -= coef * p * (math::safe_log(p) + H);
  }
}

// The z-loss's gradient for one token: dl[e] += coef * lse * G_e, coef = scale * weight * 2 / S.
template <class T>
LIMOE_HD inline void add_z_grad(const T* G, int E, double lse, double coef, double* dl) {
  for (int e = 0; e < E; ++e) dl[e] += coef * lse * static_cast<double>(G[e]);
}

// The router's logit gradient for one token (semantics §3, backward): the combine weights are
// gates = softmax(noisy logits) and the noise is a constant, so with dg_e = the sum of the gate gradients of
// the token's accepted choices routed to e (choice order k), out_e = g_e (dg_e - <g, dg>) + aux_scale * aux_e.
// route [K] (expert or -1), slot_row [K] (the accepted choice's row, -1 dropped), row_dgate [A].
template <class T, class R>
LIMOE_HD inline void router_logit_grad(const T* g, const std::int32_t* route, const std::int64_t* slot_row,
                                       const R* row_dgate, int E, int K, double aux_scale, const double* aux, T* out) {
  auto dg = [&](int e) {
    double s = 0;
    for (int k = 0; k < K; ++k)
      if (slot_row[k] >= 0 && route[k] == e) s += static_cast<double>(row_dgate[slot_row[k]]);
    return s;
  };
  double dot = 0;
  for (int e = 0; e < E; ++e) dot += static_cast<double>(g[e]) * dg(e);
  for (int e = 0; e < E; ++e)
    out[e] = static_cast<T>(static_cast<double>(g[e]) * (dg(e) - dot) + aux_scale * aux[e]);
}

// The layout of a routing group's loss values and sums (the CUDA backend's aux_losses writes them, the layer
// reads the losses and its statistics from them), once.
namespace loss_layout {
// values [kValues] per group: total, importance, load, local entropy image / text, global entropy image / text, z
inline constexpr int kTotal = 0, kImportance = 1, kLoad = 2, kLocal = 3, kGlobal = 5, kZ = 7, kValues = 8;
// sums [size(E)] per group (m: 0 image, 1 text; e: an expert)
LIMOE_HD constexpr int gates(int, int e) { return e; }                        // clean gates G of routed tokens
LIMOE_HD constexpr int load(int E, int e) { return E + e; }                   // the load loss's 1 - Phi(z)
LIMOE_HD constexpr int gates_of(int E, int m, int e) { return (2 + m) * E + e; }  // G of modality m's tokens
LIMOE_HD constexpr int routed(int E, int m, int e) { return (4 + m) * E + e; }    // accepted choices
LIMOE_HD constexpr int dropped(int E, int m, int e) { return (6 + m) * E + e; }   // dropped choices (chosen e)
LIMOE_HD constexpr int tokens(int E, int m) { return 8 * E + m; }
LIMOE_HD constexpr int entropy(int E, int m) { return 8 * E + 2 + m; }        // sum of H(G) of the tokens
LIMOE_HD constexpr int lse2(int E) { return 8 * E + 4; }                      // sum of logsumexp(logits)^2
LIMOE_HD constexpr int fully_dropped(int E, int m) { return 8 * E + 5 + m; }  // tokens with no accepted choice
LIMOE_HD constexpr int size(int E) { return 8 * E + 7; }
}  // namespace loss_layout

}  // namespace limoe::moe::formulas
