// bench/cuda/bench_cuda_moe.cpp: the CUDA backend's MoE layer against the dense MLP of equal per-token compute,
// on one GPU, in fp32 and under the bf16 policy (Bf16Mixed: operands rounded to bf16, fp32 accumulation); one
// JSON line per case (scripts/gpu-check runs it).
//
//   dense  y = GELU(x W1^T + b1) W2^T + b2 over T tokens (D -> M -> D)
//   moe    dispatch plan, dispatch, the E experts (each D -> M -> D over its T/E tokens: K = 1, capacity 1.0,
//          a balanced route), combine with the gates
// The same layer again on the fixed-capacity plan (make_fixed_dispatch_plan: no read-back; the experts as one
// strided-batched product per weight matrix, sgemm in fp32 and GemmStridedBatchedEx on bf16 operands under
// bf16): the *_fixed_* fields.
// Also the ceiling for the dense product [T, D] x [D, M] (cuBLAS's sgemm in fp32; cublasGemmEx on operands
// already in bf16 for bf16), the rate of the experts' products alone against it, and the plan, dispatch and
// combine each alone. Under bf16 the weights are read from a bf16 copy made before the timing, as a model reads
// them from its mirror made once per optimizer step (core/precision.hpp); activations are rounded as they enter
// each product. Times: CUDA events around 10 repetitions after 3 warm-ups. Exits 77 without a GPU.
// Routing (fp32 only, the same T and E): the stock router (top-1, BPR, training noise, capacity 1.0, one group)
// on the device (cuda::ops::route_topk, what the MoE layer runs) against the same decisions on the host over a
// copy of the logits (the path of a user's own router, and of every router before route_topk): download, noise
// and softmax, the sequential fill, upload of gates and routes. Wall-clock times, synchronised.
// The packed plan's experts run one grouped product per weight matrix; experts_one_per_expert_ms times the same
// products one per expert (cuda::ops::set_grouped_expert_products(false)), also at T = 4,096, E = 32 (128 rows an
// expert), where launches weigh most. dense_mlp_seeded_bias_ms times the dense MLP with its biases written into
// the outputs before the products (cuda::ops::set_bias_epilogue(false)) instead of in cuBLASLt's epilogue.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <limoe/backend/cuda.hpp>
#include <limoe/moe/config.hpp>
#include <limoe/moe/router.hpp>
#include <limoe/core/precision.hpp>
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

// The bf16 ceiling for h [T, M] = x [T, D] W1^T, in ms: cublasGemmEx on operands already in bf16 (no rounding
// pass: the rate a bf16 product can reach, against which the policy's products, which round their fp32 operands
// first, are measured). The fp32 ceiling is cuBLAS's sgemm through linear_forward.
double cublas_bf16_ms(index_t T, index_t D, index_t M, Tensor<float, DS>& h) {
  std::vector<std::uint16_t> hb(static_cast<std::size_t>((T + M) * D));
  std::uint64_t s = 99;
  for (auto& v : hb) {  // bf16 bits of values in [-1, 1): sign, exponent 118..126, random mantissa
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    v = static_cast<std::uint16_t>(((s >> 20) & 0x8000u) | ((118u + (s >> 40) % 9u) << 7) | ((s >> 50) & 0x7fu));
  }
  Tensor<std::uint16_t, DS> ab(Shape{T + M, D});  // rows 0..T-1: x; rows T..T+M-1: W1
  check(cudaMemcpy(ab.data(), hb.data(), hb.size() * sizeof(std::uint16_t), cudaMemcpyHostToDevice), "upload");
  cublasHandle_t handle;
  LIMOE_CHECK(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS, "bench_cuda_moe: cublasCreate failed");
  const float one = 1.f, zero = 0.f;
  const auto* xb = ab.data();
  const auto* wb = ab.data() + T * D;
  // Row-major h [T, M] = x [T, D] W1^T: column-major h^T [M, T] = W1 (D x M, transposed) x^T (D x T).
  const double ms = time_ms([&] {
    LIMOE_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M), static_cast<int>(T),
                             static_cast<int>(D), &one, wb, CUDA_R_16BF, static_cast<int>(D), xb, CUDA_R_16BF,
                             static_cast<int>(D), &zero, h.data(), CUDA_R_32F, static_cast<int>(M),
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
                "bench_cuda_moe: cublasGemmEx failed");
  });
  cublasDestroy(handle);
  return ms;
}

