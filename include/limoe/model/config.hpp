// limoe/model/config.hpp: every hyper-parameter of a LIMoE model, as data (docs/cli.md "config").
//
// Policy is a type (backend, router, losses); size is data. S/32 and H/14 share every layer instantiation
// and differ only in a ModelConfig. The JSON form is the checkpoint's `config` metadata string.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/core/error.hpp"
#include "limoe/core/enums.hpp"
#include "limoe/moe/config.hpp"

namespace limoe {

// Image pooling accepts gap, map, first; text pooling also accepts last (docs/cli.md).
inline Pooling parse_pooling_for(const std::string& s, bool text) {
  LIMOE_CHECK(s == "gap" || s == "map" || s == "first" || (text && s == "last"), "config: unknown ",
              text ? "pool_txt" : "pool_img", " \"", s, "\" (expected gap, map, first", text ? ", last)" : ")");
  return parse_pooling(s);
}

struct ModelConfig;

// Parameter counts of a config (semantics §2's "total" and "per token" columns), computed in the
// arithmetic type A: std::int64_t for reporting, double for validate()'s size bound (no overflow).
template <class A>
struct ParamCountsOf {
  A total = 0;
  // Parameters applied to one image token: the image path (patch embedding, positions, every block with K of
  // its E experts, the final norm, the image head and projection, the temperature). The text table and text
  // head are not applied to an image token. This is how semantics §2's "per token" column is counted
  // (H/14: 5.59B total, 653M per token).
  A per_token = 0;
  A per_block_dense = 0, per_block_moe = 0, experts_per_block = 0;
};
using ParamCounts = ParamCountsOf<std::int64_t>;
template <class A>
ParamCountsOf<A> count_params_as(const ModelConfig& c);

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
  // Whether the MoE layers route padding text tokens (id pad_id) like any other token. false (the default of
  // a new config): padding is masked out of routing, capacity, the auxiliary losses and the routing statistics
  // (moe/layer.hpp). A config without this key (a checkpoint written before it existed) reads as true, so an
  // old model keeps its behaviour.
  bool route_padding = false;
  moe::RouterConfig router{};
  // Routing groups of this many image-text pairs (V-MoE routes per group): group g holds the image tokens and the
  // text tokens of pairs [g * group_pairs, (g + 1) * group_pairs) of a call, and capacity, priority and the
  // auxiliary losses are decided per group. 0: router.group_size decides (consecutive tokens; 0 = the call is
  // one group). Under data parallelism a group never spans ranks: 0 makes each rank's shard one group.
  int group_pairs = 0;
  // 1: one tower shared by images and text (LIMoE). 2: a two-tower model (CLIP-style): the text tokens run
  // through their own blocks and final LayerNorm (checkpoint names `txt.blocks.{i}.*`, `txt.norm.*`), the image
  // tokens through `blocks.{i}.*` and `norm.*`; dense blocks only (moe_blocks empty). Per-token compute equals
  // the one-tower dense model's; the parameters of the blocks double.
  int towers = 1;
  moe::AuxLossConfig aux{};  // stored in the checkpoint config as "aux_loss" (an extension readers may ignore)
  double logit_scale_init = std::log(10.0);  // theta_0
  double logit_scale_max = 100.0;            // clamp exp(theta) <= this; <= 0: no clamp

  int grid_h() const { return image_size[0] / patch; }
  int grid_w() const { return image_size[1] / patch; }
  int num_patches() const { return grid_h() * grid_w(); }  // N
  int patch_dim() const { return patch * patch * channels; }
  bool is_moe(int block) const { return std::find(moe_blocks.begin(), moe_blocks.end(), block) != moe_blocks.end(); }

