// src/cuda/sort.cu: the dispatch permutation of the MoE layer on the GPU. Tokens routed to experts are
// grouped by expert id with a STABLE sort, so within one expert the tokens keep their order: that is what
// makes capacity-based dropping (first come, first served within a group) agree with the CPU path.
#include <cuda_runtime.h>
#include <thrust/copy.h>
#include <thrust/device_vector.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>

#include <cstdint>
#include <exception>
#include <limits>

#include "check.cuh"
#include "limoe/cuda.hpp"

namespace limoe::cuda {

std::vector<std::int32_t> stable_sort_by_expert(std::span<const std::int32_t> expert_ids, int device) {
  constexpr const char* where = "limoe::cuda::stable_sort_by_expert";
  LIMOE_CHECK(expert_ids.size() <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()), where,
              ": ", expert_ids.size(), " assignments exceed the int32 index range");
  const detail::DeviceGuard guard(device, where);
  std::vector<std::int32_t> order(expert_ids.size());
  if (expert_ids.empty()) return order;
  try {
    thrust::device_vector<std::int32_t> keys(expert_ids.begin(), expert_ids.end());
    thrust::device_vector<std::int32_t> values(expert_ids.size());
    thrust::sequence(values.begin(), values.end());
    thrust::stable_sort_by_key(keys.begin(), keys.end(), values.begin());
    thrust::copy(values.begin(), values.end(), order.begin());
  } catch (const ::limoe::Error&) {
    throw;
  } catch (const std::exception& e) {
    // thrust::system_error carries the CUDA error string in what(); bad_alloc says what could not be allocated.
    (void)cudaGetLastError();
    ::limoe::fail(where, ": thrust failed: ", e.what());
  }
  return order;
}

}  // namespace limoe::cuda
