// limoe/train/optimizer.hpp: AdamW with decoupled weight decay, learning-rate schedules, gradient clipping
// (semantics §5).
//
// Parameters and gradients are each one flat buffer (ParamStore), so one step is one loop over it. Weight
// decay applies to the entries registered with decay = true (the weight matrices), never to biases,
// LayerNorm parameters, positions, embeddings' tables or the temperature.
//
// Checkpointing is the optimizer's own: save_state / load_state write and read its moments and step through a
// safetensors writer / reader (model/checkpoint.hpp calls them when a TrainState carries an optimizer).
//
// AdamW<T, S> keeps its moments in the memory space S of the store it updates. On host memory the update is the
// loop below; on another space it is that space's adamw_device_update (found by argument-dependent lookup:
// backend/cuda.hpp defines the CUDA one, cuda::ops::adamw_update; adamw_device_apply where the caller gives the
// norm, cuda::ops::adamw_apply), the same arithmetic (math/adamw.hpp).
#pragma once

#include <cmath>
#include <optional>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/params.hpp"
#include "limoe/core/profile.hpp"
#include "limoe/core/reduce.hpp"
#include "limoe/math/adamw.hpp"

namespace limoe {

// The sum of x's squares in double: on the host in chunks over the thread pool, each in 16 lanes
// (detail::chunked_sum: a fixed order, the same bits on any thread count; in index order this one sum took a
// fifth of AdamW's step); on another space, that space's device_sum_squares (found by argument-dependent
// lookup; backend/cuda.hpp: a fixed tree on the device).
template <class T, class S>
double sum_squares(CView<T, S> x) {
  if constexpr (std::is_same_v<S, HostSpace>) {
    const T* p = x.data();
    return detail::chunked_sum<double>(x.numel(), [p](index_t i) {
      const double v = static_cast<double>(p[i]);
      return v * v;
    });
  } else {
    return device_sum_squares(x);
  }
}

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

template <class T, class S = HostSpace>
class AdamW {
 public:
  using memory_space = S;
  AdamW() = default;
  // attach() to a parameter store before the first update.
  explicit AdamW(AdamWConfig cfg) : cfg_(cfg) {}
  AdamW(AdamWConfig cfg, const ParamStore<T, S>& ps) : cfg_(cfg) { attach(ps); }

  // Sizes the moments for `ps` and records which entries decay.
  void attach(const ParamStore<T, S>& ps) {
    m_.resize(Shape{ps.size()});
    v_.resize(Shape{ps.size()});
    m_.zero();
    v_.zero();
    Tensor<std::uint8_t> mask(Shape{ps.size()});
    for (const auto& e : ps.entries())
      for (index_t i = 0; i < e.shape.numel(); ++i) mask[e.offset + i] = e.decay ? 1 : 0;
    decay_mask_.resize(Shape{ps.size()});
    copy_from_host<std::uint8_t, S>(mask.cview(), decay_mask_.view());
    // Where each entry's moments sit in the saved (whole-model) layout: a shard reads its part.
    segments_.clear();
    global_size_ = 0;
    for (const auto& e : ps.entries()) {
      const index_t n = e.shape.numel();
      segments_.push_back({e.offset, n, global_size_ + e.shard * n, e.shard, e.shards, e.name});
      global_size_ += n * e.shards;
    }
    step_ = 0;
  }

  const AdamWConfig& config() const { return cfg_; }
  AdamWConfig& config() { return cfg_; }
  std::int64_t step() const { return step_; }
  void set_step(std::int64_t s) { step_ = s; }
  Tensor<T, S>& m() { return m_; }
  Tensor<T, S>& v() { return v_; }
  const Tensor<T, S>& m() const { return m_; }
  const Tensor<T, S>& v() const { return v_; }

