// The CUDA backend's kernels (src/cuda/kernels/rows.cuh, moe.cuh) run on the CPU through tests/support/cuda_emu.hpp
// (host threads as CUDA threads, a barrier as __syncthreads), against the Ref backend: LayerNorm forward and
// backward (input and parameter gradients), bias + GELU and the GELU backward, both GELU kinds, the MoE
// dispatch and combine over a dispatch plan (forward and backward), at block sizes
// that leave threads idle (D < threads), stride (D > threads) and divide unevenly. The same program is built
// with ThreadSanitizer (test_cuda_emu_kernels_tsan): a missing barrier in a reduction is a reported race.
#include "support/cuda_emu.hpp"  // first: defines the CUDA keywords the kernels use

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cuda/kernels/moe.cuh>
#include <cuda/kernels/optimizer.cuh>
#include <cuda/kernels/rows.cuh>
#include <limoe/backend/ops.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <limoe/train/optimizer.hpp>

using namespace limoe;
namespace k = limoe::cuda::kernels;

namespace {
double max_rel(CView<float> got, CView<float> want) {
  double worst = 0, scale = 1;
  for (index_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  for (index_t i = 0; i < want.numel(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
  return worst / scale;
}

template <int kThreads>
void check_layernorm(index_t R, index_t D, std::uint64_t seed) {
  CAPTURE(kThreads);
  CAPTURE(R);
  CAPTURE(D);
  using O = Ops<Ref, float>;
  const auto x = testing::randn<float>(Shape{R, D}, seed, 3.0), g = testing::randn<float>(Shape{D}, seed + 1);
  const auto b = testing::randn<float>(Shape{D}, seed + 2), dy = testing::randn<float>(Shape{R, D}, seed + 3);
  Tensor<float> y(Shape{R, D}), mean(Shape{R}), rstd(Shape{R}), dx(Shape{R, D}), dg(Shape{D}, 0.5f), db(Shape{D}, 0.5f);
  Tensor<float> y_ref(Shape{R, D}), mean_ref(Shape{R}), rstd_ref(Shape{R}), dx_ref(Shape{R, D}), dg_ref(Shape{D}, 0.5f),
      db_ref(Shape{D}, 0.5f);
  emu::launch(dim3(static_cast<unsigned>(R)), dim3(kThreads), k::layernorm_forward<kThreads, float>, x.data(), g.data(),
              b.data(), 1e-6f, D, y.data(), mean.data(), rstd.data());
  emu::launch(dim3(static_cast<unsigned>(R)), dim3(kThreads), k::layernorm_backward_input<kThreads, float>, x.data(), g.data(),
              mean.data(), rstd.data(), dy.data(), D, dx.data());
  emu::launch(dim3(static_cast<unsigned>((D + 31) / 32)), dim3(32), k::layernorm_backward_params<float>, x.data(),
              mean.data(), rstd.data(), dy.data(), R, D, dg.data(), db.data());
  O::layernorm_forward(x.cview(), g.cview(), b.cview(), 1e-6f, y_ref.view(), mean_ref.view(), rstd_ref.view());
  O::layernorm_backward(x.cview(), g.cview(), mean_ref.cview(), rstd_ref.cview(), dy.cview(), dx_ref.view(),
                        dg_ref.view(), db_ref.view());
  CHECK(max_rel(y.cview(), y_ref.cview()) < 2e-6);
  CHECK(max_rel(mean.cview(), mean_ref.cview()) < 2e-6);
  CHECK(max_rel(rstd.cview(), rstd_ref.cview()) < 2e-6);
  CHECK(max_rel(dx.cview(), dx_ref.cview()) < 5e-6);
  CHECK(max_rel(dg.cview(), dg_ref.cview()) < 5e-6);  // accumulated onto 0.5: the gradient rule
  CHECK(max_rel(db.cview(), db_ref.cview()) < 5e-6);
}
}  // namespace

TEST_CASE("cuda kernels on the CPU: LayerNorm forward and backward against Ref") {
  check_layernorm<32>(5, 7, 1);     // fewer columns than threads
  check_layernorm<32>(4, 100, 2);   // strides, uneven
  check_layernorm<64>(3, 384, 3);   // a model width
  check_layernorm<128>(2, 1000, 4);
}

TEST_CASE("cuda kernels on the CPU: bias + GELU and the GELU backward against Ref, both kinds") {
  using O = Ops<Ref, float>;
  const index_t R = 9, M = 37;
  for (GeluKind kind : {GeluKind::Erf, GeluKind::Tanh}) {
    CAPTURE(kind == GeluKind::Erf);
    const auto pre0 = testing::randn<float>(Shape{R, M}, 7, 3.0), b = testing::randn<float>(Shape{M}, 8);
    const auto dy = testing::randn<float>(Shape{R, M}, 9);
    Tensor<float> pre = pre0, y(Shape{R, M}), pre_ref = pre0, y_ref(Shape{R, M});
    // 3 blocks of 32 threads for 333 elements: the grid-stride loop runs several rounds.
    emu::launch(dim3(3), dim3(32), k::bias_gelu_forward<float>, kind, b.data(), R * M, M, pre.data(), y.data());
    O::bias_gelu_forward(kind, b.cview(), pre_ref.view(), y_ref.view());
    CHECK(max_rel(pre.cview(), pre_ref.cview()) == 0);
    CHECK(max_rel(y.cview(), y_ref.cview()) < 1e-6);
    Tensor<float> dx(Shape{R, M}), dx_ref(Shape{R, M});
    emu::launch(dim3(2), dim3(64), k::gelu_backward<float>, kind, pre.data(), dy.data(), R * M, dx.data());
    O::gelu_backward(kind, pre_ref.cview(), dy.cview(), dx_ref.view());
    CHECK(max_rel(dx.cview(), dx_ref.cview()) < 1e-6);
  }
}

TEST_CASE("cuda kernels on the CPU: the masked, scaled softmax of rows and its backward against the math/ row") {
  const index_t R = 6, n = 45;
  const auto x = testing::randn<float>(Shape{R, n}, 11, 2.0), dy = testing::randn<float>(Shape{R, n}, 12);
  Tensor<std::uint8_t> mask(Shape{R, n});
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < n; ++j) mask[r * n + j] = r == 3 ? 0 : (j < n - 4 * r ? 1 : 0);  // row 3: all masked
  for (int masked = 0; masked < 2; ++masked) {
    CAPTURE(masked);
    const std::uint8_t* m = masked ? mask.data() : nullptr;
    Tensor<float> y(Shape{R, n}), y_ref(Shape{R, n}), dx(Shape{R, n}), dx_ref(Shape{R, n});
    emu::launch(dim3(static_cast<unsigned>(R)), dim3(16), k::softmax_forward<16, float>, x.data(), n, 0.7f, m, index_t{1}, y.data());
    emu::launch(dim3(static_cast<unsigned>(R)), dim3(32), k::softmax_backward<32, float>, y.data(), dy.data(), n, dx.data());
    for (index_t r = 0; r < R; ++r) {
      math::softmax_row(x.data() + r * n, n, y_ref.data() + r * n, 0.7f, m ? m + r * n : nullptr);
      math::softmax_row_backward(y_ref.data() + r * n, dy.data() + r * n, n, dx_ref.data() + r * n);
    }
    CHECK(max_rel(y.cview(), y_ref.cview()) < 1e-6);
    CHECK(max_rel(dx.cview(), dx_ref.cview()) < 1e-6);
    if (masked)
      for (index_t j = 0; j < n; ++j) CHECK(y[3 * n + j] == 0.0f);  // no unmasked key: zeros, not NaN
  }
}

TEST_CASE("cuda kernels on the CPU: AdamW with global-norm clipping against the CPU optimizer") {
  // Parameters of a store with decayed and undecayed entries; three steps, clipping active in the first.
  ParamStore<float> ps;
  ps.add("w", Shape{37, 5}, true);
  ps.add("b", Shape{29}, false);
  ps.finalize();
  const index_t n = ps.size();
  testing::fill_normal(ps.values(), 1, 0.5);
  Tensor<float> w(Shape{n}), m(Shape{n}), v(Shape{n});
  Tensor<double> partial(Shape{8}), sum(Shape{1});
  std::copy(ps.values().data(), ps.values().data() + n, w.data());
  Tensor<std::uint8_t> decay(Shape{n});
  for (const auto& e : ps.entries())
    for (index_t i = 0; i < e.shape.numel(); ++i) decay[e.offset + i] = e.decay ? 1 : 0;
  AdamW<float> opt(AdamWConfig{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0}, ps);
  for (int step = 1; step <= 3; ++step) {
    CAPTURE(step);
    testing::fill_normal(ps.grads(), 10 + static_cast<std::uint64_t>(step), step == 1 ? 2.0 : 0.01);
    const double lr = 1e-2 * (1.0 + 0.1 * step);
    const double norm = opt.update(ps, lr);
    const int blocks = 5;
    emu::launch(dim3(blocks), dim3(32), k::sum_squares_partial<32, float>, ps.grads().data(), n, partial.data());
    emu::launch(dim3(1), dim3(8), k::sum_squares_final<8>, partial.data(), blocks, sum.data());
    CHECK(std::sqrt(sum[0]) == doctest::Approx(norm).epsilon(1e-12));  // double sums on both sides
    const auto st = math::adamw_step<float>(AdamWConfig{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0}, step, lr,
                                            math::adamw_clip(std::sqrt(sum[0]), 1.0));
    emu::launch(dim3(3), dim3(64), k::adamw_update<float>, st, decay.data(), ps.grads().data(), n, w.data(), m.data(),
                v.data());
    CHECK(max_rel(w.cview(), ps.values()) < 1e-6);
    CHECK(max_rel(m.cview(), opt.m().cview()) < 1e-5);
    CHECK(max_rel(v.cview(), opt.v().cview()) < 1e-5);
  }
}

TEST_CASE("cuda emulation: indices, blocks in order, shared memory per block, the barrier") {
  // Each block writes its threads' indices; thread 0 of each block then reads what the others wrote, after the
  // barrier, through shared memory.
  std::vector<int> seen(4 * 8, -1), sums(4, -1);
  emu::launch(dim3(4), dim3(8), [&] {
    __shared__ int slot[8];
    slot[threadIdx.x] = static_cast<int>(blockIdx.x * 100 + threadIdx.x);
    seen[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<int>(gridDim.x * 1000 + threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) {
      int s = 0;
      for (int t = 0; t < 8; ++t) s += slot[t];
      sums[blockIdx.x] = s;
    }
    __syncthreads();
  });
  for (int b = 0; b < 4; ++b) {
    CHECK(sums[static_cast<std::size_t>(b)] == 8 * b * 100 + 28);
    for (int t = 0; t < 8; ++t) CHECK(seen[static_cast<std::size_t>(b * 8 + t)] == 4000 + t);
  }
  CHECK_THROWS_AS(emu::launch(dim3(1), dim3(2048), [] {}), std::invalid_argument);
  // A tree reduction: log2(64) barriers in a loop, every thread at each (each thread's partial sum lives on its
  // own stack across the barriers).
  std::vector<int> totals(3, -1);
  emu::launch(dim3(3), dim3(64), [&] {
    __shared__ int part[64];
    const int mine = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
    part[threadIdx.x] = mine;
    __syncthreads();
    for (unsigned half = 32; half > 0; half /= 2) {
      if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) totals[blockIdx.x] = part[0];
    CHECK(mine == static_cast<int>(blockIdx.x * 1000 + threadIdx.x));
  });
  for (int b = 0; b < 3; ++b) CHECK(totals[static_cast<std::size_t>(b)] == 64 * 1000 * b + 63 * 64 / 2);
#if defined(LIMOE_EMU_FIBERS)
  // Fibers: a barrier that some threads of a block skip is an error naming one of them, not a hang; an exception
  // from a kernel reaches the launch.
  CHECK_THROWS_WITH_AS(emu::launch(dim3(2), dim3(8), [] {
                         if (blockIdx.x == 1 && threadIdx.x == 3) return;
                         __syncthreads();
                       }),
                       doctest::Contains("thread 3 of block (1, 0, 0) returned while 7 others wait at __syncthreads"),
                       std::logic_error);
  CHECK_THROWS_WITH_AS(emu::launch(dim3(1), dim3(4), [] {
                         __syncthreads();
                         if (threadIdx.x == 2) throw std::runtime_error("kernel failed");
                       }),
                       "kernel failed", std::runtime_error);
  // A launch from inside a kernel (dynamic parallelism) is not emulated: an error, not a corrupted stack.
  CHECK_THROWS_WITH_AS(emu::launch(dim3(1), dim3(2), [] { emu::launch(dim3(1), dim3(2), [] {}); }),
                       "emu: a kernel launched a kernel (not emulated)", std::logic_error);
  // The emulator is usable after these.
  std::vector<int> after(4, 0);
  emu::launch(dim3(1), dim3(4), [&] {
    __syncthreads();
    after[threadIdx.x] = 1;
  });
  CHECK(after == std::vector<int>(4, 1));
#endif
}

TEST_CASE("cuda kernels on the CPU: MoE dispatch and combine over a plan, forward and backward, against Ref") {
  using O = Ops<Ref, float>;
  const index_t N = 29, D = 40;
  const int E = 5, K = 2;
  // Distinct experts per token, about a quarter of the choices dropped, expert E-1 never chosen.
  Tensor<std::int32_t> route(Shape{N, K});
  const Rng rng(17);
  for (index_t t = 0; t < N; ++t) {
    const auto e0 = static_cast<std::int32_t>(rng.uniform(t, 0) * (E - 1));
    route[t * K] = rng.uniform(t, 2) < 0.25 ? -1 : e0;
    route[t * K + 1] = rng.uniform(t, 3) < 0.25 ? -1 : (e0 + 1) % (E - 1);
  }
  moe::DispatchPlan plan;
  O::make_dispatch_plan(route.cview(), E, plan);
  const index_t A = plan.A;
  REQUIRE(A > 0);
  const auto x = testing::randn<float>(Shape{N, D}, 1), gates = testing::randn<float>(Shape{N, E}, 2, 0.3);
  const auto ye = testing::randn<float>(Shape{A, D}, 3), dy = testing::randn<float>(Shape{N, D}, 4);
  const auto dxe = testing::randn<float>(Shape{A, D}, 5);
  Tensor<float> xe(Shape{A, D}), xe_ref(Shape{A, D}), y(Shape{N, D}), y_ref(Shape{N, D});
  Tensor<float> dx(Shape{N, D}, 0.25f), dx_ref(Shape{N, D}, 0.25f);  // dispatch backward accumulates
  Tensor<float> dye(Shape{A, D}), dye_ref(Shape{A, D}), dgate(Shape{A}), dgate_ref(Shape{A});
  emu::launch(dim3(3), dim3(32), k::dispatch_forward<float>, plan.row_token.data(), A, D, x.data(), xe.data());
  emu::launch(dim3(2), dim3(64), k::combine_forward<float>, plan.slot_row.data(), route.data(), gates.data(), N, E, K,
              D, ye.data(), y.data());
  emu::launch(dim3(static_cast<unsigned>(A)), dim3(16), k::combine_backward<16, float>, plan.row_token.data(),
              plan.row_slot.data(), route.data(), gates.data(), E, D, ye.data(), dy.data(), dye.data(), dgate.data());
  emu::launch(dim3(4), dim3(32), k::dispatch_backward<float>, plan.slot_row.data(), N, K, D, dxe.data(), dx.data());
  O::dispatch_forward(plan, x.cview(), xe_ref.view());
  O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), y_ref.view());
  O::combine_backward(plan, gates.cview(), route.cview(), ye.cview(), dy.cview(), dye_ref.view(), dgate_ref.view());
  O::dispatch_backward(plan, dxe.cview(), dx_ref.view());
  CHECK(max_rel(xe.cview(), xe_ref.cview()) == 0);  // a copy
  CHECK(max_rel(y.cview(), y_ref.cview()) < 1e-6);
  CHECK(max_rel(dye.cview(), dye_ref.cview()) == 0);
  CHECK(max_rel(dgate.cview(), dgate_ref.cview()) < 1e-5);
  CHECK(max_rel(dx.cview(), dx_ref.cview()) < 1e-6);
}
