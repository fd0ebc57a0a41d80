// src/cuda/backend/exec.cuh: how the CUDA backend's host code runs its work: kernel launches, the cuBLAS
// products, and the few copies between host and device (scalars the caller asks for, the dispatch plan's
// per-expert row counts). Everything else in src/cuda/backend/ is written against these functions only.
//
// Two builds of one source:
//   nvcc (src/cuda/backend.cu)      launches are <<<grid, block, 0, stream>>> on the calling thread's stream
//                                   (the default stream), products are cuBLAS calls on a per-thread handle;
//   g++ with LIMOE_CUDA_EMULATION   (tests/support/cuda_emu.hpp included first) launches run on host threads,
//                                   the same cuBLAS calls go to tests/support/cublas_emu.hpp (the library's
//                                   column-major semantics on host memory), memory is host memory.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unordered_map>
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
// cuBLAS's types and calls: tests/support/cublas_emu.hpp (through cuda_emu.hpp).
#else
#include <cublasLt.h>
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
// A cuBLAS call's status: an error names the call; a success is a launch (counted under the emulation).
inline void blas_check(cublasStatus_t s, const char* what) {
  LIMOE_CHECK(s == CUBLAS_STATUS_SUCCESS, "CUDA backend: ", what, " failed: ", cublasGetStatusString(s));
#if defined(LIMOE_CUDA_EMULATION)
  ++Space::launches;
#endif
}
}  // namespace detail

// Row-major products, for i < batch: C_i[M, N] = alpha op(A_i) op(B_i) + beta C_i with A_i = A + i * sa, ...
// (ta / tb: transpose). cuBLAS is column-major: a row-major C is the column-major C^T = op(B)^T op(A)^T, so
// the operands swap and the flags stay.
template <class T>
void gemm_batched(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A,
                  std::int64_t lda, std::int64_t sa, const T* B, std::int64_t ldb, std::int64_t sb, T beta, T* C,
                  std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const auto m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  // At least 1 (cuBLAS refuses 0, which K = 0 with packed operands would give).
  const auto l_b = static_cast<int>(ldb > 1 ? ldb : 1), l_a = static_cast<int>(lda > 1 ? lda : 1),
             l_c = static_cast<int>(ldc);
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
}

