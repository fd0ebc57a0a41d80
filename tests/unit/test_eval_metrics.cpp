// Evaluation metrics on constructed inputs with hand-computed answers: zero-shot top-1, retrieval recall@1/5/10
// (ties counted against the query), the few-shot linear probe (standardised with the training statistics) and
// the arithmetic of RoutingSummary over hand-built moe::RoutingStats.
#include <doctest/doctest.h>

#include <cmath>
#include <array>
#include <initializer_list>
#include <map>
#include <vector>

#include <limoe/eval/evaluate.hpp>
#include <limoe/eval/summary.hpp>

using namespace limoe;

namespace {

Tensor<float> matrix(index_t rows, index_t cols, std::initializer_list<float> values) {
  REQUIRE(static_cast<index_t>(values.size()) == rows * cols);
  Tensor<float> t(Shape{rows, cols});
  index_t i = 0;
  for (float v : values) t[i++] = v;
  return t;
}

}  // namespace

// ---- zero-shot -------------------------------------------------------------------------------------------

TEST_CASE("zero_shot_accuracy: the class with the largest dot product; 3 of 4 right is 0.75") {
  // Classes: c0 = (1, 0), c1 = (0, 1), c2 = (-1, 0).
  const auto cls = matrix(3, 2, {1, 0, 0, 1, -1, 0});
  // Images and their predictions: (0.9, 0.1) -> c0, (0.2, 0.8) -> c1, (-0.7, 0.5) -> c2, (0.6, 0.4) -> c0.
  const auto img = matrix(4, 2, {0.9f, 0.1f, 0.2f, 0.8f, -0.7f, 0.5f, 0.6f, 0.4f});
  CHECK(zero_shot_accuracy(img, {0, 1, 2, 0}, cls) == doctest::Approx(1.0));
  CHECK(zero_shot_accuracy(img, {0, 1, 2, 1}, cls) == doctest::Approx(0.75));  // the last one is wrong
  CHECK(zero_shot_accuracy(img, {1, 1, 0, 0}, cls) == doctest::Approx(0.5));
  CHECK(zero_shot_accuracy(img, {2, 0, 1, 2}, cls) == doctest::Approx(0.0));
}

TEST_CASE("zero_shot_accuracy: more classes than images, the largest dot product wins (not the smallest)") {
  // 5 classes in 3-D, two images; class 3 = (0, 0, 2) scores 2 * z.
  const auto cls = matrix(5, 3, {1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 2, -1, -1, -1});
  const auto img = matrix(2, 3, {0.1f, 0.2f, 0.9f, 0.8f, 0.1f, 0.1f});  // -> 3 (1.8 > 0.9), -> 0
  CHECK(zero_shot_accuracy(img, {3, 0}, cls) == doctest::Approx(1.0));
  CHECK(zero_shot_accuracy(img, {2, 0}, cls) == doctest::Approx(0.5));  // 2 loses to 3
  CHECK(zero_shot_accuracy(img, {4, 4}, cls) == doctest::Approx(0.0));  // 4 is the smallest, never the answer
  CHECK(zero_shot_accuracy(Tensor<float>(Shape{0, 3}), {}, cls) == 0.0);
}

// ---- retrieval ---------------------------------------------------------------------------------------------

TEST_CASE("unique_caption_retrieval: repeated captions are one candidate; a match is the exact caption") {
  // Captions a, b, a, c: the candidates are the texts of images 0 (a), 1 (b) and 3 (c); text 2 repeats a and is
  // not a candidate (it points at c, so using it would change every answer below).
  const auto txt = matrix(4, 3, {1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1});
  const auto img = matrix(4, 3, {1, 0, 0, 0.9f, 0.1f, 0, 0, 0, 1, 0, 0.2f, 0.8f});
  const auto r = unique_caption_retrieval(img, txt, {"a", "b", "a", "c"});
  CHECK(r.unique == 3);
  // Image -> caption: 0 -> a (right), 1 -> a (wrong, b), 2 -> c (wrong, a), 3 -> c (right).
  CHECK(r.i2t_at1 == doctest::Approx(0.5));
  // Caption -> image: a -> image 0 (captioned a: right), b -> image 3 (0.2 beats image 1's 0.1: wrong),
  // c -> image 2 (1 beats image 3's 0.8; image 2 is captioned a: wrong).
  CHECK(r.t2i_at1 == doctest::Approx(1.0 / 3.0));
  CHECK_THROWS_AS(unique_caption_retrieval(img, txt, {"a", "b"}), Error);
}

