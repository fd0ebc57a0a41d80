// MoE auxiliary losses (semantics §4): the section 8 values, absent modalities, and each term's
// gradient wrt the router logits against central differences in double.
#include <doctest/doctest.h>

#include <array>
#include <functional>

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
      limoe::math::softmax_row(logits.data() + s * E, E, probs.data() + s * E);
      std::vector<double> gn(E);
      limoe::math::softmax_row(noisy.data() + s * E, E, gn.data());
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

// ---- hand-computed values per term, the weighted total, and descent per term --------------------------------
//
// Everything below builds the loss inputs and the expected values with naive loops written here (own softmax,
// own top-K, Phi through std::erfc), never with the library's detail:: helpers.
namespace {
std::vector<double> naive_softmax(const double* x, int E) {
  double mx = x[0];
  for (int e = 1; e < E; ++e) mx = std::max(mx, x[e]);
  std::vector<double> p(E);
  double s = 0;
  for (int e = 0; e < E; ++e) s += (p[e] = std::exp(x[e] - mx));
  for (auto& v : p) v /= s;
  return p;
}
double naive_entropy(const std::vector<double>& p) {
  double H = 0;
  for (double v : p)
    if (v > 0) H -= v * std::log(v);
  return H;
}
double naive_cv2(const std::vector<double>& v) {  // (std / mean)^2, population std
  double mean = 0;
  for (double a : v) mean += a;
  mean /= static_cast<double>(v.size());
  double var = 0;
  for (double a : v) var += (a - mean) * (a - mean);
  var /= static_cast<double>(v.size());
  return var / (mean * mean);
}
double Phi(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }  // standard normal CDF

struct NaiveTerms {
  double importance = 0, load = 0, z = 0;
  std::array<double, 2> local{}, global{}, H_pbar{};
  std::array<index_t, 2> n{};
};
// The spec's formulas on one group: logits [S, E], noisy [S, E], modality [S].
NaiveTerms naive_terms(index_t S, int E, int K, const double* logits, const double* noisy, const std::uint8_t* mod,
                       bool noise_active, double sigma, std::array<double, 2> tau) {
  NaiveTerms t;
  std::vector<double> imp(E, 0.0), load(E, 0.0);
  std::array<std::vector<double>, 2> pbar{std::vector<double>(E, 0.0), std::vector<double>(E, 0.0)};
  std::array<double, 2> hsum{};
  for (index_t s = 0; s < S; ++s) {
    const auto G = naive_softmax(logits + s * E, E);
    const int m = mod[s] ? 1 : 0;
    ++t.n[m];
    hsum[m] += naive_entropy(G);
    for (int e = 0; e < E; ++e) imp[e] += G[e], pbar[m][e] += G[e];
    double mx = logits[s * E];
    for (int e = 1; e < E; ++e) mx = std::max(mx, logits[s * E + e]);
    double se = 0;
    for (int e = 0; e < E; ++e) se += std::exp(logits[s * E + e] - mx);
    const double lse = mx + std::log(se);
    t.z += lse * lse / static_cast<double>(S);
    if (noise_active) {
      std::vector<double> row(noisy + s * E, noisy + (s + 1) * E);
      std::sort(row.begin(), row.end(), std::greater<>());
      const double thr = row[K - 1];  // K-th largest noisy logit
      for (int e = 0; e < E; ++e) load[e] += (1.0 - Phi((thr - logits[s * E + e]) / sigma)) / static_cast<double>(S);
    }
  }
  t.importance = naive_cv2(imp);
  t.load = noise_active ? naive_cv2(load) : 0.0;
  for (int m = 0; m < 2; ++m) {
    if (t.n[m] == 0) continue;
    t.local[m] = hsum[m] / static_cast<double>(t.n[m]);
    for (auto& v : pbar[m]) v /= static_cast<double>(t.n[m]);
    t.H_pbar[m] = naive_entropy(pbar[m]);
    t.global[m] = std::max(0.0, tau[m] - t.H_pbar[m]);
  }
  return t;
}

// One group with explicit logits and noise; the LossGroup inputs are built naively here.
struct NGroup {
  index_t S;
  int E, K;
  std::vector<double> logits, noise;
  std::vector<std::uint8_t> mod;
  bool noise_active = true;
  double sigma = 0.3;
  std::vector<double> noisy, probs;
  std::vector<std::int32_t> choice;
  NGroup(index_t S_, int E_, int K_) : S(S_), E(E_), K(K_) {}
  void build() {
    noisy.assign(S * E, 0.0), probs.assign(S * E, 0.0), choice.assign(S * K, -1);
    for (index_t s = 0; s < S; ++s) {
      for (int e = 0; e < E; ++e) noisy[s * E + e] = logits[s * E + e] + (noise_active ? noise[s * E + e] : 0.0);
      const auto G = naive_softmax(logits.data() + s * E, E);
      std::copy(G.begin(), G.end(), probs.begin() + s * E);
      std::vector<int> idx(E);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return noisy[s * E + a] > noisy[s * E + b]; });
      for (int k = 0; k < K; ++k) choice[s * K + k] = idx[k];
    }
  }
  AuxLossValues run(const AuxLossConfig& c, double* dl) {
    build();
    LossGroup<double> g;
    g.S = S, g.E = E, g.K = K, g.logits = logits.data(), g.noisy = noisy.data(), g.probs = probs.data();
    g.choice = choice.data(), g.modality = mod.data(), g.noise_active = noise_active, g.sigma = sigma;
    AuxLossValues v;
    DefaultAuxLosses::accumulate<double>(g, c, v, dl);
    return v;
  }
  NaiveTerms naive(std::array<double, 2> tau) {
    build();
    return naive_terms(S, E, K, logits.data(), noisy.data(), mod.data(), noise_active, sigma, tau);
  }
};
// S = 6 tokens (0-3 image, 4-5 text), E = 4; the noise changes token 3's top-1 (clean e0, noisy e1) and is
// non-zero at every token's first and second choice, so a clean-logit threshold gives another load.
NGroup hand_group(int K) {
  NGroup g(6, 4, K);
  g.logits = {1.2, -0.3, 0.5, 0.1,   //
              0.2, 0.9,  -0.7, 0.4,  //
              -0.5, 0.3, 1.1, 0.0,   //
              0.8, 0.6,  -0.2, -1.0, //
              0.1, -0.4, 0.3, 1.3,   //
              2.0, 0.2,  -0.6, 0.7};
  g.noise = {0.25, -0.10, 0.40, -0.05,  //
             -0.30, 0.15, 0.05, 0.35,   //
             0.10, 0.45,  -0.20, 0.30,  //
             -0.35, 0.20, 0.15, -0.25,  //
             0.05, 0.30,  0.50, -0.40,  //
             -0.20, 0.10, 0.25, 0.45};
  g.mod = {kImage, kImage, kImage, kImage, kText, kText};
  g.sigma = 1.2 / 4;  // noise_std 1.2, E = 4
  return g;
}
AuxLossConfig zero_weights() {
  AuxLossConfig c;
  c.importance_weight = c.load_weight = c.z_loss_weight = 0;
  c.local_entropy_weight = {0, 0};
  c.global_entropy_weight = {0, 0};
  return c;
}
}  // namespace

