// src/cuda/backend/ops.cuh: the CUDA backend's ops (the list of backend/ops.hpp, under the same names, shape
// checks and gradient rules as ref:: and cpu::): kernels of src/cuda/kernels/ for the row-wise and data-moving
// work, cuBLAS products (exec::gemm / gemm_batched) for the rest. Views live in exec::Space (device memory;
// host memory under the tests' emulation). What an op computes is written in limoe/math/ and the kernels;
// this file adds launch shapes, scratch and order.
//
// Host synchronisation: none, except where the op's result is a host value or a host-side size: the
// contrastive loss and its temperature gradient (scalars), token ids checked against the vocabulary (one
// integer back), and the dispatch plan (per-expert row counts). Scratch is allocated per call from the space's
// caching pool (core/block_pool.hpp), which reaches cudaMalloc only when no freed block of the size is cached.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../kernels/contrastive.cuh"
#include "../kernels/moe.cuh"
#include "../kernels/optimizer.cuh"
#include "../kernels/rows.cuh"
#include "../kernels/tensor.cuh"
#include "exec.cuh"
#include "limoe/core/profile.hpp"
#include "limoe/backend/cuda_ops.hpp"
#include "limoe/moe/plan.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe::cuda::ops {

template <class T>
using DTensor = Tensor<T, Space>;
namespace kn = ::limoe::cuda::kernels;
namespace chk = ::limoe::detail;

inline constexpr int kRowThreads = 128;  // threads of a one-block-per-row kernel
inline constexpr int kColThreads = 128;  // threads per block of a one-thread-per-column kernel

inline dim3 rows_grid(index_t R) { return dim3(static_cast<unsigned>(R)); }

// ---- dense ops -------------------------------------------------------------------------------------------

template <class T, class Prec>
void linear_forward(CV<T> x, CV<T> W, CV<T> b, V<T> y, const Prec& prec) {
  const index_t R = chk::linear_check<T, Space>("cuda::linear_forward", x, W, b, y.shape(), "y");
  const index_t O = W.dim(0), I = W.dim(1);
  if (R == 0 || O == 0) return;
  if (b.empty())
    exec::gemm_as<Prec, T>(prec, false, true, R, O, I, T(1), x.data(), I, W.data(), I, T(0), y.data(), O);
  else  // the bias in the product's epilogue (cuBLASLt), or seeded
    exec::gemm_bias_as<Prec, T>(prec, false, true, R, O, I, x.data(), I, W.data(), I, b.data(), y.data());
}

template <class T, class Prec>
void linear_backward(CV<T> x, CV<T> W, CV<T> dy, V<T> dx, V<T> dW, V<T> db, const Prec& prec) {
  const index_t R = chk::linear_check<T, Space>("cuda::linear_backward", x, W, CV<T>{}, dy.shape(), "dy");
  const index_t O = W.dim(0), I = W.dim(1);
  if (!dx.empty())
    LIMOE_CHECK(dx.numel() == x.numel() && dx.shape().back() == I, "cuda::linear_backward: dx ", dx.shape().str(),
                " must match x ", x.shape().str());
  if (!dW.empty()) expect_shape(dW, W.shape(), "cuda::linear_backward: dW");
  if (!db.empty())
    LIMOE_CHECK(db.numel() == O, "cuda::linear_backward: db ", db.shape().str(), " must have O = ", O, " elements");
  // dy is read by both products: under bf16 rounded once for both.
  const exec::RoundedOnce<Prec, T> dy16(prec, !dx.empty() && !dW.empty() ? dy.data() : nullptr, R * O);
  if (!dx.empty()) exec::gemm_as<Prec, T>(dy16.prec(), false, false, R, I, O, T(1), dy.data(), O, W.data(), I, T(0), dx.data(), I);
  if (R == 0) return;
  if (!dW.empty()) exec::gemm_as<Prec, T>(dy16.prec(), true, false, O, I, R, T(1), dy.data(), O, x.data(), I, T(1), dW.data(), I);
  if (!db.empty())
    exec::launch("add_column_sums", exec::grid_for(O, kColThreads), kColThreads, kn::add_column_sums<T>, dy.data(), R,
                 O, O, db.data());
}

template <class T>
void layernorm_forward(CV<T> x, CV<T> g, CV<T> b, T eps, V<T> y, V<T> mean, V<T> rstd) {
  const index_t R = chk::layernorm_check<T, Space>("cuda::layernorm_forward", x, g, b);
  const index_t D = g.numel();
  chk::layernorm_check_like<T, Space>("cuda::layernorm_forward", "y", y, x);
  // The kernel writes the statistics of every row; scratch stands in for the ones the caller does not keep.
  DTensor<T> ms, rs;
  if (mean.empty()) ms.resize(Shape{R});
  else chk::layernorm_check_rows<T, Space>("cuda::layernorm_forward", "mean", mean, R);
  if (rstd.empty()) rs.resize(Shape{R});
  else chk::layernorm_check_rows<T, Space>("cuda::layernorm_forward", "rstd", rstd, R);
  exec::launch("layernorm_forward", rows_grid(R), kRowThreads, kn::layernorm_forward<kRowThreads, T>, x.data(),
               g.data(), b.empty() ? nullptr : b.data(), eps, D, y.data(), mean.empty() ? ms.data() : mean.data(),
               rstd.empty() ? rs.data() : rstd.data());
}

