// limoe/core/rng.hpp: a counter-based random generator (Philox4x32-10, Salmon et al., SC 2011).
//
// A value is a pure function of (seed, stream, index): no state is carried between draws, so the numbers a
// token or a weight receives do not depend on the thread count, the order of evaluation or the backend.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace limoe {

class Rng {
 public:
  explicit constexpr Rng(std::uint64_t seed = 0) : seed_(seed) {}
  constexpr std::uint64_t seed() const { return seed_; }

  // Four independent 32-bit words for counter (stream, index).
  constexpr std::array<std::uint32_t, 4> bits(std::uint64_t stream, std::uint64_t index) const {
    std::array<std::uint32_t, 4> c{static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
                                   static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)};
    std::uint32_t k0 = static_cast<std::uint32_t>(seed_), k1 = static_cast<std::uint32_t>(seed_ >> 32);
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c[0];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c[2];
      c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k0, static_cast<std::uint32_t>(p1),
           static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k1, static_cast<std::uint32_t>(p0)};
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return c;
  }

  // Uniform in (0, 1), never exactly 0 or 1.
  double uniform(std::uint64_t stream, std::uint64_t index) const {
    const auto b = bits(stream, index);
    const std::uint64_t u = (std::uint64_t{b[0]} << 21) ^ b[1];  // 53 random bits
    return (static_cast<double>(u & ((std::uint64_t{1} << 53) - 1)) + 0.5) * 0x1.0p-53;
  }

  // Standard normal by Box-Muller on two uniforms drawn from the same counter.
  double normal(std::uint64_t stream, std::uint64_t index) const {
    const auto b = bits(stream, index);
    const double u1 = ((std::uint64_t{b[0]} << 21 ^ b[1]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    const double u2 = ((std::uint64_t{b[2]} << 21 ^ b[3]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

  // A generator for a named sub-purpose (layer i, step t): a different key, so streams never collide.
  constexpr Rng derive(std::uint64_t tag) const {
    const auto b = bits(0xFFFFFFFFFFFFFFFFull, tag);
    return Rng((std::uint64_t{b[0]} << 32) | b[1]);
  }

 private:
  std::uint64_t seed_;
};

}  // namespace limoe
