// limoe/ops/embedding.hpp: the per-modality input embeddings (semantics §1).
//
// Images [B, H, W, C] are cut into P x P patches in row-major (py, px) order, each flattened in
// (py_in, px_in, c) order, then y[B, N, D] = patches W^T + b + pos[N, D] with N = (H/P) (W/P), W [D, P*P*C].
// Texts: y[B, T, D] = table[ids[b, t]] + pos[t], table [V, D]; pos has at least T rows (the first T are used),
// so shorter texts share a table made for the maximum length; pos may be empty (no position embedding).
// Gradient rule: dimages is overwritten (skipped when empty); dW, db, dpos, dtable accumulate (each skipped
// when empty).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"
#include "limoe/ops/linear.hpp"

namespace limoe {

namespace detail {
// Copies between images and patches in either direction (to_patches: images -> patches).
template <class T, class Src, class Dst>
void patch_copy(const PatchGeom& g, Src src, Dst dst, bool to_patches) {
  const index_t rowlen = g.P * g.C;  // one patch row is contiguous in the image
  parallel_for(0, g.B * g.N, std::max<index_t>(1, 4096 / std::max<index_t>(g.F, 1)), [&](index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
      const index_t b = p / g.N, n = p % g.N, py = n / g.nw, px = n % g.nw;
      for (index_t i = 0; i < g.P; ++i) {
        const index_t img = ((b * g.H + py * g.P + i) * g.W + px * g.P) * g.C;
        const index_t pat = p * g.F + i * rowlen;
        if (to_patches) std::copy(src + img, src + img + rowlen, dst + pat);
        else std::copy(src + pat, src + pat + rowlen, dst + img);
      }
    }
  });
}
}  // namespace detail

namespace cpu {

// patches[B, N, P*P*C] from images[B, H, W, C].
template <class T>
void patchify(CView<T> images, int P, View<T> patches) {
  const auto g = detail::patch_geom<T>("patchify", images, P);
  expect_shape(patches, detail::patch_shape(g), "patchify: patches");
  detail::patch_copy<T>(g, images.data(), patches.data(), true);
}

// The adjoint of patchify (patches do not overlap, so it is the inverse scatter); overwrites dimages.
template <class T>
void unpatchify(CView<T> dpatches, int P, View<T> dimages) {
  const auto g = detail::patch_geom<T>("unpatchify", CView<T>(dimages), P);
  expect_shape(dpatches, detail::patch_shape(g), "unpatchify: dpatches");
  detail::patch_copy<T>(g, dpatches.data(), dimages.data(), false);
}

template <class T, PrecisionPolicy Prec = Fp32>
void patch_embed_forward(CView<T> images, int P, CView<T> W, CView<T> b, CView<T> pos, View<T> patches, View<T> y, const Prec& prec = {}) {
  const auto g = detail::patch_geom<T>("patch_embed_forward", images, P);
  LIMOE_CHECK(W.rank() == 2 && W.dim(1) == g.F, "patch_embed_forward: W ", W.shape().str(), " must be [D, P*P*C = ",
              g.F, "] for images ", images.shape().str(), " and P = ", P);
  const index_t D = W.dim(0);
  expect_shape(y, Shape{g.B, g.N, D}, "patch_embed_forward: y");
  if (!pos.empty()) expect_shape(pos, Shape{g.N, D}, "patch_embed_forward: pos");
  patchify<T>(images, P, patches);
  linear_forward<T>(patches, W, b, y, prec);
  if (pos.empty()) return;
  parallel_for(0, g.B * g.N, std::max<index_t>(1, 8192 / std::max<index_t>(D, 1)), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const T* pr = pos.data() + (r % g.N) * D;
      T* yr = y.data() + r * D;
      for (index_t d = 0; d < D; ++d) yr[d] += pr[d];
    }
  });
}

