// limoe/ops/softmax.hpp: softmax over the last dimension (attention weights, semantics §1; router gates, §3).
// The row formulas are limoe/math/softmax.hpp's; the CPU path threads over rows.
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
#include "limoe/ops/shapes.hpp"
#include "limoe/math/softmax.hpp"

namespace limoe {
namespace cpu {

template <class T>
void softmax_forward(CView<T> x, View<T> y) {
  const index_t R = detail::softmax_check<T>("softmax_forward", "y", y, x);
  const index_t D = x.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) math::softmax_row(x.data() + r * D, D, y.data() + r * D);
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
