// limoe/moe/ops.hpp: the MoE layer's data movement and experts as ops (semantics §3 steps 6-7), each with its
// naive `ref::` twin beside the CPU one:
//
//   make_dispatch_plan  route [N, K] -> DispatchPlan: per-expert blocks of rows (a counting sort by expert;
//                       choices keep call order inside a block), row -> token, row -> choice slot, slot -> row
//   dispatch_forward    xe[r] = x[token(r)]                      (gather into the expert blocks)
//   dispatch_backward   dx[t] += sum of dxe[r] over t's rows     (scatter-add back)
//   expert_mlp_forward  ye[r] = W2_e GELU(W1_e xe[r] + b1_e) + b2_e for the expert e owning row r: one product
//                       per expert over its rows, in the manner of ggml's mul_mat_id
//   expert_mlp_backward dxe, and dW1, db1, dW2, db2 accumulated
//   combine_forward     y[t] = sum over t's accepted choices of gate[t, e] ye[row]   (0 if none)
//   combine_backward    dye[r] = gate dy[t];  dgate[r] = <dy[t], ye[r]>
//
// The plan is plain data: a multi-process backend sends its blocks in an all-to-all, a GPU backend builds it
// with a scan. Gradient rule (docs/conventions.md): parameter gradients and dispatch_backward's dx accumulate,
// the other outputs are overwritten. The CPU versions split work on fixed row tiles and fixed output chunks,
// so they give the same bits on any thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/gemm_mixed.hpp"
#include "limoe/core/precision.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/reduce.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/moe/plan.hpp"
#include "limoe/ops/gelu.hpp"

