// limoe/core/params.hpp: every parameter of a model in one flat buffer, its gradient in another.
//
// Layers register their tensors by name (the docs/cli.md names) before `finalize()`, then read them through
// the returned ParamRef. One flat buffer makes the optimizer one loop, zeroing gradients one memset, and a
// checkpoint a walk over `entries()`. The store lives in one memory space (core/memory.hpp), the one its model's
// backend computes in; names, shapes and offsets are host data either way.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe {

struct ParamRef {
  int id = -1;
  bool valid() const { return id >= 0; }
};

template <class T, MemorySpace Space = HostSpace>
class ParamStore {
 public:
  using memory_space = Space;
  using view_type = View<T, Space>;
  using cview_type = CView<T, Space>;

  struct Entry {
    std::string name;
    Shape shape;
    index_t offset = 0;
    bool decay = false;  // weight decay applies (matrices), not to biases, norms, embeddings' positions
    // A shard: this tensor is part `shard` of `shards` equal parts, along its first axis, of the whole tensor
    // (experts sharded over ranks, docs/distributed.md); part 0 of 1 is a whole tensor.
    int shard = 0, shards = 1;
    Shape global_shape() const {
      Shape s = shape;
      if (s.rank() > 0) s[0] *= shards;
      return s;
    }
  };

  ParamRef add(const std::string& name, Shape shape, bool decay, int shard = 0, int shards = 1) {
    LIMOE_CHECK(!finalized_, "ParamStore::add(\"", name, "\"): the store is already finalized");
    LIMOE_CHECK(!index_.count(name), "ParamStore::add: duplicate parameter name \"", name, "\"");
    LIMOE_CHECK(shards >= 1 && shard >= 0 && shard < shards && (shards == 1 || shape.rank() > 0),
                "ParamStore::add(\"", name, "\"): shard ", shard, " of ", shards, " is not a part of a tensor");
    entries_.push_back({name, shape, size_, decay, shard, shards});
    size_ += shape.numel();
    index_[name] = static_cast<int>(entries_.size() - 1);
    return ParamRef{static_cast<int>(entries_.size() - 1)};
  }

  void finalize() {
    LIMOE_CHECK(!finalized_, "ParamStore::finalize: called twice");
    values_.resize(Shape{size_});
    finalized_ = true;
  }
  bool finalized() const { return finalized_; }

  // Every non-const access to the values counts as a change (version(): bf16 weight copies are made again).
  view_type value(ParamRef r) {
    ++version_;
    return view_type(values_.data() + at(r).offset, at(r).shape);
  }
  cview_type value(ParamRef r) const { return cview_type(values_.data() + at(r).offset, at(r).shape); }
  // The gradient buffer is allocated (zeroed) on first use, so a model used only for inference never pays
  // for it. The const accessors need it to exist already.
  view_type grad(ParamRef r) {
    ensure_grads();
    return view_type(grads_.data() + at(r).offset, at(r).shape);
  }
  cview_type grad(ParamRef r) const {
    check_grads();
    return cview_type(grads_.data() + at(r).offset, at(r).shape);
  }

  std::optional<ParamRef> find(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) return std::nullopt;
    return ParamRef{it->second};
  }
  ParamRef get(const std::string& name) const {
    auto r = find(name);
    LIMOE_CHECK(r.has_value(), "no parameter named \"", name, "\"");
    return *r;
  }

  const std::vector<Entry>& entries() const { return entries_; }
  const Entry& entry(ParamRef r) const { return at(r); }
  index_t size() const { return size_; }
  view_type values() {
    ++version_;
    return values_.view();
  }
  std::uint64_t version() const { return version_; }
  cview_type values() const { return values_.view(); }
  view_type grads() {
    ensure_grads();
    return grads_.view();
  }
  cview_type grads() const {
    check_grads();
    return grads_.view();
  }
  void zero_grad() {
    if (grads_.numel() == size_) grads_.zero();
    else ensure_grads();
  }
  bool has_grads() const { return finalized_ && grads_.numel() == size_; }

 private:
  const Entry& at(ParamRef r) const {
    LIMOE_CHECK(finalized_, "ParamStore: finalize() before reading parameters");
    LIMOE_CHECK(r.id >= 0 && r.id < static_cast<int>(entries_.size()), "ParamStore: invalid ParamRef ", r.id);
    return entries_[static_cast<std::size_t>(r.id)];
  }

  void ensure_grads() {
    LIMOE_CHECK(finalized_, "ParamStore: finalize() before using gradients");
    if (grads_.numel() != size_) grads_.resize(Shape{size_});
  }
  void check_grads() const {
    LIMOE_CHECK(has_grads(), "ParamStore: no gradients yet (call zero_grad() or a backward pass first)");
  }

  std::vector<Entry> entries_;
  std::unordered_map<std::string, int> index_;
  index_t size_ = 0;
  bool finalized_ = false;
  std::uint64_t version_ = 0;
  Tensor<T, Space> values_, grads_;
};

}  // namespace limoe
