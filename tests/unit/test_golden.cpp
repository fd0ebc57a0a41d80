// Golden test against the independent PyTorch reference (tests/reference/limoe_ref.py): checkpoints written by
// another program load; evaluation embeddings and routes, training losses, routes and every parameter
// gradient match the files in tests/data/golden/ (regenerate with tests/reference/make_golden.py).
#include <doctest/doctest.h>

#include <cmath>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <nlohmann/json.hpp>
#include <string>

using namespace limoe;

namespace {
const std::string kDir = std::string(LIMOE_TEST_DATA_DIR) + "/golden/";

double scalar(const io::SafetensorsReader& r, const std::string& name) { return r.read_f32_flat(name).at(0); }

void check_close(const std::string& what, CView<double> got, const Tensor<float>& want, double rel, double abs_floor) {
  REQUIRE_MESSAGE(got.numel() == want.numel(), what);
  double scale = 0;
  for (index_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  double worst = 0;
  index_t at = 0;
  for (index_t i = 0; i < want.numel(); ++i) {
    const double d = std::abs(got[i] - want[i]) - rel * std::abs(static_cast<double>(want[i])) - abs_floor * std::max(scale, 1e-3);
    if (d > worst) worst = d, at = i;
  }
  INFO(what, ": worst excess ", worst, " at ", at, " (got ", got[at], ", want ", want[at], ")");
  CHECK(worst <= 0);
}
}  // namespace

TEST_CASE("golden: PyTorch reference checkpoints, embeddings, routes, losses and gradients") {
  for (const char* name : {"tiny_map", "tiny_k2", "tiny_vanilla"}) {
    CAPTURE(name);
    const auto ckpt = io::SafetensorsReader::open(kDir + name + ".ckpt.safetensors");
    const auto io = io::SafetensorsReader::open(kDir + name + ".io.safetensors");
    REQUIRE(io.metadata().at("golden_magic") == "limoe-golden");
    REQUIRE(io.metadata().at("golden_version") == "1");
    ModelConfig cfg = read_checkpoint_config(ckpt);
    // The golden training pass has no router noise and its own loss weights.
    const auto w = nlohmann::json::parse(io.metadata().at("loss_weights"));
    cfg.router.noise_std = 0;
    cfg.aux.importance_weight = w.at("importance");
    cfg.aux.load_weight = w.at("load");
    cfg.aux.local_entropy_weight = {w.at("local_entropy"), w.at("local_entropy")};
    cfg.aux.global_entropy_weight = {w.at("global_entropy"), w.at("global_entropy")};
    cfg.aux.global_entropy_tau = {w.at("tau_img"), w.at("tau_txt")};
    cfg.aux.z_loss_weight = w.at("z");
    Limoe<double> m(cfg);
    load_weights(m, ckpt);

    const Tensor<float> images_f = io.read_f32("images");
    const Tensor<double> images = Tensor<double>::copy_of(images_f.cview());
    const Tensor<std::int32_t> texts = io.read_i32("texts");

    // Evaluation: images and texts in separate calls, as `limoe embed`.
    const auto fi = m.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
    check_close("img_emb", fi.img_emb.cview(), io.read_f32("img_emb"), 1e-4, 1e-5);
    const auto ft = m.forward(CView<double>{}, texts.cview(), Mode::Eval);
    check_close("txt_emb", ft.txt_emb.cview(), io.read_f32("txt_emb"), 1e-4, 1e-5);
    for (std::size_t k = 0; k < fi.routes.size(); ++k) {
      const std::string b = std::to_string(fi.route_blocks[k]);
      const auto ri = io.read_i32("img_route." + b), rt = io.read_i32("txt_route." + b);
      REQUIRE(ri.shape() == fi.routes[k].shape());
      REQUIRE(rt.shape() == ft.routes[k].shape());
      for (index_t i = 0; i < ri.numel(); ++i) CHECK(fi.routes[k][i] == ri[i]);
      for (index_t i = 0; i < rt.numel(); ++i) CHECK(ft.routes[k][i] == rt[i]);
    }

    // Training: pairs in one call (shared routing groups), losses and every gradient.
    m.zero_grad();
    const auto f = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
    const auto l = m.loss(f);
    CHECK(l.total == doctest::Approx(scalar(io, "loss.total")).epsilon(1e-5));
    CHECK(l.contrastive == doctest::Approx(scalar(io, "loss.contrastive")).epsilon(1e-5));
    CHECK(l.aux == doctest::Approx(scalar(io, "loss.aux")).epsilon(1e-4));
    for (std::size_t k = 0; k < f.routes.size(); ++k) {
      const std::string b = std::to_string(f.route_blocks[k]);
      const auto& t = f.aux_terms[k];
      CHECK(t.importance == doctest::Approx(scalar(io, "loss.importance." + b)).epsilon(1e-4));
      CHECK(t.local_entropy[0] == doctest::Approx(scalar(io, "loss.local_entropy_img." + b)).epsilon(1e-4));
      CHECK(t.local_entropy[1] == doctest::Approx(scalar(io, "loss.local_entropy_txt." + b)).epsilon(1e-4));
      CHECK(t.global_entropy[0] == doctest::Approx(scalar(io, "loss.global_entropy_img." + b)).epsilon(1e-4));
      CHECK(t.global_entropy[1] == doctest::Approx(scalar(io, "loss.global_entropy_txt." + b)).epsilon(1e-4));
      CHECK(t.z == doctest::Approx(scalar(io, "loss.z." + b)).epsilon(1e-4));
      const auto rr = io.read_i32("train_route." + b);
      REQUIRE(rr.shape() == f.routes[k].shape());
      for (index_t i = 0; i < rr.numel(); ++i) CHECK(f.routes[k][i] == rr[i]);
    }
    m.backward(f);
    double gscale = 0;
    for (const auto& e : m.params().entries())
      for (float v : io.read_f32_flat("grad." + e.name)) gscale = std::max(gscale, std::abs(static_cast<double>(v)));
    for (const auto& e : m.params().entries()) {
      const Tensor<float> want = io.read_f32("grad." + e.name);
      const auto got = m.params().grad(m.params().get(e.name));
      double worst = 0;
      for (index_t i = 0; i < want.numel(); ++i)
        worst = std::max(worst, std::abs(got[i] - want[i]) - 1e-4 * std::abs(static_cast<double>(want[i])) - 1e-5 * gscale);
      INFO("grad.", e.name, " worst excess ", worst);
      CHECK(worst <= 0);
    }
  }
}