template <class T>
void layernorm_backward(CV<T> x, CV<T> g, CV<T> mean, CV<T> rstd, CV<T> dy, V<T> dx, V<T> dg, V<T> db) {
  const index_t R = chk::layernorm_check<T, Space>("cuda::layernorm_backward", x, g, CV<T>{});
  const index_t D = g.numel();
  chk::layernorm_check_rows<T, Space>("cuda::layernorm_backward", "mean", mean, R);
  chk::layernorm_check_rows<T, Space>("cuda::layernorm_backward", "rstd", rstd, R);
  chk::layernorm_check_like<T, Space>("cuda::layernorm_backward", "dy", dy, x);
  if (!dx.empty()) chk::layernorm_check_like<T, Space>("cuda::layernorm_backward", "dx", dx, x);
  if (!dg.empty()) expect_shape(dg, g.shape(), "cuda::layernorm_backward: dg");
  if (!db.empty()) expect_shape(db, g.shape(), "cuda::layernorm_backward: db");
  if (R == 0) return;
  // Parameter gradients first: dx may alias dy.
  if (!dg.empty() || !db.empty())
    exec::launch("layernorm_backward_params", exec::grid_for(D, kColThreads), kColThreads,
                 kn::layernorm_backward_params<T>, x.data(), mean.data(), rstd.data(), dy.data(), R, D,
                 dg.empty() ? nullptr : dg.data(), db.empty() ? nullptr : db.data());
  if (!dx.empty())
    exec::launch("layernorm_backward_input", rows_grid(R), kRowThreads, kn::layernorm_backward_input<kRowThreads, T>,
                 x.data(), g.data(), mean.data(), rstd.data(), dy.data(), D, dx.data());
}

template <class T>
void gelu_forward(GeluKind kind, CV<T> x, V<T> y) {
  chk::gelu_check_like<T, Space>("cuda::gelu_forward", "y", y, x);
  exec::launch("gelu_forward", exec::grid_for(x.numel()), 256, kn::gelu_forward<T>, kind, x.data(), x.numel(), y.data());
}

template <class T>
void gelu_backward(GeluKind kind, CV<T> x, CV<T> dy, V<T> dx) {
  chk::gelu_check_like<T, Space>("cuda::gelu_backward", "dy", dy, x);
  chk::gelu_check_like<T, Space>("cuda::gelu_backward", "dx", dx, x);
  exec::launch("gelu_backward", exec::grid_for(x.numel()), 256, kn::gelu_backward<T>, kind, x.data(), dy.data(),
               x.numel(), dx.data());
}

template <class T>
void bias_gelu_forward(GeluKind kind, CV<T> b, V<T> pre_out, V<T> y) {
  const index_t M = b.numel();
  LIMOE_CHECK(M > 0 && pre_out.rank() >= 1 && pre_out.shape().back() == M, "cuda::bias_gelu_forward: pre_out ",
              pre_out.shape().str(), " must end in the bias width ", M, " (b is ", b.shape().str(), ")");
  chk::gelu_check_like<T, Space>("cuda::bias_gelu_forward", "y", y, CV<T>(pre_out));
  LIMOE_CHECK(y.data() != pre_out.data(), "cuda::bias_gelu_forward: y must not alias pre_out (the backward pass "
              "needs the pre-activation); pass a separate output buffer");
  exec::launch("bias_gelu_forward", exec::grid_for(pre_out.numel()), 256, kn::bias_gelu_forward<T>, kind, b.data(),
               pre_out.numel(), M, pre_out.data(), y.data());
}

template <class T>
void softmax_forward(CV<T> x, V<T> y) {
  const index_t R = chk::softmax_check<T, Space>("cuda::softmax_forward", "y", y, x);
  exec::launch("softmax_forward", rows_grid(R), kRowThreads, kn::softmax_forward<kRowThreads, T>, x.data(),
               x.shape().back(), T(1), static_cast<const std::uint8_t*>(nullptr), index_t{1}, y.data());
}

template <class T>
void softmax_backward(CV<T> y, CV<T> dy, V<T> dx) {
  const index_t R = chk::softmax_check<T, Space>("cuda::softmax_backward", "dy", dy, y);
  chk::softmax_check<T, Space>("cuda::softmax_backward", "dx", dx, y);
  exec::launch("softmax_backward", rows_grid(R), kRowThreads, kn::softmax_backward<kRowThreads, T>, y.data(),
               dy.data(), y.shape().back(), dx.data());
}

template <class T>
void l2_normalize_forward(CV<T> u, V<T> z, V<T> norms) {
  const index_t R = chk::l2norm_check<T, Space>("cuda::l2_normalize_forward", u, z, norms);
  exec::launch("l2_normalize_forward", rows_grid(R), kRowThreads, kn::l2_normalize_forward<kRowThreads, T>, u.data(),
               u.shape().back(), T(kL2NormEps), z.data(), norms.data());
}

template <class T>
void l2_normalize_backward(CV<T> u, CV<T> z, CV<T> norms, CV<T> dz, V<T> du) {
  const index_t R = chk::l2norm_check<T, Space>("cuda::l2_normalize_backward", u, z, norms);
  chk::l2norm_check<T, Space>("cuda::l2_normalize_backward (dz)", u, dz, norms);
  chk::l2norm_check<T, Space>("cuda::l2_normalize_backward (du)", u, du, norms);
  exec::launch("l2_normalize_backward", rows_grid(R), kRowThreads, kn::l2_normalize_backward<kRowThreads, T>, z.data(),
               norms.data(), dz.data(), u.shape().back(), T(kL2NormEps), du.data());
}

