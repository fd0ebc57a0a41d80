// limoe/core/amx.hpp: bf16 products on Intel AMX tiles, for the weights of a mirror (core/precision.hpp).
//
//   amx::available()                          this process may run AMX-BF16 (the processor, the OS, LIMOE_AMX)
//   amx::eligible(N, K)                       a weight [N, K] the kernel takes (N and K multiples of 32)
//   amx::PackedB b = amx::pack(W, N, K, ldw)  W [N, K] (rows of ldw) in the tile layout, once per set of weights
//   amx::pack_rows(B, K, N, ldb)              B [K, N] in the same layout (C = A B: an input gradient's dy W)
//   amx::gemm(M, N, K, A, lda, b, C, ldc, bias, accumulate)
//                                             C[M, N] = A[M, K] W^T (+ bias) (+ C), A bf16, C fp32
//
// The forward products of a linear layer and an expert read a weight W [N, K] as B = W^T. Debian's oneDNN 2.6.3
// reaches AMX only through its brgemm matmul, at 0.58 TFLOP/s on one core of the Xeon measured (bench/README.md,
// 2026-12-06), where a 2x2 block of 16 x 16 tiles runs at 2.9 TFLOP/s from L1 and 2.1 from L2 on the same core:
// this kernel keeps four fp32 accumulator tiles (32 rows x 32 columns of C), streams A's rows as they lie and B
// from its packed copy, and reaches 1.1-1.5 TFLOP/s on the model's shapes.
//
// The tile layout of B: for each 16 columns n (a row block of W) and each 32 of K, one 1 KB tile of 16 rows of
// 16 pairs: row r, column c holds W[n0 + c][k0 + 2r] and W[n0 + c][k0 + 2r + 1] (TDPBF16PS's pairs along K).
// The arithmetic is TDPBF16PS's: each pair's products summed in fp32 and added to the accumulator, denormals
// flushed; the sums run in K order in steps of 32, so results differ from oneDNN's in the last bits and do not
// depend on the thread count (a product's blocks are fixed by its shape: core/gemm.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "limoe/core/error.hpp"
#include "limoe/core/policies.hpp"
#include "limoe/core/tensor.hpp"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define LIMOE_AMX_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace limoe::amx {

using ::limoe::bf16_bits;  // core/policies.hpp

