// limoe/core/cuda_space.hpp: device memory of the current CUDA device as a memory space (core/memory.hpp).
// Needs the CUDA runtime's headers and library (CUDA::cudart); host code never reads its elements.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "limoe/core/error.hpp"
#include "limoe/core/memory.hpp"

namespace limoe {

struct CudaSpace {
  static constexpr bool host_accessible = false;
  static constexpr const char* name = "cuda";
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    LIMOE_CHECK(e == cudaSuccess, "CUDA: cudaMalloc of ", bytes, " bytes failed: ", cudaGetErrorString(e));
    return p;
  }
  static void deallocate(void* p, std::size_t) noexcept { cudaFree(p); }
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
};
static_assert(MemorySpace<CudaSpace>);

}  // namespace limoe
