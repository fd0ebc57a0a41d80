// `limoe eval`: zero-shot top-1, 10-shot linear probe, retrieval recall@1/5/10 on a data set's test split.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <numeric>

#include <limoe/core/parallel.hpp>
#include <limoe/eval/evaluate.hpp>
#include <limoe/model/presets.hpp>

#include "session.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_eval {
namespace {
using namespace limoe;

// `shots` examples of each class from the training split, the first ones in a seeded shuffle.
std::vector<index_t> few_shot_indices(const data::AnyDataset& ds, int classes, int shots, std::vector<int>& labels) {
  std::vector<index_t> idx;
  std::vector<int> count(static_cast<std::size_t>(classes), 0);
  const Rng rng(1234);
  const index_t n = ds.size();
  // A fixed stride walk through the data set (a permutation when gcd(stride, n) = 1).
  index_t stride = 7919;
  while (std::gcd(stride, n) != 1) ++stride;
  for (index_t k = 0, i = 0; k < n && static_cast<int>(idx.size()) < classes * shots; ++k, i = (i + stride) % n) {
    const auto ex = ds.get(i, rng);
    if (ex.label < 0 || ex.label >= classes || count[static_cast<std::size_t>(ex.label)] >= shots) continue;
    ++count[static_cast<std::size_t>(ex.label)];
    idx.push_back(i);
    labels.push_back(ex.label);
  }
  return idx;
}

// Fashion-MNIST scenes: zero-shot over the 60 colour-noun combinations ("a photo of a small red sandal.", both
// sizes and every held-out template averaged per combination) on the single-object test scenes among the first
// n, scored separately on combinations training never showed (compositional) and on seen ones.
template <class Model>
void compositional(Model& model, const data::WordTokenizer& tok, const data::DataSource& src, index_t n,
                   nlohmann::json& out) {
  using data::FashionScenes;
  const FashionScenes scenes(data::Split::test, src.path.empty() ? data::kFashionMnistDir : src.path);
  const data::AnyDataset any(scenes);
  constexpr int kCombos = FashionScenes::kColours * 10;
  std::vector<std::string> prompts;
  for (int combo = 0; combo < kCombos; ++combo)
    for (const auto& t : FashionScenes::eval_templates())
      for (bool large : {false, true})
        prompts.push_back(data::fill_template(t, FashionScenes::describe_object(combo % 10, combo / 10, large)));
  const Tensor<float> pe = embed_texts(model, data::encode_texts(tok, prompts).cview());
  const index_t P = pe.dim(1), per = static_cast<index_t>(prompts.size()) / kCombos;
  Tensor<float> combos(Shape{kCombos, P});  // the mean of each combination's prompts, normalised
  for (index_t c = 0; c < kCombos; ++c) {
    double norm = 0;
    for (index_t d = 0; d < P; ++d) {
      float s = 0;
      for (index_t k = 0; k < per; ++k) s += pe[(c * per + k) * P + d];
      combos[c * P + d] = s;
      norm += static_cast<double>(s) * s;
    }
    for (index_t d = 0; d < P; ++d) combos[c * P + d] = static_cast<float>(combos[c * P + d] / std::sqrt(std::max(norm, 1e-30)));
  }
  for (bool held : {true, false}) {
    std::vector<index_t> idx;
    std::vector<int> labels;
    for (index_t i = 0; i < n; ++i) {
      const auto s = scenes.scene(i);
      if (s.objects.size() != 1 || FashionScenes::held_out(s.objects[0].colour, s.objects[0].cls) != held) continue;
      idx.push_back(i);
      labels.push_back(s.objects[0].colour * 10 + s.objects[0].cls);
    }
    const std::string key = held ? "compositional_zero_shot" : "seen_combination_zero_shot";
    out[key] = idx.empty() ? 0.0 : zero_shot_accuracy(embed_images(model, any, idx), labels, combos);
    out[key + "_scenes"] = idx.size();
  }
}

int run(const std::vector<std::string>& argv) {
  auto opts = cli::kDataOptions;
  opts.insert({"checkpoint", "max-test", "retrieval", "threads", "shots"});
  opts.insert(cli::kBackendOptions.begin(), cli::kBackendOptions.end());
  cli::Args args(argv, opts, {}, "eval");
  cli::require_one_rank("eval");
  const cli::BackendChoice backend = cli::check_backend(args);
  args.no_positional();
  cli::set_threads(args);
  return cli::with_model(backend, [&]<class Model>() -> int {
  auto loaded = cli::load_model<Model>(args.required("checkpoint"));
  auto& model = *loaded.model;
  model.set_keep_packed_weights(backend.packed_weights);
  const auto& cfg = model.config();
  const auto src = cli::data_source(args, cfg, loaded.trained_on(), true);
  const data::AnyDataset test = cli::open_data(src, data::Split::test);
  // At least 2 examples: with one, retrieval, zero-shot and the probe are trivially perfect. A split with fewer
  // is the data's fault, not --max-test's.
  LIMOE_CHECK(test.size() >= 2, "eval needs at least 2 test examples; the test split has ", test.size());
  const index_t n = std::min<index_t>(test.size(), args.integer("max-test", test.size(), 2));
  const int shots = static_cast<int>(args.integer("shots", 10, 1, 1 << 20));
  const index_t retrieval = args.integer("retrieval", 1000, 2);
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), index_t{0});
  const Rng rng(0);
  std::vector<int> labels;
  for (index_t i : idx) labels.push_back(test.get(i, rng).label);

  nlohmann::json out = {{"data", test.name()}, {"test_examples", n}};
  const Tensor<float> img = embed_images(model, test, idx);
  if (test.has_labels()) {
    const Tensor<float> cls = class_embeddings(model, loaded.tokenizer, test);
    const data::AnyDataset train = cli::open_data(src, data::Split::train);  // the linear probe's shots
    out["zero_shot_top1"] = zero_shot_accuracy(img, labels, cls);
    const int classes = static_cast<int>(test.class_names().size());
    std::vector<int> shot_labels;
    const auto shot_idx = few_shot_indices(train, classes, shots, shot_labels);
    const Tensor<float> shot_feat = embed_images(model, train, shot_idx);
    out["linear_probe_" + std::to_string(shots) + "shot"] = linear_probe_accuracy(shot_feat, shot_labels, img, labels, classes);
  }
  // Retrieval over the first R test pairs with captions from the held-out templates.
  const index_t R = std::min<index_t>(n, retrieval);
  std::vector<std::string> captions;
  for (index_t i = 0; i < R; ++i) captions.push_back(test.get(i, rng, data::Templates::eval).caption);
  const Tensor<float> txt = embed_texts(model, data::encode_texts(loaded.tokenizer, captions).cview());
  Tensor<float> img_r(Shape{R, cfg.proj_dim});
  std::copy(img.data(), img.data() + R * cfg.proj_dim, img_r.data());
  const auto rec = retrieval_recall(img_r, txt);
  out["retrieval_pairs"] = R;
  const int ks[3] = {1, 5, 10};
  for (int k = 0; k < 3; ++k) {
    out["recall_at_" + std::to_string(ks[k]) + "_i2t"] = rec.i2t[k];
    out["recall_at_" + std::to_string(ks[k]) + "_t2i"] = rec.t2i[k];
  }
  // The same pool over its distinct captions (captions repeat: a class name, an attribute set).
  const auto uniq = unique_caption_retrieval(img_r, txt, captions);
  out["unique_captions"] = uniq.unique;
  out["recall_at_1_i2t_unique"] = uniq.i2t_at1;
  out["recall_at_1_t2i_unique"] = uniq.t2i_at1;
  // The training loss on the pool's pairs, in batches of 128, at the learned temperature.
  const float theta = to_host(model.params().value(model.params().get("logit_scale")))[0];
  out["heldout_contrastive_loss"] =
      batched_contrastive_loss(img_r, txt, theta, static_cast<float>(cfg.logit_scale_max), 128);
  // Routing as training sees it: images and texts of test pairs share groups, training capacity factor.
  if (!cfg.moe_blocks.empty()) {
    const auto blocks = routing_summary(model, loaded.tokenizer, test, std::min<index_t>(n, 2048), 128, 0,
                                        cfg.router.capacity_factor_train);
    double di = 0, dt = 0, eff_txt = 0, spec = 0;
    int used = 0;
    nlohmann::json per_block = nlohmann::json::array();
    for (const auto& b : blocks) {
      di += b.drop_rate(0), dt += b.drop_rate(1), used += b.experts_used() == b.experts;
      eff_txt += b.effective_experts(1);
      const auto s = b.specialised();
      spec += static_cast<double>(s[0] + s[1]) / std::max(1, b.experts);
      per_block.push_back(b.to_json());
    }
    const double nb = static_cast<double>(std::max<std::size_t>(1, blocks.size()));
    out["drop_rate_img"] = di / nb;
    out["drop_rate_txt"] = dt / nb;
    out["text_effective_experts"] = eff_txt / nb;       // exp(entropy) of text's choices, mean over MoE blocks
    out["experts_specialised_share"] = spec / nb;       // experts with > 90% of one modality, mean over blocks
    out["blocks_using_all_experts"] = used;
    out["moe_blocks"] = blocks.size();
    out["routing"] = per_block;
  } else {
    out["drop_rate_img"] = 0.0;
    out["drop_rate_txt"] = 0.0;
    out["blocks_using_all_experts"] = 0;
    out["moe_blocks"] = 0;
  }
  if (data::resolve_kind(src) == "fashion-scenes") compositional(model, loaded.tokenizer, src, n, out);
  {
    const nlohmann::json st = cli::train_state_of(loaded.metadata);
    // Only a number: the metadata is the file's, and anything else would pass into this JSON as it is.
    if (st.contains("train_seconds") && st["train_seconds"].is_number() &&
        std::isfinite(st["train_seconds"].template get<double>()))
      out["train_seconds"] = st["train_seconds"].template get<double>();
  }
  const auto pc = count_params(cfg);
  out["params_total"] = pc.total;
  out["params_per_token"] = pc.per_token;
  out["precision"] = Model::precision_type::name;
  std::cout << out.dump() << "\n";
  return 0;
  });
}

