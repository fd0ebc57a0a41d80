// limoe/core/enums.hpp: the light enums every layer of the library shares (semantics §1, §3). Configs and
// public headers include this, not the kernels that use the enums.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "limoe/core/error.hpp"

namespace limoe {

// Training draws router noise and uses the training capacity factor; evaluation uses neither and keeps no
// activations for a backward pass (semantics §3).
enum class Mode { Train, Eval };

// Per-token modality: 0 image, 1 text (the order of the token matrix: image rows first). A MoE layer also
// accepts kPad for a padding token: it is not routed (its layer output is 0, its route -1) and takes no part in
// capacity, the auxiliary losses or the routing statistics (moe/layer.hpp, semantics §3). Per-modality arrays
// have kModalities entries: padding is not a modality.
enum Modality : std::uint8_t { kImage = 0, kText = 1, kPad = 2 };
inline constexpr int kModalities = 2;

// GELU: exact erf form or the tanh approximation (semantics §1).
enum class GeluKind { Erf, Tanh };

// Pooling heads (semantics §1): mean over tokens, attention pooling with a learned probe, first, last.
enum class Pooling { Gap, Map, First, Last };

inline const char* pooling_name(Pooling p) {
  switch (p) {
    case Pooling::Gap: return "gap";
    case Pooling::Map: return "map";
    case Pooling::First: return "first";
    case Pooling::Last: return "last";
  }
  return "?";
}

// "gap" | "map" | "first" | "last" (the config spelling, docs/cli.md).
inline Pooling parse_pooling(std::string_view s) {
  if (s == "gap") return Pooling::Gap;
  if (s == "map") return Pooling::Map;
  if (s == "first") return Pooling::First;
  if (s == "last") return Pooling::Last;
  fail("unknown pooling \"", std::string(s), "\"; expected one of gap, map, first, last");
}

}  // namespace limoe
