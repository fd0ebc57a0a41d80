// limoe/ops/attention.hpp: multi-head scaled dot-product attention with q/k/v/o projections (docs/semantics.md
// section 1: `x = x + Attn(LN1(x))` in every block, and the cross-attention of the `map` pooling head).
//
//   q = xq Wq^T + bq    [B, Nq, D]        k = xkv Wk^T + bk    [B, Nk, D]        v = xkv Wv^T + bv    [B, Nk, D]
//   head h uses columns h*Dh .. (h+1)*Dh of q, k, v (Dh = D / H), i.e. rows h*Dh .. (h+1)*Dh of Wq, Wk, Wv
//   (docs/cli.md), and the same columns of the concatenated context:
//   P_h = softmax(q_h k_h^T / sqrt(Dh)) over unmasked keys    ctx_h = P_h v_h    y = ctx Wo^T + bo
//
// Key mask: [B, Nk] of uint8, nonzero = attend, 0 = masked (an empty view attends to every key). A query
// whose keys are all masked gets probabilities 0 and a zero context (so y = bo there), never NaN.
//
// Threading: the four projections are one product each over all B*N rows (limoe::gemm, threaded); the
// per-(image, head) score, softmax and context products are single-threaded (gemm_serial) inside one
// parallel_for over the B*H pairs. Each pair writes disjoint memory, so results do not depend on the thread
// count.
//
// Self-attention: call self_attention_forward/backward, or pass the same x for xq and xkv and the SAME view
// (same data pointer) for dxq and dxkv: the backward then writes dxq + dxkv into it. Partially overlapping
// dxq/dxkv views are not supported.
//
// Gradient rule (docs/conventions.md): parameter gradients accumulate, dxq/dxkv are overwritten, empty views
// are skipped.
//
// Precision (core/precision.hpp): the policy (last argument) applies to the four projections and to the per-head
// score and context products, forward and backward (under Bf16Mixed: q, k, v, the probabilities, dctx and the
// score gradients read as bf16, fp32 accumulation); the softmax, its backward and the stored activations stay
// fp32. Under Bf16Mixed the CPU runs the heads of an image, forward, on a kernel of limoe's own where the
// processor has one (AMX tiles, core/amx.hpp; AVX-512 BF16, core/dpbf16.hpp), else as one batched bf16 product
// (oneDNN), images over the thread pool; under Fp32 the heads of an image, forward and backward, on AVX-512's
// fp32 kernel (core/fma512.hpp) where the processor has it, images over the thread pool, else one pair per job
// as above.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "limoe/core/dpbf16.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/fma512.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/gemm_mixed.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/profile.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"
#include "limoe/math/softmax.hpp"
#include "limoe/ops/linear.hpp"
#include "limoe/ops/softmax.hpp"

