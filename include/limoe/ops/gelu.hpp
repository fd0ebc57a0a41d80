// limoe/ops/gelu.hpp: the GELU activation of the MLPs and experts (LIMOE.md section 1: exact erf form by
// default, tanh approximation selectable).
//
//   Erf:  gelu(x) = x * Phi(x) = 0.5 x erfc(-x / sqrt 2),          gelu'(x) = Phi(x) + x phi(x)
//   Tanh: gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3)
//         gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// gelu_forward and gelu_backward are elementwise, so y may alias x and dx may alias dy.
// bias_gelu_forward fuses the bias of the first MLP linear with the activation: pre += b (row-wise), y = gelu(pre);
// `pre` is kept for gelu_backward(kind, pre, dy, dpre), and db is the column sum of dpre (linear_backward's db).
// There y must NOT alias pre_out, or the pre-activation the backward pass needs is lost.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe {

enum class GeluKind { Erf, Tanh };

namespace detail {
template <class T>
inline T gelu_value(GeluKind kind, T x) {
  if (kind == GeluKind::Erf) return T(0.5) * x * std::erfc(-x * T(0.70710678118654752440));
  const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
  return T(0.5) * x * (T(1) + std::tanh(u));
}
template <class T>
inline T gelu_grad(GeluKind kind, T x) {
  if (kind == GeluKind::Erf) {
    const T cdf = T(0.5) * std::erfc(-x * T(0.70710678118654752440));
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
  const T k = T(0.79788456080286535588);
  const T th = std::tanh(k * (x + T(0.044715) * x * x * x));
  return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * k * (T(1) + T(3 * 0.044715) * x * x);
}
template <class T>
void gelu_check_like(const char* fn, const char* what, CView<T> v, CView<T> x) {
  LIMOE_CHECK((!v.empty() || x.numel() == 0) && v.numel() == x.numel(), fn, ": ", what, " ", v.shape().str(), " must have as many elements as x ",
              x.shape().str());
}
inline constexpr index_t kGeluGrain = 16384;

// y[0, n) = gelu(x[0, n)). float: Eigen's vectorised erf / tanh / exp (about 0.3 ns an element here against
// 12 ns for std::erfc; within 1e-6 of it); double keeps the scalar library functions (finite-difference tests).
template <class T>
void gelu_block(GeluKind kind, const T* x, T* y, index_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const Eigen::Map<const Eigen::ArrayXf> X(x, n);
    Eigen::Map<Eigen::ArrayXf> Y(y, n);
    if (kind == GeluKind::Erf)
      Y = 0.5f * X * (1.0f + (X * 0.70710678118654752440f).erf());
    else
      Y = 0.5f * X * (1.0f + (0.79788456080286535588f * (X + 0.044715f * X * X * X)).tanh());
  } else {
    for (index_t i = 0; i < n; ++i) y[i] = gelu_value(kind, x[i]);
  }
}

// dx[0, n) = dy * gelu'(x); dx may alias dy.
template <class T>
void gelu_grad_block(GeluKind kind, const T* x, const T* dy, T* dx, index_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const Eigen::Map<const Eigen::ArrayXf> X(x, n), G(dy, n);
    Eigen::Map<Eigen::ArrayXf> DX(dx, n);
    if (kind == GeluKind::Erf) {
      DX = G * (0.5f * (1.0f + (X * 0.70710678118654752440f).erf()) + 0.39894228040143267794f * X * (-0.5f * X * X).exp());
    } else {
      const float k = 0.79788456080286535588f;
      const Eigen::ArrayXf th = (k * (X + 0.044715f * X * X * X)).tanh();
      DX = G * (0.5f * (1.0f + th) + 0.5f * X * (1.0f - th * th) * k * (1.0f + 3.0f * 0.044715f * X * X));
    }
  } else {
    for (index_t i = 0; i < n; ++i) dx[i] = dy[i] * gelu_grad(kind, x[i]);
  }
}
}  // namespace detail

