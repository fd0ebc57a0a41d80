// limoe/core/parallel.hpp: the one thread pool (oneTBB) and the parallel-for every CPU op uses.
//
// oneTBB owns the threads. `set_num_threads(n)` caps the whole process; kernels inside a parallel region run
// single-threaded (the Eigen products here are never threaded by Eigen itself).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>

#include "limoe/core/error.hpp"

namespace limoe {

namespace detail {
struct ThreadLimit {
  std::mutex mu;
  std::unique_ptr<tbb::global_control> control;
  int threads = 0;  // 0: oneTBB's default
};
inline ThreadLimit& thread_limit() {
  static ThreadLimit limit;
  return limit;
}

// Per-thread scratch that a call nested on the same thread (a task stolen while waiting) cannot clobber: each
// live lease holds its own buffer, taken in stack order; buffers are kept, so steady state allocates nothing.
template <class U>
class ScratchLease {
 public:
  explicit ScratchLease(std::int64_t n) {
    Stack& s = stack();
    if (s.bufs.size() <= s.depth) s.bufs.emplace_back();
    auto& b = s.bufs[s.depth++];
    if (b.size() < static_cast<std::size_t>(n)) b.resize(static_cast<std::size_t>(n));
    p_ = b.data();
  }
  ~ScratchLease() { --stack().depth; }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  U* data() const { return p_; }

 private:
  struct Stack {
    std::vector<std::vector<U>> bufs;
    std::size_t depth = 0;
  };
  static Stack& stack() {
    thread_local Stack s;
    return s;
  }
  U* p_ = nullptr;
};
}  // namespace detail

// Caps the number of worker threads for the whole process (0 restores oneTBB's default).
inline void set_num_threads(int n) {
  LIMOE_CHECK(n >= 0, "set_num_threads: thread count must be >= 0, got ", n);
  auto& l = detail::thread_limit();
  std::lock_guard<std::mutex> lock(l.mu);
  l.control.reset();
  if (n > 0) l.control = std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, n);
  l.threads = n;
}

inline int num_threads() {
  return static_cast<int>(tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism));
}

// Calls fn(begin, end) on sub-ranges of [begin, end) of at least `grain` items, in parallel.
// The split depends only on the range and grain, so per-range results are deterministic.
template <class Fn>
void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain, Fn&& fn) {
  if (end <= begin) return;
  if (grain < 1) grain = 1;
  if (end - begin <= grain || num_threads() == 1) {
    fn(begin, end);
    return;
  }
  tbb::parallel_for(
      tbb::blocked_range<std::int64_t>(begin, end, grain),
      [&](const tbb::blocked_range<std::int64_t>& r) { fn(r.begin(), r.end()); }, tbb::simple_partitioner());
}

// fn(i) for every i of [begin, end), in the tasks of parallel_for(begin, end, grain, ...).
template <class Fn>
void parallel_for_each_index(std::int64_t begin, std::int64_t end, std::int64_t grain, Fn&& fn) {
  parallel_for(begin, end, grain, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) fn(i);
  });
}

}  // namespace limoe
