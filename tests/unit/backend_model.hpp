// tests/unit/backend_model.hpp: the backend harness's whole-model case: Limoe<double, ..., B> with every code
// path (MoE blocks with K = 2, BPR and a capacity that drops; a map head on images, a masked `last` head on
// text; router noise in training), forward in both modes, routes, loss and every parameter gradient by name,
// to compare a backend's model with the model on Ref.
#pragma once

#include <limoe/model/model.hpp>

#include "backend_cases.hpp"

namespace limoe::backend_cases {

// A tiny model with every code path: MoE blocks (K = 2, BPR, a capacity that drops), a map head on images and
// a masked `last` head on text, router noise in training.
ModelConfig tiny_config() {
  ModelConfig c;
  c.image_size = {8, 8};
  c.channels = 3;
  c.patch = 4;
  c.width = 16;
  c.depth = 2;
  c.heads = 2;
  c.mlp_dim = 24;
  c.vocab_size = 13;
  c.text_len = 5;
  c.proj_dim = 8;
  c.experts = 4;
  c.top_k = 2;
  c.moe_blocks = {0, 1};
  c.text_mask = true;
  c.pool_img = Pooling::Map;
  c.pool_txt = Pooling::Last;
  c.router.capacity_factor_train = 0.75;
  c.router.noise_std = 0.5;
  return c;
}

template <class B>
Outputs run_model(const ModelConfig& cfg) {
  Limoe<double, ConfigRouter, moe::DefaultAuxLosses, B> m(cfg);
  m.init(7);
  m.set_noise_seed(3);
  const index_t n = 3;
  auto images = testing::randn<double>(Shape{n, 8, 8, 3}, 21);
  Tensor<std::int32_t> texts(Shape{n, cfg.text_len});
  for (index_t i = 0; i < n * cfg.text_len; ++i)
    texts[i] = i % cfg.text_len < 3 + i / cfg.text_len % 2 ? static_cast<std::int32_t>(2 + (i * 5) % 11) : cfg.pad_id;
  Outputs o;
  for (Mode mode : {Mode::Eval, Mode::Train}) {
    const std::string k = mode == Mode::Train ? "train." : "eval.";
    auto fwd = m.forward(images.cview(), texts.cview(), mode, 4);
    put(o, k + "img_emb", fwd.img_emb), put(o, k + "txt_emb", fwd.txt_emb), put(o, k + "aux", fwd.aux_loss);
    for (std::size_t r = 0; r < fwd.routes.size(); ++r) put(o, k + "routes" + std::to_string(r), fwd.routes[r]);
    if (mode != Mode::Train) continue;
    const auto loss = m.loss(fwd);
    put(o, "loss", loss.total);
    m.zero_grad();
    m.backward(fwd);
    for (const auto& e : m.params().entries()) put(o, "grad." + e.name, to_host(m.params().grad(m.params().get(e.name))));
  }
  return o;
}

// Runs the model on B and on Ref and checks every output within tol; the routes (discrete) must be identical,
// and the capacity must have dropped something in training (else the case would not test dropping).
template <class B>
void compare_model_on(const ModelConfig& cfg, double tol) {
  const Outputs want = run_model<Ref>(cfg);
  const Outputs got = run_model<B>(cfg);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(B::name);
    CAPTURE(got[i].name);
    REQUIRE(got[i].name == want[i].name);
    CHECK(testing::max_diff(got[i].value, want[i].value) <= tol);
  }
  bool dropped = false;
  for (const auto& v : want)
    if (v.name.rfind("train.routes", 0) == 0)
      for (index_t i = 0; i < v.value.numel(); ++i) dropped |= v.value[i] < 0;
  CHECK(dropped);
}

// Twice: routing groups of tokens, and routing groups of pairs (group_pairs 2 over 3 pairs: two groups, so the
// MoE layers' rows are gathered into group order and scattered back).
template <class B>
void compare_model(double tol) {
  for (int group_pairs : {0, 2}) {
    CAPTURE(group_pairs);
    ModelConfig cfg = tiny_config();
    cfg.group_pairs = group_pairs;
    compare_model_on<B>(cfg, tol);
  }
}

}  // namespace limoe::backend_cases
