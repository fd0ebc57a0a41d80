// The whole model: shapes, presets, parameter counts, and every gradient against finite differences.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <cstdio>
#include <utility>
#include <vector>
#include <limoe/core/profile.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;

TEST_CASE("presets: parameter counts match semantics §2") {
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
  // Routing groups that cannot hold one token per expert before rounding (semantics §3.5, the upstream
  // specification's E = 8, S = 4, factor 0.1: K S f / E = 0.05); under either factor; factor 0 takes any group.
  c = preset("tiny");
  c.experts = 8, c.top_k = 1, c.router.group_size = 4;
  c.router.capacity_factor_train = 0, c.router.capacity_factor_eval = 0.1;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("K*S*capacity factor/E = 1*4*0.1/8 = 0.05 slots, below one token (C < 1): raise router.capacity_factor_eval"), Error);
  c.router.capacity_factor_train = 1.05, c.router.capacity_factor_eval = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("capacity_factor_train"), Error);  // 4 * 1.05 / 8 < 1
  c.router.group_size = 8;  // 8 * 1.05 / 8 = 1.05: one slot each (C = 2)
  CHECK_NOTHROW(c.validate());
  c.top_k = 2, c.router.group_size = 4, c.router.capacity_factor_train = 1.0;  // 2 * 4 * 1 / 8 = 1
  CHECK_NOTHROW(c.validate());
  c.router.group_size = 0;  // one group per call: its size is the call's, C = ceil(...) >= 1 (moe/config.hpp)
  c.router.capacity_factor_train = 0.01;
  CHECK_NOTHROW(c.validate());
  const auto j = to_json(preset("small-32"));
  const ModelConfig back = config_from_json(j);
  CHECK(to_json(back) == j);
}

TEST_CASE("config JSON: a value nested deep or large is named by key and described by size, never dumped whole") {
  auto j = to_json(preset("tiny"));
  j["width"] = "DEEP";
  std::string text = j.dump();
  text.replace(text.find("\"DEEP\""), 6, std::string(200000, '[') + std::string(200000, ']'));
  CHECK_THROWS_WITH_AS(config_from_json_string(text), doctest::Contains("\"width\" must be an integer, got an array of 1 values"), Error);
  j = to_json(preset("tiny"));
  j["image_size"] = std::vector<int>(100000, 7);
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("image_size must be [H, W], got an array of 100000 values"), Error);
  j["image_size"] = std::vector<int>{7, 7, 7};  // small: as written
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("got [7,7,7]"), Error);
  CHECK_THROWS_WITH_AS(config_from_json_string(to_json(preset("tiny")).dump() + std::string(1, '\0') + "}"),
                       doctest::Contains("NUL"), Error);
}

TEST_CASE("config: routing groups of pairs under the same capacity rule; nested keys and loss weights named") {
  // A pair is P tokens (its image's patches and its text); top-1 over E experts: a group of g pairs has
  // g P f / E slots per expert at factor f.
  ModelConfig c = preset("tiny");
  const index_t P = c.num_patches() + c.text_len;
  const int E = c.experts;
  REQUIRE(c.top_k == 1);
  c.group_pairs = 1;
  c.router.capacity_factor_train = static_cast<double>(E) / P;  // exactly one slot
  CHECK_NOTHROW(c.validate());
  c.router.capacity_factor_train = 0.5 * E / P;  // half a slot
  const std::string want =
      "routing groups of group_pairs = 1 pairs (" + std::to_string(P) + " tokens) give each of the " + std::to_string(E) + " experts";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains(want.c_str()), Error);
  c.group_pairs = 2;  // two pairs: one slot
  CHECK_NOTHROW(c.validate());
  c.router.capacity_factor_train = 0;  // no drop: any group
  c.group_pairs = 1;
  c.router.capacity_factor_eval = 0.5 * E / P;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("raise router.capacity_factor_eval or group_pairs"), Error);
  auto j = to_json(preset("tiny"));
  j["router"]["bpr"] = "yes";
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("key \"router.bpr\" has the wrong type"), Error);
  j = to_json(preset("tiny"));
  j["router"]["group_size"] = -1;
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("key \"router.group_size\" = -1 is out of range"), Error);
  j = to_json(preset("tiny"));
  j["aux_loss"] = {{"load", -1.0}};
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("aux_loss.load (a loss weight) must be finite and >= 0, got -1"), Error);
  j = to_json(preset("tiny"));
  j["aux_loss"] = {{"tau_txt", -0.69}};
  CHECK_THROWS_WITH_AS(config_from_json(j), doctest::Contains("aux_loss.tau_txt (the global entropy's target, in nats) "
                                                              "must be finite and >= 0, got -0.69"), Error);
  j["aux_loss"] = {{"tau_txt", 0.0}};  // 0: the term is 0 for any routing, allowed (as a weight of 0 is)
  CHECK_NOTHROW(config_from_json(j));
  ModelConfig in_code = preset("tiny");
  in_code.aux.global_entropy_tau[0] = -1;
  CHECK_THROWS_WITH_AS(in_code.validate(), doctest::Contains("global_entropy_tau[0] must be finite and >= 0"), Error);
}