// ---- embeddings --------------------------------------------------------------------------------------------

template <class T, class Prec>
void patch_embed_forward(CV<T> images, int P, CV<T> W, CV<T> b, CV<T> pos, V<T> patches, V<T> y, const Prec& prec) {
  const auto g = chk::patch_geom<T, Space>("cuda::patch_embed_forward", images, P);
  LIMOE_CHECK(W.rank() == 2 && W.dim(1) == g.F, "cuda::patch_embed_forward: W ", W.shape().str(),
              " must be [D, P*P*C = ", g.F, "] for images ", images.shape().str(), " and P = ", P);
  const index_t D = W.dim(0);
  expect_shape(y, Shape{g.B, g.N, D}, "cuda::patch_embed_forward: y");
  if (!pos.empty()) expect_shape(pos, Shape{g.N, D}, "cuda::patch_embed_forward: pos");
  expect_shape(patches, chk::patch_shape(g), "cuda::patch_embed_forward: patches");
  exec::launch("patch_copy", exec::grid_for(g.B * g.N * g.F), 256, kn::patch_copy<T>, g, images.data(), patches.data(), true);
  linear_forward<T>(patches, W, b, y, prec);
  if (!pos.empty())
    exec::launch("add_periodic_rows", exec::grid_for(g.B * g.N * D), 256, kn::add_periodic_rows<T>, pos.data(),
                 g.B * g.N, g.N, D, y.data());
}

template <class T, class Prec>
void patch_embed_backward(CV<T> images, int P, CV<T> patches, CV<T> W, CV<T> dy, V<T> dimages, V<T> dW, V<T> db,
                          V<T> dpos, const Prec& prec) {
  const auto g = chk::patch_geom<T, Space>("cuda::patch_embed_backward", images, P);
  expect_shape(patches, chk::patch_shape(g), "cuda::patch_embed_backward: patches");
  LIMOE_CHECK(W.rank() == 2 && W.dim(1) == g.F, "cuda::patch_embed_backward: W ", W.shape().str(),
              " must be [D, P*P*C = ", g.F, "]");
  const index_t D = W.dim(0);
  expect_shape(dy, Shape{g.B, g.N, D}, "cuda::patch_embed_backward: dy");
  if (!dimages.empty()) expect_shape(dimages, images.shape(), "cuda::patch_embed_backward: dimages");
  if (!dpos.empty()) expect_shape(dpos, Shape{g.N, D}, "cuda::patch_embed_backward: dpos");
  if (!dimages.empty()) {
    DTensor<T> dpatches(chk::patch_shape(g));  // [B, N, P*P*C]
    linear_backward<T>(patches, W, dy, dpatches.view(), dW, db, prec);
    exec::launch("patch_copy", exec::grid_for(g.B * g.N * g.F), 256, kn::patch_copy<T>, g, dpatches.data(),
                 dimages.data(), false);
  } else {
    linear_backward<T>(patches, W, dy, V<T>{}, dW, db, prec);
  }
  if (!dpos.empty())
    exec::launch("add_periodic_sums", exec::grid_for(g.N * D), 256, kn::add_periodic_sums<T>, dy.data(), g.B * g.N,
                 g.N, D, dpos.data());
}

namespace detail {
// Throws the ops' error for the first id outside [0, V) (one integer copied back).
inline void check_ids(const char* fn, CV<std::int32_t> ids, index_t V) {
  const index_t n = ids.numel(), L = ids.shape().back();
  if (n == 0) return;
  DTensor<std::int64_t> first(Shape{1});
  exec::launch("first_bad_id", 1, 256, kn::first_bad_id<256>, ids.data(), n, V, first.data());
  std::int64_t at = 0;
  exec::to_host(&at, first.data(), 1);
  if (at < n) {
    std::int32_t id = 0;
    exec::to_host(&id, ids.data() + at, 1);
    chk::bad_token(fn, id, at, L, V);
  }
}
}  // namespace detail

template <class T>
void token_embed_forward(CV<std::int32_t> ids, CV<T> table, CV<T> pos, V<T> y) {
  LIMOE_CHECK(table.rank() == 2, "cuda::token_embed_forward: table must be [V, D], got ", table.shape().str());
  const index_t Vn = table.dim(0), D = table.dim(1);
  chk::token_check<T, Space>("cuda::token_embed_forward", ids, D, pos, y.shape(), "y");
  detail::check_ids("cuda::token_embed_forward", ids, Vn);
  const index_t n = ids.numel();
  exec::launch("token_embed_forward", exec::grid_for(n * D), 256, kn::token_embed_forward<T>, ids.data(), table.data(),
               pos.empty() ? nullptr : pos.data(), n, ids.shape().back(), D, y.data());
}

