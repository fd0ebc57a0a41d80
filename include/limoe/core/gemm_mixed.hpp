// limoe/core/gemm_mixed.hpp: the products of a precision policy (core/precision.hpp).
//
//   gemm_mixed(prec, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)          threaded, like gemm
//   gemm_mixed_serial(...)                                                             one thread, like gemm_serial
//
// With Fp32 they are gemm and gemm_serial. With Bf16Mixed, A and B are read as bf16 (a weight's copy from the
// policy's WeightMirror when it has one, else rounded here into per-thread scratch) and C = alpha op(A) op(B)
// + beta C is accumulated in fp32: oneDNN's bf16 matmul (AVX-512 BF16 or AMX where the processor has them);
// where oneDNN is absent or has only its reference kernel for bf16, the bf16 operands are widened to fp32 and
// multiplied by gemm_serial, which is the same arithmetic (a bf16 x bf16 product is exact in fp32).
// Results do not depend on the thread count (the split is gemm's, detail::split_product).
#pragma once

#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(LIMOE_HAVE_DNNL)
#include <dnnl.hpp>
#endif

#include "limoe/core/gemm.hpp"
#include "limoe/core/precision.hpp"

namespace limoe {
namespace detail {

// Per-thread scratch that a call nested on the same thread (a task stolen while waiting) cannot clobber: each
// live lease holds its own buffer, taken in stack order; buffers are kept, so steady state allocates nothing.
template <class U>
class ScratchLease {
 public:
  explicit ScratchLease(index_t n) {
    Stack& s = stack();
    if (s.bufs.size() <= s.depth) s.bufs.emplace_back();
    auto& b = s.bufs[s.depth++];
    if (b.size() < static_cast<std::size_t>(n)) b.resize(static_cast<std::size_t>(n));
    p_ = b.data();
  }
  ~ScratchLease() { --stack().depth; }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  U* data() const { return p_; }

 private:
  struct Stack {
    std::vector<std::vector<U>> bufs;
    std::size_t depth = 0;
  };
  static Stack& stack() {
    thread_local Stack s;
    return s;
  }
  U* p_ = nullptr;
};

// Elements spanned by a row-major [rows, cols] operand with leading dimension ld.
inline index_t operand_extent(index_t rows, index_t cols, index_t ld) { return rows == 0 ? 0 : (rows - 1) * ld + cols; }

// The bf16 product on one thread, fallback arithmetic: widen to fp32, multiply with gemm_serial.
inline void gemm_bf16_widened(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                              index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc) {
  const index_t na = operand_extent(ta == Trans::N ? M : K, ta == Trans::N ? K : M, lda);
  const index_t nb = operand_extent(tb == Trans::N ? K : N, tb == Trans::N ? N : K, ldb);
  ScratchLease<float> a(na), b(nb);
  for (index_t i = 0; i < na; ++i) a.data()[i] = from_bf16(A[i]);
  for (index_t i = 0; i < nb; ++i) b.data()[i] = from_bf16(B[i]);
  gemm_serial<float>(ta, tb, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta, C, ldc);
}

#if defined(LIMOE_HAVE_DNNL)
struct DnnlContext {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  // Whether oneDNN has a fast bf16 matmul on this processor (its reference kernel is far slower than widening).
  bool fast = false;
  std::string impl;
  DnnlContext() {
    try {
      using dt = dnnl::memory::data_type;
      using tag = dnnl::memory::format_tag;
      const dnnl::memory::desc a({64, 64}, dt::bf16, tag::ab), c({64, 64}, dt::f32, tag::ab);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), engine);
      impl = pd.impl_info_str();
      fast = impl.rfind("ref", 0) != 0;
    } catch (const dnnl::error&) {
      fast = false;
    }
  }
  static DnnlContext& get() {
    static DnnlContext ctx;
    return ctx;
  }
};

// One oneDNN bf16 matmul on the calling thread. Each thread keeps the primitives it made, by shape, strides,
// alpha and beta (a training step uses a few dozen), so a call creates nothing; operands are bound per call.
inline void gemm_bf16_dnnl(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                           index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc) {
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  struct Entry {
    dnnl::matmul prim;
    dnnl::memory a, b, c;
  };
  struct Key {
    index_t v[8];
    float alpha, beta;
    bool operator==(const Key&) const = default;
  };
  struct Hash {
    std::size_t operator()(const Key& k) const {
      std::size_t h = std::hash<float>()(k.alpha) ^ (std::hash<float>()(k.beta) << 1);
      for (index_t x : k.v) h = h * 1000003u ^ std::hash<index_t>()(x);
      return h;
    }
  };
  DnnlContext& ctx = DnnlContext::get();
  thread_local dnnl::stream stream(ctx.engine);
  thread_local std::unordered_map<Key, Entry, Hash> cache;
  dnnl_single_thread();
  const Key key{{static_cast<index_t>(ta), static_cast<index_t>(tb), M, N, K, lda, ldb, ldc}, alpha, beta};
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 512) cache.clear();  // shapes of another model: start again
    const dnnl::memory::desc ad(dims{M, K}, dt::bf16, ta == Trans::N ? dims{lda, 1} : dims{1, lda});
    const dnnl::memory::desc bd(dims{K, N}, dt::bf16, tb == Trans::N ? dims{ldb, 1} : dims{1, ldb});
    const dnnl::memory::desc cd(dims{M, N}, dt::f32, dims{ldc, 1});
    dnnl::primitive_attr attr;
    if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
    if (beta != 0.0f) {
      dnnl::post_ops po;
      po.append_sum(beta);
      attr.set_post_ops(po);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(ad, bd, cd), attr, ctx.engine);
    it = cache.emplace(key, Entry{dnnl::matmul(pd), dnnl::memory(ad, ctx.engine, DNNL_MEMORY_NONE),
                                  dnnl::memory(bd, ctx.engine, DNNL_MEMORY_NONE),
                                  dnnl::memory(cd, ctx.engine, DNNL_MEMORY_NONE)}).first;
  }
  Entry& e = it->second;
  e.a.set_data_handle(const_cast<bf16_bits*>(A));
  e.b.set_data_handle(const_cast<bf16_bits*>(B));
  e.c.set_data_handle(C);
  e.prim.execute(stream, {{DNNL_ARG_SRC, e.a}, {DNNL_ARG_WEIGHTS, e.b}, {DNNL_ARG_DST, e.c}});
  stream.wait();
}
#endif