const cli::Register reg({"eval", "zero-shot accuracy, 10-shot linear probe and retrieval recall",
                         std::string("usage: limoe eval --checkpoint CKPT [options]\n\n") + cli::kDataHelp +
                         "  --max-test N         evaluate on the first N test examples (default all)\n"
                         "  --retrieval R        pairs in the retrieval pool (default 1000)\n"
                         "  --shots K            examples per class for the linear probe (default 10)\n"
                         "  --threads N          worker threads (default all cores)\n"
                         LIMOE_CLI_BACKEND_HELP "\n"
                         "Prints one JSON line. Zero-shot prompts and retrieval captions use the data set's held-out\n"
                         "templates, never seen in training. On fashion-scenes it adds compositional_zero_shot: the\n"
                         "colour and noun of single-object test scenes among all 60 combinations, on the combinations\n"
                         "training never showed (and seen_combination_zero_shot on the others). Also: retrieval over the\n"
                         "pool's distinct captions (*_unique), the contrastive loss on the pool in batches of 128\n"
                         "(heldout_contrastive_loss) and, per MoE block (routing), drop rates, each expert's image share,\n"
                         "text's effective number of experts exp(entropy) and the modality-specialised experts.\n",
                         run});
}  // namespace
}  // namespace limoe_cmd_eval
