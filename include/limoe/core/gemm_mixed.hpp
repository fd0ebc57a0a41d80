// limoe/core/gemm_mixed.hpp: the products of a precision policy (core/precision.hpp).
//
//   gemm_mixed(prec, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)          threaded, like gemm
//   gemm_mixed_serial(...)                                                             one thread, like gemm_serial
//   gemm_mixed_bias(prec, ta, tb, M, N, K, A, lda, B, ldb, bias, C, ldc)             C = op(A) op(B) + bias, threaded
//
// With Fp32 they are gemm and gemm_serial. With Bf16Mixed, A and B are read as bf16 (a weight's copy from the
// policy's WeightMirror when it has one, else rounded here into per-thread scratch) and C = alpha op(A) op(B)
// + beta C is accumulated in fp32: oneDNN's bf16 matmul (AVX-512 BF16 or AMX where the processor has them);
// where oneDNN is absent or has only its reference kernel for bf16, the bf16 operands are widened to fp32 and
// multiplied by gemm_serial, which is the same arithmetic (a bf16 x bf16 product is exact in fp32).
// Results do not depend on the thread count (the split is gemm's, detail::split_product).
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(LIMOE_HAVE_DNNL)
#include <dnnl.hpp>
#endif

#include "limoe/core/amx.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/precision.hpp"

namespace limoe {
namespace detail {

// The functions below that are not otherwise templates are `template <class = void>`: called as before, but
// their bodies (oneDNN's and Eigen's templates) are compiled only in the translation units that call them, not
// in every one that includes this header (docs/testing.md, "Build time").

// Elements spanned by a row-major [rows, cols] operand with leading dimension ld.
inline index_t operand_extent(index_t rows, index_t cols, index_t ld) { return rows == 0 ? 0 : (rows - 1) * ld + cols; }

// The bf16 product on one thread, fallback arithmetic: widen to fp32, multiply with gemm_serial.
template <class = void>
void gemm_bf16_widened(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                              index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc) {
  const index_t na = operand_extent(ta == Trans::N ? M : K, ta == Trans::N ? K : M, lda);
  const index_t nb = operand_extent(tb == Trans::N ? K : N, tb == Trans::N ? N : K, ldb);
  ScratchLease<float> a(na), b(nb);
  for (index_t i = 0; i < na; ++i) a.data()[i] = from_bf16(A[i]);
  for (index_t i = 0; i < nb; ++i) b.data()[i] = from_bf16(B[i]);
  gemm_serial<float>(ta, tb, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta, C, ldc);
}

#if defined(LIMOE_HAVE_DNNL)
template <class = void>
struct DnnlContextT {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  // Whether oneDNN has a fast bf16 matmul on this processor (its reference kernel is far slower than widening).
  bool fast = false;
  // Whether that kernel is brgemm (AVX-512 BF16, AMX): the one that reads weights packed once
  // (gemm_dnnl_packed); elsewhere (AVX-512 without BF16: gemm:jit) the store is not used.
  bool brgemm = false;
  std::string impl;
  DnnlContextT() {
    try {
      using dt = dnnl::memory::data_type;
      using tag = dnnl::memory::format_tag;
      const dnnl::memory::desc a({64, 64}, dt::bf16, tag::ab), c({64, 64}, dt::f32, tag::ab);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), engine);
      impl = pd.impl_info_str();
      fast = impl.rfind("ref", 0) != 0;
      brgemm = impl.rfind("brg", 0) == 0;
    } catch (const dnnl::error&) {
      fast = false;
    }
  }
  static DnnlContextT& get() {
    static DnnlContextT ctx;
    return ctx;
  }
};
using DnnlContext = DnnlContextT<>;

// The key of a primitive kept per thread: its shape and layout numbers, alpha and beta.
template <int Dims>
struct DnnlKey {
  index_t v[Dims];
  float alpha, beta;
  bool operator==(const DnnlKey&) const = default;
};
template <int Dims>
struct DnnlKeyHash {
  std::size_t operator()(const DnnlKey<Dims>& k) const {
    std::size_t h = std::hash<float>()(k.alpha) ^ (std::hash<float>()(k.beta) << 1);
    for (index_t x : k.v) h = h * 1000003u ^ std::hash<index_t>()(x);
    return h;
  }
};
// C = alpha op(A) op(B) + beta C as oneDNN attributes: alpha an output scale, beta a sum post-op.
template <class = void>
dnnl::primitive_attr dnnl_scale_attr(float alpha, float beta) {
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  if (beta != 0.0f) {
    dnnl::post_ops po;
    po.append_sum(beta);
    attr.set_post_ops(po);
  }
  return attr;
}

