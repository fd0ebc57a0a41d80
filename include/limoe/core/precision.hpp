// limoe/core/precision.hpp: the precision policy, a type a model is composed from (docs/precision.md).
//
//   Fp32       every product in fp32 (the default; what the model computed before policies existed).
//   Bf16Mixed  the products (linear layers, q/k/v/o projections, attention's per-head score and context
//              products, the patch embedding, the pooling heads' projections and MLP, the experts; forward and
//              backward) read their operands rounded to bf16 and accumulate in fp32: weights are read from a
//              bf16 copy made once per optimizer step (WeightMirror), activations are rounded as they enter the
//              product. Everything else stays fp32: the stored activations (attention scores, probabilities
//              and contexts included), router logits and gates (so routing is decided on fp32 gates), softmax,
//              LayerNorm statistics, the contrastive logits, the auxiliary and contrastive losses, the master
//              weights and AdamW's moments. The CUDA backend uses the same split (docs/cuda.md).
//
// A policy is passed to the ops that hold a large product as their last argument (`Fp32{}` by default), so
// the op tables (backend/ops.hpp) forward it unchanged; the Ref backend reads a Bf16Mixed policy as "round
// both operands to bf16, accumulate exactly", the independent reference of the fast path.
#pragma once

#include <atomic>
#include <bit>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/policies.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/bf16.hpp"

namespace limoe {

// Round to nearest, ties to even; NaN stays NaN (quiet), infinities stay infinite (math/bf16.hpp).
inline bf16_bits to_bf16(float x) { return math::bf16_round(x); }
inline float from_bf16(bf16_bits b) { return math::bf16_value(b); }
// x rounded to the nearest bf16, as a float.
inline float round_bf16(float x) { return from_bf16(to_bf16(x)); }
inline double round_bf16(double x) { return from_bf16(to_bf16(static_cast<float>(x))); }

// n floats to bf16 (any thread count gives the same bits: the rounding is per element).
inline void to_bf16(const float* x, index_t n, bf16_bits* out) {
  for (index_t i = 0; i < n; ++i) out[i] = to_bf16(x[i]);
}
// The same over the thread pool, for large buffers.
inline void to_bf16_parallel(const float* x, index_t n, bf16_bits* out) {
  parallel_for(0, n, 1 << 16, [&](index_t i0, index_t i1) { to_bf16(x + i0, i1 - i0, out + i0); });
}

// Packed copies of a host mirror's weights in a product library's own layout (core/gemm_mixed.hpp keeps oneDNN's
// blocked bf16 layout of a forward product's weight blocks here), made on a block's first use and kept until the
// mirror is made again (which clears them): the packing a product would otherwise do inside every call is done
// once per set of weights. A model hands the store to the products of its evaluation forwards only (Limoe::prec),
// unless the processor has AMX: a training step reads each forward weight once or twice before the optimizer
// changes it, so oneDNN's packing there is a pass over every weight and a second copy in memory for nothing
// (measured: the S/32 bf16 training step 6-10% slower, +500 MB), where an evaluation or an embedding reads the
// same weights batch after batch; the AMX tile kernel's packing (core/amx.hpp) pays within one product. An entry is
// whatever the library keeps (type-erased); get() may be called from any thread, and callers of one key wait
// for the one that makes it. clear() must not run during a product.
class PackedWeights {
 public:
  // The weight block's first element, its shape and leading dimension as the product reads it.
  // `layout`: which packing (0: oneDNN's; 1, 2: the AMX tile kernel's of W^T and of B as it lies, core/amx.hpp).
  struct Key {
    const void* p;
    index_t rows, cols, ld;
    int layout = 0;
    bool operator==(const Key&) const = default;
  };
  // The entry for key: made by make() (returning std::shared_ptr<const void>) when there is none yet.
  template <class Make>
  std::shared_ptr<const void> get(const Key& key, Make&& make) {
    std::shared_ptr<Slot> slot;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::shared_ptr<Slot>& s = slots_[key];
      if (!s) s = std::make_shared<Slot>();
      slot = s;
    }
    std::lock_guard<std::mutex> lock(slot->mu);
    if (!slot->value) {
      slot->value = make();
      made_.fetch_add(1, std::memory_order_relaxed);
    }
    return slot->value;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    slots_.clear();
  }
  // Packed entries held now, and packed copies made since construction (tests).
  std::size_t entries() const {
    std::lock_guard<std::mutex> lock(mu_);
    return slots_.size();
  }
  std::uint64_t made() const { return made_.load(std::memory_order_relaxed); }

 private:
  struct Slot {
    std::mutex mu;
    std::shared_ptr<const void> value;
  };
  struct Hash {
    std::size_t operator()(const Key& k) const {
      std::size_t h = std::hash<const void*>()(k.p);
      for (index_t x : {k.rows, k.cols, k.ld, static_cast<index_t>(k.layout)}) h = h * 1000003u ^ std::hash<index_t>()(x);
      return h;
    }
  };
  mutable std::mutex mu_;
  std::unordered_map<Key, std::shared_ptr<Slot>, Hash> slots_;
  std::atomic<std::uint64_t> made_{0};
};