template <class T>
void gemm(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A, std::int64_t lda,
          const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
  gemm_batched<T>(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

// The product on operands already rounded to bf16, fp32 accumulation (the Bf16Mixed policy), for i < batch:
// C_i = alpha op(A16_i) op(B16_i) + beta C_i with A16_i = A16 + i * sa, ... (as gemm_batched); A16 and B16 bf16
// with leading dimensions lda and ldb, C fp32. One cuBLAS product with bf16 inputs, fp32 output and fp32 compute
// (tensor cores): cublasGemmEx, or cublasGemmStridedBatchedEx for a batch.
inline void gemm_bf16_rounded_batched(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, float alpha,
                                      const std::uint16_t* A16, std::int64_t lda, std::int64_t sa,
                                      const std::uint16_t* B16, std::int64_t ldb, std::int64_t sb, float beta, float* C,
                                      std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
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
}

inline void gemm_bf16_rounded(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, float alpha,
                              const std::uint16_t* A16, std::int64_t lda, const std::uint16_t* B16, std::int64_t ldb,
                              float beta, float* C, std::int64_t ldc) {
  gemm_bf16_rounded_batched(ta, tb, M, N, K, alpha, A16, lda, 0, B16, ldb, 0, beta, C, ldc, 0, 1);
}

// ---- a product with its bias in the epilogue (cuBLASLt) ---------------------------------------------------------
//
// Row-major C[M, N] = op(A) op(B) + bias (bias [N], added to every row of C), fp32 output, as one cublasLtMatmul
// with CUBLASLT_EPILOGUE_BIAS, where the bias was written into C by a launch and the product accumulated onto it
// (beta 1: a pass over C, and a read of C inside the product). In cuBLAS's column-major terms the product is C^T
// [N, M] = op(B)^T op(A)^T, operands swapped as in gemm_batched, and the bias is per row of C^T, which is where
// the library adds it. A and B both fp32 or both bf16 (type), compute and scale fp32. The descriptors and the
// heuristic's choice are made once per thread and problem (shape, transposes, leading dimensions, type) and kept;
// where the library offers no algorithm for a problem, gemm_bias_lt says so (false, nothing launched) and the
// caller seeds the bias and accumulates instead, as before 2026-12-06.
namespace detail {
inline cublasLtHandle_t lt_handle() {
  struct Handle {
    cublasLtHandle_t h = nullptr;
    Handle() {
      const cublasStatus_t s = cublasLtCreate(&h);
      LIMOE_CHECK(s == CUBLAS_STATUS_SUCCESS, "CUDA backend: cublasLtCreate failed: ", cublasGetStatusString(s));
    }
    ~Handle() {
      if (h) cublasLtDestroy(h);
    }
  };
  thread_local Handle handle;
  return handle.h;
}
// The workspace the heuristic may use (32 MiB: what cuBLAS itself reserves on Hopper).
inline constexpr std::uint64_t kLtWorkspace = std::uint64_t{32} << 20;
// The alignment of an address (its lowest set bit), at most 256: what the heuristic may assume of an operand.
inline std::uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t low = a & (~a + 1);
  return a == 0 || low >= 256 ? 256u : static_cast<std::uint32_t>(low);
}
struct LtKey {
  bool ta, tb;
  std::int64_t M, N, K, lda, ldb, ldc;
  int type;
  std::uint32_t align_a, align_b, align_c, align_bias;  // the row-major operands'
  bool operator==(const LtKey&) const = default;
};
struct LtKeyHash {
  std::size_t operator()(const LtKey& k) const noexcept {
    std::size_t h = static_cast<std::size_t>(k.ta) * 2 + static_cast<std::size_t>(k.tb) + 4 * static_cast<std::size_t>(k.type);
    for (const std::int64_t v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc, std::int64_t{k.align_a}, std::int64_t{k.align_b},
                                 std::int64_t{k.align_c}, std::int64_t{k.align_bias}})
      h = h * 1000003u ^ static_cast<std::size_t>(v);
    return h;
  }
};
// One problem's descriptors and algorithm (ok false: the library offered none).
class LtPlan {
 public:
  explicit LtPlan(const LtKey& k) {
    const cudaDataType t = static_cast<cudaDataType>(k.type);
    lt_check(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    // cuBLAS's A is the row-major B (op flags kept), its B the row-major A.
    const std::int32_t opa = k.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    const std::uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    lt_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa), "TRANSA");
    lt_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb), "TRANSB");
    lt_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue),
             "EPILOGUE");
    // Stored (column-major) shapes: row-major B is (tb ? N x K : K x N), so as stored column-major it is
    // (tb ? K x N : N x K) with leading dimension ldb; likewise A.
    const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
    lt_check(cublasLtMatrixLayoutCreate(&a_, t, k.tb ? u(k.K) : u(k.N), k.tb ? u(k.N) : u(k.K), k.ldb), "layout A");
    lt_check(cublasLtMatrixLayoutCreate(&b_, t, k.ta ? u(k.M) : u(k.K), k.ta ? u(k.K) : u(k.M), k.lda), "layout B");
    lt_check(cublasLtMatrixLayoutCreate(&c_, CUDA_R_32F, u(k.N), u(k.M), k.ldc), "layout C");
    // The heuristic reads the bias pointer's alignment (it does not read the bias): an address with the real
    // bias's alignment stands for it. The operands' alignments go in the preference (the library assumes 256
    // bytes unless told), so the algorithm chosen works for every call with this key.
    alignas(256) static const unsigned char probe[512] = {};
    set_bias(reinterpret_cast<const float*>(probe + (k.align_bias < 256 ? k.align_bias : 256)));
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const std::uint64_t ws = kLtWorkspace;
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
             "MAX_WORKSPACE_BYTES");
    const std::uint32_t al[4] = {k.align_b, k.align_a, k.align_c, k.align_c};  // cuBLAS's A, B, C, D
    const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      lt_check(cublasLtMatmulPreferenceSetAttribute(pref, which[i], &al[i], sizeof al[i]), "MIN_ALIGNMENT");
    cublasLtMatmulHeuristicResult_t r{};
    int n = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(lt_handle(), desc_, a_, b_, c_, c_, pref, 1, &r, &n);
    cublasLtMatmulPreferenceDestroy(pref);
    ok_ = s == CUBLAS_STATUS_SUCCESS && n > 0 && r.state == CUBLAS_STATUS_SUCCESS;
    if (ok_) algo_ = r.algo, workspace_ = r.workspaceSize;
  }
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (c_) cublasLtMatrixLayoutDestroy(c_);
    if (b_) cublasLtMatrixLayoutDestroy(b_);
    if (a_) cublasLtMatrixLayoutDestroy(a_);
    if (desc_) cublasLtMatmulDescDestroy(desc_);
  }
  bool ok() const { return ok_; }
  void run(const void* A, const void* B, const float* bias, float* C) {
    set_bias(bias);
    const float one = 1.0f, zero = 0.0f;
    DTensor<std::uint8_t> ws(Shape{static_cast<std::int64_t>(workspace_)});
    cudaStream_t stream{};  // the cuBLAS handle's: every product of the backend on one stream
    lt_check(cublasGetStream(blas_handle(), &stream), "cublasGetStream");
    blas_check(cublasLtMatmul(lt_handle(), desc_, &one, B, a_, A, b_, &zero, C, c_, C, c_, &algo_,
                              workspace_ ? ws.data() : nullptr, workspace_, stream),
               "cublasLtMatmul (bias epilogue)");
  }

 private:
  static void lt_check(cublasStatus_t s, const char* what) {
    LIMOE_CHECK(s == CUBLAS_STATUS_SUCCESS, "CUDA backend: cuBLASLt ", what, " failed: ", cublasGetStatusString(s));
  }
  void set_bias(const float* bias) {
    const void* p = bias;
    lt_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p, sizeof p), "BIAS_POINTER");
  }
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  std::size_t workspace_ = 0;
  bool ok_ = false;
};
inline LtPlan& lt_plan(const LtKey& k) {
  thread_local std::unordered_map<LtKey, std::unique_ptr<LtPlan>, LtKeyHash> plans;
  if (plans.size() >= 256 && plans.find(k) == plans.end()) plans.clear();  // bounded (a model has a few shapes)
  auto& p = plans[k];
  if (!p) p = std::make_unique<LtPlan>(k);
  return *p;
}
inline std::atomic<bool> bias_epilogue_on{true};
}  // namespace detail

