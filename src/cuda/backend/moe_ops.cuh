// src/cuda/backend/moe_ops.cuh: the CUDA backend's MoE ops (moe/ops.hpp's list and rules): the dispatch plan
// by a counting sort without atomics, dispatch and combine as gathers, the experts as one product per expert
// over its block of rows (the grouped product of no-drop routing). The plan's per-expert row counts come back
// to the host once per plan (the products' sizes); nothing else synchronises.
#pragma once

#include <cstdint>
#include <vector>

#include "../kernels/plan.cuh"
#include "ops.cuh"

namespace limoe::cuda::ops {

// route [N, K] (expert or -1) -> plan, as moe::cpu::make_dispatch_plan: experts' blocks in expert order,
// choices in call order inside a block. An entry that is neither -1 nor an expert is an error.
// Not inline: one translation unit per program compiles the backend (src/cuda/backend.cu, or an emulated
// test), and plain C++ callers link it through cuda_ops.hpp's declaration.
void make_dispatch_plan(CV<std::int32_t> route, int E, DispatchPlan& p) {
  LIMOE_CHECK(route.rank() == 2 && E >= 1, "cuda::make_dispatch_plan: route must be [N, K] and E >= 1, got ",
              route.shape().str(), ", E = ", E);
  const index_t N = route.dim(0), K = route.dim(1), slots = N * K;
  // The per-(chunk, expert) counts (kernels/plan.cuh), scanned on the host into each one's first row.
  const index_t chunks = (slots + kn::kPlanChunk - 1) / kn::kPlanChunk;
  const auto Es = static_cast<std::size_t>(E);
  std::vector<std::int64_t> c(static_cast<std::size_t>(chunks) * (Es + 1), 0);
  const int threads = E + 1 < 256 ? 32 * ((E + 32) / 32) : 256;
  const dim3 grid(static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
  if (chunks > 0) {
    DTensor<std::int64_t> counts(Shape{chunks * (E + 1)});
    exec::launch("plan_count", grid, threads, kn::plan_count, route.data(), slots, E, counts.data());
    exec::to_host(c.data(), counts.data(), c.size());
  }
  std::vector<std::int64_t> off(Es + 1, 0), starts(static_cast<std::size_t>(chunks) * Es);
  std::int64_t invalid = 0;
  for (index_t ch = 0; ch < chunks; ++ch) invalid += c[static_cast<std::size_t>(ch) * (Es + 1) + Es];
  LIMOE_CHECK(invalid == 0, "cuda::make_dispatch_plan: ", invalid, " route entries are neither -1 nor an expert in [0, ",
              E, ")");
  for (std::size_t e = 0; e < Es; ++e) {
    std::int64_t r = off[e];
    for (std::size_t ch = 0; ch < static_cast<std::size_t>(chunks); ++ch) {
      starts[ch * Es + e] = r;
      r += c[ch * (Es + 1) + e];
    }
    off[e + 1] = r;
  }
  p.offsets.resize(Shape{E + 1});
  exec::to_device(p.offsets.data(), off.data(), off.size());
  moe::detail::plan_resize(p, N, static_cast<int>(K), E, off[Es]);
  if (chunks == 0) return;
  DTensor<std::int64_t> dstarts(Shape{chunks * E});
  exec::to_device(dstarts.data(), starts.data(), starts.size());
  exec::launch("plan_assign", grid, threads, kn::plan_assign, route.data(), slots, static_cast<int>(K), E,
               static_cast<const std::int64_t*>(dstarts.data()), p.row_token.data(), p.row_slot.data(),
               p.slot_row.data());
}

template <class T>
void dispatch_forward(const DispatchPlan& p, CV<T> x, V<T> xe) {
  moe::detail::dispatch_check<T, Space>("cuda::dispatch_forward", p, x, xe);
  const index_t D = x.dim(1);
  exec::launch("dispatch_forward", exec::grid_for(p.A * D), 256, kn::dispatch_forward<T>,
               static_cast<const std::int64_t*>(p.row_token.data()), p.A, D, x.data(), xe.data());
}

template <class T>
void dispatch_backward(const DispatchPlan& p, CV<T> dxe, V<T> dx) {
  moe::detail::dispatch_check<T, Space>("cuda::dispatch_backward", p, dx, dxe);
  const index_t D = dx.dim(1);
  exec::launch("dispatch_backward", exec::grid_for(p.N * D), 256, kn::dispatch_backward<T>,
               static_cast<const std::int64_t*>(p.slot_row.data()), p.N, p.K, D, dxe.data(), dx.data());
}

namespace detail {
inline std::vector<index_t> host_offsets(const DispatchPlan& p) {
  std::vector<index_t> off(static_cast<std::size_t>(p.E + 1));
  exec::to_host(off.data(), p.offsets.data(), off.size());
  return off;
}
// fn(e, r0, n) for each expert e with n > 0 rows starting at row r0, in expert order.
template <class Fn>
void for_each_block(const std::vector<index_t>& off, Fn&& fn) {
  for (std::size_t e = 0; e + 1 < off.size(); ++e)
    if (off[e + 1] > off[e]) fn(static_cast<index_t>(e), off[e], off[e + 1] - off[e]);
}
}  // namespace detail

// xe [A, D] -> hpre [A, M] (kept for the backward), h = GELU(hpre), ye [A, D]: per expert e over its rows,
// hpre = xe W1_e^T + b1_e and ye = h W2_e^T + b2_e.
template <class T, class Prec>
void expert_mlp_forward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe, V<T> hpre,
                        V<T> h, V<T> ye, moe::ExpertScratch&, const Prec&) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = moe::detail::expert_check<T, Space>("cuda::expert_mlp_forward", p, w, D);
  expect_shape(xe, Shape{p.A, D}, "cuda::expert_mlp_forward: xe");
  expect_shape(hpre, Shape{p.A, M}, "cuda::expert_mlp_forward: hpre");
  expect_shape(h, Shape{p.A, M}, "cuda::expert_mlp_forward: h");
  expect_shape(ye, Shape{p.A, D}, "cuda::expert_mlp_forward: ye");
  const auto off = detail::host_offsets(p);
  detail::for_each_block(off, [&](index_t e, index_t r0, index_t n) {
    exec::launch("fill_rows (b1)", exec::grid_for(n * M), 256, kn::fill_rows<T>, w.fc1_b.data() + e * M, n, M,
                 hpre.data() + r0 * M);
    exec::gemm_as<Prec, T>(false, true, n, M, D, T(1), xe.data() + r0 * D, D, w.fc1_w.data() + e * M * D, D, T(1),
                  hpre.data() + r0 * M, M);
  });
  gelu_forward<T>(gelu, CV<T>(hpre), h);
  detail::for_each_block(off, [&](index_t e, index_t r0, index_t n) {
    exec::launch("fill_rows (b2)", exec::grid_for(n * D), 256, kn::fill_rows<T>, w.fc2_b.data() + e * D, n, D,
                 ye.data() + r0 * D);
    exec::gemm_as<Prec, T>(false, true, n, D, M, T(1), h.data() + r0 * M, M, w.fc2_w.data() + e * D * M, M, T(1),
                  ye.data() + r0 * D, D);
  });
}

