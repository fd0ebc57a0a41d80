// limoe/moe/router.hpp: routing one group of tokens to experts (semantics §3), as composable policies.
//
// A router sees one group of S tokens with their clean logits [S, E] and decides, for every token, its K
// choices (best first) and which of them the experts accept under capacity C. The stock router is
//   TopKRouter<KPolicy, NoisePolicy, OrderPolicy>
//     KPolicy     StaticTopK<1>, StaticTopK<2> (K known at compile time) or DynamicTopK (any K at run time)
//     NoisePolicy GaussianNoise (training noise N(0, (noise_std / E)^2)) or NoNoise
//     OrderPolicy VanillaOrder (group order) or BatchPriorityOrder (BPR, V-MoE section 4.1)
// and `visit_router(config, fn)` turns a RouterConfig into the matching instantiation (K 1 and 2 static, any
// other K dynamic). Capacity and grouping are data (RouterConfig), handled by the layer.
//
// Writing your own router: satisfy `RouterPolicy<R, T>` below. Contract of `route(g)`:
//   - g.noisy[S, E]  = g.logits + r with r independent of the logits (the combine weights are differentiated
//                      as softmax(noisy), so d noisy = d logits);
//   - g.gates[S, E]  = softmax(g.noisy) per row;
//   - g.choice[S, K] = each token's K distinct experts, best first (the K-th is the load loss threshold);
//   - g.route[S, K]  = g.choice or -1 (dropped), no expert accepting more than g.capacity choices.
// The layer checks the last two conditions after every call and throws if a router breaks them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/math/softmax.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/softmax.hpp"
#include "limoe/moe/config.hpp"
#include "limoe/moe/top_k.hpp"

