// limoe/core/fma512.hpp: small fp32 products on AVX-512 F (FMA over 16-float vectors), for attention's per-head
// work under fp32 on processors with AVX-512 (AMD Zen 4 and Zen 5, Intel Skylake-SP and later); and the 16 x 16
// transpose of 32-bit words it shares with the AVX-512 BF16 kernel (core/dpbf16.hpp).
//
//   fma512::available()                          this process may run AVX-512 F, BW and VL (the processor, the
//                                                OS, LIMOE_FMA512)
//   fma512::transpose(out, B, N, K, ldb)         out [K, round16(N)] = B^T, B [N, K] fp32 (rows of ldb): the
//                                                scores' keys; the columns from N on are zeros
//   fma512::gemm(M, N, K, A, lda, B, ldb, C, ldc)
//                                                C[M, N] = A[M, K] B[K, N], all fp32 and row-major
//
// Why: a head's products are small ([49, 64] x [64, 49] and [49, 49] x [49, 64] in B/32) and there are many of
// them (4,608 of each in a B/32 forward of 32 images); run one at a time through gemm_serial (Eigen's kernel at
// that size) they went at about 36 GFLOP/s on one Zen 4 core, where the large fp32 products run at about 110
// (bench/README.md, 2026-12-07).
//
// The arithmetic: each element of C a sum over k in order, one fused multiply-add per term, from zero. Results
// differ from Eigen's and oneDNN's in the last bits and do not depend on the thread count (nothing here is
// threaded).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define LIMOE_FMA512_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace limoe::fma512 {

namespace detail {
// Whether the processor reports AVX-512 F, BW and VL and the OS saves the 512-bit state (XCR0 bits 1, 2, 5, 6,
// 7); with `bf16`, AVX-512 BF16 too (CPUID leaf 7, sub-leaf 1). The environment variable `env` = 0 turns it off.
inline bool cpu_has_avx512(const char* env, bool bf16) {
#if defined(LIMOE_FMA512_KERNEL)
  if (const char* e = std::getenv(env); e && std::strcmp(e, "0") == 0) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid(1, a, b, c, d);
  if (((c >> 27) & 1u) == 0) return false;  // OSXSAVE
  __cpuid_count(7, 0, a, b, c, d);
  const bool f = (b >> 16) & 1u, bw = (b >> 30) & 1u, vl = (b >> 31) & 1u;
  if (!f || !bw || !vl) return false;
  if (bf16) {
    __cpuid_count(7, 1, a, b, c, d);
    if (((a >> 5) & 1u) == 0) return false;
  }
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6u) == 0xE6u;
#else
  (void)env, (void)bf16;
  return false;
#endif
}
}  // namespace detail

// Whether this process may run the fp32 kernel below. LIMOE_FMA512=0 turns it off (gemm_serial then runs the
// heads, as on a processor without AVX-512). Decided once per process.
inline bool available() {
  static const bool ok = detail::cpu_has_avx512("LIMOE_FMA512", false);
  return ok;
}