// One oneDNN bf16 matmul on the calling thread. Each thread keeps the primitives it made, so a call creates
// nothing and binds its operands. A new shape would cost oneDNN a JIT compilation (130-260 us measured), and the
// MoE layer's expert tiles and weight-gradient jobs change their row counts every call, so M and K are left to
// run time (DNNL_RUNTIME_DIM_VAL: one primitive per transposes, N, leading dimensions, alpha and beta; oneDNN's
// gemm:jit bf16 kernel then, measured at the rate of the fixed-shape kernels: 205-207 vs 203-207 GFLOP/s), unless
// oneDNN offers only its reference kernel for that, in which case the exact shape is used.
//
// With a bias (a row of N floats, alpha 1, beta 0), oneDNN adds it to the accumulator in the kernel's epilogue:
// C = op(A) op(B) + bias written once, where seeding C with the bias and accumulating into it (beta 1) costs a
// pass over C and a read of it inside the product.
//
// With C16 (then beta must be 0), the result is written as bf16 into C16 (leading dimension ldc) and C is not
// used: oneDNN rounds in its epilogue (to nearest even, as to_bf16 does; its instruction reads a denormal
// result as zero, the one place where the bits can differ from to_bf16's).
template <class = void>
void gemm_bf16_dnnl(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                           index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc,
                           const float* bias = nullptr, bf16_bits* C16 = nullptr) {
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  using Key = DnnlKey<10>;
  using Hash = DnnlKeyHash<10>;
  DnnlContext& ctx = DnnlContext::get();
  thread_local dnnl::stream stream(ctx.engine);
  // An empty entry under the run-time key: oneDNN has only its reference kernel for that, use exact shapes.
  thread_local std::unordered_map<Key, std::optional<dnnl::matmul>, Hash> cache;
  dnnl_single_thread();
  auto a_desc = [&](index_t m, index_t k) {
    return dnnl::memory::desc(dims{m, k}, dt::bf16, ta == Trans::N ? dims{lda, 1} : dims{1, lda});
  };
  auto b_desc = [&](index_t k) { return dnnl::memory::desc(dims{k, N}, dt::bf16, tb == Trans::N ? dims{ldb, 1} : dims{1, ldb}); };
  auto c_desc = [&](index_t m) { return dnnl::memory::desc(dims{m, N}, C16 ? dt::bf16 : dt::f32, dims{ldc, 1}); };
  const dnnl::memory::desc bias_desc(dims{1, N}, dt::f32, dims{N, 1});
  auto make = [&](index_t m, index_t k) {
    return dnnl::matmul::primitive_desc(bias ? dnnl::matmul::desc(a_desc(m, k), b_desc(k), bias_desc, c_desc(m))
                                             : dnnl::matmul::desc(a_desc(m, k), b_desc(k), c_desc(m)),
                                        dnnl_scale_attr(alpha, beta), ctx.engine);
  };
  // Runtime M and K (key -1, -1) where that has a real kernel; else the exact shape.
  Key key{{static_cast<index_t>(ta), static_cast<index_t>(tb), -1, N, -1, lda, ldb, ldc, bias != nullptr, C16 != nullptr},
          alpha, beta};
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 512) cache.clear();  // shapes of another model: start again
    const auto pd = make(DNNL_RUNTIME_DIM_VAL, DNNL_RUNTIME_DIM_VAL);
    const bool ref = std::string(pd.impl_info_str()).rfind("ref", 0) == 0;
    it = cache.emplace(key, ref ? std::nullopt : std::optional<dnnl::matmul>(dnnl::matmul(pd))).first;
  }
  if (!it->second) {  // exact shapes
    key.v[2] = M, key.v[4] = K;
    it = cache.find(key);
    if (it == cache.end()) it = cache.emplace(key, dnnl::matmul(make(M, K))).first;
  }
  const dnnl::memory a(a_desc(M, K), ctx.engine, const_cast<bf16_bits*>(A)),
      b(b_desc(K), ctx.engine, const_cast<bf16_bits*>(B)), c(c_desc(M), ctx.engine, C16 ? static_cast<void*>(C16) : C);
  if (bias) {
    const dnnl::memory bm(bias_desc, ctx.engine, const_cast<float*>(bias));
    it->second->execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, c}});
  } else {
    it->second->execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
  }
  stream.wait();
}

