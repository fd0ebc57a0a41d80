// src/cuda/rows.cu: the row kernels of src/cuda/kernels/rows.cuh compiled for the device, and a checking entry
// point (limoe::cuda::layernorm_rows) that runs LayerNorm forward and backward on a GPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "check.cuh"
#include "kernels/rows.cuh"
#include "limoe/cuda.hpp"

namespace limoe::cuda {

LayerNormRows layernorm_rows(std::span<const float> x, std::span<const float> g, std::span<const float> b,
                             std::span<const float> dy, std::int64_t D, float eps, int device) {
  constexpr const char* where = "limoe::cuda::layernorm_rows";
  LIMOE_CHECK(D > 0 && x.size() % static_cast<std::size_t>(D) == 0, where, ": ", x.size(), " values are not rows of ", D);
  LIMOE_CHECK(g.size() == static_cast<std::size_t>(D) && (b.empty() || b.size() == g.size()), where,
              ": g and b must have D = ", D, " values (b may be empty)");
  LIMOE_CHECK(dy.size() == x.size(), where, ": dy has ", dy.size(), " values, x has ", x.size());
  LIMOE_CHECK(eps > 0, where, ": eps must be positive");
  const detail::DeviceGuard guard(device, where);
  const std::size_t n = x.size(), rows = n / static_cast<std::size_t>(D), d = static_cast<std::size_t>(D);
  LayerNormRows out;
  out.y.resize(n), out.dx.resize(n), out.mean.resize(rows), out.rstd.resize(rows), out.dg.assign(d, 0.0f), out.db.assign(d, 0.0f);
  if (rows == 0) return out;
  detail::DeviceBuffer<float> dxin(n, where), dg_in(d, where), db_in(d, where), ddy(n, where), dyo(n, where),
      dmean(rows, where), drstd(rows, where), ddx(n, where), ddg(d, where), ddb(d, where);
  auto up = [&](detail::DeviceBuffer<float>& dst, std::span<const float> src) {
    if (!src.empty())
      detail::check(cudaMemcpy(dst.get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice), where, "cudaMemcpy in");
  };
  up(dxin, x), up(dg_in, g), up(db_in, b), up(ddy, dy);
  detail::check(cudaMemset(ddg.get(), 0, d * sizeof(float)), where, "cudaMemset");
  detail::check(cudaMemset(ddb.get(), 0, d * sizeof(float)), where, "cudaMemset");
  constexpr int kThreads = 128;
  const auto grid = static_cast<unsigned>(rows);
  kernels::layernorm_forward<kThreads><<<grid, kThreads>>>(dxin.get(), dg_in.get(), b.empty() ? nullptr : db_in.get(),
                                                           eps, D, dyo.get(), dmean.get(), drstd.get());
  detail::check(cudaGetLastError(), where, "layernorm_forward launch");
  kernels::layernorm_backward_input<kThreads><<<grid, kThreads>>>(dxin.get(), dg_in.get(), dmean.get(), drstd.get(),
                                                                  ddy.get(), D, ddx.get());
  detail::check(cudaGetLastError(), where, "layernorm_backward_input launch");
  kernels::layernorm_backward_params<<<static_cast<unsigned>((D + 127) / 128), 128>>>(
      dxin.get(), dmean.get(), drstd.get(), ddy.get(), static_cast<std::int64_t>(rows), D, ddg.get(), ddb.get());
  detail::check(cudaGetLastError(), where, "layernorm_backward_params launch");
  auto down = [&](std::vector<float>& dst, detail::DeviceBuffer<float>& src) {
    detail::check(cudaMemcpy(dst.data(), src.get(), dst.size() * sizeof(float), cudaMemcpyDeviceToHost), where, "cudaMemcpy back");
  };
  down(out.y, dyo), down(out.mean, dmean), down(out.rstd, drstd), down(out.dx, ddx), down(out.dg, ddg), down(out.db, ddb);
  return out;
}

}  // namespace limoe::cuda
