// limoe/moe/parallel_routing.hpp: top-K, batch priority routing (BPR) and capacity for every routing group of
// a call at once, written against a Thrust execution policy: the same source runs on the CPU with Thrust's
// CPP or TBB system (the tests) and on a GPU with thrust::cuda::par.on(stream) (the CUDA backend).
//
// It decides exactly what the sequential stock router (moe/router.hpp: TopKRouter with BatchPriorityOrder or
// VanillaOrder) decides from the same gates, without a sequential fill:
//   1. choice[t, 0..K)  each token's K largest gates, best first, ties to the lower expert (detail::select_top_k);
//   2. priority         tokens ordered within their group by decreasing top-1 gate, ties to the lower token
//                       (BPR: two stable sorts, gate then group), or in token order (vanilla);
//   3. one stable sort of all N*K choices on the combined key (group, expert, rank k, priority): the queue of
//      each expert of each group, first choices before second choices, each in priority order;
//   4. a segmented scan gives each choice its place in its expert's queue; it is accepted when place < C of
//      its group, so route = expert or -1.
// Padding (modality kPad, when a modality is given) is masked out as the CPU layer masks it (moe/layer.hpp): a
// padding token keeps its best choices for reference, is never routed (route -1) and takes no place in any
// queue (its choices sort into a queue of their own, expert E, that accepts nothing); the caller's capacity of a
// group counts its routed tokens only. Ranks among the routed tokens are those the packed group would give, so
// the decisions are those of the sequential router run on each group's routed tokens, packed.
// The sequential fill accepts choice (t, k) for expert e exactly when fewer than C choices of e come before
// it in that queue, which is step 4. No atomics: the decisions are a pure function of the gates.
//
// Needs Thrust (the CUDA toolkit's `cccl` include folder). Not included by <limoe/limoe.hpp>. The lambdas are
// LIMOE_HD (host and device): nvcc compiles them for the GPU with --extended-lambda (src/cuda/routing.cu).
#pragma once

#include <cstdint>
#include <type_traits>

#include <thrust/for_each.h>
#include <thrust/functional.h>
#include <thrust/iterator/constant_iterator.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/scan.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <thrust/gather.h>

#include "limoe/core/enums.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/host_device.hpp"
#include "limoe/moe/plan.hpp"
#include "limoe/moe/top_k.hpp"

namespace limoe::moe::parallel {

// gates [N, E] (softmax of the noisy logits), groups of `group_size` consecutive tokens (the last may be
// shorter), capacity[g] per group; writes choice [N, K] and route [N, K] (expert, or -1 when dropped).
// modality [N] (kImage, kText, kPad) or empty (no padding): kPad tokens are not routed (see above).
// Every view and the scratch live in the policy's memory space S (HostSpace for the CPU systems, CudaSpace for
// thrust::cuda::par); S is deduced from gates.
template <class Policy, class T, class S>
void route_groups(Policy&& policy, CView<T, S> gates, int K, std::int64_t group_size,
                  std::type_identity_t<CView<std::int64_t, S>> capacity, bool bpr,
                  std::type_identity_t<View<std::int32_t, S>> choice, std::type_identity_t<View<std::int32_t, S>> route,
                  BasicRoutingScratch<S>& s, std::type_identity_t<CView<std::uint8_t, S>> modality = {}) {
  LIMOE_CHECK(gates.rank() == 2, "route_groups: gates must be [N, E], got ", gates.shape().str());
  const std::int64_t N = gates.dim(0);
  const int E = static_cast<int>(gates.dim(1));
  LIMOE_CHECK(K >= 1 && K <= E, "route_groups: K = ", K, " must be in [1, E = ", E, "]");
  LIMOE_CHECK(group_size >= 1, "route_groups: group_size must be >= 1");
  const std::int64_t G = (N + group_size - 1) / group_size;
  expect_shape(capacity, Shape{G}, "route_groups: capacity");
  expect_shape(choice, Shape{N, K}, "route_groups: choice");
  expect_shape(route, Shape{N, K}, "route_groups: route");
  if (!modality.empty()) expect_shape(modality, Shape{N}, "route_groups: modality");
  if (N == 0) return;
  s.top1.resize(Shape{N}), s.order.resize(Shape{N}), s.group_of.resize(Shape{N}), s.rank.resize(Shape{N});
  s.key.resize(Shape{N * K}), s.slot.resize(Shape{N * K}), s.place.resize(Shape{N * K});
  const T* g = gates.data();
  std::int32_t* ch = choice.data();
  std::int32_t* rt = route.data();
  double* top1 = s.top1.data();
  std::int64_t* order = s.order.data();
  std::int64_t* group_of = s.group_of.data();
  std::int64_t* rank = s.rank.data();
  std::int64_t* key = s.key.data();
  std::int64_t* slot = s.slot.data();
  std::int64_t* place = s.place.data();
  const std::int64_t* cap = capacity.data();
  const std::uint8_t* mod = modality.empty() ? nullptr : modality.data();
  const thrust::counting_iterator<std::int64_t> first(0);

  // 1. Each token's K choices and its top-1 gate.
  thrust::for_each(policy, first, first + N, [=] LIMOE_HD(std::int64_t t) {
    detail::select_top_k<0>(g + t * E, E, K, ch + t * K);
    top1[t] = static_cast<double>(g[t * E + ch[t * K]]);
  });
  // 2. Priority order: group-major; within a group by decreasing top-1 gate (BPR) or token order, ties to the
  //    lower token (stable sorts of the identity permutation).
  thrust::sequence(policy, order, order + N);
  if (bpr) thrust::stable_sort_by_key(policy, top1, top1 + N, order, thrust::greater<double>());
  thrust::for_each(policy, first, first + N, [=] LIMOE_HD(std::int64_t i) { group_of[i] = order[i] / group_size; });
  thrust::stable_sort_by_key(policy, group_of, group_of + N, order);
  thrust::for_each(policy, first, first + N, [=] LIMOE_HD(std::int64_t i) { rank[order[i]] = i; });
  // 3. The queues: one sort of all choices on (group, expert, rank k, priority); E + 1 queues per group, the
  //    last (expert E) holding padding's choices.
  const std::int64_t Q = E + 1;
  thrust::for_each(policy, first, first + N * K, [=] LIMOE_HD(std::int64_t c) {
    const std::int64_t t = c / K, k = c % K;
    const std::int64_t e = mod != nullptr && mod[t] == kPad ? E : ch[c];
    key[c] = (((t / group_size) * Q + e) * K + k) * N + rank[t];
    slot[c] = c;
  });
  thrust::stable_sort_by_key(policy, key, key + N * K, slot);
  // 4. Place in the queue (a scan per (group, expert) segment), then accept or drop.
  const std::int64_t per_queue = static_cast<std::int64_t>(K) * N;
  thrust::for_each(policy, first, first + N * K, [=] LIMOE_HD(std::int64_t i) { key[i] /= per_queue; });
  thrust::exclusive_scan_by_key(policy, key, key + N * K, thrust::make_constant_iterator<std::int64_t>(1), place);
  thrust::for_each(policy, first, first + N * K, [=] LIMOE_HD(std::int64_t i) {
    const std::int64_t c = slot[i];
    const std::int64_t grp = key[i] / Q, e = key[i] % Q;
    rt[c] = e < E && place[i] < cap[grp] ? ch[c] : -1;
  });
}

}  // namespace limoe::moe::parallel
