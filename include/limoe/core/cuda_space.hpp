// limoe/core/cuda_space.hpp: device memory of the current CUDA device as a memory space (core/memory.hpp).
// Needs the CUDA runtime's headers and library (CUDA::cudart); host code never reads its elements.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "limoe/core/block_pool.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/memory.hpp"

namespace limoe {

// Allocations go through a caching pool (core/block_pool.hpp): cudaFree waits for the whole device, so a
// scratch buffer freed and allocated again every step would serialise the host with the GPU. The backend
// queues all its work on one stream, so a block handed out again is only used by work queued after the work
// of its previous owner. CudaSpace::release_cached() gives the cached blocks back to the device.
struct CudaSpace {
  static constexpr bool host_accessible = false;
  static constexpr const char* name = "cuda";
  struct Raw {
    static void* allocate(std::size_t bytes) noexcept {
      void* p = nullptr;
      if (cudaMalloc(&p, bytes) == cudaSuccess) return p;
      (void)cudaGetLastError();  // clear the failed allocation's error: the pool may retry
      return nullptr;
    }
    static void release(void* p, std::size_t) noexcept { cudaFree(p); }
  };
  // One pool per process, never destroyed (tensors freed during exit still find it; the driver frees the rest).
  static BlockPool<Raw>& pool() {
    static BlockPool<Raw>* p = new BlockPool<Raw>;
    return *p;
  }
  static void release_cached() { pool().release_cached(); }
  static void* allocate(std::size_t bytes) {
    void* p = pool().allocate(bytes);
    if (p == nullptr) {
      std::size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      fail("CUDA: out of device memory: an allocation of ", bytes, " bytes failed with ", free_b, " of ", total_b,
           " bytes free (the cache was returned to the device first)");
    }
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) noexcept { pool().deallocate(p, bytes); }
  static void zero(void* p, std::size_t bytes) {
    const cudaError_t e = cudaMemset(p, 0, bytes);
    LIMOE_CHECK(e == cudaSuccess, "CUDA: cudaMemset failed: ", cudaGetErrorString(e));
  }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    const cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
    LIMOE_CHECK(e == cudaSuccess, "CUDA: cudaMemcpy failed: ", cudaGetErrorString(e));
  }
  static void upload(void* dst, const void* host_src, std::size_t bytes) {
    const cudaError_t e = cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice);
    LIMOE_CHECK(e == cudaSuccess, "CUDA: copy of ", bytes, " bytes to the device failed: ", cudaGetErrorString(e));
  }
  static void download(void* host_dst, const void* src, std::size_t bytes) {
    const cudaError_t e = cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost);
    LIMOE_CHECK(e == cudaSuccess, "CUDA: copy of ", bytes, " bytes from the device failed: ", cudaGetErrorString(e));
  }
  // Waits until the device has done all the work queued so far (a profiling region's ends, core/profile.hpp).
  static void synchronize() {
    const cudaError_t e = cudaDeviceSynchronize();
    LIMOE_CHECK(e == cudaSuccess, "CUDA: the device failed: ", cudaGetErrorString(e));
  }
};
static_assert(MemorySpace<CudaSpace>);

}  // namespace limoe
