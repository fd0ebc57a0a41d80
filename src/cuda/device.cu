// src/cuda/device.cu: device discovery. Must answer "0 devices" cleanly on machines without a GPU or driver:
// cudaGetDeviceCount then fails with cudaErrorNoDevice or cudaErrorInsufficientDriver, which is not an error
// for the caller, only the reason reported by unavailable_reason().
#include <cuda_runtime.h>

#include "check.cuh"
#include "limoe/cuda.hpp"

namespace limoe::cuda {

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return detail::describe(e);
  }
  return count > 0 ? std::string() : std::string("no CUDA device present");
}

std::vector<DeviceInfo> devices() {
  std::vector<DeviceInfo> out;
  const int n = device_count();
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    detail::check(cudaGetDeviceProperties(&p, i), "limoe::cuda::devices", "cudaGetDeviceProperties");
    DeviceInfo d;
    d.index = i;
    d.name = p.name;
    d.major = p.major;
    d.minor = p.minor;
    d.total_memory = p.totalGlobalMem;
    d.multiprocessors = p.multiProcessorCount;
    out.push_back(std::move(d));
  }
  return out;
}

int runtime_version() noexcept { return CUDART_VERSION; }

void set_device(int device) {
  const int n = device_count();
  LIMOE_CHECK(device >= 0 && device < n, "limoe::cuda::set_device: device ", device, " does not exist (", n,
              " usable devices)");
  detail::check(cudaSetDevice(device), "limoe::cuda::set_device", "cudaSetDevice");
}

}  // namespace limoe::cuda
