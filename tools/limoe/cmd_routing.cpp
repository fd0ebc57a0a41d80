// `limoe routing`: per-block routing report for a checkpoint on a data set (semantics §6): each expert's
// share of image tokens, drop rates and entropies per modality, as a table (stdout), JSON and an SVG picture of
// experts coloured by modality share (the paper's figure), plus which patches of a few test images go where.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <limoe/core/parallel.hpp>
#include <limoe/eval/evaluate.hpp>
#include <limoe/io/file.hpp>

#include "session.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_routing {
namespace {
using namespace limoe;

// Blue for image, orange for text, mixed in between.
std::string share_colour(double s) {
  const int r = static_cast<int>(240 - 200 * s), g = static_cast<int>(140 - 10 * s), b = static_cast<int>(40 + 200 * s);
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", r, g, b);
  return buf;
}
const char* kExpertPalette[] = {"#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                                "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"};

std::string svg_report(const std::vector<RoutingSummary>& blocks, const ModelConfig& cfg, const Tensor<float>& images,
                       const std::vector<Tensor<std::int32_t>>& patch_routes) {
  std::ostringstream s;
  const int E = cfg.experts, bar_w = 28, gap = 6, row_h = 150, left = 120;
  const int n_img = static_cast<int>(images.rank() ? images.dim(0) : 0);
  const int gh = cfg.grid_h(), gw = cfg.grid_w(), P = cfg.patch;
  const int width = std::max({left + E * (bar_w + gap) + 40, left + n_img * (cfg.image_size[1] * 3 + 20) + 40, 880});
  const int height = 60 + static_cast<int>(blocks.size()) * row_h + (n_img ? static_cast<int>(blocks.size()) * (cfg.image_size[0] * 3 + 40) : 0) + 40;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"10\" y=\"22\" font-size=\"15\">Experts per MoE block: height = share of all routed choices, colour = "
       "image share (blue image, orange text)</text>\n";
  int y0 = 50;
  for (const auto& b : blocks) {
    index_t total = 0;
    for (int m = 0; m < 2; ++m) for (auto v : b.routed[m]) total += v;
    s << "<text x=\"10\" y=\"" << y0 + 60 << "\">block " << b.block << "</text>\n";
    char info[2][80];
    std::snprintf(info[0], sizeof info[0], "image drops %.1f%%", 100 * b.drop_rate(0));
    std::snprintf(info[1], sizeof info[1], "text drops %.1f%%", 100 * b.drop_rate(1));
    s << "<text x=\"10\" y=\"" << y0 + 78 << "\" font-size=\"10\">" << info[0] << "</text>\n";
    s << "<text x=\"10\" y=\"" << y0 + 92 << "\" font-size=\"10\">" << info[1] << "</text>\n";
    for (int e = 0; e < E; ++e) {
      const double load = total ? static_cast<double>(b.routed[0][e] + b.routed[1][e]) / static_cast<double>(total) : 0;
      const int h = static_cast<int>(load * 100 * std::max(1, E) / 2.0);
      const int hh = std::min(110, h);
      const int x = left + e * (bar_w + gap);
      s << "<rect x=\"" << x << "\" y=\"" << y0 + 115 - hh << "\" width=\"" << bar_w << "\" height=\"" << hh
        << "\" fill=\"" << share_colour(b.image_share(e)) << "\" stroke=\"#333\"/>\n";
      s << "<text x=\"" << x + 4 << "\" y=\"" << y0 + 130 << "\" font-size=\"10\">e" << e << "</text>\n";
    }
    y0 += row_h;
  }
  // Patch maps: each test image with its patches outlined in the colour of the expert that took them.
  for (std::size_t k = 0; k < patch_routes.size(); ++k) {
    s << "<text x=\"10\" y=\"" << y0 + 14 << "\">block " << blocks[k].block << ": expert of each patch</text>\n";
    for (int i = 0; i < n_img; ++i) {
      const int ox = left + i * (cfg.image_size[1] * 3 + 20), oy = y0 + 24;
      // Pixels in blocks of px x px (2x2 for small images) keep the file small.
      const int blk = cfg.image_size[0] > 64 ? 8 : 2;
      for (int py = 0; py < cfg.image_size[0]; py += blk)
        for (int px = 0; px < cfg.image_size[1]; px += blk) {
          double v = 0;
          int cnt = 0;
          for (int yy = py; yy < std::min(py + blk, cfg.image_size[0]); ++yy)
            for (int xx = px; xx < std::min(px + blk, cfg.image_size[1]); ++xx, ++cnt)
              for (int c = 0; c < cfg.channels; ++c)
                v += images[((static_cast<index_t>(i) * cfg.image_size[0] + yy) * cfg.image_size[1] + xx) * cfg.channels + c];
          const int g = static_cast<int>(std::clamp((v / (cnt * cfg.channels) + 1) * 127.5, 0.0, 255.0));
          s << "<rect x=\"" << ox + px * 3 << "\" y=\"" << oy + py * 3 << "\" width=\"" << blk * 3 << "\" height=\"" << blk * 3
            << "\" fill=\"rgb(" << g << "," << g << "," << g << ")\"/>";
        }
      s << "\n";
      const auto& r = patch_routes[k];
      for (int p = 0; p < gh * gw; ++p) {
        const int e = r[(static_cast<index_t>(i) * gh * gw + p) * r.dim(1)];
        const int x = ox + (p % gw) * P * 3, y = oy + (p / gw) * P * 3;
        s << "<rect x=\"" << x + 1 << "\" y=\"" << y + 1 << "\" width=\"" << P * 3 - 2 << "\" height=\"" << P * 3 - 2
          << "\" fill=\"" << (e >= 0 ? kExpertPalette[e % 16] : "black") << "\" fill-opacity=\"0.35\"/>";
      }
      s << "\n";
    }
    y0 += cfg.image_size[0] * 3 + 40;
  }
  s << "</svg>\n";
  return s.str();
}

int run(const std::vector<std::string>& argv) {
  auto opts = cli::kDataOptions;
  opts.insert({"checkpoint", "pairs", "out", "capacity-factor", "threads", "images"});
  opts.insert(cli::kBackendOptions.begin(), cli::kBackendOptions.end());
  cli::Args args(argv, opts, {}, "routing");
  cli::require_one_rank("routing");
  const cli::BackendChoice backend = cli::check_backend(args);
  args.no_positional();
  cli::set_threads(args);
  const std::string ckpt = args.required("checkpoint");
  const index_t pairs = args.integer("pairs", 2048, 1), images_wanted = args.integer("images", 6, 0, 1024);
  const std::string out = args.str("out", "routing");
  LIMOE_CHECK(!out.empty() && out.back() != '/', "--out needs a file name prefix (PREFIX.json and PREFIX.svg), got \"",
              out, "\"");
  return cli::with_model(backend, [&]<class Model>() -> int {
  auto loaded = cli::load_model<Model>(ckpt);
  auto& model = *loaded.model;
  model.set_keep_packed_weights(backend.packed_weights);
  const auto& cfg = model.config();
  // Drop rates as training sees them: the training capacity factor (an argument of each forward), no noise.
  const double cf = args.number("capacity-factor", cfg.router.capacity_factor_train, 0.0);  // 0: no drop
  LIMOE_CHECK(!cfg.moe_blocks.empty(), "the model has no MoE block: nothing to report");
  const auto src = cli::data_source(args, cfg, loaded.trained_on(), true);
  const data::AnyDataset test = cli::open_data(src, data::Split::test);
  const auto blocks = routing_summary(model, loaded.tokenizer, test, pairs, 128, 0, cf);

  // Patch maps for a few test images (images alone, evaluation routing).
  const index_t n_img = std::min<index_t>(test.size(), images_wanted);
  Tensor<float> images(Shape{n_img, cfg.image_size[0], cfg.image_size[1], cfg.channels});
  const Rng rng(0);
  for (index_t i = 0; i < n_img; ++i) {
    const auto ex = test.get(i, rng);
    std::copy(ex.image.begin(), ex.image.end(), images.data() + i * static_cast<index_t>(ex.image.size()));
  }
  std::vector<Tensor<std::int32_t>> patch_routes;
  if (n_img > 0) patch_routes = model.forward(images.cview(), CView<std::int32_t>{}, Mode::Eval, 0, cf).routes;

  // Table.
  std::printf("routing on %s, %lld pairs, capacity factor %.2f (images and texts share groups, no noise)\n",
              test.name().c_str(), static_cast<long long>(blocks.empty() ? 0 : blocks[0].tokens[0] / cfg.num_patches()), cf);
  for (const auto& b : blocks) {
    std::printf("block %d: drop img %.2f%% txt %.2f%% | local entropy img %.3f txt %.3f | global entropy img %.3f txt %.3f | experts used %d/%d\n",
                b.block, 100 * b.drop_rate(0), 100 * b.drop_rate(1), b.local_entropy[0], b.local_entropy[1],
                b.global_entropy[0], b.global_entropy[1], b.experts_used(), b.experts);
    std::printf("  expert      ");
    for (int e = 0; e < b.experts; ++e) std::printf("%7d", e);
    std::printf("\n  image share ");
    for (int e = 0; e < b.experts; ++e) std::printf("%7.2f", b.image_share(e));
    std::printf("\n  img routed  ");
    for (int e = 0; e < b.experts; ++e) std::printf("%7lld", static_cast<long long>(b.routed[0][static_cast<std::size_t>(e)]));
    std::printf("\n  txt routed  ");
    for (int e = 0; e < b.experts; ++e) std::printf("%7lld", static_cast<long long>(b.routed[1][static_cast<std::size_t>(e)]));
    std::printf("\n");
  }
  nlohmann::json j = nlohmann::json::array();
  for (const auto& b : blocks) j.push_back(b.to_json());
  const std::string js = j.dump(1), svg = svg_report(blocks, cfg, images, patch_routes);
  // Both files, or neither: a folder in the way of the picture leaves the old report as it was.
  io::write_files_atomic({{out + ".json", js}, {out + ".svg", svg}});
  std::printf("wrote %s.json and %s.svg\n", out.c_str(), out.c_str());
  return 0;
  });
}

const cli::Register reg({"routing", "per-block routing report (table, JSON and SVG picture)",
                         std::string("usage: limoe routing --checkpoint CKPT [options]\n\n") + cli::kDataHelp +
                         "  --pairs N            test pairs routed (default 2048)\n"
                         "  --capacity-factor F  capacity factor (default: the checkpoint's training factor)\n"
                         "  --images N           test images drawn with the expert of each patch (default 6)\n"
                         "  --out PREFIX         writes PREFIX.json and PREFIX.svg (default routing)\n"
                         "  --threads N          worker threads (default all cores)\n"
                         LIMOE_CLI_BACKEND_HELP,
                         run});
}  // namespace
}  // namespace limoe_cmd_routing