TEST_CASE("config JSON: a key given twice in one object is refused, naming it") {
  const std::string tiny = to_json(preset("tiny")).dump();
  CHECK_NOTHROW(config_from_json_string(tiny));
  // At the top level, and inside the router's object.
  std::string text = tiny;
  text.insert(1, "\"width\": 64, ");
  CHECK_THROWS_WITH_AS(config_from_json_string(text), doctest::Contains("\"width\" appears twice"), Error);
  text = tiny;
  text.insert(text.find("\"router\":{") + 10, "\"bpr\": false, ");
  CHECK_THROWS_WITH_AS(config_from_json_string(text), doctest::Contains("\"bpr\" appears twice"), Error);
}

TEST_CASE("config JSON: unknown keys name the nearest valid key; out-of-range numbers are rejected by name") {
  const auto base = to_json(preset("tiny"));
  auto error_of = [](const nlohmann::json& j) -> std::string {
    try {
      config_from_json(j);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  CHECK(error_of(base).empty());
  auto j = base;
  j["widht"] = 64;
  std::string e = error_of(j);
  CHECK_MESSAGE(e.find("unknown key \"widht\"") != std::string::npos, e);
  CHECK_MESSAGE(e.find("did you mean \"width\"") != std::string::npos, e);
  j = base;
  j["router"]["capacity_factor"] = 1.0;
  e = error_of(j);
  CHECK_MESSAGE(e.find("unknown key \"capacity_factor\" in \"router\"") != std::string::npos, e);
  CHECK_MESSAGE(e.find("did you mean \"capacity_factor_") != std::string::npos, e);
  j = base;
  j["aux_loss"]["zloss"] = 0.1;
  e = error_of(j);
  CHECK_MESSAGE(e.find("did you mean \"z_loss\"") != std::string::npos, e);

  j = base;
  j["width"] = std::int64_t{1} << 40;  // would wrap to 0 as an int
  e = error_of(j);
  CHECK_MESSAGE(e.find("\"width\" = 1099511627776 is out of range") != std::string::npos, e);
  j = base;
  j["experts"] = 1 << 30;
  e = error_of(j);
  CHECK_MESSAGE(e.find("\"experts\"") != std::string::npos, e);
  CHECK_MESSAGE(e.find("out of range") != std::string::npos, e);
  j = base;
  j["depth"] = -3;
  CHECK(error_of(j).find("\"depth\" = -3 is out of range") != std::string::npos);
  j = base;
  j["heads"] = 2.5;
  CHECK(error_of(j).find("\"heads\" must be an integer") != std::string::npos);
  j = base;
  j["image_size"] = {28, std::uint64_t{1} << 63};
  CHECK(error_of(j).find("image_size[1]") != std::string::npos);
  // Every size in range, the whole model far too large: rejected before any allocation.
  j = base;
  j["width"] = 65536;
  j["heads"] = 1;
  j["mlp_dim"] = 1 << 24;
  j["proj_dim"] = 8;
  e = error_of(j);
  CHECK_MESSAGE(e.find("parameters") != std::string::npos, e);
  CHECK_MESSAGE(e.find("limit") != std::string::npos, e);
}

namespace {
// B images (normal, scale 0.5) and B texts of valid ids for a model of config c.
template <class T>
std::pair<Tensor<T>, Tensor<std::int32_t>> tiny_inputs(const ModelConfig& c, index_t B) {
  Tensor<T> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});
  testing::fill_normal(images.view(), 11, 0.5);
  Tensor<std::int32_t> texts(Shape{B, c.text_len});
  for (index_t i = 0; i < texts.numel(); ++i) texts[i] = static_cast<std::int32_t>(3 + (i * 7) % (c.vocab_size - 3));
  return {std::move(images), std::move(texts)};
}
}  // namespace