  // The largest model validate() accepts: 2^36 parameters (275 GB in fp32; H/14 has 5.6e9).
  static constexpr double kMaxParameters = 68719476736.0;

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
    LIMOE_CHECK(std::int64_t{patch} * patch * channels <= (std::int64_t{1} << 24), "config: a patch of ", patch, "x",
                patch, "x", channels, " values is too large (at most 2^24)");
    LIMOE_CHECK(std::int64_t{image_size[0] / patch} * (image_size[1] / patch) <= (std::int64_t{1} << 24),
                "config: image_size / patch gives more than 2^24 patches per image");
    LIMOE_CHECK(width % heads == 0, "config: width ", width, " is not divisible by heads ", heads,
                "; choose heads that divide the width");
    LIMOE_CHECK(pad_id >= 0 && pad_id < vocab_size, "config: pad_id ", pad_id, " outside [0, vocab_size=",
                vocab_size, ")");
    LIMOE_CHECK(ln_eps > 0, "config: ln_eps must be positive, got ", ln_eps);
    LIMOE_CHECK(towers == 1 || towers == 2, "config: towers must be 1 (one tower, LIMoE) or 2 (separate image and "
                "text towers), got ", towers);
    LIMOE_CHECK(towers == 1 || moe_blocks.empty(), "config: a two-tower model (towers 2) has dense blocks only; "
                "set moe_blocks to [] (limoe train --two-tower does)");
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
      LIMOE_CHECK(group_pairs >= 0, "config: group_pairs must be >= 0 (0 = router.group_size decides), got ",
                  group_pairs);
      LIMOE_CHECK(group_pairs == 0 || router.group_size == 0, "config: set either group_pairs (", group_pairs,
                  " pairs per routing group) or router.group_size (", router.group_size, " tokens), not both");
      moe::check_group_capacity(router.group_size, experts, top_k, router.capacity_factor_train,
                                "router.capacity_factor_train");
      moe::check_group_capacity(router.group_size, experts, top_k, router.capacity_factor_eval,
                                "router.capacity_factor_eval");
      // Groups of pairs: S the tokens of group_pairs image-text pairs (both modalities share the MoE layers).
      const index_t pair_tokens = static_cast<index_t>(num_patches()) + text_len;
      for (const auto& [factor, name] : {std::pair{router.capacity_factor_train, "router.capacity_factor_train"},
                                         std::pair{router.capacity_factor_eval, "router.capacity_factor_eval"}})
        moe::check_group_capacity(group_pairs * pair_tokens, experts, top_k, factor, name, "group_pairs", group_pairs);
      LIMOE_CHECK(experts <= moe::kMaxExperts, "config: experts = ", experts, " exceeds the supported ",
                  moe::kMaxExperts);
    }
    const double n = count_params_as<double>(*this).total;  // in double: cannot overflow
    LIMOE_CHECK(n <= kMaxParameters, "config: this model would have ", n, " parameters (", n * 4 / 1e9,
                " GB in fp32), above the limit of ", kMaxParameters, "; check width, mlp_dim, depth, experts and "
                "vocab_size");
  }
};

template <class A>
ParamCountsOf<A> count_params_as(const ModelConfig& c) {
  const A D = c.width, M = c.mlp_dim, E = c.experts, K = c.top_k, P = c.proj_dim;
  const A attn = 4 * (D * D + D), ln = 2 * D, mlp = D * M + M + M * D + D;
  const A head_map = D + attn + ln + mlp;
  auto head = [&](Pooling p) { return p == Pooling::Map ? head_map : A(0); };
  const A moe_n = static_cast<A>(c.moe_blocks.size()), dense_n = static_cast<A>(c.depth) - moe_n;
  const A patch_dim = static_cast<A>(c.patch) * c.patch * c.channels;
  const A patches = static_cast<A>(c.image_size[0] / c.patch) * static_cast<A>(c.image_size[1] / c.patch);
  const A img_embed = patch_dim * D + D + patches * D;
  const A txt_embed = static_cast<A>(c.vocab_size) * D + static_cast<A>(c.text_len) * D;
  const A shared = static_cast<A>(c.depth) * (attn + 2 * ln) + dense_n * mlp + moe_n * E * D /*routers*/ + ln /*norm*/ + 1;
  ParamCountsOf<A> r;
  r.per_block_dense = attn + 2 * ln + mlp;
  r.per_block_moe = attn + 2 * ln + E * mlp + E * D;
  r.experts_per_block = E;
  // A second tower (towers 2, dense only) repeats the blocks and the final LayerNorm for the text tokens.
  const A second_tower = c.towers == 2 ? shared - 1 : A(0);
  r.total = second_tower + shared + moe_n * E * mlp + img_embed + txt_embed + head(c.pool_img) + head(c.pool_txt) + 2 * P * D;
  r.per_token = shared + moe_n * K * mlp + img_embed + head(c.pool_img) + P * D;
  return r;
}

