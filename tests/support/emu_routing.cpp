// tests/support/emu_routing.cpp: the CUDA backend's route_groups (backend/cuda_ops.hpp) for the emulated
// backend: moe/parallel_routing.hpp on Thrust's CPP system over the emulation's device memory (host memory),
// float and double. On a GPU the same function is src/cuda/routing.cu (thrust::cuda::par). A unit of its own:
// Thrust's headers and tests/support/cuda_emu.hpp's CUDA keywords (dim3, blockDim, ...) do not mix.
#if !defined(LIMOE_CUDA_EMULATION)
#error "emu_routing.cpp is compiled with LIMOE_CUDA_EMULATION"
#endif

#include <thrust/system/cpp/execution_policy.h>

#include <limoe/backend/cuda_ops.hpp>
#include <limoe/moe/parallel_routing.hpp>

namespace limoe::cuda::ops {

template <class T>
void route_groups(CV<T> gates, int K, std::int64_t group_size, CV<std::int64_t> capacity, bool bpr,
                  V<std::int32_t> choice, V<std::int32_t> route, moe::parallel::BasicRoutingScratch<Space>& scratch,
                  CV<std::uint8_t> modality) {
  moe::parallel::route_groups(thrust::cpp::par, gates, K, group_size, capacity, bpr, choice, route, scratch, modality);
}

template void route_groups<float>(CV<float>, int, std::int64_t, CV<std::int64_t>, bool, V<std::int32_t>,
                                  V<std::int32_t>, moe::parallel::BasicRoutingScratch<Space>&, CV<std::uint8_t>);
template void route_groups<double>(CV<double>, int, std::int64_t, CV<std::int64_t>, bool, V<std::int32_t>,
                                   V<std::int32_t>, moe::parallel::BasicRoutingScratch<Space>&, CV<std::uint8_t>);

}  // namespace limoe::cuda::ops
