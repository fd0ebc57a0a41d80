// limoe/eval/metrics.hpp: the evaluation metrics on embeddings (semantics §5 and 6): zero-shot accuracy,
// the few-shot linear probe, retrieval recall, routing summaries, and text embeddings in batches. No data set
// here (eval/evaluate.hpp adds the data-set-driven helpers).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <nlohmann/json.hpp>

#include "limoe/core/enums.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/moe/stats.hpp"
#include "limoe/ops/contrastive.hpp"

namespace limoe {

// The metrics are `template <class = void>`: called as plain functions, but their Eigen products and solves are
// compiled only in the translation units that call them, not in every one that includes <limoe/limoe.hpp>
// (about 4 s each on 2 cores; docs/testing.md, "Build time").

// Text embeddings [n, P] of token ids [n, T], in batches.
template <class Model>
Tensor<float> embed_texts(Model& model, CView<std::int32_t> ids, index_t batch = 512) {
  const index_t n = ids.dim(0), T = ids.dim(1), P = model.config().proj_dim;
  Tensor<float> out(Shape{n, P});  // [n, P]
  for (index_t b0 = 0; b0 < n; b0 += batch) {
    const index_t b1 = std::min(n, b0 + batch);
    const auto f = model.forward(CView<float>{}, CView<std::int32_t>(ids.data() + b0 * T, Shape{b1 - b0, T}), Mode::Eval);
    std::copy(f.txt_emb.data(), f.txt_emb.data() + f.txt_emb.numel(), out.data() + b0 * P);
  }
  return out;
}

// Index of the largest entry of each row of a [n, m] matrix.
template <class = void>
std::vector<int> argmax_rows(const Eigen::MatrixXf& s) {
  std::vector<int> out(static_cast<std::size_t>(s.rows()));
  for (Eigen::Index i = 0; i < s.rows(); ++i) s.row(i).maxCoeff(&out[static_cast<std::size_t>(i)]);
  return out;
}

template <class = void>
Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> as_matrix(const Tensor<float>& t) {
  return {t.data(), t.dim(0), t.dim(1)};
}

// Top-1 accuracy of zero-shot classification: the class whose vector has the largest dot product.
template <class = void>
double zero_shot_accuracy(const Tensor<float>& img_emb, const std::vector<int>& labels, const Tensor<float>& class_emb) {
  LIMOE_CHECK(static_cast<index_t>(labels.size()) == img_emb.dim(0), "zero_shot_accuracy: ", labels.size(),
              " labels for ", img_emb.dim(0), " image embeddings");
  LIMOE_CHECK(img_emb.rank() == 2 && class_emb.rank() == 2 && img_emb.dim(1) == class_emb.dim(1),
              "zero_shot_accuracy: image embeddings ", img_emb.shape().str(), " and class vectors ",
              class_emb.shape().str(), " must share their width");
  const Eigen::MatrixXf s = as_matrix(img_emb) * as_matrix(class_emb).transpose();  // [n, C]
  const auto pred = argmax_rows(s);
  index_t ok = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) ok += pred[i] == labels[i];
  return labels.empty() ? 0.0 : static_cast<double>(ok) / static_cast<double>(labels.size());
}

