// limoe/core/reduce.hpp: sums on the CPU in a fixed order that vectorises.
//
//   lane_sum<Acc>(n, term)    sum of term(0) .. term(n - 1): term(i) goes to partial sum i mod 16, then the 16
//                             partial sums are added pairwise (lane j += lane j + 8, then j + 4, j + 2, j + 1)
//   chunked_sum<Acc>(n, term) the same over fixed chunks of 2^16 indices, the chunks over the thread pool, their
//                             sums added in chunk order
//
// A plain `s += term(i)` is one chain of dependent adds: the compiler may not reorder it (floating-point
// addition is not associative), so it runs at one add per add latency (about 4 cycles), scalar. Sixteen
// independent partial sums are what a vector unit adds at once. The order depends on n only, never on the
// thread count, the machine or its vector width, so results are reproducible everywhere; it is a different
// order from the sequential one, so results differ from a sequential sum in the last bits (and are usually
// closer to the exact sum). The formulas a sum feeds stay in math/ (e.g. math::layernorm_rstd); which order
// a backend reduces in is its own business (docs/conventions.md).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "limoe/core/parallel.hpp"

namespace limoe::detail {

inline constexpr int kSumLanes = 16;

// Adds the column sums of g[R, C] (leading dimension ld, C when 0) to acc[C], row by row (contiguous, vectorised
// across columns), each column over the rows in order: the bits depend on the values only (a bias gradient).
template <class T>
void add_column_sums(const T* g, std::int64_t R, std::int64_t C, T* acc, std::int64_t ld = 0) {
  if (ld == 0) ld = C;
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < C; ++c) acc[c] += g[r * ld + c];
}

template <class Acc, class Term>
Acc lane_sum(std::int64_t n, Term&& term) {
  Acc lane[kSumLanes] = {};
  std::int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int j = 0; j < kSumLanes; ++j) lane[j] += term(i + j);
  for (int j = 0; i < n; ++i, ++j) lane[j] += term(i);
  for (int w = kSumLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) lane[j] += lane[j + w];
  return lane[0];
}

inline constexpr std::int64_t kSumChunk = std::int64_t(1) << 16;

template <class Acc, class Term>
Acc chunked_sum(std::int64_t n, Term&& term) {
  if (n <= kSumChunk) return lane_sum<Acc>(n, term);
  const std::int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<Acc> part(static_cast<std::size_t>(chunks));
  parallel_for(0, chunks, 1, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t c = c0; c < c1; ++c) {
      const std::int64_t i0 = c * kSumChunk;
      part[static_cast<std::size_t>(c)] =
          lane_sum<Acc>(std::min(kSumChunk, n - i0), [&](std::int64_t i) { return term(i0 + i); });
    }
  });
  Acc total = 0;
  for (const Acc& p : part) total += p;
  return total;
}

}  // namespace limoe::detail