namespace limoe {

namespace detail {

// The per-head work under Fp32: one (image, head) pair per job, single-threaded products (gemm_serial).
template <class T>
void attention_heads_forward_fp32(const AttentionDims& d, CView<std::uint8_t> key_mask, AttentionCache<T>& cache) {
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  const T scale = detail::attention_scale<T>(d);
  const T* q = cache.q.data();
  const T* k = cache.k.data();
  const T* v = cache.v.data();
  T* probs = cache.probs.data();
  T* ctx = cache.ctx.data();
  profile::Region<HostSpace> heads_region("heads");  // the per-head products and softmax (core/profile.hpp)
  if constexpr (std::is_same_v<T, float>) {
    if (fma512::available()) {
      // AVX-512's kernel (core/fma512.hpp), per image: its keys transposed once for all heads (row h Dh + j of
      // kT is column j of head h's keys), every head's raw scores, the softmax of the image's rows in one pass,
      // then every head's context with the values read in place.
      parallel_for(0, B, 1, [&](index_t b0, index_t b1) {
        thread_local std::vector<float> kT;  // [D, Nkp]
        for (index_t b = b0; b < b1; ++b) {
          const T* qb = q + b * Nq * D;
          T* P = probs + b * H * Nq * Nk;  // [H, Nq, Nk]
          const index_t Nkp = fma512::transpose(kT, k + b * Nk * D, Nk, D, D);
          for (index_t h = 0; h < H; ++h)
            fma512::gemm(Nq, Nk, Dh, qb + h * Dh, D, kT.data() + h * Dh * Nkp, Nkp, P + h * Nq * Nk, Nk);
          detail::softmax_rows_vec(P, P, H * Nq, Nk, scale, key_mask.empty() ? nullptr : key_mask.data() + b * Nk);
          for (index_t h = 0; h < H; ++h)
            fma512::gemm(Nq, Dh, Nk, P + h * Nq * Nk, Nk, v + b * Nk * D + h * Dh, D, ctx + b * Nq * D + h * Dh, D);
        }
      });
      return;
    }
  }
  parallel_for(0, B * H, 1, [&](index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
      const index_t b = p / H, h = p % H;
      const T* qh = q + b * Nq * D + h * Dh;  // [Nq, Dh] with leading dimension D
      const T* kh = k + b * Nk * D + h * Dh;  // [Nk, Dh]
      const T* vh = v + b * Nk * D + h * Dh;  // [Nk, Dh]
      T* P = probs + p * Nq * Nk;             // [Nq, Nk]
      T* ch = ctx + b * Nq * D + h * Dh;      // [Nq, Dh]
      const std::uint8_t* m = key_mask.empty() ? nullptr : key_mask.data() + b * Nk;
      gemm_serial<T>(Trans::N, Trans::T, Nq, Nk, Dh, T(1), qh, D, kh, D, T(0), P, Nk);  // raw scores
      detail::softmax_rows_vec(P, P, Nq, Nk, scale, m);  // masked, scaled, in place
      gemm_serial<T>(Trans::N, Trans::N, Nq, Dh, Nk, T(1), P, Nk, vh, D, T(0), ch, D);
    }
  });
}

// Fills cache.dq, dk, dv from cache.dctx (sized by the caller) under Fp32. Per (image, head), in chunks that each
// own one [Nq, Nk] scratch block; the chunking only decides which scratch a pair uses, never what it computes.
template <class T>
void attention_heads_backward_fp32(const AttentionDims& d, AttentionCache<T>& cache) {
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  const T scale = detail::attention_scale<T>(d);
  const T* q = cache.q.data();
  const T* k = cache.k.data();
  const T* v = cache.v.data();
  const T* probs = cache.probs.data();
  const T* dctx = cache.dctx.data();
  T* dq = cache.dq.data();
  T* dk = cache.dk.data();
  T* dv = cache.dv.data();
  profile::Region<HostSpace> heads_region("heads");
  if constexpr (std::is_same_v<T, float>) {
    if (fma512::available()) {
      // AVX-512's kernel (core/fma512.hpp), per image: its values transposed once for all heads; per head, the
      // probabilities and the scaled score gradient transposed for the products that read them as A^T. The
      // scale is applied to dS once (dq = (scale dS) k_h, dk = (scale dS)^T q_h).
      parallel_for(0, B, 1, [&](index_t b0, index_t b1) {
        thread_local std::vector<float> vT, PT, dST, dSb;  // [D, Nkp], [Nk, Nqp], [Nk, Nqp], [Nq, Nk]
        dSb.resize(static_cast<std::size_t>(Nq * Nk));
        float* dS = dSb.data();
        for (index_t b = b0; b < b1; ++b) {
          const index_t Nkp = fma512::transpose(vT, v + b * Nk * D, Nk, D, D);
          for (index_t h = 0; h < H; ++h) {
            const index_t qo = b * Nq * D + h * Dh, ko = b * Nk * D + h * Dh;
            const T* P = probs + (b * H + h) * Nq * Nk;  // [Nq, Nk]
            // dv_h = P^T dctx_h; dP = dctx_h v_h^T.
            const index_t Nqp = fma512::transpose(PT, P, Nq, Nk, Nk);
            fma512::gemm(Nk, Dh, Nq, PT.data(), Nqp, dctx + qo, D, dv + ko, D);
            fma512::gemm(Nq, Nk, Dh, dctx + qo, D, vT.data() + h * Dh * Nkp, Nkp, dS, Nk);
            // Softmax backward (in place on dP; masked keys have P = 0, so dS = 0 there), then the scale.
            for (index_t i = 0; i < Nq; ++i) {
              math::softmax_row_backward(P + i * Nk, dS + i * Nk, Nk, dS + i * Nk);
              for (index_t j = 0; j < Nk; ++j) dS[i * Nk + j] *= scale;
            }
            fma512::gemm(Nq, Dh, Nk, dS, Nk, k + ko, D, dq + qo, D);
            fma512::transpose(dST, dS, Nq, Nk, Nk);
            fma512::gemm(Nk, Dh, Nq, dST.data(), Nqp, q + qo, D, dk + ko, D);
          }
        }
      });
      return;
    }
  }
  const index_t pairs = B * H;
  const index_t chunks = std::max<index_t>(1, std::min<index_t>(pairs, 4 * index_t(std::max(1, num_threads()))));
  cache.dscores.resize(Shape{chunks, Nq, Nk});  // [chunks, Nq, Nk]
  T* scratch = cache.dscores.data();
  parallel_for(0, chunks, 1, [&](index_t c0, index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      T* dS = scratch + c * Nq * Nk;  // [Nq, Nk]
      for (index_t p = c * pairs / chunks; p < (c + 1) * pairs / chunks; ++p) {
        const index_t b = p / H, h = p % H;
        const index_t qo = b * Nq * D + h * Dh, ko = b * Nk * D + h * Dh;
        const T* P = probs + p * Nq * Nk;  // [Nq, Nk]
        // dv_h = P^T dctx_h; dP = dctx_h v_h^T.
        gemm_serial<T>(Trans::T, Trans::N, Nk, Dh, Nq, T(1), P, Nk, dctx + qo, D, T(0), dv + ko, D);
        gemm_serial<T>(Trans::N, Trans::T, Nq, Nk, Dh, T(1), dctx + qo, D, v + ko, D, T(0), dS, Nk);
        // Softmax backward (in place on dP); masked keys have P = 0, so dS = 0 there.
        for (index_t i = 0; i < Nq; ++i) math::softmax_row_backward(P + i * Nk, dS + i * Nk, Nk, dS + i * Nk);
        // Scores are scale * q_h k_h^T: dq_h = scale dS k_h, dk_h = scale dS^T q_h.
        gemm_serial<T>(Trans::N, Trans::N, Nq, Dh, Nk, scale, dS, Nk, k + ko, D, T(0), dq + qo, D);
        gemm_serial<T>(Trans::T, Trans::N, Nk, Dh, Nq, scale, dS, Nk, q + qo, D, T(0), dk + ko, D);
      }
    }
  });
}

