// limoe/core/tensor.hpp: row-major dense tensors: an owning Tensor<T, Space> and a non-owning View<T, Space>.
//
// Shapes have at most 4 dimensions (B, N, D style); every tensor is contiguous and row-major, so a view is a
// pointer and a shape. Shapes are checked at the boundaries with messages that name both shapes.
//
// Every tensor and view knows its memory space (core/memory.hpp): HostSpace by default; a backend whose memory
// the host cannot read (the CUDA backend's device space) gets views without element access, so host code that
// would read device memory does not compile. A view converts only within its space.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/memory.hpp"

namespace limoe {

using index_t = std::int64_t;

// A shape of rank 0..4. Rank 0 is a scalar of one element.
class Shape {
 public:
  static constexpr int kMaxRank = 4;

  Shape() = default;
  Shape(std::initializer_list<index_t> dims) {
    LIMOE_CHECK(dims.size() <= kMaxRank, "Shape: rank ", dims.size(), " exceeds the maximum of ", kMaxRank);
    for (index_t d : dims) push(d);
  }
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push(static_cast<index_t>(*first));
  }

  int rank() const { return rank_; }
  index_t operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }
  index_t& operator[](int i) { return dims_[static_cast<std::size_t>(i)]; }
  const index_t* begin() const { return dims_.data(); }
  const index_t* end() const { return dims_.data() + rank_; }
  index_t back() const { return dims_[static_cast<std::size_t>(rank_ - 1)]; }

  index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }

  void push(index_t d) {
    LIMOE_CHECK(rank_ < kMaxRank, "Shape: rank exceeds the maximum of ", kMaxRank);
    LIMOE_CHECK(d >= 0, "Shape: negative dimension ", d);
    dims_[static_cast<std::size_t>(rank_++)] = d;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)]) return false;
    return true;
  }

  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[static_cast<std::size_t>(i)]);
    return s + "]";
  }

 private:
  std::array<index_t, kMaxRank> dims_{};
  int rank_ = 0;
};

// Non-owning view of contiguous row-major data in memory space `Space`. View<const T> is the read-only form.
template <class T, MemorySpace Space = HostSpace>
class View {
 public:
  using value_type = std::remove_const_t<T>;
  using memory_space = Space;

  View() = default;
  View(T* data, Shape shape) : data_(data), shape_(shape) {}
  // A View<T> converts to a View<const T> (same space).
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  View(const View<U, Space>& other) : data_(other.data()), shape_(other.shape()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  index_t numel() const { return shape_.numel(); }
  bool empty() const { return data_ == nullptr; }
  // Element access: host-readable spaces only.
  std::span<T> span() const
    requires Space::host_accessible
  {
    return {data_, static_cast<std::size_t>(numel())};
  }
  T& operator[](index_t i) const
    requires Space::host_accessible
  {
    return data_[i];
  }
  // Row r of a tensor viewed as [rows, back()].
  T* row(index_t r) const { return data_ + r * shape_.back(); }

  // The same data under another shape with the same number of elements.
  View reshape(Shape s) const {
    LIMOE_CHECK(s.numel() == numel(), "reshape: cannot view ", shape_.str(), " as ", s.str());
    return View(data_, s);
  }
  // Rows [begin, end) along the first dimension.
  View slice(index_t begin, index_t end) const {
    LIMOE_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= dim(0), "slice: rows [", begin, ", ", end,
                ") out of range for shape ", shape_.str());
    Shape s = shape_;
    s[0] = end - begin;
    return View(data_ + begin * (numel() / std::max<index_t>(dim(0), 1)), s);
  }
  // Sub-tensor i along the first dimension (rank drops by one).
  View operator()(index_t i) const {
    LIMOE_CHECK(rank() >= 1 && 0 <= i && i < dim(0), "index ", i, " out of range for shape ", shape_.str());
    Shape s;
    for (int k = 1; k < rank(); ++k) s.push(shape_[k]);
    return View(data_ + i * s.numel(), s);
  }

 private:
  T* data_ = nullptr;
  Shape shape_;
};

template <class T, MemorySpace Space = HostSpace>
using CView = View<const T, Space>;

// Owning tensor in memory space `Space`, zero-initialised; storage is 64-byte aligned (Space::allocate), so
// vectorised kernels see aligned rows. Element types are trivially copyable (the storage is raw memory).
template <class T, MemorySpace Space = HostSpace>
class Tensor {
  static_assert(std::is_trivially_copyable_v<T>, "Tensor<T>: T must be trivially copyable");

 public:
  using memory_space = Space;

