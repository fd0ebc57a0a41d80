// limoe/train/optimizer.hpp: AdamW with decoupled weight decay, learning-rate schedules, gradient clipping
// (semantics §5).
//
// Parameters and gradients are each one flat buffer (ParamStore), so one step is one loop over it. Weight
// decay applies to the entries registered with decay = true (the weight matrices), never to biases,
// LayerNorm parameters, positions, embeddings' tables or the temperature.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/params.hpp"

namespace limoe {

struct AdamWConfig {
  double lr = 1e-3;            // peak learning rate
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.1;   // decoupled (Loshchilov & Hutter): w -= lr_t * wd * w, on matrices only
  double clip_norm = 1.0;      // global-norm clipping; <= 0 disables it
};

enum class Decay { Cosine, Linear };

// Linear warmup to the peak, then cosine or linear decay to `final_fraction` of the peak at `total_steps`.
struct LrSchedule {
  std::int64_t warmup_steps = 0, total_steps = 1;
  Decay decay = Decay::Cosine;
  double final_fraction = 0.0;

  double factor(std::int64_t step) const {
    if (warmup_steps > 0 && step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    const double span = static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
    const double t = std::min(1.0, static_cast<double>(step - warmup_steps) / span);
    const double shape = decay == Decay::Cosine ? 0.5 * (1.0 + std::cos(M_PI * t)) : 1.0 - t;
    return final_fraction + (1.0 - final_fraction) * shape;
  }
};

template <class T>
class AdamW {
 public:
  AdamW() = default;
  AdamW(AdamWConfig cfg, index_t n) : cfg_(cfg), m_(Shape{n}), v_(Shape{n}), decay_mask_(Shape{n}) {}

  // Sizes the moments for `ps` and records which entries decay.
  void attach(const ParamStore<T>& ps) {
    m_.resize(Shape{ps.size()});
    v_.resize(Shape{ps.size()});
    m_.zero();
    v_.zero();
    decay_mask_.resize(Shape{ps.size()});
    for (const auto& e : ps.entries())
      for (index_t i = 0; i < e.shape.numel(); ++i) decay_mask_[e.offset + i] = e.decay ? 1 : 0;
    step_ = 0;
  }

  const AdamWConfig& config() const { return cfg_; }
  AdamWConfig& config() { return cfg_; }
  std::int64_t step() const { return step_; }
  void set_step(std::int64_t s) { step_ = s; }
  Tensor<T>& m() { return m_; }
  Tensor<T>& v() { return v_; }

  // One update with learning rate lr_t; returns the global gradient norm before clipping.
  double update(ParamStore<T>& ps, double lr_t) {
    LIMOE_CHECK(m_.numel() == ps.size(), "AdamW: attach() the optimizer to this parameter store first (",
                m_.numel(), " moments for ", ps.size(), " parameters)");
    View<T> w = ps.values();
    CView<T> g = ps.grads();
    const index_t n = ps.size();
    double sq = 0;
    for (index_t i = 0; i < n; ++i) sq += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    const double norm = std::sqrt(sq);
    LIMOE_CHECK(std::isfinite(norm), "AdamW: the gradient is not finite (norm ", norm,
                "); lower the learning rate or enable clipping");
    const double clip = (cfg_.clip_norm > 0 && norm > cfg_.clip_norm) ? cfg_.clip_norm / norm : 1.0;
    ++step_;
    const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step_));
    const T b1 = static_cast<T>(cfg_.beta1), b2 = static_cast<T>(cfg_.beta2);
    const T step_size = static_cast<T>(lr_t / bc1), inv_bc2 = static_cast<T>(1.0 / bc2);
    const T eps = static_cast<T>(cfg_.eps), wd = static_cast<T>(lr_t * cfg_.weight_decay), c = static_cast<T>(clip);
    parallel_for(0, n, 1 << 15, [&](index_t i0, index_t i1) {
      for (index_t i = i0; i < i1; ++i) {
        const T gi = g[i] * c;
        m_[i] = b1 * m_[i] + (T(1) - b1) * gi;
        v_[i] = b2 * v_[i] + (T(1) - b2) * gi * gi;
        if (decay_mask_[i]) w[i] -= wd * w[i];
        w[i] -= step_size * m_[i] / (std::sqrt(v_[i] * inv_bc2) + eps);
      }
    });
    return norm;
  }

 private:
  AdamWConfig cfg_;
  Tensor<T> m_, v_;
  Tensor<std::uint8_t> decay_mask_;
  std::int64_t step_ = 0;
};

}  // namespace limoe
