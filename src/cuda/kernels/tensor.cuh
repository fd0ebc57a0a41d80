// src/cuda/kernels/tensor.cuh: the CUDA backend's small data-movement kernels: broadcasts, sums of columns,
// elementwise GELU and adds, the patch and token embeddings' gathers and scatters, the pooling heads.
// Semantics are those of the ops in limoe/ops/ (the kernels add launch geometry only). No atomics: every
// output element is written by one thread, and every sum runs in a fixed order, so results do not depend on
// timing. Compiled by nvcc (src/cuda/backend.cu) and, in the tests, by g++ through tests/support/cuda_emu.hpp.
#pragma once

#include <cstdint>

#include "limoe/core/enums.hpp"
#include "limoe/math/bf16.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/ops/shapes.hpp"
#include "reduce.cuh"

namespace limoe::cuda::kernels {

#define LIMOE_GRID_STRIDE(i, n)                                                                             \
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);          \
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

// y[i] = v for i < n.
template <class T>
__global__ void fill(T* __restrict__ y, std::int64_t n, T v) {
  LIMOE_GRID_STRIDE(i, n) y[i] = v;
}

// y[r, :] = b for rows r < rows of width O (the bias a product then accumulates onto).
template <class T>
__global__ void fill_rows(const T* __restrict__ b, std::int64_t rows, std::int64_t O, T* __restrict__ y) {
  LIMOE_GRID_STRIDE(i, rows * O) y[i] = b[i % O];
}

// acc[c] += sum over r of g[r, c] (rows in order), one thread per column; g [R, C] with leading dimension ld.
template <class T>
__global__ void add_column_sums(const T* __restrict__ g, std::int64_t R, std::int64_t C, std::int64_t ld,
                                T* __restrict__ acc) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  T s = 0;
  for (std::int64_t r = 0; r < R; ++r) s += g[r * ld + c];
  acc[c] += s;
}

// y[i] += a[i].
template <class T>
__global__ void add(const T* __restrict__ a, std::int64_t n, T* __restrict__ y) {
  LIMOE_GRID_STRIDE(i, n) y[i] += a[i];
}

// dst[r * cols + c] = bf16(src[r * ld + c]) over a rows x cols block of leading dimension ld (the operands of a
// bf16 product, packed; math/bf16.hpp's rounding).
template <class T>
__global__ void to_bf16_block(const T* __restrict__ src, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                              std::uint16_t* __restrict__ dst) {
  LIMOE_GRID_STRIDE(i, rows * cols) dst[i] = math::bf16_round(static_cast<float>(src[(i / cols) * ld + i % cols]));
}

// The operand addresses of a grouped product (exec::gemm_grouped): up to kPointerChunk problems per launch,
// their byte offsets passed by value in the launch's arguments (no copy from host memory, which would make the
// host wait for the device), one thread per problem. out holds three arrays of G addresses (A's, B's, C's);
// this launch writes entries [first, first + n) of each.
inline constexpr int kPointerChunk = 64;
struct PointerChunk {
  std::int64_t a[kPointerChunk], b[kPointerChunk], c[kPointerChunk];  // byte offsets from the bases
  int n;
};
static __global__ void grouped_pointers(PointerChunk chunk, const char* A, const char* B, char* C, std::int64_t G,
                                        std::int64_t first, std::uintptr_t* __restrict__ out) {
  const int i = static_cast<int>(threadIdx.x);
  if (i >= chunk.n) return;
  out[first + i] = reinterpret_cast<std::uintptr_t>(A + chunk.a[i]);
  out[G + first + i] = reinterpret_cast<std::uintptr_t>(B + chunk.b[i]);
  out[2 * G + first + i] = reinterpret_cast<std::uintptr_t>(C + chunk.c[i]);
}

// Rows by index, one thread per element: gather dst[i, :] = src[idx[i], :]; scatter dst[idx[i], :] = src[i, :]
// (n rows of width D; the indices of a scatter are distinct, so no element is written twice).
template <class T>
__global__ void gather_rows(const T* __restrict__ src, const std::int64_t* __restrict__ idx, std::int64_t n,
                            std::int64_t D, T* __restrict__ dst) {
  LIMOE_GRID_STRIDE(i, n * D) dst[i] = src[idx[i / D] * D + i % D];
}
template <class T>
__global__ void scatter_rows(const T* __restrict__ src, const std::int64_t* __restrict__ idx, std::int64_t n,
                             std::int64_t D, T* __restrict__ dst) {
  LIMOE_GRID_STRIDE(i, n * D) dst[idx[i / D] * D + i % D] = src[i];
}

// y[r, :] += p[r % period, :] over rows of width D (position embeddings).
template <class T>
__global__ void add_periodic_rows(const T* __restrict__ p, std::int64_t rows, std::int64_t period, std::int64_t D,
                                  T* __restrict__ y) {
  LIMOE_GRID_STRIDE(i, rows * D) y[i] += p[((i / D) % period) * D + i % D];
}

// acc[n, :] += sum over b of g[b * period + n, :] (b in order), one thread per element of acc [period, D].
template <class T>
__global__ void add_periodic_sums(const T* __restrict__ g, std::int64_t rows, std::int64_t period, std::int64_t D,
                                  T* __restrict__ acc) {
  LIMOE_GRID_STRIDE(i, period * D) {
    const std::int64_t n = i / D, d = i % D;
    T s = 0;
    for (std::int64_t r = n; r < rows; r += period) s += g[r * D + d];
    acc[i] += s;
  }
}

