// tests/thrust/routing_cases.hpp: the cases of routing on Thrust (moe/parallel_routing.hpp) against the
// sequential stock router (TopKRouter with BPR or vanilla order) on the same gates: K = 1, 2, 3, groups with a
// shorter last one, capacities that drop and no-drop, gates with exact ties between experts and between tokens.
// Used on the CPU through Thrust's CPP and TBB systems (test_parallel_routing.cpp) and on a GPU through the CUDA
// backend (tests/cuda/test_cuda_routing.cpp).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
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

// The sequential router on every group: fills gates (softmax of the logits), choice and route.
template <class Order>
void sequential(const Case& c, const Tensor<double>& logits, Tensor<double>& gates, Tensor<std::int32_t>& choice,
                Tensor<std::int32_t>& route, std::vector<std::int64_t>& caps) {
  const TopKRouter<DynamicTopK, NoNoise, Order> router{{c.K}, {}};
  Tensor<double> noisy(logits.shape());
  Tensor<index_t> order(Shape{c.N}), fill(Shape{c.E});
  const Rng rng(1);
  for (std::int64_t row0 = 0; row0 < c.N; row0 += c.group_size) {
    const std::int64_t S = std::min(c.group_size, c.N - row0);
    RouteGroup<double> g;
    g.row0 = row0, g.S = S, g.E = c.E, g.K = c.K, g.mode = Mode::Train, g.rng = &rng;
    g.capacity = compute_capacity(S, c.E, c.K, c.factor);
    caps.push_back(g.capacity);
    g.logits = logits.data() + row0 * c.E;
    g.noisy = noisy.data() + row0 * c.E;
    g.gates = gates.data() + row0 * c.E;
    g.choice = choice.data() + row0 * c.K;
    g.route = route.data() + row0 * c.K;
    g.order = order.data();
    g.fill = fill.data();
    router.route(g);
  }
}

// Runs every case through route(gates, K, group_size, capacity, bpr, choice, route) (host tensors in, host
// tensors out) and requires the sequential router's choices and routes.
template <class Route>
void check_all(Route&& route_fn, const char* system) {
  int cases = 0;
  for (int K : {1, 2, 3})
    for (bool bpr : {true, false})
      for (double factor : {0.0, 0.5, 1.0, 1.3})
        for (std::uint64_t seed = 0; seed < 6; ++seed) {
          const Case c{37 + static_cast<std::int64_t>(seed) * 11, 16, 6, K, factor, bpr};
          CAPTURE(system);
          CAPTURE(K);
          CAPTURE(bpr);
          CAPTURE(factor);
          CAPTURE(seed);
          // Logits on a coarse grid: many exact ties between experts and between tokens' top-1 gates.
          Tensor<double> logits(Shape{c.N, c.E});
          const Rng rng(seed);
          for (index_t i = 0; i < logits.numel(); ++i)
            logits[i] = 0.5 * std::floor(4 * rng.uniform(0, static_cast<std::uint64_t>(i)));
          Tensor<double> gates(logits.shape());
          Tensor<std::int32_t> choice(Shape{c.N, c.K}), route(Shape{c.N, c.K});
          std::vector<std::int64_t> caps;
          if (bpr) sequential<BatchPriorityOrder>(c, logits, gates, choice, route, caps);
          else sequential<VanillaOrder>(c, logits, gates, choice, route, caps);
          Tensor<std::int64_t> capacity(Shape{static_cast<index_t>(caps.size())});
          for (std::size_t g = 0; g < caps.size(); ++g) capacity[static_cast<index_t>(g)] = caps[g];
          Tensor<std::int32_t> pchoice(Shape{c.N, c.K}), proute(Shape{c.N, c.K});
          route_fn(gates, c.K, c.group_size, capacity, c.bpr, pchoice, proute);
          int dropped = 0;
          for (index_t i = 0; i < choice.numel(); ++i) {
            REQUIRE(pchoice[i] == choice[i]);
            REQUIRE(proute[i] == route[i]);
            dropped += route[i] < 0;
          }
          if (factor == 0.0) CHECK(dropped == 0);
          ++cases;
        }
  CHECK(cases == 3 * 2 * 4 * 6);
}

}  // namespace limoe::routing_cases
