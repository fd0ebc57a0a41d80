// src/cuda/check.cuh: internal helpers of limoe_cuda (never installed): CUDA errors as limoe::Error, a device
// buffer that frees itself, and the device guard every entry point goes through.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "limoe/core/error.hpp"

namespace limoe::cuda::detail {

inline std::string describe(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// Throws limoe::Error("<where>: <what> failed: cudaErrorX: description") when `e` is not cudaSuccess.
inline void check(cudaError_t e, const char* where, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
    ::limoe::fail(where, ": ", what, " failed: ", describe(e));
  }
}

// Makes `device` current for the calling thread while it lives and restores the previous device after, so
// that a call on device 1 does not move the caller's later CUDA work. The message for an out-of-range
// ordinal says how many devices there are; without any device it carries the CUDA error.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* where) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      ::limoe::fail(where, ": no usable CUDA device (", describe(e), ")");
    }
    LIMOE_CHECK(device >= 0 && device < count, where, ": device ", device, " out of range, ", count,
                " CUDA device(s) present");
    check(cudaGetDevice(&previous_), where, "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), where, "cudaSetDevice");
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// Owning device allocation of n elements of T (cudaMalloc / cudaFree).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(std::size_t n, const char* where) : n_(n) {
    if (n_ > 0) check(cudaMalloc(reinterpret_cast<void**>(&p_), n_ * sizeof(T)), where, "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (p_) (void)cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace limoe::cuda::detail
