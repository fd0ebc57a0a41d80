// limoe/moe/stats.hpp: what a MoE layer call reports about its routing (semantics §6), as data.
//
// Counts are of choices (a token has K of them); arrays indexed [modality][expert], modality 0 image, 1 text.
// Filled by the layer's forward into MoeContext::stats; the vectors keep their storage between calls.
#pragma once

#include <array>
#include <vector>

#include "limoe/core/tensor.hpp"
#include "limoe/moe/config.hpp"

namespace limoe::moe {

struct RoutingStats {
  int experts = 0, top_k = 0;
  index_t groups = 0;        // routing groups in the call
  index_t capacity = 0;      // C of the first group (a trailing shorter group may have a smaller one)
  std::array<index_t, kModalities> tokens{};           // tokens per modality (padding excluded)
  index_t padding = 0;                                 // padding tokens of the call (kPad: not routed, not counted)
  std::array<std::vector<index_t>, kModalities> routed;   // [m][e] choices of modality m accepted by expert e
  std::array<std::vector<index_t>, kModalities> dropped;  // [m][e] choices of modality m for e that were dropped
  std::array<index_t, kModalities> tokens_fully_dropped{};  // tokens with no accepted choice (they get y = 0)
  std::array<double, kModalities> drop_fraction{};       // dropped choices / (tokens * K); 0 if absent.
                                                         // Routing success = 1 - drop_fraction.
  std::vector<double> image_share;  // [e] image choices / all choices accepted by e; 0 when e received none
  // Entropies of the clean gates G = softmax(logits) over all tokens of the call (not per group), natural log:
  std::array<double, kModalities> local_entropy{};   // mean_s H(G[s, :])
  std::array<double, kModalities> global_entropy{};  // H(mean_s G[s, :]) (the raw entropy, not the loss term)
  std::array<std::vector<double>, kModalities> mean_gate;  // [m][e] mean_s G[s, e] (global_entropy's argument)

  double routing_success(int m) const { return 1.0 - drop_fraction[static_cast<std::size_t>(m)]; }
};

}  // namespace limoe::moe