#if defined(LIMOE_FMA512_KERNEL)
namespace detail {
// One 16 x 16 block of 32-bit words: row c of the block is the row at B + c * row_bytes (rows from nj on read as
// zero), words 0 .. np; written transposed to rows 0 .. np of w (rows of `cols` words). Four rounds of shuffles
// (words, pairs of words, 128-bit lanes twice), 64 in all; a word at a time, the strided stores cost as much as
// a 64-wide head's product. Loads and stores are unaligned; the words past np and the rows past nj are not read.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void transpose_block(const void* B, index_t row_bytes,
                                                                                  index_t nj, index_t np,
                                                                                  std::uint32_t* w, index_t cols) {
  const auto words = static_cast<__mmask16>(np == 16 ? 0xFFFFu : (1u << np) - 1u);
  const char* rows = static_cast<const char*>(B);
  __m512i r[16], t[16];
  for (int c = 0; c < 16; ++c)
    r[c] = c < nj ? _mm512_maskz_loadu_epi32(words, rows + c * row_bytes) : _mm512_setzero_si512();
  // The masked forms under a full mask: GCC 12's unmasked ones pass an undefined source that -Wuninitialized
  // reports.
  constexpr __mmask16 all16 = 0xFFFF;
  constexpr __mmask8 all8 = 0xFF;
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_mask_unpacklo_epi32(r[2 * i], all16, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_mask_unpackhi_epi32(r[2 * i], all16, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_mask_unpacklo_epi64(t[4 * i], all8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_mask_unpackhi_epi64(t[4 * i], all8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_mask_unpacklo_epi64(t[4 * i + 1], all8, t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_mask_unpackhi_epi64(t[4 * i + 1], all8, t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_mask_shuffle_i32x4(r[8 * i + j], all16, r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_mask_shuffle_i32x4(r[8 * i + j], all16, r[8 * i + j], r[8 * i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[j + 8], 0xDD);
  }
  for (index_t p = 0; p < np; ++p) _mm512_storeu_si512(w + p * cols, r[p]);
}

// W [K, cols] (rows of `cols` 32-bit words, cols a multiple of 16) = the transpose of the n rows at B (each
// row_bytes apart) of K words each: rows from n on, up to cols, as zeros. Every word of W is written.
inline void transpose_words(const void* B, index_t row_bytes, index_t n, index_t K, std::uint32_t* W, index_t cols) {
  const char* rows = static_cast<const char*>(B);
  for (index_t j0 = 0; j0 < cols; j0 += 16) {
    const index_t nj = std::clamp<index_t>(n - j0, 0, 16);
    for (index_t p0 = 0; p0 < K; p0 += 16)
      transpose_block(rows + j0 * row_bytes + p0 * 4, row_bytes, nj, std::min<index_t>(16, K - p0), W + p0 * cols + j0,
                      cols);
  }
}

// The MR x NV accumulators both kernels keep in vector registers (this file's and dpbf16.hpp's): set to zero,
// and stored as rows of C (ldc floats apart), each row's last vector under `last`.
template <int MR, int NV>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void zero_tile(__m512 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
}
template <int MR, int NV>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void store_tile(const __m512 (&acc)[MR][NV],
                                                                                            float* C, index_t ldc,
                                                                                            __mmask16 last) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
    _mm512_mask_storeu_ps(C + r * ldc + 16 * (NV - 1), last, acc[r][NV - 1]);
  }
}

// Rows [0, MR) by NV vectors of 16 columns of C over all of K: MR x NV accumulators (at most 6 x 4 = 24 of the
// 32 vector registers), NV vectors of B's row k loaded (the last under `last`: no column past N is read) and
// A's element broadcast once per row and k. The last vector is stored under `last` too.
template <int MR, int NV>
struct Micro {
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void run(index_t K, const float* A, index_t lda,
                                                                        const float* B, index_t ldb, float* C,
                                                                        index_t ldc, __mmask16 last) {
    __m512 acc[MR][NV];
    zero_tile(acc);
    for (index_t k = 0; k < K; ++k) {
      __m512 b[NV];
      #pragma GCC unroll 4
      for (int v = 0; v < NV - 1; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
      b[NV - 1] = _mm512_maskz_loadu_ps(last, B + k * ldb + 16 * (NV - 1));
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_set1_ps(A[r * lda + k]);
        #pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
      }
    }
    store_tile(acc, C, ldc, last);
  }
};

inline constexpr int kRows = 6, kVectors = 4;  // the largest block: 6 rows by 64 columns

// Kernel<MR, NV>::run for every block shape: table[MR - 1][NV - 1] (this file's kernel and dpbf16.hpp's).
template <template <int, int> class Kernel, int R, class Table, int... V>
constexpr void block_row(Table& table, std::integer_sequence<int, V...>) {
  ((table[R][V] = &Kernel<R + 1, V + 1>::run), ...);
}
template <template <int, int> class Kernel, int... R>
constexpr auto block_rows(std::integer_sequence<int, R...>) {
  std::array<std::array<decltype(&Kernel<1, 1>::run), kVectors>, kRows> table{};
  (block_row<Kernel, R>(table, std::make_integer_sequence<int, kVectors>{}), ...);
  return table;
}
template <template <int, int> class Kernel>
constexpr auto block_table() {
  return block_rows<Kernel>(std::make_integer_sequence<int, kRows>{});
}

// The blocking both kernels share: column panels of 64 (a panel of B stays in L1 for a head up to 80 wide),
// rows in blocks of 6; block(run, m0, n0, last) for each, `run` the table's kernel for the block's shape and
// `last` the mask of its last vector's columns.
template <class Table, class Block>
void for_each_block(index_t M, index_t N, const Table& table, Block&& block) {
  for (index_t n0 = 0; n0 < N; n0 += 16 * kVectors) {
    const index_t width = std::min<index_t>(16 * kVectors, N - n0);
    const int nv = static_cast<int>((width + 15) / 16);
    const auto last = static_cast<__mmask16>(width % 16 == 0 ? 0xFFFFu : (1u << (width % 16)) - 1u);
    for (index_t m0 = 0; m0 < M; m0 += kRows) {
      const int mr = static_cast<int>(std::min<index_t>(kRows, M - m0));
      block(table[static_cast<std::size_t>(mr - 1)][static_cast<std::size_t>(nv - 1)], m0, n0, last);
    }
  }
}
}  // namespace detail
#endif

// out [K, round16(N)] = B^T for B [N, K] (rows of ldb floats); the columns from N on are zeros. Returns the
// row length round16(N). Only where available().
inline index_t transpose(std::vector<float>& out, const float* B, index_t N, index_t K, index_t ldb) {
  LIMOE_CHECK(N > 0 && K > 0 && ldb >= K, "fma512::transpose: a [", N, ", ", K, "] operand in rows of ", ldb);
  LIMOE_CHECK(available(), "fma512::transpose: this processor or process has no AVX-512");
  const index_t cols = (N + 15) / 16 * 16;
  out.resize(static_cast<std::size_t>(K * cols));  // every element written below
#if defined(LIMOE_FMA512_KERNEL)
  detail::transpose_words(B, ldb * static_cast<index_t>(sizeof(float)), N, K,
                          reinterpret_cast<std::uint32_t*>(out.data()), cols);
#endif
  return cols;
}

// C[M, N] = A[M, K] B[K, N]: A's rows of lda floats, B's of ldb, C's of ldc; exactly the columns [0, N) of B
// read and of C written (the last vector of a row under a mask). Only where available().
inline void gemm(index_t M, index_t N, index_t K, const float* A, index_t lda, const float* B, index_t ldb, float* C,
                 index_t ldc) {
  LIMOE_CHECK(M >= 0 && N >= 0 && K >= 0, "fma512::gemm: a negative extent (", M, ", ", N, ", ", K, ")");
  if (M == 0 || N == 0) return;
#if defined(LIMOE_FMA512_KERNEL)
  LIMOE_CHECK(available(), "fma512::gemm: this processor or process has no AVX-512");
  static constexpr auto table = detail::block_table<detail::Micro>();
  detail::for_each_block(M, N, table, [&](auto run, index_t m0, index_t n0, __mmask16 last) {
    run(K, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, last);
  });
#else
  (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
  throw Error("fma512::gemm: built without the AVX-512 kernel");
#endif
}

}  // namespace limoe::fma512
