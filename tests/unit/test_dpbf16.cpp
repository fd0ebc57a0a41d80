// The AVX-512 BF16 kernel (core/dpbf16.hpp) against a double-precision product of the same bf16 operands: every
// remainder of rows (blocks of 6) and of column vectors (panels of 4), both packings, padded keys and an odd key
// count. Skipped, with one line, on a processor or process without AVX-512 BF16. Then the fp32 kernel it shares
// its transpose with (core/fma512.hpp), the same way; skipped without AVX-512.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "limoe/core/dpbf16.hpp"
#include "limoe/core/fma512.hpp"
#include "limoe/core/precision.hpp"
#include "support/bf16_data.hpp"
#include "support/skip.hpp"

namespace {
using limoe::index_t;
using limoe::dpbf16::bf16_bits;
using limoe::testing::random_bf16;


// C = A B in double from the bf16 values, B [K, N] given as W [N, K] (transposed: the scores' keys, pack_transposed)
// or as it lies (the contexts' values, pack_rows), with only its first `valid` keys (columns of C for the first,
// rows of B for the second; the rest must act as zeros). fp32 sums over K terms are within K * 2^-24 of
// sum |a_k b_k| (relative 1e-5 is far above that for these K and far below a wrong pair, a misplaced column or a
// padding read as data, which move results by O(1)). C's columns from N on (past a padded product's last vector,
// up to ldc) must keep their values. `width`: the columns of C the call writes (0: the packed width, whole vectors;
// else exactly that many, the last vector under a mask, as attention's scores are written into rows of Nk).
void check(index_t M, index_t N, index_t K, index_t lda, index_t ldb, index_t valid, bool transposed,
           index_t width = 0) {
  INFO("M ", M, " N ", N, " K ", K, " lda ", lda, " ldb ", ldb, " valid ", valid, " transposed ", transposed,
       " width ", width);
  const index_t Nc = (N + 15) / 16 * 16, ldc = Nc + 16;
  // A's columns from K on (a pair's odd partner when K is odd) hold finite data that the zero row must cancel.
  const auto A = random_bf16(M * lda, 11 + M);
  // B with NaNs past its valid keys: a kernel that read them as data would put NaN in C.
  auto B = random_bf16((transposed ? N : K) * ldb, 12 + N);
  const bf16_bits nan = limoe::to_bf16(std::numeric_limits<float>::quiet_NaN());
  if (transposed)
    for (index_t j = valid; j < N; ++j)
      for (index_t k = 0; k < ldb; ++k) B[static_cast<std::size_t>(j * ldb + k)] = nan;
  else
    for (index_t k = valid; k < K; ++k)
      for (index_t j = 0; j < ldb; ++j) B[static_cast<std::size_t>(k * ldb + j)] = nan;
  limoe::dpbf16::Packed packed;
  if (transposed) limoe::dpbf16::pack_transposed(packed, B.data(), N, K, ldb, valid);
  else limoe::dpbf16::pack_rows(packed, B.data(), K, N, ldb, valid);
  REQUIRE(packed.cols() == Nc);
  REQUIRE(packed.pairs() == (K + 1) / 2);
  std::vector<float> C(static_cast<std::size_t>(M * ldc), -7.0f);
  const index_t Nw = width > 0 ? width : Nc;
  limoe::dpbf16::gemm(M, Nw, A.data(), lda, packed, C.data(), ldc);
  double worst = 0;
  for (index_t i = 0; i < M; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      const float got = C[static_cast<std::size_t>(i * ldc + j)];
      if (j >= Nw) {  // past the columns written: untouched
        REQUIRE(got == -7.0f);
        continue;
      }
      const bool zero_col = transposed && j >= valid;
      double s = 0, bound = 0;
      for (index_t k = 0; k < K && !(j >= N) && !zero_col; ++k) {
        if (!transposed && k >= valid) break;
        const double b = limoe::from_bf16(B[static_cast<std::size_t>(transposed ? j * ldb + k : k * ldb + j)]);
        const double p = static_cast<double>(limoe::from_bf16(A[static_cast<std::size_t>(i * lda + k)])) * b;
        s += p, bound += std::fabs(p);
      }
      if (bound == 0) {  // a padded column: exactly zero
        REQUIRE(got == 0.0f);
        continue;
      }
      REQUIRE(std::isfinite(got));
      worst = std::max(worst, std::fabs(got - s) / bound);
    }
  }
  CHECK(worst < 1e-5);
}
}  // namespace