TEST_CASE("batched_contrastive_loss: the mean over pairs of each batch's loss; a last batch of one pair is left out") {
  const index_t n = 5, P = 3;
  Tensor<float> img(Shape{n, P}), txt(Shape{n, P});
  for (index_t i = 0; i < n * P; ++i) {
    img[i] = static_cast<float>(std::sin(0.7 * static_cast<double>(i) + 0.3));
    txt[i] = static_cast<float>(std::cos(1.3 * static_cast<double>(i)));
  }
  const float theta = 1.2f;
  // Naive: in each batch, logits s * <img_i, txt_j>; the mean of the row and column cross-entropies.
  auto naive = [&](index_t b0, index_t m) {
    const double s = std::exp(static_cast<double>(theta));
    std::vector<double> l(static_cast<std::size_t>(m * m));
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < m; ++j) {
        double d = 0;
        for (index_t p = 0; p < P; ++p) d += static_cast<double>(img[(b0 + i) * P + p]) * txt[(b0 + j) * P + p];
        l[static_cast<std::size_t>(i * m + j)] = s * d;
      }
    double sum = 0;
    for (index_t i = 0; i < m; ++i) {
      double row = 0, col = 0;
      for (index_t j = 0; j < m; ++j) row += std::exp(l[static_cast<std::size_t>(i * m + j)]), col += std::exp(l[static_cast<std::size_t>(j * m + i)]);
      sum += std::log(row) + std::log(col) - 2 * l[static_cast<std::size_t>(i * m + i)];
    }
    return sum / 2;  // summed over the batch's pairs
  };
  CHECK(batched_contrastive_loss(img, txt, theta, 100.f, 2) == doctest::Approx((naive(0, 2) + naive(2, 2)) / 4).epsilon(1e-5));
  CHECK(batched_contrastive_loss(img, txt, theta, 100.f, 3) == doctest::Approx((naive(0, 3) + naive(3, 2)) / 5).epsilon(1e-5));
  CHECK(batched_contrastive_loss(img, txt, theta, 100.f, 8) == doctest::Approx(naive(0, 5) / 5).epsilon(1e-5));
  CHECK_THROWS_AS(batched_contrastive_loss(img, txt, theta, 100.f, 1), Error);
}

namespace {

// Similarity S[i, j] = <img_i, txt_j>: with txt = the identity, img is S itself.
// S (12 x 12): diagonal 0.5, off-diagonal 0 except (row: columns)
//   row 1: S(1, 0) = 0.5 (a tie)
//   row 2: columns 0, 1, 3, 4 = 1
//   row 3: columns 0, 1, 2, 4, 5 = 1
//   row 4: columns 0..3, 5..9 = 1  (9 entries)
//   row 5: columns 0..4, 6..10 = 1 (10 entries)
// Image -> text rank of row i (entries >= the partner, partner excluded):
//   [0, 1, 4, 5, 9, 10, 0, 0, 0, 0, 0, 0]
//   R@1 = 7/12 (rows 0, 6..11), R@5 = 9/12 (+ rows 1, 2), R@10 = 11/12 (all but row 5)
// Text -> image rank of column j (rows >= the partner, partner excluded):
//   col 0: rows 1..5 -> 5; col 1: rows 2..5 -> 4; col 2: rows 3, 4, 5 -> 3; col 3: 2, 4, 5 -> 3; col 4: 2, 3, 5 -> 3;
//   col 5: 3, 4 -> 2; cols 6..9: 4, 5 -> 2; col 10: 5 -> 1; col 11: 0
//   R@1 = 1/12, R@5 = 11/12, R@10 = 12/12
Tensor<float> similarity() {
  const index_t n = 12;
  Tensor<float> s(Shape{n, n});
  for (index_t i = 0; i < n; ++i) s[i * n + i] = 0.5f;
  s[1 * n + 0] = 0.5f;
  for (index_t j : {0, 1, 3, 4}) s[2 * n + j] = 1.f;
  for (index_t j : {0, 1, 2, 4, 5}) s[3 * n + j] = 1.f;
  for (index_t j : {0, 1, 2, 3, 5, 6, 7, 8, 9}) s[4 * n + j] = 1.f;
  for (index_t j : {0, 1, 2, 3, 4, 6, 7, 8, 9, 10}) s[5 * n + j] = 1.f;
  return s;
}

Tensor<float> identity(index_t n) {
  Tensor<float> t(Shape{n, n});
  for (index_t i = 0; i < n; ++i) t[i * n + i] = 1.f;
  return t;
}

}  // namespace