namespace limoe::moe {

namespace detail {
// The most output rows of one expert weight-gradient job: a weight's gradient is cut into equal jobs (a
// multiple of 16 rows) no taller than this. Shorter jobs ran slower: a [128, 3072] dW2 job over 512 rows ran at
// 150-185 GFLOP/s where [384, 3072] and taller ran at 186-199 (bf16, one Zen 4 core, bench/README.md).
inline constexpr index_t kGradRows = 512;
// Equal job heights of a weight gradient with `rows` output rows: a plan's shapes alone decide them, so the
// bits do not depend on the thread count.
inline index_t grad_job_rows(index_t rows) {
  const index_t jobs = (rows + kGradRows - 1) / kGradRows;
  const index_t h = (rows + jobs - 1) / std::max<index_t>(jobs, 1);
  return std::max<index_t>(16, (h + 15) / 16 * 16);
}
// The least height expert_mlp_forward cuts an overfull expert's rows into (smaller products run far from the
// kernel's rate).
inline constexpr index_t kMinCutRows = 64;
}  // namespace detail

namespace cpu {

// A counting sort of the accepted choices by expert; inside an expert, choices keep call order (slot order).
inline void make_dispatch_plan(CView<std::int32_t> route, int E, DispatchPlan& p) {
  detail::plan_check(route, E);
  const index_t N = route.dim(0), K = route.dim(1);
  p.offsets.resize(Shape{E + 1});  // [E + 1]
  std::fill(p.offsets.data(), p.offsets.data() + E + 1, index_t{0});
  for (index_t s = 0; s < N * K; ++s)
    if (route[s] >= 0) ++p.offsets[route[s] + 1];
  for (int e = 0; e < E; ++e) p.offsets[e + 1] += p.offsets[e];
  detail::plan_resize(p, N, static_cast<int>(K), E, p.offsets[E]);
  std::vector<index_t> cursor(p.offsets.data(), p.offsets.data() + E);
  for (index_t s = 0; s < N * K; ++s) {
    const std::int32_t e = route[s];
    if (e < 0) {
      p.slot_row[s] = -1;
      continue;
    }
    const index_t r = cursor[static_cast<std::size_t>(e)]++;
    p.slot_row[s] = r;
    p.row_slot[r] = s;
    p.row_token[r] = s / K;
  }
}

template <class T>
void dispatch_forward(const DispatchPlan& p, CView<T> x, View<T> xe) {
  detail::dispatch_check<T>("dispatch_forward", p, x, xe);
  const index_t D = x.dim(1);
  parallel_for(0, p.A, 256, [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) std::copy_n(x.data() + p.row_token[r] * D, D, xe.data() + r * D);
  });
}

// dx[t] += dxe[r] for t's rows, in choice order (per token, so no two threads write one row).
template <class T>
void dispatch_backward(const DispatchPlan& p, CView<T> dxe, View<T> dx) {
  detail::dispatch_check<T>("dispatch_backward", p, dx, dxe);
  const index_t D = dx.dim(1);
  parallel_for(0, p.N, 64, [&](index_t t0, index_t t1) {
    for (index_t t = t0; t < t1; ++t) {
      T* out = dx.data() + t * D;
      for (int k = 0; k < p.K; ++k) {
        const index_t r = p.slot_row[t * p.K + k];
        if (r < 0) continue;
        const T* src = dxe.data() + r * D;
        for (index_t d = 0; d < D; ++d) out[d] += src[d];
      }
    }
  });
}

// xe [A, D] -> hpre [A, M] (before GELU, kept for backward), h [A, M], ye [A, D].
template <class T, PrecisionPolicy Prec = Fp32>
void expert_mlp_forward(const DispatchPlan& p, const ExpertWeights<T>& w, GeluKind gelu, CView<T> xe, View<T> hpre,
                        View<T> h, View<T> ye, ExpertScratch& s, const Prec& prec = {}) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = detail::expert_check<T>("expert_mlp_forward", p, w, D);
  expect_shape(xe, Shape{p.A, D}, "expert_mlp_forward: xe");
  expect_shape(hpre, Shape{p.A, M}, "expert_mlp_forward: hpre");
  expect_shape(h, Shape{p.A, M}, "expert_mlp_forward: h");
  expect_shape(ye, Shape{p.A, D}, "expert_mlp_forward: ye");
  s.tiles.clear();
  // Tiles of an expert's rows, each one job (its hidden layer, bias, GELU, then its output): first as tall as a
  // dense product's row blocks over the same weight (block_rows: 1024 rows when a weight matrix has more than
  // 1e6 entries, else 256), in equal heights: each tile reads (under the runtime kernel, re-packs) both weight
  // matrices once. Then an expert whose tiles hold over twice the mean tile's rows (an evaluation batch without
  // a capacity can send half its tokens to one expert, whose tile would run alone on one thread while the
  // others wait) is cut again, into equal tiles about the mean's height (at least kMinCutRows). Under a binding
  // capacity nothing is cut again. The tiles depend on the plan only, never on the thread count.
  // Rows, not columns: a tile's products write whole rows of C, which oneDNN's brgemm kernel needs (a column
  // chunk, C's leading dimension wider than its width, got its general gemm, which packs the weight in every
  // call; bench/README.md's performance log, 2026-12-07).
  const index_t block = ::limoe::detail::block_rows(M, D);
  std::vector<index_t>& height = s.heights;
  height.assign(static_cast<std::size_t>(p.E), 0);
  index_t count = 0;
  for (int e = 0; e < p.E; ++e) {
    const index_t rows = p.rows_of(e);
    height[static_cast<std::size_t>(e)] = ::limoe::detail::even_block_rows(rows, block);
    count += (rows + height[static_cast<std::size_t>(e)] - 1) / height[static_cast<std::size_t>(e)];
  }
  if (count > 0) {
    const index_t mean = std::max<index_t>(detail::kMinCutRows, (p.A + count - 1) / count);
    for (int e = 0; e < p.E; ++e)
      if (index_t& h = height[static_cast<std::size_t>(e)]; h > 2 * mean)
        h = ::limoe::detail::even_block_rows(p.rows_of(e), mean);
  }
  for (int e = 0; e < p.E; ++e) {
    const index_t rows = height[static_cast<std::size_t>(e)];
    for (index_t r0 = p.offsets[e]; r0 < p.offsets[e + 1]; r0 += rows)
      s.tiles.push_back({e, r0, std::min(p.offsets[e + 1], r0 + rows)});
  }
  const index_t tiles = static_cast<index_t>(s.tiles.size());
  // Bf16Mixed: a tile's rows and hidden layer rounded into the scratch (lo_xe, lo_h) by its job; the weights
  // from the policy's mirror (rounded here when it has none).
  [[maybe_unused]] const bf16_bits *w1_16 = nullptr, *w2_16 = nullptr;
  [[maybe_unused]] bf16_bits *x16 = nullptr, *h16 = nullptr;
  // Where the mirror keeps its weights packed for the products (gemm_bf16_serial), when both come from it and
  // the policy carries its store (an evaluation forward's; PackedWeights).
  [[maybe_unused]] PackedWeights* packed = nullptr;
  if constexpr (!Prec::mixed && std::is_same_v<T, float>) {
    // Fp32: the store an evaluation forward's policy keeps the weights packed in (gemm_f32_packed).
    if (prec.weights.find(w.fc2_w.data(), w.fc2_w.numel())) packed = prec.weights.find(w.fc1_w.data(), w.fc1_w.numel());
  }
  s.lo_xe_of = s.lo_h_of = {};
  if constexpr (Prec::mixed) {
    s.lo_xe.resize(static_cast<std::size_t>(xe.numel()));
    s.lo_h.resize(static_cast<std::size_t>(h.numel()));
    x16 = s.lo_xe.data(), h16 = s.lo_h.data();
    s.lo_xe_of = {xe.data(), xe.numel()}, s.lo_h_of = {h.data(), h.numel()};  // every tile rounds its rows
    if (prec.weights.find(w.fc1_w.data(), w.fc1_w.numel()) && prec.weights.find(w.fc2_w.data(), w.fc2_w.numel()))
      packed = prec.weights.packed;
    auto weight = [&](CView<T> wt, std::vector<bf16_bits>& own) -> const bf16_bits* {
      if (const bf16_bits* m = prec.find(wt.data(), wt.numel())) return m;
      own.resize(static_cast<std::size_t>(wt.numel()));
      to_bf16_parallel(wt.data(), wt.numel(), own.data());
      return own.data();
    };
    w1_16 = weight(w.fc1_w, s.lo_w1), w2_16 = weight(w.fc2_w, s.lo_w2);
  }
  // C[rows, cols] (leading dimension ldc) = A B^T over K, A the rows at element a of X (fp32) or X16 (its bf16
  // copy), B the weight rows at element b of W or W16, as the policy reads them. Under bf16 the product adds
  // `bias` (cols floats) in oneDNN's epilogue; under fp32 the callers add it (in the loop that reads C anyway).
  auto product = [&](const T* X, const bf16_bits* X16, index_t a, const T* W, const bf16_bits* W16, index_t b,
                     const T* bias, index_t rows, index_t cols, index_t K, T* C, index_t ldc) {
    if constexpr (Prec::mixed)
      ::limoe::detail::gemm_bf16_serial(Trans::N, Trans::T, rows, cols, K, 1.0f, X16 + a, K, W16 + b, K, 0.0f, C, ldc,
                                        bias, packed);
    else if (!::limoe::detail::gemm_f32_packed<T>(Trans::N, rows, cols, K, T(1), X + a, K, W + b, K, T(0), C, ldc,
                                                   nullptr, packed))
      gemm_serial<T>(Trans::N, Trans::T, rows, cols, K, T(1), X + a, K, W + b, K, T(0), C, ldc);
  };
  // One tile: rows [r0, r0 + rows) of expert e. Its hidden layer: product, + b1, GELU (as the dense MLP's
  // bias_gelu_forward), and under bf16 each row rounded for the output's product as GELU writes it; then its
  // output: product and + b2.
  auto run = [&](index_t t0, index_t t1) {
    for (index_t t = t0; t < t1; ++t) {
      const auto tile = s.tiles[static_cast<std::size_t>(t)];
      const int e = tile.e;
      const index_t r0 = tile.r0, rows = tile.r1 - tile.r0;
      T* hp = hpre.data() + r0 * M;
      T* ho = h.data() + r0 * M;
      const T* b1 = w.fc1_b.data() + e * M;
      if constexpr (Prec::mixed) to_bf16(xe.data() + r0 * D, rows * D, x16 + r0 * D);
      product(xe.data(), x16, r0 * D, w.fc1_w.data(), w1_16, e * M * D, b1, rows, M, D, hp, M);
      for (index_t r = 0; r < rows; ++r) {
        T* pr = hp + r * M;
        if constexpr (!Prec::mixed)
          for (index_t m = 0; m < M; ++m) pr[m] += b1[m];
        ::limoe::detail::gelu_block(gelu, pr, ho + r * M, M);
        if constexpr (Prec::mixed) to_bf16(ho + r * M, M, h16 + (r0 + r) * M);
      }
      T* yo = ye.data() + r0 * D;
      const T* b2 = w.fc2_b.data() + e * D;
      product(h.data(), h16, r0 * M, w.fc2_w.data(), w2_16, e * D * M, b2, rows, D, M, yo, D);
      if constexpr (!Prec::mixed)
        for (index_t r = 0; r < rows; ++r)
          for (index_t d = 0; d < D; ++d) yo[r * D + d] += b2[d];
    }
  };
  parallel_for(0, tiles, 1, run);
}

