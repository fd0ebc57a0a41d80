// limoe/core/rng.hpp: a counter-based random generator (Philox4x32-10, Salmon et al., SC 2011).
//
// A value is a pure function of (seed, stream, index): no state is carried between draws, so the numbers a
// token or a weight receives do not depend on the thread count, the order of evaluation or the backend.
// `normal` is host-and-device (LIMOE_HD): the CUDA backend draws the router's noise on the GPU with it (there
// to within an ulp or two of the host's value, see normal()).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "limoe/math/host_device.hpp"

namespace limoe {

class Rng {
 public:
  explicit constexpr Rng(std::uint64_t seed = 0) : seed_(seed) {}
  constexpr std::uint64_t seed() const { return seed_; }

  // Four independent 32-bit words for counter (stream, index).
  constexpr std::array<std::uint32_t, 4> bits(std::uint64_t stream, std::uint64_t index) const {
    std::uint32_t c[4]{};
    philox(stream, index, c);
    return {c[0], c[1], c[2], c[3]};
  }

  // Uniform in (0, 1), never exactly 0 or 1.
  double uniform(std::uint64_t stream, std::uint64_t index) const {
    const auto b = bits(stream, index);
    const std::uint64_t u = (std::uint64_t{b[0]} << 21) ^ b[1];  // 53 random bits
    return (static_cast<double>(u & ((std::uint64_t{1} << 53) - 1)) + 0.5) * 0x1.0p-53;
  }

  // Standard normal by Box-Muller on two uniforms drawn from the same counter.
  LIMOE_HD double normal(std::uint64_t stream, std::uint64_t index) const {
    std::uint32_t b[4]{};
    philox(stream, index, b);
    const double u1 = ((std::uint64_t{b[0]} << 21 ^ b[1]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    const double u2 = ((std::uint64_t{b[2]} << 21 ^ b[3]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
#if defined(__CUDA_ARCH__)
    // On a GPU cos(2 pi u) as cospi(2 u): the same value to an ulp or two, without cos's slow-path argument
    // reduction (a stack frame in every kernel that draws). Device draws may so differ from host draws in
    // their last bits; host draws (every initialisation, the CPU's noise) are unchanged.
    return sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);
#else
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
#endif
  }

  // A generator for a named sub-purpose (layer i, step t): a different key, so streams never collide.
  constexpr Rng derive(std::uint64_t tag) const {
    const auto b = bits(0xFFFFFFFFFFFFFFFFull, tag);
    return Rng((std::uint64_t{b[0]} << 32) | b[1]);
  }

 private:
  // Philox4x32-10 of counter (index, stream) under key seed_, into c[4] (plain arrays: host and device).
  LIMOE_HD constexpr void philox(std::uint64_t stream, std::uint64_t index, std::uint32_t* c) const {
    c[0] = static_cast<std::uint32_t>(index), c[1] = static_cast<std::uint32_t>(index >> 32);
    c[2] = static_cast<std::uint32_t>(stream), c[3] = static_cast<std::uint32_t>(stream >> 32);
    std::uint32_t k0 = static_cast<std::uint32_t>(seed_), k1 = static_cast<std::uint32_t>(seed_ >> 32);
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c[0];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c[2];
      const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k0, n1 = static_cast<std::uint32_t>(p1);
      const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k1, n3 = static_cast<std::uint32_t>(p0);
      c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
  }

  std::uint64_t seed_;
};

}  // namespace limoe