TEST_CASE("retrieval_recall: known ranks, ties against the query, recall@1/5/10 distinct, i2t vs t2i") {
  const auto r = retrieval_recall(similarity(), identity(12));
  CHECK(r.i2t[0] == doctest::Approx(7.0 / 12));
  CHECK(r.i2t[1] == doctest::Approx(9.0 / 12));
  CHECK(r.i2t[2] == doctest::Approx(11.0 / 12));
  CHECK(r.t2i[0] == doctest::Approx(1.0 / 12));
  CHECK(r.t2i[1] == doctest::Approx(11.0 / 12));
  CHECK(r.t2i[2] == doctest::Approx(12.0 / 12));
}

TEST_CASE("retrieval_recall: swapping the roles of images and texts swaps i2t and t2i") {
  // <txt_i, img_j> with img = identity and txt = S gives S transposed.
  const auto r = retrieval_recall(identity(12), similarity());
  CHECK(r.t2i[0] == doctest::Approx(7.0 / 12));
  CHECK(r.t2i[1] == doctest::Approx(9.0 / 12));
  CHECK(r.t2i[2] == doctest::Approx(11.0 / 12));
  CHECK(r.i2t[0] == doctest::Approx(1.0 / 12));
  CHECK(r.i2t[1] == doctest::Approx(11.0 / 12));
  CHECK(r.i2t[2] == doctest::Approx(1.0));
}

TEST_CASE("retrieval_recall: perfect embeddings score 1, a constant model scores 0 at k < n (all ties)") {
  const auto perfect = retrieval_recall(identity(6), identity(6));
  for (int k = 0; k < 3; ++k) {
    CHECK(perfect.i2t[k] == doctest::Approx(1.0));
    CHECK(perfect.t2i[k] == doctest::Approx(1.0));
  }
  const index_t n = 12;
  Tensor<float> constant(Shape{n, 2}, 0.5f);
  const auto c = retrieval_recall(constant, constant);  // every partner ties with the n - 1 others: rank 11
  for (int k = 0; k < 3; ++k) {
    CHECK(c.i2t[k] == 0.0);
    CHECK(c.t2i[k] == 0.0);
  }
  // n = 4, constant: rank 3, so recall@1 = 0 but recall@5 = recall@10 = 1.
  Tensor<float> small(Shape{4, 2}, 1.f);
  const auto s = retrieval_recall(small, small);
  CHECK(s.i2t[0] == 0.0);
  CHECK(s.i2t[1] == doctest::Approx(1.0));
  CHECK(s.t2i[2] == doctest::Approx(1.0));
}

// ---- linear probe ----------------------------------------------------------------------------------------

namespace {

// Three classes in 2-D at (0, 0), (4, 0), (0, 4), `shots` examples each, jittered by at most 0.3 per
// coordinate (deterministic). Optional affine map per coordinate: x -> offset + scale * x.
struct Points {
  Tensor<float> x;
  std::vector<int> y;
};

Points cluster_points(const std::vector<int>& labels, int salt, double offset = 0, double scale = 1, bool constant_col = false) {
  const double cx[3] = {0, 4, 0}, cy[3] = {0, 0, 4};
  const index_t n = static_cast<index_t>(labels.size()), d = constant_col ? 3 : 2;
  Points p{Tensor<float>(Shape{n, d}), labels};
  for (index_t i = 0; i < n; ++i) {
    const int c = labels[static_cast<std::size_t>(i)];
    const double jx = 0.3 * std::sin(1.7 * static_cast<double>(i) + salt), jy = 0.3 * std::cos(2.3 * static_cast<double>(i) + 2 * salt);
    p.x[i * d + 0] = static_cast<float>(offset + scale * (cx[c] + jx));
    p.x[i * d + 1] = static_cast<float>(offset + scale * (cy[c] + jy));
    if (constant_col) p.x[i * d + 2] = static_cast<float>(offset);  // zero variance: standardised by the 1e-8 floor
  }
  return p;
}

std::vector<int> shots(int per_class) {
  std::vector<int> y;
  for (int i = 0; i < per_class; ++i)
    for (int c = 0; c < 3; ++c) y.push_back(c);
  return y;
}

}  // namespace