// Which kernel the bf16 products use here: "onednn:<its implementation>" or "widened".
inline std::string bf16_kernel_name() {
#if defined(LIMOE_HAVE_DNNL)
  if (DnnlContext::get().fast) return "onednn:" + DnnlContext::get().impl;
#endif
  return "widened";
}

// C = alpha op(A) op(B) + beta C on one thread; A, B bf16, C fp32.
inline void gemm_bf16_serial(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                             index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    gemm_serial<float>(ta, tb, M, N, 0, alpha, nullptr, lda, nullptr, ldb, beta, C, ldc);
    return;
  }
#if defined(LIMOE_HAVE_DNNL)
  if (DnnlContext::get().fast &&
      static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >= 4096.0) {
    try {
      gemm_bf16_dnnl(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      return;
    } catch (const dnnl::error&) {
      // A layout this oneDNN does not take (it refuses, it never half-computes): the fallback below.
    }
  }
#endif
  gemm_bf16_widened(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The operand as the policy reads it: the mirror's copy, or rounded into `lease` (rows x cols, ld).
inline const bf16_bits* bf16_operand(const Bf16Mixed& prec, const float* X, index_t rows, index_t cols, index_t ld,
                                     ScratchLease<bf16_bits>& lease, bool threaded) {
  const index_t n = operand_extent(rows, cols, ld);
  if (const bf16_bits* w = prec.find(X, n)) return w;
  if (threaded) to_bf16_parallel(X, n, lease.data());
  else to_bf16(X, n, lease.data());
  return lease.data();
}
}  // namespace detail

// C[M, N] = alpha op(A) op(B) + beta C under precision policy P, on one thread.
template <class T, PrecisionPolicy P>
void gemm_mixed_serial(const P& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A,
                       index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  if constexpr (!P::mixed || !std::is_same_v<T, float>) {
    static_assert(!P::mixed || std::is_same_v<T, float>, "gemm_mixed: the bf16 policy computes in float");
    (void)prec;
    gemm_serial<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    if (M == 0 || N == 0) return;
    const index_t ar = ta == Trans::N ? M : K, ac = ta == Trans::N ? K : M;
    const index_t br = tb == Trans::N ? K : N, bc = tb == Trans::N ? N : K;
    const index_t na = detail::operand_extent(ar, ac, lda), nb = detail::operand_extent(br, bc, ldb);
    detail::ScratchLease<bf16_bits> sa(prec.find(A, na) ? 0 : na), sb(prec.find(B, nb) ? 0 : nb);
    const bf16_bits* a = detail::bf16_operand(prec, A, ar, ac, lda, sa, false);
    const bf16_bits* b = detail::bf16_operand(prec, B, br, bc, ldb, sb, false);
    detail::gemm_bf16_serial(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, C, ldc);
  }
}

// The same split over the thread pool (detail::split_product): operands are rounded once, in parallel, then
// every block multiplies its part.
template <class T, PrecisionPolicy P>
void gemm_mixed(const P& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda,
                const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  if constexpr (!P::mixed || !std::is_same_v<T, float>) {
    static_assert(!P::mixed || std::is_same_v<T, float>, "gemm_mixed: the bf16 policy computes in float");
    (void)prec;
    gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    if (M == 0 || N == 0) return;
    const index_t ar = ta == Trans::N ? M : K, ac = ta == Trans::N ? K : M;
    const index_t br = tb == Trans::N ? K : N, bc = tb == Trans::N ? N : K;
    const index_t na = detail::operand_extent(ar, ac, lda), nb = detail::operand_extent(br, bc, ldb);
    detail::ScratchLease<bf16_bits> sa(prec.find(A, na) ? 0 : na), sb(prec.find(B, nb) ? 0 : nb);
    const bf16_bits* a = detail::bf16_operand(prec, A, ar, ac, lda, sa, true);
    const bf16_bits* b = detail::bf16_operand(prec, B, br, bc, ldb, sb, true);
    detail::split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
      detail::gemm_bf16_serial(ta, tb, m1 - m0, n1 - n0, K, alpha, a + detail::a_offset(ta, m0, lda), lda,
                               b + detail::b_offset(tb, n0, ldb), ldb, beta, C + m0 * ldc + n0, ldc);
    });
  }
}

}  // namespace limoe
