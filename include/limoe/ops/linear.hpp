// limoe/ops/linear.hpp: the affine layer y = x W^T + b over the last dimension (semantics §1: patch
// embedding, q/k/v/o, MLPs, experts, projections).
//
// x is any tensor whose last dimension is I; it is read as R = numel / I rows. W is [O, I] (PyTorch layout),
// b is [O] or empty (no bias). y has the shape of x with the last dimension O.
// Gradient rule (docs/conventions.md): dx is overwritten (skipped when empty), dW and db accumulate.
// Precision (core/precision.hpp): the last argument is the policy of the three products (Fp32 by default).
#pragma once

#include <algorithm>

#include <Eigen/Core>

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/gemm_mixed.hpp"
#include "limoe/core/precision.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/reduce.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe {
namespace cpu {

// y[R, O] = x[R, I] W[O, I]^T + b[O].
template <class T, PrecisionPolicy Prec = Fp32>
void linear_forward(CView<T> x, CView<T> W, CView<T> b, View<T> y, const Prec& prec = {}) {
  const index_t R = detail::linear_check<T>("linear_forward", x, W, b, y.shape(), "y");
  const index_t O = W.dim(0), I = W.dim(1);
  if (R == 0 || O == 0) return;
  if (b.empty()) gemm_mixed<T>(prec, Trans::N, Trans::T, R, O, I, T(1), x.data(), I, W.data(), I, T(0), y.data(), O);
  else gemm_mixed_bias<T>(prec, Trans::N, Trans::T, R, O, I, x.data(), I, W.data(), I, b.data(), y.data(), O);
}

// dx[R, I] = dy W (overwritten; skipped when dx is empty); dW[O, I] += dy^T x; db[O] += sum_r dy
// (skipped when db is empty; dW may also be empty to skip it, e.g. for a frozen layer).
template <class T, PrecisionPolicy Prec = Fp32>
void linear_backward(CView<T> x, CView<T> W, CView<T> dy, View<T> dx, View<T> dW, View<T> db, const Prec& prec = {}) {
  const index_t R = detail::linear_check<T>("linear_backward", x, W, CView<T>{}, dy.shape(), "dy");
  const index_t O = W.dim(0), I = W.dim(1);
  if (!dx.empty())
    LIMOE_CHECK(dx.numel() == x.numel() && dx.shape().back() == I, "linear_backward: dx ", dx.shape().str(),
                " must match x ", x.shape().str());
  if (!dW.empty()) expect_shape(dW, W.shape(), "linear_backward: dW");
  if (!db.empty())
    LIMOE_CHECK(db.numel() == O, "linear_backward: db ", db.shape().str(), " must have O = ", O, " elements");
  // dy is read by both products: under bf16 rounded once for both.
  const RoundedOnce<T, Prec> dy16(prec, !dx.empty() && !dW.empty() ? dy.data() : nullptr, R * O);
  if (!dx.empty()) gemm_mixed<T>(dy16.prec(), Trans::N, Trans::N, R, I, O, T(1), dy.data(), O, W.data(), I, T(0), dx.data(), I);
  if (!dW.empty() && R > 0)
    gemm_mixed<T>(dy16.prec(), Trans::T, Trans::N, O, I, R, T(1), dy.data(), O, x.data(), I, T(1), dW.data(), I);
  if (!db.empty() && R > 0) {
    // db += the column sums of dy, each summed over the rows in order (vectorised across columns): its bits
    // depend on the values only. Eigen's colwise().sum() gave other bits when dy lay at another alignment.
    detail::ScratchLease<T> sums(O);
    std::fill_n(sums.data(), O, T(0));
    detail::add_column_sums(dy.data(), R, O, sums.data());
    for (index_t c = 0; c < O; ++c) db[c] += sums.data()[c];
  }
}

}  // namespace cpu

namespace ref {

// Naive loops, the reference the tests compare cpu:: against.
template <class T, PrecisionPolicy Prec = Fp32>
void linear_forward(CView<T> x, CView<T> W, CView<T> b, View<T> y, const Prec& = {}) {
  const index_t R = detail::linear_check<T>("ref::linear_forward", x, W, b, y.shape(), "y");
  const index_t O = W.dim(0), I = W.dim(1);
  for (index_t r = 0; r < R; ++r)
    for (index_t o = 0; o < O; ++o) {
      T acc = b.empty() ? T(0) : b[o];
      for (index_t i = 0; i < I; ++i) acc += operand<T, Prec>(x[r * I + i]) * operand<T, Prec>(W[o * I + i]);
      y[r * O + o] = acc;
    }
}

template <class T, PrecisionPolicy Prec = Fp32>
void linear_backward(CView<T> x, CView<T> W, CView<T> dy, View<T> dx, View<T> dW, View<T> db, const Prec& = {}) {
  const index_t R = detail::linear_check<T>("ref::linear_backward", x, W, CView<T>{}, dy.shape(), "dy");
  const index_t O = W.dim(0), I = W.dim(1);
  for (index_t r = 0; r < R; ++r) {
    for (index_t i = 0; i < I && !dx.empty(); ++i) {
      T acc = 0;
      for (index_t o = 0; o < O; ++o) acc += operand<T, Prec>(dy[r * O + o]) * operand<T, Prec>(W[o * I + i]);
      dx[r * I + i] = acc;
    }
    for (index_t o = 0; o < O; ++o) {
      if (!db.empty()) db[o] += dy[r * O + o];
      for (index_t i = 0; i < I && !dW.empty(); ++i)
        dW[o * I + i] += operand<T, Prec>(dy[r * O + o]) * operand<T, Prec>(x[r * I + i]);
    }
  }
}

}  // namespace ref
}  // namespace limoe
