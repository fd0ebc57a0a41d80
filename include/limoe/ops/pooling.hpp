// limoe/ops/pooling.hpp: the per-modality pooling heads, tokens x[B, N, D] -> y[B, D] (semantics §1).
//
//   gap    mean over tokens; with a key mask, the mean over unmasked tokens (a row with none gives 0)
//   first  token 0 (the mask is ignored)
//   last   the final position N-1 (semantics §1: the EOS under "sticky EOS" padding); with a key mask
//          (text_mask on: pad tokens masked), the last unmasked position, i.e. the EOS of limoe's tokenizer,
//          which pads after the EOS (a row with none falls back to N-1)
//   map    multi-head attention pooling (big_vision's MAPHead): a learned probe[D] is the single query of the
//          attention of ops/attention.hpp over the tokens (H heads, masked keys ignored), giving u[B, D];
//          then y = u + MLP(LN(u)), MLP = Linear(D->M) -> GELU -> Linear(M->D). Tensor names (docs/cli.md):
//          `{img,txt}.head.probe`, `.head.attn.{q,k,v,o}.*`, `.head.ln.*`, `.head.mlp.fc1.*`, `.head.mlp.fc2.*`.
//
// gap/first/last: cpu::pool_forward / pool_backward. map needs weights: cpu::map_head_forward / backward.
// Gradient rule (docs/conventions.md): dx overwritten, parameter gradients (probe included) accumulated, empty
// views skipped.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "limoe/core/enums.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"
#include "limoe/ops/attention.hpp"
#include "limoe/ops/gelu.hpp"
#include "limoe/ops/layernorm.hpp"
#include "limoe/ops/linear.hpp"

