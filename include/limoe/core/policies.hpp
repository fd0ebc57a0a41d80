// limoe/core/policies.hpp: the precision policy types alone (core/precision.hpp adds the bf16 weight mirror,
// the conversions over the thread pool and the concept), so code compiled by nvcc (the CUDA backend's
// declarations, backend/cuda_ops.hpp) names the same types the model passes without the CPU's machinery.
#pragma once

#include <cstdint>

#include "limoe/core/tensor.hpp"

namespace limoe {

// bf16: the upper 16 bits of an IEEE binary32 (8 exponent bits, 7 stored mantissa bits).
using bf16_bits = std::uint16_t;

class WeightMirror;  // core/precision.hpp

// Every product in fp32 (the default policy).
struct Fp32 {
  static constexpr const char* name = "fp32";
  static constexpr bool mixed = false;
};

// The large products read bf16 operands and accumulate in fp32 (core/precision.hpp explains the split).
struct Bf16Mixed {
  static constexpr const char* name = "bf16";
  static constexpr bool mixed = true;
  // Where the weights' bf16 copies are found (a CPU model points it at its own host mirror; a device model
  // leaves it empty); operands not found there are rounded as they enter the product.
  const WeightMirror* weights = nullptr;
  const bf16_bits* find(const float* p, index_t n) const;  // defined in core/precision.hpp
};

}  // namespace limoe
