// limoe/ops/l2norm.hpp: per-row L2 normalisation of the projected embeddings before the contrastive loss
// (semantics §1: "z = u / (||u|| + 1e-8) is fine; document what you use").
//
// This library uses z = u / (||u|| + eps) with eps = 1e-8 (kL2NormEps), for float and double alike; norms[R]
// (= ||u||, without eps) is saved for the backward pass. With n = ||u||, s = n + eps:
//   du = dz / s - u * <dz, u> / (n s^2)          (overwritten; du may alias dz)
// At u = 0 the second term is taken as 0 (z is 0 there), so du = dz / eps.
#pragma once

#include <algorithm>
#include <cmath>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe {

namespace cpu {

template <class T>
void l2_normalize_forward(CView<T> u, View<T> z, View<T> norms) {
  const index_t R = detail::l2norm_check<T>("l2_normalize_forward", u, z, norms);
  const index_t D = u.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const T* ur = u.data() + r * D;
      T ss = 0;
      for (index_t d = 0; d < D; ++d) ss += ur[d] * ur[d];
      const T n = std::sqrt(ss);
      const T inv = T(1) / (n + T(kL2NormEps));
      T* zr = z.data() + r * D;
      for (index_t d = 0; d < D; ++d) zr[d] = ur[d] * inv;
      norms[r] = n;
    }
  });
}

template <class T>
void l2_normalize_backward(CView<T> u, CView<T> z, CView<T> norms, CView<T> dz, View<T> du) {
  const index_t R = detail::l2norm_check<T>("l2_normalize_backward", u, z, norms);
  detail::l2norm_check<T>("l2_normalize_backward (dz)", u, dz, norms);
  detail::l2norm_check<T>("l2_normalize_backward (du)", u, du, norms);
  const index_t D = u.shape().back();
  parallel_for(0, R, std::max<index_t>(1, 8192 / D), [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const T* zr = z.data() + r * D;
      const T* gr = dz.data() + r * D;
      const T n = norms[r], s = n + T(kL2NormEps);
      // u <dz, u> / (n s^2) = z <dz, z> / n (u = s z): written with z, which is already normalised.
      T dot = 0;
      for (index_t d = 0; d < D; ++d) dot += gr[d] * zr[d];
      const T c = n > T(0) ? dot / n : T(0);
      T* out = du.data() + r * D;
      for (index_t d = 0; d < D; ++d) out[d] = gr[d] / s - zr[d] * c;
    }
  });
}

}  // namespace cpu

namespace ref {

template <class T>
void l2_normalize_forward(CView<T> u, View<T> z, View<T> norms) {
  const index_t R = detail::l2norm_check<T>("ref::l2_normalize_forward", u, z, norms);
  const index_t D = u.shape().back();
  for (index_t r = 0; r < R; ++r) {
    T ss = 0;
    for (index_t d = 0; d < D; ++d) ss += u[r * D + d] * u[r * D + d];
    norms[r] = std::sqrt(ss);
    for (index_t d = 0; d < D; ++d) z[r * D + d] = u[r * D + d] / (norms[r] + T(kL2NormEps));
  }
}

template <class T>
void l2_normalize_backward(CView<T> u, CView<T> z, CView<T> norms, CView<T> dz, View<T> du) {
  const index_t R = detail::l2norm_check<T>("ref::l2_normalize_backward", u, z, norms);
  const index_t D = u.shape().back();
  for (index_t r = 0; r < R; ++r) {
    const T n = norms[r], s = n + T(kL2NormEps);
    // Full Jacobian dz_i/du_j = delta_ij / s - u_i u_j / (n s^2).
    for (index_t j = 0; j < D; ++j) {
      T acc = 0;
      for (index_t i = 0; i < D; ++i) {
        T jac = (i == j ? T(1) : T(0)) / s;
        if (n > T(0)) jac -= u[r * D + i] * u[r * D + j] / (n * s * s);
        acc += dz[r * D + i] * jac;
      }
      du[r * D + j] = acc;
    }
  }
}

}  // namespace ref
}  // namespace limoe