TEST_CASE("evaluation keeps no tape: backward after an evaluation forward is an error; eval output unchanged") {
  ModelConfig c = preset("tiny");
  c.router.noise_std = 0;
  c.router.capacity_factor_eval = c.router.capacity_factor_train;  // the same routing in both modes
  Limoe<double> m(c);
  m.init(3);
  const auto [images, texts] = tiny_inputs<double>(c, 3);
  // Training forward (tape kept) and evaluation forward (no tape) compute the same embeddings when routing is
  // the same: the shared scratch must not change the values. The towers give the same bits (the same routes);
  // the `map` heads of an evaluation forward fold the probe's query into the key and value weights
  // (MapHeadCache::inference), the same function summed in another order: within 1e-12 in double.
  const auto ft = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  const auto fe = m.forward(images.cview(), texts.cview(), Mode::Eval);
  REQUIRE(c.pool_img == Pooling::Map);
  for (index_t i = 0; i < ft.img_emb.numel(); ++i) CHECK(fe.img_emb[i] == doctest::Approx(ft.img_emb[i]).epsilon(1e-12));
  for (index_t i = 0; i < ft.txt_emb.numel(); ++i) CHECK(fe.txt_emb[i] == doctest::Approx(ft.txt_emb[i]).epsilon(1e-12));
  REQUIRE(fe.routes.size() == ft.routes.size());
  for (std::size_t b = 0; b < fe.routes.size(); ++b)
    for (index_t i = 0; i < ft.routes[b].numel(); ++i) CHECK(fe.routes[b][i] == ft.routes[b][i]);
  m.loss(fe);
  CHECK_THROWS_WITH_AS(m.backward(fe), doctest::Contains("evaluation mode"), Error);
  // An output of an earlier forward is refused: the model holds the activations of its last call only.
  CHECK(fe.generation == ft.generation + 1);
  CHECK_THROWS_WITH_AS(m.loss(ft), doctest::Contains("holds the activations of call"), Error);
  CHECK_THROWS_WITH_AS(m.backward_from(ft, ft.img_emb.cview(), ft.txt_emb.cview()),
                       doctest::Contains("pass the output of the last forward()"), Error);
  // A training forward after evaluation ones gives the gradients of a fresh model.
  Limoe<double> fresh(c);
  fresh.init(3);
  for (Limoe<double>* p : {&m, &fresh}) {
    p->zero_grad();
    const auto f = p->forward(images.cview(), texts.cview(), Mode::Train, 0);
    p->loss(f);
    p->backward(f);
  }
  for (index_t i = 0; i < m.params().size(); ++i) REQUIRE(m.params().grads()[i] == fresh.params().grads()[i]);
}

