// limoe/core/tensor.hpp: row-major dense tensors: an owning Tensor<T> and a non-owning View<T>.
//
// Shapes have at most 4 dimensions (B, N, D style); every tensor is contiguous and row-major, so a view is a
// pointer and a shape. Shapes are checked at the boundaries with messages that name both shapes.
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
#include <vector>

#include "limoe/core/error.hpp"

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

// Non-owning view of contiguous row-major data. View<const T> is the read-only form.
template <class T>
class View {
 public:
  using value_type = std::remove_const_t<T>;

  View() = default;
  View(T* data, Shape shape) : data_(data), shape_(shape) {}
  // A View<T> converts to a View<const T>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  View(const View<U>& other) : data_(other.data()), shape_(other.shape()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  index_t numel() const { return shape_.numel(); }
  bool empty() const { return data_ == nullptr; }
  std::span<T> span() const { return {data_, static_cast<std::size_t>(numel())}; }

  T& operator[](index_t i) const { return data_[i]; }
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

template <class T>
using CView = View<const T>;

namespace detail {
// 64-byte aligned allocator so vectorised kernels see aligned rows.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    if (n == 0) return nullptr;
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kAlign}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kAlign}); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};
}  // namespace detail

template <class T>
using aligned_vector = std::vector<T, detail::AlignedAllocator<T>>;

// Owning tensor, zero-initialised.
template <class T>
class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape) : shape_(shape), data_(static_cast<std::size_t>(shape.numel()), T{}) {}
  Tensor(Shape shape, T fill) : shape_(shape), data_(static_cast<std::size_t>(shape.numel()), fill) {}

  static Tensor from(Shape shape, std::initializer_list<T> values) {
    LIMOE_CHECK(static_cast<index_t>(values.size()) == shape.numel(), "Tensor::from: ", values.size(),
                " values for shape ", shape.str());
    Tensor t(shape);
    std::copy(values.begin(), values.end(), t.data());
    return t;
  }
  template <class U>
  static Tensor copy_of(View<U> v) {
    Tensor t(v.shape());
    for (index_t i = 0; i < v.numel(); ++i) t.data()[i] = static_cast<T>(v[i]);
    return t;
  }

  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  index_t numel() const { return shape_.numel(); }
  T& operator[](index_t i) { return data_[static_cast<std::size_t>(i)]; }
  const T& operator[](index_t i) const { return data_[static_cast<std::size_t>(i)]; }

  View<T> view() { return View<T>(data(), shape_); }
  CView<T> view() const { return CView<T>(data(), shape_); }
  CView<T> cview() const { return CView<T>(data(), shape_); }
  operator View<T>() { return view(); }
  operator CView<T>() const { return view(); }

  // Changes the shape; reuses the buffer when it is large enough (no shrink), zero-fills new elements.
  void resize(Shape shape) {
    shape_ = shape;
    data_.resize(static_cast<std::size_t>(shape.numel()));
  }
  void fill(T v) { std::fill(data_.begin(), data_.end(), v); }
  void zero() { fill(T{}); }

 private:
  Shape shape_;
  aligned_vector<T> data_;
};

// Checks that a view has exactly the expected shape; `what` names the argument in the message.
template <class T>
void expect_shape(const View<T>& v, const Shape& expected, const char* what) {
  LIMOE_CHECK(v.shape() == expected, what, ": expected shape ", expected.str(), ", got ", v.shape().str());
}

}  // namespace limoe