// Few-shot linear probe (semantics §5): features standardised with the training shots' statistics, plus a
// bias feature; one-hot targets in {-1, +1}; closed-form ridge regression for each lambda of a grid; the best
// test accuracy over the grid is reported (as big_vision's few-shot evaluator does).
template <class = void>
double linear_probe_accuracy(const Tensor<float>& train_x, const std::vector<int>& train_y, const Tensor<float>& test_x,
                                    const std::vector<int>& test_y, int classes) {
  const Eigen::Index n = train_x.dim(0), d = train_x.dim(1);
  Eigen::MatrixXd X = as_matrix(train_x).cast<double>();
  const Eigen::RowVectorXd mean = X.colwise().mean();
  Eigen::RowVectorXd sd = ((X.rowwise() - mean).array().square().colwise().sum() / static_cast<double>(n)).sqrt();
  sd = sd.array().max(1e-8);
  auto standardise = [&](const Eigen::MatrixXd& A) {
    Eigen::MatrixXd Z(A.rows(), d + 1);
    Z.leftCols(d) = (A.rowwise() - mean).array().rowwise() / sd.array();
    Z.col(d).setOnes();
    return Z;
  };
  const Eigen::MatrixXd Z = standardise(X);
  const Eigen::MatrixXd Zt = standardise(as_matrix(test_x).cast<double>());
  Eigen::MatrixXd Y = Eigen::MatrixXd::Constant(n, classes, -1.0);
  for (Eigen::Index i = 0; i < n; ++i) Y(i, train_y[static_cast<std::size_t>(i)]) = 1.0;
  const Eigen::MatrixXd G = Z.transpose() * Z, ZY = Z.transpose() * Y;
  double best = 0;
  for (double lambda : {1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4}) {
    const Eigen::MatrixXd W = (G + lambda * Eigen::MatrixXd::Identity(d + 1, d + 1)).ldlt().solve(ZY);
    const Eigen::MatrixXd S = Zt * W;
    index_t ok = 0;
    for (Eigen::Index i = 0; i < S.rows(); ++i) {
      Eigen::Index arg;
      S.row(i).maxCoeff(&arg);
      ok += arg == test_y[static_cast<std::size_t>(i)];
    }
    best = std::max(best, static_cast<double>(ok) / static_cast<double>(S.rows()));
  }
  return best;
}

struct RetrievalRecall {
  double i2t[3]{}, t2i[3]{};  // recall at 1, 5, 10
};

// Image i and text i are a pair. Recall@k: the pair's partner ranks among the k best of n (ties counted
// against the query, so a constant model scores chance).
template <class = void>
RetrievalRecall retrieval_recall(const Tensor<float>& img, const Tensor<float>& txt) {
  const Eigen::MatrixXf s = as_matrix(img) * as_matrix(txt).transpose();  // [n, n]
  const Eigen::Index n = s.rows();
  RetrievalRecall r;
  const int ks[3] = {1, 5, 10};
  for (Eigen::Index i = 0; i < n; ++i) {
    index_t rank_i2t = 0, rank_t2i = 0;  // entries scoring at least the partner's, the partner excluded
    for (Eigen::Index j = 0; j < n; ++j) {
      if (j == i) continue;
      rank_i2t += s(i, j) >= s(i, i);
      rank_t2i += s(j, i) >= s(i, i);
    }
    for (int k = 0; k < 3; ++k) {
      r.i2t[k] += rank_i2t < ks[k];
      r.t2i[k] += rank_t2i < ks[k];
    }
  }
  for (int k = 0; k < 3; ++k) {
    r.i2t[k] /= static_cast<double>(std::max<Eigen::Index>(n, 1));
    r.t2i[k] /= static_cast<double>(std::max<Eigen::Index>(n, 1));
  }
  return r;
}

// The contrastive loss (the training objective, ops/contrastive.hpp) of the pairs (img[i], txt[i]) of held-out
// data, cut into consecutive batches of `batch` pairs (the last may be shorter; a last batch of one pair is left
// out), at temperature exp(theta) clamped to max_scale; the mean over pairs.
template <class = void>
double batched_contrastive_loss(const Tensor<float>& img, const Tensor<float>& txt, float theta,
                                       float max_scale, index_t batch) {
  LIMOE_CHECK(img.shape() == txt.shape() && img.rank() == 2 && batch >= 2, "batched_contrastive_loss: [n, P] image "
              "and text embeddings and batches of at least 2 pairs, got ", img.shape().str(), ", ",
              txt.shape().str(), ", batch ", batch);
  const index_t n = img.dim(0), P = img.dim(1);
  double sum = 0;
  index_t pairs = 0;
  Tensor<float> logits;
  for (index_t b0 = 0; b0 + 1 < n; b0 += batch) {
    const index_t m = std::min(batch, n - b0);
    if (m < 2) break;
    logits.resize(Shape{m, m});
    const auto r = cpu::contrastive_forward<float>(CView<float>(img.data() + b0 * P, Shape{m, P}),
                                                   CView<float>(txt.data() + b0 * P, Shape{m, P}), theta, max_scale,
                                                   logits.view());
    sum += r.loss * static_cast<double>(m);
    pairs += m;
  }
  return pairs > 0 ? sum / static_cast<double>(pairs) : 0.0;
}