// Parameter counts of a valid config (validate() bounds them, so the integers cannot overflow).
inline ParamCounts count_params(const ModelConfig& c) { return count_params_as<std::int64_t>(c); }

// ---- JSON (docs/cli.md) ---------------------------------------------------------------------------

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
      {"route_padding", c.route_padding},
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
      {"logit_scale_init", c.logit_scale_init},
      {"logit_scale_max", c.logit_scale_max},
  };
  if (c.group_pairs > 0) j["group_pairs"] = c.group_pairs;  // an extension, written only when set
  if (c.towers != 1) j["towers"] = c.towers;                 // likewise
  return j;
}

namespace detail {
// Keys a config object may hold (docs/cli.md plus the three extensions this library writes).
inline const std::vector<std::string>& config_keys() {
  static const std::vector<std::string> k{"image_size", "channels", "patch", "width", "depth", "heads", "mlp_dim",
                                          "vocab_size", "text_len", "experts", "top_k", "moe_blocks", "pool_img",
                                          "pool_txt", "proj_dim", "ln_eps", "gelu", "text_mask", "pad_id", "router",
                                          "aux_loss", "logit_scale_init", "logit_scale_max", "group_pairs",
                                          "route_padding", "towers"};
  return k;
}
inline const std::vector<std::string>& router_keys() {
  static const std::vector<std::string> k{"noise_std", "capacity_factor_train", "capacity_factor_eval",
                                          "capacity_multiple_of", "bpr", "group_size"};
  return k;
}
inline const std::vector<std::string>& aux_loss_keys() {
  static const std::vector<std::string> k{"importance", "load", "local_entropy_img", "local_entropy_txt",
                                          "global_entropy_img", "global_entropy_txt", "tau_img", "tau_txt", "z_loss"};
  return k;
}

inline std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// Rejects a key that is not in `known`, naming it and the nearest known key (a typo must not pass silently).
inline void check_known_keys(const nlohmann::json& j, const std::vector<std::string>& known, const char* where) {
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    std::string best = known.front();
    for (const auto& k : known)
      if (edit_distance(key, k) < edit_distance(key, best)) best = k;
    fail("config: unknown key \"", key, "\"", where, "; did you mean \"", best, "\"?");
  }
}

// A JSON value for an error message: a small one as written (at most 120 characters), a deep or large one by
// its kind and size, without walking it recursively (dump() recurses, and a file may nest values arbitrarily
// deep: 100,000 brackets overflowed the stack).
inline std::string json_excerpt(const nlohmann::json& v) {
  std::vector<std::pair<const nlohmann::json*, int>> todo{{&v, 0}};
  for (std::size_t seen = 0; !todo.empty();) {
    const auto [x, depth] = todo.back();
    todo.pop_back();
    if (++seen > 64 || depth > 8) {
      if (v.is_array()) return "an array of " + std::to_string(v.size()) + " values";
      if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
      return std::string("a ") + v.type_name();
    }
    if (x->is_structured())
      for (const auto& c : *x) todo.push_back({&c, depth + 1});
  }
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

// Reads j[key] into out; scope names the object j is in, for messages ("router." for router.bpr).
template <class V>
void json_get(const nlohmann::json& j, const char* key, V& out, bool required, const char* scope = "") {
  auto it = j.find(key);
  if (it == j.end()) {
    LIMOE_CHECK(!required, "config: missing required key \"", scope, key, "\"");
    return;
  }
  try {
    out = it->template get<V>();
  } catch (const nlohmann::json::exception&) {
    fail("config: key \"", scope, key, "\" has the wrong type: ", json_excerpt(*it));
  }
}

// An integer in [lo, hi], checked before it is narrowed: 2^40 is an error naming the key, never a wrapped int.
template <class I>
I checked_int(const nlohmann::json& v, const std::string& key, std::int64_t lo, std::int64_t hi) {
  LIMOE_CHECK(v.is_number_integer(), "config: key \"", key, "\" must be an integer, got ", json_excerpt(v));
  const bool neg = v.is_number_unsigned() ? false : v.get<std::int64_t>() < 0;
  const bool big = v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi);
  const std::int64_t x = big ? hi : (neg ? v.get<std::int64_t>() : static_cast<std::int64_t>(v.get<std::uint64_t>()));
  LIMOE_CHECK(!big && x >= lo && x <= hi, "config: key \"", key, "\" = ", json_excerpt(v), " is out of range [", lo, ", ",
              hi, "]");
  return static_cast<I>(x);
}
template <class I>
void json_get_int(const nlohmann::json& j, const char* key, I& out, bool required, std::int64_t lo, std::int64_t hi,
                  const char* scope = "") {
  auto it = j.find(key);
  if (it == j.end()) {
    LIMOE_CHECK(!required, "config: missing required key \"", scope, key, "\"");
    return;
  }
  out = checked_int<I>(*it, std::string(scope) + key, lo, hi);
}
}  // namespace detail