namespace cpu {
using limoe::GeluKind;

template <class T>
void gelu_forward(GeluKind kind, CView<T> x, View<T> y) {
  detail::gelu_check_like<T>("gelu_forward", "y", y, x);
  parallel_for(0, x.numel(), detail::kGeluGrain,
               [&](index_t i0, index_t i1) { detail::gelu_block(kind, x.data() + i0, y.data() + i0, i1 - i0); });
}

// dx = dy * gelu'(x) (overwritten; dx may alias dy).
template <class T>
void gelu_backward(GeluKind kind, CView<T> x, CView<T> dy, View<T> dx) {
  detail::gelu_check_like<T>("gelu_backward", "dy", dy, x);
  detail::gelu_check_like<T>("gelu_backward", "dx", dx, x);
  parallel_for(0, x.numel(), detail::kGeluGrain, [&](index_t i0, index_t i1) {
    detail::gelu_grad_block(kind, x.data() + i0, dy.data() + i0, dx.data() + i0, i1 - i0);
  });
}

// pre_out: in x W^T (no bias), out x W^T + b; y = gelu(pre_out). Rows of width b.numel().
template <class T>
void bias_gelu_forward(GeluKind kind, CView<T> b, View<T> pre_out, View<T> y) {
  const index_t M = b.numel();
  LIMOE_CHECK(M > 0 && pre_out.rank() >= 1 && pre_out.shape().back() == M, "bias_gelu_forward: pre_out ",
              pre_out.shape().str(), " must end in the bias width ", M, " (b is ", b.shape().str(), ")");
  detail::gelu_check_like<T>("bias_gelu_forward", "y", y, pre_out);
  LIMOE_CHECK(y.data() != pre_out.data(), "bias_gelu_forward: y must not alias pre_out (the backward pass needs the "
              "pre-activation); pass a separate output buffer");
  const index_t R = pre_out.numel() / M;
  parallel_for(0, R, std::max<index_t>(1, detail::kGeluGrain / M), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      T* p = pre_out.data() + r * M;
      T* o = y.data() + r * M;
      for (index_t m = 0; m < M; ++m) p[m] += b[m];
      detail::gelu_block(kind, p, o, M);
    }
  });
}

}  // namespace cpu

namespace ref {
using limoe::GeluKind;

// The reference writes the textbook formulas out directly (Phi via erf, not erfc).
template <class T>
void gelu_forward(GeluKind kind, CView<T> x, View<T> y) {
  detail::gelu_check_like<T>("ref::gelu_forward", "y", y, x);
  const T pi = T(3.14159265358979323846);
  for (index_t i = 0; i < x.numel(); ++i) {
    const T v = x[i];
    if (kind == GeluKind::Erf)
      y[i] = v * T(0.5) * (T(1) + std::erf(v / std::sqrt(T(2))));
    else
      y[i] = T(0.5) * v * (T(1) + std::tanh(std::sqrt(T(2) / pi) * (v + T(0.044715) * v * v * v)));
  }
}

template <class T>
void gelu_backward(GeluKind kind, CView<T> x, CView<T> dy, View<T> dx) {
  detail::gelu_check_like<T>("ref::gelu_backward", "dx", dx, x);
  const T pi = T(3.14159265358979323846);
  for (index_t i = 0; i < x.numel(); ++i) {
    const T v = x[i];
    T d;
    if (kind == GeluKind::Erf) {
      d = T(0.5) * (T(1) + std::erf(v / std::sqrt(T(2)))) + v * std::exp(-v * v / T(2)) / std::sqrt(T(2) * pi);
    } else {
      const T k = std::sqrt(T(2) / pi);
      const T th = std::tanh(k * (v + T(0.044715) * v * v * v));
      d = T(0.5) * (T(1) + th) + T(0.5) * v * (T(1) - th * th) * k * (T(1) + T(3) * T(0.044715) * v * v);
    }
    dx[i] = dy[i] * d;
  }
}

template <class T>
void bias_gelu_forward(GeluKind kind, CView<T> b, View<T> pre_out, View<T> y) {
  const index_t M = b.numel();
  LIMOE_CHECK(M > 0 && pre_out.numel() % M == 0, "ref::bias_gelu_forward: pre_out ", pre_out.shape().str(),
              " is not rows of the bias width ", M);
  for (index_t i = 0; i < pre_out.numel(); ++i) pre_out[i] += b[i % M];
  gelu_forward<T>(kind, pre_out, y);
}

}  // namespace ref
}  // namespace limoe