// Whether products with a bias take cuBLASLt's epilogue (the default) or seed the bias (benchmarks compare).
inline void bias_epilogue(bool on) { detail::bias_epilogue_on = on; }
inline bool bias_epilogue() { return detail::bias_epilogue_on; }

// C = op(A) op(B) + bias through the epilogue; false (nothing launched) where the library has no algorithm for it
// or the epilogue is switched off. type: CUDA_R_32F (A, B float) or CUDA_R_16BF (bf16 bits).
inline bool gemm_bias_lt(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, const void* A,
                         std::int64_t lda, const void* B, std::int64_t ldb, cudaDataType type, const float* bias,
                         float* C, std::int64_t ldc) {
  if (!bias_epilogue() || M == 0 || N == 0 || K == 0) return false;
  const detail::LtKey key{ta,  tb, M, N, K, lda, ldb, ldc, static_cast<int>(type),  // M, N, K > 0: every ld >= 1
                          detail::alignment(A), detail::alignment(B), detail::alignment(C), detail::alignment(bias)};
  detail::LtPlan& plan = detail::lt_plan(key);
  if (!plan.ok()) return false;
  plan.run(A, B, bias, C);
  return true;
}

// ---- grouped products ----------------------------------------------------------------------------------------
//
// Products of different sizes in one call (the experts' blocks of a packed dispatch plan, one problem per expert
// with rows): for each problem p, C[p.c ..][p.M, p.N] = alpha op(A[p.a ..]) op(B[p.b ..]) + beta C[p.c ..], row-major
// as gemm_batched, offsets in elements from the call's base pointers; every problem shares the transposes, the
// leading dimensions, alpha and beta. One cuBLAS call (cublas{S,D}gemmGroupedBatched), its problem sizes in host
// arrays (the plan's host copy of its offsets: nothing is read back) and its operand addresses in a device array
// written by one launch (kernels::grouped_pointers: the offsets go over in the launch's arguments, so the host
// does not wait). Where the library refuses the call (CUBLAS_STATUS_NOT_SUPPORTED), and whenever
// grouped_products(false) is set (benchmarks time both), one product per problem instead. bf16 operands have no
// grouped call: cublasGemmGroupedBatchedEx takes bf16 operands only with a bf16 output (its documented types
// under CUBLAS_COMPUTE_32F: 16BF/16BF/16BF, 16F/16F/16F, 32F/32F/32F), and the experts' outputs are fp32.
struct GemmProblem {
  std::int64_t M, N, K;
  std::int64_t a, b, c;  // element offsets of the problem's operands
};