TEST_CASE("hand-computed: importance, z-loss and local entropy per modality from explicit logits") {
  for (int K : {1, 2}) {
    auto g = hand_group(K);
    const std::array<double, 2> tau{0.0, 0.0};
    const auto want = g.naive(tau);
    AuxLossConfig c = zero_weights();
    c.global_entropy_tau = tau;
    const auto v = g.run(c, nullptr);
    REQUIRE(want.importance > 0.01);
    CHECK(v.importance == doctest::Approx(want.importance).epsilon(1e-12));
    CHECK(v.z == doctest::Approx(want.z).epsilon(1e-12));
    CHECK(v.local_entropy[kImage] == doctest::Approx(want.local[kImage]).epsilon(1e-12));
    CHECK(v.local_entropy[kText] == doctest::Approx(want.local[kText]).epsilon(1e-12));
    // The two modalities differ, so swapping them (or averaging over all tokens) shows.
    CHECK(std::abs(want.local[kImage] - want.local[kText]) > 0.05);
    // Importance is on the clean gates: the noise must not change it (the noisy gates give another value).
    std::vector<double> imp_noisy(4, 0.0);
    for (index_t s = 0; s < 6; ++s) {
      const auto Gn = naive_softmax(g.noisy.data() + s * 4, 4);
      for (int e = 0; e < 4; ++e) imp_noisy[e] += Gn[e];
    }
    CHECK(std::abs(naive_cv2(imp_noisy) - want.importance) > 1e-3);
    CHECK(v.total == 0.0);  // every weight 0: values reported, nothing added
  }
}

