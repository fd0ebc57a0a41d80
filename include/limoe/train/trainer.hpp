// limoe/train/trainer.hpp: one training step (forward, contrastive + auxiliary losses, backward, AdamW) and the
// metrics it reports (semantics §4-6).
//
//   limoe::Trainer<limoe::Limoe<float>> trainer(model, {.steps = 1000});
//   for (...) { auto r = trainer.step(batch.images.cview(), batch.texts.cview()); }
//
// The step number drives the learning-rate schedule and the router noise, so a run resumed from a checkpoint
// at step s (weights, AdamW moments, data position) continues the same loss curve.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/model/model.hpp"
#include "limoe/train/optimizer.hpp"

namespace limoe {

struct TrainConfig {
  std::int64_t steps = 1000;
  AdamWConfig adam{};
  std::int64_t warmup_steps = 100;
  Decay decay = Decay::Cosine;
  double final_lr_fraction = 0.0;
};

// What one step reports. `routing` and `aux_terms` are per MoE block (in block order).
struct StepReport {
  std::int64_t step = 0;  // the step just taken (1-based count of updates)
  LossOutput loss;
  double lr = 0, grad_norm = 0, seconds = 0;
  std::vector<int> moe_blocks;
  std::vector<moe::RoutingStats> routing;
  std::vector<moe::AuxLossValues> aux_terms;
};

// One JSON object per step for the metrics log: every loss term, and routing statistics per block and modality.
inline nlohmann::json to_json(const StepReport& r) {
  nlohmann::json blocks = nlohmann::json::array();
  for (std::size_t i = 0; i < r.routing.size(); ++i) {
    const auto& s = r.routing[i];
    const auto& a = r.aux_terms[i];
    nlohmann::json b = {{"block", r.moe_blocks[i]},
                        {"importance", a.importance},
                        {"load", a.load},
                        {"z", a.z},
                        {"capacity", s.capacity},
                        {"image_share", s.image_share}};
    const char* names[2] = {"img", "txt"};
    for (int m = 0; m < 2; ++m) {
      b[names[m]] = {{"tokens", s.tokens[m]},
                     {"drop_fraction", s.drop_fraction[m]},
                     {"routed", s.routed[m]},
                     {"dropped", s.dropped[m]},
                     {"local_entropy", s.local_entropy[m]},
                     {"global_entropy", s.global_entropy[m]},
                     {"local_entropy_loss", a.local_entropy[m]},
                     {"global_entropy_loss", a.global_entropy[m]}};
    }
    blocks.push_back(b);
  }
  return {{"step", r.step},
          {"loss", r.loss.total},
          {"contrastive", r.loss.contrastive},
          {"aux", r.loss.aux},
          {"accuracy_i2t", r.loss.accuracy_i2t},
          {"accuracy_t2i", r.loss.accuracy_t2i},
          {"temperature", r.loss.scale},
          {"lr", r.lr},
          {"grad_norm", r.grad_norm},
          {"seconds", r.seconds},
          {"moe", blocks}};
}

template <class Model>
class Trainer {
 public:
  using T = typename Model::scalar_type;

  Trainer(Model& model, TrainConfig cfg) : model_(model), cfg_(cfg) {
    LIMOE_CHECK(cfg_.steps >= 1, "TrainConfig: steps must be >= 1, got ", cfg_.steps);
    LIMOE_CHECK(cfg_.adam.lr > 0, "TrainConfig: the learning rate must be positive, got ", cfg_.adam.lr);
    opt_ = AdamW<T>(cfg_.adam, model_.params());
    sched_ = LrSchedule{cfg_.warmup_steps, cfg_.steps, cfg_.decay, cfg_.final_lr_fraction};
  }

  AdamW<T>& optimizer() { return opt_; }
  const TrainConfig& config() const { return cfg_; }
  std::int64_t step_count() const { return opt_.step(); }
  double lr_at(std::int64_t step) const { return cfg_.adam.lr * sched_.factor(step); }

  // One update on a batch of n image-text pairs (images [n, H, W, C], texts [n, T]).
  StepReport step(CView<T> images, CView<std::int32_t> texts) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::int64_t s = opt_.step();
    model_.zero_grad();
    const auto fwd = model_.forward(images, texts, Mode::Train, static_cast<std::uint64_t>(s));
    StepReport r;
    r.loss = model_.loss(fwd);
    LIMOE_CHECK(std::isfinite(r.loss.total), "training diverged at step ", s, " (loss ", r.loss.total,
                "); lower the learning rate or raise the warmup");
    model_.backward(fwd);
    r.lr = lr_at(s);
    r.grad_norm = opt_.update(model_.params(), r.lr);
    r.step = opt_.step();
    r.moe_blocks = fwd.route_blocks;
    r.routing = fwd.stats;
    r.aux_terms = fwd.aux_terms;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
  }

 private:
  Model& model_;
  TrainConfig cfg_;
  AdamW<T> opt_;
  LrSchedule sched_;
};

}  // namespace limoe