// From dye [A, D]: dh [A, M] (scratch, overwritten), dxe [A, D] (overwritten; empty: skipped); weight and bias
// gradients accumulate. Uses the tiles of the last expert_mlp_forward on `s`, and under Bf16Mixed its bf16
// copies of xe and h when it read and wrote these same tensors: they must not change in between (the layer's
// cache holds them).
template <class T, PrecisionPolicy Prec = Fp32>
void expert_mlp_backward(const DispatchPlan& p, const ExpertWeights<T>& w, GeluKind gelu, CView<T> xe, CView<T> hpre,
                         CView<T> h, CView<T> dye, View<T> dh, View<T> dxe, const ExpertGrads<T>& g,
                         ExpertScratch& s, const Prec& prec = {}) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = detail::expert_check<T>("expert_mlp_backward", p, w, D);
  expect_shape(dye, Shape{p.A, D}, "expert_mlp_backward: dye");
  expect_shape(dh, Shape{p.A, M}, "expert_mlp_backward: dh");
  const bool need_dx = !dxe.empty();
  if (need_dx) expect_shape(dxe, Shape{p.A, D}, "expert_mlp_backward: dxe");
  // Bf16Mixed: dye and dh are each read by two products (the input side below, the weight gradients after it):
  // dye rounded once here, each tile's rows of dh rounded once as its GELU' writes them, and the policy told
  // where both copies are (the weight-gradient jobs read them too).
  Prec p16 = prec;
  if constexpr (Prec::mixed) {
    s.lo_dye.resize(static_cast<std::size_t>(dye.numel()));
    to_bf16_parallel(dye.data(), dye.numel(), s.lo_dye.data());
    s.lo_dh.resize(static_cast<std::size_t>(dh.numel()));
    p16 = prec.with(dye.data(), dye.numel(), s.lo_dye.data()).with(dh.data(), dh.numel(), s.lo_dh.data());
  }
  // Input side per tile (rows are independent): dh = dye W2 -> GELU'; dxe = dh W1.
  parallel_for(0, static_cast<index_t>(s.tiles.size()), 1, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) {
      const auto tile = s.tiles[static_cast<std::size_t>(i)];
      const index_t e = tile.e, r0 = tile.r0, rows = tile.r1 - tile.r0;
      T* dhp = dh.data() + r0 * M;
      gemm_mixed_serial<T>(p16, Trans::N, Trans::N, rows, M, D, T(1), dye.data() + r0 * D, D, w.fc2_w.data() + e * D * M, M,
                     T(0), dhp, M);
      limoe::cpu::gelu_backward<T>(gelu, CView<T>(hpre.data() + r0 * M, Shape{rows, M}), CView<T>(dhp, Shape{rows, M}),
                            View<T>(dhp, Shape{rows, M}));
      if constexpr (Prec::mixed) to_bf16(dhp, rows * M, s.lo_dh.data() + r0 * M);
      if (need_dx)
        gemm_mixed_serial<T>(p16, Trans::N, Trans::N, rows, D, M, T(1), dhp, M, w.fc1_w.data() + e * M * D, D, T(0),
                       dxe.data() + r0 * D, D);
    }
  });
  // Weights: reductions over each block's rows, split over fixed chunks of output rows.
  //   what 0: fc2 rows [d0, d1) (dW2 += dye^T h, db2 += sum dye); what 1: fc1 rows [m0, m1).
  s.jobs.clear();
  for (int e = 0; e < p.E; ++e) {
    if (p.rows_of(e) == 0) continue;
    if (!g.fc2_w.empty() || !g.fc2_b.empty())
      for (index_t j = 0, step = detail::grad_job_rows(D); j < D; j += step)
        s.jobs.push_back({e, 0, j, std::min(D, j + step)});
    if (!g.fc1_w.empty() || !g.fc1_b.empty())
      for (index_t j = 0, step = detail::grad_job_rows(M); j < M; j += step)
        s.jobs.push_back({e, 1, j, std::min(M, j + step)});
  }
  if constexpr (Prec::mixed) {
    // h and xe: the forward's copies when it rounded these very tensors (ExpertScratch::lo_h_of), else here.
    // Rounded here: the forward's copy is gone, so its record too (a later backward given the forward's tensors
    // rounds them again).
    auto round_all = [](CView<T> x, std::vector<bf16_bits>& lo, ExpertScratch::Source& of) {
      if (of.data == x.data() && of.numel == x.numel() && lo.size() == static_cast<std::size_t>(x.numel())) return;
      lo.resize(static_cast<std::size_t>(x.numel()));
      to_bf16_parallel(x.data(), x.numel(), lo.data());
      of = ExpertScratch::Source{};
    };
    round_all(h, s.lo_h, s.lo_h_of), round_all(xe, s.lo_xe, s.lo_xe_of);  // dye and dh: rounded above
  }
  parallel_for(0, static_cast<index_t>(s.jobs.size()), 1, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) {
      const auto job = s.jobs[static_cast<std::size_t>(i)];
      const index_t e = job.e, j0 = job.c0, cols = job.c1 - job.c0;
      const index_t b = p.offsets[e], n = p.rows_of(static_cast<int>(e));
      // Upstream gradient G [n, W] of this linear, its input I [n, In], output rows [j0, j1) of dW [W, In].
      const bool second = job.what == 0;
      const index_t W = second ? D : M, In = second ? M : D;
      const T* Gd = (second ? dye.data() : dh.data()) + b * W;
      const T* I = (second ? h.data() : xe.data()) + b * In;
      T* dW = second ? g.fc2_w.data() : g.fc1_w.data();
      T* db = second ? g.fc2_b.data() : g.fc1_b.data();
      if constexpr (Prec::mixed) {
        const bf16_bits* Gl = (second ? s.lo_dye.data() : s.lo_dh.data()) + b * W;
        const bf16_bits* Il = (second ? s.lo_h.data() : s.lo_xe.data()) + b * In;
        if (dW != nullptr)
          ::limoe::detail::gemm_bf16_serial(Trans::T, Trans::N, cols, In, n, 1.0f, Gl + j0, W, Il, In, 1.0f, dW + (e * W + j0) * In, In);
      } else if (dW != nullptr) {
        gemm_serial<T>(Trans::T, Trans::N, cols, In, n, T(1), Gd + j0, W, I, In, T(1), dW + (e * W + j0) * In, In);
      }
      if (db != nullptr) {  // column sums, row by row (contiguous); each column still sums its rows in order
        std::array<T, detail::kGradRows> acc{};
        ::limoe::detail::add_column_sums(Gd + j0, n, cols, acc.data(), W);
        for (index_t j = 0; j < cols; ++j) db[e * W + j0 + j] += acc[static_cast<std::size_t>(j)];
      }
    }
  });
}