// The kernels of limoe's own that attention_heads_forward_packed runs a head's two products on, over operands
// packed per head: the AMX tile kernel (core/amx.hpp, head widths a multiple of 32) and AVX-512 BF16's dot
// products (core/dpbf16.hpp, a multiple of 16). Each gives
//   image(Nq, Nk, H, Dh, q, k, v, ld)   the image's q [Nq, H Dh], k, v [Nk, H Dh] (rows of ld), once per image
//   scores(h, P)                        P [Nq, Nk] = q_h k_h^T (raw scores)
//   context(h, P16, ctx, ld)            ctx_h (rows of ld) = P16 [Nq, Nk] v_h
// and pads the keys with zeros as its layout wants (AMX: to whole 32 x 32 tiles; AVX-512: the scores to whole
// vectors, the contexts' keys to a whole pair).
struct HeadOperands {
  index_t Nq = 0, Nk = 0, Dh = 0, ld = 0;
  const bf16_bits *q = nullptr, *k = nullptr, *v = nullptr;
};
// A head's probabilities P16 [Nq, Nk] copied into out as rows of Kp >= Nk, the columns from Nk on zero (the
// padded keys of both kernels' context products).
inline void padded_rows(const bf16_bits* P16, index_t Nq, index_t Nk, index_t Kp, bf16_bits* out) {
  for (index_t i = 0; i < Nq; ++i) {
    std::copy(P16 + i * Nk, P16 + (i + 1) * Nk, out + i * Kp);
    std::fill(out + i * Kp + Nk, out + (i + 1) * Kp, bf16_bits{0});
  }
}
struct AmxHeads {
  HeadOperands o;
  amx::PackedB kp, vp;
  Tensor<float> S;        // a head's raw scores [Nq, Np] (Tensor storage is 64-byte aligned, as tiles want)
  Tensor<bf16_bits> p16;  // its probabilities, zero-padded [Nq, Np]
  void image(index_t Nq, index_t Nk, index_t /*H*/, index_t Dh, const bf16_bits* q, const bf16_bits* k,
             const bf16_bits* v, index_t ld) {
    o = {Nq, Nk, Dh, ld, q, k, v};
  }
  void scores(index_t h, float* P) {
    const index_t Np = (o.Nk + 31) / 32 * 32;
    S.resize(Shape{o.Nq, Np});
    amx::pack_into(kp, o.k + h * o.Dh, Np, o.Dh, o.ld, o.Nk);
    amx::gemm(o.Nq, Np, o.Dh, o.q + h * o.Dh, o.ld, kp, S.data(), Np);
    for (index_t i = 0; i < o.Nq; ++i) std::copy(S.data() + i * Np, S.data() + i * Np + o.Nk, P + i * o.Nk);
  }
  void context(index_t h, const bf16_bits* P16, float* ctx, index_t ldc) {
    const index_t Nq = o.Nq, Nk = o.Nk, Np = (Nk + 31) / 32 * 32;
    p16.resize(Shape{Nq, Np});
    padded_rows(P16, Nq, Nk, Np, p16.data());
    amx::pack_rows_into(vp, o.v + h * o.Dh, Np, o.Dh, o.ld, Nk);
    amx::gemm(Nq, o.Dh, Np, p16.data(), Np, vp, ctx, ldc);
  }
};
// Every head of an image packed up front, and q's head slices copied to one block each: a head's slices lie
// 2 Dh bytes wide in rows of 2 D, and read head by head they came from memory at the latency of a strided walk
// (a B/32 forward's scores took twice as long as the same products over operands in cache).
struct DpHeads {
  HeadOperands o;
  std::vector<dpbf16::Packed> kp, vp;  // [H]
  std::vector<bf16_bits> qh;           // [H, Nq, Dh]
  std::vector<bf16_bits> p16;          // a head's probabilities, each row padded to a whole pair
  void image(index_t Nq, index_t Nk, index_t H, index_t Dh, const bf16_bits* q, const bf16_bits* k,
             const bf16_bits* v, index_t ld) {
    o = {Nq, Nk, Dh, ld, q, k, v};
    kp.resize(static_cast<std::size_t>(H));
    vp.resize(static_cast<std::size_t>(H));
    qh.resize(static_cast<std::size_t>(H * Nq * Dh));
    for (index_t i = 0; i < Nq; ++i)
      for (index_t h = 0; h < H; ++h) std::copy_n(q + i * ld + h * Dh, Dh, qh.data() + (h * Nq + i) * Dh);
    const index_t Kp = (Nk + 1) / 2 * 2;
    for (index_t h = 0; h < H; ++h) {
      dpbf16::pack_transposed(kp[static_cast<std::size_t>(h)], k + h * Dh, Nk, Dh, ld, Nk);
      dpbf16::pack_rows(vp[static_cast<std::size_t>(h)], v + h * Dh, Kp, Dh, ld, Nk);
    }
  }
  void scores(index_t h, float* P) {
    dpbf16::gemm(o.Nq, o.Nk, qh.data() + h * o.Nq * o.Dh, o.Dh, kp[static_cast<std::size_t>(h)], P, o.Nk);
  }
  void context(index_t h, const bf16_bits* P16, float* ctx, index_t ldc) {
    const index_t Nq = o.Nq, Nk = o.Nk, Kp = (Nk + 1) / 2 * 2;
    p16.resize(static_cast<std::size_t>(Nq * Kp));
    padded_rows(P16, Nq, Nk, Kp, p16.data());
    dpbf16::gemm(Nq, o.Dh, p16.data(), Kp, vp[static_cast<std::size_t>(h)], ctx, ldc);
  }
};

