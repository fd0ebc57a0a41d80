// limoe/core/peak.hpp: the arithmetic ceiling of this machine, measured: independent multiply-adds on the widest
// unit this process may run, from registers (nothing read from memory), on 1 to n threads at once.
//
//   peak::kind(prec)                      the unit measured for a precision: Fp32: AVX-512 F (16-float FMA) or
//                                         AVX2 + FMA (8-float); Bf16: AMX-BF16 tiles, else AVX-512 BF16
//                                         (VDPBF16PS); Kind::None where the process has none of them
//   peak::run(k, iters, lanes)            the loop on this thread: the flops done and what the accumulators
//                                         counted; lanes[0, 16) receive 16 accumulator elements, each exactly
//                                         iters * peak::terms(k)
//   peak::measure(k, threads, repeats)    `threads` threads run the loop at once, `repeats` times: the flops
//                                         of a repeat and each repeat's time (Timings::best_gflops)
//
// Why: a benchmark's "ceiling" was the best matrix product of the run (bench/run_compare.sh), which says how far
// a workload is from a good product, not from the machine. A target such as "1.2x the peer" can ask for more
// than a core can do (bench/README.md: the B/32 bf16 embedding on one Zen 4 core, where 1.2x of the peer is 95%
// of this figure); measured here, in the same run, that reads off the table instead of a paper argument.
//
// The loops: 24 accumulators (AVX-512; 12 under AVX2) so that each unit has more independent chains than its
// latency times its issue rate; the operand register passes through an empty asm statement every iteration, so
// the compiler can neither fold the constant 1.0 x 1.0 into an add (which runs on more ports) nor hoist the
// work. Operands are 1.0: every accumulator element counts exactly the terms added to it, which the tests read.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <latch>
#include <string>
#include <thread>
#include <vector>

#include "limoe/core/amx.hpp"
#include "limoe/core/dpbf16.hpp"
#include "limoe/core/precision.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/fma512.hpp"

namespace limoe::peak {

enum class Kind { None, Avx2Fma, Avx512Fma, Avx512Bf16, AmxBf16 };

inline const char* name(Kind k) {
  switch (k) {
    case Kind::Avx2Fma: return "avx2_fma";
    case Kind::Avx512Fma: return "avx512_fma";
    case Kind::Avx512Bf16: return "avx512_bf16";
    case Kind::AmxBf16: return "amx_bf16";
    case Kind::None: break;
  }
  return "none";
}

// Terms added to each accumulator element per iteration of the loop (the lanes' count is iters * terms(k)),
// and the flops of one iteration of one thread.
inline std::int64_t terms(Kind k) {
  switch (k) {
    case Kind::Avx2Fma:
    case Kind::Avx512Fma: return 1;
    case Kind::Avx512Bf16: return 2;  // a pair per lane
    case Kind::AmxBf16: return 32;    // 16 pairs: the 64 bytes of a tile row
    case Kind::None: break;
  }
  return 0;
}
inline double flops_per_iteration(Kind k) {
  switch (k) {
    case Kind::Avx2Fma: return 12.0 * 8 * 2;       // 12 chains of 8 floats, a multiply and an add each
    case Kind::Avx512Fma: return 24.0 * 16 * 2;    // 24 chains of 16 floats
    case Kind::Avx512Bf16: return 24.0 * 16 * 4;   // 24 chains of 16 floats, two products and two adds each
    case Kind::AmxBf16: return 4.0 * 16 * 16 * 64; // 4 tiles of 16 x 16 floats, 32 products and 32 adds each
    case Kind::None: break;
  }
  return 0;
}

namespace detail {
// The accumulators' elements after the loop (N accumulators of W floats each: vector registers, or AMX tiles
// stored to memory): their sum (every term each one counted, so the flops done are twice it), and lanes[i] the
// least of the elements at i modulo 16 (modulo W where W < 16) over them all (a chain left out would show).
template <class V, int N>
double tally(const V (&acc)[N], float* lanes) {
  constexpr int W = sizeof(V) / sizeof(float);
  double sum = 0;
  std::fill(lanes, lanes + 16, 3.4e38f);
  for (int j = 0; j < N; ++j) {
    float e[W];
    std::memcpy(e, &acc[j], sizeof e);
    for (int i = 0; i < W; ++i) sum += e[i];
    for (int i = 0; i < std::max(W, 16); ++i) lanes[i % 16] = std::min(lanes[i % 16], e[i % W]);
  }
  return sum;
}
}  // namespace detail

#if defined(LIMOE_FMA512_KERNEL)
namespace detail {
inline bool cpu_has_avx2_fma() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid(1, a, b, c, d);
  const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u;
  if (!fma || !osxsave) return false;
  __cpuid_count(7, 0, a, b, c, d);
  if (((b >> 5) & 1u) == 0) return false;  // AVX2
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0x6u) == 0x6u;  // SSE and AVX state
}

