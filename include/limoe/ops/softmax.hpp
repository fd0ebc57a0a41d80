// limoe/ops/softmax.hpp: softmax over the last dimension (attention weights, semantics §1; router gates, §3).
// The row formulas are limoe/math/softmax.hpp's; the CPU path threads over rows and takes float's exp from
// Eigen's vectorised one.
//
// Numerically stable: the row maximum is subtracted before exp, so inputs of any magnitude give finite output.
// -inf entries (masked keys) get probability 0; a row that is entirely -inf gives all zeros, not NaN.
// Backward: dx = y * (dy - sum(dy * y)) per row (overwritten; dx may alias dy).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"
#include "limoe/math/softmax.hpp"

namespace limoe {
namespace detail {
// y = exp(y) for float through Eigen's vectorised exp on every element, the last partial vector padded: an
// element's bits do not depend on its position or its buffer's alignment (Eigen's array exp takes the elements
// before the first aligned one and after the last whole vector with the scalar exp).
inline void exp_in_place(float* y, index_t n) {
  namespace ei = Eigen::internal;
  using P = ei::packet_traits<float>::type;
  constexpr index_t L = ei::packet_traits<float>::size;
  index_t i = 0;
  for (; i + L <= n; i += L) ei::pstoreu(y + i, ei::pexp(ei::ploadu<P>(y + i)));
  if (i < n) {
    alignas(64) float tail[L] = {};
    std::copy(y + i, y + n, tail);
    ei::pstore(tail, ei::pexp(ei::pload<P>(tail)));
    std::copy(tail, tail + (n - i), y + i);
  }
}

// math::row_max of an unmasked float row over Eigen's packets: the same maximum (a maximum does not depend on the
// order its entries are taken in; NaN entries are skipped as there, since pmax(m, x) keeps m where x is NaN). A
// row of 49 keys took a scalar compare-and-branch per entry.
inline float row_max_vec(const float* x, index_t n) {
  namespace ei = Eigen::internal;
  using P = ei::packet_traits<float>::type;
  constexpr index_t L = ei::packet_traits<float>::size;
  P m = ei::pset1<P>(math::neg_inf<float>());
  index_t i = 0;
  for (; i + L <= n; i += L) m = ei::pmax(m, ei::ploadu<P>(x + i));
  float r = ei::predux_max(m);
  for (; i < n; ++i)  // the tail as math::row_max takes it (a padded packet stalled on the stores that filled it)
    if (x[i] > r) r = x[i];
  return r;
}

// The sum of a float row over Eigen's packets taken from its first element (unaligned loads), then the packet's
// lanes (predux), then the tail in order: its bits depend on the values and n only. Eigen's own sum() of an
// unaligned Map starts its packets at the first aligned element, so the same row summed from two buffers of
// other alignment (two threads' scratch) could differ in its last bit, and with it every probability.
inline float row_sum_vec(const float* x, index_t n) {
  namespace ei = Eigen::internal;
  using P = ei::packet_traits<float>::type;
  constexpr index_t L = ei::packet_traits<float>::size;
  P acc = ei::pset1<P>(0.0f);
  index_t i = 0;
  for (; i + L <= n; i += L) acc = ei::padd(acc, ei::ploadu<P>(x + i));
  float r = ei::predux(acc);
  for (; i < n; ++i) r += x[i];
  return r;
}

// `rows` rows of math::softmax_row (the same formula: terms exp(scale (x - max)), 0 where masked, over their
// sum; the same mask for every row) with float's exp taken over the whole block at once through Eigen's
// vectorised exp (within a few ulp of std::exp; exp_in_place), so a row of 50 keys is not mostly a scalar tail.
// A row's bits depend on the row alone, never on where it lies (row_sum_vec). y may alias x.
template <class T>
void softmax_rows_vec(const T* x, T* y, index_t rows, index_t n, T scale = T(1), const std::uint8_t* mask = nullptr) {
  if constexpr (!std::is_same_v<T, float>) {
    for (index_t r = 0; r < rows; ++r) math::softmax_row(x + r * n, n, y + r * n, scale, mask);
  } else {
    ScratchLease<std::uint8_t> dead(rows);  // rows with no unmasked finite maximum: all zeros
    for (index_t r = 0; r < rows; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      const T m = mask ? math::row_max(xr, n, mask) : row_max_vec(xr, n);
      dead.data()[r] = m == math::neg_inf<T>();
      for (index_t j = 0; j < n; ++j) yr[j] = (xr[j] - m) * scale;
    }
    exp_in_place(y, rows * n);
    for (index_t r = 0; r < rows; ++r) {
      T* yr = y + r * n;
      if (dead.data()[r]) {
        std::fill_n(yr, n, T(0));
        continue;
      }
      if (mask)
        for (index_t j = 0; j < n; ++j)
          if (!mask[j]) yr[j] = T(0);
      const T inv = T(1) / row_sum_vec(yr, n);
      for (index_t j = 0; j < n; ++j) yr[j] *= inv;
    }
  }
}
}  // namespace detail

namespace cpu {

template <class T>
void softmax_forward(CView<T> x, View<T> y) {
  const index_t R = detail::softmax_check<T>("softmax_forward", "y", y, x);
  const index_t D = x.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    detail::softmax_rows_vec(x.data() + r0 * D, y.data() + r0 * D, r1 - r0, D);
  });
}

template <class T>
void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
  const index_t R = detail::softmax_check<T>("softmax_backward", "dy", dy, y);
  detail::softmax_check<T>("softmax_backward", "dx", dx, y);
  const index_t D = y.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) math::softmax_row_backward(y.data() + r * D, dy.data() + r * D, D, dx.data() + r * D);
  });
}

}  // namespace cpu

namespace ref {

// One row at a time, no threads: the same formulas as the CPU path.
template <class T>
void softmax_forward(CView<T> x, View<T> y) {
  const index_t R = detail::softmax_check<T>("ref::softmax_forward", "y", y, x);
  const index_t D = x.shape().back();
  for (index_t r = 0; r < R; ++r) math::softmax_row(x.data() + r * D, D, y.data() + r * D);
}

template <class T>
void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
  const index_t R = detail::softmax_check<T>("ref::softmax_backward", "dy", dy, y);
  detail::softmax_check<T>("ref::softmax_backward", "dx", dx, y);
  const index_t D = y.shape().back();
  for (index_t r = 0; r < R; ++r) math::softmax_row_backward(y.data() + r * D, dy.data() + r * D, D, dx.data() + r * D);
}

}  // namespace ref
}  // namespace limoe
