// Training: AdamW against a double-precision reference written here, each of its rules on its own (bias
// correction, decoupled weight decay on decay=true entries only, global-norm clipping, the returned norm, the
// non-finite check), the learning-rate schedule at hand-computed points, the model's decay mask by a rule
// written from the parameter names and shapes, and what Trainer::step reports and changes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <limoe/model/model.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/train/optimizer.hpp>
#include <limoe/train/trainer.hpp>

using namespace limoe;

namespace {

// AdamW as Loshchilov & Hutter / PyTorch write it, in double: clip the gradient by its global norm, update the
// moments, bias-correct them, decay (decoupled, lr_t * wd * w) the decaying entries, then step.
struct RefAdamW {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.1, clip_norm = 1.0;
  std::vector<double> m, v;
  int t = 0;

  explicit RefAdamW(std::size_t n, double wd_ = 0.1, double clip = 1.0) : wd(wd_), clip_norm(clip), m(n, 0.0), v(n, 0.0) {}

  // Returns the norm before clipping.
  double step(std::vector<double>& w, const std::vector<double>& g, const std::vector<bool>& decay, double lr) {
    double sq = 0;
    for (double x : g) sq += x * x;
    const double norm = std::sqrt(sq);
    const double c = (clip_norm > 0 && norm > clip_norm) ? clip_norm / norm : 1.0;
    ++t;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const double gi = g[i] * c;
      m[i] = beta1 * m[i] + (1 - beta1) * gi;
      v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
      const double mhat = m[i] / (1 - std::pow(beta1, t));
      const double vhat = v[i] / (1 - std::pow(beta2, t));
      if (decay[i]) w[i] -= lr * wd * w[i];
      w[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
    return norm;
  }
};

// A store whose decaying and non-decaying entries are interleaved, so a mask written at the wrong offset shows:
//   "a.bias" [3] no decay, "a.weight" [2, 3] decay, "gain" [2] no decay, "experts" [2, 1, 2] decay.
template <class T>
ParamStore<T> make_store() {
  ParamStore<T> ps;
  ps.add("a.bias", Shape{3}, false);
  ps.add("a.weight", Shape{2, 3}, true);
  ps.add("gain", Shape{2}, false);
  ps.add("experts", Shape{2, 1, 2}, true);
  ps.finalize();
  auto w = ps.values();
  for (index_t i = 0; i < ps.size(); ++i) w[i] = static_cast<T>(0.5 + 0.25 * static_cast<double>(i) * (i % 2 ? -1 : 1));
  ps.zero_grad();
  return ps;
}

// The decay flag of each flat entry, from the names as registered above (not from the optimizer).
std::vector<bool> expected_mask() {
  std::vector<bool> mask;
  for (int i = 0; i < 3; ++i) mask.push_back(false);  // a.bias
  for (int i = 0; i < 6; ++i) mask.push_back(true);   // a.weight
  for (int i = 0; i < 2; ++i) mask.push_back(false);  // gain
  for (int i = 0; i < 4; ++i) mask.push_back(true);   // experts
  return mask;
}

template <class T>
std::vector<double> values_of(const ParamStore<T>& ps) {
  std::vector<double> out(static_cast<std::size_t>(ps.size()));
  auto w = ps.values();
  for (index_t i = 0; i < ps.size(); ++i) out[static_cast<std::size_t>(i)] = static_cast<double>(w[i]);
  return out;
}

}  // namespace

TEST_CASE("AdamW: the store used here has 15 entries, 10 decaying") {
  auto ps = make_store<double>();
  CHECK(ps.size() == 15);
  const auto mask = expected_mask();
  REQUIRE(mask.size() == 15);
  int decaying = 0;
  for (bool b : mask) decaying += b;
  CHECK(decaying == 10);
}

TEST_CASE("AdamW: the first step moves every entry by exactly lr * sign(g) (bias correction), decaying ones also by lr*wd*w") {
  // Step 1 from zero moments: m = (1 - b1) g, v = (1 - b2) g^2, so m_hat / sqrt(v_hat) = sign(g). Without the
  // bias correction the step would be lr * 0.1 / sqrt(0.001) = 3.16 lr.
  auto ps = make_store<double>();
  const auto w0 = values_of(ps);
  const double g[15] = {0.3, -2.0, 5.0, -0.7, 1.5, 0.0, -4.0, 0.2, 9.0, -0.25, 0.6, -1.0, 3.0, -0.4, 0.8};
  for (int i = 0; i < 15; ++i) ps.grads()[i] = g[i];
  AdamW<double> opt(AdamWConfig{.lr = 1, .weight_decay = 0.1, .clip_norm = 0});
  opt.attach(ps);
  const double lr = 0.01;
  opt.update(ps, lr);
  CHECK(opt.step() == 1);
  const auto mask = expected_mask();
  for (int i = 0; i < 15; ++i) {
    const double sign = g[i] > 0 ? 1.0 : g[i] < 0 ? -1.0 : 0.0;
    const double want = w0[static_cast<std::size_t>(i)] * (mask[static_cast<std::size_t>(i)] ? 1 - lr * 0.1 : 1.0) - lr * sign;
    INFO("entry " << i);
    CHECK(std::abs(ps.values()[i] - want) < 1e-9);
  }
}

TEST_CASE("AdamW: a zero gradient moves only the decaying entries, by the factor (1 - lr_t * wd)") {
  for (double wd : {0.1, 0.3}) {
    auto ps = make_store<double>();
    const auto w0 = values_of(ps);
    AdamW<double> opt(AdamWConfig{.lr = 1e-3, .weight_decay = wd, .clip_norm = 1.0});
    opt.attach(ps);
    const double lr = 0.5;  // lr_t, not the configured peak, sets the decay
    const double norm = opt.update(ps, lr);
    CHECK(norm == 0.0);
    const auto mask = expected_mask();
    for (int i = 0; i < 15; ++i) {
      INFO("wd " << wd << " entry " << i);
      const double w = ps.values()[i];
      if (mask[static_cast<std::size_t>(i)]) CHECK(std::abs(w - w0[static_cast<std::size_t>(i)] * (1 - lr * wd)) < 1e-15);
      else CHECK(w == w0[static_cast<std::size_t>(i)]);  // bitwise: no decay, no step
      CHECK(opt.m()[i] == 0.0);                          // decoupled: the decay never enters the moments
      CHECK(opt.v()[i] == 0.0);
    }
  }
}

TEST_CASE("AdamW: weight decay 0 leaves a zero-gradient step a no-op everywhere") {
  auto ps = make_store<double>();
  const auto w0 = values_of(ps);
  AdamW<double> opt(AdamWConfig{.weight_decay = 0.0});
  opt.attach(ps);
  opt.update(ps, 0.1);
  for (int i = 0; i < 15; ++i) CHECK(ps.values()[i] == w0[static_cast<std::size_t>(i)]);
}

TEST_CASE("AdamW: global-norm clipping scales the gradient before the moments; the norm returned is the one before") {
  // g = (3, 4, 0, ..., 0, 12): norm 13.
  auto make_grad = [](ParamStore<double>& ps) {
    ps.zero_grad();
    ps.grads()[0] = 3;
    ps.grads()[4] = 4;
    ps.grads()[14] = 12;
  };
  SUBCASE("norm above clip_norm: clipped to clip_norm") {
    auto ps = make_store<double>();
    make_grad(ps);
    AdamW<double> opt(AdamWConfig{.clip_norm = 1.0});
    opt.attach(ps);
    CHECK(opt.update(ps, 0.01) == doctest::Approx(13.0).epsilon(1e-15));
    CHECK(opt.m()[0] == doctest::Approx(0.1 * 3.0 / 13.0).epsilon(1e-14));
    CHECK(opt.m()[4] == doctest::Approx(0.1 * 4.0 / 13.0).epsilon(1e-14));
    CHECK(opt.m()[14] == doctest::Approx(0.1 * 12.0 / 13.0).epsilon(1e-14));
    CHECK(opt.v()[14] == doctest::Approx(0.001 * (12.0 / 13.0) * (12.0 / 13.0)).epsilon(1e-14));
    CHECK(opt.m()[1] == 0.0);
  }
  SUBCASE("clip_norm 2.6: the gradient is scaled by 2.6 / 13 = 0.2") {
    auto ps = make_store<double>();
    make_grad(ps);
    AdamW<double> opt(AdamWConfig{.clip_norm = 2.6});
    opt.attach(ps);
    CHECK(opt.update(ps, 0.01) == doctest::Approx(13.0).epsilon(1e-15));
    CHECK(opt.m()[4] == doctest::Approx(0.1 * 0.8).epsilon(1e-14));
    CHECK(opt.v()[4] == doctest::Approx(0.001 * 0.64).epsilon(1e-14));
  }
  SUBCASE("norm below clip_norm: unchanged") {
    auto ps = make_store<double>();
    make_grad(ps);
    AdamW<double> opt(AdamWConfig{.clip_norm = 20.0});
    opt.attach(ps);
    CHECK(opt.update(ps, 0.01) == doctest::Approx(13.0).epsilon(1e-15));
    CHECK(opt.m()[14] == doctest::Approx(1.2).epsilon(1e-14));
    CHECK(opt.v()[14] == doctest::Approx(0.144).epsilon(1e-14));
  }
  SUBCASE("clip_norm <= 0: clipping disabled") {
    for (double clip : {0.0, -1.0}) {
      auto ps = make_store<double>();
      make_grad(ps);
      AdamW<double> opt(AdamWConfig{.clip_norm = clip});
      opt.attach(ps);
      CHECK(opt.update(ps, 0.01) == doctest::Approx(13.0).epsilon(1e-15));
      CHECK(opt.m()[0] == doctest::Approx(0.3).epsilon(1e-14));
      CHECK(opt.m()[14] == doctest::Approx(1.2).epsilon(1e-14));
    }
  }
}

TEST_CASE("AdamW: a second step follows the bias-corrected moments (hand-computed, one entry)") {
  // Entry 0 (no decay): g1 = 1, g2 = -1, clip off, lr 0.1.
  //   m1 = 0.1, v1 = 0.001; m2 = 0.09 - 0.1 = -0.01, v2 = 0.000999 + 0.001 = 0.001999
  //   step 1 = -0.1 * 1 / (1 + 1e-8);
  //   m_hat2 = -0.01 / 0.19, v_hat2 = 0.001999 / 0.001999 = 1 -> step 2 = -0.1 * (-0.01 / 0.19) / (1 + 1e-8)
  auto ps = make_store<double>();
  const double w0 = ps.values()[0];
  AdamW<double> opt(AdamWConfig{.clip_norm = 0});
  opt.attach(ps);
  ps.grads()[0] = 1;
  opt.update(ps, 0.1);
  CHECK(std::abs(ps.values()[0] - (w0 - 0.1)) < 1e-9);
  ps.grads()[0] = -1;
  opt.update(ps, 0.1);
  CHECK(opt.step() == 2);
  CHECK(opt.m()[0] == doctest::Approx(-0.01).epsilon(1e-12));
  CHECK(opt.v()[0] == doctest::Approx(0.001999).epsilon(1e-12));
  const double want = w0 - 0.1 / (1 + 1e-8) + 0.1 * (0.01 / 0.19) / (1 + 1e-8);
  CHECK(std::abs(ps.values()[0] - want) < 1e-12);
}

TEST_CASE("AdamW: several steps with changing gradients, learning rates and clipping match the reference") {
  for (double clip : {1.0, 0.0}) {
    auto ps = make_store<double>();
    auto w_ref = values_of(ps);
    const auto mask = expected_mask();
    AdamW<double> opt(AdamWConfig{.lr = 1, .weight_decay = 0.1, .clip_norm = clip});
    opt.attach(ps);
    RefAdamW ref(15, 0.1, clip);
    // Gradient scales put the norm (about 2.7 * scale) above and below clip_norm = 1 on different steps.
    const double scales[7] = {0.1, 2.0, 0.3, 5.0, 0.0, 0.05, 1.0};
    for (int t = 0; t < 7; ++t) {
      std::vector<double> g(15);
      for (int i = 0; i < 15; ++i) {
        g[static_cast<std::size_t>(i)] = scales[t] * std::sin(1.3 * i + 0.7 * t + 0.1);
        ps.grads()[i] = g[static_cast<std::size_t>(i)];
      }
      const double lr = 0.02 * (t + 1) / 7.0;
      const double norm_ref = ref.step(w_ref, g, mask, lr);
      const double norm = opt.update(ps, lr);
      INFO("clip " << clip << " step " << t);
      CHECK(norm == doctest::Approx(norm_ref).epsilon(1e-14));
      CHECK(opt.step() == t + 1);
      for (int i = 0; i < 15; ++i) {
        INFO("entry " << i);
        CHECK(std::abs(ps.values()[i] - w_ref[static_cast<std::size_t>(i)]) < 1e-12);
        CHECK(std::abs(opt.m()[i] - ref.m[static_cast<std::size_t>(i)]) < 1e-14);
        CHECK(std::abs(opt.v()[i] - ref.v[static_cast<std::size_t>(i)]) < 1e-14);
      }
    }
  }
}

TEST_CASE("AdamW<float>: several steps match the double reference to float precision") {
  auto ps = make_store<float>();
  auto w_ref = values_of(ps);
  const auto mask = expected_mask();
  AdamW<float> opt(AdamWConfig{.weight_decay = 0.1, .clip_norm = 1.0});
  opt.attach(ps);
  RefAdamW ref(15, 0.1, 1.0);
  for (int t = 0; t < 5; ++t) {
    std::vector<double> g(15);
    for (int i = 0; i < 15; ++i) {
      const float gi = static_cast<float>((t % 2 ? 3.0 : 0.2) * std::cos(0.9 * i - 0.4 * t));
      ps.grads()[i] = gi;
      g[static_cast<std::size_t>(i)] = gi;
    }
    ref.step(w_ref, g, mask, 0.01);
    opt.update(ps, 0.01);
    for (int i = 0; i < 15; ++i) CHECK(std::abs(ps.values()[i] - w_ref[static_cast<std::size_t>(i)]) < 2e-6);
  }
}

TEST_CASE("AdamW<float>: a store of 300,007 entries (the vectorised loop, its tail, several threads' blocks) matches the double reference") {
  // Entries alternate decay in runs of 1,000, so every vector of the loop meets both kinds somewhere.
  const index_t n = 300007;
  ParamStore<float> ps;
  std::vector<bool> mask;
  for (index_t at = 0, k = 0; at < n; ++k) {
    const index_t len = std::min<index_t>(1000 + k % 3, n - at);
    ps.add("p" + std::to_string(k), Shape{len}, k % 2 == 1);
    for (index_t i = 0; i < len; ++i) mask.push_back(k % 2 == 1);
    at += len;
  }
  ps.finalize();
  REQUIRE(ps.size() == n);
  for (index_t i = 0; i < n; ++i) ps.values()[i] = static_cast<float>(0.3 * std::sin(0.001 * static_cast<double>(i)) + 0.05);
  auto w_ref = values_of(ps);
  AdamW<float> opt(AdamWConfig{.weight_decay = 0.1, .clip_norm = 1.0});
  opt.attach(ps);
  RefAdamW ref(static_cast<std::size_t>(n), 0.1, 1.0);
  for (int t = 0; t < 3; ++t) {
    std::vector<double> g(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      const float gi = static_cast<float>((t == 1 ? 0.01 : 1e-4) * std::cos(0.37 * static_cast<double>(i) - t));
      ps.grads()[i] = gi;
      g[static_cast<std::size_t>(i)] = gi;
    }
    const double norm_ref = ref.step(w_ref, g, mask, 0.01);
    const double norm = opt.update(ps, 0.01);
    CHECK(norm == doctest::Approx(norm_ref).epsilon(1e-12));  // step 1 is clipped (norm ~3.9), 0 and 2 are not
    double worst = 0;
    for (index_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(ps.values()[i] - w_ref[static_cast<std::size_t>(i)]));
    CHECK(worst < 2e-6);
  }
}

TEST_CASE("sum_squares: fixed-order lane sums match a long double sum and do not depend on the thread count") {
  // Lengths around the 16 lanes and the 2^16-element chunks (core/reduce.hpp).
  for (index_t n : {index_t(0), index_t(1), index_t(15), index_t(16), index_t(17), index_t(65535), index_t(65536),
                    index_t(65537), index_t(3 * 65536 + 21)}) {
    CAPTURE(n);
    std::vector<float> x(static_cast<std::size_t>(n));
    long double exact = 0;
    for (index_t i = 0; i < n; ++i) {
      x[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(1.3 * static_cast<double>(i)) * (1 + i % 7));
      exact += static_cast<long double>(x[static_cast<std::size_t>(i)]) * x[static_cast<std::size_t>(i)];
    }
    const CView<float> v(x.data(), Shape{n});
    set_num_threads(1);
    const double one = sum_squares(v);
    set_num_threads(2);
    const double two = sum_squares(v);
    set_num_threads(0);
    CHECK(one == two);
    CHECK(std::abs(one - static_cast<double>(exact)) <= 1e-14 * static_cast<double>(exact) + 1e-300);
    // A term of the tail lands in the sum: the last element counts.
    if (n > 0) {
      x.back() += 1.0f;
      CHECK(sum_squares(v) != one);
      x.back() -= 1.0f;
    }
  }
}

TEST_CASE("AdamW: a non-finite gradient is an error and changes nothing") {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    auto ps = make_store<double>();
    const auto w0 = values_of(ps);
    AdamW<double> opt(AdamWConfig{});
    opt.attach(ps);
    ps.grads()[7] = bad;
    CHECK_THROWS_WITH_AS(opt.update(ps, 0.01), doctest::Contains("not finite"), Error);
    CHECK(opt.step() == 0);
    for (int i = 0; i < 15; ++i) CHECK(ps.values()[i] == w0[static_cast<std::size_t>(i)]);
  }
}