// y [N, D] overwritten: gate-weighted sum of t's expert outputs, choices in rank order; gates [N, E].
template <class T>
void combine_forward(const DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye, View<T> y) {
  const index_t D = y.rank() == 2 ? y.dim(1) : 0;
  expect_shape(y, Shape{p.N, D}, "combine_forward: y");
  expect_shape(ye, Shape{p.A, D}, "combine_forward: ye");
  expect_shape(gates, Shape{p.N, p.E}, "combine_forward: gates");
  expect_shape(route, Shape{p.N, p.K}, "combine_forward: route");
  parallel_for(0, p.N, 64, [&](index_t t0, index_t t1) {
    for (index_t t = t0; t < t1; ++t) {
      T* yt = y.data() + t * D;
      std::fill(yt, yt + D, T(0));
      for (int k = 0; k < p.K; ++k) {
        const index_t r = p.slot_row[t * p.K + k];
        if (r < 0) continue;
        const T gate = gates[t * p.E + route[t * p.K + k]];
        const T* src = ye.data() + r * D;
        for (index_t d = 0; d < D; ++d) yt[d] += gate * src[d];
      }
    }
  });
}

// dye [A, D] and dgate [A] (d loss / d the gate of each row) overwritten. Each dgate sums its D products in
// core/reduce.hpp's 16 lanes: a plain `acc +=` chain ran scalar, at one add per add latency (1.9 ms a call,
// 1.2% of the layer's forward + backward at D = 384 on one Zen 4 core; bench/README.md's performance log).
template <class T>
void combine_backward(const DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye, CView<T> dy,
                      View<T> dye, View<T> dgate) {
  const index_t D = dy.rank() == 2 ? dy.dim(1) : 0;
  expect_shape(dy, Shape{p.N, D}, "combine_backward: dy");
  expect_shape(ye, Shape{p.A, D}, "combine_backward: ye");
  expect_shape(dye, Shape{p.A, D}, "combine_backward: dye");
  expect_shape(dgate, Shape{p.A}, "combine_backward: dgate");
  parallel_for(0, p.A, 64, [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const index_t t = p.row_token[r];
      const T gate = gates[t * p.E + route[p.row_slot[r]]];
      const T* gr = dy.data() + t * D;
      const T* o = ye.data() + r * D;
      T* out = dye.data() + r * D;
      for (index_t d = 0; d < D; ++d) out[d] = gate * gr[d];
      dgate[r] = ::limoe::detail::lane_sum<T>(D, [&](index_t d) { return gr[d] * o[d]; });
    }
  });
}

}  // namespace cpu