// C = alpha A W^T + beta C (+ bias) with A and W of element type E (bf16_bits: the product of gemm_bf16_dnnl;
// float: an fp32 product, gemm_f32_packed), W a model's weight ([N, K] rows, leading dimension ldb), read from
// its packed copy in `store` (made on first use: one reorder into oneDNN's blocked layout) by a primitive of
// the exact shape, weights in the layout oneDNN chooses (`format_tag::any`: its brgemm kernel). Only where the
// policy carries a store (an evaluation forward: PackedWeights says why).
// Measured on one Zen 4 core with the weights cycling through memory (bench/README.md): 196-row expert tiles
// of B/32 197 -> 212 and 203 -> 217 GFLOP/s, its 196-row q/k/v/o blocks 204 -> 217, against the run-time shape
// kernel that packs B inside every call. A shape is compiled on its first call on a thread (0.27 ms measured
// for a [M, 768] x [768, 3072] product, against 4.6 ms for that product at M = 196), and kept. Returns false,
// computing nothing, where oneDNN offers no brgemm kernel for it or chooses another layout than the copy's.
// With C16 (bf16 operands, beta 0), the result is written as bf16 there instead of C (gemm_bf16_dnnl's C16).
template <class E>
bool gemm_dnnl_packed(Trans ta, index_t M, index_t N, index_t K, float alpha, const E* A, index_t lda, const E* W,
                      index_t ldb, float beta, float* C, index_t ldc, const float* bias, PackedWeights& store,
                      bf16_bits* C16 = nullptr) {
  static_assert(std::is_same_v<E, bf16_bits> || std::is_same_v<E, float>);
  using dt = dnnl::memory::data_type;
  constexpr dt kIn = std::is_same_v<E, float> ? dt::f32 : dt::bf16;
  using dims = dnnl::memory::dims;
  using Key = DnnlKey<8>;
  struct Prim {
    dnnl::matmul matmul;
    dnnl::memory::desc weights;
  };
  DnnlContext& ctx = DnnlContext::get();
  thread_local dnnl::stream stream(ctx.engine);
  // An empty entry: no brgemm kernel for that shape (then the run-time shape kernel runs it). Each kept
  // primitive holds about 100 KB of compiled code: at most 256 a thread, the least recently used half
  // dropped when full (an evaluation without a capacity gives its expert tiles new heights every batch,
  // clustered around the mean tile).
  struct Entry {
    std::optional<Prim> prim;
    std::uint64_t used = 0;
  };
  thread_local std::unordered_map<Key, Entry, DnnlKeyHash<8>> cache;
  thread_local std::uint64_t clock = 0;
  dnnl_single_thread();
  const dnnl::memory::desc a_desc(dims{M, K}, kIn, ta == Trans::N ? dims{lda, 1} : dims{1, lda}),
      c_desc(dims{M, N}, C16 ? dt::bf16 : dt::f32, dims{ldc, 1}), bias_desc(dims{1, N}, dt::f32, dims{N, 1}),
      any_desc(dims{K, N}, kIn, dnnl::memory::format_tag::any);
  auto make_pd = [&] {
    return dnnl::matmul::primitive_desc(bias ? dnnl::matmul::desc(a_desc, any_desc, bias_desc, c_desc)
                                             : dnnl::matmul::desc(a_desc, any_desc, c_desc),
                                        dnnl_scale_attr(alpha, beta), ctx.engine);
  };
  auto brgemm = [](const dnnl::matmul::primitive_desc& pd) {
    return std::string(pd.impl_info_str()).rfind("brg", 0) == 0;
  };
  // The packed copy, or a mark that oneDNN has no brgemm kernel for it. Its layout is the one oneDNN picks for a
  // canonical product with this weight (256 rows, A dense and not transposed, no bias, alpha 1, beta 0), so an
  // entry depends on its key only, not on which call made it. oneDNN's layout for [K, N] depends on K, N and the
  // data types, not on M, the transposes or the attributes (checked for M = 1 to 3,000 and 8 weight shapes);
  // a primitive wanting another layout falls back (a function of its shape alone) rather than repacks.
  struct Packed {
    bool ok = false;
    dnnl::memory::desc desc;
    dnnl::memory mem;
  };
  const auto entry = store.get(PackedWeights::Key{W, N, K, ldb}, [&]() -> std::shared_ptr<const void> {
    auto packed = std::make_shared<Packed>();
    const dnnl::matmul::primitive_desc pd(
        dnnl::matmul::desc(dnnl::memory::desc(dims{256, K}, kIn, dims{K, 1}), any_desc,
                           dnnl::memory::desc(dims{256, N}, dt::f32, dims{N, 1})),
        ctx.engine);
    if (!brgemm(pd)) return packed;
    packed->desc = pd.weights_desc();
    packed->mem = dnnl::memory(packed->desc, ctx.engine);
    dnnl::memory plain(dnnl::memory::desc(dims{K, N}, kIn, dims{1, ldb}), ctx.engine, const_cast<E*>(W));
    dnnl::reorder(plain, packed->mem).execute(stream, plain, packed->mem);
    stream.wait();
    packed->ok = true;
    return packed;
  });
  const auto& packed = *static_cast<const Packed*>(entry.get());
  if (!packed.ok) return false;
  const Key key{{static_cast<index_t>(ta), M, N, K, lda, ldc, bias != nullptr, C16 != nullptr}, alpha, beta};
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 256) {
      std::vector<std::uint64_t> used;
      for (const auto& [k, e] : cache) used.push_back(e.used);
      std::nth_element(used.begin(), used.begin() + used.size() / 2, used.end());
      const std::uint64_t median = used[used.size() / 2];
      std::erase_if(cache, [&](const auto& kv) { return kv.second.used < median; });
    }
    Entry fresh;
    const auto pd = make_pd();
    if (brgemm(pd)) fresh.prim.emplace(Prim{dnnl::matmul(pd), pd.weights_desc()});
    it = cache.emplace(key, std::move(fresh)).first;
  }
  it->second.used = ++clock;
  if (!it->second.prim || !(packed.desc == it->second.prim->weights)) return false;
  const Prim& prim = *it->second.prim;
  const dnnl::memory a(a_desc, ctx.engine, const_cast<E*>(A)),
      c(c_desc, ctx.engine, C16 ? static_cast<void*>(C16) : C);
  if (bias) {
    const dnnl::memory bm(bias_desc, ctx.engine, const_cast<float*>(bias));
    prim.matmul.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, packed.mem}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, c}});
  } else {
    prim.matmul.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, packed.mem}, {DNNL_ARG_DST, c}});
  }
  stream.wait();
  return true;
}
#endif

