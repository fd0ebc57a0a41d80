// tests/support/cuda_emu.hpp: runs CUDA kernels on the CPU, for tests on machines without a GPU (test-only;
// never part of the library).
//
// The same `__global__` function templates that nvcc compiles into limoe_cuda (src/cuda/kernels/*.cuh) are
// compiled by g++ with this header included first:
//   - every CUDA thread is a host thread; `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread-local;
//   - blocks run one after another, the threads of a block all at once, so `__shared__` (a function-local
//     `static`) is one array per block in flight, as on the device;
//   - `__syncthreads()` is a std::barrier over the block's threads: a kernel that reads shared memory another
//     thread wrote without a barrier between them is a data race that ThreadSanitizer reports (the tests run
//     under TSan too, see tests/cuda_emu/tests.cmake).
//   - warp intrinsics are not emulated: the kernels written for both use shared-memory reductions.
// emu::launch(grid, block, kernel, args...) is the <<<grid, block>>> launch.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__CUDACC__)
#error "cuda_emu.hpp is for host compilers: nvcc compiles the kernels for the device"
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

namespace emu {
namespace detail {
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
}  // namespace detail

// Runs kernel(args...) on grid x block CUDA threads: blocks in order, each block's threads concurrently.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, Kernel&& kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("emu::launch: " + std::to_string(threads) + " threads per block");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
        std::vector<std::thread> team;
        team.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          team.emplace_back([&, t] {
            detail::thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            detail::block_idx = dim3(bx, by, bz);
            detail::block_dim = block;
            detail::grid_dim = grid;
            detail::block_barrier = &barrier;
            kernel(args...);
          });
        for (auto& th : team) th.join();
      }
}
}  // namespace emu

#define threadIdx (::emu::detail::thread_idx)
#define blockIdx (::emu::detail::block_idx)
#define blockDim (::emu::detail::block_dim)
#define gridDim (::emu::detail::grid_dim)

// Every thread of the block waits here until all have arrived (each thread must reach it: as on the device,
// a __syncthreads under a divergent branch deadlocks).
inline void __syncthreads() { ::emu::detail::block_barrier->arrive_and_wait(); }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float sqrtf(float x) { return std::sqrt(x); }
