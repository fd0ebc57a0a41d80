// The whole model: shapes, presets, parameter counts, and every gradient against finite differences.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;

TEST_CASE("presets: parameter counts match LIMOE.md section 2") {
  const auto h14 = count_params(preset("H/14"));
  CHECK(std::abs(h14.total / 1e9 - 5.59) < 0.01);
  CHECK(std::abs(h14.per_token / 1e6 - 653) < 1);
  const auto b16 = count_params(preset("B/16"));
  CHECK(std::abs(b16.total / 1e9 - 0.52) < 0.01);
  CHECK(std::abs(b16.per_token / 1e6 - 94) < 1);
  const auto l16 = count_params(preset("L/16"));
  CHECK(std::abs(l16.total / 1e9 - 1.77) < 0.01);
  CHECK(std::abs(l16.per_token / 1e6 - 317) < 1);
  CHECK_THROWS_WITH_AS(preset("Z/9"), doctest::Contains("known presets"), Error);
}

TEST_CASE("count_params equals the size of the model's parameter store") {
  for (const char* name : {"tiny", "small-28", "small-32"}) {
    Limoe<float> m(preset(name));
    CHECK(m.params().size() == count_params(m.config()).total);
  }
}

TEST_CASE("config: impossible settings are errors that name the problem") {
  ModelConfig c = preset("tiny");
  c.heads = 3;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("not divisible by heads"), Error);
  c = preset("tiny");
  c.patch = 5;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("not divisible by patch"), Error);
  c = preset("tiny");
  c.moe_blocks = {7};
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("moe_blocks"), Error);
  const auto j = to_json(preset("small-32"));
  const ModelConfig back = config_from_json(j);
  CHECK(to_json(back) == j);
}

namespace {
ModelConfig grad_config(Pooling pi, Pooling pt, int k) {
  ModelConfig c = preset("tiny");
  c.image_size = {8, 8};
  c.patch = 4;
  c.channels = 2;
  c.width = 8;
  c.heads = 2;
  c.mlp_dim = 12;
  c.vocab_size = 11;
  c.text_len = 5;
  c.proj_dim = 6;
  c.experts = 3;
  c.top_k = k;
  c.moe_blocks = {1};
  c.pool_img = pi;
  c.pool_txt = pt;
  c.router.experts = 3;
  c.router.top_k = k;
  c.router.noise_std = 0.0;
  c.router.capacity_factor_train = 0.0;  // no drops: the discrete choices cannot flip under +-h
  c.logit_scale_max = 0;
  c.aux.z_loss_weight = 0.01;
  return c;
}
}  // namespace

TEST_CASE("model: every parameter gradient agrees with finite differences (double)") {
  for (auto [pi, pt, k] : {std::tuple{Pooling::Map, Pooling::Map, 1}, std::tuple{Pooling::Gap, Pooling::Last, 2},
                           std::tuple{Pooling::First, Pooling::Gap, 1}}) {
    Limoe<double> m(grad_config(pi, pt, k));
    m.init(7);
    auto& ps = m.params();
    // A larger router makes the routing decisive (no near-ties).
    auto r = ps.value(ps.get("blocks.1.moe.router.weight"));
    for (index_t i = 0; i < r.numel(); ++i) r[i] *= 40;
    const index_t B = 3;
    Tensor<double> images(Shape{B, 8, 8, 2});
    testing::fill_normal(images.view(), 3, 0.5);
    Tensor<std::int32_t> texts(Shape{B, 5});
    for (index_t i = 0; i < texts.numel(); ++i) texts[i] = static_cast<std::int32_t>((i * 7 + 3) % 11);
    auto total = [&] {
      auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
      return m.loss(f).total;
    };
    m.zero_grad();
    auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
    const auto l = m.loss(f);
    CHECK(std::isfinite(l.total));
    CHECK(l.aux > 0);
    m.backward(f);
    Tensor<double> analytic = Tensor<double>::copy_of(ps.grads());
    auto res = testing::check_gradient(ps.values(), analytic.cview(), total, 1e-5);
    INFO(res.str());
    CHECK(res.rel_error < 1e-6);
  }
}

TEST_CASE("model: images and texts alone give the same embeddings as in eval without drops") {
  ModelConfig c = preset("tiny");
  Limoe<float> m(c);
  m.init(1);
  Tensor<float> images(Shape{2, 28, 28, 1});
  testing::fill_normal(images.view(), 1, 0.5);
  Tensor<std::int32_t> texts(Shape{2, 16});
  for (index_t i = 0; i < texts.numel(); ++i) texts[i] = static_cast<std::int32_t>(i % 50);
  auto both = m.forward(images.cview(), texts.cview(), Mode::Eval);
  auto img = m.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
  auto txt = m.forward(CView<float>{}, texts.cview(), Mode::Eval);
  for (index_t i = 0; i < img.img_emb.numel(); ++i) CHECK(img.img_emb[i] == doctest::Approx(both.img_emb[i]).epsilon(1e-5));
  for (index_t i = 0; i < txt.txt_emb.numel(); ++i) CHECK(txt.txt_emb[i] == doctest::Approx(both.txt_emb[i]).epsilon(1e-5));
  CHECK_THROWS_WITH_AS(m.forward(Tensor<float>(Shape{1, 27, 28, 1}).cview(), {}, Mode::Eval),
                       doctest::Contains("expected [B, 28, 28, 1]"), Error);
}

TEST_CASE("checkpoint: round trip, scalar stored as [1], and misuse errors") {
  Limoe<float> m(preset("tiny"));
  m.init(3);
  const std::string path = "/tmp/limoe_test_model_ckpt.safetensors";
  save_checkpoint(m, path);
  Limoe<float> back(read_checkpoint_config(path));
  load_weights(back, io::SafetensorsReader::open(path));
  for (index_t i = 0; i < m.params().size(); ++i) REQUIRE(back.params().values()[i] == m.params().values()[i]);
  // Another writer stores logit_scale as [1]: accepted.
  {
    const auto r = io::SafetensorsReader::open(path);
    io::SafetensorsWriter w;
    for (const auto& name : r.names()) {
      const auto v = r.read_f32_flat(name);
      auto shape = r.info(name).shape;
      if (name == "logit_scale") shape = {1};
      w.add(name, shape, std::span<const float>(v));
    }
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, v);
    w.write(path);
  }
  load_weights(back, io::SafetensorsReader::open(path));
  CHECK(back.params().value(back.params().get("logit_scale"))[0] == doctest::Approx(std::log(10.0)));
  std::remove(path.c_str());
  // backward() without loss() on the last forward is an error, not a silent use of stale logits.
  Tensor<float> images(Shape{2, 28, 28, 1});
  Tensor<std::int32_t> texts(Shape{2, 16}, 3);
  auto f = m.forward(images.cview(), texts.cview(), Mode::Train);
  CHECK_THROWS_WITH_AS(m.backward(f), doctest::Contains("call loss()"), Error);
  m.loss(f);
  CHECK_NOTHROW(m.backward(f));
}