TEST_CASE("profile: a training step's ops are regions, counted per call, their self times within the wall time") {
  ModelConfig c = preset("tiny");
  Limoe<float> m(c);
  m.init(3);
  const auto [images, texts] = tiny_inputs<float>(c, 4);
  profile::Profiler prof;
  (void)m.forward(images.cview(), texts.cview(), Mode::Eval);  // no session: nothing recorded
  CHECK(prof.totals().empty());
  double wall = 0;
  {
    const auto t0 = std::chrono::steady_clock::now();
    profile::Session on(prof);
    CHECK_THROWS_WITH_AS(profile::Session{prof}, doctest::Contains("another session"), Error);
    m.zero_grad();
    const auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
    (void)m.loss(f);
    m.backward(f);
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const auto totals = prof.totals();
  std::map<std::string, std::int64_t> calls;
  double self = 0;
  for (std::size_t i = 0; i < totals.size(); ++i) {
    calls[totals[i].path] = totals[i].calls;
    self += totals[i].seconds;
    CHECK(totals[i].seconds >= 0);
    if (i > 0) CHECK(totals[i - 1].seconds >= totals[i].seconds);  // largest first
  }
  CHECK(self <= wall);
  CHECK(self == doctest::Approx(prof.seconds()));
  // Forward and backward ops in pairs; the MoE layer's parts under it, once per call of the layer.
  const auto moe_blocks = static_cast<std::int64_t>(c.moe_blocks.size());
  CHECK(calls["self_attention_forward"] >= c.depth);
  CHECK(calls["self_attention_forward"] == calls["self_attention_backward"]);
  CHECK(calls["self_attention_forward/heads"] == calls["self_attention_forward"]);
  CHECK(calls["layernorm_forward"] == calls["layernorm_backward"]);
  CHECK(calls["moe_forward"] >= moe_blocks);
  CHECK(calls["moe_forward"] == calls["moe_backward"]);
  for (const char* part : {"route", "losses", "statistics", "make_dispatch_plan", "dispatch_forward", "expert_mlp_forward",
                           "combine_forward"})
    CHECK_MESSAGE(calls[std::string("moe_forward/") + part] == calls["moe_forward"], part);
  for (const char* part : {"combine_backward", "expert_mlp_backward", "dispatch_backward"})
    CHECK_MESSAGE(calls[std::string("moe_backward/") + part] == calls["moe_backward"], part);
  CHECK(calls.count("expert_mlp_forward") == 0);  // only inside the layer
  CHECK(calls["contrastive_forward"] == 1);
  CHECK(calls["contrastive_backward"] == 1);
  CHECK(calls["zero_grad"] == 1);
}

TEST_CASE("the capacity factor is an argument of a forward call: the same as a model configured with it") {
  ModelConfig c = preset("tiny");
  c.router.noise_std = 0;
  Limoe<double> m(c);
  m.init(4);
  ModelConfig c2 = c;
  c2.router.capacity_factor_eval = 0.5;
  Limoe<double> m2(c2);
  m2.init(4);
  const index_t B = 4;
  Tensor<double> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});
  testing::fill_normal(images.view(), 12, 0.5);
  const auto none = m.forward(images.cview(), {}, Mode::Eval);             // the config's factor 0: no drop
  const auto half = m.forward(images.cview(), {}, Mode::Eval, 0, 0.5);     // this call only
  const auto cfgd = m2.forward(images.cview(), {}, Mode::Eval);
  index_t dropped_none = 0, dropped_half = 0;
  for (index_t i = 0; i < none.routes[0].numel(); ++i) dropped_none += none.routes[0][i] < 0;
  for (index_t i = 0; i < half.routes[0].numel(); ++i) {
    dropped_half += half.routes[0][i] < 0;
    CHECK(half.routes[0][i] == cfgd.routes[0][i]);
  }
  CHECK(dropped_none == 0);
  CHECK(dropped_half > 0);
  for (index_t i = 0; i < half.img_emb.numel(); ++i) CHECK(half.img_emb[i] == cfgd.img_emb[i]);
  const auto again = m.forward(images.cview(), {}, Mode::Eval);  // the override does not stick
  for (index_t i = 0; i < again.img_emb.numel(); ++i) CHECK(again.img_emb[i] == none.img_emb[i]);
  CHECK_THROWS_WITH_AS(m.forward(images.cview(), {}, Mode::Eval, 0, -1.0), doctest::Contains("capacity factor"), Error);
}