TEST_CASE("AdamW: update before attach() to this store is an error") {
  auto ps = make_store<double>();
  AdamW<double> opt(AdamWConfig{});
  CHECK_THROWS_WITH_AS(opt.update(ps, 0.01), doctest::Contains("attach"), Error);
}

// ---- learning-rate schedule -----------------------------------------------------------------------------

TEST_CASE("LrSchedule: linear warmup (step + 1) / warmup_steps, then cosine to final_fraction") {
  const LrSchedule s{4, 12, Decay::Cosine, 0.0};
  CHECK(s.factor(0) == doctest::Approx(0.25));
  CHECK(s.factor(1) == doctest::Approx(0.5));
  CHECK(s.factor(2) == doctest::Approx(0.75));
  CHECK(s.factor(3) == doctest::Approx(1.0));
  CHECK(s.factor(4) == doctest::Approx(1.0));                                  // decay starts at t = 0
  CHECK(s.factor(6) == doctest::Approx(0.5 * (1 + std::sqrt(0.5))));          // t = 2/8: 0.853553...
  CHECK(s.factor(6) == doctest::Approx(0.8535533905932737));
  CHECK(s.factor(8) == doctest::Approx(0.5));                                  // t = 1/2
  CHECK(s.factor(10) == doctest::Approx(0.5 * (1 - std::sqrt(0.5))));         // t = 3/4: 0.146446...
  CHECK(s.factor(12) == doctest::Approx(0.0));                                 // end
  CHECK(s.factor(100) == doctest::Approx(0.0));                                // past the end: held
}

