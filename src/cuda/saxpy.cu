// src/cuda/saxpy.cu: the smallest real kernel, y = a x + y, used to check that a device runs limoe's code.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "limoe/cuda.hpp"

namespace limoe::cuda {

namespace {
// Grid-stride loop: any n fits any grid size.
__global__ void saxpy_kernel(std::int64_t n, float a, const float* __restrict__ x, float* __restrict__ y) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = a * x[i] + y[i];
}
}  // namespace

void saxpy(float a, std::span<const float> x, std::span<float> y, int device) {
  constexpr const char* where = "limoe::cuda::saxpy";
  LIMOE_CHECK(x.size() == y.size(), where, ": x has ", x.size(), " elements but y has ", y.size());
  const detail::DeviceGuard guard(device, where);
  if (x.empty()) return;
  const std::size_t n = x.size();
  detail::DeviceBuffer<float> dx(n, where), dy(n, where);
  detail::check(cudaMemcpy(dx.get(), x.data(), n * sizeof(float), cudaMemcpyHostToDevice), where, "cudaMemcpy x");
  detail::check(cudaMemcpy(dy.get(), y.data(), n * sizeof(float), cudaMemcpyHostToDevice), where, "cudaMemcpy y");
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<std::size_t>((n + threads - 1) / threads, 65535));
  saxpy_kernel<<<blocks, threads>>>(static_cast<std::int64_t>(n), a, dx.get(), dy.get());
  detail::check(cudaGetLastError(), where, "kernel launch");
  detail::check(cudaMemcpy(y.data(), dy.get(), n * sizeof(float), cudaMemcpyDeviceToHost), where, "cudaMemcpy back");
}

}  // namespace limoe::cuda
