// limoe/core/dpbf16.hpp: small bf16 products on AVX-512 BF16 (VDPBF16PS), for attention's per-head work on
// processors with AVX-512 BF16 and no AMX (AMD Zen 4 and Zen 5, Intel Cooper Lake).
//
//   dpbf16::available()                          this process may run AVX-512 BF16 (the processor, the OS,
//                                                LIMOE_DPBF16)
//   dpbf16::pack_transposed(out, B, N, K, ldb, n_valid)
//                                                B [N, K] (rows of ldb) read as B^T: the scores' keys
//   dpbf16::pack_rows(out, B, K, N, ldb, k_valid)
//                                                B [K, N] as it lies: the contexts' values
//   dpbf16::gemm(M, N, A, lda, b, C, ldc)        C[M, N] = A[M, K] B, A bf16 (K = 2 b.pairs()), C fp32
//
// Why: a head's products are small ([49, 64] x [64, 49] and [49, 49] x [49, 64] in B/32) and there are many
// of them (4,608 of each in a B/32 forward of 32 images). oneDNN 2.6's batched matmul ran them at 66 GFLOP/s
// (the scores, whose keys it reads transposed) and 103 (the contexts) on one Zen 4 core, where its large products
// run at about 210 (bench/README.md, session 33). This kernel reads a head's operands straight from the rows of
// q, k, v with a packing of a few KB per head.
//
// The packed layout: K / 2 rows of Np 32-bit words (Np = N rounded up to 16); word j of row p holds the pair
// (B[2p][j], B[2p + 1][j]), the low half from the even row: VDPBF16PS's pairs along K. For B = W^T (W [N, K]) a
// row of the packing is a column of W's 32-bit words, a transpose of words; for B as it lies, two rows of B
// interleaved. Columns from n_valid on, and rows of B from k_valid on, are zeros: the padding of keys to whole
// vectors and of an odd key count to a whole pair.
//
// The arithmetic is VDPBF16PS's: each pair's two products summed and added to the fp32 accumulator, denormal
// inputs and outputs flushed to zero; the sums run over K in pair order. Results differ from oneDNN's and the
// AMX tile kernel's in the last bits and do not depend on the thread count (nothing here is threaded).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/fma512.hpp"
#include "limoe/core/policies.hpp"
#include "limoe/core/tensor.hpp"

#if defined(LIMOE_FMA512_KERNEL)
#define LIMOE_DPBF16_KERNEL 1
#endif

namespace limoe::dpbf16 {

using ::limoe::bf16_bits;  // core/policies.hpp

// Whether this process may run AVX-512 BF16: CPUID reports AVX-512 F, BW, VL and BF16, and the OS saves the
// 512-bit state (core/fma512.hpp). The environment variable LIMOE_DPBF16=0 turns the kernel off (oneDNN then runs
// the heads, as on a processor without it). Decided once per process.
inline bool available() {
  static const bool ok = fma512::detail::cpu_has_avx512("LIMOE_DPBF16", true);
  return ok;
}

// A packed right operand: pairs() rows of cols() 32-bit words (cols() a multiple of 16: whole vectors, read
// unaligned). Attention keeps one per head and packs it again image after image into the same storage.
class Packed {
 public:
  index_t pairs() const { return pairs_; }
  index_t cols() const { return cols_; }
  const std::uint32_t* data() const { return words_.data(); }

  // Shape for K / 2 = pairs rows of the columns [0, n) rounded up to 16; zeroed when `zero` (else the caller
  // writes every word).
  std::uint32_t* reshape(index_t pairs, index_t n, bool zero) {
    LIMOE_CHECK(pairs > 0 && n > 0, "dpbf16: an empty operand (", pairs, " pairs, ", n, " columns)");
    pairs_ = pairs, cols_ = (n + 15) / 16 * 16;
    if (zero) words_.assign(static_cast<std::size_t>(pairs_ * cols_), 0u);
    else words_.resize(static_cast<std::size_t>(pairs_ * cols_));
    return words_.data();
  }

