// limoe/math/balance.hpp: the formulas of the router's balancing and entropy losses (semantics §4, §6), once.
//
//   safe_log(p)      log p, floored at -700 so that 0 log 0 = 0 and an underflowed gate gives no NaN
//                    (math/plain.hpp's log: vectorisable)
//   entropy(p)       H = -sum_e p_e log p_e (natural log)
//   cv_squared(v)    var(v) / mean(v)^2 with the population variance (as vmoe, without the std, whose
//                    gradient is undefined at 0), and its gradient
//                    d/dv_e = (2 / E) ((v_e - mean) / mean^2 - var / mean^3); 0 (and a zero gradient) when mean <= 0
//   The load loss's per-(token, expert) term is 1 - Phi(z) with z = (thr - logit) / sigma: math::normal_sf, and
//   its derivative phi(z) / sigma: math::normal_pdf (limoe/math/normal.hpp).
#pragma once

#include <cmath>

#include "limoe/math/host_device.hpp"
#include "limoe/math/plain.hpp"

namespace limoe::math {

inline constexpr double kLogFloor = -700.0;
inline constexpr double kLogFloorArg = 9.8596765437597708e-305;  // exp(-700), a normal double

// With math/plain.hpp's log, computed whatever p is and then selected: a loop of them vectorises.
LIMOE_HD LIMOE_INLINE double safe_log(double p) {
  const double l = plain_log(p);  // meaningless for p <= exp(-700), and then not selected
  return detail::select(p > kLogFloorArg, detail::select(l > kLogFloor, l, kLogFloor), kLogFloor);
}

// H = -sum_e p_e log_of(e): the entropy with the logs from log_of (safe_log of p_e below; a CPU loop that
// took them all in one vectorised pass reads them back).
template <class T, class LogOf>
LIMOE_HD inline double entropy_with(const T* p, int n, LogOf log_of) {
  double H = 0;
  for (int e = 0; e < n; ++e) H -= static_cast<double>(p[e]) * log_of(e);
  return H;
}
template <class T>
LIMOE_HD inline double entropy(const T* p, int n) {
  return entropy_with(p, n, [p](int e) { return safe_log(static_cast<double>(p[e])); });
}

// Returns var(v) / mean(v)^2 over v[0, E); writes its gradient to dv (may be null).
LIMOE_HD inline double cv_squared(const double* v, int E, double* dv) {
  double mean = 0;
  for (int e = 0; e < E; ++e) mean += v[e];
  mean /= E;
  double var = 0;
  for (int e = 0; e < E; ++e) var += (v[e] - mean) * (v[e] - mean);
  var /= E;
  if (!(mean > 0)) {
    if (dv)
      for (int e = 0; e < E; ++e) dv[e] = 0;
    return 0;
  }
  if (dv)
    for (int e = 0; e < E; ++e) dv[e] = 2.0 / E * ((v[e] - mean) / (mean * mean) - var / (mean * mean * mean));
  return var / (mean * mean);
}

}  // namespace limoe::math