namespace detail {
inline std::atomic<bool> grouped_on{true};
// The device array [3, G] of the problems' operand addresses (A's, B's, C's), written by kernels::grouped_pointers.
template <class TA, class TC>
void grouped_addresses(const TA* A, const TA* B, TC* C, const std::vector<GemmProblem>& ps, DTensor<std::uintptr_t>& out) {
  namespace kn = ::limoe::cuda::kernels;
  const auto G = static_cast<std::int64_t>(ps.size());
  out.resize(Shape{3 * G});
  for (std::int64_t first = 0; first < G; first += kn::kPointerChunk) {
    kn::PointerChunk chunk{};
    chunk.n = static_cast<int>(G - first < kn::kPointerChunk ? G - first : kn::kPointerChunk);
    for (int i = 0; i < chunk.n; ++i) {
      const GemmProblem& p = ps[static_cast<std::size_t>(first + i)];
      chunk.a[i] = p.a * static_cast<std::int64_t>(sizeof(TA));
      chunk.b[i] = p.b * static_cast<std::int64_t>(sizeof(TA));
      chunk.c[i] = p.c * static_cast<std::int64_t>(sizeof(TC));
    }
    launch("grouped_pointers", dim3(1), dim3(kn::kPointerChunk), kn::grouped_pointers, chunk,
           reinterpret_cast<const char*>(A), reinterpret_cast<const char*>(B), reinterpret_cast<char*>(C), G, first,
           out.data());
  }
}
// The host arrays of a grouped call (the row-major problem as cuBLAS's column-major one: operands swapped).
struct GroupedArrays {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  GroupedArrays(bool ta_, bool tb_, std::int64_t lda_, std::int64_t ldb_, std::int64_t ldc_,
                const std::vector<GemmProblem>& ps) {
    const std::size_t G = ps.size();
    ta.assign(G, tb_ ? CUBLAS_OP_T : CUBLAS_OP_N);  // cuBLAS's A is the row-major B
    tb.assign(G, ta_ ? CUBLAS_OP_T : CUBLAS_OP_N);
    lda.assign(G, static_cast<int>(ldb_ > 1 ? ldb_ : 1));
    ldb.assign(G, static_cast<int>(lda_ > 1 ? lda_ : 1));
    ldc.assign(G, static_cast<int>(ldc_));
    size.assign(G, 1);
    for (const GemmProblem& p : ps) {
      m.push_back(static_cast<int>(p.N));
      n.push_back(static_cast<int>(p.M));
      k.push_back(static_cast<int>(p.K));
    }
  }
};
}  // namespace detail

