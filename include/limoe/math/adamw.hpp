// limoe/math/adamw.hpp: one AdamW step of one parameter (semantics §5), written once for every backend.
//
//   g' = g * clip                       (clip = min(1, clip_norm / ||g||), computed by the caller over all g)
//   m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   w -= lr wd w            (decoupled weight decay, where `decay`)
//   w -= (lr / bc1) m / (sqrt(v / bc2) + eps),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
// The caller passes step_size = lr / bc1, inv_bc2 = 1 / bc2 and wd_lr = lr * wd, which are per step, not per
// parameter.
#pragma once

#include <cmath>

#include "limoe/math/host_device.hpp"

namespace limoe::math {

template <class T>
struct AdamWStep {
  T b1, b2, eps, step_size, inv_bc2, wd_lr, clip;
};

template <class T>
LIMOE_HD inline void adamw_element(const AdamWStep<T>& s, bool decay, T g, T& w, T& m, T& v) {
  using std::sqrt;
  const T gc = g * s.clip;
  m = s.b1 * m + (T(1) - s.b1) * gc;
  v = s.b2 * v + (T(1) - s.b2) * gc * gc;
  if (decay) w -= s.wd_lr * w;
  w -= s.step_size * m / (sqrt(v * s.inv_bc2) + s.eps);
}

}  // namespace limoe::math