// attention_heads_forward_bf16 on one of the kernels above. Per image: the raw scores q_h k_h^T of each head into
// cache.probs; the softmax of the image's rows and their rounding in one pass each, as the oneDNN path does;
// then ctx_h = P_h v_h for each head. The same arithmetic as the batched oneDNN products (bf16 operands, fp32
// sums), in the kernel's order.
template <class Kernel>
void attention_heads_forward_packed(const AttentionDims& d, CView<std::uint8_t> key_mask,
                                    AttentionCache<float>& cache, float scale) {
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  const bf16_bits* q = cache.q16.data();
  const bf16_bits* k = cache.k16.data();
  const bf16_bits* v = cache.v16.data();
  parallel_for(0, B, 1, [&](index_t b0, index_t b1) {
    thread_local Kernel kernel;  // its packed operands and padded blocks, reused image after image
    for (index_t b = b0; b < b1; ++b) {
      float* P = cache.probs.data() + b * H * Nq * Nk;  // [H, Nq, Nk]
      bf16_bits* P16 = cache.probs16.data() + b * H * Nq * Nk;
      const std::uint8_t* m = key_mask.empty() ? nullptr : key_mask.data() + b * Nk;
      kernel.image(Nq, Nk, H, Dh, q + b * Nq * D, k + b * Nk * D, v + b * Nk * D, D);
      for (index_t h = 0; h < H; ++h) kernel.scores(h, P + h * Nq * Nk);
      softmax_rows_vec(P, P, H * Nq, Nk, scale, m);
      to_bf16(P, H * Nq * Nk, P16);
      for (index_t h = 0; h < H; ++h) kernel.context(h, P16 + h * Nq * Nk, cache.ctx.data() + b * Nq * D + h * Dh, D);
    }
  });
}

// The per-head work under a mixed policy (core/precision.hpp): the score and context products, forward and
// backward, read bf16 operands and accumulate in fp32 (detail::gemm_bf16_batched_serial, one call for the heads
// of an image); the softmax and its backward stay fp32 on fp32 scores. q, k, v come rounded from their
// projections (attention_forward), the probabilities are rounded once per image; the forward keeps them
// (cache.q16 .. probs16) for the backward. Work items are images, so results do not depend on the thread count.
// q16, k16 and v16 hold q, k and v: the projections wrote them (attention_forward).
template <class = void>
void attention_heads_forward_bf16(const AttentionDims& d, CView<std::uint8_t> key_mask, AttentionCache<float>& cache) {
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  const float scale = detail::attention_scale<float>(d);
  profile::Region<HostSpace> heads_region("heads");
  cache.probs16.resize(cache.probs.shape());
  if (Dh % 32 == 0 && amx::available()) return attention_heads_forward_packed<AmxHeads>(d, key_mask, cache, scale);
  if (Dh % 16 == 0 && dpbf16::available()) return attention_heads_forward_packed<DpHeads>(d, key_mask, cache, scale);
  const bf16_bits* q = cache.q16.data();
  const bf16_bits* k = cache.k16.data();
  const bf16_bits* v = cache.v16.data();
  parallel_for(0, B, 1, [&](index_t b0, index_t b1) {
    for (index_t b = b0; b < b1; ++b) {
      float* P = cache.probs.data() + b * H * Nq * Nk;  // [H, Nq, Nk]
      bf16_bits* P16 = cache.probs16.data() + b * H * Nq * Nk;
      const std::uint8_t* m = key_mask.empty() ? nullptr : key_mask.data() + b * Nk;
      // Raw scores q_h k_h^T of every head, the masked and scaled softmax in place, then ctx_h = P_h v_h.
      gemm_bf16_batched_serial(Trans::N, Trans::T, Nq, Nk, Dh, 1.0f, q + b * Nq * D, D, Dh, k + b * Nk * D, D, Dh,
                               0.0f, P, Nk, Nq * Nk, H);
      softmax_rows_vec(P, P, H * Nq, Nk, scale, m);
      to_bf16(P, H * Nq * Nk, P16);
      gemm_bf16_batched_serial(Trans::N, Trans::N, Nq, Dh, Nk, 1.0f, P16, Nk, Nq * Nk, v + b * Nk * D, D, Dh, 0.0f,
                               cache.ctx.data() + b * Nq * D, D, Dh, H);
    }
  });
}

