// limoe/math/gelu.hpp: the GELU activation and its derivative (semantics §1), written once.
//
//   Erf:  gelu(x) = x Phi(x),                                        gelu'(x) = Phi(x) + x phi(x)
//   Tanh: gelu(x) = 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3)
//         gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//
// Each function is generic over V: a scalar (float, double; host or device) or an Eigen array expression (the
// CPU backend's vectorised path), whose exp/tanh are found by argument-dependent lookup and whose Phi is the
// backend's NormalCdf specialisation. For Eigen the result is an expression over `x`: assign it at once.
#pragma once

#include <cmath>
#include <type_traits>

#include "limoe/core/enums.hpp"
#include "limoe/math/host_device.hpp"
#include "limoe/math/normal.hpp"

namespace limoe::math {

inline constexpr double kSqrt2OverPi = 0.79788456080286535588; // sqrt(2 / pi)
inline constexpr double kGeluTanhC = 0.044715;

template <class V>
LIMOE_HD inline auto gelu_erf(const V& x) {
  return x * normal_cdf(x);
}
template <class V>
LIMOE_HD inline auto gelu_erf_grad(const V& x) {
  return normal_cdf(x) + x * normal_pdf(x);
}
template <class V>
LIMOE_HD inline auto gelu_tanh(const V& x) {
  using S = scalar_of_t<V>;
  using std::tanh;
  return S(0.5) * x * (S(1) + tanh(S(kSqrt2OverPi) * (x + S(kGeluTanhC) * x * x * x)));
}
// `th` is tanh(u) of gelu_tanh, passed in so a vectorised caller computes it once.
template <class V, class W>
LIMOE_HD inline auto gelu_tanh_grad_from(const V& x, const W& th) {
  using S = scalar_of_t<V>;
  return S(0.5) * (S(1) + th) +
         S(0.5) * x * (S(1) - th * th) * S(kSqrt2OverPi) * (S(1) + S(3 * kGeluTanhC) * x * x);
}
template <class V>
LIMOE_HD inline auto gelu_tanh_u(const V& x) {
  using S = scalar_of_t<V>;
  return S(kSqrt2OverPi) * (x + S(kGeluTanhC) * x * x * x);
}

// Scalar forms with the kind chosen at run time.
template <class T>
LIMOE_HD inline T gelu(GeluKind kind, T x) {
  return kind == GeluKind::Erf ? T(gelu_erf(x)) : T(gelu_tanh(x));
}
template <class T>
LIMOE_HD inline T gelu_grad(GeluKind kind, T x) {
  if (kind == GeluKind::Erf) return gelu_erf_grad(x);
  using std::tanh;
  return gelu_tanh_grad_from(x, T(tanh(gelu_tanh_u(x))));
}

}  // namespace limoe::math
