// limoe/moe/losses.hpp: the auxiliary router losses (semantics §4) as composable policy types.
//
//   AuxLosses<ImportanceLoss, LoadLoss, LocalEntropyLoss, GlobalEntropyLoss, ZLoss>   (= DefaultAuxLosses)
//
// Each term computes its value on one group and adds its weighted gradient with respect to the router's clean
// logits. The layer averages over groups (scale = 1 / number of groups); summing over MoE blocks is the
// model's job. Values are reported unweighted per term and weighted in `total`.
// A term is any type with `template <class T> static void accumulate(const LossGroup<T>&, const AuxLossConfig&,
// AuxLossValues&, double* dlogits)` (the `AuxLossTerm` concept): add `scale * value` to its field of the
// values, `scale * weight * value` to `total`, and `scale * weight * d value / d logits` to dlogits [S, E]
// when dlogits is not null and its weight is positive.
//
// The stock terms spread their per-token work (transcendentals, gradient rows) over the thread pool and keep
// every sum over tokens in token order on one thread: the same bits on any thread count (detail::kRowGrain).
// A token's transcendentals (math/plain.hpp's erfc, exp, log) are taken in loops over its experts that
// vectorise, before the sums that read them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/balance.hpp"
#include "limoe/math/normal.hpp"
#include "limoe/math/softmax.hpp"
#include "limoe/moe/config.hpp"
#include "limoe/moe/formulas.hpp"

namespace limoe::moe {

// Loss values of one layer call, averaged over groups. Per-modality arrays: [0] image, [1] text.
struct AuxLossValues {
  double total = 0;       // sum of weight * term: what the layer adds to the training loss
  double importance = 0;  // (std(Imp) / mean(Imp))^2, Imp_e = sum_s G[s, e]
  double load = 0;        // (std(Load) / mean(Load))^2; 0 without noise (evaluation, noise_std 0)
  std::array<double, kModalities> local_entropy{};   // mean_s H(G[s, :]) over the modality's tokens
  std::array<double, kModalities> global_entropy{};  // max(0, tau_m - H(pbar_m)): the loss term, not H itself
  double z = 0;           // mean_s logsumexp(logits_s)^2
};

// What a loss term sees of one group of S tokens.
template <class T>
struct LossGroup {
  index_t S = 0;
  int E = 0, K = 0;
  const T* logits = nullptr;            // [S, E] clean logits
  const T* noisy = nullptr;             // [S, E] the logits the gates were taken from (noise in training)
  const T* probs = nullptr;             // [S, E] clean gates G = softmax(logits)
  const std::int32_t* choice = nullptr; // [S, K] experts by decreasing noisy gate
  const std::uint8_t* modality = nullptr;  // [S] 0 image, 1 text
  const double* entropy = nullptr;      // [S] H(probs) of each token, when the layer has them (its statistics
                                        // take them); null: a term that needs them computes them
  bool noise_active = false;            // training with noise_std > 0
  double sigma = 0;                     // noise_std / E
  double scale = 1;                     // 1 / number of groups
};

template <class L>
concept AuxLossTerm = requires(const LossGroup<float>& gf, const LossGroup<double>& gd, const AuxLossConfig& c,
                               AuxLossValues& v, double* d) {
  L::template accumulate<float>(gf, c, v, d);
  L::template accumulate<double>(gd, c, v, d);
};

namespace detail {
inline constexpr int kMaxStackExperts = kMaxExperts;  // per-group sums on the stack

// A token's entropy H(G) and logsumexp(logits) as math/ defines them (entropy, logsumexp_row), with the E logs
// or exps taken first in one pass that vectorises (the sums after it keep expert order: the same bits).
template <class T>
double token_entropy(const T* G, int E) {
  std::array<double, kMaxStackExperts> logs;
  for (int e = 0; e < E; ++e) logs[e] = math::safe_log(static_cast<double>(G[e]));
  return math::entropy_with(G, E, [&](int e) { return logs[e]; });
}
template <class T>
double token_logsumexp(const T* x, int E) {
  const double m = static_cast<double>(math::row_max(x, E));
  std::array<double, kMaxStackExperts> exps;
  for (int e = 0; e < E; ++e) exps[e] = math::plain_exp(static_cast<double>(x[e]) - m);
  return math::logsumexp_with(m, E, [&](int e) { return exps[e]; });
}
}  // namespace detail

// V-MoE importance loss (Riquelme et al. 2021, appendix A.2): Imp_e = sum_s G[s, e] on clean gates.
struct ImportanceLoss {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    const int E = g.E;
    std::array<double, detail::kMaxStackExperts> imp{}, dimp{};
    for (index_t s = 0; s < g.S; ++s)
      for (int e = 0; e < E; ++e) imp[e] += static_cast<double>(g.probs[s * E + e]);
    const double L = math::cv_squared(imp.data(), E, dimp.data());
    v.importance += g.scale * L;
    v.total += g.scale * c.importance_weight * L;
    if (dl == nullptr || !(c.importance_weight > 0)) return;
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      formulas::add_softmax_grad(g.probs + s * E, dimp.data(), E, g.scale * c.importance_weight, dl + s * E);
    });
  }
};

