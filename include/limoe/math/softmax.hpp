// limoe/math/softmax.hpp: the softmax family on one row (semantics §1 attention, §3 router gates, §4 losses).
//
//   y_i = exp(s (x_i - max)) / sum_j exp(s (x_j - max))  over unmasked i (masked: 0); s a scale (1 by default)
//   logsumexp(x) = max + log sum_j exp(x_j - max)
//   backward: dx_i = y_i (dy_i - sum_j dy_j y_j)
//
// The maximum is subtracted first, so any finite input gives finite output; a row with no unmasked entry, or
// whose entries are all -inf, gives all zeros rather than NaN. Accumulation is in T; callers that need more
// pass double. Every softmax of the library (reference, CPU, and later CUDA) is one of these.
#pragma once

#include <cmath>
#include <cstdint>

#include "limoe/math/host_device.hpp"
#include "limoe/math/plain.hpp"

namespace limoe::math {

// -infinity of T; INFINITY (a constant expression of <cmath>) is usable in device code, numeric_limits is not.
template <class T>
LIMOE_HD constexpr T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Largest of x[0, n) over unmasked entries (mask null: all); -inf when none.
template <class T, class I>
LIMOE_HD inline T row_max(const T* x, I n, const std::uint8_t* mask = nullptr) {
  T m = neg_inf<T>();
  for (I j = 0; j < n; ++j)
    if ((!mask || mask[j]) && x[j] > m) m = x[j];
  return m;
}

// One unnormalised term of a softmax row with maximum m: exp(scale (x - m)), 0 where masked (on = false).
// A parallel backend reduces the maximum and the sum of these its own way and calls this per element.
template <class T>
LIMOE_HD inline T softmax_term(T x, T m, T scale, bool on) {
  using std::exp;
  return on ? T(exp(scale * (x - m))) : T(0);
}

// y = softmax(scale * x) over the unmasked entries of one row; y may alias x.
template <class T, class I>
LIMOE_HD inline void softmax_row(const T* x, I n, T* y, T scale = T(1), const std::uint8_t* mask = nullptr) {
  const T m = row_max(x, n, mask);
  if (m == neg_inf<T>()) {
    for (I j = 0; j < n; ++j) y[j] = T(0);
    return;
  }
  T s = 0;
  for (I j = 0; j < n; ++j) {
    const T e = softmax_term(x[j], m, scale, !mask || mask[j]);
    y[j] = e;
    s += e;
  }
  const T inv = T(1) / s;
  for (I j = 0; j < n; ++j) y[j] *= inv;
}

// log sum_j exp(x_j), computed in double (math/plain.hpp's exp and log), for a row whose maximum is m:
// m + log sum_j exp_of(j), exp_of(j) = exp(x_j - m) (logsumexp_row below; a CPU loop that took them in one
// vectorised pass reads them back).
template <class I, class ExpOf>
LIMOE_HD inline double logsumexp_with(double m, I n, ExpOf exp_of) {
  double s = 0;
  for (I j = 0; j < n; ++j) s += exp_of(j);
  return m + plain_log(s);
}
template <class T, class I>
LIMOE_HD inline double logsumexp_row(const T* x, I n) {
  const double m = static_cast<double>(row_max(x, n));
  return logsumexp_with(m, n, [x, m](I j) { return plain_exp(static_cast<double>(x[j]) - m); });
}

// dx = (d softmax / d x)^T dy for one row of y = softmax(x): dx_i = y_i (dy_i - <dy, y>); dx may alias dy.
template <class T, class U, class V, class I>
LIMOE_HD inline void softmax_row_backward(const T* y, const U* dy, I n, V* dx) {
  V dot = 0;
  for (I j = 0; j < n; ++j) dot += static_cast<V>(dy[j]) * static_cast<V>(y[j]);
  for (I j = 0; j < n; ++j) dx[j] = static_cast<V>(y[j]) * (static_cast<V>(dy[j]) - dot);
}

}  // namespace limoe::math