TEST_CASE("hand-computed: load loss with explicit noise, K = 1 and K = 2 (threshold = K-th noisy logit)") {
  for (int K : {1, 2}) {
    auto g = hand_group(K);
    const auto want = g.naive({0.0, 0.0});
    const auto v = g.run(zero_weights(), nullptr);
    INFO("K = ", K);
    REQUIRE(want.load > 1e-3);
    CHECK(v.load == doctest::Approx(want.load).epsilon(1e-10));
    // The alternatives the spec rules out give other values on these numbers (so the check above tells them
    // apart): the clean logit of the K-th choice as threshold, the other rank's choice, 1 - Phi(-z).
    auto load_with = [&](auto thr_of, double sign) {
      std::vector<double> load(4, 0.0);
      for (index_t s = 0; s < 6; ++s) {
        const double thr = thr_of(s);
        for (int e = 0; e < 4; ++e)
          load[e] += (1.0 - Phi(sign * (thr - g.logits[s * 4 + e]) / g.sigma)) / 6.0;
      }
      return naive_cv2(load);
    };
    const double clean_thr = load_with([&](index_t s) { return g.logits[s * 4 + g.choice[s * K + K - 1]]; }, 1.0);
    const double other_rank = load_with([&](index_t s) { return g.noisy[s * 4 + g.choice[s * K + (K == 1 ? 1 : 0)]]; }, 1.0);
    const double flipped = load_with([&](index_t s) { return g.noisy[s * 4 + g.choice[s * K + K - 1]]; }, -1.0);
    CHECK(load_with([&](index_t s) { return g.noisy[s * 4 + g.choice[s * K + K - 1]]; }, 1.0) ==
          doctest::Approx(want.load).epsilon(1e-12));
    for (double alt : {clean_thr, other_rank, flipped}) CHECK(std::abs(alt - want.load) > 1e-3 * want.load);
    // Without noise (evaluation) the term is 0.
    g.noise_active = false;
    CHECK(g.run(zero_weights(), nullptr).load == 0.0);
  }
  // A literal anchor for K = 1, one token, E = 2, sigma = 1: noisy = (1, 0), thr = 1;
  // p = (1 - Phi(0), 1 - Phi(1)) = (0.5, 0.15865525393145707); Load = p (S = 1).
  NGroup one(1, 2, 1);
  one.logits = {1.0, 0.0}, one.noise = {0.0, 0.0}, one.mod = {kImage};
  one.sigma = 1.0;
  const double p1 = 0.15865525393145707, mean = (0.5 + p1) / 2, var = ((0.5 - mean) * (0.5 - mean) + (p1 - mean) * (p1 - mean)) / 2;
  CHECK(one.run(zero_weights(), nullptr).load == doctest::Approx(var / (mean * mean)).epsilon(1e-12));
}

TEST_CASE("hand-computed: global entropy per modality, hinge active and inactive") {
  auto g = hand_group(1);
  const auto base = g.naive({0.0, 0.0});
  const double Hi = base.H_pbar[kImage], Ht = base.H_pbar[kText];
  REQUIRE(Hi > 0.5);
  REQUIRE(Ht > 0.5);
  // Both active: tau above H(pbar) for each modality.
  {
    const std::array<double, 2> tau{Hi + 0.3, Ht + 0.1};
    AuxLossConfig c = zero_weights();
    c.global_entropy_tau = tau;
    c.global_entropy_weight = {1.0, 1.0};
    const auto want = g.naive(tau);
    std::vector<double> dl(24, 0.0);
    const auto v = g.run(c, dl.data());
    CHECK(v.global_entropy[kImage] == doctest::Approx(want.global[kImage]).epsilon(1e-12));
    CHECK(v.global_entropy[kText] == doctest::Approx(want.global[kText]).epsilon(1e-12));
    CHECK(v.global_entropy[kImage] == doctest::Approx(0.3).epsilon(1e-12));
    CHECK(v.global_entropy[kText] == doctest::Approx(0.1).epsilon(1e-12));
    double nrm = 0;
    for (double d : dl) nrm += d * d;
    CHECK(nrm > 1e-6);
  }
  // Both inactive: tau below H(pbar): term 0 and no gradient even with a positive weight.
  {
    const std::array<double, 2> tau{Hi - 0.3, Ht - 0.1};
    AuxLossConfig c = zero_weights();
    c.global_entropy_tau = tau;
    c.global_entropy_weight = {1.0, 1.0};
    std::vector<double> dl(24, 0.0);
    const auto v = g.run(c, dl.data());
    CHECK(v.global_entropy[kImage] == 0.0);
    CHECK(v.global_entropy[kText] == 0.0);
    CHECK(v.total == 0.0);
    for (double d : dl) CHECK(d == 0.0);
  }
  // Mixed: image active, text inactive; the gradient only reaches the image tokens.
  {
    const std::array<double, 2> tau{Hi + 0.2, Ht - 0.2};
    AuxLossConfig c = zero_weights();
    c.global_entropy_tau = tau;
    c.global_entropy_weight = {1.0, 1.0};
    std::vector<double> dl(24, 0.0);
    const auto v = g.run(c, dl.data());
    CHECK(v.global_entropy[kImage] == doctest::Approx(0.2).epsilon(1e-12));
    CHECK(v.global_entropy[kText] == 0.0);
    CHECK(v.total == doctest::Approx(0.2).epsilon(1e-12));
    double img = 0;
    for (index_t i = 0; i < 16; ++i) img += dl[i] * dl[i];
    CHECK(img > 1e-6);
    for (index_t i = 16; i < 24; ++i) CHECK(dl[i] == 0.0);
  }
}

