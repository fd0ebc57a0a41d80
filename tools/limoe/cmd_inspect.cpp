// `limoe inspect NAME|CHECKPOINT [--json]`: the config, parameter counts and the block layout.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <limoe/model/presets.hpp>

#include "cli.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_inspect {
namespace {
using namespace limoe;

std::string millions(std::int64_t n) {
  char buf[64];
  if (n >= 1000000000) std::snprintf(buf, sizeof buf, "%.2fB", static_cast<double>(n) / 1e9);
  else if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(n) / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1fK", static_cast<double>(n) / 1e3);
  return buf;
}

int run(const std::vector<std::string>& argv) {
  cli::Args args(argv, {}, {"json"}, "inspect");
  cli::require_one_rank("inspect");
  LIMOE_CHECK(args.positional().size() == 1, "expected one preset name or checkpoint path, got ",
              args.positional().size(), " arguments");
  const std::string what = args.positional()[0];
  ModelConfig cfg;
  std::string source;
  std::error_code ec;  // status without throwing: a symlink loop or an over-long name comes back in ec
  const auto st = std::filesystem::status(what, ec);
  if (!ec && std::filesystem::exists(st) && !std::filesystem::is_directory(st)) {
    // A checkpoint is checked as a model loader checks it (docs/cli.md): every tensor its config requires
    // present, of the right shape and finite, so that inspect does not describe a file that embed would refuse;
    // one tensor at a time, without the model's memory (check_weights).
    const auto reader = io::SafetensorsReader::open(what);
    cfg = read_checkpoint_config(reader);
    check_weights(Limoe<float>::parameter_entries(cfg), reader);
    source = "checkpoint";
  } else {
    try {
      cfg = preset(what);
    } catch (const Error&) {
      // Not a preset: what the file system says of a path it cannot read (a symlink loop, a name too long), of
      // a folder named like a checkpoint, or of a missing checkpoint file; else the unknown preset.
      if (ec && ec != std::errc::no_such_file_or_directory) fail("cannot open checkpoint '", what, "': ", ec.message());
      if (what.ends_with(".safetensors")) {
        if (!ec && std::filesystem::is_directory(st)) fail("'", what, "' is a directory, not a checkpoint file");
        fail("no such checkpoint file '", what, "'");
      }
      if (!ec && std::filesystem::is_directory(st)) {  // a run's folder, say: name the checkpoint in it
        const std::filesystem::path inside = std::filesystem::path(what) / "checkpoint.safetensors";
        std::error_code ec2;
        fail("'", what, "' is a directory, not a checkpoint file or a preset",
             std::filesystem::is_regular_file(inside, ec2) ? "; its checkpoint is '" + inside.string() + "'"
                                                           : std::string());
      }
      throw;
    }
    source = "preset";
  }
  const ParamCounts pc = count_params(cfg);
  std::vector<std::string> layout;
  for (int l = 0; l < cfg.depth; ++l) layout.push_back(cfg.is_moe(l) ? "moe" : "dense");
  if (args.flag("json")) {
    nlohmann::json j = {{"name", what},
                        {"source", source},
                        {"params_total", pc.total},
                        {"params_per_token", pc.per_token},
                        {"tokens_per_image", cfg.num_patches()},
                        {"layout", layout},
                        {"config", to_json(cfg)}};
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << what << " (" << source << ")\n"
            << "  image " << cfg.image_size[0] << "x" << cfg.image_size[1] << "x" << cfg.channels << ", patch "
            << cfg.patch << " -> " << cfg.num_patches() << " tokens; text " << cfg.text_len << " tokens, vocab "
            << cfg.vocab_size << "\n"
            << "  width " << cfg.width << ", depth " << cfg.depth << ", heads " << cfg.heads << ", mlp " << cfg.mlp_dim
            << ", proj " << cfg.proj_dim << "; pooling img " << pooling_name(cfg.pool_img) << ", txt "
            << pooling_name(cfg.pool_txt) << "\n"
            << "  experts " << cfg.experts << ", top-" << cfg.top_k << ", " << cfg.moe_blocks.size()
            << " MoE blocks" << (cfg.towers == 2 ? " (two towers: text has its own blocks)" : "") << "; router: noise " << cfg.router.noise_std << ", capacity train "
            << cfg.router.capacity_factor_train << " / eval " << cfg.router.capacity_factor_eval
            << (cfg.router.capacity_factor_eval == 0 ? " (no drop)" : "") << ", bpr "
            << (cfg.router.bpr ? "on" : "off") << ", group "
            << (cfg.group_pairs > 0 ? std::to_string(cfg.group_pairs) + " pairs" : std::to_string(cfg.router.group_size) + " tokens")
            << "\n"
            << "  parameters: " << millions(pc.total) << " total (" << pc.total << "), " << millions(pc.per_token)
            << " per token (" << pc.per_token << ")\n"
            << "  per block: dense " << millions(pc.per_block_dense) << ", MoE " << millions(pc.per_block_moe) << "\n"
            << "  layout:";
  for (int l = 0; l < cfg.depth; ++l) std::cout << (l % 16 == 0 ? "\n    " : " ") << l << ":" << layout[static_cast<std::size_t>(l)];
  std::cout << "\n";
  return 0;
}

const cli::Register reg({"inspect", "config, parameter counts and block layout of a preset or checkpoint",
                         "usage: limoe inspect NAME|CHECKPOINT [--json]\n\n"
                         "  NAME        a preset: S/32, B/32, B/16, L/16, H/14, tiny, small-28, small-32, small-56\n"
                         "  CHECKPOINT  a .safetensors checkpoint (docs/cli.md)\n"
                         "  --json      one JSON line with params_total, params_per_token, layout and config\n\n"
                         "Per-token parameters count what one image token passes through: the image embedding,\n"
                         "every block with top-k of its experts, the final norm, the image head and projection.\n",
                         run});
}  // namespace
}  // namespace limoe_cmd_inspect
