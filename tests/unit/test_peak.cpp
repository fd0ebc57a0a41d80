// The machine's ceiling loops (core/peak.hpp): every unit this processor has counts exactly the terms its loop
// adds (each accumulator element iters * terms, and the flops the benchmark reports twice what all of them
// counted); the unit chosen per precision is the widest the process may run; wrong calls are refused. Units
// the processor lacks are skipped with one line; nothing here is timed against a figure.
#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include "limoe/core/amx.hpp"
#include "limoe/core/dpbf16.hpp"
#include "limoe/core/fma512.hpp"
#include "limoe/core/peak.hpp"
#include "support/skip.hpp"

namespace {
using limoe::peak::Kind;

std::vector<Kind> units_here() {
  std::vector<Kind> k;
#if defined(LIMOE_FMA512_KERNEL)
  if (limoe::peak::detail::cpu_has_avx2_fma()) k.push_back(Kind::Avx2Fma);
#endif
  if (limoe::fma512::available()) k.push_back(Kind::Avx512Fma);
  if (limoe::dpbf16::available()) k.push_back(Kind::Avx512Bf16);
  if (limoe::amx::available()) k.push_back(Kind::AmxBf16);
  return k;
}
}  // namespace

TEST_CASE("peak: each unit's accumulators count exactly the terms of its loop, and the flops are twice that") {
  const auto units = units_here();
  if (units.empty()) LIMOE_SKIP("this processor or process has none of AVX2 + FMA, AVX-512, AVX-512 BF16, AMX");
  for (const Kind k : units) {
    INFO("unit ", limoe::peak::name(k));
    for (const std::int64_t iters : {0, 1, 7, 1000}) {
      float lanes[16];
      const auto r = limoe::peak::run(k, iters, lanes);
      for (float v : lanes) CHECK(v == static_cast<float>(iters * limoe::peak::terms(k)));
      CHECK(r.flop == 2 * r.counted);  // the flops reported are the products and sums the accumulators hold
    }
    // Three threads, two repeats: the flops of a repeat are every thread's, and the best rate is the fastest
    // repeat's (a worker's result is not returned: the lanes above check the arithmetic).
    const auto m = limoe::peak::measure(k, 3, 2, 0.005);
    REQUIRE(m.seconds.size() == 2);
    CHECK(m.threads == 3);
    CHECK(m.iters >= 1);
    CHECK(m.flop == 3.0 * static_cast<double>(m.iters) * limoe::peak::flops_per_iteration(k));
    const double fastest = std::min(m.seconds[0], m.seconds[1]);
    CHECK(fastest > 0);
    CHECK(m.best_gflops() == doctest::Approx(m.flop / fastest / 1e9).epsilon(1e-12));
  }
}

TEST_CASE("peak: the unit of each precision is the widest this process may run") {
  using limoe::PrecisionKind;
  const Kind fp32 = limoe::peak::kind(PrecisionKind::Fp32), bf16 = limoe::peak::kind(PrecisionKind::Bf16);
  if (limoe::fma512::available()) CHECK(fp32 == Kind::Avx512Fma);
  else if (fp32 != Kind::None) CHECK(fp32 == Kind::Avx2Fma);
  if (limoe::amx::available()) CHECK(bf16 == Kind::AmxBf16);
  else if (limoe::dpbf16::available()) CHECK(bf16 == Kind::Avx512Bf16);
  else CHECK(bf16 == Kind::None);
}

TEST_CASE("peak: the errors of a wrong call") {
  float lanes[16];
  CHECK_THROWS_WITH(limoe::peak::run(Kind::None, 10, lanes), doctest::Contains("no none loop"));
  CHECK_THROWS_WITH(limoe::peak::measure(Kind::None, 1), doctest::Contains("no unit"));
  CHECK_THROWS_WITH(limoe::peak::measure(Kind::Avx512Fma, 0), doctest::Contains("threads and repeats"));
  const auto units = units_here();
  if (!units.empty()) CHECK_THROWS_WITH(limoe::peak::run(units[0], -1, lanes), doctest::Contains("iterations"));
  // A unit this processor lacks is refused by the caller (kind() never names it); AMX without its permission
  // would fault, so it is not called here.
}