// C[M, N] = bias in every row (leading dimension ldc): the start of a product with a bias that accumulates into C.
template <class T>
void seed_rows(T* C, index_t M, index_t N, index_t ldc, const T* bias) {
  for (index_t r = 0; r < M; ++r) std::copy(bias, bias + N, C + r * ldc);
}

// Whether a product with a weight of [N, K] (as W^T) and M rows reads it from a store of packed copies: only for
// large weights and products, where the kernel's own packing inside each call costs more than compiling an
// exact shape (0.27 ms) once; where the weight is small, packing inside each call is cheap (the demo's
// evaluation, D = 128, 3-8% slower with every product packed).
inline bool worth_packing(index_t M, index_t N, index_t K) {
  return static_cast<double>(N) * static_cast<double>(K) >= 0x1p19 &&
         static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >= 0x1p26;
}

// An fp32 product C = alpha op(A) W^T + beta C (+ bias, N floats: then alpha 1, beta 0) on one thread, W a
// model's weight whose packed copies an Fp32 policy keeps in `store` (an evaluation forward's, Limoe::prec):
// oneDNN's fp32 brgemm over W packed once (gemm_dnnl_packed), where worth_packing. Returns false, computing
// nothing, where there is no store, the product is too small, or oneDNN has no brgemm kernel for it (AVX2: its
// sgemm then runs the product, gemm_serial). The sgemm packs W inside every call: for a 196-row expert tile it
// packs all of a 9.4 MB weight for a quarter of the rows a dense block has. Measured on one Zen 5 core, weights
// of 8 experts in turn: [196, 768] x [768, 3072]^T 194 -> 214 GFLOP/s, [256, 384] x [384, 1536]^T 168 -> 220;
// one weight, 784 rows: 227 -> 227, 232 -> 244 (bench/README.md's performance log).
template <class T>
bool gemm_f32_packed(Trans ta, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda, const T* W,
                     index_t ldb, T beta, T* C, index_t ldc, const T* bias, PackedWeights* store) {
#if defined(LIMOE_HAVE_DNNL)
  if constexpr (std::is_same_v<T, float>) {  // other element types: never (the caller's product)
    if (store == nullptr || M == 0 || N == 0 || K == 0 || !worth_packing(M, N, K)) return false;
    try {
      return gemm_dnnl_packed(ta, M, N, K, alpha, A, lda, W, ldb, beta, C, ldc, bias, *store);
    } catch (const dnnl::error&) {
      return false;  // refused (it never half-computes): the caller's product
    }
  }
#endif
  (void)ta, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)W, (void)ldb, (void)beta, (void)C,
      (void)ldc, (void)bias, (void)store;
  return false;
}

// The fp32 product of gemm_mixed / gemm_mixed_bias over a weight the policy keeps packed (`packed`): split as
// gemm splits (detail::split_product), each block by gemm_f32_packed, or where that declines, by gemm_serial
// (with a bias: the block seeded with it and accumulated into).
template <class T>
void gemm_f32_packed_blocks(PackedWeights* packed, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha,
                            const T* A, index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc,
                            const T* bias) {
  split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    const T* a = A + a_offset(ta, m0, lda);
    const T* b = B + b_offset(tb, n0, ldb);
    T* c = C + m0 * ldc + n0;
    const T* bn = bias ? bias + n0 : nullptr;
    if (gemm_f32_packed<T>(ta, m1 - m0, n1 - n0, K, alpha, a, lda, b, ldb, beta, c, ldc, bn, packed)) return;
    if (bn) seed_rows(c, m1 - m0, n1 - n0, ldc, bn);
    gemm_serial<T>(ta, tb, m1 - m0, n1 - n0, K, alpha, a, lda, b, ldb, bn ? T(1) : beta, c, ldc);
  });
}