TEST_CASE("linear_probe_accuracy: separable clusters are classified perfectly") {
  const auto train = cluster_points(shots(10), 0);
  const auto test = cluster_points({0, 1, 2, 2, 1, 0, 1}, 5);
  CHECK(linear_probe_accuracy(train.x, train.y, test.x, test.y, 3) == doctest::Approx(1.0));
}

TEST_CASE("linear_probe_accuracy: a test point given two labels caps the accuracy at 5/6") {
  // Four clear test points plus the centre of class 0 twice, labelled 0 and 1: any classifier gets exactly one
  // of the two, and the clear ones are right at the smallest ridge penalty, so the best over the grid is 5/6.
  const auto train = cluster_points(shots(10), 0);
  auto test = cluster_points({0, 1, 2, 1, 0, 0}, 9);
  for (index_t i : {4, 5}) {
    test.x[i * 2 + 0] = 0.f;
    test.x[i * 2 + 1] = 0.f;
  }
  test.y = {0, 1, 2, 1, 0, 1};
  CHECK(linear_probe_accuracy(train.x, train.y, test.x, test.y, 3) == doctest::Approx(5.0 / 6.0));
  // Labels that are all wrong for clear points: 0.
  const auto clear = cluster_points({0, 1, 2}, 4);
  CHECK(linear_probe_accuracy(train.x, train.y, clear.x, {1, 2, 0}, 3) == 0.0);
}

TEST_CASE("linear_probe_accuracy: the test set is standardised with the training statistics") {
  // The test set holds class 1 only. Standardised with its own mean it would sit at the training mean
  // (4/3, 4/3), which is on class 0's side; with the training statistics it stays at (4, 0).
  const auto train = cluster_points(shots(10), 0);
  const auto test = cluster_points({1, 1, 1, 1, 1, 1}, 3);
  CHECK(linear_probe_accuracy(train.x, train.y, test.x, test.y, 3) == doctest::Approx(1.0));
  const auto test2 = cluster_points({2, 2, 2, 2}, 7);
  CHECK(linear_probe_accuracy(train.x, train.y, test2.x, test2.y, 3) == doctest::Approx(1.0));
}

TEST_CASE("linear_probe_accuracy: a huge offset and scale, and a constant feature, still classify") {
  const auto train = cluster_points(shots(10), 0, 3e4, 1e3, true);
  const auto test = cluster_points({1, 1, 1, 1, 0, 2}, 3, 3e4, 1e3, true);
  CHECK(linear_probe_accuracy(train.x, train.y, test.x, test.y, 3) == doctest::Approx(1.0));
  const auto test1 = cluster_points({1, 1, 1, 1, 1}, 6, 3e4, 1e3, true);
  CHECK(linear_probe_accuracy(train.x, train.y, test1.x, test1.y, 3) == doctest::Approx(1.0));
}

// ---- routing summary -------------------------------------------------------------------------------------

namespace {

using Counts = std::vector<index_t>;

// Four per-expert counts. (Built element by element: GCC 12.2 at -O3 -march=native on this machine produced
// wrong contents for these vectors when they were brace-initialised from literal lists at the call site.)
Counts counts(index_t e0, index_t e1, index_t e2, index_t e3) {
  Counts c;
  for (index_t v : {e0, e1, e2, e3}) c.push_back(v);
  return c;
}

moe::RoutingStats stats(std::array<index_t, 2> tokens, const Counts& routed_img, const Counts& routed_txt,
                        const Counts& dropped_img, const Counts& dropped_txt, std::array<double, 2> local,
                        std::array<double, 2> global) {
  moe::RoutingStats s;
  s.experts = 4;
  s.top_k = 2;
  s.tokens = tokens;
  s.routed[0] = routed_img;
  s.routed[1] = routed_txt;
  s.dropped[0] = dropped_img;
  s.dropped[1] = dropped_txt;
  s.local_entropy = local;
  s.global_entropy = global;
  // Every token makes top_k = 2 choices, each either accepted (routed) or dropped.
  for (int m = 0; m < 2; ++m) {
    index_t all = 0;
    for (int e = 0; e < 4; ++e) all += s.routed[m][static_cast<std::size_t>(e)] + s.dropped[m][static_cast<std::size_t>(e)];
    INFO("modality " << m);
    REQUIRE(all == 2 * tokens[static_cast<std::size_t>(m)]);
  }
  return s;
}

}  // namespace