// The bf16 copy of a whole flat parameter buffer (core/params.hpp), in memory space S, made again only when the
// buffer's version changes (the optimizer's step, a load, init: every non-const access to the values bumps it).
// On host memory it converts over the thread pool; a device model passes its backend's conversion
// (Ops<B, T>::to_bf16) to refresh.
template <class S = HostSpace>
class BasicWeightMirror {
 public:
  // Converts when `version` differs from the copy's (or the buffer moved): convert(base, size, out) writes the
  // copy into out (size elements in memory of S). Returns whether it converted.
  template <class Convert>
  bool refresh(const float* base, index_t size, std::uint64_t version, Convert&& convert) {
    if (base == base_ && size == size_ && version == version_ && valid_) return false;
    valid_ = false;
    lo_.resize(Shape{size});
    convert(base, size, lo_.data());
    drop_packed();
    base_ = base;
    size_ = size;
    version_ = version;
    valid_ = true;
    ++conversions_;
    return true;
  }
  bool refresh(const float* base, index_t size, std::uint64_t version)
    requires S::host_accessible
  {
    return refresh(base, size, version, [](const float* x, index_t n, bf16_bits* out) { to_bf16_parallel(x, n, out); });
  }
  // The same for a parameter store in host memory (core/params.hpp): its flat values and their version.
  template <class Store>
  bool refresh(const Store& ps)
    requires S::host_accessible
  {
    return refresh(ps.values().data(), ps.size(), ps.version());
  }
  // Where the copy is (what a Bf16Mixed policy carries); empty before the first refresh.
  // On host memory the copies carry the mirror's store of packed weights (PackedWeights).
  Bf16Copies copies() const { return valid_ ? Bf16Copies{base_, size_, lo_.data(), packed_.p.get()} : Bf16Copies{}; }
  // The packed copies (host memory; nullptr on a device), and dropping them (a training forward after an
  // evaluation one: the model's weights are about to change).
  const PackedWeights* packed() const { return packed_.p.get(); }
  void drop_packed() {
    if (packed_.p) packed_.p->clear();
  }
  // The bf16 copy of the n floats at p, when they lie inside the mirrored buffer; nullptr otherwise.
  const bf16_bits* find(const float* p, index_t n) const { return copies().find(p, n); }
  // How many times the copy was made (tests: once per optimizer step).
  std::uint64_t conversions() const { return conversions_; }

 private:
  const float* base_ = nullptr;
  index_t size_ = 0;
  std::uint64_t version_ = 0, conversions_ = 0;
  bool valid_ = false;
  Tensor<bf16_bits, S> lo_;
  // Each mirror its own store: a copy starts with an empty one (its bf16 copy is another buffer), an assigned
  // mirror drops what it had.
  struct OwnStore {
    std::unique_ptr<PackedWeights> p;
    OwnStore() : p(S::host_accessible ? std::make_unique<PackedWeights>() : nullptr) {}
    OwnStore(const OwnStore&) : OwnStore() {}
    OwnStore& operator=(const OwnStore&) {
      if (p) p->clear();
      return *this;
    }
    OwnStore(OwnStore&&) noexcept = default;
    OwnStore& operator=(OwnStore&&) noexcept = default;
  };
  OwnStore packed_;
};
using WeightMirror = BasicWeightMirror<HostSpace>;

// The fp32 counterpart of a mirror's store: packed copies of a host parameter buffer's weights for the fp32
// products (PackedWeights; core/gemm_mixed.hpp, gemm_f32_packed), emptied when the buffer changes (its version:
// the optimizer's step, a load, init) or moves. A model hands it to its evaluation forwards (Limoe::prec).
class Fp32WeightStore {
 public:
  Fp32WeightStore() = default;
  // A copy starts with an empty store (it describes another buffer), as a mirror's copy does.
  Fp32WeightStore(const Fp32WeightStore&) : Fp32WeightStore() {}
  Fp32WeightStore& operator=(const Fp32WeightStore&) {
    clear();
    return *this;
  }
  // What an Fp32 policy carries for the buffer as it is now: the store, emptied first if the buffer changed.
  Fp32Weights weights(const float* base, index_t size, std::uint64_t version) {
    if (base != base_ || size != size_ || version != version_) {
      clear();
      base_ = base, size_ = size, version_ = version;
    }
    return Fp32Weights{base, size, store_.get()};
  }
  void clear() {
    store_->clear();
    base_ = nullptr, size_ = 0, version_ = 0;
  }
  const PackedWeights& packed() const { return *store_; }

 private:
  std::unique_ptr<PackedWeights> store_ = std::make_unique<PackedWeights>();
  const float* base_ = nullptr;
  index_t size_ = 0;
  std::uint64_t version_ = 0;
};

template <class P>
concept PrecisionPolicy = std::same_as<P, Fp32> || std::same_as<P, Bf16Mixed>;

// The policies by their command-line names (`--precision fp32|bf16`).
enum class PrecisionKind { Fp32, Bf16 };
inline PrecisionKind parse_precision(std::string_view s) {
  if (s == "fp32") return PrecisionKind::Fp32;
  if (s == "bf16") return PrecisionKind::Bf16;
  throw Error("unknown precision \"" + std::string(s) + "\" (expected fp32 or bf16)");
}
inline const char* precision_name(PrecisionKind p) { return p == PrecisionKind::Bf16 ? "bf16" : "fp32"; }

// An operand of a mixed product, rounded the way the policy reads it (the Ref backend's loops).
template <class T, class P>
inline T operand(T x) {
  if constexpr (P::mixed) return static_cast<T>(round_bf16(x));
  else return x;
}

}  // namespace limoe