template <class T>
void token_embed_backward(CV<std::int32_t> ids, CV<T> dy, V<T> dtable, V<T> dpos) {
  LIMOE_CHECK(dy.rank() >= 2, "cuda::token_embed_backward: dy must be [B, T, D] or [T, D], got ", dy.shape().str());
  const index_t D = dy.shape().back();
  chk::token_check<T, Space>("cuda::token_embed_backward", ids, D, dpos, dy.shape(), "dy");
  LIMOE_CHECK(dtable.empty() || (dtable.rank() == 2 && dtable.dim(1) == D), "cuda::token_embed_backward: dtable ",
              dtable.shape().str(), " must be [V, ", D, "]");
  if (!dtable.empty()) detail::check_ids("cuda::token_embed_backward", ids, dtable.dim(0));
  exec::launch("token_embed_backward", exec::grid_for(D, kColThreads), kColThreads, kn::token_embed_backward<T>,
               ids.data(), dy.data(), ids.numel(), ids.shape().back(), D, dtable.empty() ? nullptr : dtable.data(),
               dpos.empty() ? nullptr : dpos.data());
}

// ---- pooling -------------------------------------------------------------------------------------------

template <class T>
void pool_forward(Pooling kind, CV<T> x, CV<std::uint8_t> key_mask, V<T> y) {
  chk::pool_check<T, Space>("cuda::pool_forward", kind, x, key_mask, y);
  const index_t B = x.dim(0), N = x.dim(1), D = x.dim(2);
  exec::launch("pool_forward", exec::grid_for(B * D), 256, kn::pool_forward<T>, kind, x.data(),
               key_mask.empty() ? nullptr : key_mask.data(), B, N, D, y.data());
}

template <class T>
void pool_backward(Pooling kind, CV<std::uint8_t> key_mask, CV<T> dy, V<T> dx) {
  chk::pool_check<T, Space>("cuda::pool_backward", kind, dx, key_mask, dy);
  const index_t B = dx.dim(0), N = dx.dim(1), D = dx.dim(2);
  exec::launch("pool_backward", exec::grid_for(B * N * D), 256, kn::pool_backward<T>, kind,
               key_mask.empty() ? nullptr : key_mask.data(), dy.data(), B, N, D, dx.data());
}

// ---- attention ---------------------------------------------------------------------------------------------

// y [B, Nq, D] = MultiHead(xq, xkv) (ops/attention.hpp); the per-(example, head) products are strided-batched
// over the examples, one call per head. Under a mixed policy they read bf16 copies of their operands (q, k, v
// and the probabilities rounded once per forward and kept in the cache for the backward; dctx and the score
// gradients once per backward) through tensor cores with fp32 accumulation; softmax stays fp32, as on the CPU.
namespace heads {
// An operand of the per-head products: its fp32 values and, under a mixed policy, its bf16 copy.
template <class T>
struct Operand {
  const T* f;
  const std::uint16_t* h;
  Operand operator+(index_t o) const { return {f + o, h ? h + o : nullptr}; }
};
template <class T>
Operand<T> operand(const DTensor<T>& f, const DTensor<std::uint16_t>& h) {
  return {f.data(), h.numel() == f.numel() ? h.data() : nullptr};
}
// The bf16 copy of a whole buffer (kernels::to_bf16_block through the to_bf16 op).
inline void round_into(const DTensor<float>& src, DTensor<std::uint16_t>& dst) {
  dst.resize(src.shape());
  if (src.numel() > 0) to_bf16(src.cview(), dst.view());
}
template <class Prec, class T>
void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, T alpha, Operand<T> A, index_t lda, index_t sa,
          Operand<T> B, index_t ldb, index_t sb, T beta, T* C, index_t ldc, index_t sc, index_t batch) {
  if constexpr (Prec::mixed)
    exec::gemm_bf16_rounded_batched(ta, tb, M, N, K, alpha, A.h, lda, sa, B.h, ldb, sb, beta, C, ldc, sc, batch);
  else
    exec::gemm_batched<T>(ta, tb, M, N, K, alpha, A.f, lda, sa, B.f, ldb, sb, beta, C, ldc, sc, batch);
}
}  // namespace heads

