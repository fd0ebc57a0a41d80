// The CUDA backend on a GPU: the backend harness's cases (tests/unit/backend_cases.hpp), float, on
// Ops<Cuda, float> from limoe_cuda (nvcc-compiled kernels and cuBLAS) against the Ref backend. The cases build
// host tensors; a test-only adapter backend (CudaFromHost) copies each op's inputs to the device, runs the
// op there and copies its outputs back, keeping the device caches and dispatch plans the cases reuse between
// forward and backward. The same cases run on the CPU through the emulation (test_cuda_emu_backend); this
// program adds what the emulation cannot check: the real cuBLAS calls (operand order, transposes, strides),
// device memory and launch limits. Skips (exit 77) without a GPU.
#include <cuda_runtime.h>

#include <limoe/backend/cuda.hpp>
#include <limoe/core/params.hpp>
#include <limoe/train/optimizer.hpp>
#include <map>

#include "support/cuda_from_host.hpp"
#include "unit/backend_cases.hpp"

using namespace limoe;

using namespace limoe::testing_cuda;


TEST_CASE("cuda backend on the GPU: every op against Ref, forward and backward (float)") {
  limoe::backend_cases::for_each_backend<std::tuple<CudaFromHost>, float>();
}

TEST_CASE("cuda backend on the GPU: AdamW with global-norm clipping against the CPU optimizer") {
  const index_t n = 5000;
  ParamStore<float> ps;
  ps.add("w", Shape{n - 100}, true);
  ps.add("b", Shape{100}, false);
  ps.finalize();
  testing::fill_normal(ps.values(), 1, 0.5);
  Tensor<std::uint8_t> decay(Shape{n});
  for (const auto& e : ps.entries())
    for (index_t i = 0; i < e.shape.numel(); ++i) decay[e.offset + i] = e.decay ? 1 : 0;
  const AdamWConfig cfg{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0};
  AdamW<float> opt(cfg, ps);
  Tensor<float> w(Shape{n}), zeros(Shape{n});
  std::copy(ps.values().data(), ps.values().data() + n, w.data());
  auto dw = Mirror<float>(w.view()), dm = Mirror<float>(zeros.view()), dv = Mirror<float>(zeros.view());
  auto dd = Mirror<const std::uint8_t>(decay.cview());
  for (int step = 1; step <= 3; ++step) {
    testing::fill_normal(ps.grads(), 10 + static_cast<std::uint64_t>(step), step == 1 ? 2.0 : 0.01);
    auto dg = Mirror<const float>(ps.grads());
    const double norm = opt.update(ps, 1e-2);
    const double got = cuda::ops::adamw_update<float>(cfg, step, 1e-2, dg.v(), dd.v(), dw.v(), dm.v(), dv.v());
    CHECK(got == doctest::Approx(norm).epsilon(1e-9));
  }
  dw.back();
  Tensor<double> want(Shape{n});
  for (index_t i = 0; i < n; ++i) want[i] = ps.values()[i];
  CHECK(testing::max_diff(w, want) <= 1e-6);
}