TEST_CASE("masked routing: padding text tokens take no part in routing (route_padding false); old configs route them") {
  ModelConfig c = preset("tiny");
  c.text_mask = true;
  c.router.noise_std = 0;
  c.router.capacity_factor_train = 0.8;  // drops: padding would compete for the experts' slots
  CHECK_FALSE(c.route_padding);          // the default of a new config
  const index_t B = 4, L = c.text_len, Ni = B * c.num_patches();
  Tensor<double> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});
  testing::fill_normal(images.view(), 13, 0.5);
  Tensor<std::int32_t> texts(Shape{B, L});
  index_t pads = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < L; ++i) {
      const bool word = i < 3 + 2 * b;
      texts[b * L + i] = word ? static_cast<std::int32_t>(3 + (b * 5 + i * 7) % (c.vocab_size - 3)) : c.pad_id;
      pads += !word;
    }
  // Changing the padding's own values (its row of the token table) changes nothing else when padding is
  // neither attended to (text_mask) nor routed; routed, it competes for capacity and moves other tokens.
  auto run = [&](bool route_padding, double pad_row) {
    ModelConfig cc = c;
    cc.route_padding = route_padding;
    Limoe<double> m(cc);
    m.init(5);
    auto table = m.params().value(m.params().get("txt.embed"));
    for (index_t d = 0; d < cc.width; ++d) table[cc.pad_id * cc.width + d] = pad_row * (d % 3 == 0 ? 1 : -1);
    return m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  };
  const auto a = run(false, 0.5), b = run(false, -2.0);
  for (index_t i = 0; i < a.img_emb.numel(); ++i) REQUIRE(a.img_emb[i] == b.img_emb[i]);
  for (index_t i = 0; i < a.txt_emb.numel(); ++i) REQUIRE(a.txt_emb[i] == b.txt_emb[i]);
  REQUIRE(a.stats.size() == 1);
  CHECK(a.stats[0].padding == pads);
  CHECK(a.stats[0].tokens[kText] == B * L - pads);
  for (index_t t = 0; t < B * L; ++t)
    if (texts[t] == c.pad_id) CHECK(a.routes[0][Ni + t] == -1);
  const auto ra = run(true, 0.5), rb = run(true, -2.0);
  CHECK(ra.stats[0].padding == 0);
  double moved = 0;
  for (index_t i = 0; i < ra.img_emb.numel(); ++i) moved += std::abs(ra.img_emb[i] - rb.img_emb[i]);
  CHECK(moved > 0);
  // The JSON form: written always; absent (a checkpoint from before masked routing) reads as routed padding.
  CHECK(to_json(c)["route_padding"] == false);
  auto j = to_json(c);
  j.erase("route_padding");
  CHECK(config_from_json(j).route_padding);
  j["route_padding"] = false;
  CHECK_FALSE(config_from_json(j).route_padding);
}