// Parses a config object. Keys docs/cli.md lists as the model's shape are required; the rest default.
inline ModelConfig config_from_json(const nlohmann::json& j) {
  LIMOE_CHECK(j.is_object(), "config: expected a JSON object, got ", j.type_name());
  using detail::json_get;
  using detail::json_get_int;
  detail::check_known_keys(j, detail::config_keys(), "");
  // Sizes are bounded by name before anything is allocated; the total is bounded by validate().
  constexpr std::int64_t kDim = 1 << 16, kImage = 1 << 14, kBig = std::int64_t{1} << 24;
  ModelConfig c;
  auto size_it = j.find("image_size");
  LIMOE_CHECK(size_it != j.end(), "config: missing required key \"image_size\"");
  LIMOE_CHECK(size_it->is_array() && size_it->size() == 2, "config: image_size must be [H, W], got ",
              detail::json_excerpt(*size_it));
  c.image_size = {detail::checked_int<int>((*size_it)[0], "image_size[0]", 1, kImage),
                  detail::checked_int<int>((*size_it)[1], "image_size[1]", 1, kImage)};
  json_get_int(j, "channels", c.channels, true, 1, 1024);
  json_get_int(j, "patch", c.patch, true, 1, kImage);
  json_get_int(j, "width", c.width, true, 1, kDim);
  json_get_int(j, "depth", c.depth, true, 1, 4096);
  json_get_int(j, "heads", c.heads, true, 1, kDim);
  json_get_int(j, "mlp_dim", c.mlp_dim, true, 1, kBig);
  json_get_int(j, "vocab_size", c.vocab_size, true, 1, kBig);
  json_get_int(j, "text_len", c.text_len, true, 1, kDim);
  json_get_int(j, "experts", c.experts, false, 1, moe::kMaxExperts);
  json_get_int(j, "top_k", c.top_k, false, 1, moe::kMaxExperts);
  auto blocks_it = j.find("moe_blocks");
  LIMOE_CHECK(blocks_it != j.end(), "config: missing required key \"moe_blocks\"");
  LIMOE_CHECK(blocks_it->is_array(), "config: moe_blocks must be a list of block indices, got ",
              detail::json_excerpt(*blocks_it));
  c.moe_blocks.clear();
  for (const auto& b : *blocks_it) c.moe_blocks.push_back(detail::checked_int<int>(b, "moe_blocks[]", 0, 4095));
  std::string pi = "map", pt = "map", gelu = "erf";
  json_get(j, "pool_img", pi, false);
  json_get(j, "pool_txt", pt, false);
  c.pool_img = parse_pooling_for(pi, false);
  c.pool_txt = parse_pooling_for(pt, true);
  c.proj_dim = c.width;
  json_get_int(j, "proj_dim", c.proj_dim, false, 1, kDim);
  json_get(j, "ln_eps", c.ln_eps, false);
  json_get(j, "gelu", gelu, false);
  LIMOE_CHECK(gelu == "erf" || gelu == "tanh", "config: gelu must be \"erf\" or \"tanh\", got \"", gelu, "\"");
  c.gelu = gelu == "erf" ? GeluKind::Erf : GeluKind::Tanh;
  json_get(j, "text_mask", c.text_mask, false);
  c.route_padding = true;  // absent: written before masked routing existed, when padding was routed
  json_get(j, "route_padding", c.route_padding, false);
  json_get_int(j, "pad_id", c.pad_id, false, 0, kBig);
  json_get_int(j, "group_pairs", c.group_pairs, false, 0, kBig);
  json_get_int(j, "towers", c.towers, false, 1, 2);
  if (auto r = j.find("router"); r != j.end()) {
    LIMOE_CHECK(r->is_object(), "config: \"router\" must be an object");
    detail::check_known_keys(*r, detail::router_keys(), " in \"router\"");
    const char* in = "router.";
    json_get(*r, "noise_std", c.router.noise_std, false, in);
    json_get(*r, "capacity_factor_train", c.router.capacity_factor_train, false, in);
    json_get(*r, "capacity_factor_eval", c.router.capacity_factor_eval, false, in);
    json_get_int(*r, "capacity_multiple_of", c.router.capacity_multiple_of, false, 1, kBig, in);
    json_get(*r, "bpr", c.router.bpr, false, in);
    json_get_int(*r, "group_size", c.router.group_size, false, 0, std::int64_t{1} << 40, in);
  }
  if (auto a = j.find("aux_loss"); a != j.end()) {
    LIMOE_CHECK(a->is_object(), "config: \"aux_loss\" must be an object");
    detail::check_known_keys(*a, detail::aux_loss_keys(), " in \"aux_loss\"");
    // Each weight and tau finite and >= 0, checked by name (AuxLossConfig::validate checks them again,
    // for configs built in code, without the names).
    const std::pair<const char*, double*> weights[] = {
        {"importance", &c.aux.importance_weight},
        {"load", &c.aux.load_weight},
        {"local_entropy_img", &c.aux.local_entropy_weight[0]},
        {"local_entropy_txt", &c.aux.local_entropy_weight[1]},
        {"global_entropy_img", &c.aux.global_entropy_weight[0]},
        {"global_entropy_txt", &c.aux.global_entropy_weight[1]},
        {"z_loss", &c.aux.z_loss_weight}};
    for (const auto& [key, w] : weights) {
      json_get(*a, key, *w, false, "aux_loss.");
      LIMOE_CHECK(std::isfinite(*w) && *w >= 0, "config: aux_loss.", key, " (a loss weight) must be finite and >= 0, got ",
                  *w);
    }
    for (const auto& [key, tau] : {std::pair{"tau_img", &c.aux.global_entropy_tau[0]},
                                   std::pair{"tau_txt", &c.aux.global_entropy_tau[1]}}) {
      json_get(*a, key, *tau, false, "aux_loss.");
      LIMOE_CHECK(std::isfinite(*tau) && *tau >= 0, "config: aux_loss.", key, " (the global entropy's target, in "
                  "nats) must be finite and >= 0, got ", *tau, ": an entropy is >= 0, so a negative target makes the "
                  "term 0 whatever the routing (set its weight to 0 to turn it off)");
    }
  }
  json_get(j, "logit_scale_init", c.logit_scale_init, false);
  LIMOE_CHECK(std::isfinite(c.logit_scale_init) && std::abs(c.logit_scale_init) <= 20, "config: logit_scale_init "
              "(theta_0, the initial log temperature scale) must be finite and within [-20, 20], got ", c.logit_scale_init);
  json_get(j, "logit_scale_max", c.logit_scale_max, false);
  c.validate();
  return c;
}

