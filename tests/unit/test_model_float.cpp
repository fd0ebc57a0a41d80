// The whole model in float against the whole model in double, on the golden configurations (checkpoint, inputs
// and training noise of tests/data/golden/, see tests/reference/README.md): the same weights (the checkpoint's
// float32 values, exact in both types), the same inputs and the same injected router noise. Evaluation
// embeddings, routes (identical), training losses (every term) and every parameter gradient; then Limoe<float>
// against the golden files themselves. One TEST_CASE per case and comparison.
//
// Tolerances, from float32 rounding (unit roundoff u = 2^-24 = 6.0e-8):
//  * embeddings are unit vectors: each entry of the float result carries the rounding of a depth-2 network of
//    width 16 (every value passes through ~10 matrix products of length <= 32, 5 LayerNorms whose 1/std
//    amplifies relative errors by up to ~10, softmaxes, GELU, a pooling head and the normalisation). A
//    worst-case forward bound is ~ (sum of product lengths) * (LayerNorm amplification) * u ~ 300 * 10 * u
//    = 2e-4; random-walk accumulation gives ~ sqrt of that count, ~ 50 u = 3e-6. Tolerance 2e-5 absolute (330 u):
//    measured worst 3.1e-7 (tiny_vanilla, ~5 u), so the bound holds with margin and still fails on any real
//    deviation (a wrong op moves embeddings by > 1e-3).
//  * losses: loss_rel 2e-5 (330 u relative; the z-loss, ~5-25, dominates absolute errors) + loss_abs 2e-6
//    (for the terms near 0: the global-entropy hinges and the importance/load coefficients of variation).
//    The aux terms are accumulated in double inside the layer from float gates, so their error is the float
//    error of the logits (~ u |logit| ~ 1e-6 on logits of ~5-20). Measured worst: absolute 1.7e-6 (tiny_vanilla,
//    on the z-loss of 24, i.e. 7e-8 relative), relative 5.6e-6 on a value above 1e-3 (tiny_map).
//  * gradients: one backward doubles the chain, and gradients of near-cancelling sums (attention key/query
//    weights, LayerNorm biases) lose relative precision, so the bound is relative to the largest gradient of
//    all tensors: |f - d| <= 1e-4 |d| + 1e-5 max |d|, the same form as the golden comparison (a pure relative
//    test fails on the analytically zero key-bias gradients, ~1e-9 in float and ~1e-17 in double). 1e-5 of the
//    largest gradient is ~170 u; measured worst ratio error / bound 0.04 (tiny_k2, blocks.0.attn.o.weight).
//  * routes identical: the golden seeds keep every compared gate gap >= 3e-4 (5000 u), so float cannot flip a
//    decision; exact ties (tiny_dup's identical tokens) stay exact in float because identical rows are
//    computed identically.
#include <doctest/doctest.h>

#include <cmath>

#include "reference/golden_case.hpp"

using namespace limoe;