template <class T, PrecisionPolicy Prec = Fp32>
void patch_embed_backward(CView<T> images, int P, CView<T> patches, CView<T> W, CView<T> dy, View<T> dimages,
                          View<T> dW, View<T> db, View<T> dpos, const Prec& prec = {}) {
  const auto g = detail::patch_geom<T>("patch_embed_backward", images, P);
  expect_shape(patches, detail::patch_shape(g), "patch_embed_backward: patches");
  LIMOE_CHECK(W.rank() == 2 && W.dim(1) == g.F, "patch_embed_backward: W ", W.shape().str(),
              " must be [D, P*P*C = ", g.F, "]");
  const index_t D = W.dim(0);
  expect_shape(dy, Shape{g.B, g.N, D}, "patch_embed_backward: dy");
  if (!dimages.empty()) expect_shape(dimages, images.shape(), "patch_embed_backward: dimages");
  if (!dpos.empty()) expect_shape(dpos, Shape{g.N, D}, "patch_embed_backward: dpos");
  if (!dimages.empty()) {
    Tensor<T> dpatches(detail::patch_shape(g));  // [B, N, P*P*C]
    linear_backward<T>(patches, W, dy, dpatches.view(), dW, db, prec);
    unpatchify<T>(dpatches.view(), P, dimages);
  } else {
    linear_backward<T>(patches, W, dy, View<T>{}, dW, db, prec);
  }
  if (!dpos.empty()) {
    // Sum over the batch, parallel over token rows (each writes its own row of dpos).
    parallel_for(0, g.N, std::max<index_t>(1, 4096 / std::max<index_t>(D * g.B, 1)), [&](index_t n0, index_t n1) {
      for (index_t n = n0; n < n1; ++n)
        for (index_t b = 0; b < g.B; ++b) {
          const T* gr = dy.data() + (b * g.N + n) * D;
          for (index_t d = 0; d < D; ++d) dpos[n * D + d] += gr[d];
        }
    });
  }
}

// y[..., T, D] = table[ids] + pos[t]; ids outside [0, V) throw limoe::Error naming the id and its position.
template <class T>
void token_embed_forward(CView<std::int32_t> ids, CView<T> table, CView<T> pos, View<T> y) {
  LIMOE_CHECK(table.rank() == 2, "token_embed_forward: table must be [V, D], got ", table.shape().str());
  const index_t V = table.dim(0), D = table.dim(1);
  detail::token_check<T>("token_embed_forward", ids, D, pos, y.shape(), "y");
  const index_t L = ids.shape().back(), n = ids.numel();
  // Validate every id first so a bad one leaves y untouched and the error names the first offender.
  for (index_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= V) detail::bad_token("token_embed_forward", ids[i], i, L, V);
  parallel_for(0, n, std::max<index_t>(1, 8192 / std::max<index_t>(D, 1)), [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) {
      const T* er = table.data() + static_cast<index_t>(ids[i]) * D;
      T* yr = y.data() + i * D;
      if (pos.empty()) std::copy(er, er + D, yr);
      else {
        const T* pr = pos.data() + (i % L) * D;
        for (index_t d = 0; d < D; ++d) yr[d] = er[d] + pr[d];
      }
    }
  });
}

// dtable[ids[i]] += dy[i]; dpos[t] += sum over sequences of dy[., t]. Parallel over column blocks of D, so
// repeated ids never race and the sum order is fixed.
template <class T>
void token_embed_backward(CView<std::int32_t> ids, CView<T> dy, View<T> dtable, View<T> dpos) {
  LIMOE_CHECK(dy.rank() >= 2, "token_embed_backward: dy must be [B, T, D] or [T, D], got ", dy.shape().str());
  const index_t D = dy.shape().back();
  detail::token_check<T>("token_embed_backward", ids, D, dpos, dy.shape(), "dy");
  LIMOE_CHECK(dtable.empty() || (dtable.rank() == 2 && dtable.dim(1) == D), "token_embed_backward: dtable ",
              dtable.shape().str(), " must be [V, ", D, "]");
  const index_t L = ids.shape().back(), n = ids.numel();
  if (!dtable.empty()) {
    const index_t V = dtable.dim(0);
    for (index_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= V) detail::bad_token("token_embed_backward", ids[i], i, L, V);
  }
  const index_t block = 64;
  parallel_for(0, (D + block - 1) / block, std::max<index_t>(1, 65536 / std::max<index_t>(n * block, 1)),
               [&](index_t c0, index_t c1) {
                 const index_t d0 = c0 * block, d1 = std::min(D, c1 * block);
                 for (index_t i = 0; i < n; ++i) {
                   const T* gr = dy.data() + i * D;
                   if (!dtable.empty()) {
                     T* tr = dtable.data() + static_cast<index_t>(ids[i]) * D;
                     for (index_t d = d0; d < d1; ++d) tr[d] += gr[d];
                   }
                   if (!dpos.empty()) {
                     T* pr = dpos.data() + (i % L) * D;
                     for (index_t d = d0; d < d1; ++d) pr[d] += gr[d];
                   }
                 }
               });
}

}  // namespace cpu

