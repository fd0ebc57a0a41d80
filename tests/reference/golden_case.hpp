// tests/reference/golden_case.hpp: the C++ side of the golden files of tests/data/golden/ (written by
// make_golden.py from the PyTorch reference limoe_ref.py; layout in README.md next to this file), shared by
// tests/unit/test_golden.cpp (Limoe<double> against the files) and tests/unit/test_model_float.cpp
// (Limoe<float> against Limoe<double> and against the files).
//
// The training call of the golden files has router noise: the table `noise.{i}` [tokens of the call, E] of
// the io file, added to the clean logits of MoE block i. TableNoise below is a noise policy for
// moe::TopKRouter that injects exactly that table. The model hands MoE block l of training step s the generator
// Rng(noise_seed).derive(s * 4096 + l) (model.hpp, block_forward), so the policy recognises the block by the
// generator's seed, and the row of the table by the group's first row (g.row0 + s).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace golden {

using namespace limoe;

inline const std::string kDir = std::string(LIMOE_TEST_DATA_DIR) + "/golden/";
inline constexpr const char* kVersion = "2";
inline constexpr std::uint64_t kNoiseSeed = 0x5EED1234ABCDull;  // any value: the table does not depend on it
inline constexpr std::uint64_t kStep = 3;                        // the training step passed to forward()

// The noise tables of one case, keyed by the generator seed of their MoE block.
struct NoiseTables {
  struct Block {
    std::uint64_t seed = 0;
    int block = 0;
    index_t rows = 0;
    int E = 0;
    std::vector<float> values;  // [rows, E]
  };
  std::vector<Block> blocks;
  mutable std::atomic<int> groups_noised{0};  // training groups that received table noise
};

// Noise policy (the interface of moe::GaussianNoise): training adds the table of the block, evaluation none.
struct TableNoise {
  std::shared_ptr<const NoiseTables> tables;
  double noise_std = 1.0;
  double sigma(int E) const { return noise_std / static_cast<double>(E); }
  bool active(moe::Mode mode) const { return mode == moe::Mode::Train && noise_std > 0; }
  template <class T>
  void apply(const moe::RouteGroup<T>& g) const {
    const index_t n = g.S * g.E;
    if (!active(g.mode)) {
      std::copy(g.logits, g.logits + n, g.noisy);
      return;
    }
    LIMOE_CHECK(tables != nullptr && g.rng != nullptr, "TableNoise: training needs the tables and the step's Rng");
    const NoiseTables::Block* t = nullptr;
    for (const auto& b : tables->blocks)
      if (b.seed == g.rng->seed()) t = &b;
    LIMOE_CHECK(t != nullptr, "TableNoise: no noise table for the generator seed ", g.rng->seed(),
                " (the model's per-block noise seeds are not Rng(noise_seed).derive(step * 4096 + block))");
    LIMOE_CHECK(t->E == g.E && g.row0 >= 0 && g.row0 + g.S <= t->rows, "TableNoise: group rows [", g.row0, ", ",
                g.row0 + g.S, ") x ", g.E, " outside the table of block ", t->block, " [", t->rows, ", ", t->E, "]");
    for (index_t s = 0; s < g.S; ++s)
      for (int e = 0; e < g.E; ++e) {
        const index_t i = s * g.E + e;
        g.noisy[i] = g.logits[i] + static_cast<T>(t->values[static_cast<std::size_t>((g.row0 + s) * g.E + e)]);
      }
    ++tables->groups_noised;
  }
};

template <class T, class Order>
using Model = Limoe<T, moe::TopKRouter<moe::DynamicTopK, TableNoise, Order>>;

// One golden case: its checkpoint, its io file, the config the C++ model runs with, the noise tables.
struct Case {
  std::string name;
  io::SafetensorsReader ckpt, io;
  ModelConfig cfg;
  nlohmann::json summary;  // routing_summary: capacities per call and block
  std::shared_ptr<NoiseTables> noise;
  int train_groups = 0;    // routing groups of the training call, over all MoE blocks

