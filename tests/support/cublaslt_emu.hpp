// tests/support/cublaslt_emu.hpp: the part of cuBLASLt's API that the CUDA backend calls (src/cuda/backend/exec.cuh:
// a product with its bias added in the epilogue), on host memory, for the emulated backend (included by
// cublas_emu.hpp, whose types and products it shares). As there, written from the library's documentation, so
// what it checks is limoe's use of the library:
//   - a matmul descriptor (compute type, scale type; attributes TRANSA, TRANSB, EPILOGUE, BIAS_POINTER, each set
//     with the size of its documented type, else CUBLAS_STATUS_INVALID_VALUE);
//   - matrix layouts (type, rows, cols, leading dimension of the stored, column-major matrix; ld >= rows);
//   - D = alpha op(A) op(B) + beta C, op(A) m x k from A's layout (rows x cols as stored, transposed by TRANSA),
//     C and D m x n with the same layout, C may be D; with CUBLASLT_EPILOGUE_BIAS, bias[i] (a packed vector of m
//     values, of D's type) added to row i of D after the scaling;
//   - the heuristic answers one algorithm for the supported combinations (A and B both bf16 or both fp32, C and D
//     fp32, compute and scale fp32; epilogue DEFAULT or BIAS with a bias pointer) and none otherwise.
// The same sums in the same order as cublas_emu.hpp's products, then the bias: a product with its bias added here
// has the bits of the bias seeded into the output and the product accumulated onto it (beta 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

struct cublasLtContext {
  int id = 0;
};
using cublasLtHandle_t = cublasLtContext*;

enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
};
enum cublasLtEpilogue_t { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 };
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

struct EmuLtMatmulDesc {
  cublasComputeType_t compute;
  cudaDataType scale;
  std::int32_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  std::uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};