TEST_CASE("dpbf16: keys packed transposed (attention's scores), every remainder of rows and vectors, padded keys") {
  if (!limoe::dpbf16::available()) LIMOE_SKIP("this processor or process has no AVX-512 BF16 (or LIMOE_DPBF16=0)");
  for (index_t M : {1, 2, 3, 4, 5, 6, 7, 12, 13, 49}) check(M, 64, 64, 64, 64, 64, true);
  for (index_t N : {16, 32, 48, 64, 80, 112, 128}) check(9, N, 32, 40, 48, N, true);
  // B/32's head: 49 queries and keys (padded to 64), head width 64 inside rows of 768; H/14's 257 keys, width 80.
  check(49, 64, 64, 768, 768, 49, true);
  check(50, 272, 80, 1280, 1280, 257, true);
  check(7, 16, 2, 2, 2, 1, true);
  // Written into rows of exactly the keys' width (the last vector masked).
  for (index_t w : {1, 15, 17, 49}) check(13, 64, 64, 64, 64, w, true, w);
  check(8, 272, 80, 80, 80, 257, true, 257);
}

TEST_CASE("dpbf16: values packed as they lie (attention's contexts), odd and padded key counts") {
  if (!limoe::dpbf16::available()) LIMOE_SKIP("this processor or process has no AVX-512 BF16 (or LIMOE_DPBF16=0)");
  for (index_t M : {1, 5, 6, 11, 49}) check(M, 64, 50, 50, 768, 49, false);
  check(17, 80, 258, 258, 1280, 257, false);
  check(6, 32, 64, 64, 32, 64, false);
  check(3, 16, 1, 2, 16, 1, false);
  check(8, 48, 7, 8, 48, 3, false);
}

TEST_CASE("dpbf16: the errors of a wrong call") {
  std::vector<bf16_bits> W(64 * 64);
  limoe::dpbf16::Packed packed;
  CHECK_THROWS_WITH(limoe::dpbf16::pack_transposed(packed, W.data(), 16, 63, 64, 16), doctest::Contains("even"));
  CHECK_THROWS_WITH(limoe::dpbf16::pack_transposed(packed, W.data(), 16, 64, 64, 17), doctest::Contains("n_valid"));
  CHECK_THROWS_WITH(limoe::dpbf16::pack_rows(packed, W.data(), 16, 64, 64, 17), doctest::Contains("k_valid"));
  CHECK_THROWS_WITH(limoe::dpbf16::pack_rows(packed, W.data(), 0, 64, 64, 0), doctest::Contains("empty"));
  limoe::dpbf16::pack_rows(packed, W.data(), 16, 40, 64, 16);
  std::vector<float> C(64 * 64);
  CHECK_THROWS_WITH(limoe::dpbf16::gemm(4, 64, W.data(), 64, packed, C.data(), 64), doctest::Contains("outside"));
  CHECK_THROWS_WITH(limoe::dpbf16::gemm(4, -1, W.data(), 64, packed, C.data(), 64), doctest::Contains("outside"));
}

