// Routing on the GPU (limoe::cuda::ops::route_groups: moe/parallel_routing.hpp with thrust::cuda::par, compiled
// by nvcc into limoe_cuda) against the sequential stock router on the same gates: the cases of
// tests/thrust/routing_cases.hpp (K = 1 to 3, BPR and vanilla, shorter last groups, exact ties, capacities that
// drop, padding). The same cases run on the CPU through Thrust's CPP and TBB systems (test_cuda_thrust_routing). Skips
// (exit 77) without a GPU.
#include <cuda_runtime.h>

#include <limoe/backend/cuda_ops.hpp>

#include "thrust/routing_cases.hpp"

using namespace limoe;

namespace {
template <class T>
Tensor<T, CudaSpace> up(const Tensor<T>& h) {
  Tensor<T, CudaSpace> d(h.shape());
  REQUIRE(cudaMemcpy(d.data(), h.data(), sizeof(T) * static_cast<std::size_t>(h.numel()), cudaMemcpyHostToDevice) ==
          cudaSuccess);
  return d;
}
template <class T>
void down(const Tensor<T, CudaSpace>& d, Tensor<T>& h) {
  REQUIRE(cudaMemcpy(h.data(), d.data(), sizeof(T) * static_cast<std::size_t>(h.numel()), cudaMemcpyDeviceToHost) ==
          cudaSuccess);
}
}  // namespace

TEST_CASE("routing on the GPU: the sequential router's decisions") {
  moe::parallel::BasicRoutingScratch<CudaSpace> scratch;  // reused across cases, as the model would
  routing_cases::check_all(
      [&](const Tensor<double>& gates, int K, std::int64_t group_size, const Tensor<std::int64_t>& capacity, bool bpr,
          Tensor<std::int32_t>& choice, Tensor<std::int32_t>& route, const Tensor<std::uint8_t>& modality) {
        const auto dg = up(gates);
        const auto dc = up(capacity);
        const auto dm = up(modality);
        Tensor<std::int32_t, CudaSpace> dch(choice.shape()), drt(route.shape());
        cuda::ops::route_groups<double>(dg.cview(), K, group_size, dc.cview(), bpr, dch.view(), drt.view(), scratch,
                                        modality.numel() > 0 ? dm.cview() : CView<std::uint8_t, CudaSpace>{});
        down(dch, choice), down(drt, route);
      },
      "cuda");
}
