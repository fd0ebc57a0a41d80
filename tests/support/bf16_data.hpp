// Test data for the bf16 kernels' tests (test_amx, test_dpbf16): n standard normal values rounded to bf16, the
// i-th from the counter-based draw (seed, i), so a case's operands do not depend on the order they are made in.
#pragma once

#include <cstdint>
#include <vector>

#include "limoe/core/precision.hpp"
#include "limoe/core/rng.hpp"

namespace limoe::testing {

inline std::vector<bf16_bits> random_bf16(index_t n, std::uint64_t seed) {
  const Rng rng(seed);
  std::vector<bf16_bits> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = to_bf16(static_cast<float>(rng.normal(0, i)));
  return v;
}

}  // namespace limoe::testing