namespace limoe::moe {

// One group of S consecutive tokens of a call (rows [row0, row0 + S) of the layer input), in and out.
template <class T>
struct RouteGroup {
  index_t row0 = 0;        // the group's first token: MoeConfig::first_token + its row in the call (noise is indexed by it)
  index_t S = 0;           // tokens in the group
  int E = 0;               // experts
  int K = 0;               // choices per token (the router's top_k())
  index_t capacity = 0;    // C: the most choices one expert may accept in this group
  Mode mode = Mode::Eval;
  const Rng* rng = nullptr;  // the step's generator (training noise)
  const T* logits = nullptr;      // [S, E] in: clean router logits x W_r^T
  T* noisy = nullptr;             // [S, E] out: logits + noise
  T* gates = nullptr;             // [S, E] out: softmax(noisy)
  std::int32_t* choice = nullptr; // [S, K] out: experts by decreasing gate
  std::int32_t* route = nullptr;  // [S, K] out: accepting expert or -1
  index_t* order = nullptr;       // [S] scratch: visiting order of the tokens
  index_t* fill = nullptr;        // [E] scratch: choices accepted so far per expert
};

// The documented customisation point: anything with top_k() and route(RouteGroup<T>) is a router.
template <class R, class T>
concept RouterPolicy = requires(const R& r, const RouteGroup<T>& g) {
  { r.top_k() } -> std::convertible_to<int>;
  r.route(g);
};

// The standard deviation of the router's training noise for E experts in `mode`, 0 when it adds none: what
// the load loss (semantics §4) uses as sigma. A router declares it with `noise_sigma(E)` and
// `noise_active(mode)` (TopKRouter forwards its noise policy's); a router without them adds no noise, and its
// load loss is 0.
template <class R>
double router_noise_sigma(const R& r, int E, Mode mode) {
  if constexpr (requires { { r.noise_sigma(E) } -> std::convertible_to<double>; { r.noise_active(mode) } -> std::convertible_to<bool>; })
    return r.noise_active(mode) ? static_cast<double>(r.noise_sigma(E)) : 0.0;
  else
    return 0.0;
}

namespace detail {
// y = softmax(x) over rows of E (the gates of S tokens): math::softmax_row's formula with float's exp vectorised
// over a task's tokens at once (ops/softmax.hpp; a token's bits depend on its row alone).
template <class T>
void softmax_rows_pool(const T* x, T* y, index_t S, int E) {
  parallel_for(0, S, kRowGrain, [&](index_t s0, index_t s1) {
    ::limoe::detail::softmax_rows_vec(x + s0 * E, y + s0 * E, s1 - s0, index_t{E});
  });
}
}  // namespace detail

// ---- top-K policies -----------------------------------------------------------------------------------------

template <int K>
struct StaticTopK {
  static_assert(K >= 1, "StaticTopK<K>: K must be >= 1");
  static constexpr int k() { return K; }
};
struct DynamicTopK {
  int value = 1;
  int k() const { return value; }
};


// ---- noise policies ----------------------------------------------------------------------------------------

// Training: noisy = logits + eps, eps ~ N(0, (noise_std / E)^2) (semantics §3 step 2; vmoe divides the
// configured std by E the same way). The draw for (token t of the call, expert e) is rng.normal(0, t * E + e):
// a pure function of the position, so it does not depend on the thread count or the grouping.
struct GaussianNoise {
  double noise_std = 1.0;
  double sigma(int E) const { return noise_std / static_cast<double>(E); }
  bool active(Mode mode) const { return mode == Mode::Train && noise_std > 0; }
  template <class T>
  void apply(const RouteGroup<T>& g) const {
    const index_t n = g.S * g.E;
    if (!active(g.mode)) {
      std::copy(g.logits, g.logits + n, g.noisy);
      return;
    }
    LIMOE_CHECK(g.rng != nullptr, "GaussianNoise: training with noise needs the step's Rng");
    const double s = sigma(g.E);
    const auto base = static_cast<std::uint64_t>(g.row0) * static_cast<std::uint64_t>(g.E);
    parallel_for_each_index(0, n, detail::kNoiseGrain, [&](index_t i) {  // each draw by its index: any split
      g.noisy[i] = g.logits[i] + static_cast<T>(s * g.rng->normal(0, base + static_cast<std::uint64_t>(i)));
    });
  }
};
struct NoNoise {
  double sigma(int) const { return 0; }
  bool active(Mode) const { return false; }
  template <class T>
  void apply(const RouteGroup<T>& g) const {
    std::copy(g.logits, g.logits + g.S * g.E, g.noisy);
  }
};

// ---- assignment order policies -----------------------------------------------------------------------------

// Vanilla: tokens in group order.
struct VanillaOrder {
  template <class T>
  static void order(const RouteGroup<T>& g) {
    std::iota(g.order, g.order + g.S, index_t{0});
  }
};
// Batch Priority Routing: descending top-1 gate, ties to the lower token index (the order a stable sort on the
// gate gives); the same order serves every rank of choice (semantics §3 step 6; vmoe sorts by the max gate the
// same way). A stable LSD radix sort of each token's top-1 gate, one byte a pass: the gate's bits made to
// order as its value (sign flipped, or all bits for a negative one; -0 taken as +0), complemented for the
// descending order; a pass whose byte all tokens share is skipped. 4,096 tokens: 0.03 ms against 0.35 ms for
// std::stable_sort comparing through the gates (Zen 4).
struct BatchPriorityOrder {
  template <class T>
  static void order(const RouteGroup<T>& g) {
    static_assert(std::is_floating_point_v<T> && (sizeof(T) == 4 || sizeof(T) == 8));
    using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    constexpr U kSign = U{1} << (8 * sizeof(U) - 1);
    const index_t S = g.S;
    ::limoe::detail::ScratchLease<U> keys(2 * S);
    ::limoe::detail::ScratchLease<index_t> spare(S);
    U *key = keys.data(), *key_out = keys.data() + S;
    index_t *ord = g.order, *ord_out = spare.data();
    for (index_t s = 0; s < S; ++s) {
      const T top = g.gates[s * g.E + g.choice[s * g.K]] + T(0);  // -0 + 0 = +0
      U b = 0;
      std::memcpy(&b, &top, sizeof b);
      key[s] = ~((b & kSign) ? ~b : (b | kSign));
      ord[s] = s;
    }
    for (int shift = 0; shift < static_cast<int>(8 * sizeof(U)); shift += 8) {
      std::array<index_t, 257> at{};
      for (index_t s = 0; s < S; ++s) ++at[((key[s] >> shift) & 255) + 1];
      if (std::find(at.begin() + 1, at.end(), S) != at.end()) continue;  // one bucket: nothing moves
      for (int d = 0; d < 256; ++d) at[d + 1] += at[d];
      for (index_t s = 0; s < S; ++s) {
        const index_t i = at[(key[s] >> shift) & 255]++;
        key_out[i] = key[s];
        ord_out[i] = ord[s];
      }
      std::swap(key, key_out);
      std::swap(ord, ord_out);
    }
    if (ord != g.order) std::copy(ord, ord + S, g.order);
  }
};

// ---- the stock router --------------------------------------------------------------------------------------

template <class KPolicy, class NoisePolicy, class OrderPolicy>
struct TopKRouter {
  KPolicy k_policy{};
  NoisePolicy noise{};

