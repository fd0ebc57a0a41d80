// tests/support/cublas_emu.hpp: the part of cuBLAS's API that the CUDA backend calls (src/cuda/backend/exec.cuh),
// on host memory, for the emulated backend (tests/support/cuda_emu.hpp includes it). The backend's calls are the
// same source on a GPU and here, so what this file checks is limoe's use of the library: the row-major products
// handed over as column-major ones (operands swapped), the leading dimensions, the strides, the data and compute
// types, the pointer arrays of a grouped call.
//
// Written from the library's documentation, not from limoe's code: column-major storage, element (i, j) of a
// matrix with leading dimension ld at i + j ld; for each product C = alpha op(A) op(B) + beta C with op(A) m x k,
// op(B) k x n, C m x n; op = N (as stored) or T (transposed), so A is stored m x k (N) or k x m (T) and its
// leading dimension must be at least its stored row count (likewise B); ldc >= m; every leading dimension >= 1;
// beta = 0 means C is not read. Host pointer mode (alpha and beta in host memory). Status values as the
// library's: CUBLAS_STATUS_INVALID_VALUE for a negative size or a leading dimension too small,
// CUBLAS_STATUS_NOT_SUPPORTED for a type combination outside the ones listed per function below.
//
// Arithmetic: each element a sum over k in ascending order in the output's type (bf16 operands widened exactly),
// then alpha times it, plus beta times the old value unless beta is 0: the same sums, in the same order, as the
// row-major loop the tests used before this header (so a product has the same bits either way).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

using cublasHandle_t = struct EmuCublasContext*;
struct EmuCublasContext {
  int id = 0;
};

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16BF = 14 };
using cudaDataType = cudaDataType_t;
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_64F = 70 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

inline const char* cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}
inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new EmuCublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
// Streams: one, the default (the emulated device runs every launch in order).
using cudaStream_t = struct EmuCudaStream*;
inline cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = nullptr;
  return CUBLAS_STATUS_SUCCESS;
}

