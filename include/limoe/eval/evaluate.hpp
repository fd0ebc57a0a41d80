// limoe/eval/evaluate.hpp: evaluation over data sets: image embeddings of examples, zero-shot class vectors
// from a data set's prompts, routing reports over image-text pairs (semantics §5 and 6). The metrics on
// tensors (zero-shot accuracy, linear probe, retrieval, routing summaries) are in eval/metrics.hpp, which
// needs no data set; this header pulls in the data sets' interfaces.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "limoe/data/dataset.hpp"
#include "limoe/data/loader.hpp"
#include "limoe/eval/metrics.hpp"
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

// Routes image-text pairs of a data set jointly (images and texts share groups, as in training) in evaluation
// mode (no noise) and sums the statistics per MoE block, at `capacity_factor` (default: the model's evaluation
// factor; pass the training factor to measure drop rates as training sees them). Routes exactly
// min(max_pairs, ds.size()) pairs, the data set's first ones, in batches of `batch` (the last one shorter).
template <class Model, class Tok>
std::vector<RoutingSummary> routing_summary(Model& model, const Tok& tok, const data::AnyDataset& ds, index_t max_pairs,
                                            index_t batch = 128, std::uint64_t seed = 0,
                                            std::optional<double> capacity_factor = std::nullopt) {
  LIMOE_CHECK(max_pairs >= 1 && batch >= 1, "routing_summary: needs at least one pair and a positive batch, got ",
              max_pairs, " pairs in batches of ", batch);
  data::LoaderOptions lo = data::LoaderOptions::evaluation(std::min(batch, max_pairs), 0);
  lo.seed = seed;
  data::Loader<data::AnyDataset, Tok> loader(ds, tok, lo);
  std::vector<RoutingSummary> out;
  index_t seen = 0;
  while (seen < max_pairs) {
    auto b = loader.next();
    if (!b) break;
    const index_t take = std::min<index_t>(b->size(), max_pairs - seen);
    const auto f = model.forward(b->images.cview().slice(0, take), b->texts.cview().slice(0, take), Mode::Eval, 0,
                                 capacity_factor);
    if (out.empty()) {
      out.resize(f.stats.size());
      for (std::size_t i = 0; i < out.size(); ++i) out[i].block = f.route_blocks[i];
    }
    for (std::size_t i = 0; i < f.stats.size(); ++i) out[i].add(f.stats[i]);
    seen += take;
  }
  return out;
}

}  // namespace limoe
