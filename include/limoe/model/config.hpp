// limoe/model/config.hpp: every hyper-parameter of a LIMoE model, as data (FORMATS.md section 1 "config").
//
// Policy is a type (backend, router, losses); size is data. S/32 and H/14 share every layer instantiation
// and differ only in a ModelConfig. The JSON form is the checkpoint's `config` metadata string.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/core/error.hpp"
#include "limoe/moe/config.hpp"
#include "limoe/ops/gelu.hpp"
#include "limoe/ops/pooling.hpp"

namespace limoe {

// Image pooling accepts gap, map, first; text pooling also accepts last (FORMATS.md).
inline Pooling parse_pooling_for(const std::string& s, bool text) {
  LIMOE_CHECK(s == "gap" || s == "map" || s == "first" || (text && s == "last"), "config: unknown ",
              text ? "pool_txt" : "pool_img", " \"", s, "\" (expected gap, map, first", text ? ", last)" : ")");
  return parse_pooling(s);
}

struct ModelConfig {
  std::array<int, 2> image_size{224, 224};  // H, W
  int channels = 3;
  int patch = 32;
  int width = 384;    // D
  int depth = 12;
  int heads = 6;      // NH
  int mlp_dim = 1536; // M
  int vocab_size = 32000;
  int text_len = 16;
  int experts = 8;    // E
  int top_k = 1;      // K
  std::vector<int> moe_blocks{1, 3, 5, 7, 9, 11};
  Pooling pool_img = Pooling::Map;
  Pooling pool_txt = Pooling::Map;
  int proj_dim = 384;
  double ln_eps = 1e-6;
  GeluKind gelu = GeluKind::Erf;
  bool text_mask = false;
  int pad_id = 0;
  moe::RouterConfig router{};
  moe::AuxLossConfig aux{};  // stored in the checkpoint config as "aux_loss" (an extension readers may ignore)
  double logit_scale_init = std::log(10.0);  // theta_0
  double logit_scale_max = 100.0;            // clamp exp(theta) <= this; <= 0: no clamp

  int grid_h() const { return image_size[0] / patch; }
  int grid_w() const { return image_size[1] / patch; }
  int num_patches() const { return grid_h() * grid_w(); }  // N
  int patch_dim() const { return patch * patch * channels; }
  bool is_moe(int block) const { return std::find(moe_blocks.begin(), moe_blocks.end(), block) != moe_blocks.end(); }

  // Throws limoe::Error naming the first impossible setting and how to fix it.
  void validate() const {
    auto pos = [](const char* name, long v) { LIMOE_CHECK(v > 0, "config: ", name, " must be positive, got ", v); };
    pos("image_size[0]", image_size[0]);
    pos("image_size[1]", image_size[1]);
    pos("channels", channels);
    pos("patch", patch);
    pos("width", width);
    pos("depth", depth);
    pos("heads", heads);
    pos("mlp_dim", mlp_dim);
    pos("vocab_size", vocab_size);
    pos("text_len", text_len);
    pos("proj_dim", proj_dim);
    LIMOE_CHECK(image_size[0] % patch == 0 && image_size[1] % patch == 0, "config: image_size [", image_size[0],
                ", ", image_size[1], "] is not divisible by patch ", patch, "; pick a patch that divides both");
    LIMOE_CHECK(width % heads == 0, "config: width ", width, " is not divisible by heads ", heads,
                "; choose heads that divide the width");
    LIMOE_CHECK(pad_id >= 0 && pad_id < vocab_size, "config: pad_id ", pad_id, " outside [0, vocab_size=",
                vocab_size, ")");
    LIMOE_CHECK(ln_eps > 0, "config: ln_eps must be positive, got ", ln_eps);
    std::vector<int> seen;
    for (int b : moe_blocks) {
      LIMOE_CHECK(b >= 0 && b < depth, "config: moe_blocks entry ", b, " outside [0, depth=", depth, ")");
      LIMOE_CHECK(std::find(seen.begin(), seen.end(), b) == seen.end(), "config: moe_blocks lists block ", b,
                  " twice");
      seen.push_back(b);
    }
    if (!moe_blocks.empty()) {
      LIMOE_CHECK(experts >= 1, "config: experts must be >= 1 when moe_blocks is not empty, got ", experts);
      LIMOE_CHECK(top_k >= 1 && top_k <= experts, "config: top_k ", top_k, " must be in [1, experts=", experts, "]");
      router.validate();
      aux.validate();
      LIMOE_CHECK(router.experts == experts && router.top_k == top_k, "config: router experts/top_k (",
                  router.experts, "/", router.top_k, ") differ from experts/top_k (", experts, "/", top_k, ")");
    }
  }
};

// ---- JSON (FORMATS.md section 1) ---------------------------------------------------------------------------

inline nlohmann::json router_to_json(const moe::RouterConfig& r) {
  return {{"noise_std", r.noise_std},
          {"capacity_factor_train", r.capacity_factor_train},
          {"capacity_factor_eval", r.capacity_factor_eval},
          {"capacity_multiple_of", r.capacity_multiple_of},
          {"bpr", r.bpr},
          {"group_size", r.group_size}};
}

inline nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = {
      {"image_size", {c.image_size[0], c.image_size[1]}},
      {"channels", c.channels},
      {"patch", c.patch},
      {"width", c.width},
      {"depth", c.depth},
      {"heads", c.heads},
      {"mlp_dim", c.mlp_dim},
      {"vocab_size", c.vocab_size},
      {"text_len", c.text_len},
      {"experts", c.experts},
      {"top_k", c.top_k},
      {"moe_blocks", c.moe_blocks},
      {"pool_img", pooling_name(c.pool_img)},
      {"pool_txt", pooling_name(c.pool_txt)},
      {"proj_dim", c.proj_dim},
      {"ln_eps", c.ln_eps},
      {"gelu", c.gelu == GeluKind::Erf ? "erf" : "tanh"},
      {"text_mask", c.text_mask},
      {"pad_id", c.pad_id},
      {"router", router_to_json(c.router)},
      {"aux_loss",
       {{"importance", c.aux.importance_weight},
        {"load", c.aux.load_weight},
        {"local_entropy_img", c.aux.local_entropy_weight[0]},
        {"local_entropy_txt", c.aux.local_entropy_weight[1]},
        {"global_entropy_img", c.aux.global_entropy_weight[0]},
        {"global_entropy_txt", c.aux.global_entropy_weight[1]},
        {"tau_img", c.aux.global_entropy_tau[0]},
        {"tau_txt", c.aux.global_entropy_tau[1]},
        {"z_loss", c.aux.z_loss_weight}}},
      {"logit_scale_max", c.logit_scale_max},
  };
  return j;
}

