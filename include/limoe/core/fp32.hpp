// limoe/core/fp32.hpp: the fp32 precision policy alone (core/precision.hpp has the others and the concept), so
// code compiled by nvcc (the CUDA backend's declarations, backend/cuda_ops.hpp) names the same type the model
// passes without including the CPU's bf16 machinery.
#pragma once

namespace limoe {

// Every product in fp32 (the default policy).
struct Fp32 {
  static constexpr const char* name = "fp32";
  static constexpr bool mixed = false;
};

}  // namespace limoe