namespace emu::blas {
// A bf16 value's float (its bits are the float's top half).
inline float widen(std::uint16_t bits) {
  const std::uint32_t w = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
// Element (i, j) of op(X), X stored column-major with leading dimension ld (t: X is stored transposed).
template <class Acc, class S>
Acc element(const S* p, std::int64_t ld, bool t, std::int64_t i, std::int64_t j) {
  const S v = t ? p[j + i * ld] : p[i + j * ld];
  if constexpr (std::is_same_v<S, std::uint16_t>) return static_cast<Acc>(widen(v));
  else return static_cast<Acc>(v);
}
// The argument checks every product of the API makes (sizes, leading dimensions).
inline bool valid(cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n, std::int64_t k,
                  std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  const auto rows = [](cublasOperation_t op, std::int64_t r, std::int64_t c) { return op == CUBLAS_OP_N ? r : c; };
  const auto ok_op = [](cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; };
  if (!ok_op(ta) || !ok_op(tb) || m < 0 || n < 0 || k < 0) return false;
  const std::int64_t ra = rows(ta, m, k), rb = rows(tb, k, n);
  return lda >= (ra > 1 ? ra : 1) && ldb >= (rb > 1 ? rb : 1) && ldc >= (m > 1 ? m : 1);
}
// One column-major product, C (type Acc) = alpha op(A) op(B) + beta C; A and B of storage type S.
template <class Acc, class S>
void product(cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n, std::int64_t k, Acc alpha,
             const S* A, std::int64_t lda, const S* B, std::int64_t ldb, Acc beta, Acc* C, std::int64_t ldc) {
  const bool at = ta == CUBLAS_OP_T, bt = tb == CUBLAS_OP_T;
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t i = 0; i < m; ++i) {
      Acc acc = 0;
      for (std::int64_t l = 0; l < k; ++l) acc += element<Acc>(A, lda, at, i, l) * element<Acc>(B, ldb, bt, l, j);
      Acc& c = C[i + j * ldc];
      c = beta == Acc(0) ? alpha * acc : alpha * acc + beta * c;
    }
}
template <class Acc, class S>
cublasStatus_t strided(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n,
                       std::int64_t k, const Acc* alpha, const S* A, std::int64_t lda, std::int64_t sa, const S* B,
                       std::int64_t ldb, std::int64_t sb, const Acc* beta, Acc* C, std::int64_t ldc, std::int64_t sc,
                       std::int64_t batch) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!valid(ta, tb, m, n, k, lda, ldb, ldc) || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  for (std::int64_t b = 0; b < batch; ++b)
    product<Acc, S>(ta, tb, m, n, k, *alpha, A + b * sa, lda, B + b * sb, ldb, *beta, C + b * sc, ldc);
  return CUBLAS_STATUS_SUCCESS;
}
// The type combinations the backend's Ex calls may use: bf16 operands with fp32 output and compute, or all
// fp32, or all fp64 (each with its compute type).
inline bool supported(cudaDataType a, cudaDataType b, cudaDataType c, cublasComputeType_t compute) {
  if (a != b) return false;
  if (compute == CUBLAS_COMPUTE_32F) return c == CUDA_R_32F && (a == CUDA_R_16BF || a == CUDA_R_32F);
  if (compute == CUBLAS_COMPUTE_64F) return a == CUDA_R_64F && c == CUDA_R_64F;
  return false;
}
template <class S>
cublasStatus_t strided_ex(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m,
                          std::int64_t n, std::int64_t k, const void* alpha, const void* A, std::int64_t lda,
                          std::int64_t sa, const void* B, std::int64_t ldb, std::int64_t sb, const void* beta, void* C,
                          cudaDataType c_type, std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
  if (c_type == CUDA_R_32F)
    return strided<float, S>(h, ta, tb, m, n, k, static_cast<const float*>(alpha), static_cast<const S*>(A), lda, sa,
                             static_cast<const S*>(B), ldb, sb, static_cast<const float*>(beta), static_cast<float*>(C),
                             ldc, sc, batch);
  return strided<double, S>(h, ta, tb, m, n, k, static_cast<const double*>(alpha), static_cast<const S*>(A), lda, sa,
                            static_cast<const S*>(B), ldb, sb, static_cast<const double*>(beta), static_cast<double*>(C),
                            ldc, sc, batch);
}
inline cublasStatus_t any_ex(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m,
                             std::int64_t n, std::int64_t k, const void* alpha, const void* A, cudaDataType a_type,
                             std::int64_t lda, std::int64_t sa, const void* B, cudaDataType b_type, std::int64_t ldb,
                             std::int64_t sb, const void* beta, void* C, cudaDataType c_type, std::int64_t ldc,
                             std::int64_t sc, std::int64_t batch, cublasComputeType_t compute) {
  if (!supported(a_type, b_type, c_type, compute)) return CUBLAS_STATUS_NOT_SUPPORTED;
  switch (a_type) {
    case CUDA_R_16BF: return strided_ex<std::uint16_t>(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, c_type, ldc, sc, batch);
    case CUDA_R_32F: return strided_ex<float>(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, c_type, ldc, sc, batch);
    default: return strided_ex<double>(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, c_type, ldc, sc, batch);
  }
}
// A grouped call: group g holds group_size[g] problems with its sizes, leading dimensions, alpha and beta; the
// problems' operands are consecutive entries of the pointer arrays (device memory: host memory here).
template <class Acc, class S, class P, class CP>
cublasStatus_t grouped(cublasHandle_t h, const cublasOperation_t* ta, const cublasOperation_t* tb, const int* m,
                       const int* n, const int* k, const Acc* alpha, P Aarray, const int* lda, P Barray, const int* ldb,
                       const Acc* beta, CP Carray, const int* ldc, int group_count, const int* group_size) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  for (int g = 0; g < group_count; ++g)
    if (group_size[g] < 0 || !valid(ta[g], tb[g], m[g], n[g], k[g], lda[g], ldb[g], ldc[g]))
      return CUBLAS_STATUS_INVALID_VALUE;
  std::int64_t i = 0;
  for (int g = 0; g < group_count; ++g)
    for (int j = 0; j < group_size[g]; ++j, ++i)
      product<Acc, S>(ta[g], tb[g], m[g], n[g], k[g], alpha[g], static_cast<const S*>(Aarray[i]), lda[g],
                      static_cast<const S*>(Barray[i]), ldb[g], beta[g], static_cast<Acc*>(Carray[i]), ldc[g]);
  return CUBLAS_STATUS_SUCCESS;
}
}  // namespace emu::blas

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* B, int ldb,
                                  const float* beta, float* C, int ldc) {
  return emu::blas::strided<float, float>(h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}
inline cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const double* alpha, const double* A, int lda, const double* B, int ldb,
                                  const double* beta, double* C, int ldc) {
  return emu::blas::strided<double, double>(h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* A, int lda, long long sa,
                                                const float* B, int ldb, long long sb, const float* beta, float* C,
                                                int ldc, long long sc, int batch) {
  return emu::blas::strided<float, float>(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}
inline cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const double* alpha, const double* A, int lda,
                                                long long sa, const double* B, int ldb, long long sb,
                                                const double* beta, double* C, int ldc, long long sc, int batch) {
  return emu::blas::strided<double, double>(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType a_type, int lda, const void* B,
                                   cudaDataType b_type, int ldb, const void* beta, void* C, cudaDataType c_type, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  return emu::blas::any_ex(h, ta, tb, m, n, k, alpha, A, a_type, lda, 0, B, b_type, ldb, 0, beta, C, c_type, ldc, 0, 1,
                           compute);
}
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* A, cudaDataType a_type,
                                                 int lda, long long sa, const void* B, cudaDataType b_type, int ldb,
                                                 long long sb, const void* beta, void* C, cudaDataType c_type, int ldc,
                                                 long long sc, int batch, cublasComputeType_t compute, cublasGemmAlgo_t) {
  return emu::blas::any_ex(h, ta, tb, m, n, k, alpha, A, a_type, lda, sa, B, b_type, ldb, sb, beta, C, c_type, ldc, sc,
                           batch, compute);
}
inline cublasStatus_t cublasSgemmGroupedBatched(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                                const int m[], const int n[], const int k[], const float alpha[],
                                                const float* const Aarray[], const int lda[], const float* const Barray[],
                                                const int ldb[], const float beta[], float* const Carray[],
                                                const int ldc[], int group_count, const int group_size[]) {
  return emu::blas::grouped<float, float>(h, ta, tb, m, n, k, alpha, Aarray, lda, Barray, ldb, beta, Carray, ldc,
                                          group_count, group_size);
}
inline cublasStatus_t cublasDgemmGroupedBatched(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                                const int m[], const int n[], const int k[], const double alpha[],
                                                const double* const Aarray[], const int lda[],
                                                const double* const Barray[], const int ldb[], const double beta[],
                                                double* const Carray[], const int ldc[], int group_count,
                                                const int group_size[]) {
  return emu::blas::grouped<double, double>(h, ta, tb, m, n, k, alpha, Aarray, lda, Barray, ldb, beta, Carray, ldc,
                                            group_count, group_size);
}
#include "cublaslt_emu.hpp"