// ---- the naive twins: one row or one token at a time, straight from the definitions ----------------------
namespace ref {

inline void make_dispatch_plan(CView<std::int32_t> route, int E, DispatchPlan& p) {
  detail::plan_check(route, E);
  const index_t N = route.dim(0), K = route.dim(1);
  index_t A = 0;
  for (index_t s = 0; s < N * K; ++s) A += route[s] >= 0;
  detail::plan_resize(p, N, static_cast<int>(K), E, A);
  p.offsets.resize(Shape{E + 1});  // [E + 1]
  for (index_t s = 0; s < N * K; ++s) p.slot_row[s] = -1;
  index_t r = 0;
  for (int e = 0; e < E; ++e) {  // expert by expert, each in slot order
    p.offsets[e] = r;
    for (index_t s = 0; s < N * K; ++s)
      if (route[s] == e) p.row_token[r] = s / K, p.row_slot[r] = s, p.slot_row[s] = r, ++r;
  }
  p.offsets[E] = r;
}

template <class T>
void dispatch_forward(const DispatchPlan& p, CView<T> x, View<T> xe) {
  detail::dispatch_check<T>("ref::dispatch_forward", p, x, xe);
  const index_t D = x.dim(1);
  for (index_t r = 0; r < p.A; ++r)
    for (index_t d = 0; d < D; ++d) xe[r * D + d] = x[p.row_token[r] * D + d];
}

template <class T>
void dispatch_backward(const DispatchPlan& p, CView<T> dxe, View<T> dx) {
  detail::dispatch_check<T>("ref::dispatch_backward", p, dx, dxe);
  const index_t D = dx.dim(1);
  for (index_t t = 0; t < p.N; ++t)
    for (int k = 0; k < p.K; ++k) {
      const index_t r = p.slot_row[t * p.K + k];
      if (r >= 0)
        for (index_t d = 0; d < D; ++d) dx[t * D + d] += dxe[r * D + d];
    }
}

namespace detail_ref {
inline int expert_of_row(const DispatchPlan& p, index_t r) {
  int e = 0;
  while (p.offsets[e + 1] <= r) ++e;
  return e;
}
}  // namespace detail_ref

template <class T, PrecisionPolicy Prec = Fp32>
void expert_mlp_forward(const DispatchPlan& p, const ExpertWeights<T>& w, GeluKind gelu, CView<T> xe, View<T> hpre,
                        View<T> h, View<T> ye, ExpertScratch&, const Prec& = {}) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = detail::expert_check<T>("ref::expert_mlp_forward", p, w, D);
  for (index_t r = 0; r < p.A; ++r) {
    const index_t e = detail_ref::expert_of_row(p, r);
    for (index_t m = 0; m < M; ++m) {
      T acc = w.fc1_b[e * M + m];
      for (index_t d = 0; d < D; ++d) acc += operand<T, Prec>(w.fc1_w[(e * M + m) * D + d]) * operand<T, Prec>(xe[r * D + d]);
      hpre[r * M + m] = acc;
      h[r * M + m] = math::gelu(gelu, acc);
    }
    for (index_t d = 0; d < D; ++d) {
      T acc = w.fc2_b[e * D + d];
      for (index_t m = 0; m < M; ++m) acc += operand<T, Prec>(w.fc2_w[(e * D + d) * M + m]) * operand<T, Prec>(h[r * M + m]);
      ye[r * D + d] = acc;
    }
  }
}