namespace limoe {

namespace cpu {

// y[B, D] = gap / first / last of x[B, N, D]; key_mask [B, N] (nonzero = token counts) or empty, used by gap
// and last.
template <class T>
void pool_forward(Pooling kind, CView<T> x, CView<std::uint8_t> key_mask, View<T> y) {
  detail::pool_check<T>("pool_forward", kind, x, key_mask, y);
  const index_t B = x.dim(0), N = x.dim(1), D = x.dim(2);
  parallel_for(0, B, std::max<index_t>(1, 8192 / std::max<index_t>(1, N * D)), [&](index_t b0, index_t b1) {
    for (index_t b = b0; b < b1; ++b) {
      T* yr = y.data() + b * D;
      const T* xb = x.data() + b * N * D;
      if (kind == Pooling::First || kind == Pooling::Last) {
        const T* src = xb + (kind == Pooling::First ? 0 : detail::last_position(key_mask, b, N)) * D;
        std::copy(src, src + D, yr);
        continue;
      }
      std::fill(yr, yr + D, T(0));
      const index_t count = detail::pool_count(key_mask, b, N);
      if (count == 0) continue;  // no token: 0, not NaN
      for (index_t n = 0; n < N; ++n) {
        if (!key_mask.empty() && !key_mask[b * N + n]) continue;
        for (index_t c = 0; c < D; ++c) yr[c] += xb[n * D + c];
      }
      const T inv = T(1) / T(count);
      for (index_t c = 0; c < D; ++c) yr[c] *= inv;
    }
  });
}

// dx[B, N, D] (overwritten) from dy[B, D]; same kind and mask as the forward.
template <class T>
void pool_backward(Pooling kind, CView<std::uint8_t> key_mask, CView<T> dy, View<T> dx) {
  detail::pool_check<T>("pool_backward", kind, dx, key_mask, dy);
  const index_t B = dx.dim(0), N = dx.dim(1), D = dx.dim(2);
  parallel_for(0, B, std::max<index_t>(1, 8192 / std::max<index_t>(1, N * D)), [&](index_t b0, index_t b1) {
    for (index_t b = b0; b < b1; ++b) {
      const T* g = dy.data() + b * D;
      T* xb = dx.data() + b * N * D;
      std::fill(xb, xb + N * D, T(0));
      if (kind == Pooling::First || kind == Pooling::Last) {
        T* dst = xb + (kind == Pooling::First ? 0 : detail::last_position(key_mask, b, N)) * D;
        std::copy(g, g + D, dst);
        continue;
      }
      const index_t count = detail::pool_count(key_mask, b, N);
      if (count == 0) continue;
      const T inv = T(1) / T(count);
      for (index_t n = 0; n < N; ++n) {
        if (!key_mask.empty() && !key_mask[b * N + n]) continue;
        for (index_t c = 0; c < D; ++c) xb[n * D + c] = g[c] * inv;
      }
    }
  });
}

}  // namespace cpu

namespace detail {
// The `map` head's attention when no backward follows (MapHeadCache::inference): u[B, D] for the one query q =
// probe Wq^T + bq that every example shares, with the same scores, softmax and output as attention_forward, in
// another order of sums. Per head h (columns c of h):
//   q_h . k_hj = x_j . a_h + q_h . bk_h,         a_h = sum_c q_c Wk[c, :]            (scores: [B N, D] x [D, H])
//   (q_h . bk_h is the same for every key j, so the softmax drops it)
//   ctx_hc    = sum_j P_hj (x_j . Wv[c, :] + bv_c) = z_h . Wv[c, :] + (sum_j P_hj) bv_c,   z_h = sum_j P_hj x_j
// so the tokens are read by products H rows tall, where attention_forward projects each of the B N tokens to
// k and v (4 B N D^2 multiply-adds: the most of the head's work). Products in fp32 under every policy (they are
// small); the attention's own per-head work is unchanged: the same masked, scaled softmax (softmax_rows_vec).
template <class T>
void map_attention_folded(const AttentionWeights<T>& w, int heads, CView<T> probe, CView<T> x,
                          CView<std::uint8_t> key_mask, View<T> u, MapHeadCache<T>& cache) {
  const index_t B = x.dim(0), N = x.dim(1), D = x.dim(2), H = heads, Dh = D / H;
  const AttentionDims dims{B, 1, N, D, H, Dh};
  const T scale = attention_scale<T>(dims);
  cache.fold.resize(Shape{H + 1, D});  // rows 0..H-1: a_h; row H: q
  cache.mixed.resize(Shape{B, H, D});
  T* a = cache.fold.data();
  T* q = a + H * D;
  // q = probe Wq^T + bq (one row), then a_h.
  gemm_serial<T>(Trans::N, Trans::T, 1, D, D, T(1), probe.data(), D, w.wq.data(), D, T(0), q, D);
  for (index_t c = 0; c < D; ++c) q[c] += w.bq.empty() ? T(0) : w.bq[c];
  for (index_t h = 0; h < H; ++h)
    gemm_serial<T>(Trans::N, Trans::N, 1, D, Dh, T(1), q + h * Dh, Dh, w.wk.data() + h * Dh * D, D, T(0), a + h * D, D);
  // Per example: the raw scores P [H, N] = a x_b^T (gemm_nt_narrow: per-row dot products), the masked, scaled
  // softmax, z_h = P_h x_b, and the sums of P (1, or 0 where every key is masked). P is each thread's own scratch,
  // so an example's rows lie at another alignment depending on the thread that takes it: every step here gives
  // bits that depend on the values only (softmax_rows_vec's row sum included), or two evaluation forwards differ.
  std::vector<T> psum(static_cast<std::size_t>(B * H));
  parallel_for(0, B, 1, [&](index_t b0, index_t b1) {
    thread_local std::vector<T> P;
    P.resize(static_cast<std::size_t>(H * N));
    for (index_t b = b0; b < b1; ++b) {
      gemm_nt_narrow<T>(H, N, D, a, D, x.data() + b * N * D, D, P.data(), N);
      softmax_rows_vec(P.data(), P.data(), H, N, scale, key_mask.empty() ? nullptr : key_mask.data() + b * N);
      for (index_t h = 0; h < H; ++h) {
        T sum = T(0);
        for (index_t j = 0; j < N; ++j) sum += P[static_cast<std::size_t>(h * N + j)];
        psum[static_cast<std::size_t>(b * H + h)] = sum;
      }
      gemm_serial<T>(Trans::N, Trans::N, H, D, N, T(1), P.data(), N, x.data() + b * N * D, D, T(0),
                     cache.mixed.data() + b * H * D, D);
    }
  });
  // ctx[b, head h's columns] = z_bh Wv_h^T + (sum P) bv_h, head by head over all examples; u = ctx Wo^T + bo.
  T* ctx = cache.attn.ctx.data();
  parallel_for(0, H, 1, [&](index_t h0, index_t h1) {
    for (index_t h = h0; h < h1; ++h) {
      gemm_serial<T>(Trans::N, Trans::T, B, Dh, D, T(1), cache.mixed.data() + h * D, H * D, w.wv.data() + h * Dh * D,
                     D, T(0), ctx + h * Dh, D);
      if (!w.bv.empty())
        for (index_t b = 0; b < B; ++b)
          for (index_t e = 0; e < Dh; ++e)
            ctx[b * D + h * Dh + e] += psum[static_cast<std::size_t>(b * H + h)] * w.bv[h * Dh + e];
    }
  });
  cpu::linear_forward<T>(CView<T>(ctx, Shape{B, D}), w.wo, w.bo, u);
}
}  // namespace detail

namespace cpu {

// `map` head forward: y[B, D] from tokens x[B, N, D] (key_mask [B, N] or empty); fills `cache` (with
// cache.inference, only what y needs: detail::map_attention_folded).
template <class T, PrecisionPolicy Prec = Fp32>
void map_head_forward(const MapHeadWeights<T>& w, int heads, GeluKind gelu, T ln_eps, CView<T> x,
                      CView<std::uint8_t> key_mask, View<T> y, MapHeadCache<T>& cache, const Prec& prec = {}) {
  const auto d = detail::map_head_check<T>("map_head_forward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(y, Shape{B, D}, "map_head_forward: y");
  if (cache.inference) {
    // (the query's shape: one row per example, as the standard path repeats the probe)
    detail::attention_check<T>("map_head_forward", w.attn, heads, CView<T>(x.data(), Shape{B, 1, D}), x, key_mask);
    cache.size_forward(B, D, M);
    cache.attn.ctx.resize(Shape{B, 1, D});
    cache.attn.drop_bf16_copies();
    detail::map_attention_folded<T>(w.attn, heads, w.probe, x, key_mask, cache.u.view().reshape(Shape{B, D}), cache);
  } else {
    cache.start_forward(w.probe, B, D, M);
    cpu::attention_forward<T>(w.attn, heads, cache.query.cview(), x, key_mask, cache.u.view(), cache.attn, prec);
  }
  const CView<T> u = cache.u.cview().reshape(Shape{B, D});  // [B, D]
  cpu::layernorm_forward<T>(u, w.ln_g, w.ln_b, ln_eps, cache.ln.view(), cache.mean.view(), cache.rstd.view());
  cpu::linear_forward<T>(cache.ln.cview(), w.fc1_w, w.fc1_b, cache.h.view(), prec);
  cpu::gelu_forward<T>(gelu, cache.h.cview(), cache.a.view());
  cpu::linear_forward<T>(cache.a.cview(), w.fc2_w, w.fc2_b, y, prec);
  // Residual: y = u + MLP(LN(u)).
  for (index_t i = 0; i < B * D; ++i) y[i] += u[i];
}

// `map` head backward: dx[B, N, D] (overwritten, skipped when empty), parameter gradients accumulated.
template <class T, PrecisionPolicy Prec = Fp32>
void map_head_backward(const MapHeadWeights<T>& w, int heads, GeluKind gelu, CView<T> x,
                       CView<std::uint8_t> key_mask, MapHeadCache<T>& cache, CView<T> dy, View<T> dx,
                       const MapHeadGrads<T>& g, const Prec& prec = {}) {
  const auto d = detail::map_head_check<T>("map_head_backward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(dy, Shape{B, D}, "map_head_backward: dy");
  LIMOE_CHECK(!cache.inference, "map_head_backward: the cache was filled by an inference forward "
              "(MapHeadCache::inference), which keeps nothing for a backward pass; run the forward with it false");
  LIMOE_CHECK(cache.h.shape() == (Shape{B, M}) && cache.u.shape() == (Shape{B, 1, D}),
              "map_head_backward: the cache holds h ", cache.h.shape().str(), " and u ", cache.u.shape().str(),
              ", expected [", B, ", ", M, "] and [", B, ", 1, ", D, "]; run map_head_forward with these inputs first");
  if (!g.probe.empty()) expect_shape(g.probe, Shape{D}, "map_head_backward: probe gradient");
  cache.da.resize(Shape{B, M});         // [B, M]
  cache.dln.resize(Shape{B, D});        // [B, D]
  cache.du.resize(Shape{B, 1, D});      // [B, 1, D]
  cache.dquery.resize(Shape{B, 1, D});  // [B, 1, D]
  const CView<T> u = cache.u.cview().reshape(Shape{B, D});  // [B, D]
  cpu::linear_backward<T>(cache.a.cview(), w.fc2_w, dy, cache.da.view(), g.fc2_w, g.fc2_b, prec);
  cpu::gelu_backward<T>(gelu, cache.h.cview(), cache.da.cview(), cache.da.view());  // in place: da -> dh
  cpu::linear_backward<T>(cache.ln.cview(), w.fc1_w, cache.da.cview(), cache.dln.view(), g.fc1_w, g.fc1_b, prec);
  const View<T> du = cache.du.view().reshape(Shape{B, D});  // [B, D]
  cpu::layernorm_backward<T>(u, w.ln_g, cache.mean.cview(), cache.rstd.cview(), cache.dln.cview(), du, g.ln_g,
                             g.ln_b);
  for (index_t i = 0; i < B * D; ++i) du[i] += dy[i];  // the residual path
  const View<T> dq = g.probe.empty() ? View<T>{} : cache.dquery.view();
  cpu::attention_backward<T>(w.attn, heads, cache.query.cview(), x, key_mask, cache.attn, cache.du.cview(), dq, dx,
                             g.attn, prec);
  // The probe is shared by every example: its gradient is the sum over the batch.
  if (!g.probe.empty()) detail::add_column_sums(cache.dquery.data(), B, D, g.probe.data());
}

}  // namespace cpu

namespace ref {

// Naive loops: gap / first / last, the reference for cpu::pool_forward.
template <class T>
void pool_forward(Pooling kind, CView<T> x, CView<std::uint8_t> key_mask, View<T> y) {
  detail::pool_check<T>("ref::pool_forward", kind, x, key_mask, y);
  const index_t B = x.dim(0), N = x.dim(1), D = x.dim(2);
  for (index_t b = 0; b < B; ++b)
    for (index_t c = 0; c < D; ++c) {
      T acc = 0;
      index_t count = 0;
      for (index_t n = 0; n < N; ++n) {
        const bool on = key_mask.empty() || key_mask[b * N + n];
        const bool take = kind == Pooling::Gap ? on
                          : kind == Pooling::First ? n == 0
                                                   : n == detail::last_position(key_mask, b, N);
        if (take) acc += x[(b * N + n) * D + c], ++count;
      }
      y[b * D + c] = kind == Pooling::Gap ? (count ? acc / T(count) : T(0)) : acc;
    }
}

template <class T>
void pool_backward(Pooling kind, CView<std::uint8_t> key_mask, CView<T> dy, View<T> dx) {
  detail::pool_check<T>("ref::pool_backward", kind, dx, key_mask, dy);
  const index_t B = dx.dim(0), N = dx.dim(1), D = dx.dim(2);
  for (index_t b = 0; b < B; ++b) {
    const index_t count = detail::pool_count(key_mask, b, N);
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < D; ++c) {
        const bool on = key_mask.empty() || key_mask[b * N + n];
        T g = 0;
        if (kind == Pooling::Gap && on && count) g = dy[b * D + c] / T(count);
        if (kind == Pooling::First && n == 0) g = dy[b * D + c];
        if (kind == Pooling::Last && n == detail::last_position(key_mask, b, N)) g = dy[b * D + c];
        dx[(b * N + n) * D + c] = g;
      }
  }
}

// Naive composition of the reference ops: the `map` head, forward and backward, with the cpu:: signatures.
template <class T, PrecisionPolicy Prec = Fp32>
void map_head_forward(const MapHeadWeights<T>& w, int heads, GeluKind gelu, T ln_eps, CView<T> x,
                      CView<std::uint8_t> key_mask, View<T> y, MapHeadCache<T>& c, const Prec& prec = {}) {
  const auto d = detail::map_head_check<T>("ref::map_head_forward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(y, Shape{B, D}, "ref::map_head_forward: y");
  c.start_forward(w.probe, B, D, M);
  ref::attention_forward<T>(w.attn, heads, c.query.cview(), x, key_mask, c.u.view(), c.attn, prec);
  const CView<T> u = c.u.cview().reshape(Shape{B, D});  // [B, D]
  ref::layernorm_forward<T>(u, w.ln_g, w.ln_b, ln_eps, c.ln.view(), c.mean.view(), c.rstd.view());
  ref::linear_forward<T>(c.ln.cview(), w.fc1_w, w.fc1_b, c.h.view(), prec);
  ref::gelu_forward<T>(gelu, c.h.cview(), c.a.view());
  ref::linear_forward<T>(c.a.cview(), w.fc2_w, w.fc2_b, y, prec);
  for (index_t i = 0; i < B * D; ++i) y[i] += u[i];
}

template <class T>
void map_head_forward(const MapHeadWeights<T>& w, int heads, GeluKind gelu, T ln_eps, CView<T> x,
                      CView<std::uint8_t> key_mask, View<T> y) {
  MapHeadCache<T> cache;
  ref::map_head_forward<T>(w, heads, gelu, ln_eps, x, key_mask, y, cache);
}

template <class T, PrecisionPolicy Prec = Fp32>
void map_head_backward(const MapHeadWeights<T>& w, int heads, GeluKind gelu, CView<T> x,
                       CView<std::uint8_t> key_mask, MapHeadCache<T>& c, CView<T> dy, View<T> dx,
                       const MapHeadGrads<T>& g, const Prec& prec = {}) {
  const auto d = detail::map_head_check<T>("ref::map_head_backward", w, x);
  const index_t B = d.B, D = d.D, M = d.M;
  expect_shape(dy, Shape{B, D}, "ref::map_head_backward: dy");
  expect_shape(c.h.cview(), Shape{B, M}, "ref::map_head_backward: cache (run map_head_forward first)");
  Tensor<T> da(Shape{B, M}), dh(Shape{B, M}), dln(Shape{B, D}), du(Shape{B, 1, D}), dq(Shape{B, 1, D});
  ref::linear_backward<T>(c.a.cview(), w.fc2_w, dy, da.view(), g.fc2_w, g.fc2_b, prec);
  ref::gelu_backward<T>(gelu, c.h.cview(), da.cview(), dh.view());
  ref::linear_backward<T>(c.ln.cview(), w.fc1_w, dh.cview(), dln.view(), g.fc1_w, g.fc1_b, prec);
  const View<T> du2 = du.view().reshape(Shape{B, D});
  ref::layernorm_backward<T>(c.u.cview().reshape(Shape{B, D}), w.ln_g, c.mean.cview(), c.rstd.cview(),
                             dln.cview(), du2, g.ln_g, g.ln_b);
  for (index_t i = 0; i < B * D; ++i) du2[i] += dy[i];  // residual
  ref::attention_backward<T>(w.attn, heads, c.query.cview(), x, key_mask, c.attn, du.cview(), dq.view(), dx, g.attn, prec);
  if (!g.probe.empty())
    for (index_t b = 0; b < B; ++b)
      for (index_t k = 0; k < D; ++k) g.probe[k] += dq[b * D + k];
}

}  // namespace ref
}  // namespace limoe