// Which kernel the bf16 products on operands as they lie use here: "onednn:<its implementation>" or "widened".
// On a processor with AMX the products over a mirror's weights (the forward's and the input gradients') run on
// limoe's tile kernel instead (gemm_bf16_serial, core/amx.hpp), which this name does not tell.
template <class = void>
std::string bf16_kernel_name() {
#if defined(LIMOE_HAVE_DNNL)
  if (DnnlContext::get().fast) return "onednn:" + DnnlContext::get().impl;
#endif
  return "widened";
}

// C = alpha op(A) op(B) + beta C on one thread; A, B bf16, C fp32. With a bias (N floats; then alpha must be 1
// and beta 0): C = op(A) op(B) + bias, the bias added in oneDNN's epilogue, or C seeded with it and accumulated
// into where oneDNN does not run the product. `packed`: B is a mirror's weight and its packed copies are kept
// there (gemm_dnnl_packed; the forward products, tb = T).
//
// With C16 (then beta must be 0), the result is written rounded to bf16 into C16 (leading dimension ldc) and C
// is not used: by oneDNN's epilogue where oneDNN runs the product, else computed into scratch and rounded by
// to_bf16 (the same bits for every result that is not a denormal: gemm_bf16_dnnl).
template <class = void>
void gemm_bf16_serial(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                             index_t lda, const bf16_bits* B, index_t ldb, float beta, float* C, index_t ldc,
                             const float* bias = nullptr, PackedWeights* packed = nullptr, bf16_bits* C16 = nullptr) {
  (void)packed;
  if (M == 0 || N == 0) return;
  LIMOE_CHECK(!bias || (alpha == 1.0f && beta == 0.0f), "gemm_bf16_serial: a bias needs alpha 1 and beta 0");
  LIMOE_CHECK(!C16 || beta == 0.0f, "gemm_bf16_serial: a bf16 result needs beta 0");
  // A mirror's weight on a processor with AMX: the tile kernel over the weight's packed copy (core/amx.hpp),
  // packed on its first use after the weights changed; read as W^T (a forward product) or as it lies (an input
  // gradient), each its own copy. It writes fp32: a bf16 result takes the scratch below.
  const bool amx_tiles = packed && ta == Trans::N && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
                         amx::eligible(N, K) && amx::available();
  if (amx_tiles && !C16) {
    const int layout = tb == Trans::T ? 1 : 2;
    const auto entry = packed->get(PackedWeights::Key{B, N, K, ldb, layout}, [&]() -> std::shared_ptr<const void> {
      return std::make_shared<amx::PackedB>(tb == Trans::T ? amx::pack(B, N, K, ldb) : amx::pack_rows(B, K, N, ldb));
    });
    amx::gemm(M, N, K, A, lda, *static_cast<const amx::PackedB*>(entry.get()), C, ldc, bias, beta == 1.0f);
    return;
  }
#if defined(LIMOE_HAVE_DNNL)
  if (!amx_tiles && K > 0 && DnnlContext::get().fast &&
      static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) >= 4096.0) {
    try {
      if (packed && tb == Trans::T && DnnlContext::get().brgemm && worth_packing(M, N, K)) {
        try {
          if (gemm_dnnl_packed(ta, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, *packed, C16)) return;
        } catch (const dnnl::error&) {
          // Refused (it never half-computes): the run-time shape kernel below.
        }
      }
      gemm_bf16_dnnl(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, C16);
      return;
    } catch (const dnnl::error&) {
      // A layout this oneDNN does not take (it refuses, it never half-computes): the fallback below.
    }
  }
