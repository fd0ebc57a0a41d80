// limoe/cuda.hpp: the host-side interface of the optional CUDA part (target limoe::cuda, library limoe_cuda).
//
// Only standard C++ types cross this boundary: any C++20 compiler can include this header, and the code that
// calls it needs neither nvcc nor the CUDA headers (it links limoe::cuda, which carries the CUDA runtime).
// The CPU umbrella header <limoe/limoe.hpp> never includes it. Every failure is a limoe::Error whose message
// holds the CUDA error name and string; asking for devices never throws and never crashes, it answers 0 when
// there is no GPU, no driver, or a driver too old for the runtime.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"

namespace limoe::cuda {

struct DeviceInfo {
  int index = 0;                  // the CUDA device ordinal
  std::string name;               // e.g. "NVIDIA H200"
  int major = 0;                  // compute capability major (9 for Hopper)
  int minor = 0;                  // compute capability minor
  std::size_t total_memory = 0;   // global memory, bytes
  int multiprocessors = 0;        // streaming multiprocessor count
};

// Number of usable CUDA devices; 0 when there are none or the driver is missing or too old. Never throws.
int device_count() noexcept;

// Why device_count() is 0, as "cudaErrorName: description" ("" when devices are present). Never throws.
std::string unavailable_reason();

// One entry per device, in ordinal order; empty when device_count() is 0.
std::vector<DeviceInfo> devices();

// Makes `device` the calling thread's current device: where the CUDA backend's tensors are allocated and its
// work runs from then on (one process per GPU under mpirun: device = local rank % device_count()).
void set_device(int device);

// CUDA runtime version limoe_cuda was built with, as 1000 * major + 10 * minor (13000 for CUDA 13.0).
int runtime_version() noexcept;

// y = a * x + y on `device` (x and y must have the same size). A synchronous round trip: copy in, one
// kernel, copy out; meant for checking a device, not for speed.
void saxpy(float a, std::span<const float> x, std::span<float> y, int device = 0);

// The MoE dispatch permutation: a stable sort of routing assignments by expert id on the GPU
// (thrust::stable_sort_by_key). Returns `order` with expert_ids[order[0]] <= expert_ids[order[1]] <= ...,
// where assignments of the same expert keep their original (token) order. Ids may be any int32 values.
std::vector<std::int32_t> stable_sort_by_expert(std::span<const std::int32_t> expert_ids, int device = 0);

// The shared formulas of limoe/math/ evaluated on the device, row by row over x [rows, cols]: softmax of each
// row, and GELU (erf) and its derivative of each entry. A check that the device runs the same math as the CPU.
struct MathRows {
  std::vector<float> softmax, gelu, dgelu;  // each [rows, cols]
};
MathRows math_rows(std::span<const float> x, std::int64_t cols, int device = 0);

// The CUDA backend's LayerNorm kernels (src/cuda/kernels/rows.cuh) on the device: forward of x [rows, D] with
// gain g and bias b [D] (b may be empty), then the backward of dy [rows, D]: dx, and dg / db summed over rows.
// CI runs the same kernels on the CPU (tests/cuda_emu/); this entry point checks them on a real GPU.
struct LayerNormRows {
  std::vector<float> y, mean, rstd, dx, dg, db;  // [rows, D], [rows], [rows], [rows, D], [D], [D]
};
LayerNormRows layernorm_rows(std::span<const float> x, std::span<const float> g, std::span<const float> b,
                             std::span<const float> dy, std::int64_t D, float eps, int device = 0);

}  // namespace limoe::cuda
