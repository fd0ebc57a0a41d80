// limoe/moe/plan.hpp: the MoE layer's shared argument types and checks (every backend): expert weights and
// gradients, the dispatch plan, and the shape checks of the MoE ops (limoe/moe/ops.hpp). Plain C++ (no Eigen,
// no TBB), so the CUDA backend's sources include it; the plan's arrays live in the backend's memory space S.
#pragma once

#include <cstdint>
#include <vector>
#include <type_traits>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe::moe {

// Expert weights of one layer (docs/cli.md shapes): fc1 [E, M, D] / [E, M], fc2 [E, D, M] / [E, D].
template <class T, class S = HostSpace>
struct ExpertWeights {
  CView<T, S> fc1_w, fc1_b, fc2_w, fc2_b;
};
template <class T, class S = HostSpace>
struct ExpertGrads {
  View<T, S> fc1_w, fc1_b, fc2_w, fc2_b;  // accumulated; an empty view is skipped
};

// Which accepted (token, choice) lands in which row of which expert's block. Packed (fixed = 0): the blocks
// hold exactly the accepted choices, A of them. Fixed capacity (fixed = C > 0; the CUDA backend's
// make_fixed_dispatch_plan): every expert owns C rows, A = E C, so the sizes are known without reading the
// routes; the rows past an expert's accepted choices are empty (row_token and row_slot -1, zero inputs).
template <class S = HostSpace>
struct BasicDispatchPlan {
  index_t N = 0, A = 0;  // tokens, rows (accepted choices when packed)
  int E = 0, K = 0;
  index_t fixed = 0;             // rows per expert of a fixed-capacity plan; 0 when packed
  Tensor<index_t, S> offsets;    // [E + 1]: expert e owns rows [offsets[e], offsets[e + 1])
  Tensor<index_t, S> row_token;  // [A] (-1: an empty row)
  Tensor<index_t, S> row_slot;   // [A]: the choice slot t * K + k of each row (-1: an empty row)
  Tensor<index_t, S> slot_row;   // [N * K]: the row of each choice slot, -1 where the choice was dropped
  // A host copy of offsets, kept by every packed plan in device memory (a device backend scans the offsets on the
  // host, and the expert exchange builds its local plan there): what host code reads of the blocks' sizes, so
  // nothing is read back. Empty for host plans (offsets is readable) and fixed-capacity plans (sizes e C).
  std::vector<index_t> host_offsets;
  index_t rows_of(int e) const
    requires S::host_accessible
  {
    return offsets[e + 1] - offsets[e];
  }
};

using DispatchPlan = BasicDispatchPlan<HostSpace>;

// Reusable work lists of the expert MLP on the CPU (every backend's expert op takes one; others ignore it).
struct ExpertScratch {
  struct Tile { int e; index_t r0, r1; };
  struct Job { int e; int what; index_t c0, c1; };
  std::vector<Tile> tiles;
  std::vector<Job> jobs;
  std::vector<index_t> heights;  // expert_mlp_forward's: the tile height of each expert
  // Bf16Mixed: the backward's bf16 operands (bf16_bits) of the weight-gradient jobs (dye, h, dh, xe), rounded once per
  // backward: each job reads a column slice of them, and rounding per job would repeat the work D / 128 times.
  std::vector<std::uint16_t> lo_dye, lo_h, lo_dh, lo_xe;
  // The forward's: lo_xe and lo_h above (the rows and the hidden layer, rounded by each tile's job),
  // and the weights, rounded here only when the policy carries no bf16 copy of them.
  std::vector<std::uint16_t> lo_w1, lo_w2;
  // Where the forward's lo_xe and lo_h came from (xe and h, their sizes), so that a backward reading the same
  // tensors takes them as they are instead of rounding them again; cleared by a forward that did not round.
  struct Source { const void* data = nullptr; std::int64_t numel = 0; };
  Source lo_xe_of, lo_h_of;
};


namespace parallel {
// Scratch of moe::parallel::route_groups (moe/parallel_routing.hpp; sized by it, reuse across calls), in the
// memory space S of the policy it runs on: host tensors for Thrust's CPP and TBB systems, device tensors for
// thrust::cuda::par (the CUDA backend).
template <class S = HostSpace>
struct BasicRoutingScratch {
  Tensor<double, S> top1;             // [N] top-1 gate (the BPR key; double holds a float or double gate exactly)
  Tensor<std::int64_t, S> order;      // [N] tokens in priority order
  Tensor<std::int64_t, S> group_of;   // [N] group of each token in `order`
  Tensor<std::int64_t, S> rank;       // [N] place of each token in its group's priority order (global index)
  Tensor<std::int64_t, S> key;        // [N*K] combined sort key of each choice
  Tensor<std::int64_t, S> slot;       // [N*K] choice slots t*K + k in queue order
  Tensor<std::int64_t, S> place;      // [N*K] place of each (sorted) choice in its expert's queue
};

using RoutingScratch = BasicRoutingScratch<HostSpace>;

}  // namespace parallel

namespace detail {
inline void plan_check(CView<std::int32_t> route, int E) {
  LIMOE_CHECK(route.rank() == 2 && E >= 1, "make_dispatch_plan: route must be [N, K] and E >= 1, got ",
              route.shape().str(), ", E = ", E);
  for (index_t s = 0; s < route.numel(); ++s)
    LIMOE_CHECK(route[s] >= -1 && route[s] < E, "make_dispatch_plan: route entry ", route[s], " at ", s,
                " is neither -1 nor an expert in [0, ", E, ")");
}
template <class S>
void plan_resize(BasicDispatchPlan<S>& p, index_t N, int K, int E, index_t A) {
  p.N = N, p.K = K, p.E = E, p.A = A, p.fixed = 0;
  p.host_offsets.clear();
  p.row_token.resize(Shape{A});    // [A]
  p.row_slot.resize(Shape{A});     // [A]
  p.slot_row.resize(Shape{N * K}); // [N * K]
}
template <class T, class S = HostSpace>
void dispatch_check(const char* fn, const std::type_identity_t<BasicDispatchPlan<S>>& p, ::limoe::detail::CArg<T, S> x, ::limoe::detail::CArg<T, S> xe) {
  LIMOE_CHECK(x.rank() == 2 && x.dim(0) == p.N, fn, ": x must be [N = ", p.N, ", D], got ", x.shape().str());
  expect_shape(xe, Shape{p.A, x.dim(1)}, fn);
}
template <class T, class S = HostSpace>
index_t expert_check(const char* fn, const std::type_identity_t<BasicDispatchPlan<S>>& p, const std::type_identity_t<ExpertWeights<T, S>>& w, index_t D) {
  LIMOE_CHECK(w.fc1_w.rank() == 3, fn, ": fc1.weight must be [E, M, D], got ", w.fc1_w.shape().str());
  const index_t M = w.fc1_w.dim(1);
  expect_shape(w.fc1_w, Shape{p.E, M, D}, "expert fc1.weight");
  expect_shape(w.fc1_b, Shape{p.E, M}, "expert fc1.bias");
  expect_shape(w.fc2_w, Shape{p.E, D, M}, "expert fc2.weight");
  expect_shape(w.fc2_b, Shape{p.E, D}, "expert fc2.bias");
  return M;
}
}  // namespace detail
}  // namespace limoe::moe