// Whether grouped products run as one call (the default) or one product per problem.
inline void grouped_products(bool on) { detail::grouped_on = on; }
inline bool grouped_products() { return detail::grouped_on; }

template <class T>
void gemm_grouped(bool ta, bool tb, T alpha, const T* A, std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C,
                  std::int64_t ldc, std::vector<GemmProblem> ps) {
  std::erase_if(ps, [](const GemmProblem& p) { return p.M == 0 || p.N == 0; });
  if (ps.empty()) return;
  const auto one_by_one = [&] {
    for (const GemmProblem& p : ps)
      gemm_batched<T>(ta, tb, p.M, p.N, p.K, alpha, A + p.a, lda, 0, B + p.b, ldb, 0, beta, C + p.c, ldc, 0, 1);
  };
  static std::atomic<bool> unsupported{false};
  if (ps.size() == 1 || !grouped_products() || unsupported) return one_by_one();
  DTensor<std::uintptr_t> addr;
  detail::grouped_addresses(A, B, C, ps, addr);
  const auto G = static_cast<std::int64_t>(ps.size());
  const detail::GroupedArrays g(ta, tb, lda, ldb, ldc, ps);
  const std::vector<T> al(ps.size(), alpha), be(ps.size(), beta);
  const auto* pa = reinterpret_cast<const T* const*>(addr.data());
  const auto* pc = reinterpret_cast<T* const*>(addr.data() + 2 * G);
  cublasStatus_t s;
  if constexpr (std::is_same_v<T, float>)
    s = cublasSgemmGroupedBatched(detail::blas_handle(), g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                                  al.data(), pa + G, g.lda.data(), pa, g.ldb.data(), be.data(), pc, g.ldc.data(),
                                  static_cast<int>(G), g.size.data());
  else
    s = cublasDgemmGroupedBatched(detail::blas_handle(), g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                                  al.data(), pa + G, g.lda.data(), pa, g.ldb.data(), be.data(), pc, g.ldc.data(),
                                  static_cast<int>(G), g.size.data());
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) {
    unsupported = true;
    return one_by_one();
  }
  detail::blas_check(s, "cublas{S,D}gemmGroupedBatched");
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

// C[M, N] (leading dimension N) = op(A) op(B) + bias under precision policy Prec: the bias in cuBLASLt's epilogue
// (gemm_bias_lt) for float, else (double, no algorithm, the epilogue switched off) the bias written into C by a
// launch and the product accumulated onto it. Under a mixed policy the operands as gemm_bf16 reads them, rounded
// at most once whichever way the product runs.
template <class Prec, class T>
void gemm_bias_as(const Prec& prec, bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, const T* A,
                  std::int64_t lda, const T* B, std::int64_t ldb, const T* bias, T* C) {
  if (M == 0 || N == 0) return;
  const auto seed = [&] {
    launch("fill_rows", grid_for(M * N), 256, ::limoe::cuda::kernels::fill_rows<T>, bias, M, N, C);
  };
  if constexpr (Prec::mixed) {
    static_assert(std::is_same_v<T, float>, "CUDA backend: the bf16 products take float tensors");
    const Bf16Operand a(prec, A, ta ? K : M, ta ? M : K, lda), b(prec, B, tb ? N : K, tb ? K : N, ldb);
    if (gemm_bias_lt(ta, tb, M, N, K, a.data(), a.ld(), b.data(), b.ld(), CUDA_R_16BF, bias, C, N)) return;
    seed();
    gemm_bf16_rounded(ta, tb, M, N, K, 1.0f, a.data(), a.ld(), b.data(), b.ld(), 1.0f, C, N);
  } else {
    (void)prec;
    if constexpr (std::is_same_v<T, float>)
      if (gemm_bias_lt(ta, tb, M, N, K, A, lda, B, ldb, CUDA_R_32F, bias, C, N)) return;
    seed();
    gemm<T>(ta, tb, M, N, K, T(1), A, lda, B, ldb, T(1), C, N);
  }
}

}  // namespace limoe::cuda::exec