__attribute__((target("avx2,fma"))) inline double run_avx2(std::int64_t iters, float* lanes) {
  __m256 acc[12];
  for (auto& v : acc) v = _mm256_setzero_ps();
  __m256 one = _mm256_set1_ps(1.0f);
  for (std::int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(one));
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm256_fmadd_ps(one, one, acc[j]);
  }
  return detail::tally(acc, lanes);
}

__attribute__((target("avx512f"))) inline double run_fma512(std::int64_t iters, float* lanes) {
  __m512 acc[24];
  for (auto& v : acc) v = _mm512_setzero_ps();
  __m512 one = _mm512_set1_ps(1.0f);
  for (std::int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+v"(one));
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) acc[j] = _mm512_fmadd_ps(one, one, acc[j]);
  }
  return detail::tally(acc, lanes);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline double run_dpbf16(std::int64_t iters,
                                                                                        float* lanes) {
  __m512 acc[24];
  for (auto& v : acc) v = _mm512_setzero_ps();
  __m512i ones = _mm512_set1_epi32(0x3f803f80);  // the bf16 pair (1.0, 1.0)
  for (std::int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+v"(ones));
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)ones, (__m512bh)ones);
  }
  return detail::tally(acc, lanes);
}
}  // namespace detail
#endif

#if defined(LIMOE_AMX_KERNEL)
namespace detail {
// Tiles 0-3 accumulate A x B for two row tiles of A (4, 5) and two column tiles of B (6, 7), 16 x 64 bytes
// each, loaded once from 1.0s: each element of C gains 32 products (16 pairs of a tile row) per instruction.
__attribute__((target("amx-tile,amx-bf16"))) inline double run_amx(std::int64_t iters, float* lanes) {
  alignas(64) static const std::uint32_t ones[256] = {
#define LIMOE_PEAK_ONE16 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, \
                         0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u, \
                         0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u
      LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16,
      LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16,
      LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16, LIMOE_PEAK_ONE16
#undef LIMOE_PEAK_ONE16
  };
  alignas(64) float out[4][256];
  amx::detail::configure(16, 16);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);  // the intrinsics are statements (asm), not expressions
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (std::int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out[0], 64);
  _tile_stored(1, out[1], 64);
  _tile_stored(2, out[2], 64);
  _tile_stored(3, out[3], 64);
  _tile_release();
  return tally(out, lanes);
}
}  // namespace detail
#endif

// The unit measured for a precision on this machine and process: the one limoe's own kernels run on, so LIMOE_AMX=0, LIMOE_DPBF16=0 and
// LIMOE_FMA512=0 (which turn those kernels off) step down to the next unit here too.
inline Kind kind(PrecisionKind prec) {
  if (prec == PrecisionKind::Bf16) {
    if (amx::available()) return Kind::AmxBf16;
    if (dpbf16::available()) return Kind::Avx512Bf16;
    return Kind::None;
  }
  if (fma512::available()) return Kind::Avx512Fma;
#if defined(LIMOE_FMA512_KERNEL)
  if (detail::cpu_has_avx2_fma()) return Kind::Avx2Fma;
#endif
  return Kind::None;
}

