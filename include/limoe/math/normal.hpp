// limoe/math/normal.hpp: the standard normal distribution's CDF Phi, survival function 1 - Phi and density
// phi, shared by GELU (semantics §1: gelu(x) = x Phi(x)) and the load loss (§4: p = 1 - Phi(z)).
//
//   Phi(x) = 0.5 erfc(-x / sqrt 2),   1 - Phi(x) = 0.5 erfc(x / sqrt 2),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// The erfc forms keep full relative precision in the tails (1 + erf(x) cancels for x << 0). A backend whose
// vector type has no fast erfc specialises NormalCdf for it (the CPU backend does for Eigen arrays, through the
// same function written with erf).
#pragma once

#include <cmath>
#include <type_traits>

#include "limoe/math/host_device.hpp"
#include "limoe/math/plain.hpp"

namespace limoe::math {

template <class V, class = void>
struct scalar_of {
  using type = V;
};
template <class V>
struct scalar_of<V, std::void_t<typename V::Scalar>> {
  using type = typename V::Scalar;
};
template <class V>
using scalar_of_t = typename scalar_of<V>::type;

inline constexpr double kInvSqrt2 = 0.70710678118654752440;    // 1 / sqrt(2)
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// Phi(x) for a scalar; specialised for vector types by backends.
template <class V, class = void>
struct NormalCdf {
  LIMOE_HD static V eval(V x) {
    using std::erfc;
    return V(0.5) * erfc(-x * V(kInvSqrt2));
  }
};

template <class V>
LIMOE_HD inline auto normal_cdf(const V& x) {
  return NormalCdf<V>::eval(x);
}
// 1 - Phi(x), in double with math/plain.hpp's erfc (the load loss's per-(token, expert) probability: a loop
// of them vectorises).
LIMOE_HD LIMOE_INLINE double normal_sf(double x) { return 0.5 * plain_erfc(x * kInvSqrt2); }
// phi(x); a double with math/plain.hpp's exp (as normal_sf), a float or a backend's vector type with its exp.
template <class V>
LIMOE_HD LIMOE_INLINE auto normal_pdf(const V& x) {
  using S = scalar_of_t<V>;
  if constexpr (std::is_same_v<V, double>) {
    return kInvSqrt2Pi * plain_exp(-0.5 * x * x);
  } else {
    using std::exp;
    return S(kInvSqrt2Pi) * exp(S(-0.5) * x * x);
  }
}

}  // namespace limoe::math
