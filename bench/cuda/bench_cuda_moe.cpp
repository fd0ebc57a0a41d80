// bench/cuda/bench_cuda_moe.cpp: the CUDA backend's MoE layer against the dense MLP of equal per-token compute,
// fp32, on one GPU; one JSON line per case (scripts/gpu-check runs it). The figures are bf16; these are
// the fp32 baseline until the bf16 products exist.
//
//   dense  y = GELU(x W1^T + b1) W2^T + b2 over T tokens (D -> M -> D)
//   moe    dispatch plan, dispatch, the E experts (each D -> M -> D over its T/E tokens: K = 1, capacity 1.0,
//          a balanced route), combine with the gates
// Also the sgemm rate cuBLAS reaches on the dense product [T, D] x [D, M] (the machine's ceiling for these
// shapes in fp32), the rate of the experts' products alone, and the plan, dispatch and combine each alone. Times: CUDA events around 10 repetitions after
// 3 warm-ups. Exits 77 without a GPU.
#include <cuda_runtime.h>

#include <cstdio>
#include <limoe/backend/cuda.hpp>
#include <limoe/cuda.hpp>
#include <vector>

using namespace limoe;
using DS = CudaSpace;
using O = Ops<Cuda, float>;

namespace {

void check(cudaError_t e, const char* what) {
  LIMOE_CHECK(e == cudaSuccess, "bench_cuda_moe: ", what, ": ", cudaGetErrorString(e));
}

Tensor<float, DS> device_random(Shape s, std::uint64_t seed, float scale) {
  std::vector<float> h(static_cast<std::size_t>(s.numel()));
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& v : h) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    v = scale * (static_cast<float>(x >> 40) / static_cast<float>(1ull << 24) - 0.5f);
  }
  Tensor<float, DS> d(s);
  check(cudaMemcpy(d.data(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
  return d;
}

template <class F>
double time_ms(F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event"), check(cudaEventCreate(&b), "event");
  check(cudaEventRecord(a), "record");
  const int reps = 10;
  for (int i = 0; i < reps; ++i) f();
  check(cudaEventRecord(b), "record");
  check(cudaEventSynchronize(b), "sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, a, b), "elapsed");
  cudaEventDestroy(a), cudaEventDestroy(b);
  return static_cast<double>(ms) / reps;
}

void run(index_t T, index_t D, int E) {
  const index_t M = 4 * D;
  auto x = device_random(Shape{T, D}, 1, 1.0f);
  // Dense MLP.
  auto w1 = device_random(Shape{M, D}, 2, 0.05f), b1 = device_random(Shape{M}, 3, 0.1f);
  auto w2 = device_random(Shape{D, M}, 4, 0.05f), b2 = device_random(Shape{D}, 5, 0.1f);
  Tensor<float, DS> h(Shape{T, M}), a(Shape{T, M}), y(Shape{T, D});
  const double dense_ms = time_ms([&] {
    O::linear_forward(x.cview(), w1.cview(), b1.cview(), h.view());
    O::gelu_forward(GeluKind::Erf, h.cview(), a.view());
    O::linear_forward(a.cview(), w2.cview(), b2.cview(), y.view());
  });
  const double gemm_ms = time_ms([&] { O::linear_forward(x.cview(), w1.cview(), CView<float, DS>{}, h.view()); });
  // MoE layer: a balanced route (token t -> expert t % E), K = 1, capacity 1.0 drops nothing.
  std::vector<std::int32_t> hr(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) hr[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % E);
  Tensor<std::int32_t, DS> route(Shape{T, 1});
  check(cudaMemcpy(route.data(), hr.data(), hr.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "route");
  auto gates = device_random(Shape{T, E}, 6, 1.0f);
  auto e1 = device_random(Shape{E, M, D}, 7, 0.05f), eb1 = device_random(Shape{E, M}, 8, 0.1f);
  auto e2 = device_random(Shape{E, D, M}, 9, 0.05f), eb2 = device_random(Shape{E, D}, 10, 0.1f);
  const moe::ExpertWeights<float, DS> w{e1.cview(), eb1.cview(), e2.cview(), eb2.cview()};
  moe::BasicDispatchPlan<DS> plan;
  moe::ExpertScratch scratch;
  Tensor<float, DS> xe(Shape{T, D}), hpre(Shape{T, M}), he(Shape{T, M}), ye(Shape{T, D}), out(Shape{T, D});
  const double moe_ms = time_ms([&] {
    O::make_dispatch_plan(route.cview(), E, plan);
    O::dispatch_forward(plan, x.cview(), xe.view());
    O::expert_mlp_forward(plan, w, GeluKind::Erf, xe.cview(), hpre.view(), he.view(), ye.view(), scratch);
    O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), out.view());
  });
  const double experts_ms = time_ms(
      [&] { O::expert_mlp_forward(plan, w, GeluKind::Erf, xe.cview(), hpre.view(), he.view(), ye.view(), scratch); });
  // The parts around the experts, each alone.
  const double plan_ms = time_ms([&] { O::make_dispatch_plan(route.cview(), E, plan); });
  const double dispatch_ms = time_ms([&] { O::dispatch_forward(plan, x.cview(), xe.view()); });
  const double combine_ms = time_ms([&] { O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), out.view()); });
  const double flops_mlp = 4.0 * static_cast<double>(T) * static_cast<double>(D) * static_cast<double>(M);
  const double flops_gemm = flops_mlp / 2;
  std::printf(
      "{\"bench\":\"cuda_moe_layer_fp32\",\"T\":%lld,\"D\":%lld,\"M\":%lld,\"E\":%d,\"K\":1,\"capacity\":1.0,"
      "\"dense_mlp_ms\":%.3f,\"moe_layer_ms\":%.3f,\"experts_ms\":%.3f,\"plan_ms\":%.3f,\"dispatch_ms\":%.3f,"
      "\"combine_ms\":%.3f,\"sgemm_ms\":%.3f,"
      "\"sgemm_tflops\":%.2f,\"dense_mlp_tflops\":%.2f,\"experts_tflops\":%.2f,"
      "\"moe_over_dense_speed\":%.3f,\"experts_over_sgemm_rate\":%.3f}\n",
      static_cast<long long>(T), static_cast<long long>(D), static_cast<long long>(M), E, dense_ms, moe_ms, experts_ms,
      plan_ms, dispatch_ms, combine_ms, gemm_ms, flops_gemm / gemm_ms * 1e-9, flops_mlp / dense_ms * 1e-9, flops_mlp / experts_ms * 1e-9,
      dense_ms / moe_ms, (flops_mlp / experts_ms) / (flops_gemm / gemm_ms));
}

}  // namespace

int main() {
  if (cuda::device_count() == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", cuda::unavailable_reason().c_str());
    return 77;
  }
  try {
    for (int E : {8, 16, 32}) run(65536, 1024, E);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_moe: %s\n", e.what());
    return 1;
  }
  return 0;
}
