// limoe/ops/softmax.hpp: softmax over the last dimension (attention weights, LIMOE.md section 1; router gates,
// section 3).
//
// Numerically stable: the row maximum is subtracted before exp, so inputs of any magnitude give finite output.
// -inf entries (masked keys) get probability 0; a row that is entirely -inf gives all zeros, not NaN.
// Backward: dx = y * (dy - sum(dy * y)) per row (overwritten; dx may alias dy).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe {
namespace detail {
template <class T>
index_t softmax_check(const char* fn, const char* what, CView<T> v, CView<T> x) {
  LIMOE_CHECK(x.rank() >= 1 && x.shape().back() > 0, fn, ": input ", x.shape().str(),
              " must have a non-empty last dimension");
  LIMOE_CHECK(v.numel() == x.numel() && v.rank() >= 1 && v.shape().back() == x.shape().back(), fn, ": ", what, " ",
              v.shape().str(), " must match ", x.shape().str());
  return x.numel() / x.shape().back();
}
}  // namespace detail

namespace cpu {

template <class T>
void softmax_forward(CView<T> x, View<T> y) {
  const index_t R = detail::softmax_check<T>("softmax_forward", "y", y, x);
  const index_t D = x.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const T* xr = x.data() + r * D;
      T* yr = y.data() + r * D;
      const T m = *std::max_element(xr, xr + D);
      if (m == -std::numeric_limits<T>::infinity()) {
        std::fill(yr, yr + D, T(0));
        continue;
      }
      T s = 0;
      for (index_t d = 0; d < D; ++d) s += (yr[d] = std::exp(xr[d] - m));
      const T inv = T(1) / s;
      for (index_t d = 0; d < D; ++d) yr[d] *= inv;
    }
  });
}

template <class T>
void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
  const index_t R = detail::softmax_check<T>("softmax_backward", "dy", dy, y);
  detail::softmax_check<T>("softmax_backward", "dx", dx, y);
  const index_t D = y.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const T* yr = y.data() + r * D;
      const T* gr = dy.data() + r * D;
      T s = 0;
      for (index_t d = 0; d < D; ++d) s += gr[d] * yr[d];
      T* out = dx.data() + r * D;
      for (index_t d = 0; d < D; ++d) out[d] = yr[d] * (gr[d] - s);
    }
  });
}

}  // namespace cpu

namespace ref {

template <class T>
void softmax_forward(CView<T> x, View<T> y) {
  const index_t R = detail::softmax_check<T>("ref::softmax_forward", "y", y, x);
  const index_t D = x.shape().back();
  for (index_t r = 0; r < R; ++r) {
    T m = x[r * D];
    for (index_t d = 1; d < D; ++d) m = std::max(m, x[r * D + d]);
    if (m == -std::numeric_limits<T>::infinity()) {
      for (index_t d = 0; d < D; ++d) y[r * D + d] = T(0);
      continue;
    }
    T s = 0;
    for (index_t d = 0; d < D; ++d) s += std::exp(x[r * D + d] - m);
    for (index_t d = 0; d < D; ++d) y[r * D + d] = std::exp(x[r * D + d] - m) / s;
  }
}

template <class T>
void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
  const index_t R = detail::softmax_check<T>("ref::softmax_backward", "dy", dy, y);
  const index_t D = y.shape().back();
  for (index_t r = 0; r < R; ++r) {
    // Full Jacobian J_ij = y_i (delta_ij - y_j), applied as dx_j = sum_i dy_i J_ij.
    for (index_t j = 0; j < D; ++j) {
      T acc = 0;
      for (index_t i = 0; i < D; ++i)
        acc += dy[r * D + i] * y[r * D + i] * ((i == j ? T(1) : T(0)) - y[r * D + j]);
      dx[r * D + j] = acc;
    }
  }
}

}  // namespace ref
}  // namespace limoe