// Fills cache.dq, dk, dv from cache.dctx (the shapes sized by the caller), as the fp32 path does.
template <class = void>
void attention_heads_backward_bf16(const AttentionDims& d, AttentionCache<float>& cache) {
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  profile::Region<HostSpace> heads_region("heads");
  cache.dctx16.resize(cache.dctx.shape());
  to_bf16_parallel(cache.dctx.data(), cache.dctx.numel(), cache.dctx16.data());
  // One [H, Nq, Nk] score-gradient block (fp32 and bf16) per chunk of images; the chunking only decides which
  // scratch an image uses.
  const index_t chunks = std::max<index_t>(1, std::min<index_t>(B, 4 * index_t(std::max(1, num_threads()))));
  cache.dscores.resize(Shape{chunks, H * Nq, Nk});
  cache.dscores16.resize(Shape{chunks, H * Nq, Nk});
  const float scale = detail::attention_scale<float>(d);
  const bf16_bits* q = cache.q16.data();
  const bf16_bits* k = cache.k16.data();
  const bf16_bits* v = cache.v16.data();
  const bf16_bits* dctx = cache.dctx16.data();
  parallel_for(0, chunks, 1, [&](index_t c0, index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      float* dS = cache.dscores.data() + c * H * Nq * Nk;  // [H, Nq, Nk]
      bf16_bits* dS16 = cache.dscores16.data() + c * H * Nq * Nk;
      for (index_t b = c * B / chunks; b < (c + 1) * B / chunks; ++b) {
        const float* P = cache.probs.data() + b * H * Nq * Nk;
        const bf16_bits* P16 = cache.probs16.data() + b * H * Nq * Nk;
        const index_t qo = b * Nq * D, ko = b * Nk * D;
        // dv_h = P_h^T dctx_h; dP_h = dctx_h v_h^T.
        gemm_bf16_batched_serial(Trans::T, Trans::N, Nk, Dh, Nq, 1.0f, P16, Nk, Nq * Nk, dctx + qo, D, Dh, 0.0f,
                                 cache.dv.data() + ko, D, Dh, H);
        gemm_bf16_batched_serial(Trans::N, Trans::T, Nq, Nk, Dh, 1.0f, dctx + qo, D, Dh, v + ko, D, Dh, 0.0f, dS, Nk,
                                 Nq * Nk, H);
        // Softmax backward in fp32 (in place on dP); masked keys have P = 0, so dS = 0 there.
        for (index_t i = 0; i < H * Nq; ++i) math::softmax_row_backward(P + i * Nk, dS + i * Nk, Nk, dS + i * Nk);
        to_bf16(dS, H * Nq * Nk, dS16);
        // Scores are scale * q_h k_h^T: dq_h = scale dS_h k_h, dk_h = scale dS_h^T q_h.
        gemm_bf16_batched_serial(Trans::N, Trans::N, Nq, Dh, Nk, scale, dS16, Nk, Nq * Nk, k + ko, D, Dh, 0.0f,
                                 cache.dq.data() + qo, D, Dh, H);
        gemm_bf16_batched_serial(Trans::T, Trans::N, Nk, Dh, Nq, scale, dS16, Nk, Nq * Nk, q + qo, D, Dh, 0.0f,
                                 cache.dk.data() + ko, D, Dh, H);
      }
    }
  });
}

}  // namespace detail

