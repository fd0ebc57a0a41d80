// The AMX tile kernel (core/amx.hpp) against a double-precision product of the same bf16 operands, and the
// mixed products that route to it (core/gemm_mixed.hpp) against oneDNN's or the widened kernel. Skipped, with one
// line, on a processor or process without AMX-BF16.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "limoe/core/amx.hpp"
#include "limoe/core/gemm_mixed.hpp"
#include "limoe/core/rng.hpp"
#include "support/bf16_data.hpp"
#include "support/skip.hpp"

namespace {
using limoe::index_t;
using limoe::amx::bf16_bits;
using limoe::testing::random_bf16;


// C = A W^T (+ bias) (+ C0) in double, from the bf16 values; the bound |A| |W|^T (+ |bias|, |C0|) scales the
// tolerance: fp32 accumulation over K terms is within K * 2^-24 of that bound (relative 1e-5 is far above it for
// these K, and far below a wrong element, a missing pair or a misplaced tile, which move results by O(1)).
// rows: the operand is B [K, N] as it lies (pack_rows), else W [N, K] read as W^T (pack).
void check(index_t M, index_t N, index_t K, index_t lda, index_t ldw, index_t ldc, bool bias, bool accumulate,
           bool rows = false) {
  INFO("M ", M, " N ", N, " K ", K, " lda ", lda, " ldw ", ldw, " ldc ", ldc, " bias ", bias, " accumulate ", accumulate);
  const auto A = random_bf16(M * lda, 1 + M), W = random_bf16((rows ? K : N) * ldw, 2 + N);
  std::vector<float> b(static_cast<std::size_t>(N)), C(static_cast<std::size_t>(M * ldc));
  const limoe::Rng rng(3);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(rng.normal(0, i));
  for (std::size_t i = 0; i < C.size(); ++i) C[i] = static_cast<float>(rng.normal(1, i));
  const std::vector<float> C0 = C;
  const auto packed = rows ? limoe::amx::pack_rows(W.data(), K, N, ldw) : limoe::amx::pack(W.data(), N, K, ldw);
  limoe::amx::gemm(M, N, K, A.data(), lda, packed, C.data(), ldc, bias ? b.data() : nullptr, accumulate);
  double worst = 0;
  for (index_t i = 0; i < M; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      const float got = C[static_cast<std::size_t>(i * ldc + j)];
      if (j >= N) {  // past the product's columns: untouched
        REQUIRE(got == C0[static_cast<std::size_t>(i * ldc + j)]);
        continue;
      }
      double s = 0, bound = 0;
      for (index_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(limoe::from_bf16(A[static_cast<std::size_t>(i * lda + k)])) *
                         limoe::from_bf16(W[static_cast<std::size_t>(rows ? k * ldw + j : j * ldw + k)]);
        s += p, bound += std::fabs(p);
      }
      if (bias) s += b[static_cast<std::size_t>(j)], bound += std::fabs(b[static_cast<std::size_t>(j)]);
      if (accumulate) {
        const double c0 = C0[static_cast<std::size_t>(i * ldc + j)];
        s += c0, bound += std::fabs(c0);
      }
      worst = std::max(worst, std::fabs(got - s) / bound);
    }
  }
  CHECK(worst < 1e-5);
}
}  // namespace

TEST_CASE("amx: the tile kernel against a double product, every remainder of rows, bias and accumulation") {
  if (!limoe::amx::available()) LIMOE_SKIP("this processor or process has no AMX-BF16 (or LIMOE_AMX=0)");
  for (index_t M : {1, 5, 15, 16, 17, 31, 32, 33, 47, 48, 64, 100})
    check(M, 64, 96, 96, 96, 64, false, false);
  check(40, 64, 96, 96, 96, 64, true, false);
  check(40, 64, 96, 96, 96, 64, false, true);
  // Wider than one 256-column panel, leading dimensions past the sides (the block of a larger product).
  check(70, 320, 64, 160, 96, 352, true, false);
  check(200, 768, 768, 768, 768, 768, false, false);
}

TEST_CASE("amx: an operand packed as it lies (an input gradient's dy W) against a double product") {
  if (!limoe::amx::available()) LIMOE_SKIP("this processor or process has no AMX-BF16 (or LIMOE_AMX=0)");
  for (index_t M : {3, 32, 45}) check(M, 64, 96, 96, 64, 64, false, false, true);
  check(37, 96, 64, 64, 128, 100, false, true, true);
  check(70, 320, 64, 80, 352, 320, true, false, true);
}

TEST_CASE("amx: eligible shapes and the errors of a wrong call") {
  CHECK(limoe::amx::eligible(32, 32));
  CHECK(limoe::amx::eligible(3072, 768));
  CHECK_FALSE(limoe::amx::eligible(48, 64));
  CHECK_FALSE(limoe::amx::eligible(64, 49));
  CHECK_FALSE(limoe::amx::eligible(0, 32));
  const std::vector<bf16_bits> W(64 * 64);
  CHECK_THROWS_WITH(limoe::amx::pack(W.data(), 48, 64, 64), doctest::Contains("multiples of 32"));
  CHECK_THROWS_WITH(limoe::amx::pack_rows(W.data(), 64, 40, 64), doctest::Contains("multiples of 32"));
  const auto packed = limoe::amx::pack(W.data(), 64, 64, 64);
  std::vector<float> C(64 * 64);
  CHECK_THROWS_WITH(limoe::amx::gemm(4, 32, 64, W.data(), 64, packed, C.data(), 64), doctest::Contains("shape"));
}