  static Case open(const std::string& name) {
    Case c{name, io::SafetensorsReader::open(kDir + name + ".ckpt.safetensors"),
           io::SafetensorsReader::open(kDir + name + ".io.safetensors"), {}, {}, nullptr, 0};
    REQUIRE(c.io.metadata().at("golden_magic") == "limoe-golden");
    REQUIRE(c.io.metadata().at("golden_version") == kVersion);
    REQUIRE(c.io.metadata().at("case") == name);
    c.cfg = read_checkpoint_config(c.ckpt);
    // noise_std stays as the checkpoint has it (1.0): the layer's load loss is active in training only when
    // noise_std > 0, and takes sigma = noise_std / E from the config.
    REQUIRE(c.cfg.router.noise_std == 1.0);
    const auto w = nlohmann::json::parse(c.io.metadata().at("loss_weights"));
    c.cfg.aux.importance_weight = w.at("importance");
    c.cfg.aux.load_weight = w.at("load");
    REQUIRE(c.cfg.aux.load_weight > 0);
    c.cfg.aux.local_entropy_weight = {w.at("local_entropy"), w.at("local_entropy")};
    c.cfg.aux.global_entropy_weight = {w.at("global_entropy"), w.at("global_entropy")};
    c.cfg.aux.global_entropy_tau = {w.at("tau_img"), w.at("tau_txt")};
    c.cfg.aux.z_loss_weight = w.at("z");
    c.summary = nlohmann::json::parse(c.io.metadata().at("routing_summary"));
    c.noise = std::make_shared<NoiseTables>();
    const index_t B = c.io.read_i32("texts").dim(0);
    const index_t rows = B * c.cfg.num_patches() + B * c.cfg.text_len;
    for (int l = 0; l < c.cfg.depth; ++l) {
      if (!c.cfg.is_moe(l)) {
        REQUIRE_FALSE(c.io.has("noise." + std::to_string(l)));
        continue;
      }
      NoiseTables::Block b;
      b.seed = Rng(kNoiseSeed).derive(kStep * 4096 + static_cast<std::uint64_t>(l)).seed();
      b.block = l;
      b.rows = rows;
      b.E = c.cfg.experts;
      b.values = c.io.read_f32_flat("noise." + std::to_string(l));
      REQUIRE(c.io.shape("noise." + std::to_string(l)) == Shape{rows, c.cfg.experts});
      for (const auto& o : c.noise->blocks) REQUIRE(o.seed != b.seed);
      c.noise->blocks.push_back(std::move(b));
      c.train_groups += static_cast<int>(c.summary.at("capacity").at(std::to_string(l)).at("train").size());
    }
    return c;
  }

  // Calls fn(model) with a Limoe<T, TopKRouter<DynamicTopK, TableNoise, Order>> holding the case's weights.
  template <class T, class Order, class Fn>
  void with_model_order(Fn&& fn) const {
    using Router = moe::TopKRouter<moe::DynamicTopK, TableNoise, Order>;
    Model<T, Order> m(cfg, Router{moe::DynamicTopK{cfg.top_k}, TableNoise{noise, cfg.router.noise_std}});
    load_weights(m, ckpt);
    m.set_noise_seed(kNoiseSeed);
    fn(m);
  }
  // The same with the order of the config: BPR or vanilla.
  template <class T, class Fn>
  void with_model(Fn&& fn) const {
    if (cfg.router.bpr) with_model_order<T, moe::BatchPriorityOrder>(fn);
    else with_model_order<T, moe::VanillaOrder>(fn);
  }

  template <class T>
  Tensor<T> images() const {
    const Tensor<float> f = io.read_f32("images");
    Tensor<T> t(f.shape());
    for (index_t i = 0; i < f.numel(); ++i) t[i] = static_cast<T>(f[i]);
    return t;
  }
  Tensor<std::int32_t> texts() const { return io.read_i32("texts"); }
};

// Everything one model computes on a case: evaluation (images alone, texts alone), one training step
// (forward with the table noise, loss, backward).
template <class T>
struct Run {
  ForwardOutput<T> ev_img, ev_txt, train;
  LossOutput loss;
  std::vector<std::string> grad_names;
  std::vector<std::vector<double>> grads;
  int groups_noised_eval = 0, groups_noised_train = 0;
};

template <class T, class M>
Run<T> run_case(const Case& c, M& m) {
  Run<T> r;
  const Tensor<T> images = c.images<T>();
  const Tensor<std::int32_t> texts = c.texts();
  const int before = c.noise->groups_noised.load();
  r.ev_img = m.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
  r.ev_txt = m.forward(CView<T>{}, texts.cview(), Mode::Eval);
  const int mid = c.noise->groups_noised.load();
  m.zero_grad();
  r.train = m.forward(images.cview(), texts.cview(), Mode::Train, kStep);
  r.loss = m.loss(r.train);
  m.backward(r.train);
  r.groups_noised_eval = mid - before;
  r.groups_noised_train = c.noise->groups_noised.load() - mid;
  for (const auto& e : m.params().entries()) {
    const auto g = m.params().grad(m.params().get(e.name));
    r.grad_names.push_back(e.name);
    r.grads.emplace_back(g.data(), g.data() + g.numel());
  }
  return r;
}