#endif
  if (C16) {  // the fp32 result in scratch (AMX's tiles or the fallback below), then rounded
    ScratchLease<float> out(M * N);
    gemm_bf16_serial(ta, tb, M, N, K, alpha, A, lda, B, ldb, 0.0f, out.data(), N, bias, packed);
    for (index_t r = 0; r < M; ++r) to_bf16(out.data() + r * N, N, C16 + r * ldc);
    return;
  }
  if (bias) {
    seed_rows(C, M, N, ldc, bias);
    beta = 1.0f;
  }
  if (K == 0) gemm_serial<float>(ta, tb, M, N, 0, alpha, nullptr, lda, nullptr, ldb, beta, C, ldc);
  else gemm_bf16_widened(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// For i < batch, C_i = alpha op(A_i) op(B_i) + beta C_i on one thread, with A_i = A + i * sa, B_i = B + i * sb,
// C_i = C + i * sc; A, B bf16, C fp32 (the attention's per-head products under Bf16Mixed, ops/attention.hpp: one
// call for the heads of an image). oneDNN's batched matmul on exact shapes (they are fixed for a model: one
// primitive per shape, kept per thread); where oneDNN refuses the layout or offers only its reference kernel,
// gemm_bf16_per_item (the same arithmetic).
// The batch without oneDNN's bf16 kernel: each operand's whole extent widened to fp32 once, then gemm_serial per
// item. Once, not per item: an item is one head's columns of rows that hold every head, so widening per item
// (gemm_bf16_widened) would convert each operand H times.
template <class = void>
void gemm_bf16_batched_widened(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                               index_t lda, index_t sa, const bf16_bits* B, index_t ldb, index_t sb, float beta,
                               float* C, index_t ldc, index_t sc, index_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  const index_t na = (batch - 1) * sa + operand_extent(ta == Trans::N ? M : K, ta == Trans::N ? K : M, lda);
  const index_t nb = (batch - 1) * sb + operand_extent(tb == Trans::N ? K : N, tb == Trans::N ? N : K, ldb);
  ScratchLease<float> a(na), b(nb);
  for (index_t i = 0; i < na; ++i) a.data()[i] = from_bf16(A[i]);
  for (index_t i = 0; i < nb; ++i) b.data()[i] = from_bf16(B[i]);
  for (index_t i = 0; i < batch; ++i)
    gemm_serial<float>(ta, tb, M, N, K, alpha, a.data() + i * sa, lda, b.data() + i * sb, ldb, beta, C + i * sc, ldc);
}

// The fallback of gemm_bf16_batched_serial: one gemm_bf16_serial per item where oneDNN has a bf16 kernel (it
// refused the batched layout), else the widened batch above.
template <class = void>
void gemm_bf16_per_item(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                        index_t lda, index_t sa, const bf16_bits* B, index_t ldb, index_t sb, float beta, float* C,
                        index_t ldc, index_t sc, index_t batch) {
#if defined(LIMOE_HAVE_DNNL)
  if (DnnlContext::get().fast) {
    for (index_t i = 0; i < batch; ++i)
      gemm_bf16_serial(ta, tb, M, N, K, alpha, A + i * sa, lda, B + i * sb, ldb, beta, C + i * sc, ldc);
    return;
  }
#endif
  gemm_bf16_batched_widened(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}

template <class = void>
void gemm_bf16_batched_serial(Trans ta, Trans tb, index_t M, index_t N, index_t K, float alpha, const bf16_bits* A,
                              index_t lda, index_t sa, const bf16_bits* B, index_t ldb, index_t sb, float beta,
                              float* C, index_t ldc, index_t sc, index_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
#if defined(LIMOE_HAVE_DNNL)
  if (K > 0 && batch > 1 && DnnlContext::get().fast) {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    using Key = DnnlKey<12>;
    DnnlContext& ctx = DnnlContext::get();
    thread_local dnnl::stream stream(ctx.engine);
    // An empty entry: oneDNN has only its reference kernel for that layout.
    thread_local std::unordered_map<Key, std::optional<dnnl::matmul>, DnnlKeyHash<12>> cache;
    dnnl_single_thread();
    // Four dimensions with a leading 1: oneDNN 2.x then picks its brgemm kernel for the heads' strided blocks
    // (2.5 ms per B/32 layer for scores and contexts, against 2.9 with its gemm kernel that three get).
    const dnnl::memory::desc a_desc(dims{1, batch, M, K}, dt::bf16,
                                    ta == Trans::N ? dims{batch * sa, sa, lda, 1} : dims{batch * sa, sa, 1, lda}),
        b_desc(dims{1, batch, K, N}, dt::bf16,
               tb == Trans::N ? dims{batch * sb, sb, ldb, 1} : dims{batch * sb, sb, 1, ldb}),
        c_desc(dims{1, batch, M, N}, dt::f32, dims{batch * sc, sc, ldc, 1});
    const Key key{{static_cast<index_t>(ta), static_cast<index_t>(tb), M, N, K, lda, sa, ldb, sb, ldc, sc, batch},
                  alpha, beta};
    auto it = cache.find(key);
    if (it == cache.end()) {
      if (cache.size() >= 512) cache.clear();  // shapes of another model: start again
      std::optional<dnnl::matmul> prim;
      try {
        const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_desc, b_desc, c_desc), dnnl_scale_attr(alpha, beta),
                                              ctx.engine);
        if (std::string(pd.impl_info_str()).rfind("ref", 0) != 0) prim.emplace(pd);
      } catch (const dnnl::error&) {
        // A layout this oneDNN does not take: per item below.
      }
      it = cache.emplace(key, std::move(prim)).first;
    }
    if (it->second) {
      const dnnl::memory a(a_desc, ctx.engine, const_cast<bf16_bits*>(A)),
          b(b_desc, ctx.engine, const_cast<bf16_bits*>(B)), c(c_desc, ctx.engine, C);
      it->second->execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream.wait();
      return;
    }
  }
#endif
  gemm_bf16_per_item(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
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

// op(A) op(B) + bias (bias may be nullptr) over bf16 operands, split as gemm splits, into C (fp32) or, where C16 is
// given, rounded into C16 (gemm_bf16_serial's C16); leading dimension ldc either way.
template <class = void>
void bf16_bias_blocks(Trans ta, Trans tb, index_t M, index_t N, index_t K, const bf16_bits* a, index_t lda,
                      const bf16_bits* b, index_t ldb, const float* bias, float* C, bf16_bits* C16, index_t ldc,
                      PackedWeights* packed) {
  split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_bf16_serial(ta, tb, m1 - m0, n1 - n0, K, 1.0f, a + a_offset(ta, m0, lda), lda, b + b_offset(tb, n0, ldb), ldb,
                     0.0f, C ? C + m0 * ldc + n0 : nullptr, ldc, bias ? bias + n0 : nullptr, packed,
                     C16 ? C16 + m0 * ldc + n0 : nullptr);
  });
}
}  // namespace detail