TEST_CASE("RoutingSummary: sums, drop rates, image shares, used experts, token-weighted entropy means") {
  // Call A: 4 image tokens, 2 text tokens.   Call B: 2 image tokens, 6 text tokens.
  const auto a = stats({4, 2}, counts(3, 2, 1, 0), counts(1, 1, 0, 0), counts(1, 0, 1, 0), counts(0, 1, 1, 0), {0.5, 1.0}, {1.0, 0.8});
  const auto b = stats({2, 6}, counts(0, 4, 0, 0), counts(5, 4, 0, 0), counts(0, 0, 0, 0), counts(1, 0, 2, 0), {0.2, 0.4}, {0.7, 1.1});
  RoutingSummary s;
  s.add(a);
  s.add(b);
  CHECK(s.experts == 4);
  CHECK(s.top_k == 2);
  CHECK(s.tokens[0] == 6);
  CHECK(s.tokens[1] == 8);
  CHECK(s.routed[0] == std::vector<index_t>{3, 6, 1, 0});
  CHECK(s.routed[1] == std::vector<index_t>{6, 5, 0, 0});
  CHECK(s.dropped[0] == std::vector<index_t>{1, 0, 1, 0});
  CHECK(s.dropped[1] == std::vector<index_t>{1, 1, 3, 0});
  // Drop rate: dropped choices over tokens * top_k.
  CHECK(s.drop_rate(0) == doctest::Approx(2.0 / 12.0));
  CHECK(s.drop_rate(1) == doctest::Approx(5.0 / 16.0));
  // Image share per expert: image choices over all accepted choices; 0 for an expert that got none.
  CHECK(s.image_share(0) == doctest::Approx(3.0 / 9.0));
  CHECK(s.image_share(1) == doctest::Approx(6.0 / 11.0));
  CHECK(s.image_share(2) == doctest::Approx(1.0));
  CHECK(s.image_share(3) == 0.0);
  // Used experts: at least min_share of the 21 accepted choices (9, 11, 1, 0).
  CHECK(s.experts_used() == 3);       // 1/21 = 0.048 >= 0.01
  CHECK(s.experts_used(0.05) == 2);   // expert 2 falls out
  CHECK(s.experts_used(0.45) == 1);   // 9/21 = 0.43 < 0.45 <= 11/21 = 0.52
  CHECK(s.experts_used(0.6) == 0);
  CHECK(s.experts_used(0.0) == 4);
  // Effective experts: exp(entropy) of a modality's accepted choices. Text: 6 and 5 of 11 on two experts.
  const double p6 = 6.0 / 11, p5 = 5.0 / 11;
  CHECK(s.effective_experts(1) == doctest::Approx(std::exp(-(p6 * std::log(p6) + p5 * std::log(p5)))));  // 1.99
  const double q[3] = {0.3, 0.6, 0.1};
  CHECK(s.effective_experts(0) == doctest::Approx(std::exp(-(q[0] * std::log(q[0]) + q[1] * std::log(q[1]) + q[2] * std::log(q[2])))));
  // Specialised experts (> 90% of an expert's accepted choices from one modality): expert 2 (1 image, 0 text);
  // expert 3 gets nothing and counts for neither.
  CHECK(s.specialised() == std::array<int, 2>{1, 0});
  CHECK(s.specialised(0.6) == std::array<int, 2>{1, 1});  // expert 0: 6 of 9 text
  // Entropies: means over calls weighted by each call's tokens of that modality.
  CHECK(s.local_entropy[0] == doctest::Approx((0.5 * 4 + 0.2 * 2) / 6));   // 0.4
  CHECK(s.local_entropy[1] == doctest::Approx((1.0 * 2 + 0.4 * 6) / 8));   // 0.55
  CHECK(s.global_entropy[0] == doctest::Approx((1.0 * 4 + 0.7 * 2) / 6));  // 0.9
  CHECK(s.global_entropy[1] == doctest::Approx((0.8 * 2 + 1.1 * 6) / 8));  // 1.025
  CHECK(s.local_entropy[0] == doctest::Approx(0.4));
  CHECK(s.global_entropy[1] == doctest::Approx(1.025));

  // Call C: images only. The text means must not move, whatever the (meaningless) text entropies say.
  const auto c = stats({2, 0}, counts(1, 1, 1, 1), counts(0, 0, 0, 0), counts(0, 0, 0, 0), counts(0, 0, 0, 0), {0.1, 99.0}, {0.3, 99.0});
  s.add(c);
  CHECK(s.tokens[0] == 8);
  CHECK(s.tokens[1] == 8);
  CHECK(s.local_entropy[1] == doctest::Approx(0.55));
  CHECK(s.global_entropy[1] == doctest::Approx(1.025));
  CHECK(s.local_entropy[0] == doctest::Approx((0.4 * 6 + 0.1 * 2) / 8));   // 0.325
  CHECK(s.global_entropy[0] == doctest::Approx((0.9 * 6 + 0.3 * 2) / 8));  // 0.75
  CHECK(s.drop_rate(0) == doctest::Approx(2.0 / 16.0));
  CHECK(s.image_share(3) == doctest::Approx(1.0));

  CHECK(s.specialised() == std::array<int, 2>{2, 0});  // expert 3 now has one image choice
  const auto j = s.to_json();
  CHECK(j["experts_used"] == 4);
  CHECK(j["experts_image_specialised"] == 2);
  CHECK(j["txt"]["effective_experts"].get<double>() == doctest::Approx(s.effective_experts(1)));
  CHECK(j["img"]["drop_rate"].get<double>() == doctest::Approx(0.125));
  CHECK(j["txt"]["tokens"] == 8);
}

