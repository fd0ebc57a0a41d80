// limoe/model/presets.hpp: the named variants (semantics §2) and parameter counting.
//
// Large variants: ViT sizes on 224x224x3 with a 32k vocabulary and 16 text tokens. Small variants train on a
// 2-core machine (28x28x1 Fashion-MNIST, 32x32x3 synthetic shapes).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "limoe/model/config.hpp"

namespace limoe {

namespace detail {
inline ModelConfig vit(int width, int depth, int mlp, int heads, int patch, int experts, std::vector<int> moe) {
  ModelConfig c;
  c.image_size = {224, 224};
  c.channels = 3;
  c.patch = patch;
  c.width = width;
  c.depth = depth;
  c.mlp_dim = mlp;
  c.heads = heads;
  c.vocab_size = 32000;
  c.text_len = 16;
  c.experts = experts;
  c.top_k = 1;
  c.moe_blocks = std::move(moe);
  c.proj_dim = width;
  return c;
}
inline std::vector<int> every_other(int first, int depth) {
  std::vector<int> v;
  for (int b = first; b < depth; b += 2) v.push_back(b);
  return v;
}
inline std::vector<int> every(int depth) {
  std::vector<int> v;
  for (int b = 0; b < depth; ++b) v.push_back(b);
  return v;
}
}  // namespace detail

inline std::vector<std::string> preset_names() {
  return {"S/32", "B/32", "B/16", "L/16", "H/14", "tiny", "small-28", "small-32", "small-56"};
}

// A named variant; throws with the list of names when unknown.
inline ModelConfig preset(const std::string& name) {
  using namespace detail;
  if (name == "S/32") return vit(384, 12, 1536, 6, 32, 8, every_other(1, 12));
  if (name == "B/32") return vit(768, 12, 3072, 12, 32, 8, every_other(1, 12));
  if (name == "B/16") return vit(768, 12, 3072, 12, 16, 8, every(12));
  if (name == "L/16") return vit(1024, 24, 4096, 16, 16, 8, every(24));
  if (name == "H/14") return vit(1280, 32, 5120, 16, 14, 32, every_other(9, 32));  // last 24 blocks, every other
  ModelConfig c;
  c.image_size = {28, 28};
  c.channels = 1;
  c.vocab_size = 512;
  c.text_len = 16;
  c.router.group_size = 0;
  if (name == "tiny") {  // tests and smoke runs
    c.patch = 7;
    c.width = 32;
    c.depth = 2;
    c.heads = 2;
    c.mlp_dim = 64;
    c.experts = 4;
    c.moe_blocks = {1};
    c.proj_dim = 32;
  } else if (name == "small-28" || name == "small-32" || name == "small-56") {
    // small-28: the default, Fashion-MNIST on 2 cores (16 image tokens of 7x7 pixels);
    // small-32: the same tower on 32x32x3 images (synthetic shapes), 16 tokens of 8x8x3;
    // small-56: the same tower on the 56x56x3 Fashion-MNIST scenes, 64 tokens of 7x7x3.
    c.patch = 7;
    if (name == "small-32") {
      c.image_size = {32, 32};
      c.channels = 3;
      c.patch = 8;
    } else if (name == "small-56") {
      c.image_size = {56, 56};
      c.channels = 3;
    }
    c.width = 128;
    c.depth = 4;
    c.heads = 4;
    c.mlp_dim = 512;
    c.experts = 8;
    c.moe_blocks = {1, 3};
    c.proj_dim = 128;
    // The recipe of docs/experiments.md (the recipe screen on the demo's data): both heads average the tokens
    // (global average pooling; text over its words only) and text attention skips padding.
    c.pool_img = Pooling::Gap;
    c.pool_txt = Pooling::Gap;
    c.text_mask = true;
  } else {
    std::string names;
    for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
    fail("unknown preset \"", name, "\"; known presets: ", names);
  }
  return c;
}

// The dense one-tower model of the same per-token compute: every MoE block becomes a dense MLP.
inline ModelConfig dense_variant(ModelConfig c) {
  c.moe_blocks.clear();
  return c;
}

// The two-tower dense model (CLIP-style) of the same per-token compute: the dense variant with a second tower,
// so image and text tokens run through separate blocks (ModelConfig::towers).
inline ModelConfig two_tower_variant(ModelConfig c) {
  c = dense_variant(std::move(c));
  c.towers = 2;
  return c;
}

}  // namespace limoe