TEST_CASE("total = sum of weight * term with every term non-zero and distinct positive weights") {
  for (int K : {1, 2}) {
    auto g = hand_group(K);
    const auto base = g.naive({0.0, 0.0});
    AuxLossConfig c;
    c.importance_weight = 0.11;
    c.load_weight = 0.23;
    c.local_entropy_weight = {0.37, 0.05};
    c.global_entropy_weight = {0.41, 0.13};
    c.global_entropy_tau = {base.H_pbar[kImage] + 0.25, base.H_pbar[kText] + 0.15};  // both hinges active
    c.z_loss_weight = 0.07;
    const auto t = g.naive(c.global_entropy_tau);
    for (double term : {t.importance, t.load, t.local[0], t.local[1], t.global[0], t.global[1], t.z})
      CHECK(term > 1e-3);
    const double want = c.importance_weight * t.importance + c.load_weight * t.load +
                        c.local_entropy_weight[0] * t.local[0] + c.local_entropy_weight[1] * t.local[1] +
                        c.global_entropy_weight[0] * t.global[0] + c.global_entropy_weight[1] * t.global[1] +
                        c.z_loss_weight * t.z;
    const auto v = g.run(c, nullptr);
    CHECK(v.total == doctest::Approx(want).epsilon(1e-12));
    // The reported unweighted terms are the naive ones.
    CHECK(v.importance == doctest::Approx(t.importance).epsilon(1e-12));
    CHECK(v.load == doctest::Approx(t.load).epsilon(1e-10));
    CHECK(v.local_entropy[0] == doctest::Approx(t.local[0]).epsilon(1e-12));
    CHECK(v.local_entropy[1] == doctest::Approx(t.local[1]).epsilon(1e-12));
    CHECK(v.global_entropy[0] == doctest::Approx(t.global[0]).epsilon(1e-12));
    CHECK(v.global_entropy[1] == doctest::Approx(t.global[1]).epsilon(1e-12));
    CHECK(v.z == doctest::Approx(t.z).epsilon(1e-12));
    // Each weight enters linearly with a + sign: raising one weight by 0.5 raises the total by 0.5 * its term.
    const std::array<double, 7> terms{t.importance, t.load, t.local[0], t.local[1], t.global[0], t.global[1], t.z};
    for (int i = 0; i < 7; ++i) {
      AuxLossConfig d = c;
      double* w[7] = {&d.importance_weight, &d.load_weight, &d.local_entropy_weight[0], &d.local_entropy_weight[1],
                      &d.global_entropy_weight[0], &d.global_entropy_weight[1], &d.z_loss_weight};
      *w[i] += 0.5;
      INFO("term ", i);
      CHECK(g.run(d, nullptr).total - v.total == doctest::Approx(0.5 * terms[i]).epsilon(1e-9));
    }
  }
}