// Weights in one flat device buffer with its bf16 copy, as a model holds them (core/params.hpp, precision.hpp).
struct FlatWeights {
  Tensor<float, DS> all;
  BasicWeightMirror<DS> mirror;
  index_t used = 0;
  explicit FlatWeights(index_t n) : all(Shape{n}) {}
  CView<float, DS> add(Shape s, std::uint64_t seed, float scale) {
    const auto t = device_random(s, seed, scale);
    LIMOE_CHECK(used + s.numel() <= all.numel(), "bench_cuda_moe: weight buffer too small");
    check(cudaMemcpy(all.data() + used, t.data(), sizeof(float) * static_cast<std::size_t>(s.numel()),
                     cudaMemcpyDeviceToDevice),
          "weights");
    used += s.numel();
    return CView<float, DS>(all.data() + used - s.numel(), s);
  }
  template <class Prec>
  Prec policy() {
    if constexpr (Prec::mixed) {
      mirror.refresh(all.data(), all.numel(), 1, [](const float* x, index_t n, std::uint16_t* out) {
        cuda::ops::to_bf16(CView<float, DS>(x, Shape{n}), View<std::uint16_t, DS>(out, Shape{n}));
      });
      return Prec{mirror.copies()};
    } else {
      return Prec{};
    }
  }
};

