// limoe/moe/config.hpp: the run-time configuration of a sparse MoE layer and the expert capacity.
//
// `RouterConfig` mirrors the checkpoint JSON "router" object (docs/cli.md); `AuxLossConfig` holds the weights and thresholds of the auxiliary losses (semantics §4). Sizes and
// factors are data; what changes the code path (top-K, assignment order, loss set) are policy types in
// router.hpp and losses.hpp, picked from these values by `visit_router`.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/core/enums.hpp"

namespace limoe::moe {

// The shared enums (core/enums.hpp), also spelled moe::Mode, moe::kImage, ...
using limoe::kImage;
using limoe::kModalities;
using limoe::kText;
using limoe::kPad;
using limoe::Modality;
using limoe::Mode;

// The most experts a layer supports (the auxiliary losses keep per-expert sums on the stack).
inline constexpr int kMaxExperts = 256;

namespace detail {
// How the router and the loss terms split a group's per-token work over threads. Only the work is split: each
// token's values depend on that token alone, and every sum over tokens still runs in token order on one thread,
// so the results are the same bits on any thread count.
inline constexpr index_t kRowGrain = 256;     // tokens per task
inline constexpr index_t kNoiseGrain = 2048;  // noise draws per task
}  // namespace detail

// E and K are not here: they have one owner, ModelConfig (experts, top_k) for a model and MoeConfig for a
// layer used on its own; the model builds the layer's MoeConfig from its own at every call.
struct RouterConfig {
  double noise_std = 1.0;               // training noise is N(0, (noise_std / E)^2) per (token, expert)
  double capacity_factor_train = 1.05;  // C = ceil(K * S * factor / E)
  double capacity_factor_eval = 0.0;    // 0: no-drop mode, no token is ever dropped
  int capacity_multiple_of = 1;         // round C up to a multiple of this (vmoe uses 4)
  bool bpr = true;                      // Batch Priority Routing (training and evaluation)
  index_t group_size = 0;               // tokens per routing group; 0 = all tokens of a call form one group

  void validate() const {
    LIMOE_CHECK(noise_std >= 0 && std::isfinite(noise_std), "RouterConfig: noise_std must be finite and >= 0, got ",
                noise_std);
    LIMOE_CHECK(capacity_factor_train >= 0 && std::isfinite(capacity_factor_train),
                "RouterConfig: capacity_factor_train must be finite and >= 0 (0 = no drop), got ",
                capacity_factor_train);
    LIMOE_CHECK(capacity_factor_eval >= 0 && std::isfinite(capacity_factor_eval),
                "RouterConfig: capacity_factor_eval must be finite and >= 0 (0 = no drop), got ",
                capacity_factor_eval);
    LIMOE_CHECK(capacity_multiple_of >= 1, "RouterConfig: capacity_multiple_of must be >= 1, got ",
                capacity_multiple_of);
    LIMOE_CHECK(group_size >= 0, "RouterConfig: group_size must be >= 0 (0 = one group), got ", group_size);
  }
  double capacity_factor(bool training) const { return training ? capacity_factor_train : capacity_factor_eval; }
};

// Weights and thresholds of the auxiliary losses (semantics §4). Per-modality arrays are indexed by
// Modality: [0] image, [1] text. A weight of 0 still reports the term's value but adds no gradient (as vmoe's
// `_weighted_sum`, which skips terms whose weight is not positive).
struct AuxLossConfig {
  double importance_weight = 0.005;
  double load_weight = 0.005;
  std::array<double, kModalities> local_entropy_weight{0.01, 0.01};
  std::array<double, kModalities> global_entropy_weight{0.01, 0.01};
  std::array<double, kModalities> global_entropy_tau{1.3862943611198906, 0.6931471805599453};  // log 4, log 2
  double z_loss_weight = 0.0;

