// src/cuda/math.cu: the formulas of limoe/math/ compiled for the device unchanged (the same source the CPU
// code and the reference call), exposed as one checking entry point: per row, softmax and GELU (erf) with its
// derivative. tests/cuda/test_cuda_runtime.cpp compares it with the CPU evaluation of the same functions.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "limoe/cuda.hpp"
#include "limoe/math/gelu.hpp"
#include "limoe/math/softmax.hpp"

namespace limoe::cuda {

namespace {
// One thread per row: these are checks of the shared formulas, not fast kernels.
__global__ void math_rows_kernel(std::int64_t rows, std::int64_t cols, const float* __restrict__ x,
                                 float* __restrict__ softmax, float* __restrict__ gelu, float* __restrict__ dgelu) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* xr = x + r * cols;
  limoe::math::softmax_row(xr, cols, softmax + r * cols);
  for (std::int64_t j = 0; j < cols; ++j) {
    gelu[r * cols + j] = limoe::math::gelu(limoe::GeluKind::Erf, xr[j]);
    dgelu[r * cols + j] = limoe::math::gelu_grad(limoe::GeluKind::Erf, xr[j]);
  }
}
}  // namespace

MathRows math_rows(std::span<const float> x, std::int64_t cols, int device) {
  constexpr const char* where = "limoe::cuda::math_rows";
  LIMOE_CHECK(cols > 0 && x.size() % static_cast<std::size_t>(cols) == 0, where, ": ", x.size(),
              " values are not rows of ", cols);
  const detail::DeviceGuard guard(device, where);
  const std::size_t n = x.size();
  MathRows out;
  out.softmax.resize(n);
  out.gelu.resize(n);
  out.dgelu.resize(n);
  if (n == 0) return out;
  const std::int64_t rows = static_cast<std::int64_t>(n) / cols;
  detail::DeviceBuffer<float> dx(n, where), ds(n, where), dg(n, where), dd(n, where);
  detail::check(cudaMemcpy(dx.get(), x.data(), n * sizeof(float), cudaMemcpyHostToDevice), where, "cudaMemcpy x");
  constexpr int threads = 128;
  const int blocks = static_cast<int>((rows + threads - 1) / threads);
  math_rows_kernel<<<blocks, threads>>>(rows, cols, dx.get(), ds.get(), dg.get(), dd.get());
  detail::check(cudaGetLastError(), where, "kernel launch");
  for (auto [dst, src] : {std::pair{&out.softmax, &ds}, {&out.gelu, &dg}, {&out.dgelu, &dd}})
    detail::check(cudaMemcpy(dst->data(), src->get(), n * sizeof(float), cudaMemcpyDeviceToHost), where,
                  "cudaMemcpy back");
  return out;
}

}  // namespace limoe::cuda