  // Writes the moments as flat F32 tensors "opt.m" / "opt.v" (in the order of the parameter store), the step as
  // metadata "opt_step", and that order as "opt_order" (a JSON array of the parameters' names), so that another
  // program can split the moments by tensor (an io::SafetensorsWriter, or anything with add / set_metadata).
  template <class Writer>
  void save_state(Writer& w) const {
    LIMOE_CHECK(global_size_ == m_.numel(), "AdamW::save_state: this optimizer holds the moments of part of the "
                "model (expert parallel); gather the whole model's first (Trainer::gather_whole_state)");
    std::vector<float> buf;
    for (auto [name, t] : {std::pair<const char*, const Tensor<T, S>*>{"opt.m", &m_}, {"opt.v", &v_}}) {
      const Tensor<T> h = to_host(t->cview());
      buf.assign(h.data(), h.data() + h.numel());
      w.add(name, {t->numel()}, std::span<const float>(buf));
    }
    w.set_metadata("opt_step", std::to_string(step_));
    nlohmann::json order = nlohmann::json::array();
    for (const auto& sg : segments_) order.push_back(sg.name);
    w.set_metadata("opt_order", order.dump());
  }
  // Restores what save_state wrote; false (and nothing changed) when the reader holds no optimizer state.
  // The moments must match the attached store's size; errors name the reader's label. With "opt_order" the
  // moments are in that order (every parameter once, any order: another program's); without it, in the store's.
  template <class Reader>
  bool load_state(const Reader& r) {
    if (!r.has("opt.m") || !r.has("opt.v")) return false;
    std::vector<float> flat[2] = {r.read_f32_flat("opt.m"), r.read_f32_flat("opt.v")};
    for (int k = 0; k < 2; ++k)
      LIMOE_CHECK(static_cast<index_t>(flat[k].size()) == global_size_, "checkpoint '", r.label(), "': ",
                  k ? "opt.v" : "opt.m", " has ", flat[k].size(), " values for ", global_size_,
                  " parameters (attach the optimizer to the model first)");
    // The moments as AdamW leaves them: finite, and v (a running mean of squares) not negative; anything else
    // would turn the weights into NaN at the next step and be saved as such.
    for (int k = 0; k < 2; ++k)
      for (std::size_t i = 0; i < flat[k].size(); ++i)
        LIMOE_CHECK(std::isfinite(flat[k][i]) && (k == 0 || flat[k][i] >= 0.0f), "checkpoint '", r.label(), "': ",
                    k ? "opt.v" : "opt.m", " holds ", flat[k][i], " at ", i,
                    k ? " (a second moment must be finite and >= 0)" : " (a first moment must be finite)");
    std::int64_t step = step_;
    const auto& md = r.metadata();
    if (auto it = md.find("opt_step"); it != md.end()) {
      try {
        std::size_t used = 0;
        step = std::stoll(it->second, &used);
        LIMOE_CHECK(used == it->second.size() && step >= 0, "bad");
      } catch (const std::exception&) {
        fail("checkpoint '", r.label(), "': opt_step \"", it->second, "\" is not a step count");
      }
    }
    const std::vector<index_t> where = file_offsets(r);
    Tensor<T> m(m_.shape()), v(v_.shape());  // on the host, then into the moments' memory
    for (std::size_t k = 0; k < segments_.size(); ++k) {
      const Segment& sg = segments_[k];
      for (index_t i = 0; i < sg.numel; ++i) {
        m[sg.local + i] = static_cast<T>(flat[0][static_cast<std::size_t>(where[k] + i)]);
        v[sg.local + i] = static_cast<T>(flat[1][static_cast<std::size_t>(where[k] + i)]);
      }
    }
    copy_from_host<T, S>(m.cview(), m_.view());
    copy_from_host<T, S>(v.cview(), v_.view());
    step_ = step;
    return true;
  }

  // One update with learning rate lr_t; returns the global gradient norm before clipping. `grad_norm`, when
  // given, is that norm computed by the caller (a store holding a shard of the model: the norm is the whole
  // model's, summed over ranks).
  double update(ParamStore<T, S>& ps, double lr_t, std::optional<double> grad_norm = std::nullopt) {
    profile::Region<S> region("optimizer");
    LIMOE_CHECK(m_.numel() == ps.size(), "AdamW: attach() the optimizer to this parameter store first (",
                m_.numel(), " moments for ", ps.size(), " parameters)");
    if constexpr (!std::is_same_v<S, HostSpace>) {
      // The space's own update (the norm summed where the gradient is, unless given); a non-finite norm throws,
      // nothing changed.
      double norm = 0;
      if (grad_norm) {
        norm = *grad_norm;
        adamw_device_apply(cfg_, step_ + 1, lr_t, norm, CView<T, S>(ps.grads()), decay_mask_.cview(), ps.values(),
                           m_.view(), v_.view());
      } else {
        norm = adamw_device_update(cfg_, step_ + 1, lr_t, CView<T, S>(ps.grads()), decay_mask_.cview(), ps.values(),
                                   m_.view(), v_.view());
      }
      ++step_;
      return norm;
    } else {
      return update_host(ps, lr_t, grad_norm);
    }
  }