// An fp32 activation that several products of one op read: under Bf16Mixed rounded here once (over the thread
// pool, into the calling thread's scratch), and prec() is the policy that also finds that copy, so the products
// read it instead of rounding it again (the same bits: rounding is per element); under Fp32, or when the policy
// already finds x, nothing, and prec() is the policy itself. Lives on the stack of the op that makes it.
template <class T, PrecisionPolicy P>
class RoundedOnce {
 public:
  RoundedOnce(const P& prec, const T* x, index_t n) : prec_(prec), lease_(needed(prec, x, n) ? n : 0) {
    if constexpr (P::mixed && std::is_same_v<T, float>) {
      if (needed(prec, x, n)) {
        to_bf16_parallel(x, n, lease_.data());
        prec_ = prec.with(x, n, lease_.data());
      }
    }
  }
  const P& prec() const { return prec_; }

 private:
  static bool needed(const P& prec, const T* x, index_t n) {
    if constexpr (P::mixed && std::is_same_v<T, float>) return x != nullptr && n > 0 && prec.find(x, n) == nullptr;
    else return (void)prec, (void)x, (void)n, false;
  }
  P prec_;
  detail::ScratchLease<bf16_bits> lease_;
};

namespace detail {
// What both mixed products share: under Fp32 (or a non-float T) `fp32(packed)` runs (`packed`: where B's packed
// copies are kept when B^T is a weight of the policy's store, else nullptr); under Bf16Mixed the operands are
// read as bf16 (the mirror's copy, or rounded here, over the thread pool when `threaded`) and passed to
// `bf16(a, b, packed)` (a generic lambda: only instantiated for float; `packed` where B's packed copies are kept
// when B is the mirror's weight, else nullptr).
template <class T, PrecisionPolicy P, class Fp32Fn, class Bf16Fn>
void mixed_product(const P& prec, bool threaded, Trans ta, Trans tb, index_t M, index_t N, index_t K, const T* A,
                   index_t lda, const T* B, index_t ldb, Fp32Fn&& fp32, Bf16Fn&& bf16) {
  if constexpr (!P::mixed || !std::is_same_v<T, float>) {
    static_assert(!P::mixed || std::is_same_v<T, float>, "gemm_mixed: the bf16 policy computes in float");
    (void)threaded, (void)ta, (void)M, (void)A, (void)lda;
    // B^T a model weight whose packed copies an Fp32 policy keeps (an evaluation forward's): where they are.
    PackedWeights* packed = nullptr;
    if constexpr (!P::mixed && std::is_same_v<T, float>) {
      if (tb == Trans::T && N > 0 && K > 0) packed = prec.weights.find(B, operand_extent(N, K, ldb));
    } else {
      (void)prec, (void)tb, (void)N, (void)K, (void)B, (void)ldb;
    }
    fp32(packed);
  } else {
    if (M == 0 || N == 0) return;
    const index_t ar = ta == Trans::N ? M : K, ac = ta == Trans::N ? K : M;
    const index_t br = tb == Trans::N ? K : N, bc = tb == Trans::N ? N : K;
    const index_t na = operand_extent(ar, ac, lda), nb = operand_extent(br, bc, ldb);
    ScratchLease<bf16_bits> sa(prec.find(A, na) ? 0 : na), sb(prec.find(B, nb) ? 0 : nb);
    // B^T a weight of the mirror, whose store the policy carries (an evaluation forward's): where its packed
    // copies are kept (gemm_bf16_serial).
    // With AMX also B as it lies (an input gradient's dy W: gemm_bf16_serial).
    PackedWeights* packed =
        (tb == Trans::T || amx::available()) && prec.weights.find(B, nb) ? prec.weights.packed : nullptr;
    bf16(bf16_operand(prec, A, ar, ac, lda, sa, threaded), bf16_operand(prec, B, br, bc, ldb, sb, threaded), packed);
  }
}
}  // namespace detail

