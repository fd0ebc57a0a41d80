// limoe/ops/rows.hpp: the model's row moves: the residual add (add_into: y += x) and rows by index
// (gather_rows: dst[i] = src[idx[i]]; scatter_rows: dst[idx[i]] = src[i]), which put the MoE layer's rows into
// routing-group order and back. ref:: is the plain loop, cpu:: the same over threads (every element written by
// one thread: results do not depend on the thread count). The indices must lie in [0, rows); scatter_rows
// writes only the rows idx names, and each at most once is what the model passes (a permutation). Also to_bf16
// (y = x rounded to bf16, math/bf16.hpp), the conversion a device model's weight mirror needs from its backend.
#pragma once

#include <algorithm>
#include <cstdint>

#include "limoe/core/error.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/precision.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/ops/shapes.hpp"

namespace limoe {

namespace detail {
inline void rows_index_values_check(const char* fn, CView<std::int64_t> idx, index_t rows) {
  for (index_t i = 0; i < idx.numel(); ++i)
    LIMOE_CHECK(idx[i] >= 0 && idx[i] < rows, fn, ": idx[", i, "] = ", idx[i], " is not a row of [0, ", rows, ")");
}
}  // namespace detail

namespace ref {
template <class T>
void add_into(CView<T> x, View<T> y) {
  detail::add_into_check<T>("ref::add_into", x, y);
  for (index_t i = 0; i < x.numel(); ++i) y[i] += x[i];
}
template <class T>
void gather_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
  const index_t D = detail::rows_by_index_check<T>("ref::gather_rows", src, idx, dst, true);
  detail::rows_index_values_check("ref::gather_rows", idx, src.dim(0));
  for (index_t i = 0; i < idx.numel(); ++i)
    for (index_t d = 0; d < D; ++d) dst[i * D + d] = src[idx[i] * D + d];
}
template <class T>
void scatter_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
  const index_t D = detail::rows_by_index_check<T>("ref::scatter_rows", src, idx, dst, false);
  detail::rows_index_values_check("ref::scatter_rows", idx, dst.dim(0));
  for (index_t i = 0; i < idx.numel(); ++i)
    for (index_t d = 0; d < D; ++d) dst[idx[i] * D + d] = src[i * D + d];
}
inline void to_bf16(CView<float> x, View<std::uint16_t> y) {
  detail::to_bf16_check("ref::to_bf16", x, y);
  ::limoe::to_bf16(x.data(), x.numel(), y.data());
}
}  // namespace ref

namespace cpu {
template <class T>
void add_into(CView<T> x, View<T> y) {
  detail::add_into_check<T>("cpu::add_into", x, y);
  parallel_for(0, x.numel(), 1 << 14, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) y[i] += x[i];
  });
}
template <class T>
void gather_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
  const index_t D = detail::rows_by_index_check<T>("cpu::gather_rows", src, idx, dst, true);
  detail::rows_index_values_check("cpu::gather_rows", idx, src.dim(0));
  parallel_for(0, idx.numel(), 256, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) std::copy_n(src.data() + idx[i] * D, D, dst.data() + i * D);
  });
}
template <class T>
void scatter_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
  const index_t D = detail::rows_by_index_check<T>("cpu::scatter_rows", src, idx, dst, false);
  detail::rows_index_values_check("cpu::scatter_rows", idx, dst.dim(0));
  parallel_for(0, idx.numel(), 256, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) std::copy_n(src.data() + i * D, D, dst.data() + idx[i] * D);
  });
}
inline void to_bf16(CView<float> x, View<std::uint16_t> y) {
  detail::to_bf16_check("cpu::to_bf16", x, y);
  to_bf16_parallel(x.data(), x.numel(), y.data());
}
}  // namespace cpu

}  // namespace limoe
