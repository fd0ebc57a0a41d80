// MoE auxiliary losses (LIMOE.md section 4): the section 8 values, absent modalities, and each term's
// gradient wrt the router logits against central differences in double.
#include <doctest/doctest.h>

#include "test_moe_common.hpp"

using namespace moe_test;

namespace {
// Loss terms on one group from explicit logits (and fixed noise for the load loss).
struct Group {
  index_t S;
  int E, K;
  std::vector<double> logits, noise, noisy, probs;
  std::vector<std::int32_t> choice;
  std::vector<std::uint8_t> mod;
  bool noise_active = false;
  double sigma = 0;
  void refresh() {
    noisy.resize(S * E), probs.resize(S * E), choice.resize(S * K);
    if (noise.empty()) noise.assign(S * E, 0.0);
    for (index_t s = 0; s < S; ++s) {
      for (int e = 0; e < E; ++e) noisy[s * E + e] = logits[s * E + e] + noise[s * E + e];
      limoe::moe::detail::softmax_row(logits.data() + s * E, E, probs.data() + s * E);
      std::vector<double> gn(E);
      limoe::moe::detail::softmax_row(noisy.data() + s * E, E, gn.data());
      limoe::moe::detail::select_top_k<0>(gn.data(), E, K, choice.data() + s * K);
    }
  }
  template <class Losses>
  AuxLossValues eval(const AuxLossConfig& c, double* dl) {
    refresh();
    LossGroup<double> g;
    g.S = S, g.E = E, g.K = K, g.logits = logits.data(), g.noisy = noisy.data(), g.probs = probs.data();
    g.choice = choice.data(), g.modality = mod.data(), g.noise_active = noise_active, g.sigma = sigma;
    AuxLossValues v;
    Losses::template accumulate<double>(g, c, v, dl);
    return v;
  }
};
Group make_group(index_t S, int E, int K, std::uint64_t seed, double scale = 1.0) {
  Group g{S, E, K, {}, {}, {}, {}, {}, {}};
  g.logits.resize(S * E);
  testing::fill_normal(View<double>(g.logits.data(), Shape{S * E}), seed, scale);
  g.mod.assign(S, kImage);
  return g;
}
AuxLossConfig all_weights_one() {
  AuxLossConfig c;
  c.importance_weight = c.load_weight = c.z_loss_weight = 1;
  c.local_entropy_weight = {1, 1};
  c.global_entropy_weight = {1, 1};
  c.global_entropy_tau = {std::log(8.0), std::log(8.0)};  // above H(pbar): the hinge is active
  return c;
}
}  // namespace

TEST_CASE("uniform gates: importance 0, local entropy log E") {
  auto g = make_group(16, 8, 1, 1, 0.0);  // all logits 0
  const auto v = g.eval<DefaultAuxLosses>(AuxLossConfig{}, nullptr);
  CHECK(v.importance == doctest::Approx(0).epsilon(1e-12));
  CHECK(v.local_entropy[kImage] == doctest::Approx(2.0794415416798357));
  CHECK(v.global_entropy[kImage] == 0.0);  // H(pbar) = log 8 > tau = log 4
  CHECK(v.local_entropy[kText] == 0.0);    // absent modality
  CHECK(v.load == 0.0);                    // no noise
}

TEST_CASE("one-hot on one expert: importance E - 1, local entropy 0, global term tau") {
  auto g = make_group(16, 8, 1, 1, 0.0);
  for (index_t s = 0; s < 16; ++s) g.logits[s * 8 + 3] = 60.0;
  for (index_t s = 8; s < 16; ++s) g.mod[s] = kText;
  const auto v = g.eval<DefaultAuxLosses>(AuxLossConfig{}, nullptr);
  CHECK(v.importance == doctest::Approx(7.0));
  CHECK(v.local_entropy[kImage] == doctest::Approx(0).epsilon(1e-12));
  CHECK(v.local_entropy[kText] == doctest::Approx(0).epsilon(1e-12));
  CHECK(v.global_entropy[kImage] == doctest::Approx(std::log(4.0)));
  CHECK(v.global_entropy[kText] == doctest::Approx(std::log(2.0)));
  const AuxLossConfig c;
  CHECK(v.total == doctest::Approx(c.importance_weight * 7 + 0.01 * std::log(4.0) + 0.01 * std::log(2.0)));
}

