// src/cuda/routing.cu: routing on the GPU: moe/parallel_routing.hpp's route_groups (top-K, batch priority
// routing, capacity and groups as stable sorts, one combined-key sort and a segmented scan; no atomics) with
// thrust::cuda::par_nosync (temporary storage from the backend's caching pool), for float and double gates in
// device memory: the algorithms queue their kernels on the default stream, in order with the backend's, and
// return without waiting for them (thrust::cuda::par waits after each of its ten or so calls). The same source
// runs on the CPU through Thrust's CPP and TBB systems in the tests (tests/thrust/), against the sequential
// router; its lambdas are host-and-device (LIMOE_HD), which nvcc accepts with
// --extended-lambda (cmake/limoe_cuda.cmake).
#include <thrust/execution_policy.h>

#include "limoe/backend/cuda_ops.hpp"
#include "limoe/moe/parallel_routing.hpp"

namespace limoe::cuda::ops {

namespace {
// Thrust's temporary storage (the sorts' and the scan's) from the backend's caching pool (core/cuda_space.hpp)
// instead of a cudaMalloc / cudaFree per algorithm call, each of which would wait for the whole device.
// Under par_nosync a block goes back to the pool while the kernels that use it may still be queued; the pool
// hands it only to work queued after them on the same stream (core/cuda_space.hpp), so that is safe.
struct PoolAllocator {
  using value_type = char;
  char* allocate(std::ptrdiff_t n) { return static_cast<char*>(Space::allocate(static_cast<std::size_t>(n))); }
  void deallocate(char* p, std::size_t n) { Space::deallocate(p, n); }
};
}  // namespace

template <class T>
void route_groups(CV<T> gates, int K, std::int64_t group_size, CV<std::int64_t> capacity, bool bpr,
                  V<std::int32_t> choice, V<std::int32_t> route, moe::parallel::BasicRoutingScratch<Space>& scratch,
                  CV<std::uint8_t> modality) {
  PoolAllocator alloc;
  moe::parallel::route_groups(thrust::cuda::par_nosync(alloc), gates, K, group_size, capacity, bpr, choice, route, scratch,
                              modality);
}

template void route_groups<float>(CV<float>, int, std::int64_t, CV<std::int64_t>, bool, V<std::int32_t>,
                                  V<std::int32_t>, moe::parallel::BasicRoutingScratch<Space>&, CV<std::uint8_t>);
template void route_groups<double>(CV<double>, int, std::int64_t, CV<std::int64_t>, bool, V<std::int32_t>,
                                   V<std::int32_t>, moe::parallel::BasicRoutingScratch<Space>&, CV<std::uint8_t>);

}  // namespace limoe::cuda::ops
