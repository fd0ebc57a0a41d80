// limoe/ops/layernorm.hpp: LayerNorm over the last dimension (pre-LN blocks and the final norm, LIMOE.md
// section 1; eps 1e-6 there, passed in here).
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
#include "limoe/core/tensor.hpp"

namespace limoe {
namespace detail {
template <class T>
index_t layernorm_check(const char* fn, CView<T> x, CView<T> g, CView<T> b) {
  const index_t D = g.numel();
  LIMOE_CHECK(g.rank() == 1 && D > 0, fn, ": g must be [D] with D > 0, got ", g.shape().str());
  LIMOE_CHECK(x.rank() >= 1 && x.shape().back() == D, fn, ": x ", x.shape().str(), " must end in D = ", D,
              " (g is ", g.shape().str(), ")");
  LIMOE_CHECK(b.empty() || b.shape() == g.shape(), fn, ": b ", b.shape().str(), " must match g ", g.shape().str());
  return x.numel() / D;
}
template <class T>
void layernorm_check_rows(const char* fn, const char* what, CView<T> v, index_t R) {
  LIMOE_CHECK(!v.empty() && v.numel() == R, fn, ": ", what, " ", v.shape().str(), " must hold one value per row (", R, ")");
}
template <class T>
void layernorm_check_like(const char* fn, const char* what, CView<T> v, CView<T> x) {
  LIMOE_CHECK(v.numel() == x.numel() && v.rank() >= 1 && v.shape().back() == x.shape().back(), fn, ": ", what, " ",
              v.shape().str(), " must match x ", x.shape().str());
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
      const T* xr = x.data() + r * D;
      T* yr = y.data() + r * D;
      // Two passes (mean, then centred squares): no cancellation for inputs with a large mean.
      T m = 0;
      for (index_t d = 0; d < D; ++d) m += xr[d];
      m /= static_cast<T>(D);
      T v = 0;
      for (index_t d = 0; d < D; ++d) v += (xr[d] - m) * (xr[d] - m);
      v /= static_cast<T>(D);
      const T s = T(1) / std::sqrt(v + eps);
      if (b.empty())
        for (index_t d = 0; d < D; ++d) yr[d] = (xr[d] - m) * s * g[d];
      else
        for (index_t d = 0; d < D; ++d) yr[d] = (xr[d] - m) * s * g[d] + b[d];
      if (!mean.empty()) mean[r] = m;
      if (!rstd.empty()) rstd[r] = s;
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
      for (index_t r = r0; r < r1; ++r) {
        const T* xr = x.data() + r * D;
        const T* gr = dy.data() + r * D;
        const T m = mean[r], s = rstd[r];
        T sum_gx = 0, sum_gx_xhat = 0;
        for (index_t d = 0; d < D; ++d) {
          const T gx = gr[d] * g[d];
          sum_gx += gx;
          sum_gx_xhat += gx * (xr[d] - m) * s;
        }
        const T a = sum_gx / static_cast<T>(D), c = sum_gx_xhat / static_cast<T>(D);
        T* out = dx.data() + r * D;  // may alias dy: each element is read before it is written
        for (index_t d = 0; d < D; ++d) out[d] = s * (gr[d] * g[d] - a - (xr[d] - m) * s * c);
      }
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
    T m = 0, v = 0;
    for (index_t d = 0; d < D; ++d) m += x[r * D + d];
    m /= static_cast<T>(D);
    for (index_t d = 0; d < D; ++d) v += (x[r * D + d] - m) * (x[r * D + d] - m);
    v /= static_cast<T>(D);
    const T s = T(1) / std::sqrt(v + eps);
    for (index_t d = 0; d < D; ++d) y[r * D + d] = (x[r * D + d] - m) * s * g[d] + (b.empty() ? T(0) : b[d]);
    if (!mean.empty()) mean[r] = m;
    if (!rstd.empty()) rstd[r] = s;
  }
}

template <class T>
void layernorm_backward(CView<T> x, CView<T> g, CView<T> mean, CView<T> rstd, CView<T> dy, View<T> dx, View<T> dg,
                        View<T> db) {
  const index_t R = detail::layernorm_check<T>("ref::layernorm_backward", x, g, CView<T>{});
  const index_t D = g.numel();
  for (index_t r = 0; r < R; ++r) {
    const T m = mean[r], s = rstd[r];
    T a = 0, c = 0;
    for (index_t d = 0; d < D; ++d) {
      const T xhat = (x[r * D + d] - m) * s;
      a += dy[r * D + d] * g[d];
      c += dy[r * D + d] * g[d] * xhat;
      if (!dg.empty()) dg[d] += dy[r * D + d] * xhat;
      if (!db.empty()) db[d] += dy[r * D + d];
    }
    a /= static_cast<T>(D);
    c /= static_cast<T>(D);
    for (index_t d = 0; d < D && !dx.empty(); ++d)
      dx[r * D + d] = s * (dy[r * D + d] * g[d] - a - (x[r * D + d] - m) * s * c);
  }
}

}  // namespace ref
}  // namespace limoe
