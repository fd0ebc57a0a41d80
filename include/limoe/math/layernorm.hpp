// limoe/math/layernorm.hpp: LayerNorm on one row (semantics §1), written once.
//
//   mean = sum x / D,  var = sum (x - mean)^2 / D (population),  rstd = 1 / sqrt(var + eps)
//   y = (x - mean) rstd g + b
//   backward, xhat = (x - mean) rstd, gx = dy g:  dx = rstd (gx - mean(gx) - xhat mean(gx xhat))
//   (the parameter gradients dg += dy xhat, db += dy are sums over rows: their order is the backend's business)
//
// The statistics take two passes (mean, then centred squares), so rows with a large mean do not cancel.
#pragma once

#include <cmath>

#include "limoe/math/host_device.hpp"

namespace limoe::math {

template <class T>
struct RowStats {
  T mean, rstd;
};

// The statistics from the two sums every backend reduces (in its own order): the mean from sum x, rstd from
// the sum of centred squares sum (x - mean)^2.
template <class T, class I>
LIMOE_HD inline T layernorm_mean(T sum, I D) {
  return sum / static_cast<T>(D);
}
template <class T, class I>
LIMOE_HD inline T layernorm_rstd(T centred_square_sum, I D, T eps) {
  using std::sqrt;
  return T(1) / sqrt(centred_square_sum / static_cast<T>(D) + eps);
}

template <class T, class I>
LIMOE_HD inline RowStats<T> layernorm_stats(const T* x, I D, T eps) {
  T s = 0;
  for (I d = 0; d < D; ++d) s += x[d];
  const T m = layernorm_mean(s, D);
  T v = 0;
  for (I d = 0; d < D; ++d) v += (x[d] - m) * (x[d] - m);
  return {m, layernorm_rstd(v, D, eps)};
}

// y = (x - mean) rstd g + b (b may be null); y may alias x.
template <class T, class I>
LIMOE_HD inline void layernorm_row(const T* x, I D, RowStats<T> st, const T* g, const T* b, T* y) {
  for (I d = 0; d < D; ++d) y[d] = (x[d] - st.mean) * st.rstd * g[d] + (b ? b[d] : T(0));
}

// One element of the backward, given the row's means of gx = dy g and of gx xhat (a parallel backend reduces
// those two sums its own way and calls this per element).
template <class T>
LIMOE_HD inline T layernorm_dx(T x, T dy, T g, RowStats<T> st, T mean_gx, T mean_gx_xhat) {
  return st.rstd * (dy * g - mean_gx - (x - st.mean) * st.rstd * mean_gx_xhat);
}

// dx of one row from the row's two sums, sum gx and sum gx xhat (each backend reduces them in its own order).
template <class T, class I>
LIMOE_HD inline void layernorm_row_dx(const T* x, I D, RowStats<T> st, const T* g, const T* dy, T sum_gx,
                                      T sum_gx_xhat, T* dx) {
  const T a = sum_gx / static_cast<T>(D), c = sum_gx_xhat / static_cast<T>(D);
  for (I d = 0; d < D; ++d) dx[d] = layernorm_dx(x[d], dy[d], g[d], st, a, c);
}

// dx of one row from dy, the sums in index order (dx may alias dy: each element is read before it is written).
template <class T, class I>
LIMOE_HD inline void layernorm_row_backward(const T* x, I D, RowStats<T> st, const T* g, const T* dy, T* dx) {
  T sum_gx = 0, sum_gx_xhat = 0;
  for (I d = 0; d < D; ++d) {
    const T gx = dy[d] * g[d];
    sum_gx += gx;
    sum_gx_xhat += gx * (x[d] - st.mean) * st.rstd;
  }
  layernorm_row_dx(x, D, st, g, dy, sum_gx, sum_gx_xhat, dx);
}

}  // namespace limoe::math
