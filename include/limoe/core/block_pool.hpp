// limoe/core/block_pool.hpp: a caching allocator for a memory space whose allocations are slow or synchronise
// (cudaMalloc / cudaFree: cudaFree waits for the whole device). Freed blocks are kept per size class and
// handed out again, so a training loop that allocates the same scratch every step allocates from the device
// only in its first steps. CudaSpace (core/cuda_space.hpp) and the tests' emulated device space allocate
// through one.
//
// Size classes: requests are rounded up to a multiple of 512 bytes below 1 MiB, and above it to one of eight
// steps per power of two (at most 12.5% more than asked), so a buffer whose size varies a little from call to
// call still finds its block. When the raw allocation fails, every cached block is returned to the space and the
// allocation is tried once more before the failure is reported. Thread-safe (one mutex; allocation is rare on
// the hot path once the cache is warm).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace limoe {

// Raw: static void* allocate(std::size_t) (nullptr on failure, never throws), static void release(void*,
// std::size_t).
template <class Raw>
class BlockPool {
 public:
  struct Stats {
    std::size_t raw_allocations = 0, raw_releases = 0, hits = 0, cached_bytes = 0, live_bytes = 0;
  };

  // The bytes a request of `bytes` occupies (its size class).
  static std::size_t size_class(std::size_t bytes) {
    constexpr std::size_t kSmall = std::size_t{1} << 20, kGrain = 512;
    if (bytes <= kSmall) return (bytes + kGrain - 1) / kGrain * kGrain;
    const std::size_t top = std::bit_floor(bytes), step = top / 8;  // eight steps per power of two
    return (bytes + step - 1) / step * step;
  }

  // A block of at least `bytes`; nullptr only when the space has no memory even after the cache is emptied.
  void* allocate(std::size_t bytes) {
    const std::size_t c = size_class(bytes);
    std::lock_guard lock(mutex_);
    if (auto it = free_.find(c); it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      ++stats_.hits;
      stats_.cached_bytes -= c;
      stats_.live_bytes += c;
      return p;
    }
    void* p = Raw::allocate(c);
    if (p == nullptr && stats_.cached_bytes > 0) {
      release_locked();
      p = Raw::allocate(c);
    }
    if (p != nullptr) ++stats_.raw_allocations, stats_.live_bytes += c;
    return p;
  }
  // Returns a block of `bytes` (the size it was asked for) to the cache.
  void deallocate(void* p, std::size_t bytes) noexcept {
    if (p == nullptr) return;
    const std::size_t c = size_class(bytes);
    std::lock_guard lock(mutex_);
    try {
      free_[c].push_back(p);
    } catch (...) {  // no memory for the list: give the block back instead of caching it
      Raw::release(p, c);
      ++stats_.raw_releases;
      stats_.live_bytes -= c;
      return;
    }
    stats_.cached_bytes += c, stats_.live_bytes -= c;
  }
  // Returns every cached block to the space.
  void release_cached() {
    std::lock_guard lock(mutex_);
    release_locked();
  }
  Stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  ~BlockPool() { release_locked(); }

 private:
  void release_locked() noexcept {
    for (auto& [c, blocks] : free_)
      for (void* p : blocks) Raw::release(p, c), ++stats_.raw_releases;
    free_.clear();
    stats_.cached_bytes = 0;
  }

  mutable std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  Stats stats_;
};

}  // namespace limoe
