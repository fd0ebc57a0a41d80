// src/cuda/backend/exec.cuh: how the CUDA backend's host code runs its work: kernel launches, the cuBLAS
// products, and the few copies between host and device (scalars the caller asks for, the dispatch plan's
// per-expert row counts). Everything else in src/cuda/backend/ is written against these functions only.
//
// Two builds of one source:
//   nvcc (src/cuda/backend.cu)      launches are <<<grid, block, 0, stream>>> on the calling thread's stream
//                                   (the default stream), products are cuBLAS calls on a per-thread handle;
//   g++ with LIMOE_CUDA_EMULATION   (tests/support/cuda_emu.hpp included first) launches run on host threads,
//                                   products are emu::gemm_batched, memory is host memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "limoe/backend/cuda_ops.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/bf16.hpp"
#include "../kernels/tensor.cuh"

#if defined(LIMOE_CUDA_EMULATION)
#if defined(__CUDACC__)
#error "LIMOE_CUDA_EMULATION is for host compilers"
#endif
#else
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

namespace limoe::cuda::exec {

using Space = ::limoe::CudaBackendSpace;  // device memory (host memory under the emulation)

template <class T>
using DTensor = Tensor<T, Space>;

// Launches kernel<<<grid, block>>>(args...); `what` names it in an error.
template <class Kernel, class... Args>
void launch(const char* what, dim3 grid, dim3 block, Kernel kernel, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
#if defined(LIMOE_CUDA_EMULATION)
  (void)what;
  ++Space::launches;
  emu::launch(grid, block, kernel, args...);
#else
  kernel<<<grid, block>>>(args...);
  const cudaError_t e = cudaGetLastError();
  LIMOE_CHECK(e == cudaSuccess, "CUDA backend: launch of ", what, " failed: ", cudaGetErrorName(e), ": ",
              cudaGetErrorString(e));
#endif
}

// A grid of enough blocks of `threads` for n independent items, capped (the kernels stride over the rest).
inline dim3 grid_for(std::int64_t n, int threads = 256, std::int64_t cap = 65535) {
  std::int64_t b = (n + threads - 1) / threads;
  if (b > cap) b = cap;
  return dim3(static_cast<unsigned>(b < 1 ? 1 : b));
}

// Host <-> device copies of n elements (host memory on the host side).
template <class T>
void to_host(T* dst, const T* src, std::size_t n) {
  if (n) Space::download(dst, src, n * sizeof(T));
}
template <class T>
void to_device(T* dst, const T* src, std::size_t n) {
  if (n) Space::upload(dst, src, n * sizeof(T));
}
inline void copy_device(void* dst, const void* src, std::size_t bytes) { Space::copy(dst, src, bytes); }
inline void zero(void* p, std::size_t bytes) {
  if (bytes) Space::zero(p, bytes);
}

#if !defined(LIMOE_CUDA_EMULATION)
namespace detail {
// The calling thread's cuBLAS handle (created on first use, on the current device's default stream).
inline cublasHandle_t blas_handle() {
  struct Handle {
    cublasHandle_t h = nullptr;
    Handle() {
      const cublasStatus_t s = cublasCreate(&h);
      LIMOE_CHECK(s == CUBLAS_STATUS_SUCCESS, "CUDA backend: cublasCreate failed: ", cublasGetStatusString(s));
    }
    ~Handle() {
      if (h) cublasDestroy(h);
    }
  };
  thread_local Handle handle;
  return handle.h;
}
inline void blas_check(cublasStatus_t s, const char* what) {
  LIMOE_CHECK(s == CUBLAS_STATUS_SUCCESS, "CUDA backend: ", what, " failed: ", cublasGetStatusString(s));
}
}  // namespace detail
#endif

// Row-major products, for i < batch: C_i[M, N] = alpha op(A_i) op(B_i) + beta C_i with A_i = A + i * sa, ...
// (ta / tb: transpose). cuBLAS is column-major: a row-major C is the column-major C^T = op(B)^T op(A)^T, so
// the operands swap and the flags stay.
template <class T>
void gemm_batched(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A,
                  std::int64_t lda, std::int64_t sa, const T* B, std::int64_t ldb, std::int64_t sb, T beta, T* C,
                  std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
#if defined(LIMOE_CUDA_EMULATION)
  ++Space::launches;
  emu::gemm_batched<T>(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
#else
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const auto m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const auto l_b = static_cast<int>(ldb), l_a = static_cast<int>(lda), l_c = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (batch == 1)
      detail::blas_check(cublasSgemm(detail::blas_handle(), opb, opa, m, n, k, &alpha, B, l_b, A, l_a, &beta, C, l_c),
                         "cublasSgemm");
    else
      detail::blas_check(cublasSgemmStridedBatched(detail::blas_handle(), opb, opa, m, n, k, &alpha, B, l_b, sb, A, l_a,
                                                   sa, &beta, C, l_c, sc, static_cast<int>(batch)),
                         "cublasSgemmStridedBatched");
  } else {
    static_assert(std::is_same_v<T, double>, "CUDA backend products: float or double");
    if (batch == 1)
      detail::blas_check(cublasDgemm(detail::blas_handle(), opb, opa, m, n, k, &alpha, B, l_b, A, l_a, &beta, C, l_c),
                         "cublasDgemm");
    else
      detail::blas_check(cublasDgemmStridedBatched(detail::blas_handle(), opb, opa, m, n, k, &alpha, B, l_b, sb, A, l_a,
                                                   sa, &beta, C, l_c, sc, static_cast<int>(batch)),
                         "cublasDgemmStridedBatched");
  }
#endif
}

template <class T>
void gemm(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A, std::int64_t lda,
          const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
  gemm_batched<T>(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

// The product on operands already rounded to bf16, fp32 accumulation (the Bf16Mixed policy), for i < batch:
// C_i = alpha op(A16_i) op(B16_i) + beta C_i with A16_i = A16 + i * sa, ... (as gemm_batched); A16 and B16 bf16
// with leading dimensions lda and ldb, C fp32. One cuBLAS product with bf16 inputs, fp32 output and fp32 compute
// (tensor cores): cublasGemmEx, or cublasGemmStridedBatchedEx for a batch. Under the emulation the operands are
// widened (exactly) and go through the plain loop.
inline void gemm_bf16_rounded_batched(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, float alpha,
                                      const std::uint16_t* A16, std::int64_t lda, std::int64_t sa,
                                      const std::uint16_t* B16, std::int64_t ldb, std::int64_t sb, float beta, float* C,
                                      std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  const std::int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
#if defined(LIMOE_CUDA_EMULATION)
  // The elements spanned by each operand: batch - 1 strides, then rows - 1 full rows and one of the width.
  const std::int64_t na = ar == 0 ? 0 : (batch - 1) * sa + (ar - 1) * lda + ac,
                     nb = br == 0 ? 0 : (batch - 1) * sb + (br - 1) * ldb + bc;
  std::vector<float> af(static_cast<std::size_t>(na)), bf(static_cast<std::size_t>(nb));
  for (std::size_t i = 0; i < af.size(); ++i) af[i] = math::bf16_value(A16[i]);
  for (std::size_t i = 0; i < bf.size(); ++i) bf[i] = math::bf16_value(B16[i]);
  ++Space::launches;
  emu::gemm_batched<float>(ta, tb, M, N, K, alpha, af.data(), lda, sa, bf.data(), ldb, sb, beta, C, ldc, sc, batch);
#else
  (void)ar, (void)ac, (void)br, (void)bc;
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  // At least 1 (cuBLAS refuses 0, which K = 0 with packed operands would give).
  const auto l_a = static_cast<int>(lda > 1 ? lda : 1), l_b = static_cast<int>(ldb > 1 ? ldb : 1);
  const auto m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K), l_c = static_cast<int>(ldc);
  if (batch == 1)
    detail::blas_check(cublasGemmEx(detail::blas_handle(), opb, opa, m, n, k, &alpha, B16, CUDA_R_16BF, l_b, A16,
                                    CUDA_R_16BF, l_a, &beta, C, CUDA_R_32F, l_c, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmEx (bf16)");
  else
    detail::blas_check(cublasGemmStridedBatchedEx(detail::blas_handle(), opb, opa, m, n, k, &alpha, B16, CUDA_R_16BF,
                                                  l_b, sb, A16, CUDA_R_16BF, l_a, sa, &beta, C, CUDA_R_32F, l_c, sc,
                                                  static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmStridedBatchedEx (bf16)");
#endif
}

inline void gemm_bf16_rounded(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, float alpha,
                              const std::uint16_t* A16, std::int64_t lda, const std::uint16_t* B16, std::int64_t ldb,
                              float beta, float* C, std::int64_t ldc) {
  gemm_bf16_rounded_batched(ta, tb, M, N, K, alpha, A16, lda, 0, B16, ldb, 0, beta, C, ldc, 0, 1);
}

// An fp32 [rows, cols] block with leading dimension ld as a bf16 product reads it: the policy's copy when it holds
// one (a weight in the model's mirror, core/precision.hpp), with the block's own leading dimension; else a packed
// copy rounded here on the device (math/bf16.hpp's rounding, kernels::to_bf16_block), leading dimension cols.
// Made once, it serves any number of products (the experts read their blocks of one operand).
class Bf16Operand {
 public:
  Bf16Operand(const Bf16Mixed& prec, const float* src, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    if (rows > 0 && cols > 0) p_ = prec.find(src, (rows - 1) * ld + cols);
    if (p_) {
      ld_ = ld;
      return;
    }
    copy_.resize(Shape{rows, cols});
    if (rows > 0 && cols > 0)
      launch("to_bf16_block", grid_for(rows * cols), 256, ::limoe::cuda::kernels::to_bf16_block<float>, src, rows, cols,
             ld, copy_.data());
    p_ = copy_.data();
    ld_ = cols;
  }
  // A bf16 block made elsewhere (the experts' GELU output, written by the bias + GELU kernel).
  Bf16Operand(const std::uint16_t* p, std::int64_t ld) : p_(p), ld_(ld) {}
  const std::uint16_t* data() const { return p_; }
  std::int64_t ld() const { return ld_; }

 private:
  const std::uint16_t* p_ = nullptr;
  std::int64_t ld_ = 0;
  DTensor<std::uint16_t> copy_;
};

// An fp32 activation that several products of one op read (attention's input for its q, k and v projections and
// their weight gradients, a linear layer's output gradient for its input and weight gradients): under a mixed
// policy rounded once here (one launch), and prec() is the policy that also finds that copy, so Bf16Operand
// takes it instead of rounding it again; under Fp32, for a null x, or when the policy finds x already, nothing.
// The host's counterpart is core/gemm_mixed.hpp's RoundedOnce.
template <class Prec, class T>
class RoundedOnce {
 public:
  RoundedOnce(const Prec& prec, const T* x, std::int64_t n) : prec_(prec) {
    if constexpr (Prec::mixed) {
      static_assert(std::is_same_v<T, float>, "CUDA backend: the bf16 products take float tensors");
      if (x != nullptr && n > 0 && prec.find(x, n) == nullptr) {
        copy_.resize(Shape{n});
        launch("to_bf16_block", grid_for(n), 256, ::limoe::cuda::kernels::to_bf16_block<float>, x, n, std::int64_t(1),
               std::int64_t(1), copy_.data());
        prec_ = prec.with(x, n, copy_.data());
      }
    } else {
      (void)x, (void)n;
    }
  }
  const Prec& prec() const { return prec_; }

 private:
  Prec prec_;
  DTensor<std::uint16_t> copy_;
};

// The same product on fp32 operands under the Bf16Mixed policy `prec` (each operand as Bf16Operand reads it).
inline void gemm_bf16(const Bf16Mixed& prec, bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K,
                      float alpha, const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta,
                      float* C, std::int64_t ldc) {
  if (M == 0 || N == 0) return;
  // op(A) is M x K: A itself is (ta ? K x M : M x K) with leading dimension lda; likewise B.
  const Bf16Operand a(prec, A, ta ? K : M, ta ? M : K, lda), b(prec, B, tb ? N : K, tb ? K : N, ldb);
  gemm_bf16_rounded(ta, tb, M, N, K, alpha, a.data(), a.ld(), b.data(), b.ld(), beta, C, ldc);
}

// A product under precision policy Prec: fp32 (gemm), or bf16 operands for a mixed policy (gemm_bf16).
template <class Prec, class T>
void gemm_as(const Prec& prec, bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A,
             std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
  if constexpr (Prec::mixed) {
    static_assert(std::is_same_v<T, float>, "CUDA backend: the bf16 products take float tensors");
    gemm_bf16(prec, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    (void)prec;
    gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace limoe::cuda::exec