TEST_CASE("LrSchedule: linear decay at the same points") {
  const LrSchedule s{4, 12, Decay::Linear, 0.0};
  CHECK(s.factor(0) == doctest::Approx(0.25));
  CHECK(s.factor(3) == doctest::Approx(1.0));
  CHECK(s.factor(4) == doctest::Approx(1.0));
  CHECK(s.factor(6) == doctest::Approx(0.75));
  CHECK(s.factor(8) == doctest::Approx(0.5));
  CHECK(s.factor(10) == doctest::Approx(0.25));
  CHECK(s.factor(12) == doctest::Approx(0.0));
  CHECK(s.factor(30) == doctest::Approx(0.0));
}

TEST_CASE("LrSchedule: final_fraction is the floor both decays end at") {
  const LrSchedule c{4, 12, Decay::Cosine, 0.1};
  CHECK(c.factor(1) == doctest::Approx(0.5));  // warmup does not see final_fraction
  CHECK(c.factor(4) == doctest::Approx(1.0));
  CHECK(c.factor(8) == doctest::Approx(0.55));  // 0.1 + 0.9 * 0.5
  CHECK(c.factor(6) == doctest::Approx(0.1 + 0.9 * 0.8535533905932737));
  CHECK(c.factor(12) == doctest::Approx(0.1));
  CHECK(c.factor(50) == doctest::Approx(0.1));
  const LrSchedule l{4, 12, Decay::Linear, 0.2};
  CHECK(l.factor(6) == doctest::Approx(0.8));   // 0.2 + 0.8 * 0.75
  CHECK(l.factor(10) == doctest::Approx(0.4));  // 0.2 + 0.8 * 0.25
  CHECK(l.factor(12) == doctest::Approx(0.2));
  CHECK(l.factor(13) == doctest::Approx(0.2));
}