// Retrieval over a pool whose captions repeat (a caption names a class, an attribute set): the pool's distinct
// captions are the candidates. Image i's caption is captions[i]; its text embedding txt[i]. Image -> text: the
// best of the distinct captions is image i's own caption. Text -> image: for each distinct caption, the best
// image is one of the images captioned with exactly it. Ties count against the query, as above.
struct UniqueRetrieval {
  index_t unique = 0;          // distinct captions in the pool
  double i2t_at1 = 0, t2i_at1 = 0;
};
template <class = void>
UniqueRetrieval unique_caption_retrieval(const Tensor<float>& img, const Tensor<float>& txt,
                                                const std::vector<std::string>& captions) {
  const index_t n = img.dim(0);
  LIMOE_CHECK(txt.dim(0) == n && static_cast<index_t>(captions.size()) == n, "unique_caption_retrieval: ", n,
              " images, ", txt.dim(0), " texts and ", captions.size(), " captions");
  // Distinct captions in order of first appearance, and each image's caption id.
  std::vector<index_t> first, id(static_cast<std::size_t>(n));
  std::map<std::string, index_t> seen;
  for (index_t i = 0; i < n; ++i) {
    const auto [it, added] = seen.emplace(captions[static_cast<std::size_t>(i)], static_cast<index_t>(first.size()));
    if (added) first.push_back(i);
    id[static_cast<std::size_t>(i)] = it->second;
  }
  const index_t U = static_cast<index_t>(first.size());
  Tensor<float> cand(Shape{U, txt.dim(1)});
  for (index_t u = 0; u < U; ++u)
    std::copy_n(txt.data() + first[static_cast<std::size_t>(u)] * txt.dim(1), txt.dim(1), cand.data() + u * txt.dim(1));
  const Eigen::MatrixXf s = as_matrix(img) * as_matrix(cand).transpose();  // [n, U]
  UniqueRetrieval r;
  r.unique = U;
  for (index_t i = 0; i < n; ++i) {  // image -> distinct captions
    const index_t own = id[static_cast<std::size_t>(i)];
    bool best = true;
    for (index_t u = 0; u < U && best; ++u) best = u == own || s(i, u) < s(i, own);
    r.i2t_at1 += best;
  }
  for (index_t u = 0; u < U; ++u) {  // distinct caption -> images: the best matching image vs the best other
    float best_match = -INFINITY, best_other = -INFINITY;
    for (index_t i = 0; i < n; ++i) {
      float& b = id[static_cast<std::size_t>(i)] == u ? best_match : best_other;
      b = std::max(b, s(i, u));
    }
    r.t2i_at1 += best_match > best_other;
  }
  r.i2t_at1 /= static_cast<double>(std::max<index_t>(n, 1));
  r.t2i_at1 /= static_cast<double>(std::max<index_t>(U, 1));
  return r;
}

// Routing statistics of one MoE block summed over many calls.
struct RoutingSummary {
  int block = 0, experts = 0, top_k = 0;
  std::array<std::vector<index_t>, 2> routed, dropped;  // [modality][expert] choices
  std::array<index_t, 2> tokens{};
  std::array<double, 2> local_entropy{}, global_entropy{};  // token-weighted means over calls
  std::array<std::vector<double>, 2> gate_mass;             // [modality][expert] accepted choices

