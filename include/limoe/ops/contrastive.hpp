// limoe/ops/contrastive.hpp: the symmetric image-text contrastive loss (semantics §4; CLIP / LiT).
//
// n pairs of normalised embeddings zi[n, P] (images) and zt[n, P] (texts):
//   logits_ij = t <zi_i, zt_j>,  t = exp(theta), optionally clamped to t <= max_scale (max_scale <= 0: no clamp)
//   L = (CE(rows, diag) + CE(columns, diag)) / 2,  each CE the mean over the n pairs
// Backward, with R = row softmax and Cl = column softmax of the logits:
//   dlogits = dloss / (2n) * (R + Cl - 2 I);  dzi = t dlogits zt;  dzt = t dlogits^T zi   (overwritten)
//   dtheta += sum_ij dlogits_ij logits_ij  (dt/dtheta = t), and 0 when the clamp is active (t > max_scale):
//   the clamp is a constant there.
// Accuracies count the pairs whose row (image -> text) or column (text -> image) argmax is the diagonal; ties go
// to the lower index.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe {

namespace detail {
// Per-column max and sum of exp(logit - max) (and the first argmax), over column blocks in parallel so the
// row-major matrix is read row by row.
template <class T>
void contrastive_columns(CView<T> logits, std::vector<T>& cmax, std::vector<double>& csum, std::vector<index_t>* carg) {
  const index_t n = logits.dim(0);
  cmax.assign(static_cast<std::size_t>(n), T(0));
  csum.assign(static_cast<std::size_t>(n), 0.0);
  if (carg) carg->assign(static_cast<std::size_t>(n), 0);
  const index_t block = 64;
  parallel_for(0, (n + block - 1) / block, std::max<index_t>(1, 16384 / (n * block)), [&](index_t c0, index_t c1) {
    const index_t j0 = c0 * block, j1 = std::min(n, c1 * block);
    for (index_t j = j0; j < j1; ++j) cmax[j] = logits[j];
    for (index_t i = 1; i < n; ++i) {
      const T* li = logits.data() + i * n;
      for (index_t j = j0; j < j1; ++j)
        if (li[j] > cmax[j]) {
          cmax[j] = li[j];
          if (carg) (*carg)[j] = i;
        }
    }
    for (index_t i = 0; i < n; ++i) {
      const T* li = logits.data() + i * n;
      for (index_t j = j0; j < j1; ++j) csum[j] += std::exp(static_cast<double>(li[j] - cmax[j]));
    }
  });
}
}  // namespace detail

namespace cpu {
using limoe::ContrastiveResult;

template <class T>
ContrastiveResult contrastive_forward(CView<T> zi, CView<T> zt, T theta, T max_scale, View<T> logits) {
  const index_t n = detail::contrastive_check<T>("contrastive_forward", zi, zt, logits);
  const index_t P = zi.dim(1);
  const auto [t, clamped] = detail::contrastive_scale(theta, max_scale);
  (void)clamped;
  gemm<T>(Trans::N, Trans::T, n, n, P, t, zi.data(), P, zt.data(), P, T(0), logits.data(), n);  // [n, n]

  // Rows: image -> text cross-entropy.
  std::vector<double> row_loss(static_cast<std::size_t>(n));
  std::vector<char> row_hit(static_cast<std::size_t>(n));
  parallel_for(0, n, std::max<index_t>(1, 8192 / n), [&](index_t r0, index_t r1) {
    for (index_t i = r0; i < r1; ++i) {
      const T* li = logits.data() + i * n;
      const index_t arg = std::max_element(li, li + n) - li;  // first maximum
      double s = 0;
      for (index_t j = 0; j < n; ++j) s += std::exp(static_cast<double>(li[j] - li[arg]));
      row_loss[i] = std::log(s) + static_cast<double>(li[arg]) - static_cast<double>(li[i]);
      row_hit[i] = arg == i;
    }
  });
  // Columns: text -> image cross-entropy.
  std::vector<T> cmax;
  std::vector<double> csum;
  std::vector<index_t> carg;
  detail::contrastive_columns<T>(logits, cmax, csum, &carg);

  ContrastiveResult r;
  double rows = 0, cols = 0;
  index_t hits_r = 0, hits_c = 0;
  for (index_t j = 0; j < n; ++j) {
    rows += row_loss[j];
    cols += std::log(csum[j]) + static_cast<double>(cmax[j]) - static_cast<double>(logits[j * n + j]);
    hits_r += row_hit[j];
    hits_c += carg[j] == j;
  }
  r.loss = (rows + cols) / (2.0 * static_cast<double>(n));
  r.accuracy_i2t = static_cast<double>(hits_r) / static_cast<double>(n);
  r.accuracy_t2i = static_cast<double>(hits_c) / static_cast<double>(n);
  r.scale = static_cast<double>(t);
  return r;
}

template <class T>
void contrastive_backward(CView<T> zi, CView<T> zt, T theta, T max_scale, CView<T> logits, T dloss, View<T> dzi,
                          View<T> dzt, T* dtheta) {
  const index_t n = detail::contrastive_check<T>("contrastive_backward", zi, zt, logits);
  const index_t P = zi.dim(1);
  if (!dzi.empty()) expect_shape(dzi, zi.shape(), "contrastive_backward: dzi");
  if (!dzt.empty()) expect_shape(dzt, zt.shape(), "contrastive_backward: dzt");
  const auto [t, clamped] = detail::contrastive_scale(theta, max_scale);

  std::vector<T> cmax;
  std::vector<double> csum;
  detail::contrastive_columns<T>(logits, cmax, csum, nullptr);
  const T w = dloss / static_cast<T>(2 * n);
  Tensor<T> G(Shape{n, n});  // [n, n] dL/dlogits
  std::vector<double> theta_part(static_cast<std::size_t>(n), 0.0);
  parallel_for(0, n, std::max<index_t>(1, 8192 / n), [&](index_t r0, index_t r1) {
    for (index_t i = r0; i < r1; ++i) {
      const T* li = logits.data() + i * n;
      T* gi = G.data() + i * n;
      const T m = *std::max_element(li, li + n);
      double s = 0;
      for (index_t j = 0; j < n; ++j) s += std::exp(static_cast<double>(li[j] - m));
      const double inv = 1.0 / s;
      double tp = 0;
      for (index_t j = 0; j < n; ++j) {
        const double row_sm = std::exp(static_cast<double>(li[j] - m)) * inv;
        const double col_sm = std::exp(static_cast<double>(li[j] - cmax[j])) / csum[j];
        gi[j] = static_cast<T>(static_cast<double>(w) * (row_sm + col_sm - (i == j ? 2.0 : 0.0)));
        tp += static_cast<double>(gi[j]) * static_cast<double>(li[j]);
      }
      theta_part[i] = tp;
    }
  });
  if (!dzi.empty()) gemm<T>(Trans::N, Trans::N, n, P, n, t, G.data(), n, zt.data(), P, T(0), dzi.data(), P);
  if (!dzt.empty()) gemm<T>(Trans::T, Trans::N, n, P, n, t, G.data(), n, zi.data(), P, T(0), dzt.data(), P);
  if (dtheta && !clamped) {
    double s = 0;
    for (double v : theta_part) s += v;
    *dtheta += static_cast<T>(s);
  }
}

}  // namespace cpu