TEST_CASE("RoutingSummary: an empty summary and a modality with no tokens report 0, not NaN") {
  RoutingSummary s;
  const auto a = stats({3, 0}, counts(2, 2, 1, 1), counts(0, 0, 0, 0), counts(0, 0, 0, 0), counts(0, 0, 0, 0), {0.6, 5.0}, {1.2, 5.0});
  s.add(a);
  CHECK(s.drop_rate(1) == 0.0);
  CHECK(s.local_entropy[1] == 0.0);
  CHECK(s.global_entropy[1] == 0.0);
  CHECK(s.local_entropy[0] == doctest::Approx(0.6));
  CHECK(s.drop_rate(0) == 0.0);
  CHECK(s.image_share(0) == doctest::Approx(1.0));
}

// ---- experiment statistics (eval/summary.hpp) ----------------------------------------------------------------

TEST_CASE("mean_sd and paired_difference: hand-computed values, only the seeds both arms ran are paired") {
  const MeanSd m = mean_sd({1, 2, 3, 6});
  CHECK(m.n == 4);
  CHECK(m.mean == doctest::Approx(3.0));
  CHECK(m.sd == doctest::Approx(std::sqrt(14.0 / 3.0)));  // (4 + 1 + 0 + 9) / (n - 1)
  CHECK(mean_sd({5}).sd == 0.0);
  CHECK(mean_sd({}).n == 0);
  // Differences over seeds 0, 1, 2 (seed 7 has no partner): 1, 2, 3 -> mean 2, sd 1, t(2) = 4.303.
  const std::map<int, double> arm{{0, 11}, {1, 12}, {2, 13}, {7, 99}}, base{{0, 10}, {1, 10}, {2, 10}, {5, -1}};
  const PairedDiff d = paired_difference(arm, base);
  CHECK(d.n == 3);
  CHECK(d.mean == doctest::Approx(2.0));
  CHECK(d.lo == doctest::Approx(2.0 - 4.303 / std::sqrt(3.0)));
  CHECK(d.hi == doctest::Approx(2.0 + 4.303 / std::sqrt(3.0)));
  CHECK_FALSE(d.excludes_zero());  // 4.303 / sqrt(3) = 2.48: [-0.48, 4.48] contains 0
  const PairedDiff e = paired_difference({{0, 12}, {1, 12.5}, {2, 13}}, base);  // 2, 2.5, 3: [1.26, 3.74]
  CHECK(e.excludes_zero());
  CHECK(e.lo == doctest::Approx(2.5 - 4.303 * 0.5 / std::sqrt(3.0)));
  const PairedDiff one = paired_difference({{0, 12}}, base);  // one pair: no interval
  CHECK(one.n == 1);
  CHECK(one.lo == one.hi);
  CHECK_FALSE(one.excludes_zero());
  CHECK(t_quantile_975(1) == doctest::Approx(12.706));
  CHECK(t_quantile_975(100) == doctest::Approx(1.96));
  CHECK_THROWS_AS(t_quantile_975(0), Error);
}