namespace {

struct FloatTol {
  double emb_abs = 2e-5;
  double loss_rel = 2e-5, loss_abs = 2e-6;
  double grad_rel = 1e-4, grad_abs = 1e-5;  // grad_abs times the largest |gradient| of all tensors
};
constexpr FloatTol kTol{};

template <class A, class B>
void same_routes(const std::string& what, const A& f, const B& d) {
  REQUIRE(f.size() == d.size());
  for (std::size_t k = 0; k < f.size(); ++k) {
    REQUIRE(f[k].shape() == d[k].shape());
    index_t diff = 0;
    for (index_t i = 0; i < f[k].numel(); ++i) diff += f[k][i] != d[k][i];
    INFO(what, " block entry ", k, ": ", diff, " route entries differ");
    CHECK(diff == 0);
  }
}

double max_emb_diff(const std::string& what, const Tensor<float>& f, const Tensor<double>& d) {
  REQUIRE(f.shape() == d.shape());
  double worst = 0;
  for (index_t i = 0; i < d.numel(); ++i) worst = std::max(worst, std::abs(static_cast<double>(f[i]) - d[i]));
  INFO(what, ": max |float - double| = ", worst);
  CHECK(worst <= kTol.emb_abs);
  return worst;
}

void float_vs_double(const std::string& name) {
  const golden::Case c = golden::Case::open(name);
  std::optional<golden::Run<float>> rf;
  std::optional<golden::Run<double>> rd;
  c.with_model<float>([&](auto& m) { rf = golden::run_case<float>(c, m); });
  c.with_model<double>([&](auto& m) { rd = golden::run_case<double>(c, m); });
  const auto& f = *rf;
  const auto& d = *rd;

  // Evaluation.
  double emb = 0;
  emb = std::max(emb, max_emb_diff("eval img_emb", f.ev_img.img_emb, d.ev_img.img_emb));
  emb = std::max(emb, max_emb_diff("eval txt_emb", f.ev_txt.txt_emb, d.ev_txt.txt_emb));
  same_routes("eval image routes", f.ev_img.routes, d.ev_img.routes);
  same_routes("eval text routes", f.ev_txt.routes, d.ev_txt.routes);

  // Training: both received the table noise in every group.
  CHECK(f.groups_noised_train == c.train_groups);
  CHECK(d.groups_noised_train == c.train_groups);
  emb = std::max(emb, max_emb_diff("train img_emb", f.train.img_emb, d.train.img_emb));
  emb = std::max(emb, max_emb_diff("train txt_emb", f.train.txt_emb, d.train.txt_emb));
  same_routes("train routes", f.train.routes, d.train.routes);
  double loss_rel = 0, loss_abs = 0;
  auto close = [&](const std::string& what, double a, double b) {
    INFO(what, ": float ", a, ", double ", b);
    CHECK(std::abs(a - b) <= kTol.loss_rel * std::abs(b) + kTol.loss_abs);
    loss_abs = std::max(loss_abs, std::abs(a - b));
    if (std::abs(b) > 1e-3) loss_rel = std::max(loss_rel, std::abs(a - b) / std::abs(b));
  };
  close("total", f.loss.total, d.loss.total);
  close("contrastive", f.loss.contrastive, d.loss.contrastive);
  close("aux", f.loss.aux, d.loss.aux);
  REQUIRE(f.train.aux_terms.size() == d.train.aux_terms.size());
  for (std::size_t k = 0; k < d.train.aux_terms.size(); ++k) {
    const auto &a = f.train.aux_terms[k], &b = d.train.aux_terms[k];
    const std::string bl = " block " + std::to_string(d.train.route_blocks[k]);
    close("importance" + bl, a.importance, b.importance);
    close("load" + bl, a.load, b.load);
    CHECK(b.load > 0);
    for (int m = 0; m < moe::kModalities; ++m) {
      close("local_entropy[" + std::to_string(m) + "]" + bl, a.local_entropy[m], b.local_entropy[m]);
      close("global_entropy[" + std::to_string(m) + "]" + bl, a.global_entropy[m], b.global_entropy[m]);
    }
    close("z" + bl, a.z, b.z);
    close("total" + bl, a.total, b.total);
  }

  // Every parameter gradient.
  REQUIRE(f.grad_names == d.grad_names);
  double gscale = 0;
  for (const auto& g : d.grads)
    for (double v : g) gscale = std::max(gscale, std::abs(v));
  REQUIRE(gscale > 0);
  double worst_ratio = 0;
  std::string worst_name;
  for (std::size_t p = 0; p < d.grads.size(); ++p) {
    double worst = 0;
    index_t at = 0;
    for (std::size_t i = 0; i < d.grads[p].size(); ++i) {
      const double bound = kTol.grad_rel * std::abs(d.grads[p][i]) + kTol.grad_abs * gscale;
      const double ratio = std::abs(f.grads[p][i] - d.grads[p][i]) / bound;
      if (ratio > worst) worst = ratio, at = static_cast<index_t>(i);
    }
    if (worst > worst_ratio) worst_ratio = worst, worst_name = d.grad_names[p];
    INFO("grad.", d.grad_names[p], " [", at, "]: float ", f.grads[p][static_cast<std::size_t>(at)], ", double ",
         d.grads[p][static_cast<std::size_t>(at)], ", error / bound ", worst);
    CHECK(worst <= 1.0);
  }
  MESSAGE(name, " float vs double: embeddings max |diff| ", emb, "; losses max |diff| ", loss_abs,
          ", max relative ", loss_rel, "; gradients worst error / bound ", worst_ratio, " (", worst_name, ")");
}

void golden_float(const std::string& name) { golden::check_case_against_files<float>(name); }

}  // namespace

TEST_CASE("float vs double tiny_map") { float_vs_double("tiny_map"); }
TEST_CASE("float vs double tiny_k2") { float_vs_double("tiny_k2"); }
TEST_CASE("float vs double tiny_vanilla") { float_vs_double("tiny_vanilla"); }
TEST_CASE("float vs double tiny_dup") { float_vs_double("tiny_dup"); }

TEST_CASE("golden float tiny_map") { golden_float("tiny_map"); }
TEST_CASE("golden float tiny_k2") { golden_float("tiny_k2"); }
TEST_CASE("golden float tiny_vanilla") { golden_float("tiny_vanilla"); }
TEST_CASE("golden float tiny_dup") { golden_float("tiny_dup"); }