TEST_CASE("LrSchedule: without warmup the decay starts at step 0") {
  const LrSchedule c{0, 10, Decay::Cosine, 0.0};
  CHECK(c.factor(0) == doctest::Approx(1.0));
  CHECK(c.factor(5) == doctest::Approx(0.5));
  CHECK(c.factor(10) == doctest::Approx(0.0));
  const LrSchedule l{0, 10, Decay::Linear, 0.0};
  CHECK(l.factor(0) == doctest::Approx(1.0));
  CHECK(l.factor(1) == doctest::Approx(0.9));
  CHECK(l.factor(7) == doctest::Approx(0.3));
}

// ---- the model's decay mask -----------------------------------------------------------------------------

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// semantics §5: "decoupled weight decay 0.1 on weight matrices only"; optimizer.hpp and
// docs/architecture.md: never biases, LayerNorm parameters, positions, the token table, probes or logit_scale.
// Returns the category name; `decay` is set to what the rule says.
std::string classify(const std::string& n, const Shape& shape, bool& decay) {
  decay = false;
  if (n == "logit_scale") return "logit_scale";
  if (ends_with(n, ".bias")) return "bias";
  if (ends_with(n, ".ln1.weight") || ends_with(n, ".ln2.weight") || ends_with(n, ".ln.weight") || n == "norm.weight")
    return "layernorm";
  if (ends_with(n, ".pos")) return "position";
  if (n == "txt.embed") return "token table";
  if (ends_with(n, ".probe")) return "probe";
  if (ends_with(n, ".weight") && shape.rank() >= 2) {
    decay = true;
    if (n == "img.patch.weight") return "patch";
    if (ends_with(n, ".proj.weight")) return "projection";
    if (ends_with(n, ".router.weight")) return "router";
    if (n.find(".moe.fc") != std::string::npos) return "expert";
    if (n.find(".attn.") != std::string::npos) return n.find(".head.") != std::string::npos ? "head attention" : "attention";
    if (n.find(".mlp.fc") != std::string::npos) return n.find(".head.") != std::string::npos ? "head mlp" : "mlp";
  }
  return "unknown";
}

