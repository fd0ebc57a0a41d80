// limoe/eval/evaluate.hpp: zero-shot classification, 10-shot linear probe, retrieval and routing reports
// (semantics §5 and 6).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <nlohmann/json.hpp>

#include "limoe/data/dataset.hpp"
#include "limoe/data/loader.hpp"
#include "limoe/model/model.hpp"

namespace limoe {

// Image embeddings [n, P] of data set examples `idx`, in batches (evaluation mode: no noise, eval capacity).
template <class Model>
Tensor<float> embed_images(Model& model, const data::AnyDataset& ds, const std::vector<index_t>& idx, index_t batch = 256) {
  const auto& c = model.config();
  const auto shape = ds.image_shape();
  LIMOE_CHECK(shape.height == c.image_size[0] && shape.width == c.image_size[1] && shape.channels == c.channels,
              "embed_images: the data set's images are ", shape.str(), ", the model takes ", c.image_size[0], "x",
              c.image_size[1], "x", c.channels);
  const index_t n = static_cast<index_t>(idx.size()), P = c.proj_dim, px = shape.numel();
  Tensor<float> out(Shape{n, P});  // [n, P]
  const Rng rng(0);
  for (index_t b0 = 0; b0 < n; b0 += batch) {
    const index_t b1 = std::min(n, b0 + batch);
    Tensor<float> images(Shape{b1 - b0, shape.height, shape.width, shape.channels});  // [B, H, W, C]
    for (index_t i = b0; i < b1; ++i) {
      const auto ex = ds.get(idx[static_cast<std::size_t>(i)], rng);
      std::copy(ex.image.begin(), ex.image.end(), images.data() + (i - b0) * px);
    }
    const auto f = model.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
    std::copy(f.img_emb.data(), f.img_emb.data() + f.img_emb.numel(), out.data() + b0 * P);
  }
  return out;
}

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

// Class vectors for zero-shot classification [classes, P]: each class's prompts (the data set's evaluation
// templates, never seen in training) embedded, L2-normalised, averaged and re-normalised (CLIP's convention).
template <class Model, class Tok>
Tensor<float> class_embeddings(Model& model, const Tok& tok, const data::AnyDataset& ds) {
  const auto names = ds.class_names();
  const index_t C = static_cast<index_t>(names.size()), P = model.config().proj_dim;
  Tensor<float> out(Shape{C, P});  // [C, P]
  for (index_t c = 0; c < C; ++c) {
    const auto prompts = ds.class_prompts(static_cast<int>(c));
    const auto ids = data::encode_texts(tok, prompts);
    const auto e = embed_texts(model, ids.cview());
    double norm = 0;
    for (index_t p = 0; p < P; ++p) {
      double s = 0;
      for (index_t i = 0; i < e.dim(0); ++i) s += e[i * P + p];
      out[c * P + p] = static_cast<float>(s / static_cast<double>(e.dim(0)));
      norm += static_cast<double>(out[c * P + p]) * out[c * P + p];
    }
    const float inv = static_cast<float>(1.0 / (std::sqrt(norm) + 1e-12));
    for (index_t p = 0; p < P; ++p) out[c * P + p] *= inv;
  }
  return out;
}

// Index of the largest entry of each row of a [n, m] matrix.
inline std::vector<int> argmax_rows(const Eigen::MatrixXf& s) {
  std::vector<int> out(static_cast<std::size_t>(s.rows()));
  for (Eigen::Index i = 0; i < s.rows(); ++i) s.row(i).maxCoeff(&out[static_cast<std::size_t>(i)]);
  return out;
}

inline Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> as_matrix(const Tensor<float>& t) {
  return {t.data(), t.dim(0), t.dim(1)};
}

// Top-1 accuracy of zero-shot classification: the class whose vector has the largest dot product.
inline double zero_shot_accuracy(const Tensor<float>& img_emb, const std::vector<int>& labels, const Tensor<float>& class_emb) {
  const Eigen::MatrixXf s = as_matrix(img_emb) * as_matrix(class_emb).transpose();  // [n, C]
  const auto pred = argmax_rows(s);
  index_t ok = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) ok += pred[i] == labels[i];
  return labels.empty() ? 0.0 : static_cast<double>(ok) / static_cast<double>(labels.size());
}

// Few-shot linear probe (semantics §5): features standardised with the training shots' statistics, plus a
// bias feature; one-hot targets in {-1, +1}; closed-form ridge regression for each lambda of a grid; the best
// test accuracy over the grid is reported (as big_vision's few-shot evaluator does).
inline double linear_probe_accuracy(const Tensor<float>& train_x, const std::vector<int>& train_y, const Tensor<float>& test_x,
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
inline RetrievalRecall retrieval_recall(const Tensor<float>& img, const Tensor<float>& txt) {
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
    const char* names[2] = {"img", "txt"};
    for (int m = 0; m < 2; ++m)
      j[names[m]] = {{"tokens", tokens[m]},
                     {"drop_rate", drop_rate(m)},
                     {"routed", routed[m]},
                     {"dropped", dropped[m]},
                     {"local_entropy", local_entropy[m]},
                     {"global_entropy", global_entropy[m]}};
    return j;
  }
};

// Routes image-text pairs of a data set jointly (images and texts share groups, as in training) in evaluation
// mode (no noise) and sums the statistics per MoE block, at `capacity_factor` (default: the model's evaluation
// factor; pass the training factor to measure drop rates as training sees them).
template <class Model, class Tok>
std::vector<RoutingSummary> routing_summary(Model& model, const Tok& tok, const data::AnyDataset& ds, index_t max_pairs,
                                            index_t batch = 128, std::uint64_t seed = 0,
                                            std::optional<double> capacity_factor = std::nullopt) {
  data::LoaderOptions lo = data::LoaderOptions::evaluation(batch, 0);
  lo.seed = seed;
  data::Loader<data::AnyDataset, Tok> loader(ds, tok, lo);
  std::vector<RoutingSummary> out;
  index_t seen = 0;
  while (seen < max_pairs) {
    auto b = loader.next();
    if (!b) break;
    const auto f = model.forward(b->images.cview(), b->texts.cview(), Mode::Eval, 0, capacity_factor);
    if (out.empty()) {
      out.resize(f.stats.size());
      for (std::size_t i = 0; i < out.size(); ++i) out[i].block = f.route_blocks[i];
    }
    for (std::size_t i = 0; i < f.stats.size(); ++i) out[i].add(f.stats[i]);
    seen += b->size();
  }
  return out;
}

}  // namespace limoe
