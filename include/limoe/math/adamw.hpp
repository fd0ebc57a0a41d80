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
#include <cstdint>

#include "limoe/math/host_device.hpp"

namespace limoe {

// AdamW's hyperparameters (train/optimizer.hpp's AdamW on the CPU, cuda::ops::adamw_update on a GPU).
struct AdamWConfig {
  double lr = 1e-3;            // peak learning rate
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.1;   // decoupled (Loshchilov & Hutter): w -= lr_t * wd * w, on matrices only
  double clip_norm = 1.0;      // global-norm clipping; <= 0 disables it
};

}  // namespace limoe

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
  w = decay ? w - s.wd_lr * w : w;  // a select, not a branch: a host loop over elements vectorises
  w -= s.step_size * m / (sqrt(v * s.inv_bc2) + s.eps);
}

// The clip factor of a step: min(1, clip_norm / norm), 1 when clipping is off (clip_norm <= 0).
inline double adamw_clip(double norm, double clip_norm) {
  return (clip_norm > 0 && norm > clip_norm) ? clip_norm / norm : 1.0;
}

// The constants of step t (1-based) at learning rate lr with clip factor clip, every backend's.
template <class T>
AdamWStep<T> adamw_step(const AdamWConfig& c, std::int64_t t, double lr, double clip) {
  const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(t));
  return {static_cast<T>(c.beta1), static_cast<T>(c.beta2), static_cast<T>(c.eps), static_cast<T>(lr / bc1),
          static_cast<T>(1.0 / bc2), static_cast<T>(lr * c.weight_decay), static_cast<T>(clip)};
}

}  // namespace limoe::math
