// limoe/core/policies.hpp: the precision policy types alone (core/precision.hpp adds the bf16 weight mirror,
// the conversions over the thread pool and the concept), so code compiled by nvcc (the CUDA backend's
// declarations, backend/cuda_ops.hpp) names the same types the model passes without the CPU's machinery.
#pragma once

#include <cstdint>

#include "limoe/core/tensor.hpp"

namespace limoe {

// bf16: the upper 16 bits of an IEEE binary32 (8 exponent bits, 7 stored mantissa bits).
using bf16_bits = std::uint16_t;

// Packed copies of a host mirror's weights in the product library's own layout (core/precision.hpp).
class PackedWeights;

// Where the bf16 copy of a flat float buffer lives: lo[i] is base[i] rounded (core/precision.hpp's
// BasicWeightMirror makes it, in host or device memory). find() is pointer arithmetic only, so host code finds
// a device copy without reading it.
struct Bf16Copies {
  const float* base = nullptr;
  index_t size = 0;
  const bf16_bits* lo = nullptr;
  // Where the products may keep these weights packed for their kernel (a host mirror's store, made again with
  // the copy); nullptr for activations and device copies.
  PackedWeights* packed = nullptr;
  // The copy of the n floats at p, when they lie inside the buffer; nullptr otherwise.
  const bf16_bits* find(const float* p, index_t n) const {
    const index_t i = lo ? offset_in(base, size, p, n) : -1;
    return i >= 0 ? lo + i : nullptr;
  }
  // Where the n floats at p start inside the `size` floats at base: their index, or -1 when not all inside.
  static index_t offset_in(const float* base, index_t size, const float* p, index_t n) {
    const auto a = reinterpret_cast<std::uintptr_t>(p), b = reinterpret_cast<std::uintptr_t>(base);
    if (base == nullptr || p == nullptr || a < b || n < 0 || (a - b) % sizeof(float) != 0) return -1;
    const auto i = static_cast<index_t>((a - b) / sizeof(float));
    return i + n <= size ? i : -1;
  }
};

// A flat fp32 parameter buffer in host memory whose weights the fp32 products may keep packed for their kernel
// (Fp32's counterpart of Bf16Copies::packed; a model hands it to its evaluation forwards, core/precision.hpp).
struct Fp32Weights {
  const float* base = nullptr;
  index_t size = 0;
  PackedWeights* packed = nullptr;
  // The store for the n floats at p, when they lie inside the buffer; nullptr otherwise.
  PackedWeights* find(const float* p, index_t n) const {
    return packed && Bf16Copies::offset_in(base, size, p, n) >= 0 ? packed : nullptr;
  }
};

// Every product in fp32 (the default policy). `weights`: where the products may keep a model's weights packed
// (empty by default: every product packs its operands itself, as before there was a store).
struct Fp32 {
  static constexpr const char* name = "fp32";
  static constexpr bool mixed = false;
  Fp32Weights weights{};
};

// The matrix products read bf16 operands and accumulate in fp32 (core/precision.hpp explains the split).
struct Bf16Mixed {
  static constexpr const char* name = "bf16";
  static constexpr bool mixed = true;
  // Where the weights' bf16 copies are found (a model points it at its own mirror, in the memory of its
  // backend); operands not found there are rounded as they enter the product.
  Bf16Copies weights{};
  // Activations an op has rounded once for several of its products (the RoundedOnce helpers of the backends:
  // attention's input for its q, k and v projections, a linear layer's output gradient for its input and
  // weight gradients), found like the weights. At most kActs; with() leaves a policy that is full unchanged
  // (the products then round that activation themselves: slower, the same bits).
  static constexpr int kActs = 6;
  Bf16Copies acts[kActs]{};
  const bf16_bits* find(const float* p, index_t n) const {
    if (const bf16_bits* w = weights.find(p, n)) return w;
    for (const Bf16Copies& a : acts)
      if (const bf16_bits* w = a.find(p, n)) return w;
    return nullptr;
  }
  // This policy, also knowing that the n floats at p are rounded at lo.
  Bf16Mixed with(const float* p, index_t n, const bf16_bits* lo) const {
    Bf16Mixed r = *this;
    for (Bf16Copies& a : r.acts)
      if (a.lo == nullptr) {
        a = Bf16Copies{p, n, lo, nullptr};
        break;
      }
    return r;
  }
};

}  // namespace limoe