namespace ref {
using limoe::ContrastiveResult;

// Naive loops straight from the definition (log-softmax per row and per column).
template <class T>
ContrastiveResult contrastive_forward(CView<T> zi, CView<T> zt, T theta, T max_scale, View<T> logits) {
  const index_t n = detail::contrastive_check<T>("ref::contrastive_forward", zi, zt, logits);
  const index_t P = zi.dim(1);
  T t = std::exp(theta);
  if (max_scale > T(0) && t > max_scale) t = max_scale;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < n; ++j) {
      T acc = 0;
      for (index_t p = 0; p < P; ++p) acc += zi[i * P + p] * zt[j * P + p];
      logits[i * n + j] = t * acc;
    }
  ContrastiveResult r;
  r.scale = static_cast<double>(t);
  for (index_t k = 0; k < n; ++k) {
    // Row k (image k against all texts) and column k (text k against all images).
    T mr = logits[k * n], mc = logits[k];
    index_t ar = 0, ac = 0;
    for (index_t j = 1; j < n; ++j) {
      if (logits[k * n + j] > mr) mr = logits[k * n + j], ar = j;
      if (logits[j * n + k] > mc) mc = logits[j * n + k], ac = j;
    }
    T sr = 0, sc = 0;
    for (index_t j = 0; j < n; ++j) {
      sr += std::exp(logits[k * n + j] - mr);
      sc += std::exp(logits[j * n + k] - mc);
    }
    r.loss += static_cast<double>((std::log(sr) + mr - logits[k * n + k]) + (std::log(sc) + mc - logits[k * n + k]));
    r.accuracy_i2t += ar == k;
    r.accuracy_t2i += ac == k;
  }
  r.loss /= 2.0 * static_cast<double>(n);
  r.accuracy_i2t /= static_cast<double>(n);
  r.accuracy_t2i /= static_cast<double>(n);
  return r;
}

template <class T>
void contrastive_backward(CView<T> zi, CView<T> zt, T theta, T max_scale, CView<T> logits, T dloss, View<T> dzi,
                          View<T> dzt, T* dtheta) {
  const index_t n = detail::contrastive_check<T>("ref::contrastive_backward", zi, zt, logits);
  const index_t P = zi.dim(1);
  T t = std::exp(theta);
  const bool clamped = max_scale > T(0) && t > max_scale;
  if (clamped) t = max_scale;
  std::vector<T> G(static_cast<std::size_t>(n * n));
  for (index_t i = 0; i < n; ++i) {
    T mr = logits[i * n], mc = logits[i];
    for (index_t j = 1; j < n; ++j) mr = std::max(mr, logits[i * n + j]), mc = std::max(mc, logits[j * n + i]);
    T sr = 0, sc = 0;
    for (index_t j = 0; j < n; ++j) sr += std::exp(logits[i * n + j] - mr), sc += std::exp(logits[j * n + i] - mc);
    for (index_t j = 0; j < n; ++j) {
      G[i * n + j] += dloss / T(2 * n) * (std::exp(logits[i * n + j] - mr) / sr - (i == j ? T(1) : T(0)));  // row i
      G[j * n + i] += dloss / T(2 * n) * (std::exp(logits[j * n + i] - mc) / sc - (i == j ? T(1) : T(0)));  // col i
    }
  }
  for (index_t i = 0; i < n; ++i)
    for (index_t p = 0; p < P; ++p) {
      T ai = 0, at = 0;
      for (index_t j = 0; j < n; ++j) {
        ai += G[i * n + j] * zt[j * P + p];
        at += G[j * n + i] * zi[j * P + p];
      }
      if (!dzi.empty()) dzi[i * P + p] = t * ai;
      if (!dzt.empty()) dzt[i * P + p] = t * at;
    }
  if (dtheta && !clamped) {
    T s = 0;
    for (index_t k = 0; k < n * n; ++k) s += G[k] * logits[k];
    *dtheta += s;
  }
}

}  // namespace ref
}  // namespace limoe
