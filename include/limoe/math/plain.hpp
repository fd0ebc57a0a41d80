// limoe/math/plain.hpp: exp, log and erfc in double as plain arithmetic (no libm call, no branch: selects
// only), for the per-(token, expert) work of the router's losses and statistics (semantics §4, §6) and the
// router's noise (core/rng.hpp's Box-Muller).
//
// Why: a loop of libm calls is not vectorised, and the MoE layer takes several per (token, expert) in double
// (the load loss's 1 - Phi(z) and phi(z), the entropies' logs, the z-loss's exps): 32,768 of each for 4,096
// tokens and 8 experts. Written as below, a loop of them vectorises with AVX2 or AVX-512 (measured on Zen 4,
// g++ 12 -O2 -march=native: erfc 2.4, exp 0.9, log 0.9 ns a value against libm's 6.1, 5.3, 4.5; with
// -march=x86-64-v3 4.0, 1.5, 1.4), and a GPU runs the same operations (LIMOE_HD), so host and device agree to
// the last bits or nearly (an FMA contraction on one side and not the other). A baseline x86-64 build
// vectorises none of it and runs them at 27, 9, 8 ns: a library user who cares builds with an -march.
//
// Accuracy against libm (tests/unit/test_core.cpp checks it on dense samples):
//   plain_exp   within 1 ulp for x in [-708, 709]; 0 below -708 (no subnormal results), +inf above 709
//   plain_log   within 2 ulp for normal positive x (callers keep 0, subnormals and negatives away)
//   plain_erfc  within 3e-15 relative where erfc(x) >= 1e-300 (x < 26.2); 0 beyond x = 26.6
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "limoe/math/host_device.hpp"

