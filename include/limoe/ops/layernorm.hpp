// limoe/ops/layernorm.hpp: LayerNorm over the last dimension (pre-LN blocks and the final norm, semantics §1;
// eps 1e-6 there, passed in here). The row formulas are limoe/math/layernorm.hpp's; this file adds the row
// threading and the deterministic chunked reduction of the parameter gradients.
//
// y = (x - mean) * rstd * g + b with the population variance, rstd = 1 / sqrt(var + eps). mean[R] and rstd[R]
// are saved for the backward pass (either may be an empty view at inference). x is read as R = numel / D rows of D = g.numel().
// Backward (xhat = (x - mean) * rstd, gx = dy * g):
//   dx = rstd * (gx - mean(gx) - xhat * mean(gx * xhat))   (overwritten; skipped when dx is empty)
//   dg += sum_r dy * xhat,  db += sum_r dy                   (accumulated; each skipped when empty)
// The parameter sums are reduced over fixed row chunks (depending only on R) in a fixed order, so results do
// not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/reduce.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"
#include "limoe/math/layernorm.hpp"

namespace limoe {
namespace detail {
// A row's statistics and its backward's two sums on the CPU: math/layernorm.hpp's formulas, the sums in 16
// lanes (core/reduce.hpp) instead of one dependent chain, which made LayerNorm 2-3% of a B/32 forward.
template <class T>
math::RowStats<T> layernorm_stats_lanes(const T* x, index_t D, T eps) {
  const T m = math::layernorm_mean(lane_sum<T>(D, [&](index_t d) { return x[d]; }), D);
  const T v = lane_sum<T>(D, [&](index_t d) { return (x[d] - m) * (x[d] - m); });
  return {m, math::layernorm_rstd(v, D, eps)};
}
template <class T>
void layernorm_row_backward_lanes(const T* x, index_t D, math::RowStats<T> st, const T* g, const T* dy, T* dx) {
  const T sum_gx = lane_sum<T>(D, [&](index_t d) { return dy[d] * g[d]; });
  const T sum_gx_xhat = lane_sum<T>(D, [&](index_t d) { return dy[d] * g[d] * (x[d] - st.mean) * st.rstd; });
  math::layernorm_row_dx(x, D, st, g, dy, sum_gx, sum_gx_xhat, dx);
}
}  // namespace detail

namespace cpu {

template <class T>
void layernorm_forward(CView<T> x, CView<T> g, CView<T> b, T eps, View<T> y, View<T> mean, View<T> rstd) {
  const index_t R = detail::layernorm_check<T>("layernorm_forward", x, g, b);
  const index_t D = g.numel();
  detail::layernorm_check_like<T>("layernorm_forward", "y", y, x);
  if (!mean.empty()) detail::layernorm_check_rows<T>("layernorm_forward", "mean", mean, R);
  if (!rstd.empty()) detail::layernorm_check_rows<T>("layernorm_forward", "rstd", rstd, R);
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const auto st = detail::layernorm_stats_lanes(x.data() + r * D, D, eps);
      math::layernorm_row(x.data() + r * D, D, st, g.data(), b.empty() ? nullptr : b.data(), y.data() + r * D);
      if (!mean.empty()) mean[r] = st.mean;
      if (!rstd.empty()) rstd[r] = st.rstd;
    }
  });
}

template <class T>
void layernorm_backward(CView<T> x, CView<T> g, CView<T> mean, CView<T> rstd, CView<T> dy, View<T> dx, View<T> dg,
                        View<T> db) {
  const index_t R = detail::layernorm_check<T>("layernorm_backward", x, g, CView<T>{});
  const index_t D = g.numel();
  detail::layernorm_check_rows<T>("layernorm_backward", "mean", mean, R);
  detail::layernorm_check_rows<T>("layernorm_backward", "rstd", rstd, R);
  detail::layernorm_check_like<T>("layernorm_backward", "dy", dy, x);
  if (!dx.empty()) detail::layernorm_check_like<T>("layernorm_backward", "dx", dx, x);
  if (!dg.empty()) expect_shape(dg, g.shape(), "layernorm_backward: dg");
  if (!db.empty()) expect_shape(db, g.shape(), "layernorm_backward: db");
  if (R == 0) return;

  // Input gradient: rows are independent.
  if (!dx.empty()) {
    parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r)  // dx may alias dy
        detail::layernorm_row_backward_lanes(x.data() + r * D, D, math::RowStats<T>{mean[r], rstd[r]}, g.data(),
                                             dy.data() + r * D, dx.data() + r * D);
    });
  }

  // Parameter gradients: partial sums per fixed chunk of rows, then added in chunk order.
  if (dg.empty() && db.empty()) return;
  const index_t chunk = std::max<index_t>(16, (R + 63) / 64);
  const index_t chunks = (R + chunk - 1) / chunk;
  std::vector<T> part(static_cast<std::size_t>(chunks * 2 * D), T(0));  // [chunks, 2, D]
  parallel_for(0, chunks, 1, [&](index_t c0, index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      T* pg = part.data() + c * 2 * D;
      T* pb = pg + D;
      for (index_t r = c * chunk; r < std::min(R, (c + 1) * chunk); ++r) {
        const T* xr = x.data() + r * D;
        const T* gr = dy.data() + r * D;
        const T m = mean[r], s = rstd[r];
        for (index_t d = 0; d < D; ++d) {
          pg[d] += gr[d] * (xr[d] - m) * s;
          pb[d] += gr[d];
        }
      }
    }
  });
  for (index_t c = 0; c < chunks; ++c) {
    const T* pg = part.data() + c * 2 * D;
    for (index_t d = 0; d < D; ++d) {
      if (!dg.empty()) dg[d] += pg[d];
      if (!db.empty()) db[d] += pg[D + d];
    }
  }
}

}  // namespace cpu

namespace ref {

template <class T>
void layernorm_forward(CView<T> x, CView<T> g, CView<T> b, T eps, View<T> y, View<T> mean, View<T> rstd) {
  const index_t R = detail::layernorm_check<T>("ref::layernorm_forward", x, g, b);
  const index_t D = g.numel();
  for (index_t r = 0; r < R; ++r) {
    const auto st = math::layernorm_stats(x.data() + r * D, D, eps);
    math::layernorm_row(x.data() + r * D, D, st, g.data(), b.empty() ? nullptr : b.data(), y.data() + r * D);
    if (!mean.empty()) mean[r] = st.mean;
    if (!rstd.empty()) rstd[r] = st.rstd;
  }
}

template <class T>
void layernorm_backward(CView<T> x, CView<T> g, CView<T> mean, CView<T> rstd, CView<T> dy, View<T> dx, View<T> dg,
                        View<T> db) {
  const index_t R = detail::layernorm_check<T>("ref::layernorm_backward", x, g, CView<T>{});
  const index_t D = g.numel();
  for (index_t r = 0; r < R; ++r) {
    const T m = mean[r], s = rstd[r];
    for (index_t d = 0; d < D; ++d) {  // parameter sums row by row, in order
      if (!dg.empty()) dg[d] += dy[r * D + d] * (x[r * D + d] - m) * s;
      if (!db.empty()) db[d] += dy[r * D + d];
    }
    if (!dx.empty())
      math::layernorm_row_backward(x.data() + r * D, D, math::RowStats<T>{m, s}, g.data(), dy.data() + r * D,
                                   dx.data() + r * D);
  }
}

}  // namespace ref
}  // namespace limoe