// max_i (|got_i - want_i| - rel |want_i| - abs_tol): <= 0 passes. Reports the worst entry.
struct Excess {
  double worst = -1e300, got = 0, want = 0, max_abs_diff = 0;
  index_t at = -1;
  template <class A, class B>
  void add(index_t i, A got_i, B want_i, double rel, double abs_tol) {
    const double g = static_cast<double>(got_i), w = static_cast<double>(want_i);
    const double d = std::abs(g - w) - rel * std::abs(w) - abs_tol;
    max_abs_diff = std::max(max_abs_diff, std::abs(g - w));
    if (d > worst || at < 0) worst = d, at = i, got = g, want = w;
  }
};

// Tolerances of a comparison with the golden files (values are float32 roundings of the float64 reference).
struct Tolerance {
  double emb_rel, emb_abs;    // embeddings: |a - b| <= emb_rel |b| + emb_abs
  double loss_rel, loss_abs;  // every loss value
  double grad_rel, grad_abs;  // gradients: |a - b| <= grad_rel |b| + grad_abs * max over all grad tensors |b|
};

inline double scalar(const io::SafetensorsReader& r, const std::string& name) { return r.read_f32_flat(name).at(0); }

// The whole comparison of one case with the files; reports the worst gradient error relative to its bound.
template <class T>
void check_against_files(const Case& c, const Run<T>& r, const Tolerance& tol) {
  const auto& io = c.io;
  auto close_tensor = [&](const std::string& what, CView<T> got, const std::string& name) {
    const Tensor<float> want = io.read_f32(name);
    REQUIRE_MESSAGE(got.shape() == want.shape(), what);
    Excess x;
    for (index_t i = 0; i < want.numel(); ++i) x.add(i, got[i], want[i], tol.emb_rel, tol.emb_abs);
    INFO(c.name, " ", what, ": worst excess ", x.worst, " at ", x.at, " (got ", x.got, ", want ", x.want,
         "), max |diff| ", x.max_abs_diff);
    CHECK(x.worst <= 0);
  };
  auto close_value = [&](const std::string& what, double got, double want) {
    INFO(c.name, " ", what, ": got ", got, ", want ", want, ", diff ", got - want);
    CHECK(std::abs(got - want) <= tol.loss_rel * std::abs(want) + tol.loss_abs);
  };
  auto same_routes = [&](const std::string& what, const Tensor<std::int32_t>& got, const std::string& name) {
    const auto want = io.read_i32(name);
    REQUIRE_MESSAGE(got.shape() == want.shape(), c.name, " ", what);
    index_t diff = 0, first = -1;
    for (index_t i = 0; i < want.numel(); ++i)
      if (got[i] != want[i]) first = first < 0 ? i : first, ++diff;
    INFO(c.name, " ", what, ": ", diff, " of ", want.numel(), " entries differ, first at ", first);
    CHECK(diff == 0);
  };
  auto capacity = [&](const std::string& what, const moe::RoutingStats& s, int block, const char* call) {
    // stats.capacity is C of the first group: the reference's formula, evaluated there.
    const auto& caps = c.summary.at("capacity").at(std::to_string(block)).at(call);
    INFO(c.name, " ", what, " block ", block, ": C of the first group ", s.capacity, ", reference ", caps.dump());
    CHECK(s.capacity == caps.at(0).get<index_t>());
    CHECK(s.groups == static_cast<index_t>(caps.size()));
  };

  // Evaluation: images and texts in separate calls, as `limoe embed`; no noise.
  CHECK(r.groups_noised_eval == 0);
  close_tensor("img_emb", r.ev_img.img_emb.cview(), "img_emb");
  close_tensor("txt_emb", r.ev_txt.txt_emb.cview(), "txt_emb");
  REQUIRE(r.ev_img.routes.size() == c.cfg.moe_blocks.size());
  for (std::size_t k = 0; k < r.ev_img.routes.size(); ++k) {
    const int bl = r.ev_img.route_blocks[k];
    const std::string b = std::to_string(bl);
    same_routes("img_route." + b, r.ev_img.routes[k], "img_route." + b);
    same_routes("txt_route." + b, r.ev_txt.routes[k], "txt_route." + b);
    capacity("eval images", r.ev_img.stats[k], bl, "eval_img");
    capacity("eval texts", r.ev_txt.stats[k], bl, "eval_txt");
    CHECK(r.ev_img.aux_terms[k].load == 0);  // no noise: no load loss
  }

  // Training: pairs in one call (shared routing groups), the table noise in every group of every MoE block.
  CHECK(r.groups_noised_train == c.train_groups);
  close_value("loss.total", r.loss.total, scalar(io, "loss.total"));
  close_value("loss.contrastive", r.loss.contrastive, scalar(io, "loss.contrastive"));
  close_value("loss.aux", r.loss.aux, scalar(io, "loss.aux"));
  close_tensor("train_img_emb", r.train.img_emb.cview(), "train_img_emb");
  close_tensor("train_txt_emb", r.train.txt_emb.cview(), "train_txt_emb");
  REQUIRE(r.train.routes.size() == c.cfg.moe_blocks.size());
  for (std::size_t k = 0; k < r.train.routes.size(); ++k) {
    const int bl = r.train.route_blocks[k];
    const std::string b = std::to_string(bl);
    const auto& t = r.train.aux_terms[k];
    close_value("loss.importance." + b, t.importance, scalar(io, "loss.importance." + b));
    close_value("loss.load." + b, t.load, scalar(io, "loss.load." + b));
    CHECK(t.load > 0);
    close_value("loss.local_entropy_img." + b, t.local_entropy[0], scalar(io, "loss.local_entropy_img." + b));
    close_value("loss.local_entropy_txt." + b, t.local_entropy[1], scalar(io, "loss.local_entropy_txt." + b));
    close_value("loss.global_entropy_img." + b, t.global_entropy[0], scalar(io, "loss.global_entropy_img." + b));
    close_value("loss.global_entropy_txt." + b, t.global_entropy[1], scalar(io, "loss.global_entropy_txt." + b));
    close_value("loss.z." + b, t.z, scalar(io, "loss.z." + b));
    same_routes("train_route." + b, r.train.routes[k], "train_route." + b);
    capacity("train", r.train.stats[k], bl, "train");
  }

  // Every parameter gradient (a pure relative test would fail on the zero key-bias gradients).
  REQUIRE(r.grad_names.size() == c.ckpt.names().size());
  double gscale = 0;
  for (const auto& n : r.grad_names)
    for (float v : io.read_f32_flat("grad." + n)) gscale = std::max(gscale, std::abs(static_cast<double>(v)));
  REQUIRE(gscale > 0);
  double worst_ratio = 0;
  std::string worst_name;
  for (std::size_t p = 0; p < r.grad_names.size(); ++p) {
    const std::vector<float> want = io.read_f32_flat("grad." + r.grad_names[p]);
    const auto& got = r.grads[p];
    REQUIRE(got.size() == want.size());
    Excess x;
    for (std::size_t i = 0; i < want.size(); ++i)
      x.add(static_cast<index_t>(i), got[i], want[i], tol.grad_rel, tol.grad_abs * gscale);
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double bound = tol.grad_rel * std::abs(static_cast<double>(want[i])) + tol.grad_abs * gscale;
      const double ratio = std::abs(got[i] - want[i]) / bound;
      if (ratio > worst_ratio) worst_ratio = ratio, worst_name = r.grad_names[p];
    }
    INFO(c.name, " grad.", r.grad_names[p], ": worst excess ", x.worst, " at ", x.at, " (got ", x.got, ", want ",
         x.want, ")");
    CHECK(x.worst <= 0);
  }
  MESSAGE(c.name, ": worst gradient error / tolerance = ", worst_ratio, " (", worst_name, ")");
}