namespace limoe::math {

namespace detail {
// c ? a : b with both operands computed. With AVX2 or AVX-512 on the bits: g++ turns a conditional expression
// whose operand is computed only for it back into control flow, and then will not vectorise the loop under
// -ftrapping-math (its default) unless AVX-512's masks cover it. Elsewhere (a GPU, a baseline x86-64 build,
// which vectorises none of this) the plain conditional, which compiles to a select.
LIMOE_HD LIMOE_INLINE double select(bool c, double a, double b) {
#if defined(__AVX2__) && !defined(__CUDA_ARCH__)
  std::uint64_t ua = 0, ub = 0;
  memcpy(&ua, &a, sizeof ua);
  memcpy(&ub, &b, sizeof ub);
  const std::uint64_t m = std::uint64_t{0} - static_cast<std::uint64_t>(c);
  const std::uint64_t r = (ua & m) | (ub & ~m);
  double out = 0;
  memcpy(&out, &r, sizeof out);
  return out;
#else
  return c ? a : b;
#endif
}
}  // namespace detail

// exp(x) = 2^k exp(r): k = round(x / ln 2) (the add-and-subtract of 1.5 2^52 rounds to nearest without a
// call), r = x - k ln 2 with ln 2 in two parts (the first with 32 trailing zero bits, so k ln2_hi is exact),
// |r| <= ln 2 / 2; exp(r) by its Taylor series to r^13 / 13! (the next term is below 4e-18 of the result);
// 2^k built in the exponent field.
LIMOE_HD LIMOE_INLINE double plain_exp(double x) {
  // Computed for every x and then selected (no branch: what lets g++ vectorise a loop of calls without AVX-512's
  // masks); outside [-708, 709], and for NaN, y is meaningless and the last line takes 0, inf or x instead.
  const bool above = x > -708.0, below = x < 709.0, nan = x != x;
  const double shifted = x * 1.4426950408889634074 + 6755399441055744.0;  // 1.5 2^52 + k: k in the low bits
  const double kd = shifted - 6755399441055744.0;
  const double r = (x - kd * 0x1.62e42p-1) - kd * 0x1.fdf473de6af28p-22;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0, p = p * r + 1.0 / 39916800.0, p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0, p = p * r + 1.0 / 40320.0, p = p * r + 1.0 / 5040.0, p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0, p = p * r + 1.0 / 24.0, p = p * r + 1.0 / 6.0, p = p * r + 0.5, p = p * r + 1.0;
  p = p * r + 1.0;
  std::uint64_t bits = 0;  // 2^k: k + 1023 in the exponent field (from the integer bits, no conversion)
  memcpy(&bits, &shifted, sizeof bits);
  bits = (bits + 1023) << 52;
  double scale = 0;
  memcpy(&scale, &bits, sizeof scale);
  const double y = p * scale;
  const double outside = detail::select(nan, x, detail::select(above, static_cast<double>(INFINITY), 0.0));
  return detail::select(above && below, y, outside);
}

// log x for a normal positive double: x = m 2^k with m in [sqrt(1/2), sqrt(2)), log x = k log 2 + 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.1716; atanh's series to s^23 (the next term is below 2^-53).
LIMOE_HD LIMOE_INLINE double plain_log(double x) {
  std::uint64_t bits = 0;
  memcpy(&bits, &x, sizeof bits);
  std::uint64_t ebits = (bits >> 52) | 0x4330000000000000ull;  // 2^52 + the biased exponent, as a double
  double k = 0;
  memcpy(&k, &ebits, sizeof k);
  k -= 4503599627370496.0 + 1023.0;  // the exponent (an integer, exactly)
  bits = (bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull;  // m in [1, 2)
  double m = 0;
  memcpy(&m, &bits, sizeof m);
  const bool big = m > 1.4142135623730951;
  const double half = 0.5 * m, k1 = k + 1.0;  // computed either way: a select, not a branch (see plain_exp)
  m = detail::select(big, half, m);
  k = detail::select(big, k1, k);
  const double s = (m - 1.0) / (m + 1.0), z = s * s;
  double p = 1.0 / 23;  // 2 atanh(s) = 2 s (1 + z / 3 + z^2 / 5 + ... + z^11 / 23)
  p = p * z + 1.0 / 21, p = p * z + 1.0 / 19, p = p * z + 1.0 / 17, p = p * z + 1.0 / 15, p = p * z + 1.0 / 13;
  p = p * z + 1.0 / 11, p = p * z + 1.0 / 9, p = p * z + 1.0 / 7, p = p * z + 1.0 / 5, p = p * z + 1.0 / 3;
  p = p * z + 1.0;
  return k * 0.6931471805599453094 + 2.0 * s * p;
}

// erfc(x) for a = |x|: erfc(a) = exp(-a^2) g(a), g(a) = exp(a^2) erfc(a) (smooth, in (0, 1] on [0, inf)) as a
// polynomial of degree 24 in t = (a - 3.75) / (a + 3.75) in [-1, 1) (Schonfelder's mapping, Math. Comp. 32,
// 1978): g's Chebyshev series in t, fitted at 50 digits (scripts/fit-erfc.py; the first term left out is below
// 1e-18), rewritten in powers of t (their coefficients' magnitudes sum to 1.0004, so Horner's rule loses nothing
// to cancellation); a^2 split exactly into h + l, exp(-a^2) = exp(-h) (1 - l); erfc(-a) = 2 - erfc(a).
LIMOE_HD LIMOE_INLINE double plain_erfc(double x) {
  const bool negative = x < 0, nan = x != x;  // compared unconditionally, as in plain_exp
  const double minus_x = -x;
  const double a0 = detail::select(negative, minus_x, x);
  const bool near = a0 < 30.0;
  const double a = detail::select(near, a0, 30.0);  // erfc(30) is 0 here as erfc(inf): no overflow in the split below
  const double t = (a - 3.75) / (a + 3.75);
  double g = -4.9497206900937664e-11;
  g = g * t + 8.766027346984166e-11; g = g * t + 6.297962469182304e-10; g = g * t - 1.0759105395292883e-09;
  g = g * t - 4.84566988844704e-09; g = g * t + 8.792652547271408e-09; g = g * t + 3.1441031864543034e-08;
  g = g * t - 7.22356558583333e-08; g = g * t - 1.8338069950855423e-07; g = g * t + 6.591891962723238e-07;
  g = g * t + 7.485416857400643e-07; g = g * t - 6.183306559694181e-06; g = g * t + 3.5837149798414534e-06;
  g = g * t + 4.789874061256997e-05; g = g * t - 0.00015246266466585536; g = g * t - 2.553532252306776e-05;
  g = g * t + 0.00180296241673598; g = g * t - 0.008220621155217439; g = g * t + 0.024143223972444578;
  g = g * t - 0.05480232669490219; g = g * t + 0.10260431203219823; g = g * t - 0.16357189552392642;
  g = g * t + 0.22600806691662143; g = g * t - 0.2734219314954265; g = g * t + 0.14558972127503855;
  const double h = a * a;  // a^2 = h + l exactly: by a fused multiply-add where there is one, else Veltkamp's split
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  using std::fma;
  const double l = fma(a, a, -h);
#else
  const double split = 134217729.0 * a;  // 2^27 + 1: a = ah + al, each with at most 26 significant bits
  const double ah = split - (split - a), al = a - ah;
  const double l = ((ah * ah - h) + 2.0 * ah * al) + al * al;
#endif
  const double r = plain_exp(-h) * (1.0 - l) * g;
  const double reflected = 2.0 - r;
  return detail::select(nan, x, detail::select(negative, reflected, r));
}

}  // namespace limoe::math
