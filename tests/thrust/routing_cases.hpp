// tests/thrust/routing_cases.hpp: the cases of routing on Thrust (moe/parallel_routing.hpp) against the
// sequential stock router (TopKRouter with BPR or vanilla order) on the same gates: K = 1, 2, 3, groups with a
// shorter last one, capacities that drop and no-drop, gates with exact ties between experts and between tokens,
// and padding tokens (kPad) masked out as the CPU layer masks them: the sequential router runs on each group's
// routed tokens packed, with the capacity of their count; a padding token keeps its best choices and no route.
// Used on the CPU through Thrust's CPP and TBB systems (test_parallel_routing.cpp) and on a GPU through the CUDA
// backend (tests/cuda/test_cuda_routing.cpp).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limoe/core/enums.hpp>
#include <limoe/core/rng.hpp>
#include <limoe/moe/plan.hpp>
#include <limoe/moe/router.hpp>
#include <vector>

namespace limoe::routing_cases {
using namespace limoe::moe;

struct Case {
  std::int64_t N, group_size;
  int E, K;
  double factor;
  bool bpr;
};

// The sequential router on every group: fills gates (softmax of the logits), choice and route. With a modality,
// each group's non-padding tokens are routed packed (capacity from their count) and unpacked; padding gets the
// softmax of its logits, its top-K and route -1 (moe/layer.hpp's rule).
template <class Order>
void sequential(const Case& c, const Tensor<double>& logits, const std::vector<std::uint8_t>& modality,
                Tensor<double>& gates, Tensor<std::int32_t>& choice, Tensor<std::int32_t>& route,
                std::vector<std::int64_t>& caps) {
  const TopKRouter<DynamicTopK, NoNoise, Order> router{{c.K}, {}};
  const int E = c.E, K = c.K;
  Tensor<double> pk_logits(logits.shape()), pk_noisy(logits.shape()), pk_gates(logits.shape());
  Tensor<std::int32_t> pk_choice(choice.shape()), pk_route(route.shape());
  Tensor<index_t> order(Shape{c.N}), fill(Shape{E});
  const Rng rng(1);
  for (std::int64_t row0 = 0; row0 < c.N; row0 += c.group_size) {
    const std::int64_t S = std::min(c.group_size, c.N - row0);
    std::vector<std::int64_t> rows;
    for (std::int64_t t = row0; t < row0 + S; ++t) {
      if (!modality.empty() && modality[static_cast<std::size_t>(t)] == kPad) {
        math::softmax_row(logits.data() + t * E, E, gates.data() + t * E);
        moe::detail::select_top_k<0>(gates.data() + t * E, E, K, choice.data() + t * K);
        std::fill_n(route.data() + t * K, K, std::int32_t{-1});
      } else {
        rows.push_back(t);
      }
    }
    const auto n = static_cast<std::int64_t>(rows.size());
    for (std::int64_t j = 0; j < n; ++j) std::copy_n(logits.data() + rows[j] * E, E, pk_logits.data() + j * E);
    RouteGroup<double> g;
    g.row0 = row0, g.S = n, g.E = E, g.K = K, g.mode = Mode::Train, g.rng = &rng;
    g.capacity = compute_capacity(n, E, K, c.factor);
    caps.push_back(g.capacity);
    g.logits = pk_logits.data(), g.noisy = pk_noisy.data(), g.gates = pk_gates.data();
    g.choice = pk_choice.data(), g.route = pk_route.data(), g.order = order.data(), g.fill = fill.data();
    if (n > 0) router.route(g);
    for (std::int64_t j = 0; j < n; ++j) {
      std::copy_n(pk_gates.data() + j * E, E, gates.data() + rows[j] * E);
      std::copy_n(pk_choice.data() + j * K, K, choice.data() + rows[j] * K);
      std::copy_n(pk_route.data() + j * K, K, route.data() + rows[j] * K);
    }
  }
}

// Runs every case through route(gates, K, group_size, capacity, bpr, choice, route, modality) (host tensors in,
// host tensors out; modality empty when the case has no padding) and requires the sequential router's choices
// and routes.
template <class Route>
void check_all(Route&& route_fn, const char* system) {
  int cases = 0, padded_dropped = 0;
  for (bool pad : {false, true})
  for (int K : {1, 2, 3})
    for (bool bpr : {true, false})
      for (double factor : {0.0, 0.5, 1.0, 1.3})
        for (std::uint64_t seed = 0; seed < 6; ++seed) {
          const Case c{37 + static_cast<std::int64_t>(seed) * 11, 16, 6, K, factor, bpr};
          CAPTURE(system);
          CAPTURE(pad);
          CAPTURE(K);
          CAPTURE(bpr);
          CAPTURE(factor);
          CAPTURE(seed);
          // Padding: about a third of the tokens, and on every other seed the whole second group.
          std::vector<std::uint8_t> modality;
          if (pad) {
            const Rng prng(seed + 100);
            for (std::int64_t t = 0; t < c.N; ++t) {
              const bool all = seed % 2 == 0 && t >= c.group_size && t < 2 * c.group_size;
              modality.push_back(all || prng.uniform(0, static_cast<std::uint64_t>(t)) < 0.35 ? kPad
                                 : t % 3 == 0                                                 ? kText
                                                                                              : kImage);
            }
          }
          // Logits on a coarse grid: many exact ties between experts and between tokens' top-1 gates.
          Tensor<double> logits(Shape{c.N, c.E});
          const Rng rng(seed);
          for (index_t i = 0; i < logits.numel(); ++i)
            logits[i] = 0.5 * std::floor(4 * rng.uniform(0, static_cast<std::uint64_t>(i)));
          Tensor<double> gates(logits.shape());
          Tensor<std::int32_t> choice(Shape{c.N, c.K}), route(Shape{c.N, c.K});
          std::vector<std::int64_t> caps;
          if (bpr) sequential<BatchPriorityOrder>(c, logits, modality, gates, choice, route, caps);
          else sequential<VanillaOrder>(c, logits, modality, gates, choice, route, caps);
          Tensor<std::int64_t> capacity(Shape{static_cast<index_t>(caps.size())});
          for (std::size_t g = 0; g < caps.size(); ++g) capacity[static_cast<index_t>(g)] = caps[g];
          Tensor<std::uint8_t> mod(Shape{pad ? c.N : 0});
          for (std::size_t t = 0; t < modality.size(); ++t) mod[static_cast<index_t>(t)] = modality[t];
          Tensor<std::int32_t> pchoice(Shape{c.N, c.K}), proute(Shape{c.N, c.K});
          route_fn(gates, c.K, c.group_size, capacity, c.bpr, pchoice, proute, mod);
          int dropped = 0;
          for (index_t i = 0; i < choice.numel(); ++i) {
            REQUIRE(pchoice[i] == choice[i]);
            REQUIRE(proute[i] == route[i]);
            const bool padding = pad && modality[static_cast<std::size_t>(i / c.K)] == kPad;
            dropped += route[i] < 0 && !padding;
            if (padding) REQUIRE(proute[i] == -1);
          }
          if (factor == 0.0) CHECK(dropped == 0);
          if (pad && factor == 0.5) padded_dropped += dropped;
          ++cases;
        }
  CHECK(cases == 2 * 3 * 2 * 4 * 6);
  CHECK(padded_dropped > 0);  // capacity binds among the routed tokens too
}

}  // namespace limoe::routing_cases