  void add(const moe::RoutingStats& s) {
    experts = s.experts;
    top_k = s.top_k;
    for (int m = 0; m < 2; ++m) {
      routed[m].resize(static_cast<std::size_t>(experts));
      dropped[m].resize(static_cast<std::size_t>(experts));
      for (int e = 0; e < experts; ++e) {
        routed[m][static_cast<std::size_t>(e)] += s.routed[m][static_cast<std::size_t>(e)];
        dropped[m][static_cast<std::size_t>(e)] += s.dropped[m][static_cast<std::size_t>(e)];
      }
      const double w = static_cast<double>(s.tokens[m]);
      const double t = static_cast<double>(tokens[m]) + w;
      if (t > 0) {
        local_entropy[m] = (local_entropy[m] * static_cast<double>(tokens[m]) + s.local_entropy[m] * w) / t;
        global_entropy[m] = (global_entropy[m] * static_cast<double>(tokens[m]) + s.global_entropy[m] * w) / t;
      }
      tokens[m] += s.tokens[m];
    }
  }
  double drop_rate(int m) const {
    const double all = static_cast<double>(tokens[m]) * top_k;
    index_t d = 0;
    for (auto v : dropped[m]) d += v;
    return all > 0 ? static_cast<double>(d) / all : 0.0;
  }
  double image_share(int e) const {
    const double i = static_cast<double>(routed[0][static_cast<std::size_t>(e)]);
    const double t = static_cast<double>(routed[1][static_cast<std::size_t>(e)]);
    return i + t > 0 ? i / (i + t) : 0.0;
  }
  // exp(entropy) of modality m's accepted choices over the experts: how many experts it effectively uses (1 when
  // all go to one expert, E when spread evenly).
  double effective_experts(int m) const {
    double total = 0, h = 0;
    for (auto v : routed[m]) total += static_cast<double>(v);
    if (total <= 0) return 0.0;
    for (auto v : routed[m])
      if (v > 0) h -= static_cast<double>(v) / total * std::log(static_cast<double>(v) / total);
    return std::exp(h);
  }
  // Experts of which more than `share` of the accepted choices come from one modality (modality-specialised),
  // among the experts that receive any; [0] image-specialised, [1] text-specialised.
  std::array<int, 2> specialised(double share = 0.9) const {
    std::array<int, 2> n{};
    for (int e = 0; e < experts; ++e) {
      const double i = static_cast<double>(routed[0][static_cast<std::size_t>(e)]);
      const double t = static_cast<double>(routed[1][static_cast<std::size_t>(e)]);
      if (i + t <= 0) continue;
      n[0] += i / (i + t) > share;
      n[1] += t / (i + t) > share;
    }
    return n;
  }
  // Experts that receive at least `min_share` of the choices of all tokens (a used expert).
  int experts_used(double min_share = 0.01) const {
    index_t total = 0;
    for (int m = 0; m < 2; ++m) for (auto v : routed[m]) total += v;
    int used = 0;
    for (int e = 0; e < experts; ++e)
      used += static_cast<double>(routed[0][static_cast<std::size_t>(e)] + routed[1][static_cast<std::size_t>(e)]) >=
              min_share * static_cast<double>(total);
    return used;
  }
  nlohmann::json to_json() const {
    nlohmann::json j = {{"block", block}, {"experts", experts}, {"top_k", top_k}, {"experts_used", experts_used()}};
    std::vector<double> share;
    for (int e = 0; e < experts; ++e) share.push_back(image_share(e));
    j["image_share"] = share;
    const auto spec = specialised();
    j["experts_image_specialised"] = spec[0];  // > 90% of an expert's choices from images
    j["experts_text_specialised"] = spec[1];
    const char* names[2] = {"img", "txt"};
    for (int m = 0; m < 2; ++m)
      j[names[m]] = {{"tokens", tokens[m]},
                     {"drop_rate", drop_rate(m)},
                     {"effective_experts", effective_experts(m)},
                     {"routed", routed[m]},
                     {"dropped", dropped[m]},
                     {"local_entropy", local_entropy[m]},
                     {"global_entropy", global_entropy[m]}};
    return j;
  }
};

}  // namespace limoe