// dh = (dye W2_e) GELU'(hpre) (overwritten), dxe = dh W1_e (overwritten; skipped when empty); dW2_e += dye^T h,
// db2_e += column sums of dye, dW1_e += dh^T xe, db1_e += column sums of dh (each skipped when empty).
template <class T, class Prec>
void expert_mlp_backward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe,
                         CV<T> hpre, CV<T> h, CV<T> dye, V<T> dh, V<T> dxe, const moe::ExpertGrads<T, Space>& g,
                         moe::ExpertScratch&, const Prec&) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = moe::detail::expert_check<T, Space>("cuda::expert_mlp_backward", p, w, D);
  expect_shape(xe, Shape{p.A, D}, "cuda::expert_mlp_backward: xe");
  expect_shape(hpre, Shape{p.A, M}, "cuda::expert_mlp_backward: hpre");
  expect_shape(h, Shape{p.A, M}, "cuda::expert_mlp_backward: h");
  expect_shape(dye, Shape{p.A, D}, "cuda::expert_mlp_backward: dye");
  expect_shape(dh, Shape{p.A, M}, "cuda::expert_mlp_backward: dh");
  if (!dxe.empty()) expect_shape(dxe, Shape{p.A, D}, "cuda::expert_mlp_backward: dxe");
  const auto off = detail::host_offsets(p);
  detail::for_each_block(off, [&](index_t e, index_t r0, index_t n) {
    exec::gemm_as<Prec, T>(false, false, n, M, D, T(1), dye.data() + r0 * D, D, w.fc2_w.data() + e * D * M, M, T(0),
                  dh.data() + r0 * M, M);
  });
  gelu_backward<T>(gelu, hpre, CV<T>(dh), dh);
  detail::for_each_block(off, [&](index_t e, index_t r0, index_t n) {
    if (!dxe.empty())
      exec::gemm_as<Prec, T>(false, false, n, D, M, T(1), dh.data() + r0 * M, M, w.fc1_w.data() + e * M * D, D, T(0),
                    dxe.data() + r0 * D, D);
    if (!g.fc2_w.empty())
      exec::gemm_as<Prec, T>(true, false, D, M, n, T(1), dye.data() + r0 * D, D, h.data() + r0 * M, M, T(1),
                    g.fc2_w.data() + e * D * M, M);
    if (!g.fc2_b.empty())
      exec::launch("add_column_sums (db2)", exec::grid_for(D, kColThreads), kColThreads, kn::add_column_sums<T>,
                   dye.data() + r0 * D, n, D, D, g.fc2_b.data() + e * D);
    if (!g.fc1_w.empty())
      exec::gemm_as<Prec, T>(true, false, M, D, n, T(1), dh.data() + r0 * M, M, xe.data() + r0 * D, D, T(1),
                    g.fc1_w.data() + e * M * D, D);
    if (!g.fc1_b.empty())
      exec::launch("add_column_sums (db1)", exec::grid_for(M, kColThreads), kColThreads, kn::add_column_sums<T>,
                   static_cast<const T*>(dh.data() + r0 * M), n, M, M, g.fc1_b.data() + e * M);
  });
}