namespace detail {
template <class V>
void json_get(const nlohmann::json& j, const char* key, V& out, bool required) {
  auto it = j.find(key);
  if (it == j.end()) {
    LIMOE_CHECK(!required, "config: missing required key \"", key, "\"");
    return;
  }
  try {
    out = it->template get<V>();
  } catch (const nlohmann::json::exception&) {
    fail("config: key \"", key, "\" has the wrong type: ", it->dump());
  }
}
}  // namespace detail

// Parses a config object. Keys FORMATS.md lists as the model's shape are required; the rest default.
inline ModelConfig config_from_json(const nlohmann::json& j) {
  LIMOE_CHECK(j.is_object(), "config: expected a JSON object, got ", j.type_name());
  using detail::json_get;
  ModelConfig c;
  std::vector<int> size;
  json_get(j, "image_size", size, true);
  LIMOE_CHECK(size.size() == 2, "config: image_size must be [H, W], got ", size.size(), " values");
  c.image_size = {size[0], size[1]};
  json_get(j, "channels", c.channels, true);
  json_get(j, "patch", c.patch, true);
  json_get(j, "width", c.width, true);
  json_get(j, "depth", c.depth, true);
  json_get(j, "heads", c.heads, true);
  json_get(j, "mlp_dim", c.mlp_dim, true);
  json_get(j, "vocab_size", c.vocab_size, true);
  json_get(j, "text_len", c.text_len, true);
  json_get(j, "experts", c.experts, false);
  json_get(j, "top_k", c.top_k, false);
  json_get(j, "moe_blocks", c.moe_blocks, true);
  std::string pi = "map", pt = "map", gelu = "erf";
  json_get(j, "pool_img", pi, false);
  json_get(j, "pool_txt", pt, false);
  c.pool_img = parse_pooling_for(pi, false);
  c.pool_txt = parse_pooling_for(pt, true);
  c.proj_dim = c.width;
  json_get(j, "proj_dim", c.proj_dim, false);
  json_get(j, "ln_eps", c.ln_eps, false);
  json_get(j, "gelu", gelu, false);
  LIMOE_CHECK(gelu == "erf" || gelu == "tanh", "config: gelu must be \"erf\" or \"tanh\", got \"", gelu, "\"");
  c.gelu = gelu == "erf" ? GeluKind::Erf : GeluKind::Tanh;
  json_get(j, "text_mask", c.text_mask, false);
  json_get(j, "pad_id", c.pad_id, false);
  if (auto r = j.find("router"); r != j.end()) {
    LIMOE_CHECK(r->is_object(), "config: \"router\" must be an object");
    json_get(*r, "noise_std", c.router.noise_std, false);
    json_get(*r, "capacity_factor_train", c.router.capacity_factor_train, false);
    json_get(*r, "capacity_factor_eval", c.router.capacity_factor_eval, false);
    json_get(*r, "capacity_multiple_of", c.router.capacity_multiple_of, false);
    json_get(*r, "bpr", c.router.bpr, false);
    json_get(*r, "group_size", c.router.group_size, false);
  }
  if (auto a = j.find("aux_loss"); a != j.end() && a->is_object()) {
    json_get(*a, "importance", c.aux.importance_weight, false);
    json_get(*a, "load", c.aux.load_weight, false);
    json_get(*a, "local_entropy_img", c.aux.local_entropy_weight[0], false);
    json_get(*a, "local_entropy_txt", c.aux.local_entropy_weight[1], false);
    json_get(*a, "global_entropy_img", c.aux.global_entropy_weight[0], false);
    json_get(*a, "global_entropy_txt", c.aux.global_entropy_weight[1], false);
    json_get(*a, "tau_img", c.aux.global_entropy_tau[0], false);
    json_get(*a, "tau_txt", c.aux.global_entropy_tau[1], false);
    json_get(*a, "z_loss", c.aux.z_loss_weight, false);
  }
  json_get(j, "logit_scale_max", c.logit_scale_max, false);
  c.router.experts = c.experts;
  c.router.top_k = c.top_k;
  c.validate();
  return c;
}

inline ModelConfig config_from_json_string(const std::string& s) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(s);
  } catch (const nlohmann::json::exception& e) {
    fail("config: not valid JSON (", e.what(), ")");
  }
  return config_from_json(j);
}

}  // namespace limoe