 private:
  index_t pairs_ = 0, cols_ = 0;
  std::vector<std::uint32_t> words_;
};

// B [N, K] (rows of ldb, K even) read as B^T [K, N]: row p of the packing is word p of each of B's rows
// [0, n_valid); the columns from n_valid to N and up to the next 16 are zeros.
inline void pack_transposed(Packed& out, const bf16_bits* B, index_t N, index_t K, index_t ldb, index_t n_valid) {
  LIMOE_CHECK(K % 2 == 0, "dpbf16::pack_transposed: K = ", K, " must be even (whole pairs)");
  LIMOE_CHECK(n_valid >= 0 && n_valid <= N, "dpbf16::pack_transposed: n_valid = ", n_valid, " outside [0, ", N, "]");
  LIMOE_CHECK(available(), "dpbf16::pack_transposed: this processor or process has no AVX-512 BF16");
  std::uint32_t* w = out.reshape(K / 2, N, false);  // every word written by the transpose
#if defined(LIMOE_DPBF16_KERNEL)
  fma512::detail::transpose_words(B, ldb * static_cast<index_t>(sizeof(bf16_bits)), n_valid, K / 2, w, out.cols());
#else
  (void)B, (void)ldb, (void)w;
#endif
}

// B [K, N] (rows of ldb) as it lies: row p of the packing interleaves B's rows 2p and 2p + 1, the low half from
// the even row; rows of B from k_valid on (the odd row of a last half pair among them) read as zeros.
inline void pack_rows(Packed& out, const bf16_bits* B, index_t K, index_t N, index_t ldb, index_t k_valid) {
  LIMOE_CHECK(k_valid >= 0 && k_valid <= K, "dpbf16::pack_rows: k_valid = ", k_valid, " outside [0, ", K, "]");
  std::uint32_t* w = out.reshape((K + 1) / 2, N, true);
  const index_t cols = out.cols();
  for (index_t p = 0; p < out.pairs(); ++p) {
    const index_t k = 2 * p;
    if (k >= k_valid) break;  // the rest stays zero
    const bf16_bits* even = B + k * ldb;
    std::uint32_t* dst = w + p * cols;
    if (k + 1 < k_valid) {
      const bf16_bits* odd = even + ldb;
      for (index_t j = 0; j < N; ++j)
        dst[j] = static_cast<std::uint32_t>(even[j]) | static_cast<std::uint32_t>(odd[j]) << 16;
    } else {
      for (index_t j = 0; j < N; ++j) dst[j] = static_cast<std::uint32_t>(even[j]);
    }
  }
}

#if defined(LIMOE_DPBF16_KERNEL)
namespace detail {
// Rows [0, MR) by NV vectors of 16 columns of C over all pairs: MR x NV accumulators (at most 6 x 4 = 24 of the
// 32 vector registers), NV vectors of B loaded and A's pair broadcast once per row and pair. The last vector is
// stored under `last` (the columns of a product whose width is not a multiple of 16).
template <int MR, int NV>
struct Micro {
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void run(index_t pairs, const bf16_bits* A,
                                                                                   index_t lda,
                                                                                   const std::uint32_t* B,
                                                                                   index_t ldb, float* C,
                                                                                   index_t ldc, __mmask16 last) {
    __m512 acc[MR][NV];
    fma512::detail::zero_tile(acc);
    for (index_t p = 0; p < pairs; ++p) {
      __m512i b[NV];
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + p * ldb + 16 * v);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        std::uint32_t word;
        std::memcpy(&word, A + r * lda + 2 * p, sizeof word);
        const __m512i a = _mm512_set1_epi32(static_cast<int>(word));
        #pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
      }
    }
    fma512::detail::store_tile(acc, C, ldc, last);
  }
};

}  // namespace detail
#endif

// C[M, N] = A[M, K] B with B packed (K = 2 b.pairs(): A's rows hold whole pairs, a last odd column's partner
// multiplied by the packing's zero row; that partner must be a readable, finite value); N at most b.cols(). A's
// rows of lda bf16, C's of ldc floats: exactly the columns [0, N) written (the last vector under a mask). Only
// where available().
inline void gemm(index_t M, index_t N, const bf16_bits* A, index_t lda, const Packed& b, float* C, index_t ldc) {
  LIMOE_CHECK(N >= 0 && N <= b.cols(), "dpbf16::gemm: N = ", N, " outside the packed operand's ", b.cols(),
              " columns");
  if (M <= 0 || N <= 0) return;
#if defined(LIMOE_DPBF16_KERNEL)
  LIMOE_CHECK(available(), "dpbf16::gemm: this processor or process has no AVX-512 BF16");
  // The blocks of core/fma512.hpp's kernel (a panel of B: pairs x 256 bytes, 8 KB for a 64-wide head, in L1).
  static constexpr auto table = fma512::detail::block_table<detail::Micro>();
  fma512::detail::for_each_block(M, N, table, [&](auto run, index_t m0, index_t n0, __mmask16 last) {
    run(b.pairs(), A + m0 * lda, lda, b.data() + n0, b.cols(), C + m0 * ldc + n0, ldc, last);
  });
#else
  (void)A, (void)lda, (void)C, (void)ldc;
  throw Error("dpbf16::gemm: built without the AVX-512 BF16 kernel");
#endif
}

}  // namespace limoe::dpbf16