template <class T>
void combine_forward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, V<T> y) {
  const index_t D = y.rank() == 2 ? y.dim(1) : 0;
  LIMOE_CHECK(y.rank() == 2 && y.dim(0) == p.N, "cuda::combine_forward: y must be [N = ", p.N, ", D], got ",
              y.shape().str());
  expect_shape(ye, Shape{p.A, D}, "cuda::combine_forward: ye");
  expect_shape(gates, Shape{p.N, p.E}, "cuda::combine_forward: gates");
  expect_shape(route, Shape{p.N, p.K}, "cuda::combine_forward: route");
  exec::launch("combine_forward", exec::grid_for(p.N * D), 256, kn::combine_forward<T>,
               static_cast<const std::int64_t*>(p.slot_row.data()), route.data(), gates.data(), p.N, p.E, p.K, D,
               ye.data(), y.data());
}

template <class T>
void combine_backward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, CV<T> dy, V<T> dye,
                      V<T> dgate) {
  const index_t D = dy.rank() == 2 ? dy.dim(1) : 0;
  LIMOE_CHECK(dy.rank() == 2 && dy.dim(0) == p.N, "cuda::combine_backward: dy must be [N = ", p.N, ", D], got ",
              dy.shape().str());
  expect_shape(ye, Shape{p.A, D}, "cuda::combine_backward: ye");
  expect_shape(dye, Shape{p.A, D}, "cuda::combine_backward: dye");
  expect_shape(dgate, Shape{p.A}, "cuda::combine_backward: dgate");
  expect_shape(gates, Shape{p.N, p.E}, "cuda::combine_backward: gates");
  expect_shape(route, Shape{p.N, p.K}, "cuda::combine_backward: route");
  exec::launch("combine_backward", rows_grid(p.A), kRowThreads, kn::combine_backward<kRowThreads, T>,
               static_cast<const std::int64_t*>(p.row_token.data()), static_cast<const std::int64_t*>(p.row_slot.data()),
               route.data(), gates.data(), p.E, D, ye.data(), dy.data(), dye.data(), dgate.data());
}

}  // namespace limoe::cuda::ops