void check_decay_mask(const ModelConfig& cfg, const std::set<std::string>& must_see) {
  Limoe<float> model(cfg);
  std::set<std::string> seen;
  for (const auto& e : model.params().entries()) {
    bool want = false;
    const std::string cat = classify(e.name, e.shape, want);
    INFO(e.name << " " << e.shape.str() << " (" << cat << ")");
    CHECK(cat != "unknown");
    CHECK(e.decay == want);
    if (want) CHECK(e.shape.rank() >= 2);  // only matrices (and stacks of expert matrices) decay
    seen.insert(cat);
  }
  for (const auto& c : must_see) {
    INFO("category " << c);
    CHECK(seen.count(c) == 1);
  }
}

}  // namespace

TEST_CASE("model: weight decay is registered on weight matrices only (tiny, MAP heads)") {
  const ModelConfig cfg = preset("tiny");
  REQUIRE(cfg.pool_img == Pooling::Map);
  check_decay_mask(cfg, {"logit_scale", "bias", "layernorm", "position", "token table", "probe", "patch", "projection",
                         "router", "expert", "attention", "head attention", "mlp", "head mlp"});
  // Spot checks by name (the categories above could hide a rule that is wrong for all members of one).
  Limoe<float> m(cfg);
  const auto& ps = m.params();
  for (const char* n : {"img.patch.weight", "blocks.0.attn.q.weight", "blocks.0.mlp.fc1.weight", "blocks.1.moe.router.weight",
                        "blocks.1.moe.fc1.weight", "blocks.1.moe.fc2.weight", "img.proj.weight", "txt.proj.weight",
                        "img.head.attn.o.weight", "txt.head.mlp.fc2.weight"})
    CHECK_MESSAGE(ps.entry(ps.get(n)).decay, n);
  for (const char* n : {"img.patch.bias", "img.pos", "txt.pos", "txt.embed", "blocks.0.ln1.weight", "blocks.0.ln2.bias",
                        "blocks.1.moe.fc1.bias", "norm.weight", "img.head.probe", "txt.head.ln.weight", "logit_scale"})
    CHECK_MESSAGE(!ps.entry(ps.get(n)).decay, n);
}