template <class T, class Prec>
void attention_forward(const AttentionWeights<T, Space>& w, int heads, CV<T> xq, CV<T> xkv,
                       CV<std::uint8_t> key_mask, V<T> y, AttentionCache<T, Space>& cache, const Prec& prec) {
  const auto d = chk::attention_check<T, Space>("cuda::attention_forward", w, heads, xq, xkv, key_mask);
  expect_shape(y, xq.shape(), "cuda::attention_forward: y");
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  cache.size_forward(B, Nq, Nk, D, H);
  {  // under bf16 xkv (xq too, for self-attention) rounded once for the three projections
    const exec::RoundedOnce<Prec, T> x16(prec, xkv.data(), xkv.numel());
    linear_forward<T>(xq, w.wq, w.bq, cache.q.view(), x16.prec());
    linear_forward<T>(xkv, w.wk, w.bk, cache.k.view(), x16.prec());
    linear_forward<T>(xkv, w.wv, w.bv, cache.v.view(), x16.prec());
  }
  if (B == 0) return;
  T* probs = cache.probs.data();
  profile::Region<Space> heads_region("heads");  // the per-head products and softmax (core/profile.hpp)
  if constexpr (Prec::mixed) {
    static_assert(std::is_same_v<T, float>, "CUDA backend: the bf16 products take float tensors");
    heads::round_into(cache.q, cache.q16);
    heads::round_into(cache.k, cache.k16);
    heads::round_into(cache.v, cache.v16);
  } else {
    cache.drop_bf16_copies();
  }
  const auto q = heads::operand(cache.q, cache.q16), k = heads::operand(cache.k, cache.k16);
  for (index_t h = 0; h < H; ++h)  // raw scores q_h k_h^T of every example
    heads::gemm<Prec, T>(false, true, Nq, Nk, Dh, T(1), q + h * Dh, D, Nq * D, k + h * Dh, D, Nk * D, T(0),
                         probs + h * Nq * Nk, Nk, H * Nq * Nk, B);
  const T scale = chk::attention_scale<T>(d);
  exec::launch("softmax_forward (attention)", rows_grid(B * H * Nq), kRowThreads, kn::softmax_forward<kRowThreads, T>,
               static_cast<const T*>(probs), Nk, scale, key_mask.empty() ? nullptr : key_mask.data(), H * Nq, probs);
  if constexpr (Prec::mixed) heads::round_into(cache.probs, cache.probs16);
  const auto P = heads::operand(cache.probs, cache.probs16), v = heads::operand(cache.v, cache.v16);
  for (index_t h = 0; h < H; ++h)  // ctx_h = P_h v_h
    heads::gemm<Prec, T>(false, false, Nq, Dh, Nk, T(1), P + h * Nq * Nk, Nk, H * Nq * Nk, v + h * Dh, D, Nk * D, T(0),
                         cache.ctx.data() + h * Dh, D, Nq * D, B);
  heads_region.stop();
  linear_forward<T>(cache.ctx.cview(), w.wo, w.bo, y, prec);
}

template <class T, class Prec>
void attention_backward(const AttentionWeights<T, Space>& w, int heads, CV<T> xq, CV<T> xkv,
                        CV<std::uint8_t> key_mask, AttentionCache<T, Space>& cache, CV<T> dy, V<T> dxq, V<T> dxkv,
                        const AttentionGrads<T, Space>& g, const Prec& prec) {
  const auto d = chk::attention_check<T, Space>("cuda::attention_backward", w, heads, xq, xkv, key_mask);
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  expect_shape(dy, xq.shape(), "cuda::attention_backward: dy");
  chk::attention_cache_check<T, Space>("cuda::attention_backward", cache, xq.shape(), xkv.shape(), d);
  if (!dxq.empty()) expect_shape(dxq, xq.shape(), "cuda::attention_backward: dxq");
  if (!dxkv.empty()) expect_shape(dxkv, xkv.shape(), "cuda::attention_backward: dxkv");
  const bool summed = !dxq.empty() && dxq.data() == dxkv.data();
  cache.dctx.resize(Shape{B, Nq, D});
  cache.dq.resize(Shape{B, Nq, D});
  cache.dk.resize(Shape{B, Nk, D});
  cache.dv.resize(Shape{B, Nk, D});
  cache.dscores.resize(Shape{B, H, Nq, Nk});  // every pair's score gradient at once
  linear_backward<T>(cache.ctx.cview(), w.wo, dy, cache.dctx.view(), g.wo, g.bo, prec);
  const T* probs = cache.probs.data();
  T* dS = cache.dscores.data();
  const index_t sp = H * Nq * Nk;
  profile::Region<Space> heads_region("heads");
  if constexpr (Prec::mixed) {
    chk::attention_cache16_check<T, Space>("cuda::attention_backward", cache);
    heads::round_into(cache.dctx, cache.dctx16);
  }
  const auto P = heads::operand(cache.probs, cache.probs16), dctx = heads::operand(cache.dctx, cache.dctx16);
  const auto q = heads::operand(cache.q, cache.q16), k = heads::operand(cache.k, cache.k16),
             v = heads::operand(cache.v, cache.v16);
  for (index_t h = 0; h < H; ++h) {
    const index_t ho = h * Dh, po = h * Nq * Nk;
    // dv_h = P^T dctx_h; dP = dctx_h v_h^T.
    heads::gemm<Prec, T>(true, false, Nk, Dh, Nq, T(1), P + po, Nk, sp, dctx + ho, D, Nq * D, T(0), cache.dv.data() + ho,
                         D, Nk * D, B);
    heads::gemm<Prec, T>(false, true, Nq, Nk, Dh, T(1), dctx + ho, D, Nq * D, v + ho, D, Nk * D, T(0), dS + po, Nk, sp, B);
  }
  exec::launch("softmax_backward (attention)", rows_grid(B * H * Nq), kRowThreads, kn::softmax_backward<kRowThreads, T>,
               probs, static_cast<const T*>(dS), Nk, dS);
  if constexpr (Prec::mixed) heads::round_into(cache.dscores, cache.dscores16);
  const auto dSo = heads::operand(cache.dscores, cache.dscores16);
  const T scale = chk::attention_scale<T>(d);
  for (index_t h = 0; h < H; ++h) {
    const index_t ho = h * Dh, po = h * Nq * Nk;
    // dq_h = scale dS k_h; dk_h = scale dS^T q_h.
    heads::gemm<Prec, T>(false, false, Nq, Dh, Nk, scale, dSo + po, Nk, sp, k + ho, D, Nk * D, T(0), cache.dq.data() + ho,
                         D, Nq * D, B);
    heads::gemm<Prec, T>(true, false, Nk, Dh, Nq, scale, dSo + po, Nk, sp, q + ho, D, Nq * D, T(0), cache.dk.data() + ho,
                         D, Nk * D, B);
  }
  heads_region.stop();
  const CV<T> dqv = cache.dq.cview(), dkv = cache.dk.cview(), dvv = cache.dv.cview();
  // Under bf16, what two or three products read is rounded once (as on the CPU, ops/attention.hpp).
  const bool x_read = !g.wk.empty() || !g.wv.empty() || (!g.wq.empty() && xq.data() == xkv.data());
  const exec::RoundedOnce<Prec, T> x16(prec, x_read ? xkv.data() : nullptr, xkv.numel());
  const exec::RoundedOnce<Prec, T> dq16(x16.prec(), !dxq.empty() && !g.wq.empty() ? dqv.data() : nullptr, dqv.numel());
  const exec::RoundedOnce<Prec, T> dk16(dq16.prec(), !dxkv.empty() && !g.wk.empty() ? dkv.data() : nullptr, dkv.numel());
  const exec::RoundedOnce<Prec, T> dv16(dk16.prec(), !dxkv.empty() && !g.wv.empty() ? dvv.data() : nullptr, dvv.numel());
  const Prec& p16 = dv16.prec();
  linear_backward<T>(xq, w.wq, dqv, V<T>{}, g.wq, g.bq, p16);
  linear_backward<T>(xkv, w.wk, dkv, V<T>{}, g.wk, g.bk, p16);
  linear_backward<T>(xkv, w.wv, dvv, V<T>{}, g.wv, g.bv, p16);
  if (!dxq.empty()) exec::gemm_as<Prec, T>(p16, false, false, B * Nq, D, D, T(1), dqv.data(), D, w.wq.data(), D, T(0), dxq.data(), D);
  if (!dxkv.empty()) {
    exec::gemm_as<Prec, T>(p16, false, false, B * Nk, D, D, T(1), dkv.data(), D, w.wk.data(), D, summed ? T(1) : T(0), dxkv.data(), D);
    exec::gemm_as<Prec, T>(p16, false, false, B * Nk, D, D, T(1), dvv.data(), D, w.wv.data(), D, T(1), dxkv.data(), D);
  }
}