// V-MoE load loss: p[s, e] = 1 - Phi((thr_s - logits[s, e]) / sigma), thr_s the K-th largest noisy logit,
// Load_e = mean_s p[s, e]. As in vmoe's _load_auxiliary_loss the threshold is the noisy logit itself, so the
// gradient also flows through thr_s into the logit of the token's K-th choice. Without noise (evaluation,
// noise_std 0) the term is 0, as vmoe leaves it out of deterministic routers.
struct LoadLoss {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    if (!g.noise_active || !(g.sigma > 0) || g.S == 0) return;
    const int E = g.E, K = g.K;
    std::array<double, detail::kMaxStackExperts> load{}, dload{};
    ::limoe::detail::ScratchLease<double> sf(g.S * E);  // [S, E] 1 - Phi(z), summed below in token order
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      const T thr = g.noisy[s * E + g.choice[s * K + K - 1]];
      for (int e = 0; e < E; ++e) sf.data()[s * E + e] = formulas::load_prob(thr, g.logits[s * E + e], g.sigma);
    });
    for (index_t s = 0; s < g.S; ++s)
      for (int e = 0; e < E; ++e) load[e] += sf.data()[s * E + e];
    for (int e = 0; e < E; ++e) load[e] /= static_cast<double>(g.S);
    const double L = math::cv_squared(load.data(), E, dload.data());
    v.load += g.scale * L;
    v.total += g.scale * c.load_weight * L;
    if (dl == nullptr || !(c.load_weight > 0)) return;
    const double coef = g.scale * c.load_weight / static_cast<double>(g.S) / g.sigma;
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      const T* lg = g.logits + s * E;
      const double thr = static_cast<double>(g.noisy[s * E + g.choice[s * K + K - 1]]);
      std::array<double, detail::kMaxStackExperts> d;  // the token's terms, in one vectorised pass
      for (int e = 0; e < E; ++e) d[e] = formulas::load_grad_term(thr, lg[e], g.sigma, dload[e], coef);
      formulas::add_load_grad_with(g.choice + s * K, E, K, dl + s * E, [&](int e) { return d[e]; });
    });
  }
};

// LIMoE local entropy per modality: mean over the modality's tokens of H(G[s, :]) (minimised).
// dH/dlogits_e = -G_e (log G_e + H). A modality absent from the group contributes 0.
struct LocalEntropyLoss {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    const int E = g.E;
    std::array<index_t, kModalities> n{};
    for (index_t s = 0; s < g.S; ++s) ++n[g.modality[s] ? 1 : 0];
    std::array<double, kModalities> sum{};
    ::limoe::detail::ScratchLease<double> Hs(g.S);  // [S] each token's entropy, summed below in token order
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      const int m = g.modality[s] ? 1 : 0;
      const T* G = g.probs + s * E;
      const double H = g.entropy != nullptr ? g.entropy[s] : detail::token_entropy(G, E);
      Hs.data()[s] = H;
      const double w = c.local_entropy_weight[m];
      if (dl == nullptr || !(w > 0)) return;
      formulas::add_local_entropy_grad(G, E, H, g.scale * w / static_cast<double>(n[m]), dl + s * E);
    });
    for (index_t s = 0; s < g.S; ++s) sum[g.modality[s] ? 1 : 0] += Hs.data()[s];
    for (int m = 0; m < kModalities; ++m) {
      if (n[m] == 0) continue;
      const double L = sum[m] / static_cast<double>(n[m]);
      v.local_entropy[m] += g.scale * L;
      v.total += g.scale * c.local_entropy_weight[m] * L;
    }
  }
};