 private:
  double update_host(ParamStore<T>& ps, double lr_t, std::optional<double> grad_norm) {
    View<T> w = ps.values();
    CView<T> g = ps.grads();
    const index_t n = ps.size();
    const double norm = grad_norm ? *grad_norm : std::sqrt(sum_squares(g));
    LIMOE_CHECK(std::isfinite(norm), "AdamW: the gradient is not finite (norm ", norm,
                "); lower the learning rate or enable clipping");
    ++step_;
    const auto step = math::adamw_step<T>(cfg_, step_, lr_t, math::adamw_clip(norm, cfg_.clip_norm));
    // Raw, unaliased pointers and a local copy of the constants, so the compiler vectorises the loop (with
    // -fno-math-errno, which the project's programs use: else sqrt keeps it scalar, about 4x slower).
    const T* __restrict gp = g.data();
    const std::uint8_t* __restrict dp = decay_mask_.data();
    T* __restrict wp = w.data();
    T* __restrict mp = m_.data();
    T* __restrict vp = v_.data();
    parallel_for(0, n, 1 << 15, [=](index_t i0, index_t i1) {
      const auto st = step;
      for (index_t i = i0; i < i1; ++i) math::adamw_element(st, dp[i] != 0, gp[i], wp[i], mp[i], vp[i]);
    });
    return norm;
  }

  // Where each segment's moments start in the file's opt.m / opt.v: the store's whole-model layout, or the
  // layout "opt_order" lists (each name once, the same names as the store's).
  template <class Reader>
  std::vector<index_t> file_offsets(const Reader& r) const {
    std::vector<index_t> where;
    for (const auto& sg : segments_) where.push_back(sg.global);
    const auto& md = r.metadata();
    const auto it = md.find("opt_order");
    if (it == md.end()) return where;
    const auto bad = [&](const auto&... what) {
      fail("checkpoint '", r.label(), "': opt_order (the order of opt.m and opt.v: a JSON array of the parameters' "
           "names) ", what...);
    };
    const auto order = nlohmann::json::parse(it->second, nullptr, false);
    if (order.is_discarded() || !order.is_array()) bad("is not a JSON array");
    std::unordered_map<std::string, index_t> whole;  // a name's whole-model size
    for (const auto& sg : segments_) whole[sg.name] = sg.numel * sg.shards;
    std::unordered_map<std::string, index_t> start;
    index_t at = 0;
    for (const auto& name : order) {
      if (!name.is_string()) bad("holds ", name.dump(), ", not a name");
      const std::string n = name;
      const auto w = whole.find(n);
      if (w == whole.end()) bad("names \"", n, "\", which this model does not have");
      if (!start.emplace(n, at).second) bad("names \"", n, "\" twice");
      at += w->second;
    }
    for (const auto& [n, size] : whole)
      if (!start.count(n)) bad("leaves out \"", n, "\"");
    for (std::size_t k = 0; k < segments_.size(); ++k)
      where[k] = start.at(segments_[k].name) + segments_[k].shard * segments_[k].numel;
    return where;
  }

  AdamWConfig cfg_;
  Tensor<T, S> m_, v_;
  Tensor<std::uint8_t, S> decay_mask_;
  struct Segment {
    index_t local, numel, global;  // an entry's moments: here, and in the whole model's saved layout
    index_t shard, shards;         // the part of its tensor it is, of how many (expert parallel): 0 of 1 whole
    std::string name;
  };
  std::vector<Segment> segments_;
  index_t global_size_ = 0;
  std::int64_t step_ = 0;
};

}  // namespace limoe