template <class T, class Prec>
void self_attention_forward(const AttentionWeights<T, Space>& w, int heads, CV<T> x, CV<std::uint8_t> key_mask, V<T> y,
                            AttentionCache<T, Space>& cache, const Prec& prec) {
  attention_forward<T>(w, heads, x, x, key_mask, y, cache, prec);
}

template <class T, class Prec>
void self_attention_backward(const AttentionWeights<T, Space>& w, int heads, CV<T> x, CV<std::uint8_t> key_mask,
                             AttentionCache<T, Space>& cache, CV<T> dy, V<T> dx, const AttentionGrads<T, Space>& g, const Prec& prec) {
  attention_backward<T>(w, heads, x, x, key_mask, cache, dy, dx, dx, g, prec);
}

// ---- the map head ------------------------------------------------------------------------------------------

template <class T, class Prec>
void map_head_forward(const MapHeadWeights<T, Space>& w, int heads, GeluKind gelu, T ln_eps, CV<T> x,
                      CV<std::uint8_t> key_mask, V<T> y, MapHeadCache<T, Space>& c, const Prec& prec) {
  const auto d = chk::map_head_check<T, Space>("cuda::map_head_forward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(y, Shape{B, D}, "cuda::map_head_forward: y");
  c.size_forward(B, D, M);
  exec::launch("fill_rows (probe)", exec::grid_for(B * D), 256, kn::fill_rows<T>, w.probe.data(), B, D, c.query.data());
  attention_forward<T>(w.attn, heads, c.query.cview(), x, key_mask, c.u.view(), c.attn, prec);
  const CV<T> u = c.u.cview().reshape(Shape{B, D});
  layernorm_forward<T>(u, w.ln_g, w.ln_b, ln_eps, c.ln.view(), c.mean.view(), c.rstd.view());
  linear_forward<T>(c.ln.cview(), w.fc1_w, w.fc1_b, c.h.view(), prec);
  gelu_forward<T>(gelu, c.h.cview(), c.a.view());
  linear_forward<T>(c.a.cview(), w.fc2_w, w.fc2_b, y, prec);
  exec::launch("add (residual)", exec::grid_for(B * D), 256, kn::add<T>, u.data(), B * D, y.data());
}

template <class T, class Prec>
void map_head_backward(const MapHeadWeights<T, Space>& w, int heads, GeluKind gelu, CV<T> x, CV<std::uint8_t> key_mask,
                       MapHeadCache<T, Space>& c, CV<T> dy, V<T> dx, const MapHeadGrads<T, Space>& g, const Prec& prec) {
  const auto d = chk::map_head_check<T, Space>("cuda::map_head_backward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(dy, Shape{B, D}, "cuda::map_head_backward: dy");
  expect_shape(c.h.cview(), Shape{B, M}, "cuda::map_head_backward: cache (run map_head_forward first)");
  c.da.resize(Shape{B, M});
  c.dln.resize(Shape{B, D});
  c.du.resize(Shape{B, 1, D});
  c.dquery.resize(Shape{B, 1, D});
  linear_backward<T>(c.a.cview(), w.fc2_w, dy, c.da.view(), g.fc2_w, g.fc2_b, prec);
  gelu_backward<T>(gelu, c.h.cview(), c.da.cview(), c.da.view());  // in place: da becomes dh
  linear_backward<T>(c.ln.cview(), w.fc1_w, c.da.cview(), c.dln.view(), g.fc1_w, g.fc1_b, prec);
  const V<T> du2 = c.du.view().reshape(Shape{B, D});
  layernorm_backward<T>(c.u.cview().reshape(Shape{B, D}), w.ln_g, c.mean.cview(), c.rstd.cview(), c.dln.cview(), du2,
                        g.ln_g, g.ln_b);
  exec::launch("add (residual)", exec::grid_for(B * D), 256, kn::add<T>, dy.data(), B * D, du2.data());
  attention_backward<T>(w.attn, heads, c.query.cview(), x, key_mask, c.attn, c.du.cview(), c.dquery.view(), dx, g.attn, prec);
  if (!g.probe.empty())  // the probe is every example's query: its gradient sums over the examples
    exec::launch("add_column_sums (probe)", exec::grid_for(D, kColThreads), kColThreads, kn::add_column_sums<T>,
                 static_cast<const T*>(c.dquery.data()), B, D, D, g.probe.data());
}

// ---- the contrastive loss ----------------------------------------------------------------------------------

template <class T>
ContrastiveResult contrastive_forward(CV<T> zi, CV<T> zt, T theta, T max_scale, V<T> logits) {
  const index_t n = chk::contrastive_check<T, Space>("cuda::contrastive_forward", zi, zt, logits);
  const index_t P = zi.dim(1);
  const auto [t, clamped] = chk::contrastive_scale(theta, max_scale);
  (void)clamped;
  exec::gemm<T>(false, true, n, n, P, t, zi.data(), P, zt.data(), P, T(0), logits.data(), n);
  DTensor<double> parts(Shape{4, n}), sums(Shape{4}), csum(Shape{n});  // row loss, row hit, column loss, column hit
  DTensor<T> cmax(Shape{n});
  double* pp = parts.data();
  exec::launch("contrastive_rows", rows_grid(n), kRowThreads, kn::contrastive_rows<kRowThreads, T>,
               static_cast<const T*>(logits.data()), n, pp, pp + n);
  exec::launch("contrastive_columns", exec::grid_for(n, kColThreads), kColThreads, kn::contrastive_columns<T>,
               static_cast<const T*>(logits.data()), n, cmax.data(), csum.data(), pp + 2 * n, pp + 3 * n);
  exec::launch("sum_parts", 1, 256, kn::sum_parts<256>, static_cast<const double*>(pp), n, 4, sums.data());
  double s[4] = {0, 0, 0, 0};
  exec::to_host(s, sums.data(), 4);
  ContrastiveResult r;
  r.loss = (s[0] + s[2]) / (2.0 * static_cast<double>(n));
  r.accuracy_i2t = s[1] / static_cast<double>(n);
  r.accuracy_t2i = s[3] / static_cast<double>(n);
  r.scale = static_cast<double>(t);
  return r;
}

template <class T>
void contrastive_backward(CV<T> zi, CV<T> zt, T theta, T max_scale, CV<T> logits, T dloss, V<T> dzi, V<T> dzt,
                          T* dtheta) {
  const index_t n = chk::contrastive_check<T, Space>("cuda::contrastive_backward", zi, zt, logits);
  const index_t P = zi.dim(1);
  if (!dzi.empty()) expect_shape(dzi, zi.shape(), "cuda::contrastive_backward: dzi");
  if (!dzt.empty()) expect_shape(dzt, zt.shape(), "cuda::contrastive_backward: dzt");
  const auto [t, clamped] = chk::contrastive_scale(theta, max_scale);
  DTensor<T> cmax(Shape{n}), G(Shape{n, n});
  DTensor<double> csum(Shape{n}), theta_part(Shape{n}), theta_sum(Shape{1});
  exec::launch("contrastive_columns", exec::grid_for(n, kColThreads), kColThreads, kn::contrastive_columns<T>,
               logits.data(), n, cmax.data(), csum.data(), static_cast<double*>(nullptr), static_cast<double*>(nullptr));
  const T w = dloss / static_cast<T>(2 * n);
  exec::launch("contrastive_grad", rows_grid(n), kRowThreads, kn::contrastive_grad<kRowThreads, T>, logits.data(), n,
               static_cast<const T*>(cmax.data()), static_cast<const double*>(csum.data()), w, G.data(), theta_part.data());
  if (!dzi.empty()) exec::gemm<T>(false, false, n, P, n, t, G.data(), n, zt.data(), P, T(0), dzi.data(), P);
  if (!dzt.empty()) exec::gemm<T>(true, false, n, P, n, t, G.data(), n, zi.data(), P, T(0), dzt.data(), P);
  if (dtheta && !clamped) {
    exec::launch("sum_parts", 1, 256, kn::sum_parts<256>, static_cast<const double*>(theta_part.data()), n, 1,
                 theta_sum.data());
    double s = 0;
    exec::to_host(&s, theta_sum.data(), 1);
    *dtheta += static_cast<T>(s);
  }
}

// ---- row moves -------------------------------------------------------------------------------------------

template <class T>
void add_into(CV<T> x, V<T> y) {
  chk::add_into_check<T, Space>("cuda::add_into", x, y);
  exec::launch("add_into", exec::grid_for(x.numel()), 256, kn::add<T>, x.data(), x.numel(), y.data());
}
template <class T>
void gather_rows(CV<T> src, CV<std::int64_t> idx, V<T> dst) {
  const index_t D = chk::rows_by_index_check<T, Space>("cuda::gather_rows", src, idx, dst, true);
  const index_t n = idx.numel();
  exec::launch("gather_rows", exec::grid_for(n * D), 256, kn::gather_rows<T>, src.data(), idx.data(), n, D, dst.data());
}
template <class T>
void scatter_rows(CV<T> src, CV<std::int64_t> idx, V<T> dst) {
  const index_t D = chk::rows_by_index_check<T, Space>("cuda::scatter_rows", src, idx, dst, false);
  const index_t n = idx.numel();
  exec::launch("scatter_rows", exec::grid_for(n * D), 256, kn::scatter_rows<T>, src.data(), idx.data(), n, D, dst.data());
}
// Not inline, like make_dispatch_plan: one translation unit per program compiles the backend.
void to_bf16(CV<float> x, V<std::uint16_t> y) {
  chk::to_bf16_check<Space>("cuda::to_bf16", x, y);
  exec::launch("to_bf16_block", exec::grid_for(x.numel()), 256, kn::to_bf16_block<float>, x.data(), x.numel(),
               index_t(1), index_t(1), y.data());
}

// ---- the optimizer -------------------------------------------------------------------------------------------

// One AdamW step over flat buffers (train/optimizer.hpp's AdamW::update): the global gradient norm in double
// (partial sums per block, then one block, fixed order), the clip factor and the step's constants from
// math::adamw_clip / adamw_step on the host, then math::adamw_element per parameter. Returns the norm before
// clipping; a norm that is not finite is an error and leaves w, m and v untouched.
template <class T>
void adamw_apply(const AdamWConfig& cfg, std::int64_t step, double lr, double norm, CV<T> g, CV<std::uint8_t> decay,
                 V<T> w, V<T> m, V<T> v);

// The sum of x's squares in double: partial sums per block over fixed grid-stride shares, then one block,
// each in a fixed tree (no atomics: the same bits every run).
template <class T>
double sum_squares(CV<T> x) {
  const index_t n = x.numel();
  constexpr int kThreads = 256;
  const index_t blocks = std::max<index_t>(1, std::min<index_t>(1024, (n + kThreads - 1) / kThreads));
  DTensor<double> partial(Shape{blocks}), sum(Shape{1});
  exec::launch("sum_squares_partial", dim3(static_cast<unsigned>(blocks)), kThreads,
               kn::sum_squares_partial<kThreads, T>, x.data(), n, partial.data());
  exec::launch("sum_squares_final", 1, kThreads, kn::sum_squares_final<kThreads>,
               static_cast<const double*>(partial.data()), static_cast<int>(blocks), sum.data());
  double sq = 0;
  exec::to_host(&sq, sum.data(), 1);
  return sq;
}

template <class T>
double adamw_update(const AdamWConfig& cfg, std::int64_t step, double lr, CV<T> g, CV<std::uint8_t> decay, V<T> w,
                    V<T> m, V<T> v) {
  const index_t n = g.numel();
  LIMOE_CHECK(decay.numel() == n && w.numel() == n && m.numel() == n && v.numel() == n,
              "cuda::adamw_update: g, decay, w, m and v must have the same size (", n, ", ", decay.numel(), ", ",
              w.numel(), ", ", m.numel(), ", ", v.numel(), ")");
  LIMOE_CHECK(step >= 1, "cuda::adamw_update: step counts from 1, got ", step);
  using std::sqrt;
  const double norm = sqrt(sum_squares<T>(g));
  adamw_apply<T>(cfg, step, lr, norm, g, decay, w, m, v);
  return norm;
}

// The update with the gradient norm given (the caller summed it: a model holding a shard, whose norm is the
// whole model's over the ranks): adamw_update without its own sum. A norm that is not finite is an error and
// leaves w, m and v untouched.
template <class T>
void adamw_apply(const AdamWConfig& cfg, std::int64_t step, double lr, double norm, CV<T> g, CV<std::uint8_t> decay,
                 V<T> w, V<T> m, V<T> v) {
  const index_t n = g.numel();
  LIMOE_CHECK(decay.numel() == n && w.numel() == n && m.numel() == n && v.numel() == n,
              "cuda::adamw_apply: g, decay, w, m and v must have the same size (", n, ", ", decay.numel(), ", ",
              w.numel(), ", ", m.numel(), ", ", v.numel(), ")");
  LIMOE_CHECK(step >= 1, "cuda::adamw_apply: step counts from 1, got ", step);
  LIMOE_CHECK(std::isfinite(norm), "cuda::adamw_update: the gradient is not finite (norm ", norm,
              "); lower the learning rate or enable clipping");
  const auto st = math::adamw_step<T>(cfg, step, lr, math::adamw_clip(norm, cfg.clip_norm));
  exec::launch("adamw_update", exec::grid_for(n), 256, kn::adamw_update<T>, st, decay.data(), g.data(), n, w.data(),
               m.data(), v.data());
}

}  // namespace limoe::cuda::ops