// Whether this process may run AMX-BF16 tile instructions: CPUID reports AMX-TILE and AMX-BF16, the OS saves
// tile state (XCR0 bits 17 and 18) and grants this process the tile data (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM). The environment variable LIMOE_AMX=0 turns the kernel off (oneDNN then runs the
// products, as on a processor without AMX). Decided once per process.
inline bool available() {
#if defined(LIMOE_AMX_KERNEL)
  static const bool ok = [] {
    if (const char* e = std::getenv("LIMOE_AMX"); e && std::strcmp(e, "0") == 0) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u, osxsave = [] {
      unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
      __cpuid(1, a1, b1, c1, d1);
      return ((c1 >> 27) & 1u) != 0;
    }();
    if (!tile || !bf16 || !osxsave) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// A weight [N, K] the kernel takes: whole 32 x 32 blocks (every standard LIMoE variant's widths; others go to
// oneDNN).
inline bool eligible(index_t N, index_t K) { return N > 0 && K > 0 && N % 32 == 0 && K % 32 == 0; }

// W [N, K] in the tile layout (64-byte aligned: a tile row is one cache line). reshape() reuses the storage
// when it is large enough (the per-head operands of attention, packed again for every head).
class PackedB {
 public:
  PackedB() = default;
  PackedB(index_t n, index_t k) { reshape(n, k); }
  void reshape(index_t n, index_t k) {
    if (n * k > capacity_) {
      data_.reset(static_cast<bf16_bits*>(
          ::operator new(static_cast<std::size_t>(n * k) * sizeof(bf16_bits), std::align_val_t{64})));
      capacity_ = n * k;
    }
    n_ = n, k_ = k;
  }
  index_t n() const { return n_; }
  index_t k() const { return k_; }
  bf16_bits* data() { return data_.get(); }
  const bf16_bits* data() const { return data_.get(); }
  // The first tile of columns [n0, n0 + 16): K / 32 tiles follow.
  const bf16_bits* column_tiles(index_t n0) const { return data_.get() + n0 * k_; }

 private:
  struct Free {
    void operator()(bf16_bits* p) const noexcept { ::operator delete(p, std::align_val_t{64}); }
  };
  index_t n_ = 0, k_ = 0, capacity_ = 0;
  std::unique_ptr<bf16_bits, Free> data_;
};

namespace detail {
// out reshaped to [N, K] and fill(n0, k0, tile) called for each of its 1 KB tiles (16 columns from n0 by 32 of
// K from k0, as 16 rows of 16 words): the walk both packings share.
template <class Fill>
void fill_tiles(PackedB& out, index_t N, index_t K, const char* what, Fill&& fill) {
  LIMOE_CHECK(eligible(N, K), std::string(what) + ": the operand's sides must be multiples of 32");
  out.reshape(N, K);
  for (index_t nt = 0; nt < N / 16; ++nt)
    for (index_t kb = 0; kb < K / 32; ++kb)
      fill(nt * 16, kb * 32, reinterpret_cast<std::uint32_t*>(out.data() + (nt * (K / 32) + kb) * 512));
}
}  // namespace detail

// W's rows [0, N) of K bf16 (leading dimension ldw) into out, in the tile layout; rows from n_valid on read as
// zeros (W holds only n_valid rows: attention's keys padded to a multiple of 32).
inline void pack_into(PackedB& out, const bf16_bits* W, index_t N, index_t K, index_t ldw, index_t n_valid) {
  detail::fill_tiles(out, N, K, "amx::pack", [&](index_t n0, index_t k0, std::uint32_t* tile) {
    // A 16 x 16 transpose of 32-bit words: W's row n0 + c, words k0/2 .. k0/2 + 15, to the tile's column c,
    // read as 16 rows of 16 words and written transposed (the compiler vectorises the inner loop).
    std::uint32_t block[16][16];
    for (index_t c = 0; c < 16; ++c) {
      if (n0 + c < n_valid) std::memcpy(block[c], W + (n0 + c) * ldw + k0, sizeof block[c]);
      else std::memset(block[c], 0, sizeof block[c]);
    }
    for (index_t r = 0; r < 16; ++r)
      for (index_t c = 0; c < 16; ++c) tile[r * 16 + c] = block[c][r];
  });
}
inline PackedB pack(const bf16_bits* W, index_t N, index_t K, index_t ldw) {
  PackedB out;
  pack_into(out, W, N, K, ldw, N);
  return out;
}

// B [K, N] (rows of ldb) as it lies, for C = A B: the same tile layout (pack(W) is this of B = W^T). Row r,
// column c of a tile interleaves B[k0 + 2r][n0 + c] and B[k0 + 2r + 1][n0 + c]. A linear layer's input
// gradient dx = dy W reads its weight W [out, in] so. Rows from k_valid on read as zeros.
inline void pack_rows_into(PackedB& out, const bf16_bits* B, index_t K, index_t N, index_t ldb, index_t k_valid) {
  detail::fill_tiles(out, N, K, "amx::pack_rows", [&](index_t n0, index_t k0, std::uint32_t* tile) {
    // A tile row is 16 words, each the pair (even row, odd row) of one column: the low half from the even row
    // (the little-endian order TDPBF16PS reads); a vectorised loop of 16-bit loads, widens, shifts.
    static constexpr bf16_bits kZeros[16] = {};
    for (index_t r = 0; r < 16; ++r) {
      const index_t k = k0 + 2 * r;
      const bf16_bits* even = k < k_valid ? B + k * ldb + n0 : kZeros;
      const bf16_bits* odd = k + 1 < k_valid ? B + (k + 1) * ldb + n0 : kZeros;
      for (index_t c = 0; c < 16; ++c)
        tile[r * 16 + c] = static_cast<std::uint32_t>(even[c]) | static_cast<std::uint32_t>(odd[c]) << 16;
    }
  });
}
inline PackedB pack_rows(const bf16_bits* B, index_t K, index_t N, index_t ldb) {
  PackedB out;
  pack_rows_into(out, B, K, N, ldb, K);
  return out;
}

#if defined(LIMOE_AMX_KERNEL)
namespace detail {
struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Tiles 0-3: the accumulators C00 C01 C10 C11; 4, 5: A's two row tiles; 6, 7: B's two column tiles. Rows:
// top for C00, C01 and A's first tile, bottom for C10, C11 and A's second (16 both but in a product's last rows).
__attribute__((target("amx-tile,amx-bf16"))) inline void configure(int top, int bottom) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = static_cast<std::uint8_t>(top);
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = static_cast<std::uint8_t>(bottom);
  // The compiler sees no reader of cfg in the instruction's inline assembly: keep the stores.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Start accumulator tile `t` (rows as configured) for columns n of C: the bias in every row (a tile load of
// stride 0), C's own values (accumulate), or zero.
#define LIMOE_AMX_INIT(t, c, n)                                              \
  do {                                                                       \
    if (bias) _tile_loadd(t, bias + (n), 0);                                 \
    else if (accumulate) _tile_loadd(t, (c), sc);                            \
    else _tile_zero(t);                                                      \
  } while (0)

// Rows [m, m + 32) (or m + 16 when !Two: the second row tile unused) by columns [n, n + 32) of C over all of K.
template <bool Two>
__attribute__((target("amx-tile,amx-bf16"))) inline void block(index_t m, index_t n, index_t kbs, const bf16_bits* A,
                                                                index_t lda, const PackedB& B, float* C, index_t ldc,
                                                                const float* bias, bool accumulate) {
  const long sa = static_cast<long>(lda) * 2, sc = static_cast<long>(ldc) * 4;
  float* c = C + m * ldc + n;
  const bf16_bits* a0 = A + m * lda;
  const bf16_bits* a1 = a0 + 16 * lda;
  const bf16_bits* b0 = B.column_tiles(n);
  const bf16_bits* b1 = B.column_tiles(n + 16);
  LIMOE_AMX_INIT(0, c, n);
  LIMOE_AMX_INIT(1, c + 16, n + 16);
  if constexpr (Two) {
    LIMOE_AMX_INIT(2, c + 16 * ldc, n);
    LIMOE_AMX_INIT(3, c + 16 * ldc + 16, n + 16);
  }
  for (index_t kb = 0; kb < kbs; ++kb) {
    _tile_loadd(4, a0 + kb * 32, sa);
    _tile_loadd(6, b0 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + kb * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (Two) {
      _tile_loadd(5, a1 + kb * 32, sa);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  if constexpr (Two) {
    _tile_stored(2, c + 16 * ldc, sc);
    _tile_stored(3, c + 16 * ldc + 16, sc);
  }
}

__attribute__((target("amx-tile,amx-bf16"))) inline void gemm_tiles(index_t M, index_t N, index_t K,
                                                                     const bf16_bits* A, index_t lda,
                                                                     const PackedB& B, float* C, index_t ldc,
                                                                     const float* bias, bool accumulate) {
  const index_t kbs = K / 32;
  // Columns in panels of 256: the panel's packed B (256 x K bf16, 384 KB at K = 768) stays in L2 while every
  // 32-row block of A passes over it (measured best of 64 / 128 / 256 / 512 / all columns). The last M % 32
  // rows run in each panel with shorter tiles (tile loads read only the rows configured, so nothing past A's
  // or C's last row is touched), while the panel is still in L2: a pass of their own after the panels would
  // stream all of B again for a few rows (18% of a 196-row expert product).
  constexpr index_t kPanel = 256;
  const index_t full = M / 32 * 32, rest = M - full;
  const int top = static_cast<int>(std::min<index_t>(rest, 16)), bottom = static_cast<int>(rest - top);
  bool full_config = false;
  for (index_t n0 = 0; n0 < N; n0 += kPanel) {
    const index_t n1 = std::min(N, n0 + kPanel);
    if (full > 0) {
      if (!full_config) configure(16, 16), full_config = true;
      for (index_t m = 0; m < full; m += 32)
        for (index_t n = n0; n < n1; n += 32) block<true>(m, n, kbs, A, lda, B, C, ldc, bias, accumulate);
    }
    if (rest > 0) {
      configure(top, bottom > 0 ? bottom : 16), full_config = false;
      for (index_t n = n0; n < n1; n += 32) {
        if (bottom > 0) block<true>(full, n, kbs, A, lda, B, C, ldc, bias, accumulate);
        else block<false>(full, n, kbs, A, lda, B, C, ldc, bias, accumulate);
      }
    }
  }
  _tile_release();
}
#undef LIMOE_AMX_INIT
}  // namespace detail
#endif

// C[M, N] = A[M, K] W^T (+ bias, N floats, in every row) (+ C when accumulate), W as packed by pack(); A's rows
// of lda bf16, C's of ldc floats. Only where available() (a processor without AMX never reaches it).
inline void gemm(index_t M, index_t N, index_t K, const bf16_bits* A, index_t lda, const PackedB& B, float* C,
                 index_t ldc, const float* bias = nullptr, bool accumulate = false) {
  LIMOE_CHECK(B.n() == N && B.k() == K, "amx::gemm: the packed weight's shape differs from the product's");
  LIMOE_CHECK(!(bias && accumulate), "amx::gemm: a bias or an accumulation, not both");
  if (M <= 0) return;
#if defined(LIMOE_AMX_KERNEL)
  LIMOE_CHECK(available(), "amx::gemm: this processor or process has no AMX-BF16");
  // The tile instructions are inline assembly that names no memory: the compiler must not move the writes
  // that made A and the bias past them, nor reads of C before them.
  __asm__ volatile("" ::: "memory");
  detail::gemm_tiles(M, N, K, A, lda, B, C, ldc, bias, accumulate);
  __asm__ volatile("" ::: "memory");
#else
  (void)A, (void)lda, (void)C, (void)ldc, (void)bias, (void)accumulate;
  throw Error("amx::gemm: built without the AMX kernel");
#endif
}

}  // namespace limoe::amx