  Tensor() = default;
  explicit Tensor(Shape shape) { resize(shape); }
  Tensor(Shape shape, T fill)
    requires Space::host_accessible
  {
    resize(shape);
    this->fill(fill);
  }
  Tensor(const Tensor& o) : shape_(o.shape_) {
    reserve_exact(o.size_);
    size_ = o.size_;
    if (size_) Space::copy(data_.get(), o.data_.get(), bytes(size_));
  }
  Tensor(Tensor&& o) noexcept
      : shape_(o.shape_), data_(std::move(o.data_)), size_(std::exchange(o.size_, 0)), cap_(std::exchange(o.cap_, 0)) {
    o.shape_ = Shape{0};  // moved-from: empty (no elements, no storage)
  }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      Tensor t(o);
      *this = std::move(t);
    }
    return *this;
  }
  Tensor& operator=(Tensor&& o) noexcept {
    shape_ = std::exchange(o.shape_, Shape{0});
    data_ = std::move(o.data_);
    size_ = std::exchange(o.size_, 0);
    cap_ = std::exchange(o.cap_, 0);
    return *this;
  }

  static Tensor from(Shape shape, std::initializer_list<T> values)
    requires Space::host_accessible
  {
    LIMOE_CHECK(static_cast<index_t>(values.size()) == shape.numel(), "Tensor::from: ", values.size(),
                " values for shape ", shape.str());
    Tensor t(shape);
    std::copy(values.begin(), values.end(), t.data());
    return t;
  }
  template <class U>
  static Tensor copy_of(View<U> v)
    requires Space::host_accessible
  {
    Tensor t(v.shape());
    for (index_t i = 0; i < v.numel(); ++i) t.data()[i] = static_cast<T>(v[i]);
    return t;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  index_t numel() const { return shape_.numel(); }
  T& operator[](index_t i)
    requires Space::host_accessible
  {
    return data_.get()[i];
  }
  const T& operator[](index_t i) const
    requires Space::host_accessible
  {
    return data_.get()[i];
  }

  View<T, Space> view() { return View<T, Space>(data(), shape_); }
  CView<T, Space> view() const { return CView<T, Space>(data(), shape_); }
  CView<T, Space> cview() const { return CView<T, Space>(data(), shape_); }
  operator View<T, Space>() { return view(); }
  operator CView<T, Space>() const { return view(); }

  // Changes the shape; keeps the elements that remain, reuses the buffer when it is large enough (no shrink)
  // and zero-fills elements that are new (the semantics of std::vector::resize, growth included: a buffer that
  // grows past its capacity takes at least twice its size, so a buffer whose size varies from call to call,
  // such as the MoE layer's accepted rows, stops reallocating after a few calls).
  void resize(Shape shape) {
    const index_t n = shape.numel();
    if (n > cap_) {
      std::unique_ptr<T[], Deleter> old = std::move(data_);
      const index_t keep = size_;
      reserve_exact(std::max(n, 2 * size_));
      if (keep) Space::copy(data_.get(), old.get(), bytes(keep));
    }
    if (n > size_) Space::zero(data_.get() + size_, bytes(n - size_));
    size_ = n;
    shape_ = shape;
  }
  void fill(T v)
    requires Space::host_accessible
  {
    std::fill(data_.get(), data_.get() + size_, v);
  }
  void zero() {
    if (size_) Space::zero(data_.get(), bytes(size_));
  }

 private:
  struct Deleter {
    std::size_t bytes = 0;
    void operator()(T* p) const { Space::deallocate(p, bytes); }
  };
  static std::size_t bytes(index_t n) { return static_cast<std::size_t>(n) * sizeof(T); }
  void reserve_exact(index_t n) {
    data_.reset();
    cap_ = 0;
    if (n == 0) return;
    data_ = std::unique_ptr<T[], Deleter>(static_cast<T*>(Space::allocate(bytes(n))), Deleter{bytes(n)});
    cap_ = n;
  }

  Shape shape_;
  std::unique_ptr<T[], Deleter> data_;
  index_t size_ = 0, cap_ = 0;
};

// Checks that a view has exactly the expected shape; `what` names the argument in the message.
template <class T, class Space>
void expect_shape(const View<T, Space>& v, const Shape& expected, const char* what) {
  LIMOE_CHECK(v.shape() == expected, what, ": expected shape ", expected.str(), ", got ", v.shape().str());
}

// ---- between host memory and a space (core/memory.hpp: upload, download) ----

// Host elements into a view of space S, and a view of space S into host elements: same number of elements.
template <class T, MemorySpace S>
void copy_from_host(CView<T> src, View<T, S> dst) {
  LIMOE_CHECK(src.numel() == dst.numel(), "copy_from_host: ", src.shape().str(), " into ", dst.shape().str());
  if (src.numel() > 0) S::upload(dst.data(), src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T));
}
template <class T, MemorySpace S>
void copy_to_host(CView<T, S> src, View<T> dst) {
  LIMOE_CHECK(src.numel() == dst.numel(), "copy_to_host: ", src.shape().str(), " into ", dst.shape().str());
  if (src.numel() > 0) S::download(dst.data(), src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T));
}
// Within one space (a device-to-device copy on a GPU: no wait for the host): same number of elements.
template <class T, MemorySpace S>
void copy_within(CView<T, S> src, View<T, S> dst) {
  LIMOE_CHECK(src.numel() == dst.numel(), "copy_within: ", src.shape().str(), " into ", dst.shape().str());
  if (src.numel() > 0) S::copy(dst.data(), src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T));
}
// A host copy of a view of any space.
template <class T, MemorySpace S>
Tensor<std::remove_const_t<T>> to_host(View<T, S> v) {
  using U = std::remove_const_t<T>;
  Tensor<U> h(v.shape());
  copy_to_host<U, S>(v, h.view());
  return h;
}
// Host data seen from space S: the data itself when S is host memory, else a copy of it in `buf` (resized).
template <MemorySpace S, class T>
CView<T, S> host_into(CView<T> host, Tensor<T, S>& buf) {
  if constexpr (std::is_same_v<S, HostSpace>) {
    return host;
  } else {
    if (host.empty()) return {};
    buf.resize(host.shape());
    copy_from_host<T, S>(host, buf.view());
    return buf.cview();
  }
}
// Data of space S seen from the host: the data itself when S is host memory, else a copy of it in `buf`.
template <class T, MemorySpace S>
CView<T> host_view(CView<T, S> v, Tensor<T>& buf) {
  if constexpr (std::is_same_v<S, HostSpace>) {
    return v;
  } else {
    if (v.empty()) return {};
    buf.resize(v.shape());
    copy_to_host<T, S>(v, buf.view());
    return buf.cview();
  }
}

}  // namespace limoe