  int top_k() const { return k_policy.k(); }
  double noise_sigma(int E) const { return noise.sigma(E); }
  bool noise_active(Mode mode) const { return noise.active(mode); }

  template <class T>
  void route(const RouteGroup<T>& g) const {
    constexpr int kStatic = [] {
      if constexpr (requires { KPolicy::k(); }) return KPolicy::k();
      else return 0;
    }();
    const int E = g.E, K = top_k();
    LIMOE_CHECK(g.K == K && K >= 1 && K <= E, "TopKRouter: K = ", K, " must be in [1, E = ", E, "]");
    // Steps 2-3: noise (training), gates = softmax(noisy) (softmax_rows_pool), each token's K largest gates.
    // A token's values depend on it alone, so the same bits on any thread count.
    noise.apply(g);
    detail::softmax_rows_pool(g.noisy, g.gates, g.S, E);
    parallel_for_each_index(0, g.S, detail::kRowGrain, [&](index_t s) {
      detail::select_top_k<kStatic>(g.gates + s * E, E, K, g.choice + s * K);
    });
    // Step 6: all first choices, then all second choices, ...; within a rank, tokens in the policy's order.
    OrderPolicy::order(g);
    std::fill(g.fill, g.fill + E, index_t{0});
    for (int k = 0; k < K; ++k)
      for (index_t i = 0; i < g.S; ++i) {
        const index_t s = g.order[i];
        const std::int32_t e = g.choice[s * K + k];
        if (g.fill[e] < g.capacity) {
          ++g.fill[e];
          g.route[s * K + k] = e;
        } else {
          g.route[s * K + k] = -1;
        }
      }
  }
};

// The stock router with Gaussian or no noise, any K policy and either order: what a device backend runs on the
// device (moe_forward; the CUDA backend's route_topk). Any other router runs on the host.
template <class R>
struct IsStockRouter : std::false_type {};
template <class KP, class Noise, class Order>
  requires((std::same_as<Noise, GaussianNoise> || std::same_as<Noise, NoNoise>) &&
           (std::same_as<Order, BatchPriorityOrder> || std::same_as<Order, VanillaOrder>))
struct IsStockRouter<TopKRouter<KP, Noise, Order>> : std::true_type {
  static constexpr bool bpr = std::same_as<Order, BatchPriorityOrder>;
};

// Calls fn(router) with the TopKRouter instantiation that `cfg` describes: K 1 and 2 at compile time, other K
// at run time (as ggml reaches its compile-time top-k from a run-time switch); BPR or vanilla order.
// fn must return void.
template <class Fn>
void visit_router(const RouterConfig& cfg, int top_k, Fn&& fn) {
  auto with_k = [&](auto k_policy) {
    using KP = decltype(k_policy);
    const GaussianNoise noise{cfg.noise_std};
    if (cfg.bpr)
      fn(TopKRouter<KP, GaussianNoise, BatchPriorityOrder>{k_policy, noise});
    else
      fn(TopKRouter<KP, GaussianNoise, VanillaOrder>{k_policy, noise});
  };
  switch (top_k) {
    case 1: with_k(StaticTopK<1>{}); break;
    case 2: with_k(StaticTopK<2>{}); break;
    default: with_k(DynamicTopK{top_k}); break;
  }
}

}  // namespace limoe::moe