// The cases the files hold: one TEST_CASE each in the tests; this list is checked against the folder.
// Tolerances against the files (float64 reference rounded to float32): its rounding and summation-order
// differences are far below these bounds for Limoe<double> and Limoe<float> alike (tests/reference/README.md,
// "Suggested tolerances").
inline constexpr Tolerance kFileTolerance{.emb_rel = 1e-4, .emb_abs = 1e-5, .loss_rel = 1e-4, .loss_abs = 1e-5,
                                          .grad_rel = 1e-4, .grad_abs = 1e-5};

// Runs case `name` with Limoe<T> and compares it with the files.
template <class T>
void check_case_against_files(const std::string& name) {
  const Case c = Case::open(name);
  c.template with_model<T>([&](auto& m) { check_against_files(c, run_case<T>(c, m), kFileTolerance); });
}

inline std::vector<std::string> case_names() { return {"tiny_map", "tiny_k2", "tiny_vanilla", "tiny_dup"}; }

inline std::vector<std::string> cases_on_disk() {
  std::vector<std::string> out;
  const std::string suffix = ".io.safetensors";
  for (const auto& e : std::filesystem::directory_iterator(kDir)) {
    const std::string f = e.path().filename().string();
    if (f.size() > suffix.size() && f.compare(f.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(f.substr(0, f.size() - suffix.size()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace golden