// What one run of the loop did: the flops it counts (iters * flops_per_iteration), and the sum of its
// accumulators' elements, each of which counted its terms (so `flop` must be twice `counted`).
struct Run {
  double flop = 0, counted = 0;
};

// The loop on the calling thread for `iters` iterations. lanes[0, 16): the least value of each of 16
// accumulator elements over the accumulators, exactly iters * terms(k) while that is below 2^24 (fp32 counts
// every integer up to there).
inline Run run(Kind k, std::int64_t iters, float* lanes) {
  LIMOE_CHECK(iters >= 0, "peak::run: iterations must be >= 0, got ", iters);
  Run r;
  switch (k) {
#if defined(LIMOE_FMA512_KERNEL)
    case Kind::Avx2Fma: r.counted = detail::run_avx2(iters, lanes); break;
    case Kind::Avx512Fma: r.counted = detail::run_fma512(iters, lanes); break;
    case Kind::Avx512Bf16: r.counted = detail::run_dpbf16(iters, lanes); break;
#endif
#if defined(LIMOE_AMX_KERNEL)
    case Kind::AmxBf16: r.counted = detail::run_amx(iters, lanes); break;
#endif
    default: throw Error(std::string("peak::run: this build or processor has no ") + name(k) + " loop");
  }
  r.flop = static_cast<double>(iters) * flops_per_iteration(k);
  return r;
}

// `threads` threads running the loop at once (each its own thread, released together by a latch once all are
// started; a repeat's time is its slowest thread's), `repeats` times, each thread `iters` iterations, about
// `seconds` of work (calibrated on the calling thread first, which also warms the unit up): the flops of one
// repeat, all threads together (threads * iters * flops_per_iteration), and each repeat's time.
struct Timings {
  int threads = 0;
  std::int64_t iters = 0;
  double flop = 0;
  std::vector<double> seconds;
  double best_gflops() const {
    double best = 0;
    for (double t : seconds) best = std::max(best, t > 0 ? flop / t / 1e9 : 0.0);
    return best;
  }
};
inline Timings measure(Kind k, int threads, int repeats = 3, double seconds = 0.2) {
  LIMOE_CHECK(threads >= 1 && repeats >= 1, "peak::measure: threads and repeats must be >= 1, got ", threads, " and ",
              repeats);
  LIMOE_CHECK(k != Kind::None, "peak::measure: no unit to measure on this processor");
  float lanes[16];
  std::int64_t iters = 1 << 12;
  for (;;) {  // run() here first: a unit it refuses throws on this thread, never inside a worker
    const auto t0 = std::chrono::steady_clock::now();
    run(k, iters, lanes);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt >= seconds / 8 || iters >= (std::int64_t(1) << 40)) {
      iters = std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(iters) * seconds /
                                                                  std::max(dt, 1e-9)));
      break;
    }
    iters *= 4;
  }
  Timings out;
  out.threads = threads, out.iters = iters;
  out.flop = threads * static_cast<double>(iters) * flops_per_iteration(k);
  for (int r = 0; r < repeats; ++r) {
    std::vector<double> took(static_cast<std::size_t>(threads));
    std::latch go(1);
    {
      std::vector<std::jthread> pool;  // joined on leaving the scope, an exception's included
      pool.reserve(static_cast<std::size_t>(threads));
      try {
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            float own[16];
            go.wait();
            const auto t0 = std::chrono::steady_clock::now();
            run(k, iters, own);
            took[static_cast<std::size_t>(t)] =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          });
      } catch (...) {
        go.count_down();  // the threads already started run and are joined; then the error goes on
        throw;
      }
      go.count_down();
    }
    out.seconds.push_back(*std::max_element(took.begin(), took.end()));
  }
  return out;
}

}  // namespace limoe::peak