namespace cpu {

// y[B, Nq, D] = MultiHead(xq[B, Nq, D], xkv[B, Nk, D]); fills `cache` for attention_backward.
template <class T, PrecisionPolicy Prec = Fp32>
void attention_forward(const AttentionWeights<T>& w, int heads, CView<T> xq, CView<T> xkv,
                       CView<std::uint8_t> key_mask, View<T> y, AttentionCache<T>& cache, const Prec& prec = {}) {
  const auto d = detail::attention_check<T>("attention_forward", w, heads, xq, xkv, key_mask);
  expect_shape(y, xq.shape(), "attention_forward: y");
  cache.size_forward(d.B, d.Nq, d.Nk, d.D, d.H);
  // Projections: one threaded product each over all rows; under bf16 xkv (xq too, for self-attention) rounded
  // once for the three of them, and q, k, v written as bf16 by the products themselves (the heads' products and
  // the backward read only those copies; cache.q, k, v stay unwritten): no fp32 write, read and rounding pass.
  if constexpr (Prec::mixed) {
    static_assert(std::is_same_v<T, float>, "attention_forward: the bf16 policy computes in float");
    for (auto [src, dst] : {std::pair{&cache.q, &cache.q16}, {&cache.k, &cache.k16}, {&cache.v, &cache.v16}})
      dst->resize(src->shape());
    {
      const RoundedOnce<T, Prec> x16(prec, xkv.data(), xkv.numel());
      auto project = [&](CView<T> x, CView<T> W, CView<T> b, bf16_bits* out) {
        gemm_mixed_bias_bf16(x16.prec(), Trans::N, Trans::T, x.numel() / d.D, d.D, d.D, x.data(), d.D, W.data(), d.D,
                             b.empty() ? nullptr : b.data(), out, d.D);
      };
      project(xq, w.wq, w.bq, cache.q16.data());
      project(xkv, w.wk, w.bk, cache.k16.data());
      project(xkv, w.wv, w.bv, cache.v16.data());
    }
    detail::attention_heads_forward_bf16(d, key_mask, cache);
  } else {
    {
      const RoundedOnce<T, Prec> x16(prec, xkv.data(), xkv.numel());
      cpu::linear_forward<T>(xq, w.wq, w.bq, cache.q.view(), x16.prec());
      cpu::linear_forward<T>(xkv, w.wk, w.bk, cache.k.view(), x16.prec());
      cpu::linear_forward<T>(xkv, w.wv, w.bv, cache.v.view(), x16.prec());
    }
    cache.drop_bf16_copies();
    detail::attention_heads_forward_fp32<T>(d, key_mask, cache);
  }
  cpu::linear_forward<T>(cache.ctx.cview(), w.wo, w.bo, y, prec);
}

// Backward of attention_forward (same weights, inputs and mask; `cache` as the forward left it, and its
// scratch buffers are used). dxq [B, Nq, D] and dxkv [B, Nk, D] are overwritten; when they are the same
// view, it receives dxq + dxkv (self-attention). Weight gradients accumulate.
template <class T, PrecisionPolicy Prec = Fp32>
void attention_backward(const AttentionWeights<T>& w, int heads, CView<T> xq, CView<T> xkv,
                        CView<std::uint8_t> key_mask, AttentionCache<T>& cache, CView<T> dy, View<T> dxq,
                        View<T> dxkv, const AttentionGrads<T>& g, const Prec& prec = {}) {
  const auto d = detail::attention_check<T>("attention_backward", w, heads, xq, xkv, key_mask);
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D;
  expect_shape(dy, xq.shape(), "attention_backward: dy");
  detail::attention_cache_check<T>("attention_backward", cache, xq.shape(), xkv.shape(), d);
  if (!dxq.empty()) expect_shape(dxq, xq.shape(), "attention_backward: dxq");
  if (!dxkv.empty()) expect_shape(dxkv, xkv.shape(), "attention_backward: dxkv");
  const bool summed = !dxq.empty() && dxq.data() == dxkv.data();

  cache.dctx.resize(Shape{B, Nq, D});  // [B, Nq, D]
  cache.dq.resize(Shape{B, Nq, D});    // [B, Nq, D]
  cache.dk.resize(Shape{B, Nk, D});    // [B, Nk, D]
  cache.dv.resize(Shape{B, Nk, D});    // [B, Nk, D]
  // Output projection: dctx = dy Wo, dWo += dy^T ctx, dbo += sum dy.
  cpu::linear_backward<T>(cache.ctx.cview(), w.wo, dy, cache.dctx.view(), g.wo, g.bo, prec);

  if constexpr (Prec::mixed) {
    detail::attention_cache16_check<T>("attention_backward", cache);
    detail::attention_heads_backward_bf16(d, cache);
  } else {
    detail::attention_heads_backward_fp32<T>(d, cache);
  }

  // Input projections: weight gradients through linear_backward, input gradients as products so that the
  // key and value (and, for self-attention, query) paths add into one buffer.
  // Under bf16, what two or three products read is rounded once: xkv (the weight gradients of k and v, and of
  // q for self-attention; only when a weight gradient reads it), and dq, dk, dv when both their weight and their
  // input gradient are wanted.
  const CView<T> dqv = cache.dq.cview(), dkv = cache.dk.cview(), dvv = cache.dv.cview();
  const bool x_read = !g.wk.empty() || !g.wv.empty() || (!g.wq.empty() && xq.data() == xkv.data());
  const RoundedOnce<T, Prec> x16(prec, x_read ? xkv.data() : nullptr, xkv.numel());
  const RoundedOnce<T, Prec> dq16(x16.prec(), !dxq.empty() && !g.wq.empty() ? dqv.data() : nullptr, dqv.numel());
  const RoundedOnce<T, Prec> dk16(dq16.prec(), !dxkv.empty() && !g.wk.empty() ? dkv.data() : nullptr, dkv.numel());
  const RoundedOnce<T, Prec> dv16(dk16.prec(), !dxkv.empty() && !g.wv.empty() ? dvv.data() : nullptr, dvv.numel());
  const Prec& p16 = dv16.prec();
  cpu::linear_backward<T>(xq, w.wq, dqv, View<T>{}, g.wq, g.bq, p16);
  cpu::linear_backward<T>(xkv, w.wk, dkv, View<T>{}, g.wk, g.bk, p16);
  cpu::linear_backward<T>(xkv, w.wv, dvv, View<T>{}, g.wv, g.bv, p16);
  if (!dxq.empty()) gemm_mixed<T>(p16, Trans::N, Trans::N, B * Nq, D, D, T(1), dqv.data(), D, w.wq.data(), D, T(0), dxq.data(), D);
  if (!dxkv.empty()) {
    gemm_mixed<T>(p16, Trans::N, Trans::N, B * Nk, D, D, T(1), dkv.data(), D, w.wk.data(), D, summed ? T(1) : T(0),
            dxkv.data(), D);
    gemm_mixed<T>(p16, Trans::N, Trans::N, B * Nk, D, D, T(1), dvv.data(), D, w.wv.data(), D, T(1), dxkv.data(), D);
  }
}

// Self-attention: attention_forward with xq = xkv = x [B, N, D].
template <class T, PrecisionPolicy Prec = Fp32>
void self_attention_forward(const AttentionWeights<T>& w, int heads, CView<T> x, CView<std::uint8_t> key_mask,
                            View<T> y, AttentionCache<T>& cache, const Prec& prec = {}) {
  attention_forward<T>(w, heads, x, x, key_mask, y, cache, prec);
}

// Self-attention backward: dx [B, N, D] (overwritten) = dxq + dxkv.
template <class T, PrecisionPolicy Prec = Fp32>
void self_attention_backward(const AttentionWeights<T>& w, int heads, CView<T> x, CView<std::uint8_t> key_mask,
                             AttentionCache<T>& cache, CView<T> dy, View<T> dx, const AttentionGrads<T>& g, const Prec& prec = {}) {
  attention_backward<T>(w, heads, x, x, key_mask, cache, dy, dx, dx, g, prec);
}

}  // namespace cpu