// y = GELU(x), elementwise.
template <class T>
__global__ void gelu_forward(GeluKind kind, const T* __restrict__ x, std::int64_t n, T* __restrict__ y) {
  LIMOE_GRID_STRIDE(i, n) y[i] = math::gelu(kind, x[i]);
}

// Between images [B, H, W, C] and patches [B, N, P*P*C] (ops/embedding.hpp's order), one thread per patch
// element: to_patches copies image -> patch, else patch -> image (patches do not overlap: the adjoint).
template <class T>
__global__ void patch_copy(::limoe::detail::PatchGeom g, const T* __restrict__ src, T* __restrict__ dst, bool to_patches) {
  LIMOE_GRID_STRIDE(i, g.B * g.N * g.F) {
    const std::int64_t p = i / g.F, f = i % g.F;
    const std::int64_t b = p / g.N, n = p % g.N, py = n / g.nw, px = n % g.nw;
    const std::int64_t row = f / (g.P * g.C), within = f % (g.P * g.C);
    const std::int64_t img = ((b * g.H + py * g.P + row) * g.W + px * g.P) * g.C + within;
    if (to_patches) dst[i] = src[img];
    else dst[img] = src[i];
  }
}

// The first position i < n with ids[i] outside [0, V), or n when all are valid: one block, a min-reduction.
template <int kThreads>
__global__ void first_bad_id(const std::int32_t* __restrict__ ids, std::int64_t n, std::int64_t V,
                             std::int64_t* __restrict__ out) {
  __shared__ std::int64_t red[kThreads];
  std::int64_t first = n;
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads)
    if ((ids[i] < 0 || ids[i] >= V) && i < first) first = i;
  first = block_reduce<kThreads>(red, first, MinOp{});
  if (threadIdx.x == 0) *out = first;
}

// y[i, :] = table[ids[i], :] + pos[i % L, :] (pos may be null), ids already checked.
template <class T>
__global__ void token_embed_forward(const std::int32_t* __restrict__ ids, const T* __restrict__ table,
                                    const T* __restrict__ pos, std::int64_t n, std::int64_t L, std::int64_t D,
                                    T* __restrict__ y) {
  LIMOE_GRID_STRIDE(e, n * D) {
    const std::int64_t i = e / D, d = e % D;
    const T v = table[static_cast<std::int64_t>(ids[i]) * D + d];
    y[e] = pos ? v + pos[(i % L) * D + d] : v;
  }
}

// dtable[ids[i], d] += dy[i, d] and dpos[i % L, d] += dy[i, d] (either may be null), one thread per column d
// walking the tokens in order: repeated ids never race, and the sums run in token order.
template <class T>
__global__ void token_embed_backward(const std::int32_t* __restrict__ ids, const T* __restrict__ dy, std::int64_t n,
                                     std::int64_t L, std::int64_t D, T* dtable, T* dpos) {
  const std::int64_t d = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (std::int64_t i = 0; i < n; ++i) {
    const T g = dy[i * D + d];
    if (dtable) dtable[static_cast<std::int64_t>(ids[i]) * D + d] += g;
    if (dpos) dpos[(i % L) * D + d] += g;
  }
}

// gap / first / last pooling of x [B, N, D] -> y [B, D], one thread per output element (ops/pooling.hpp).
template <class T>
__global__ void pool_forward(Pooling kind, const T* __restrict__ x, const std::uint8_t* __restrict__ mask,
                             std::int64_t B, std::int64_t N, std::int64_t D, T* __restrict__ y) {
  LIMOE_GRID_STRIDE(i, B * D) {
    const std::int64_t b = i / D, c = i % D;
    const std::uint8_t* m = mask ? mask + b * N : nullptr;
    const T* xb = x + b * N * D;
    if (kind != Pooling::Gap) {
      y[i] = xb[(kind == Pooling::First ? 0 : ::limoe::detail::last_position(m, N)) * D + c];
      continue;
    }
    const std::int64_t count = ::limoe::detail::pool_count(m, N);
    T s = 0;
    for (std::int64_t n = 0; n < N; ++n)
      if (!m || m[n]) s += xb[n * D + c];
    y[i] = count == 0 ? T(0) : s * (T(1) / T(count));
  }
}

// dx [B, N, D] (overwritten) from dy [B, D], one thread per element of dx.
template <class T>
__global__ void pool_backward(Pooling kind, const std::uint8_t* __restrict__ mask, const T* __restrict__ dy,
                              std::int64_t B, std::int64_t N, std::int64_t D, T* __restrict__ dx) {
  LIMOE_GRID_STRIDE(i, B * N * D) {
    const std::int64_t b = i / (N * D), n = (i / D) % N, c = i % D;
    const std::uint8_t* m = mask ? mask + b * N : nullptr;
    T g = 0;
    if (kind == Pooling::Gap) {
      const std::int64_t count = ::limoe::detail::pool_count(m, N);
      if (count > 0 && (!m || m[n])) g = dy[b * D + c] * (T(1) / T(count));
    } else if (n == (kind == Pooling::First ? 0 : ::limoe::detail::last_position(m, N))) {
      g = dy[b * D + c];
    }
    dx[i] = g;
  }
}

}  // namespace limoe::cuda::kernels
