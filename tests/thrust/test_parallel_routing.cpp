// Routing on Thrust (moe/parallel_routing.hpp) on the CPU through Thrust's CPP and TBB systems: the same
// choices and routes as the sequential stock router (TopKRouter with BPR or vanilla order) on the same gates,
// for K = 1, 2, 3, groups with a shorter last one, capacities that drop and no-drop, gates with exact ties
// (between experts and between tokens), and padding tokens masked out, over many random cases.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limoe/core/rng.hpp>
#include <limoe/moe/parallel_routing.hpp>
#include "routing_cases.hpp"
#include <thrust/system/cpp/execution_policy.h>
#include <thrust/system/tbb/execution_policy.h>
#include <vector>

using namespace limoe;
using namespace limoe::moe;

namespace {

template <class Policy>
void check_system(Policy&& policy, const char* system) {
  routing_cases::check_all(
      [&](const Tensor<double>& gates, int K, std::int64_t group_size, const Tensor<std::int64_t>& capacity, bool bpr,
          Tensor<std::int32_t>& choice, Tensor<std::int32_t>& route, const Tensor<std::uint8_t>& modality) {
        parallel::RoutingScratch scratch;
        parallel::route_groups(policy, gates.cview(), K, group_size, capacity.cview(), bpr, choice.view(), route.view(),
                               scratch, modality.numel() > 0 ? modality.cview() : CView<std::uint8_t>{});
      },
      system);
}

}  // namespace

TEST_CASE("routing on Thrust, CPP system: the sequential router's decisions") { check_system(thrust::cpp::par, "cpp"); }

TEST_CASE("routing on Thrust, TBB system: the sequential router's decisions") { check_system(thrust::tbb::par, "tbb"); }

TEST_CASE("routing on Thrust: drops happen where capacity binds, and bad shapes are named") {
  // 8 tokens all preferring expert 0 with C = 2: BPR keeps the two with the largest gates.
  Tensor<double> gates(Shape{8, 2});
  for (index_t t = 0; t < 8; ++t) gates[t * 2] = 0.55 + 0.01 * static_cast<double>((t * 3) % 8), gates[t * 2 + 1] = 1 - gates[t * 2];
  Tensor<std::int64_t> cap = Tensor<std::int64_t>::from(Shape{1}, {2});
  Tensor<std::int32_t> choice(Shape{8, 1}), route(Shape{8, 1});
  parallel::RoutingScratch s;
  parallel::route_groups(thrust::cpp::par, gates.cview(), 1, 8, cap.cview(), true, choice.view(), route.view(), s);
  int kept = 0;
  for (index_t t = 0; t < 8; ++t) kept += route[t] == 0;
  CHECK(kept == 2);
  CHECK(route[5] == 0);  // gate 0.62, the largest
  CHECK(route[2] == 0);  // 0.61
  CHECK_THROWS_WITH_AS(parallel::route_groups(thrust::cpp::par, gates.cview(), 3, 8, cap.cview(), true, choice.view(),
                                              route.view(), s),
                       doctest::Contains("K = 3 must be in [1, E = 2]"), Error);
}