template <class T, PrecisionPolicy Prec = Fp32>
void expert_mlp_backward(const DispatchPlan& p, const ExpertWeights<T>& w, GeluKind gelu, CView<T> xe, CView<T> hpre,
                         CView<T> h, CView<T> dye, View<T> dh, View<T> dxe, const ExpertGrads<T>& g, ExpertScratch&,
                         const Prec& = {}) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = detail::expert_check<T>("ref::expert_mlp_backward", p, w, D);
  for (index_t r = 0; r < p.A; ++r) {
    const index_t e = detail_ref::expert_of_row(p, r);
    for (index_t m = 0; m < M; ++m) {
      T acc = 0;
      for (index_t d = 0; d < D; ++d) acc += operand<T, Prec>(w.fc2_w[(e * D + d) * M + m]) * operand<T, Prec>(dye[r * D + d]);
      dh[r * M + m] = acc * math::gelu_grad(gelu, hpre[r * M + m]);
    }
    if (!dxe.empty())
      for (index_t d = 0; d < D; ++d) {
        T acc = 0;
        for (index_t m = 0; m < M; ++m) acc += operand<T, Prec>(w.fc1_w[(e * M + m) * D + d]) * operand<T, Prec>(dh[r * M + m]);
        dxe[r * D + d] = acc;
      }
    for (index_t d = 0; d < D; ++d) {
      if (!g.fc2_b.empty()) g.fc2_b[e * D + d] += dye[r * D + d];
      if (!g.fc2_w.empty())
        for (index_t m = 0; m < M; ++m) g.fc2_w[(e * D + d) * M + m] += operand<T, Prec>(dye[r * D + d]) * operand<T, Prec>(h[r * M + m]);
    }
    for (index_t m = 0; m < M; ++m) {
      if (!g.fc1_b.empty()) g.fc1_b[e * M + m] += dh[r * M + m];
      if (!g.fc1_w.empty())
        for (index_t d = 0; d < D; ++d) g.fc1_w[(e * M + m) * D + d] += operand<T, Prec>(dh[r * M + m]) * operand<T, Prec>(xe[r * D + d]);
    }
  }
}

template <class T>
void combine_forward(const DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye, View<T> y) {
  const index_t D = y.rank() == 2 ? y.dim(1) : 0;
  for (index_t t = 0; t < p.N; ++t)
    for (index_t d = 0; d < D; ++d) {
      T acc = 0;
      for (int k = 0; k < p.K; ++k) {
        const index_t r = p.slot_row[t * p.K + k];
        if (r >= 0) acc += gates[t * p.E + route[t * p.K + k]] * ye[r * D + d];
      }
      y[t * D + d] = acc;
    }
}

template <class T>
void combine_backward(const DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye, CView<T> dy,
                      View<T> dye, View<T> dgate) {
  const index_t D = dy.rank() == 2 ? dy.dim(1) : 0;
  for (index_t r = 0; r < p.A; ++r) {
    const index_t t = p.row_token[r];
    const T gate = gates[t * p.E + route[p.row_slot[r]]];
    T acc = 0;
    for (index_t d = 0; d < D; ++d) {
      dye[r * D + d] = gate * dy[t * D + d];
      acc += dy[t * D + d] * ye[r * D + d];
    }
    dgate[r] = acc;
  }
}

}  // namespace ref
}  // namespace limoe::moe