TEST_CASE("each term alone decreases along -gradient by about eta * |grad|^2") {
  // Term ids: 0 importance, 1 load, 2 local image, 3 local text, 4 global image, 5 global text, 6 z.
  for (int K : {1, 2})
    for (int term = 0; term < 7; ++term) {
      auto g = hand_group(K);
      const auto base = g.naive({0.0, 0.0});
      AuxLossConfig c = zero_weights();
      c.global_entropy_tau = {base.H_pbar[kImage] + 0.3, base.H_pbar[kText] + 0.3};  // hinges active
      switch (term) {
        case 0: c.importance_weight = 1; break;
        case 1: c.load_weight = 1; break;
        case 2: c.local_entropy_weight[kImage] = 1; break;
        case 3: c.local_entropy_weight[kText] = 1; break;
        case 4: c.global_entropy_weight[kImage] = 1; break;
        case 5: c.global_entropy_weight[kText] = 1; break;
        default: c.z_loss_weight = 1; break;
      }
      auto value = [&](const AuxLossValues& v) {
        const double vals[7] = {v.importance, v.load, v.local_entropy[0], v.local_entropy[1],
                                v.global_entropy[0], v.global_entropy[1], v.z};
        return vals[term];
      };
      INFO("K = ", K, ", term ", term);
      std::vector<double> dl(24, 0.0);
      const auto v0 = g.run(c, dl.data());
      const double L0 = value(v0);
      CHECK(v0.total == doctest::Approx(L0).epsilon(1e-12));  // the term alone, with weight 1
      double g2 = 0;
      for (double d : dl) g2 += d * d;
      REQUIRE(g2 > 1e-8);
      const double eta = 1e-3 / std::sqrt(g2);  // a step of length 1e-3 in logit space
      const auto choice0 = g.choice;
      for (index_t i = 0; i < 24; ++i) g.logits[i] -= eta * dl[i];
      const auto v1 = g.run(c, nullptr);
      CHECK(g.choice == choice0);
      const double L1 = value(v1);
      CHECK(L1 < L0);
      CHECK((L0 - L1) / (eta * g2) == doctest::Approx(1.0).epsilon(0.02));
      // Modality terms: the gradient of one modality's term never touches the other modality's tokens.
      if (term >= 2 && term <= 5) {
        const int m = (term - 2) % 2;
        for (index_t s = 0; s < 6; ++s)
          if (g.mod[s] != m)
            for (int e = 0; e < 4; ++e) CHECK(dl[s * 4 + e] == 0.0);
      }
    }
}

TEST_CASE("through the layer: groups [8, 8, 8, 6], each group's losses by the naive formulas, averaged") {
  const index_t N = 30, D = 6;
  const int E = 4;
  Fixture<double> f(E, D, 5, 41, 0.5, 1.0);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 42);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = 20; t < N; ++t) mod[t] = kText;  // group 2 mixed, group 3 text only
  for (int K : {1, 2}) {
    auto cfg = config(E, K, 1.05, 0.0, true, 1.2, 8);
    cfg.losses.importance_weight = 0.11;
    cfg.losses.load_weight = 0.23;
    cfg.losses.local_entropy_weight = {0.37, 0.05};
    cfg.losses.global_entropy_weight = {0.41, 0.13};
    cfg.losses.global_entropy_tau = {std::log(4.0), std::log(4.0)};
    cfg.losses.z_loss_weight = 0.07;
    MoeContext<double> ctx;
    moe_forward<double>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(8), y.view(), ctx);
    REQUIRE(ctx.groups == 4);
    NaiveTerms avg;
    double total = 0;
    const auto& w = cfg.losses;
    for (index_t g = 0; g < 4; ++g) {
      const index_t r0 = g * 8, S = std::min<index_t>(8, N - r0);
      // logits recomputed naively from x and W_r; the noisy logits are the layer's (its noise draw).
      std::vector<double> lg(S * E), nz(ctx.noisy.data() + r0 * E, ctx.noisy.data() + (r0 + S) * E);
      for (index_t s = 0; s < S; ++s)
        for (int e = 0; e < E; ++e) {
          double a = 0;
          for (index_t d = 0; d < D; ++d) a += f.wr[e * D + d] * x[(r0 + s) * D + d];
          lg[s * E + e] = a;
        }
      const auto t = naive_terms(S, E, K, lg.data(), nz.data(), mod.data() + r0, true, 1.2 / E, w.global_entropy_tau);
      avg.importance += t.importance / 4, avg.load += t.load / 4, avg.z += t.z / 4;
      for (int m = 0; m < 2; ++m) avg.local[m] += t.local[m] / 4, avg.global[m] += t.global[m] / 4;
      total += (w.importance_weight * t.importance + w.load_weight * t.load + w.z_loss_weight * t.z +
                w.local_entropy_weight[0] * t.local[0] + w.local_entropy_weight[1] * t.local[1] +
                w.global_entropy_weight[0] * t.global[0] + w.global_entropy_weight[1] * t.global[1]) / 4;
    }
    INFO("K = ", K);
    CHECK(ctx.losses.importance == doctest::Approx(avg.importance).epsilon(1e-10));
    CHECK(ctx.losses.load == doctest::Approx(avg.load).epsilon(1e-9));
    CHECK(ctx.losses.z == doctest::Approx(avg.z).epsilon(1e-10));
    for (int m = 0; m < 2; ++m) {
      CHECK(ctx.losses.local_entropy[m] == doctest::Approx(avg.local[m]).epsilon(1e-10));
      CHECK(ctx.losses.global_entropy[m] == doctest::Approx(avg.global[m]).epsilon(1e-10));
    }
    CHECK(ctx.losses.total == doctest::Approx(total).epsilon(1e-10));
    CHECK(avg.load > 0);
    CHECK(avg.global[kText] > 0);
  }
}
