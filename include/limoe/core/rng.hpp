// limoe/core/rng.hpp: a counter-based random generator (Philox4x32-10, Salmon et al., SC 2011).
//
// A value is a pure function of (seed, stream, index): no state is carried between draws, so the numbers a
// token or a weight receives do not depend on the thread count, the order of evaluation or the backend.
// `normal` is host-and-device (LIMOE_HD): the CUDA backend draws the router's noise on the GPU with it (the
// same operations, see normal()).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "limoe/math/host_device.hpp"
#include "limoe/math/plain.hpp"

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

  // Standard normal by Box-Muller on two uniforms drawn from the same counter: sqrt(-2 log u1) cos(2 pi u2),
  // with log and cos as polynomials (plain arithmetic, no libm call: math/plain.hpp's plain_log, cos_2pi
  // below): the compiler vectorises a loop of draws (the router's noise: 5 ns a draw against 31 with libm's
  // scalar log and cos, g++ -O3 on Zen 4), and a GPU runs the same operations. Within 5e-16 relative (log) and 1e-15 absolute (cos) of the
  // exact functions over (0, 1), so a draw is within a few 1e-15 of libm's Box-Muller; host and device may
  // still differ in the last bits where one compiler contracts a * b + c into an FMA and the other not.
  LIMOE_HD double normal(std::uint64_t stream, std::uint64_t index) const {
    std::uint32_t b[4]{};
    philox(stream, index, b);
    const double u1 = ((std::uint64_t{b[0]} << 21 ^ b[1]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    const double u2 = ((std::uint64_t{b[2]} << 21 ^ b[3]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    return sqrt(-2.0 * log_unit(u1)) * cos_2pi(u2);
  }

  // log x for x in (0, 1]: math/plain.hpp's plain_log (a normal double; u1 is at least 2^-54).
  LIMOE_HD static double log_unit(double x) { return math::plain_log(x); }
  // cos(2 pi u) for u in [0, 1]: with a = |u - 1/2| in [0, 1/2], cos(2 pi u) = -cos(2 pi a); folded to
  // b in [0, 1/4] (cos(2 pi a) = -cos(2 pi (1/2 - a)) above 1/4), x = 2 pi b in [0, pi/2], cos x by its
  // Taylor series to x^22 (the next term is below 1e-19 at pi/2).
  LIMOE_HD static double cos_2pi(double u) {
    double a = u - 0.5;
    a = a < 0 ? -a : a;
    const bool far = a > 0.25;
    const double bb = far ? 0.5 - a : a;
    const double x = 6.283185307179586476925 * bb, y = x * x;
    double p = -1.0 / 1124000727777607680000.0;  // -1 / 22!
    p = p * y + 1.0 / 2432902008176640000.0, p = p * y - 1.0 / 6402373705728000.0;
    p = p * y + 1.0 / 20922789888000.0, p = p * y - 1.0 / 87178291200.0, p = p * y + 1.0 / 479001600.0;
    p = p * y - 1.0 / 3628800.0, p = p * y + 1.0 / 40320.0, p = p * y - 1.0 / 720.0, p = p * y + 1.0 / 24.0;
    p = p * y - 0.5, p = p * y + 1.0;
    return far ? p : -p;
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