namespace ref {

// Naive loops over (b, h, i, j, c): the reference the tests and the Ref backend use. Same signatures, semantics
// and gradient rule as cpu::attention_forward/backward (dxq and dxkv may be the same view); the cache keeps the
// projections, probabilities and contexts, and the backward recomputes nothing else.
template <class T, PrecisionPolicy Prec = Fp32>
void attention_forward(const AttentionWeights<T>& w, int heads, CView<T> xq, CView<T> xkv,
                       CView<std::uint8_t> key_mask, View<T> y, AttentionCache<T>& cache, const Prec& prec = {}) {
  const auto d = detail::attention_check<T>("ref::attention_forward", w, heads, xq, xkv, key_mask);
  expect_shape(y, xq.shape(), "ref::attention_forward: y");
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  cache.size_forward(B, Nq, Nk, D, H);
  Tensor<T>&q = cache.q, &k = cache.k, &v = cache.v, &ctx = cache.ctx, &P = cache.probs;
  ref::linear_forward<T>(xq, w.wq, w.bq, q.view(), prec);
  ref::linear_forward<T>(xkv, w.wk, w.bk, k.view(), prec);
  ref::linear_forward<T>(xkv, w.wv, w.bv, v.view(), prec);
  const T scale = detail::attention_scale<T>(d);
  auto rd = [](T x) { return operand<T, Prec>(x); };  // an operand of a per-head product, as the policy reads it
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Nq; ++i) {
        T* s = P.data() + ((b * H + h) * Nq + i) * Nk;  // [Nk] one row of scores, then probabilities
        for (index_t j = 0; j < Nk; ++j) {
          T acc = 0;
          for (index_t c = h * Dh; c < (h + 1) * Dh; ++c)
            acc += rd(q[(b * Nq + i) * D + c]) * rd(k[(b * Nk + j) * D + c]);
          s[j] = acc * scale;
        }
        math::softmax_row(s, Nk, s, T(1), key_mask.empty() ? nullptr : key_mask.data() + b * Nk);
        for (index_t c = h * Dh; c < (h + 1) * Dh; ++c) {
          T acc = 0;
          for (index_t j = 0; j < Nk; ++j) acc += rd(s[j]) * rd(v[(b * Nk + j) * D + c]);
          ctx[(b * Nq + i) * D + c] = acc;
        }
      }
  ref::linear_forward<T>(ctx.cview(), w.wo, w.bo, y, prec);
}