TEST_CASE("model: weight decay mask with GAP / last-token pooling (no head parameters)") {
  ModelConfig cfg = preset("tiny");
  cfg.pool_img = Pooling::Gap;
  cfg.pool_txt = Pooling::Last;
  check_decay_mask(cfg, {"logit_scale", "bias", "layernorm", "position", "token table", "patch", "projection", "router",
                         "expert", "attention", "mlp"});
}

TEST_CASE("model + AdamW: a zero-gradient step shrinks exactly the decaying parameters of the model") {
  Limoe<float> model(preset("tiny"));
  model.init(3);
  auto& ps = model.params();
  ps.zero_grad();
  const auto w0 = values_of(ps);
  AdamW<float> opt(AdamWConfig{.weight_decay = 0.1});
  opt.attach(ps);
  opt.update(ps, 0.5);  // factor 1 - 0.05
  for (const auto& e : ps.entries()) {
    bool want = false;
    classify(e.name, e.shape, want);
    INFO(e.name);
    for (index_t i = e.offset; i < e.offset + e.shape.numel(); ++i) {
      const double before = w0[static_cast<std::size_t>(i)], after = ps.values()[i];
      if (want) CHECK(std::abs(after - 0.95 * before) <= 1e-6 * std::abs(before) + 1e-30);
      else CHECK(after == before);
    }
  }
}

