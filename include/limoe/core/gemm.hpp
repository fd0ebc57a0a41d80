// limoe/core/gemm.hpp: the matrix product every CPU op goes through.
//
// C[M, N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (elements per row).
// Eigen computes each block single-threaded; large products are split over rows of C (or columns when C has
// few rows) on the library's one thread pool. Every split writes disjoint parts of C, so the result does
// not depend on the thread count.
#pragma once

#include <Eigen/Core>
#include <type_traits>

#if defined(LIMOE_HAVE_DNNL)
#include <dlfcn.h>
#include <dnnl.h>
#endif

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

#if defined(LIMOE_HAVE_DNNL)
namespace detail {
// oneDNN runs its sgemm on OpenMP threads; the library's threads belong to oneTBB, so every call is made
// single-threaded (omp_set_num_threads(1) on the calling thread, looked up at run time: libdnnl brings
// libgomp). Below ~1M multiply-adds Eigen is faster (small attention products: 69 vs 43 GFLOP/s measured).
inline constexpr double kDnnlMinMacs = 1 << 20;
inline void dnnl_single_thread() {
  using SetThreads = void (*)(int);
  static const SetThreads set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set) set(1);
}
inline bool dnnl_gemm(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const float* A, index_t lda,
                      const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  dnnl_single_thread();
  return dnnl_sgemm(ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C,
                    ldc) == dnnl_success;
}
}  // namespace detail
#endif

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
#if defined(LIMOE_HAVE_DNNL)
  if constexpr (std::is_same_v<T, float>) {
    if (static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >= detail::kDnnlMinMacs &&
        detail::dnnl_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
      return;
  }
#endif
  detail::gemm_block(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

namespace detail {
// The split of a product over the thread pool (gemm, gemm_mixed): kernel(m0, m1, n0, n1) computes rows m0..m1
// and columns n0..n1 of C. The split depends on the shape only (blocks of about 256 rows or columns, 1024 when
// B is large), never on the thread count, so every element of C is computed by the same kernel call on 1 or 16
// threads: results are bitwise identical whatever the thread count.
// The height of the row blocks for a product with op(B) of [K, N]: taller when B is large, so that each block
// re-reads (re-packs) B fewer times; shape-only. The MoE experts' tiles use it too (moe/ops.hpp).
inline index_t block_rows(index_t N, index_t K) {
  return static_cast<double>(N) * static_cast<double>(K) > 1e6 ? 1024 : 256;
}
// The height (a multiple of 8) of `blocks` equal blocks covering n rows or columns.
inline index_t block_extent(index_t n, index_t blocks) { return ((n + blocks - 1) / blocks + 7) / 8 * 8; }
// n rows as ceil(n / block) blocks of equal height (a multiple of 8), so that no block is a short remainder.
inline index_t even_block_rows(index_t n, index_t block) {
  const index_t blocks = (n + block - 1) / block;
  return blocks == 0 ? block : block_extent(n, blocks);
}
// How many blocks a product's rows (or columns) are cut into: ceil(n / block), made even when over one, so that
// two threads (or four, from two blocks on) finish together: B/32's projections over 1,568 rows were 7 blocks of
// 224 rows, 4 of them on one thread of two; now 8 of 196 (the fp32 and bf16 B/32 embedding 2-4% faster on 2
// threads, the same on 1; bench/README.md's performance log).
inline index_t split_blocks(index_t n, index_t block) {
  const index_t blocks = (n + block - 1) / block;
  return blocks > 1 && blocks % 2 == 1 ? blocks + 1 : blocks;
}

template <class Kernel>
void split_product(index_t M, index_t N, index_t K, Kernel&& kernel) {
  index_t kBlock = block_rows(N, K);
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  // A C that fits in one of the large blocks (B large: a weight gradient dy^T x, [768, 768] over B/32's 1,568
  // rows, 1.85 GFLOP) but has more than 256 rows is still cut, into row blocks of about 256: on one thread the
  // blocks cost what the whole did (a stand-alone program: 16.6-18.5 ms either way), and on two threads
  // attention's four weight gradients no longer run on one of them (the B/32 fp32 training step +8%;
  // bench/README.md's performance log, 2026-12-07). Rows, not columns: whole rows of C keep oneDNN's brgemm
  // kernel (moe/ops.hpp).
  const bool large_b = M <= kBlock && N <= kBlock && M > 256;
  if (large_b) {
    kBlock = 256;
  } else if (flops < 4e6 || (M <= kBlock && N <= kBlock)) {
    kernel(index_t(0), M, index_t(0), N);
    return;
  }
  if (M >= N || M > kBlock) {  // (large_b: M > 256 = kBlock, so rows)
    // Blocks of rows of C: rows of op(A).
    const index_t blocks = split_blocks(M, kBlock), rows = block_extent(M, blocks);
    parallel_for(0, blocks, 1, [&](index_t b0, index_t b1) {
      for (index_t b = b0; b < b1; ++b) {
        const index_t r0 = std::min(M, b * rows), r1 = std::min(M, r0 + rows);
        if (r0 < r1) kernel(r0, r1, index_t(0), N);
      }
    });
  } else {
    // Blocks of columns of C: columns of op(B).
    const index_t blocks = split_blocks(N, kBlock), cols = block_extent(N, blocks);
    parallel_for(0, blocks, 1, [&](index_t b0, index_t b1) {
      for (index_t b = b0; b < b1; ++b) {
        const index_t c0 = std::min(N, b * cols), c1 = std::min(N, c0 + cols);
        if (c0 < c1) kernel(index_t(0), M, c0, c1);
      }
    });
  }
}

// Where rows m0.. of op(A) and columns n0.. of op(B) start, for row-major storage with leading dimension ld.
inline index_t a_offset(Trans ta, index_t m0, index_t lda) { return ta == Trans::N ? m0 * lda : m0; }
inline index_t b_offset(Trans tb, index_t n0, index_t ldb) { return tb == Trans::N ? n0 : n0 * ldb; }
}  // namespace detail

// Product split over the thread pool when it is large enough to pay for it (detail::split_product).
template <class T>
void gemm(Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda, const T* B,
          index_t ldb, T beta, T* C, index_t ldc) {
  detail::split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_serial(ta, tb, m1 - m0, n1 - n0, K, alpha, A + detail::a_offset(ta, m0, lda), lda,
                B + detail::b_offset(tb, n0, ldb), ldb, beta, C + m0 * ldc + n0, ldc);
  });
}