TEST_CASE("two towers: each modality runs its own blocks, as a one-tower dense model would with that tower's weights") {
  ModelConfig c = two_tower_variant(preset("tiny"));
  c.text_mask = true;
  CHECK(c.towers == 2);
  CHECK(c.moe_blocks.empty());
  const index_t B = 3, L = c.text_len;
  Tensor<double> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});
  testing::fill_normal(images.view(), 21, 0.5);
  Tensor<std::int32_t> texts(Shape{B, L});
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < L; ++i)
      texts[b * L + i] = i < 4 + 3 * b ? static_cast<std::int32_t>(3 + (b * 5 + i * 7) % (c.vocab_size - 3)) : c.pad_id;

  Limoe<double> m(c);
  m.init(6);
  CHECK(m.params().size() == count_params(c).total);
  CHECK(count_params(c).per_token == count_params(dense_variant(preset("tiny"))).per_token);  // equal compute
  // The one-tower dense models holding the image tower's and the text tower's weights.
  const ModelConfig one = dense_variant(preset("tiny"));
  ModelConfig one_masked = one;
  one_masked.text_mask = true;
  Limoe<double> img_model(one_masked), txt_model(one_masked);
  auto& ps = m.params();
  for (const auto& e : img_model.params().entries()) {
    auto dst_i = img_model.params().value(img_model.params().get(e.name));
    auto dst_t = txt_model.params().value(txt_model.params().get(e.name));
    const auto src_i = ps.value(ps.get(e.name));
    // Block and final-norm weights of the text tower live under "txt."; everything else is shared.
    const bool tower = e.name.rfind("blocks.", 0) == 0 || e.name.rfind("norm.", 0) == 0;
    const auto src_t = tower ? ps.value(ps.get("txt." + e.name)) : src_i;
    REQUIRE(src_t.numel() == dst_t.numel());
    std::copy_n(src_i.data(), src_i.numel(), dst_i.data());
    std::copy_n(src_t.data(), src_t.numel(), dst_t.data());
  }
  const auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  const auto fi = img_model.forward(images.cview(), {}, Mode::Train, 0);
  const auto ft = txt_model.forward({}, texts.cview(), Mode::Train, 0);
  for (index_t i = 0; i < f.img_emb.numel(); ++i) REQUIRE(f.img_emb[i] == doctest::Approx(fi.img_emb[i]).epsilon(1e-12));
  for (index_t i = 0; i < f.txt_emb.numel(); ++i) REQUIRE(f.txt_emb[i] == doctest::Approx(ft.txt_emb[i]).epsilon(1e-12));
  // The text tower differs from the image tower (init draws each tensor separately), so sharing would show.
  {
    const auto g = img_model.forward({}, texts.cview(), Mode::Eval);
    double differ = 0;
    for (index_t i = 0; i < f.txt_emb.numel(); ++i) differ += std::abs(g.txt_emb[i] - f.txt_emb[i]);
    CHECK(differ > 1e-6);
  }

  // Gradients from given embedding gradients: each tower's equal the matching one-tower model's.
  const auto dzi = testing::randn<double>(f.img_emb.shape(), 31), dzt = testing::randn<double>(f.txt_emb.shape(), 32);
  m.zero_grad(), img_model.zero_grad(), txt_model.zero_grad();
  m.backward_from(f, dzi.cview(), dzt.cview());
  const auto fi2 = img_model.forward(images.cview(), {}, Mode::Train, 0);
  img_model.backward_from(fi2, dzi.cview(), {});
  const auto ft2 = txt_model.forward({}, texts.cview(), Mode::Train, 0);
  txt_model.backward_from(ft2, {}, dzt.cview());
  for (const auto& e : img_model.params().entries()) {
    const bool tower = e.name.rfind("blocks.", 0) == 0 || e.name.rfind("norm.", 0) == 0;
    const auto gi = img_model.params().grad(img_model.params().get(e.name));
    const auto gt = txt_model.params().grad(txt_model.params().get(e.name));
    const auto gm = ps.grad(ps.get(e.name));
    for (index_t k = 0; k < gm.numel(); ++k) {
      // Shared tensors (embeddings, heads) get the sum of both models' gradients; tower tensors each their own.
      const double want = tower ? gi[k] : gi[k] + gt[k];
      REQUIRE_MESSAGE(gm[k] == doctest::Approx(want).epsilon(1e-10).scale(1e-12), e.name, "[", k, "]");
      if (tower) {
        const double got_t = ps.grad(ps.get("txt." + e.name))[k];
        REQUIRE_MESSAGE(got_t == doctest::Approx(gt[k]).epsilon(1e-10).scale(1e-12), "txt.", e.name, "[", k, "]");
      }
    }
  }

  // The contrastive loss's gradient of text-tower entries against central differences.
  m.zero_grad();
  auto fl = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  m.loss(fl);
  m.backward(fl);
  for (const char* name : {"txt.blocks.0.ln1.weight", "txt.blocks.1.mlp.fc1.weight", "txt.blocks.1.attn.v.weight",
                           "txt.norm.bias", "blocks.1.mlp.fc2.weight"}) {
    auto v = ps.value(ps.get(name));
    const auto g = ps.grad(ps.get(name));
    std::vector<double> analytic;
    std::vector<double*> picked;
    for (index_t k = 0; k < v.numel(); k += std::max<index_t>(1, v.numel() / 12)) {
      picked.push_back(v.data() + k);
      analytic.push_back(g[k]);
    }
    std::vector<double> x(picked.size());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = *picked[i];
    auto loss = [&] {
      for (std::size_t i = 0; i < x.size(); ++i) *picked[i] = x[i];
      const auto fo = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
      return m.loss(fo).total;
    };
    const auto r = testing::check_gradient(std::span<double>(x), std::span<const double>(analytic), loss, 1e-5);
    for (std::size_t i = 0; i < x.size(); ++i) *picked[i] = x[i];
    CHECK_MESSAGE(r.rel_error < 1e-6, name, ": ", r.str());
  }

  // The config: written only when 2, absent reads as 1; impossible settings are errors.
  CHECK(to_json(c)["towers"] == 2);
  CHECK_FALSE(to_json(one).contains("towers"));
  CHECK(config_from_json(to_json(c)).towers == 2);
  ModelConfig bad = preset("tiny");
  bad.towers = 2;  // MoE blocks in a two-tower config
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("two-tower model (towers 2) has dense blocks only"), Error);
  bad.towers = 3;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("towers must be 1"), Error);
}