TEST_CASE("one-hot spread evenly over E experts: H(pbar) = log E") {
  auto g = make_group(24, 8, 1, 1, 0.0);
  for (index_t s = 0; s < 24; ++s) g.logits[s * 8 + s % 8] = 60.0;
  AuxLossConfig c;
  c.global_entropy_tau = {std::log(8.0) + 0.5, 0.0};  // term = tau - H(pbar) = 0.5 exactly when H = log 8
  const auto v = g.eval<DefaultAuxLosses>(c, nullptr);
  CHECK(v.global_entropy[kImage] == doctest::Approx(0.5));
  CHECK(v.importance == doctest::Approx(0).epsilon(1e-12));
  // Through the layer's statistics too (raw H, all tokens of the call).
  Fixture<double> f(8, 8, 4, 1);
  Tensor<double> x(Shape{24, 8}), y(Shape{24, 8});
  for (index_t t = 0; t < 24; ++t) x[t * 8 + t % 8] = 1;
  for (index_t e = 0; e < 8; ++e)
    for (index_t d = 0; d < 8; ++d) f.wr[e * 8 + d] = e == d ? 60.0 : 0.0;
  MoeContext<double> ctx;
  moe_forward<double>(config(8, 1, 1.0, 0.0, true, 0.0), f.params(), x.view(), {}, Mode::Eval, Rng(0), y.view(), ctx);
  CHECK(ctx.stats.global_entropy[kImage] == doctest::Approx(std::log(8.0)));
  CHECK(ctx.stats.local_entropy[kImage] == doctest::Approx(0).epsilon(1e-12));
  CHECK(ctx.stats.drop_fraction[kImage] == 0.0);
  for (index_t e = 0; e < 8; ++e) CHECK(ctx.stats.routed[kImage][e] == 3);
}

TEST_CASE("absent modality contributes 0, not NaN, to value and gradient") {
  auto g = make_group(10, 4, 2, 3);
  std::vector<double> dl(40, 0.0);
  const auto v = g.eval<DefaultAuxLosses>(all_weights_one(), dl.data());
  CHECK(v.local_entropy[kText] == 0.0);
  CHECK(v.global_entropy[kText] == 0.0);
  CHECK(std::isfinite(v.total));
  for (double d : dl) CHECK(std::isfinite(d));
  // Only text tokens: the image terms are 0.
  std::fill(g.mod.begin(), g.mod.end(), kText);
  const auto w = g.eval<DefaultAuxLosses>(all_weights_one(), nullptr);
  CHECK(w.local_entropy[kImage] == 0.0);
  CHECK(w.local_entropy[kText] > 0.0);
  // Underflowing gates (G = 0 exactly in double) stay finite.
  auto h = make_group(4, 4, 1, 5, 0.0);
  for (index_t s = 0; s < 4; ++s) h.logits[s * 4] = 2000.0;
  std::vector<double> dh(16, 0.0);
  const auto u = h.eval<DefaultAuxLosses>(all_weights_one(), dh.data());
  CHECK(std::isfinite(u.total));
  for (double d : dh) CHECK(std::isfinite(d));
}

TEST_CASE_TEMPLATE("each loss term's gradient wrt the logits matches central differences", L, ImportanceLoss,
                   LoadLoss, LocalEntropyLoss, GlobalEntropyLoss, ZLoss, DefaultAuxLosses) {
  for (int K : {1, 2}) {
    auto g = make_group(12, 5, K, 40 + K);
    for (index_t s = 7; s < 12; ++s) g.mod[s] = kText;
    g.noise.resize(12 * 5);
    testing::fill_normal(View<double>(g.noise.data(), Shape{60}), 99, 0.2);
    g.noise_active = true, g.sigma = 0.2;
    const auto c = all_weights_one();
    std::vector<double> dl(60, 0.0);
    const auto v = g.eval<L>(c, dl.data());
    CHECK(std::isfinite(v.total));
    const auto choice0 = g.choice;
    auto r = testing::check_gradient(std::span<double>(g.logits), std::span<const double>(dl), [&] {
      return g.eval<L>(c, nullptr).total;
    });
    CHECK(g.choice == choice0);  // the perturbations never changed the top-K (no near ties)
    INFO(r.str());
    CHECK(r.rel_error < 1e-7);
  }
}
