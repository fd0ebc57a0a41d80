// limoe/core/gemm.hpp: the matrix product every CPU op goes through.
//
// C[M, N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (elements per row).
// Eigen computes each block single-threaded; large products are split over rows of C (or columns when C has
// few rows) on the library's one thread pool. Every split writes disjoint parts of C, so the result does
// not depend on the thread count.
#pragma once

#include <Eigen/Core>

#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe {

enum class Trans : bool { N = false, T = true };

namespace detail {
template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapC = Eigen::Map<const RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using Map = Eigen::Map<RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;


template <class T>
void gemm_block(Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda,
                const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  Map<T> c(C, M, N, Eigen::OuterStride<>(ldc));
  // A is stored [M, K] (N) or [K, M] (T); B is stored [K, N] (N) or [N, K] (T).
  const MapC<T> a(A, ta == Trans::N ? M : K, ta == Trans::N ? K : M, Eigen::OuterStride<>(lda));
  const MapC<T> b(B, tb == Trans::N ? K : N, tb == Trans::N ? N : K, Eigen::OuterStride<>(ldb));
  if (beta == T(0)) {
    if (ta == Trans::N && tb == Trans::N) c.noalias() = alpha * (a * b);
    else if (ta == Trans::N) c.noalias() = alpha * (a * b.transpose());
    else if (tb == Trans::N) c.noalias() = alpha * (a.transpose() * b);
    else c.noalias() = alpha * (a.transpose() * b.transpose());
  } else {
    if (beta != T(1)) c *= beta;
    if (ta == Trans::N && tb == Trans::N) c.noalias() += alpha * (a * b);
    else if (ta == Trans::N) c.noalias() += alpha * (a * b.transpose());
    else if (tb == Trans::N) c.noalias() += alpha * (a.transpose() * b);
    else c.noalias() += alpha * (a.transpose() * b.transpose());
  }
}
}  // namespace detail

// Single-threaded product; use inside parallel regions (per head, per expert).
template <class T>
void gemm_serial(Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda,
                 const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    detail::Map<T> c(C, M, N, Eigen::OuterStride<>(ldc));
    if (beta == T(0)) c.setZero(); else c *= beta;
    return;
  }
  detail::gemm_block(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Product split over the thread pool when it is large enough to pay for it.
template <class T>
void gemm(Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda, const T* B,
          index_t ldb, T beta, T* C, index_t ldc) {
  const int threads = num_threads();
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  if (threads <= 1 || flops < 4e6) {
    gemm_serial(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (M >= 64 || M >= N) {
    // Rows of C: rows of op(A).
    const index_t chunk = std::max<index_t>(16, (M + 4 * threads - 1) / (4 * threads));
    parallel_for(0, M, chunk, [&](index_t r0, index_t r1) {
      const T* a = ta == Trans::N ? A + r0 * lda : A + r0;
      gemm_serial(ta, tb, r1 - r0, N, K, alpha, a, lda, B, ldb, beta, C + r0 * ldc, ldc);
    });
  } else {
    // Columns of C: columns of op(B).
    const index_t chunk = std::max<index_t>(16, (N + 4 * threads - 1) / (4 * threads));
    parallel_for(0, N, chunk, [&](index_t c0, index_t c1) {
      const T* b = tb == Trans::N ? B + c0 : B + c0 * ldb;
      gemm_serial(ta, tb, M, c1 - c0, K, alpha, A, lda, b, ldb, beta, C + c0, ldc);
    });
  }
}

}  // namespace limoe