// The same without a cache (for comparisons that need only y).
template <class T>
void attention_forward(const AttentionWeights<T>& w, int heads, CView<T> xq, CView<T> xkv,
                       CView<std::uint8_t> key_mask, View<T> y) {
  AttentionCache<T> cache;
  ref::attention_forward<T>(w, heads, xq, xkv, key_mask, y, cache);
}

template <class T, PrecisionPolicy Prec = Fp32>
void attention_backward(const AttentionWeights<T>& w, int heads, CView<T> xq, CView<T> xkv,
                        CView<std::uint8_t> key_mask, AttentionCache<T>& cache, CView<T> dy, View<T> dxq,
                        View<T> dxkv, const AttentionGrads<T>& g, const Prec& prec = {}) {
  const auto d = detail::attention_check<T>("ref::attention_backward", w, heads, xq, xkv, key_mask);
  const index_t B = d.B, Nq = d.Nq, Nk = d.Nk, D = d.D, H = d.H, Dh = d.Dh;
  expect_shape(dy, xq.shape(), "ref::attention_backward: dy");
  expect_shape(cache.probs.cview(), Shape{B, H, Nq, Nk}, "ref::attention_backward: cache (run attention_forward first)");
  if (!dxq.empty()) expect_shape(dxq, xq.shape(), "ref::attention_backward: dxq");
  if (!dxkv.empty()) expect_shape(dxkv, xkv.shape(), "ref::attention_backward: dxkv");
  const bool summed = !dxq.empty() && dxq.data() == dxkv.data();
  Tensor<T> dctx(Shape{B, Nq, D}), dq(Shape{B, Nq, D}), dk(Shape{B, Nk, D}), dv(Shape{B, Nk, D});
  ref::linear_backward<T>(cache.ctx.cview(), w.wo, dy, dctx.view(), g.wo, g.bo, prec);
  const T scale = detail::attention_scale<T>(d);
  auto rd = [](T x) { return operand<T, Prec>(x); };  // an operand of a per-head product, as the policy reads it
  std::vector<T> dP(static_cast<std::size_t>(Nk)), dS(static_cast<std::size_t>(Nk));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Nq; ++i) {
        const T* P = cache.probs.data() + ((b * H + h) * Nq + i) * Nk;
        const T* dc = dctx.data() + (b * Nq + i) * D;
        for (index_t j = 0; j < Nk; ++j) {
          T acc = 0;
          for (index_t c = h * Dh; c < (h + 1) * Dh; ++c) {
            acc += rd(dc[c]) * rd(cache.v[(b * Nk + j) * D + c]);
            dv[(b * Nk + j) * D + c] += rd(P[j]) * rd(dc[c]);
          }
          dP[static_cast<std::size_t>(j)] = acc;
        }
        math::softmax_row_backward(P, dP.data(), Nk, dS.data());
        for (index_t j = 0; j < Nk; ++j)
          for (index_t c = h * Dh; c < (h + 1) * Dh; ++c) {
            const T ds = rd(dS[static_cast<std::size_t>(j)]);
            dq[(b * Nq + i) * D + c] += scale * ds * rd(cache.k[(b * Nk + j) * D + c]);
            dk[(b * Nk + j) * D + c] += scale * ds * rd(cache.q[(b * Nq + i) * D + c]);
          }
      }
  Tensor<T> tq(xq.shape()), tk(xkv.shape()), tv(xkv.shape());  // input gradients per projection
  ref::linear_backward<T>(xq, w.wq, dq.cview(), tq.view(), g.wq, g.bq, prec);
  ref::linear_backward<T>(xkv, w.wk, dk.cview(), tk.view(), g.wk, g.bk, prec);
  ref::linear_backward<T>(xkv, w.wv, dv.cview(), tv.view(), g.wv, g.bv, prec);
  if (summed) {
    for (index_t i = 0; i < dxq.numel(); ++i) dxq[i] = tq[i] + tk[i] + tv[i];
    return;
  }
  if (!dxq.empty())
    for (index_t i = 0; i < dxq.numel(); ++i) dxq[i] = tq[i];
  if (!dxkv.empty())
    for (index_t i = 0; i < dxkv.numel(); ++i) dxkv[i] = tk[i] + tv[i];
}

template <class T, PrecisionPolicy Prec = Fp32>
void self_attention_forward(const AttentionWeights<T>& w, int heads, CView<T> x, CView<std::uint8_t> key_mask,
                            View<T> y, AttentionCache<T>& cache, const Prec& prec = {}) {
  ref::attention_forward<T>(w, heads, x, x, key_mask, y, cache, prec);
}

template <class T, PrecisionPolicy Prec = Fp32>
void self_attention_backward(const AttentionWeights<T>& w, int heads, CView<T> x, CView<std::uint8_t> key_mask,
                             AttentionCache<T>& cache, CView<T> dy, View<T> dx, const AttentionGrads<T>& g, const Prec& prec = {}) {
  ref::attention_backward<T>(w, heads, x, x, key_mask, cache, dy, dx, dx, g, prec);
}

}  // namespace ref
}  // namespace limoe
