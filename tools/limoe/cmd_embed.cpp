// `limoe embed`: embeddings and routing decisions for a batch of images and/or texts (docs/cli.md section 2).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>

#include <limoe/core/parallel.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>

#include "session.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_embed {
namespace {
using namespace limoe;

int run(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"checkpoint", "input", "output", "capacity-factor", "group-size", "threads", "device", "precision",
                        "packed-weights"},
                 {}, "embed");
  cli::require_one_rank("embed");
  const cli::BackendChoice backend = cli::check_backend(args);
  args.no_positional();
  const std::string ckpt = args.required("checkpoint"), in = args.required("input"), out = args.required("output");
  {
    std::error_code ec;
    LIMOE_CHECK(!std::filesystem::equivalent(out, ckpt, ec), "--output '", out,
                "' is the checkpoint itself; writing the embeddings there would replace the model");
  }
  cli::set_threads(args);

  const auto reader = io::SafetensorsReader::open(ckpt);
  ModelConfig cfg = cli::checkpoint_config(reader);  // its tensors checked before the model is allocated
  if (args.has("capacity-factor")) {
    const double f = args.number("capacity-factor", 0, 0.0);  // 0: no token dropped
    cfg.router.capacity_factor_eval = f;
  }
  if (args.has("group-size")) {
    const long long g = args.integer("group-size", 0, 0, std::numeric_limits<std::int32_t>::max());  // 0: one group
    cfg.router.group_size = g;
    cfg.group_pairs = 0;  // the flag's groups (of tokens) replace the checkpoint's groups of pairs
  }
  // embed runs evaluation calls only: the groups must hold a slot per expert under the evaluation factor (named
  // by the flags), and the training factor, which it never routes with, must not refuse its --group-size.
  moe::check_group_capacity(cfg.router.group_size, cfg.experts, cfg.top_k, cfg.router.capacity_factor_eval,
                            "--capacity-factor (the checkpoint's capacity_factor_eval)", "--group-size");
  cfg.router.capacity_factor_train = 0;
  return cli::with_model(backend, [&]<class Model>() -> int {
  Model model(cfg);
  load_weights(model, reader);
  model.set_keep_packed_weights(backend.packed_weights);

  const auto input = io::SafetensorsReader::open(in);
  LIMOE_CHECK(input.has("images") || input.has("texts"), "input '", in,
              "' holds neither \"images\" [B, H, W, C] nor \"texts\" [B, T]");
  io::SafetensorsWriter w;
  auto add_routes = [&](const ForwardOutput<float>& f, const char* prefix) {
    for (std::size_t i = 0; i < f.routes.size(); ++i) {
      const auto& r = f.routes[i];
      w.add(std::string(prefix) + std::to_string(f.route_blocks[i]),
            std::vector<std::int64_t>{r.dim(0), r.dim(1)}, std::span<const std::int32_t>(r.data(), static_cast<std::size_t>(r.numel())));
    }
  };
  auto add_emb = [&](const char* name, const Tensor<float>& e) {
    w.add(name, std::vector<std::int64_t>{e.dim(0), e.dim(1)}, std::span<const float>(e.data(), static_cast<std::size_t>(e.numel())));
  };
  if (input.has("images")) {
    const Tensor<float> images = input.read_f32("images");
    LIMOE_CHECK(images.rank() == 4 && images.dim(1) == cfg.image_size[0] && images.dim(2) == cfg.image_size[1] &&
                    images.dim(3) == cfg.channels,
                "input \"images\" has shape ", images.shape().str(), "; this model needs [B, ", cfg.image_size[0], ", ",
                cfg.image_size[1], ", ", cfg.channels, "]");
    LIMOE_CHECK(images.dim(0) > 0, "input \"images\" holds no image (B = 0)");
    index_t outside = 0;
    float widest = 0.0f;
    for (index_t i = 0; i < images.numel(); ++i) {
      LIMOE_CHECK(std::isfinite(images[i]), "input \"images\" holds a non-finite pixel at flat index ", i);
      if (std::abs(images[i]) > 1.0f) ++outside, widest = std::max(widest, std::abs(images[i]));
    }
    // Pixels scaled otherwise (0..255, 0..1 or a mean / std normalisation) embed without error but not as the
    // model was trained: said once, on stderr, and the embedding goes on (stdout and the output are unchanged).
    if (outside > 0)
      std::cerr << "limoe embed: warning: " << outside << " of " << images.numel()
                << " pixels lie outside [-1, 1] (largest magnitude " << widest
                << "); the model reads pixels scaled to [-1, 1] (x / 127.5 - 1 for 8-bit values)\n";
    const auto f = model.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval);
    add_emb("img_emb", f.img_emb);
    add_routes(f, "img_route.");
  }
  if (input.has("texts")) {
    const Tensor<std::int32_t> texts = input.read_i32("texts");
    LIMOE_CHECK(texts.rank() == 2 && texts.dim(1) == cfg.text_len, "input \"texts\" has shape ", texts.shape().str(),
                "; this model needs [B, ", cfg.text_len, "] token ids");
    LIMOE_CHECK(texts.dim(0) > 0, "input \"texts\" holds no text (B = 0)");
    for (index_t i = 0; i < texts.numel(); ++i)
      LIMOE_CHECK(texts[i] >= 0 && texts[i] < cfg.vocab_size, "input \"texts\" holds token id ", texts[i],
                  " at flat index ", i, ", outside [0, vocab_size=", cfg.vocab_size, ")");
    const auto f = model.forward(CView<float>{}, texts.cview(), Mode::Eval);
    add_emb("txt_emb", f.txt_emb);
    add_routes(f, "txt_route.");
  }
  w.set_metadata("format", "limoe-embed");
  w.set_metadata("format_version", "1");
  w.set_metadata("precision", Model::precision_type::name);
  w.write(out);
  return 0;
  });
}

const cli::Register reg({"embed", "embeddings and routing decisions for images and/or texts",
                         "usage: limoe embed --checkpoint CKPT --input IN.safetensors --output OUT.safetensors\n"
                         "                   [--capacity-factor F] [--group-size G] [--threads N]\n\n"
                         "  IN holds \"images\" F32 [B, H, W, C] in [-1, 1] and/or \"texts\" I32 [B, T] (either may be\n"
                         "  absent). OUT gets img_emb / txt_emb F32 [B, P_out] (L2-normalised) and, for every MoE\n"
                         "  block i, img_route.i / txt_route.i I32 [B*N, K] (or [B*T, K]): the expert that accepted\n"
                         "  each choice of each token, -1 where it was dropped, tokens in group order.\n"
                         "  Images and texts are embedded in separate calls (evaluation: no router noise).\n\n"
                         "  --capacity-factor F  evaluation capacity factor (default: the checkpoint's; 0 = no drop)\n"
                         "  --group-size G       routing group size in tokens (default: the checkpoint's; 0 = one group)\n"
                         "  --threads N          worker threads (default: all cores)\n"
                         LIMOE_CLI_BACKEND_HELP,
                         run});
}  // namespace
}  // namespace limoe_cmd_embed