// C[M, N] = alpha op(A) op(B) + beta C under precision policy P, on one thread.
template <class T, PrecisionPolicy P>
void gemm_mixed_serial(const P& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A,
                       index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  detail::mixed_product<T>(
      prec, false, ta, tb, M, N, K, A, lda, B, ldb,
      [&](PackedWeights* packed) {
        if (!detail::gemm_f32_packed<T>(ta, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nullptr, packed))
          gemm_serial<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      },
      [&](const auto* a, const auto* b, PackedWeights* packed) {
        detail::gemm_bf16_serial(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, C, ldc, nullptr, packed);
      });
}

// The same split over the thread pool (detail::split_product): operands are rounded once, in parallel, then
// every block multiplies its part.
template <class T, PrecisionPolicy P>
void gemm_mixed(const P& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda,
                const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  detail::mixed_product<T>(
      prec, true, ta, tb, M, N, K, A, lda, B, ldb,
      [&](PackedWeights* packed) {
        if (!packed) return gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        detail::gemm_f32_packed_blocks<T>(packed, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nullptr);
      },
      [&](const auto* a, const auto* b, PackedWeights* packed) {
        detail::split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
          detail::gemm_bf16_serial(ta, tb, m1 - m0, n1 - n0, K, alpha, a + detail::a_offset(ta, m0, lda), lda,
                                   b + detail::b_offset(tb, n0, ldb), ldb, beta, C + m0 * ldc + n0, ldc, nullptr,
                                   packed);
        });
      });
}

// C[M, N] = op(A) op(B) + bias (the N floats of `bias` added to every row): a layer's product with its bias,
// under P. Fp32: C seeded with the bias, then accumulated into (beta = 1), over the thread pool; where the policy
// keeps B^T packed (gemm_f32_packed), the bias added in oneDNN's epilogue as under bf16. Bf16Mixed: the
// bias added in oneDNN's epilogue, block by block (gemm_bf16_serial), which saves the seeding pass over C and
// the product's read of it (B/32's [1568, 3072] hidden layer: 35.5 -> 34.3 ms on one Zen 4 core).
template <class T, PrecisionPolicy P>
void gemm_mixed_bias(const P& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K, const T* A, index_t lda,
                     const T* B, index_t ldb, const T* bias, T* C, index_t ldc) {
  detail::mixed_product<T>(
      prec, true, ta, tb, M, N, K, A, lda, B, ldb,
      [&](PackedWeights* packed) {
        if (!packed) {
          parallel_for(0, M, std::max<index_t>(1, 16384 / std::max<index_t>(N, 1)), [&](index_t r0, index_t r1) {
            detail::seed_rows(C + r0 * ldc, r1 - r0, N, ldc, bias);
          });
          return gemm<T>(ta, tb, M, N, K, T(1), A, lda, B, ldb, T(1), C, ldc);
        }
        // The weight packed: the bias in oneDNN's epilogue, block by block; a block it does not run is seeded
        // and accumulated into as above.
        detail::gemm_f32_packed_blocks<T>(packed, ta, tb, M, N, K, T(1), A, lda, B, ldb, T(0), C, ldc, bias);
      },
      [&](const auto* a, const auto* b, PackedWeights* packed) {
        detail::bf16_bias_blocks(ta, tb, M, N, K, a, lda, b, ldb, bias, C, nullptr, ldc, packed);
      });
}

// C16[M, N] = op(A) op(B) + bias (bias may be nullptr), rounded to bf16 (leading dimension ldc): a layer's
// product under Bf16Mixed whose output only bf16 products read (attention's q, k and v), written once as bf16
// rather than in fp32 and then rounded in a pass of its own. Split as gemm_mixed_bias splits; the rounding is
// gemm_bf16_serial's (C16).
template <class = void>
void gemm_mixed_bias_bf16(const Bf16Mixed& prec, Trans ta, Trans tb, index_t M, index_t N, index_t K,
                          const float* A, index_t lda, const float* B, index_t ldb, const float* bias, bf16_bits* C16,
                          index_t ldc) {
  detail::mixed_product<float>(
      prec, true, ta, tb, M, N, K, A, lda, B, ldb, [](PackedWeights*) {},
      [&](const auto* a, const auto* b, PackedWeights* packed) {
        detail::bf16_bias_blocks(ta, tb, M, N, K, a, lda, b, ldb, bias, nullptr, C16, ldc, packed);
      });
}

}  // namespace limoe