TEST_CASE("backward reports where the gradient is final: nothing it reports changes later in the pass") {
  // The data-parallel trainer sums each reported part over the ranks while backward goes on, so a part reported
  // too early would be summed before its last contribution. Every report's part is copied at once and compared
  // with the gradient after the pass, on a one-tower MoE model and on a two-tower model (whose text blocks come
  // after the heads' norm in the store).
  for (const bool two : {false, true}) {
    CAPTURE(two);
    ModelConfig c = two ? two_tower_variant(preset("tiny")) : preset("tiny");
    c.text_mask = two;
    Limoe<double> m(c);
    m.init(5);
    const index_t B = 3, N = m.params().size();
    Tensor<double> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});
    testing::fill_normal(images.view(), 13, 0.5);
    Tensor<std::int32_t> texts(Shape{B, c.text_len});
    for (index_t i = 0; i < texts.numel(); ++i) texts[i] = static_cast<std::int32_t>(3 + (i * 5) % (c.vocab_size - 3));
    m.zero_grad();
    const auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 2);
    m.loss(f);
    std::vector<std::pair<index_t, std::vector<double>>> reports;
    m.backward(f, [&](index_t first) {
      const double* g = std::as_const(m.params()).grads().data();
      reports.emplace_back(first, std::vector<double>(g + first, g + N));
    });
    REQUIRE(reports.size() == static_cast<std::size_t>(c.depth) + 2);  // heads, every block, the embeddings
    CHECK(reports.back().first == 0);
    CHECK(reports.front().first < N);  // the heads' part is reported before the blocks
    CHECK(reports[1].first < reports.front().first);
    const double* g = std::as_const(m.params()).grads().data();
    for (std::size_t k = 0; k < reports.size(); ++k) {
      if (k > 0) CHECK(reports[k].first <= reports[k - 1].first);
      const auto& [first, part] = reports[k];
      index_t changed = 0;
      for (index_t i = first; i < N; ++i) changed += part[static_cast<std::size_t>(i - first)] != g[i];
      CHECK_MESSAGE(changed == 0, "report ", k, " (from ", first, "): ", changed, " elements changed afterwards");
    }
    // The parts are not trivially final: the embeddings' gradient is written last.
    const auto emb = m.params().entry(m.params().get("txt.embed"));
    index_t nonzero = 0;
    for (index_t i = 0; i < emb.shape.numel(); ++i) nonzero += g[emb.offset + i] != 0;
    CHECK(nonzero > 0);
    CHECK(reports[static_cast<std::size_t>(c.depth)].first >= emb.offset + emb.shape.numel());
  }
}