namespace ref {

template <class T>
void patchify(CView<T> images, int P, View<T> patches) {
  const auto g = detail::patch_geom<T>("ref::patchify", images, P);
  expect_shape(patches, detail::patch_shape(g), "ref::patchify: patches");
  for (index_t b = 0; b < g.B; ++b)
    for (index_t py = 0; py < g.nh; ++py)
      for (index_t px = 0; px < g.nw; ++px)
        for (index_t i = 0; i < g.P; ++i)
          for (index_t j = 0; j < g.P; ++j)
            for (index_t c = 0; c < g.C; ++c)
              patches[((b * g.N + py * g.nw + px) * g.P * g.P + i * g.P + j) * g.C + c] =
                  images[((b * g.H + py * g.P + i) * g.W + px * g.P + j) * g.C + c];
}

template <class T>
void unpatchify(CView<T> dpatches, int P, View<T> dimages) {
  const auto g = detail::patch_geom<T>("ref::unpatchify", CView<T>(dimages), P);
  expect_shape(dpatches, detail::patch_shape(g), "ref::unpatchify: dpatches");
  for (index_t b = 0; b < g.B; ++b)
    for (index_t py = 0; py < g.nh; ++py)
      for (index_t px = 0; px < g.nw; ++px)
        for (index_t i = 0; i < g.P; ++i)
          for (index_t j = 0; j < g.P; ++j)
            for (index_t c = 0; c < g.C; ++c)
              dimages[((b * g.H + py * g.P + i) * g.W + px * g.P + j) * g.C + c] =
                  dpatches[((b * g.N + py * g.nw + px) * g.P * g.P + i * g.P + j) * g.C + c];
}

template <class T, PrecisionPolicy Prec = Fp32>
void patch_embed_forward(CView<T> images, int P, CView<T> W, CView<T> b, CView<T> pos, View<T> patches, View<T> y, const Prec& prec = {}) {
  const auto g = detail::patch_geom<T>("ref::patch_embed_forward", images, P);
  const index_t D = W.dim(0);
  patchify<T>(images, P, patches);
  linear_forward<T>(patches, W, b, y, prec);
  if (!pos.empty())
    for (index_t i = 0; i < g.B * g.N * D; ++i) y[i] += pos[i % (g.N * D)];
}

template <class T, PrecisionPolicy Prec = Fp32>
void patch_embed_backward(CView<T> images, int P, CView<T> patches, CView<T> W, CView<T> dy, View<T> dimages,
                          View<T> dW, View<T> db, View<T> dpos, const Prec& prec = {}) {
  const auto g = detail::patch_geom<T>("ref::patch_embed_backward", images, P);
  const index_t D = W.dim(0);
  Tensor<T> dpatches(detail::patch_shape(g));  // [B, N, P*P*C]
  linear_backward<T>(patches, W, dy, dimages.empty() ? View<T>{} : dpatches.view(), dW, db, prec);
  if (!dimages.empty()) unpatchify<T>(dpatches.view(), P, dimages);
  if (!dpos.empty())
    for (index_t i = 0; i < g.B * g.N * D; ++i) dpos[i % (g.N * D)] += dy[i];
}

template <class T>
void token_embed_forward(CView<std::int32_t> ids, CView<T> table, CView<T> pos, View<T> y) {
  const index_t V = table.dim(0), D = table.dim(1), L = ids.shape().back();
  detail::token_check<T>("ref::token_embed_forward", ids, D, pos, y.shape(), "y");
  for (index_t i = 0; i < ids.numel(); ++i) {
    if (ids[i] < 0 || ids[i] >= V) detail::bad_token("ref::token_embed_forward", ids[i], i, L, V);
    for (index_t d = 0; d < D; ++d)
      y[i * D + d] = table[ids[i] * D + d] + (pos.empty() ? T(0) : pos[(i % L) * D + d]);
  }
}

template <class T>
void token_embed_backward(CView<std::int32_t> ids, CView<T> dy, View<T> dtable, View<T> dpos) {
  const index_t D = dy.shape().back(), L = ids.shape().back();
  for (index_t i = 0; i < ids.numel(); ++i)
    for (index_t d = 0; d < D; ++d) {
      if (!dtable.empty()) dtable[ids[i] * D + d] += dy[i * D + d];
      if (!dpos.empty()) dpos[(i % L) * D + d] += dy[i * D + d];
    }
}

}  // namespace ref
}  // namespace limoe