// ---- the trainer ------------------------------------------------------------------------------------------

namespace {

struct Batch {
  Tensor<float> images;
  Tensor<std::int32_t> texts;
};

Batch make_batch(index_t n) {
  Batch b{Tensor<float>(Shape{n, 28, 28, 1}), Tensor<std::int32_t>(Shape{n, 16})};
  for (index_t i = 0; i < b.images.numel(); ++i) b.images[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)));
  for (index_t r = 0; r < n; ++r)
    for (index_t t = 0; t < 16; ++t)  // ids 1..40 (0 is padding), the last four positions padded
      b.texts[r * 16 + t] = t < 12 ? static_cast<std::int32_t>(1 + (r * 7 + t * 3) % 40) : 0;
  return b;
}

}  // namespace

TEST_CASE("trainer: step s reports lr = peak * schedule factor of s and applies AdamW with it") {
  Limoe<float> model(preset("tiny"));
  model.init(1);
  TrainConfig tc;
  tc.steps = 10;
  tc.warmup_steps = 4;
  tc.decay = Decay::Cosine;
  tc.adam.lr = 1e-2;
  tc.adam.weight_decay = 0.1;
  tc.adam.clip_norm = 1.0;
  Trainer<Limoe<float>> trainer(model, tc);
  const auto batch = make_batch(4);
  auto& ps = model.params();

  // Step 0: warmup factor 1/4.
  const auto w0 = values_of(ps);
  const auto r = trainer.step(batch.images.cview(), batch.texts.cview());
  CHECK(r.step == 1);
  CHECK(trainer.step_count() == 1);
  CHECK(r.lr == doctest::Approx(2.5e-3).epsilon(1e-12));
  CHECK(std::isfinite(r.loss.total));

  // The gradient of that step is still in the store: the update must be one AdamW step with lr 2.5e-3.
  const auto g = ps.grads();
  double sq = 0;
  for (index_t i = 0; i < ps.size(); ++i) sq += static_cast<double>(g[i]) * g[i];
  const double norm = std::sqrt(sq);
  CHECK(norm > 0);
  CHECK(r.grad_norm == doctest::Approx(norm).epsilon(1e-5));
  const double c = norm > 1.0 ? 1.0 / norm : 1.0;
  int zero_grad_fixed = 0, zero_grad_decayed = 0;
  for (const auto& e : ps.entries()) {
    INFO(e.name);
    for (index_t i = e.offset; i < e.offset + e.shape.numel(); ++i) {
      const double before = w0[static_cast<std::size_t>(i)], after = ps.values()[i];
      const double gi = static_cast<double>(g[i]) * c;
      const double want = before - (e.decay ? 2.5e-3 * 0.1 * before : 0.0) - 2.5e-3 * gi / (std::abs(gi) + 1e-8);
      CHECK(std::abs(after - want) <= 1e-6 + 1e-6 * std::abs(before));
      if (g[i] == 0) {
        if (e.decay) ++zero_grad_decayed;
        else {
          ++zero_grad_fixed;
          CHECK(after == before);  // no gradient, no decay: bitwise unchanged
        }
      }
    }
  }
  CHECK(zero_grad_fixed > 0);  // e.g. rows of the token table that the batch does not use

  // Step 1: warmup factor 2/4.
  const auto r1 = trainer.step(batch.images.cview(), batch.texts.cview());
  CHECK(r1.step == 2);
  CHECK(r1.lr == doctest::Approx(5e-3).epsilon(1e-12));

  // Resumed at step 7: cosine, t = (7 - 4) / 6 = 1/2, factor 1/2.
  trainer.optimizer().set_step(7);
  const auto r7 = trainer.step(batch.images.cview(), batch.texts.cview());
  CHECK(r7.step == 8);
  CHECK(r7.lr == doctest::Approx(5e-3).epsilon(1e-12));
  CHECK(trainer.lr_at(5) == doctest::Approx(1e-2 * 0.5 * (1 + std::cos(M_PI / 6))).epsilon(1e-12));

  // Past the end of the schedule (final fraction 0): lr 0, so nothing moves, decaying weights included.
  trainer.optimizer().set_step(10);
  const auto w10 = values_of(ps);
  const auto r10 = trainer.step(batch.images.cview(), batch.texts.cview());
  CHECK(r10.lr == 0.0);
  for (index_t i = 0; i < ps.size(); ++i) CHECK(ps.values()[i] == w10[static_cast<std::size_t>(i)]);
}

TEST_CASE("trainer: the linear schedule and final_lr_fraction reach the reported lr") {
  Limoe<float> model(preset("tiny"));
  model.init(2);
  TrainConfig tc;
  tc.steps = 8;
  tc.warmup_steps = 0;
  tc.decay = Decay::Linear;
  tc.final_lr_fraction = 0.5;
  tc.adam.lr = 4e-3;
  Trainer<Limoe<float>> trainer(model, tc);
  CHECK(trainer.lr_at(0) == doctest::Approx(4e-3));
  CHECK(trainer.lr_at(4) == doctest::Approx(3e-3));  // 4e-3 * (0.5 + 0.5 * 0.5)
  CHECK(trainer.lr_at(8) == doctest::Approx(2e-3));
  CHECK(trainer.lr_at(20) == doctest::Approx(2e-3));
  const auto batch = make_batch(2);
  trainer.optimizer().set_step(2);
  const auto r = trainer.step(batch.images.cview(), batch.texts.cview());
  CHECK(r.lr == doctest::Approx(3.5e-3));  // 4e-3 * (0.5 + 0.5 * 0.75)
  CHECK(r.step == 3);
}