namespace {
// fma512::gemm against a double product: C[M, N] = A[M, K] B[K, N], B given as it lies (rows of ldb: the contexts'
// values) or as W [N, K] (rows of ldb) transposed by fma512::transpose (the scores' keys). A's columns from K on and
// B's from N on hold NaN (a kernel reading them would carry NaN into C); C's columns from N on must keep their
// values. fp32 sums of K terms are within K * 2^-24 of sum |a_k b_k|: relative 1e-5 is far above that and far
// below a wrong row, column or term.
void check_fp32(index_t M, index_t N, index_t K, index_t lda, index_t ldb, bool transposed) {
  INFO("M ", M, " N ", N, " K ", K, " lda ", lda, " ldb ", ldb, " transposed ", transposed);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto fill = [](std::vector<float>& v, index_t rows, index_t cols, index_t ld, std::uint32_t seed) {
    v.assign(static_cast<std::size_t>(rows * ld), std::numeric_limits<float>::quiet_NaN());
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j)
        v[static_cast<std::size_t>(i * ld + j)] = std::sin(0.37f * static_cast<float>(i * cols + j) + static_cast<float>(seed));
  };
  std::vector<float> A, B, T;
  fill(A, M, K, lda, 1);
  fill(B, transposed ? N : K, transposed ? K : N, ldb, 2);
  const float* b = B.data();
  index_t ldbt = ldb;
  if (transposed) {
    ldbt = limoe::fma512::transpose(T, B.data(), N, K, ldb);
    REQUIRE(ldbt == (N + 15) / 16 * 16);
    for (index_t k = 0; k < K; ++k)
      for (index_t j = N; j < ldbt; ++j) REQUIRE(T[static_cast<std::size_t>(k * ldbt + j)] == 0.0f);
    b = T.data();
  }
  const index_t ldc = N + 19;
  std::vector<float> C(static_cast<std::size_t>(M * ldc), -7.0f);
  limoe::fma512::gemm(M, N, K, A.data(), lda, b, ldbt, C.data(), ldc);
  double worst = 0;
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < ldc; ++j) {
      const float got = C[static_cast<std::size_t>(i * ldc + j)];
      if (j >= N) {
        REQUIRE(got == -7.0f);
        continue;
      }
      double s = 0, bound = 0;
      for (index_t k = 0; k < K; ++k) {
        const double p = double(A[static_cast<std::size_t>(i * lda + k)]) *
                         double(B[static_cast<std::size_t>(transposed ? j * ldb + k : k * ldb + j)]);
        s += p, bound += std::fabs(p);
      }
      REQUIRE(std::isfinite(got));
      worst = std::max(worst, std::fabs(got - s) / std::max(bound, 1e-30));
    }
  CHECK(worst < 1e-5);
  (void)nan;
}
}  // namespace

TEST_CASE("fma512: fp32 products, every remainder of rows and vectors, B as it lies and transposed") {
  if (!limoe::fma512::available()) LIMOE_SKIP("this processor or process has no AVX-512 (or LIMOE_FMA512=0)");
  for (bool transposed : {false, true}) {
    for (index_t M : {1, 2, 3, 4, 5, 6, 7, 12, 13}) check_fp32(M, 64, 64, 64, 64, transposed);
    for (index_t N : {1, 15, 16, 17, 33, 49, 64, 65, 130}) check_fp32(9, N, 24, 24 + 3, (transposed ? 24 : N) + 5, transposed);
    for (index_t K : {1, 7, 80}) check_fp32(8, 50, K, K, 80, transposed);
  }
  // B/32's head: 49 queries and keys, head width 64 inside rows of 768; H/14's 257 keys, width 80.
  check_fp32(49, 49, 64, 768, 768, true);
  check_fp32(49, 64, 49, 49, 768, false);
  check_fp32(50, 257, 80, 1280, 1280, true);
  check_fp32(17, 80, 257, 257, 1280, false);
}

TEST_CASE("fma512: the errors of a wrong call") {
  std::vector<float> W(64 * 64), T, C(64 * 64);
  CHECK_THROWS_WITH(limoe::fma512::transpose(T, W.data(), 0, 64, 64), doctest::Contains("operand"));
  CHECK_THROWS_WITH(limoe::fma512::transpose(T, W.data(), 16, 64, 32), doctest::Contains("rows of 32"));
  CHECK_THROWS_WITH(limoe::fma512::gemm(4, -1, 8, W.data(), 8, W.data(), 8, C.data(), 8), doctest::Contains("negative"));
}