template <class Prec>
void run(index_t T, index_t D, int E) {
  const index_t M = 4 * D;
  auto x = device_random(Shape{T, D}, 1, 1.0f);
  FlatWeights fw((2 * M * D + M + D) * (E + 1));  // the dense MLP and the E experts
  // Dense MLP.
  const auto w1 = fw.add(Shape{M, D}, 2, 0.05f), b1 = fw.add(Shape{M}, 3, 0.1f);
  const auto w2 = fw.add(Shape{D, M}, 4, 0.05f), b2 = fw.add(Shape{D}, 5, 0.1f);
  // The experts' weights (the MoE layer below).
  const auto e1 = fw.add(Shape{E, M, D}, 7, 0.05f), eb1 = fw.add(Shape{E, M}, 8, 0.1f);
  const auto e2 = fw.add(Shape{E, D, M}, 9, 0.05f), eb2 = fw.add(Shape{E, D}, 10, 0.1f);
  Tensor<float, DS> h(Shape{T, M}), a(Shape{T, M}), y(Shape{T, D});
  const Prec prec = fw.policy<Prec>();  // after every weight is in
  const auto dense = [&] {
    cuda::ops::linear_forward<float, Prec>(x.cview(), w1, b1, h.view(), prec);
    O::gelu_forward(GeluKind::Erf, h.cview(), a.view());
    cuda::ops::linear_forward<float, Prec>(a.cview(), w2, b2, y.view(), prec);
  };
  const double dense_ms = time_ms(dense);
  // The same with the biases seeded into the outputs (the products accumulate onto them) instead of cuBLASLt's
  // epilogue.
  cuda::ops::set_bias_epilogue(false);
  const double dense_seeded_ms = time_ms(dense);
  cuda::ops::set_bias_epilogue(true);
  const double gemm_ms =
      Prec::mixed ? cublas_bf16_ms(T, D, M, h)
                  : time_ms([&] { O::linear_forward(x.cview(), w1, CView<float, DS>{}, h.view()); });
  // MoE layer: a balanced route (token t -> expert t % E), K = 1, capacity 1.0 drops nothing.
  std::vector<std::int32_t> hr(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) hr[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % E);
  Tensor<std::int32_t, DS> route(Shape{T, 1});
  check(cudaMemcpy(route.data(), hr.data(), hr.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "route");
  auto gates = device_random(Shape{T, E}, 6, 1.0f);
  const moe::ExpertWeights<float, DS> w{e1, eb1, e2, eb2};
  moe::BasicDispatchPlan<DS> plan;
  moe::ExpertScratch scratch;
  Tensor<float, DS> xe(Shape{T, D}), hpre(Shape{T, M}), he(Shape{T, M}), ye(Shape{T, D}), out(Shape{T, D});
  const auto experts = [&] {
    cuda::ops::expert_mlp_forward<float, Prec>(plan, w, GeluKind::Erf, xe.cview(), hpre.view(), he.view(), ye.view(),
                                               scratch, prec);
  };
  const double moe_ms = time_ms([&] {
    O::make_dispatch_plan(route.cview(), E, plan);
    O::dispatch_forward(plan, x.cview(), xe.view());
    experts();
    O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), out.view());
  });
  const double experts_ms = time_ms(experts);
  // The same products one per expert (the packed plan's products before they were grouped).
  cuda::ops::set_grouped_expert_products(false);
  const double experts_each_ms = time_ms(experts);
  cuda::ops::set_grouped_expert_products(true);
  // The parts around the experts, each alone.
  const double plan_ms = time_ms([&] { O::make_dispatch_plan(route.cview(), E, plan); });
  const double dispatch_ms = time_ms([&] { O::dispatch_forward(plan, x.cview(), xe.view()); });
  const double combine_ms = time_ms([&] { O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), out.view()); });
  // The same layer on the fixed-capacity plan (C = T / E rows per expert: no empty row with this route), what
  // the MoE layer takes when the capacity binds: no read-back, and one strided-batched product per weight
  // matrix.
  const index_t C = (T + E - 1) / E;
  moe::BasicDispatchPlan<DS> fplan;
  Tensor<float, DS> fxe(Shape{E * C, D}), fhpre(Shape{E * C, M}), fhe(Shape{E * C, M}), fye(Shape{E * C, D});
  const auto fexperts = [&] {
    cuda::ops::expert_mlp_forward<float, Prec>(fplan, w, GeluKind::Erf, fxe.cview(), fhpre.view(), fhe.view(),
                                               fye.view(), scratch, prec);
  };
  const double moe_fixed_ms = time_ms([&] {
    cuda::ops::make_fixed_dispatch_plan(route.cview(), E, C, fplan);
    O::dispatch_forward(fplan, x.cview(), fxe.view());
    fexperts();
    O::combine_forward(fplan, gates.cview(), route.cview(), fye.cview(), out.view());
  });
  const double experts_fixed_ms = time_ms(fexperts);
  const double plan_fixed_ms = time_ms([&] { cuda::ops::make_fixed_dispatch_plan(route.cview(), E, C, fplan); });
  const double flops_mlp = 4.0 * static_cast<double>(T) * static_cast<double>(D) * static_cast<double>(M);
  const double flops_gemm = flops_mlp / 2;
  std::printf(
      "{\"bench\":\"cuda_moe_layer_%s\",\"T\":%lld,\"D\":%lld,\"M\":%lld,\"E\":%d,\"K\":1,\"capacity\":1.0,"
      "\"dense_mlp_ms\":%.3f,\"moe_layer_ms\":%.3f,\"experts_ms\":%.3f,\"plan_ms\":%.3f,\"dispatch_ms\":%.3f,"
      "\"combine_ms\":%.3f,\"ceiling\":\"%s\",\"ceiling_ms\":%.3f,"
      "\"ceiling_tflops\":%.2f,\"dense_mlp_tflops\":%.2f,\"experts_tflops\":%.2f,"
      "\"moe_over_dense_speed\":%.3f,\"experts_over_ceiling_rate\":%.3f,"
      "\"moe_layer_fixed_ms\":%.3f,\"experts_fixed_ms\":%.3f,\"plan_fixed_ms\":%.3f,"
      "\"moe_fixed_over_dense_speed\":%.3f,\"experts_fixed_over_ceiling_rate\":%.3f,"
      "\"experts_one_per_expert_ms\":%.3f,\"grouped_over_one_per_expert_speed\":%.3f,"
      "\"dense_mlp_seeded_bias_ms\":%.3f,\"bias_epilogue_speedup\":%.3f}\n",
      Prec::name, static_cast<long long>(T), static_cast<long long>(D), static_cast<long long>(M), E, dense_ms, moe_ms,
      experts_ms, plan_ms, dispatch_ms, combine_ms, Prec::mixed ? "cublasGemmEx bf16 operands" : "cublasSgemm",
      gemm_ms, flops_gemm / gemm_ms * 1e-9, flops_mlp / dense_ms * 1e-9, flops_mlp / experts_ms * 1e-9,
      dense_ms / moe_ms, (flops_mlp / experts_ms) / (flops_gemm / gemm_ms), moe_fixed_ms, experts_fixed_ms,
      plan_fixed_ms, dense_ms / moe_fixed_ms, (flops_mlp / experts_fixed_ms) / (flops_gemm / gemm_ms), experts_each_ms,
      experts_each_ms / experts_ms, dense_seeded_ms, dense_seeded_ms / dense_ms);
}