// LIMoE global entropy per modality: max(0, tau_m - H(pbar_m)), pbar_m = mean of the modality's G rows.
// Gradient (where tau_m > H): dL/dpbar_e = log pbar_e + 1, spread as 1/n_m over the rows (the +1 cancels in
// the softmax backward). At H = tau exactly the subgradient 0 is used. Absent modality: 0.
struct GlobalEntropyLoss {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    const int E = g.E;
    for (int m = 0; m < kModalities; ++m) {
      index_t n = 0;
      std::array<double, detail::kMaxStackExperts> pbar{}, du{};
      for (index_t s = 0; s < g.S; ++s) {
        if ((g.modality[s] ? 1 : 0) != m) continue;
        ++n;
        for (int e = 0; e < E; ++e) pbar[e] += static_cast<double>(g.probs[s * E + e]);
      }
      if (n == 0) continue;
      for (int e = 0; e < E; ++e) pbar[e] /= static_cast<double>(n);
      const double H = math::entropy(pbar.data(), E);
      const double L = std::max(0.0, c.global_entropy_tau[m] - H);
      v.global_entropy[m] += g.scale * L;
      v.total += g.scale * c.global_entropy_weight[m] * L;
      const double w = c.global_entropy_weight[m];
      if (dl == nullptr || !(w > 0) || !(L > 0)) continue;
      for (int e = 0; e < E; ++e) du[e] = math::safe_log(pbar[e]);
      const double coef = g.scale * w / static_cast<double>(n);
      parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
        if ((g.modality[s] ? 1 : 0) == m) formulas::add_softmax_grad(g.probs + s * E, du.data(), E, coef, dl + s * E);
      });
    }
  }
};

// Router z-loss (ST-MoE, Zoph et al. 2022): mean_s logsumexp(logits_s)^2; d/dlogits = 2 lse G / S.
struct ZLoss {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    if (g.S == 0) return;
    const int E = g.E;
    double sum = 0;
    const bool grad = dl != nullptr && c.z_loss_weight > 0;
    const double coef = g.scale * c.z_loss_weight * 2.0 / static_cast<double>(g.S);
    ::limoe::detail::ScratchLease<double> lses(g.S);  // [S] logsumexp per token, squared and summed in token order
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      const double lse = detail::token_logsumexp(g.logits + s * E, E);
      lses.data()[s] = lse;
      if (grad) formulas::add_z_grad(g.probs + s * E, E, lse, coef, dl + s * E);
    });
    for (index_t s = 0; s < g.S; ++s) sum += lses.data()[s] * lses.data()[s];
    const double L = sum / static_cast<double>(g.S);
    v.z += g.scale * L;
    v.total += g.scale * c.z_loss_weight * L;
  }
};

// A set of terms, applied in order.
template <AuxLossTerm... Terms>
struct AuxLosses {
  template <class T>
  static void accumulate(const LossGroup<T>& g, const AuxLossConfig& c, AuxLossValues& v, double* dl) {
    (Terms::template accumulate<T>(g, c, v, dl), ...);
  }
};

using DefaultAuxLosses = AuxLosses<ImportanceLoss, LoadLoss, LocalEntropyLoss, GlobalEntropyLoss, ZLoss>;

// Which stock terms a loss set holds, as a mask (1 importance, 2 load, 4 local entropy, 8 global entropy, 16 z),
// or -1 when it holds a term of the user's own or one twice: a device backend computes a stock set there (the
// CUDA backend's aux_losses, with the formulas of moe/formulas.hpp) and any other set on the host.
template <class Term>
inline constexpr int kStockLossBit = std::is_same_v<Term, ImportanceLoss>      ? 1
                                     : std::is_same_v<Term, LoadLoss>          ? 2
                                     : std::is_same_v<Term, LocalEntropyLoss>  ? 4
                                     : std::is_same_v<Term, GlobalEntropyLoss> ? 8
                                     : std::is_same_v<Term, ZLoss>             ? 16
                                                                               : 0;
template <class Losses>
inline constexpr int kStockLossMask = -1;
template <class... Terms>
inline constexpr int kStockLossMask<AuxLosses<Terms...>> =
    ((kStockLossBit<Terms> != 0) && ...) && (kStockLossBit<Terms> + ... + 0) == (kStockLossBit<Terms> | ... | 0)
        ? (kStockLossBit<Terms> | ... | 0)
        : -1;
static_assert(kStockLossMask<DefaultAuxLosses> == 31 && kStockLossMask<AuxLosses<>> == 0);
static_assert(kStockLossMask<AuxLosses<ZLoss, ZLoss>> == -1);
using NoAuxLosses = AuxLosses<>;

}  // namespace limoe::moe