namespace detail {
// Parses JSON text as the config reader does, refusing a key given twice in one object (the JSON reader would
// keep the last of the two values: {"width": 32, ..., "width": 64}); `what` names the text in errors. A NUL is
// refused too (the reader would stop there as at the end of its input, ignoring what follows).
inline nlohmann::json parse_json_unique_keys(const std::string& s, const std::string& what) {
  LIMOE_CHECK(s.find('\0') == std::string::npos, what, ": not valid JSON (a NUL character at offset ", s.find('\0'), ")");
  std::vector<std::set<std::string>> keys;  // the keys seen in each object being read
  std::string twice;
  bool found = false;
  const auto watch = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) keys.emplace_back();
    else if (event == E::object_end) keys.pop_back();
    else if (event == E::key && !found && !keys.back().insert(parsed.get<std::string>()).second)
      found = true, twice = parsed.get<std::string>();
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(s, watch);
  } catch (const nlohmann::json::exception& e) {
    fail(what, ": not valid JSON (", e.what(), ")");
  }
  LIMOE_CHECK(!found, what, ": the key ", json_excerpt(nlohmann::json(twice)),
              " appears twice in one object (which of its values is meant?)");
  return j;
}
}  // namespace detail

inline ModelConfig config_from_json_string(const std::string& s) {
  return config_from_json(detail::parse_json_unique_keys(s, "config"));
}

}  // namespace limoe