  void validate() const {
    auto ok = [](double w) { return std::isfinite(w) && w >= 0; };
    LIMOE_CHECK(ok(importance_weight) && ok(load_weight) && ok(z_loss_weight) && ok(local_entropy_weight[0]) &&
                    ok(local_entropy_weight[1]) && ok(global_entropy_weight[0]) && ok(global_entropy_weight[1]),
                "AuxLossConfig: every loss weight must be finite and >= 0");
    // An entropy is >= 0, so a negative tau would make max(0, tau - H) zero whatever the routing: refused (a weight
    // of 0 turns the term off).
    for (int m = 0; m < kModalities; ++m)
      LIMOE_CHECK(std::isfinite(global_entropy_tau[m]) && global_entropy_tau[m] >= 0,
                  "AuxLossConfig: global_entropy_tau[", m, "] must be finite and >= 0 (an entropy in nats; a negative "
                  "tau makes the term 0 whatever the routing), got ", global_entropy_tau[m]);
  }
};

// Everything one MoE layer needs besides its parameters: routing, losses, the experts' activation.
struct MoeConfig {
  int experts = 8;  // E
  int top_k = 1;    // K (an explicit router policy must report the same top_k())
  RouterConfig router;
  AuxLossConfig losses;
  GeluKind gelu = GeluKind::Erf;
  // The index of this call's first token in the whole batch of the step: the training noise of a token is drawn
  // by that global index, so a data-parallel rank draws what one process would for the same tokens.
  index_t first_token = 0;
  void validate() const {
    LIMOE_CHECK(first_token >= 0, "MoeConfig: first_token must be >= 0, got ", first_token);
    LIMOE_CHECK(experts >= 1 && experts <= kMaxExperts, "MoeConfig: experts must be in [1, ", kMaxExperts, "], got ",
                experts);
    LIMOE_CHECK(top_k >= 1 && top_k <= experts, "MoeConfig: top_k must be in [1, experts = ", experts, "], got ",
                top_k);
    router.validate();
    losses.validate();
  }
};

// Capacity of each expert for one group of S tokens (docs/semantics.md, "Capacity"):
//   C = ceil(K * S * factor / E), evaluated in double as written (as vmoe's compute_capacity does), then rounded
//   up to a multiple of `multiple_of`; factor 0 means no drop (C = S: each token picks an expert at most once,
//   so no expert can overflow).
// The ceiling of a positive number is at least 1, so any positive factor gives every group at least one slot
// per expert here, a shorter last group included (a batch never fails because of its remainder). What the
// upstream specification calls an error (C < 1, its example E = 8, S = 4, factor 0.1) is a model's configured
// group that cannot hold one token per expert before rounding: check_group_capacity, which ModelConfig::validate
// applies to router.group_size. C < 1 remains an error here where the product underflows to 0 (a factor like
// 1e-320).
inline index_t compute_capacity(index_t S, int E, int K, double factor, int multiple_of = 1) {
  LIMOE_CHECK(E >= 1 && K >= 1 && K <= E, "compute_capacity: need 1 <= K <= E, got K = ", K, ", E = ", E);
  LIMOE_CHECK(S >= 0, "compute_capacity: group size S must be >= 0, got ", S);
  LIMOE_CHECK(factor >= 0 && std::isfinite(factor), "compute_capacity: capacity factor must be finite and >= 0, got ",
              factor);
  LIMOE_CHECK(multiple_of >= 1, "compute_capacity: multiple_of must be >= 1, got ", multiple_of);
  if (factor == 0.0 || S == 0) return S;  // no-drop mode (or an empty group)
  const double raw = static_cast<double>(K) * static_cast<double>(S) * factor / static_cast<double>(E);
  LIMOE_CHECK(raw > 0, "expert capacity K*S*capacity_factor/E = ", K, "*", S, "*", factor, "/", E, " = ", raw,
              " is below one token (C < 1): raise the capacity factor, or use 0 (no drop)");
  LIMOE_CHECK(raw < 1e15, "expert capacity K*S*capacity_factor/E = ", raw,
              " is too large to count slots: any factor of at least E/K = ", static_cast<double>(E) / K,
              " already keeps every token; use that or 0 (no drop)");
  index_t C = static_cast<index_t>(std::ceil(raw));
  if (multiple_of > 1) C = (C + multiple_of - 1) / multiple_of * multiple_of;
  return C;
}

// A configured routing group of S tokens (a model's router.group_size) under a positive capacity factor must
// give each expert at least one slot before rounding, K * S * factor / E >= 1; otherwise the config is refused
// (docs/semantics.md §3.5: E = 8, K = 1, S = 4, factor 0.1 gives 0.05). The error names the factor and the group
// size as the caller's user knows them (config keys, or a command's flags).
inline void check_group_capacity(index_t S, int E, int K, double factor, const char* factor_name,
                                 const char* group_name = "router.group_size", index_t pairs = 0) {
  if (S <= 0 || !(factor > 0) || E < 1 || K < 1) return;  // one group per call, no drop, or checked elsewhere
  const double raw = static_cast<double>(K) * static_cast<double>(S) * factor / static_cast<double>(E);
  // Groups set as a count of image-text pairs (pairs > 0) are named by it, with their S tokens.
  const std::string group = pairs > 0 ? std::string(group_name) + " = " + std::to_string(pairs) + " pairs (" +
                                            std::to_string(S) + " tokens)"
                                      : std::string(group_name) + " = " + std::to_string(S) + " tokens";
  LIMOE_CHECK(raw >= 1, "routing groups of ", group, " give each of the ", E, " experts K*S*capacity factor/E = ", K,
              "*", S, "*", factor, "/", E, " = ", raw, " slots, below one token (C < 1): raise ", factor_name, " or ",
              group_name, ", or set the factor to 0 (no drop)");
}

}  // namespace limoe::moe
