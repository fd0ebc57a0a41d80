// limoe/backend/cuda.hpp: the CUDA backend's tag and op table, Ops<Cuda, T>.
//
//   Cuda  kernels (src/cuda/kernels/) for the row-wise and data-moving work, cuBLAS for the products, on the
//         current device's default stream; tensors and views in CudaSpace (device memory).
//
// The ops are declared in backend/cuda_ops.hpp and defined in src/cuda/backend/ (ops.cuh, moe_ops.cuh),
// compiled by nvcc into limoe_cuda (src/cuda/backend.cu, T = float): a plain C++ program that links
// limoe::cuda uses Ops<Cuda, float> on device tensors (Tensor<float, CudaSpace>). The tests on machines
// without a GPU compile the definitions with the host compiler through tests/support/cuda_emu.hpp
// (LIMOE_CUDA_EMULATION: host threads as CUDA threads, host memory as device memory, plain loops for cuBLAS).
// The op list and rules are backend/ops.hpp's.
// Eigen-free (it includes backend/op_table.hpp, not the CPU ops).
#pragma once

#include "limoe/backend/cuda_ops.hpp"
#include "limoe/backend/op_table.hpp"


namespace limoe {

struct Cuda {
  using memory_space = CudaBackendSpace;
  static constexpr const char* name = "cuda";
};
static_assert(Backend<Cuda>);

template <class T>
struct Ops<Cuda, T> {
#define LIMOE_OPS_DENSE_NS ::limoe::cuda::ops
#define LIMOE_OPS_MOE_NS ::limoe::cuda::ops
  LIMOE_BACKEND_OP_TABLE(CudaBackendSpace)
  // The stock router on the device (moe_forward's route for TopKRouter with GaussianNoise on this backend).
  template <class... A>
  static void route_topk(A&&... a) {
    ::limoe::profile::Region<CudaBackendSpace> region_("route_topk");
    ::limoe::cuda::ops::route_topk<T>(std::forward<A>(a)...);
  }
  // The stock auxiliary losses and the statistics' sums on the device, the fixed-capacity dispatch plan, and the
  // router's logit gradient.
  template <class... A>
  static void aux_losses(A&&... a) {
    ::limoe::profile::Region<CudaBackendSpace> region_("aux_losses");
    ::limoe::cuda::ops::aux_losses<T>(std::forward<A>(a)...);
  }
  static void make_fixed_dispatch_plan(CView<std::int32_t, CudaBackendSpace> route, int E, index_t C,
                                       moe::BasicDispatchPlan<CudaBackendSpace>& plan) {
    ::limoe::profile::Region<CudaBackendSpace> region_("make_fixed_dispatch_plan");
    ::limoe::cuda::ops::make_fixed_dispatch_plan(route, E, C, plan);
  }
  template <class... A>
  static void router_backward(A&&... a) {
    ::limoe::profile::Region<CudaBackendSpace> region_("router_backward");
    ::limoe::cuda::ops::router_backward<T>(std::forward<A>(a)...);
  }
#undef LIMOE_OPS_DENSE_NS
#undef LIMOE_OPS_MOE_NS
};

// AdamW<T, CudaBackendSpace>'s update (train/optimizer.hpp finds it by argument-dependent lookup): the CUDA op.
template <class T>
double adamw_device_update(const AdamWConfig& cfg, std::int64_t step, double lr, CView<T, CudaBackendSpace> g,
                           CView<std::uint8_t, CudaBackendSpace> decay, View<T, CudaBackendSpace> w,
                           View<T, CudaBackendSpace> m, View<T, CudaBackendSpace> v) {
  return cuda::ops::adamw_update<T>(cfg, step, lr, g, decay, w, m, v);
}
// ... with the norm given (a model holding a shard of the experts: the whole model's norm, summed by the trainer).
template <class T>
void adamw_device_apply(const AdamWConfig& cfg, std::int64_t step, double lr, double norm,
                        CView<T, CudaBackendSpace> g, CView<std::uint8_t, CudaBackendSpace> decay,
                        View<T, CudaBackendSpace> w, View<T, CudaBackendSpace> m, View<T, CudaBackendSpace> v) {
  cuda::ops::adamw_apply<T>(cfg, step, lr, norm, g, decay, w, m, v);
}

// sum_squares(CView<T, CudaBackendSpace>) (train/optimizer.hpp, by argument-dependent lookup): the CUDA op.
template <class T>
double device_sum_squares(CView<T, CudaBackendSpace> x) {
  return cuda::ops::sum_squares<T>(x);
}

}  // namespace limoe