using cublasLtMatmulDesc_t = EmuLtMatmulDesc*;
struct EmuLtLayout {
  cudaDataType type;
  std::uint64_t rows, cols;
  std::int64_t ld;
};
using cublasLtMatrixLayout_t = EmuLtLayout*;
struct EmuLtPreference {
  std::uint64_t workspace = 0;
  std::uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D: the library's default
};
using cublasLtMatmulPreference_t = EmuLtPreference*;
struct cublasLtMatmulAlgo_t {
  std::uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  std::size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  *h = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType_t scale) {
  *d = new EmuLtMatmulDesc{compute, scale};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, std::size_t size) {
  if (d == nullptr || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  const auto set = [&](auto& field) {
    if (size != sizeof field) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&field, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  };
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return set(d->ta);
    case CUBLASLT_MATMUL_DESC_TRANSB: return set(d->tb);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set(d->epilogue);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set(d->bias);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType type, std::uint64_t rows,
                                                 std::uint64_t cols, std::int64_t ld) {
  *l = new EmuLtLayout{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  *p = new EmuLtPreference;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                           std::size_t size) {
  if (p == nullptr || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  const auto set = [&](auto& field) {
    if (size != sizeof field) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&field, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  };
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set(p->workspace);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return set(p->align[0]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return set(p->align[1]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return set(p->align[2]);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return set(p->align[3]);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

namespace emu::lt {
// The alignment of an address (its lowest set bit), at most 256.
inline std::uint64_t alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  return a == 0 ? 256 : (a & (~a + 1)) < 256 ? (a & (~a + 1)) : 256;
}
// The problem's sizes from the layouts, or false where they disagree (or a leading dimension is too small).
inline bool shape(const EmuLtMatmulDesc& d, const EmuLtLayout& A, const EmuLtLayout& B, const EmuLtLayout& C,
                  const EmuLtLayout& D, std::int64_t& m, std::int64_t& n, std::int64_t& k) {
  const auto ld_ok = [](const EmuLtLayout& l) { return l.ld >= static_cast<std::int64_t>(l.rows > 1 ? l.rows : 1); };
  if (!ld_ok(A) || !ld_ok(B) || !ld_ok(C) || !ld_ok(D)) return false;
  const bool at = d.ta == CUBLAS_OP_T, bt = d.tb == CUBLAS_OP_T;
  m = static_cast<std::int64_t>(at ? A.cols : A.rows);
  k = static_cast<std::int64_t>(at ? A.rows : A.cols);
  const auto kb = static_cast<std::int64_t>(bt ? B.cols : B.rows);
  n = static_cast<std::int64_t>(bt ? B.rows : B.cols);
  return kb == k && static_cast<std::int64_t>(D.rows) == m && static_cast<std::int64_t>(D.cols) == n &&
         C.rows == D.rows && C.cols == D.cols && C.ld == D.ld && C.type == D.type;
}
inline bool supported(const EmuLtMatmulDesc& d, const EmuLtLayout& A, const EmuLtLayout& B, const EmuLtLayout& D) {
  const bool ops = (d.ta == CUBLAS_OP_N || d.ta == CUBLAS_OP_T) && (d.tb == CUBLAS_OP_N || d.tb == CUBLAS_OP_T);
  const bool types = A.type == B.type && (A.type == CUDA_R_16BF || A.type == CUDA_R_32F) && D.type == CUDA_R_32F &&
                     d.compute == CUBLAS_COMPUTE_32F && d.scale == CUDA_R_32F;
  const bool epilogue = d.epilogue == CUBLASLT_EPILOGUE_DEFAULT || (d.epilogue == CUBLASLT_EPILOGUE_BIAS && d.bias != nullptr);
  return ops && types && epilogue;
}
}  // namespace emu::lt

inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A,
                                                     cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C,
                                                     cublasLtMatrixLayout_t D, cublasLtMatmulPreference_t pref,
                                                     int requested, cublasLtMatmulHeuristicResult_t results[],
                                                     int* returned) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (d == nullptr || A == nullptr || B == nullptr || C == nullptr || D == nullptr || pref == nullptr ||
      requested <= 0 || results == nullptr || returned == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  std::int64_t m = 0, n = 0, k = 0;
  if (!emu::lt::shape(*d, *A, *B, *C, *D, m, n, k)) return CUBLAS_STATUS_INVALID_VALUE;
  *returned = 0;
  if (!emu::lt::supported(*d, *A, *B, *D)) return CUBLAS_STATUS_NOT_SUPPORTED;
  // The algorithm assumes the alignments the preference allows (the library's kernels read their operands in
  // wide vectors) and the bias pointer's alignment as the descriptor holds it now: a later call with operands
  // less aligned than that fails (cublasLtMatmul below), as it may on a GPU.
  results[0] = cublasLtMatmulHeuristicResult_t{};
  for (int i = 0; i < 4; ++i) results[0].algo.data[i] = pref->align[i];
  results[0].algo.data[4] = emu::lt::alignment(d->bias) < 16 ? emu::lt::alignment(d->bias) : 16;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.0f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc,
                                     const void* beta, const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                                     cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo, void*, std::size_t,
                                     cudaStream_t) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (d == nullptr || Adesc == nullptr || Bdesc == nullptr || Cdesc == nullptr || Ddesc == nullptr || algo == nullptr ||
      alpha == nullptr || beta == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  std::int64_t m = 0, n = 0, k = 0;
  if (!emu::lt::shape(*d, *Adesc, *Bdesc, *Cdesc, *Ddesc, m, n, k)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!emu::lt::supported(*d, *Adesc, *Bdesc, *Ddesc)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (emu::lt::alignment(A) < algo->data[0] || emu::lt::alignment(B) < algo->data[1] ||
      emu::lt::alignment(C) < algo->data[2] || emu::lt::alignment(D) < algo->data[3] ||
      (d->epilogue == CUBLASLT_EPILOGUE_BIAS && emu::lt::alignment(d->bias) < algo->data[4]))
    return CUBLAS_STATUS_INVALID_VALUE;
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  auto* out = static_cast<float*>(D);
  const auto ld = Ddesc->ld;
  if (C != D && b != 0.0f)  // C read into D first (the product then accumulates onto D with beta)
    for (std::int64_t j = 0; j < n; ++j)
      std::memcpy(out + j * ld, static_cast<const float*>(C) + j * ld, static_cast<std::size_t>(m) * sizeof(float));
  const auto ta = static_cast<cublasOperation_t>(d->ta), tb = static_cast<cublasOperation_t>(d->tb);
  if (Adesc->type == CUDA_R_16BF)
    emu::blas::product<float, std::uint16_t>(ta, tb, m, n, k, a, static_cast<const std::uint16_t*>(A), Adesc->ld,
                                             static_cast<const std::uint16_t*>(B), Bdesc->ld, b, out, ld);
  else
    emu::blas::product<float, float>(ta, tb, m, n, k, a, static_cast<const float*>(A), Adesc->ld,
                                     static_cast<const float*>(B), Bdesc->ld, b, out, ld);
  if (d->epilogue == CUBLASLT_EPILOGUE_BIAS) {
    const auto* bias = static_cast<const float*>(d->bias);
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t i = 0; i < m; ++i) out[i + j * ld] += bias[i];
  }
  return CUBLAS_STATUS_SUCCESS;
}