// C[M, N] = A[M, K] B[N, K]^T (both row-major), for a narrow C (N up to a few dozen: the MoE router's logits,
// N = E experts), on the calling thread. Each element is a dot product in vector-wide partial sums over K
// (Eigen's packet of T: 16 floats with AVX-512, 8 with AVX2), reduced at the end (Eigen's predux), plus the
// K mod width tail: its value depends on K and the build's vector width only, never on how M is split, so a
// caller may cut M across threads in any way and get the same bits. Blocks of 3 rows x 8 columns keep their 24
// partial sums in registers while the 8 rows of B stay in L1. Against gemm_serial on [4096, 384] x [384, 8]
// in 64-row calls (Zen 4, 1 thread): 0.45 against 0.5-0.65 ms with A in cache, 1.07 against 1.3 ms from memory;
// [4096, 768]: 0.88 against 2.0 ms, 1.4 against 2.2.
namespace detail {
// Eigen's predux, except for double with AVX-512, where g++ 12 warns about the _mm256_undefined_pd inside its
// _mm512_extractf64x4_pd (a false -Wuninitialized): the same halving, written with a store.
template <class T, class P>
T packet_sum(const P& p) {
  namespace ei = Eigen::internal;
  if constexpr (std::is_same_v<T, double> && ei::packet_traits<T>::size == 8) {
    alignas(64) double v[8];
    ei::pstore(v, p);
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  } else {
    return ei::predux(p);
  }
}
template <int R, int NB, class T>
void gemm_nt_narrow_block(const T* A, index_t lda, const T* B, index_t ldb, T* C, index_t ldc, index_t K) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr int L = ei::packet_traits<T>::size;
  P acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = ei::pset1<P>(T(0));
  index_t k = 0;
  for (; k + L <= K; k += L) {
    P a[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = ei::ploadu<P>(A + r * lda + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const P b = ei::ploadu<P>(B + j * ldb + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][j] = ei::pmadd(a[r], b, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      T s = detail::packet_sum<T>(acc[r][j]);
      for (index_t kk = k; kk < K; ++kk) s += A[r * lda + kk] * B[j * ldb + kk];
      C[r * ldc + j] = s;
    }
}
template <int R, class T>
void gemm_nt_narrow_rows(index_t N, index_t K, const T* A, index_t lda, const T* B, index_t ldb, T* C, index_t ldc) {
  index_t j = 0;
  for (; j + 8 <= N; j += 8) gemm_nt_narrow_block<R, 8>(A, lda, B + j * ldb, ldb, C + j, ldc, K);
  for (; j < N; ++j) gemm_nt_narrow_block<R, 1>(A, lda, B + j * ldb, ldb, C + j, ldc, K);
}
}  // namespace detail

template <class T>
void gemm_nt_narrow(index_t M, index_t N, index_t K, const T* A, index_t lda, const T* B, index_t ldb, T* C,
                    index_t ldc) {
  index_t i = 0;
  for (; i + 3 <= M; i += 3) detail::gemm_nt_narrow_rows<3>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) detail::gemm_nt_narrow_rows<1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
}

}  // namespace limoe
