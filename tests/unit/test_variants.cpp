// Blocks, heads and layouts as types (model/variants.hpp): the variant aliases agree with the presets by name,
// a layout's model computes what the config-driven model computes, a config that contradicts the type is
// rejected by field, and a layout composes with any backend.
#include <doctest/doctest.h>

#include <cmath>
#include <limoe/model/variants.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <string>

using namespace limoe;

namespace {

std::string error_of(auto&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Small sizes for any layout (the layout fixes the rest).
ModelConfig small_sizes(int depth) {
  ModelConfig c;
  c.image_size = {8, 8};
  c.channels = 3;
  c.patch = 4;
  c.width = 16;
  c.depth = depth;
  c.heads = 2;
  c.mlp_dim = 24;
  c.vocab_size = 17;
  c.text_len = 6;
  c.proj_dim = 8;
  c.text_mask = true;
  c.router.capacity_factor_train = 0.8;
  return c;
}

struct Batch {
  Tensor<float> images = testing::randn<float>(Shape{4, 8, 8, 3}, 5);
  Tensor<std::int32_t> texts{Shape{4, 6}};
  Batch() {
    for (index_t i = 0; i < texts.numel(); ++i) texts[i] = i % 6 < 2 + i / 6 ? static_cast<std::int32_t>(1 + (i * 7) % 16) : 0;
  }
};

template <class Layout>
void check_alias(const char* name) {
  CAPTURE(name);
  const ModelConfig want = preset(name);
  const ModelConfig got = Model<Layout>::config();
  CHECK(to_json(got) == to_json(want));
  CHECK(count_params(got).total == count_params(want).total);
}

}  // namespace

TEST_CASE("variants: each alias's layout at its preset sizes is exactly the preset of that name") {
  check_alias<variants::layouts::S32>("S/32");
  check_alias<variants::layouts::B32>("B/32");
  check_alias<variants::layouts::B16>("B/16");
  check_alias<variants::layouts::L16>("L/16");
  check_alias<variants::layouts::H14>("H/14");
  // The H/14 layout: 32 experts in blocks 9, 11, ..., 31.
  const ModelConfig h = variants::H14<>::config();
  CHECK(h.experts == 32);
  CHECK(h.moe_blocks.size() == 12);
  CHECK(h.moe_blocks.front() == 9);
  CHECK(h.moe_blocks.back() == 31);
}

TEST_CASE("variants: a layout's model equals the config-driven model on the same config, bitwise") {
  using Alias = variants::S32<Cpu, float>;
  const ModelConfig cfg = Alias::config(small_sizes(4));
  CHECK(cfg.moe_blocks == std::vector<int>{1, 3});
  Alias typed(cfg);
  Limoe<float> by_config(cfg);
  typed.init(3), by_config.init(3);
  Batch b;
  for (Mode mode : {Mode::Train, Mode::Eval}) {
    const auto x = typed.forward(b.images.cview(), b.texts.cview(), mode, 2);
    const auto y = by_config.forward(b.images.cview(), b.texts.cview(), mode, 2);
    REQUIRE(x.routes.size() == 2);
    CHECK(x.route_blocks == std::vector<int>{1, 3});
    for (std::size_t r = 0; r < x.routes.size(); ++r)
      for (index_t i = 0; i < x.routes[r].numel(); ++i) CHECK(x.routes[r][i] == y.routes[r][i]);
    for (index_t i = 0; i < x.img_emb.numel(); ++i) CHECK(x.img_emb[i] == y.img_emb[i]);
    for (index_t i = 0; i < x.txt_emb.numel(); ++i) CHECK(x.txt_emb[i] == y.txt_emb[i]);
    CHECK(x.aux_loss == y.aux_loss);
  }
}

TEST_CASE("variants: a config that contradicts the layout is rejected, naming the field") {
  ModelConfig c = variants::B16<>::config(small_sizes(2));
  CHECK_NOTHROW(variants::B16<>{c});
  auto with = [&](auto edit) {
    ModelConfig d = c;
    edit(d);
    return error_of([&] { variants::B16<> m(d); });
  };
  CHECK(with([](ModelConfig& d) { d.experts = 4; }).find("experts = 4 contradicts the layout") != std::string::npos);
  CHECK(with([](ModelConfig& d) { d.top_k = 2; }).find("top_k = 2") != std::string::npos);
  CHECK(with([](ModelConfig& d) { d.moe_blocks = {1}; }).find("moe_blocks = [1]") != std::string::npos);
  CHECK(with([](ModelConfig& d) { d.pool_txt = Pooling::Last; }).find("pool_txt = last") != std::string::npos);
  CHECK(with([](ModelConfig& d) { d.router.bpr = false; }).find("router.bpr") != std::string::npos);
}

TEST_CASE("variants: a composed layout (K = 2, 6 experts, gap/last heads, vanilla order) on Cpu and Ref") {
  using Sparse = PreLnBlock<MultiHeadAttention, MoeMlp<6, 2, VanillaRouter<2>>>;
  using Mine = TowerLayout<variants::DenseBlock, Sparse, EveryOther<0>, GapHead, LastTokenHead>;
  ModelConfig sizes = small_sizes(3);
  const ModelConfig cfg = Model<Mine>::config(sizes);
  CHECK(cfg.experts == 6);
  CHECK(cfg.top_k == 2);
  CHECK(cfg.moe_blocks == std::vector<int>{0, 2});
  CHECK(cfg.pool_img == Pooling::Gap);
  CHECK(cfg.pool_txt == Pooling::Last);
  CHECK(!cfg.router.bpr);
  Model<Mine, Cpu, double> cpu(cfg);
  Model<Mine, Ref, double> ref(cfg);
  cpu.init(9), ref.init(9);
  Batch b;
  Tensor<double> images(b.images.shape());
  for (index_t i = 0; i < images.numel(); ++i) images[i] = b.images[i];
  const auto x = cpu.forward(images.cview(), b.texts.cview(), Mode::Train, 1);
  const auto y = ref.forward(images.cview(), b.texts.cview(), Mode::Train, 1);
  REQUIRE(x.routes.size() == 2);
  CHECK(x.routes[0].dim(1) == 2);  // K = 2 choices per token
  for (std::size_t r = 0; r < 2; ++r)
    for (index_t i = 0; i < x.routes[r].numel(); ++i) CHECK(x.routes[r][i] == y.routes[r][i]);
  double worst = 0;
  for (index_t i = 0; i < x.img_emb.numel(); ++i) worst = std::max(worst, std::abs(x.img_emb[i] - y.img_emb[i]));
  for (index_t i = 0; i < x.txt_emb.numel(); ++i) worst = std::max(worst, std::abs(x.txt_emb[i] - y.txt_emb[i]));
  CHECK(worst < 1e-12);
  CHECK(cpu.params().size() == static_cast<index_t>(count_params(cfg).total));
}