// Wall-clock ms of f (3 warm-ups, then 10 runs, the device synchronised after each).
template <class F>
double wall_ms(F&& f) {
  for (int i = 0; i < 3; ++i) f(), check(cudaDeviceSynchronize(), "sync");
  const auto t0 = std::chrono::steady_clock::now();
  const int reps = 10;
  for (int i = 0; i < reps; ++i) f(), check(cudaDeviceSynchronize(), "sync");
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// The stock router over T tokens and E experts, on the device and on the host (see the header).
void run_routing(index_t T, int E) {
  const auto logits = device_random(Shape{T, E}, 11, 4.0f);
  const Rng rng(5);
  const double sigma = 1.0 / E;
  const index_t C = moe::compute_capacity(T, E, 1, 1.0);
  // Device: what moe_forward runs for the stock router.
  std::vector<std::int64_t> pos(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) pos[static_cast<std::size_t>(t)] = t;
  Tensor<std::int64_t, DS> pos_d(Shape{T}), cap_d(Shape{1});
  check(cudaMemcpy(pos_d.data(), pos.data(), pos.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice), "pos");
  check(cudaMemcpy(cap_d.data(), &C, sizeof(C), cudaMemcpyHostToDevice), "capacity");
  Tensor<float, DS> noisy(Shape{T, E}), gates(Shape{T, E}), probs(Shape{T, E});
  Tensor<std::int32_t, DS> choice(Shape{T, 1}), route(Shape{T, 1});
  moe::parallel::BasicRoutingScratch<DS> scratch;
  const double device_ms = wall_ms([&] {
    cuda::ops::route_topk<float>(logits.cview(), pos_d.cview(), rng, sigma, 1, T, cap_d.cview(), true, {},
                                 noisy.view(), gates.view(), probs.view(), choice.view(), route.view(), scratch);
  });
  // Host: download, the sequential stock router, upload.
  std::vector<float> hl(static_cast<std::size_t>(T * E)), hn(hl.size()), hg(hl.size());
  std::vector<std::int32_t> hc(static_cast<std::size_t>(T)), hr(hc.size());
  std::vector<index_t> order(static_cast<std::size_t>(T)), fill(static_cast<std::size_t>(E));
  const moe::TopKRouter<moe::StaticTopK<1>, moe::GaussianNoise, moe::BatchPriorityOrder> router{{}, {1.0}};
  const double host_ms = wall_ms([&] {
    check(cudaMemcpy(hl.data(), logits.data(), hl.size() * sizeof(float), cudaMemcpyDeviceToHost), "logits");
    moe::RouteGroup<float> g;
    g.S = T, g.E = E, g.K = 1, g.capacity = C, g.mode = Mode::Train, g.rng = &rng;
    g.logits = hl.data(), g.noisy = hn.data(), g.gates = hg.data(), g.choice = hc.data(), g.route = hr.data();
    g.order = order.data(), g.fill = fill.data();
    router.route(g);
    check(cudaMemcpy(gates.data(), hg.data(), hg.size() * sizeof(float), cudaMemcpyHostToDevice), "gates");
    check(cudaMemcpy(route.data(), hr.data(), hr.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "routes");
  });
  std::printf("{\"bench\":\"cuda_routing\",\"T\":%lld,\"E\":%d,\"K\":1,\"capacity\":1.0,\"bpr\":true,"
              "\"noise\":true,\"device_ms\":%.3f,\"host_round_trip_ms\":%.3f,\"host_over_device\":%.2f}\n",
              static_cast<long long>(T), E, device_ms, host_ms, host_ms / device_ms);
}

}  // namespace

int main() {
  if (cuda::device_count() == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", cuda::unavailable_reason().c_str());
    return 77;
  }
  try {
    for (int E : {8, 16, 32}) run<Fp32>(65536, 1024, E);
    for (int E : {8, 16, 32}) run<Bf16Mixed>(65536, 1024, E);
    // Small tiles (128 rows an expert), where one launch per expert weighs most against the grouped product.
    run<Fp32>(4096, 1024, 32);
    run<Bf16Mixed>(4096, 1024, 32);
    for (int E : {8, 16, 32}) run_routing(65536, E);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_moe: %s\n", e.what());
    return 1;
  }
  return 0;
}
