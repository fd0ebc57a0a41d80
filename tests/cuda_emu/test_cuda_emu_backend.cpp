// The CUDA backend on the CPU: Ops<Cuda, T> (src/cuda/backend/) compiled by the host compiler through
// tests/support/cuda_emu.hpp (host threads as CUDA threads, host memory as device memory, plain loops standing
// in for cuBLAS), through the backend harness's cases (tests/unit/backend_cases.hpp): every op of the op
// table, forward and backward, against the Ref backend, in double (1e-10) and float (2e-5). The routes of the
// MoE case come from the CUDA dispatch plan and must equal Ref's exactly; the whole model runs on the op table too. Built a second time with
// ThreadSanitizer (test_cuda_emu_backend_tsan: float, one seed), so a kernel reading shared memory without a
// barrier fails.
#include "support/cuda_emu.hpp"  // first: the CUDA keywords and LIMOE_CUDA_EMULATION

#include <cuda/backend/moe_ops.cuh>
#include <limoe/backend/cuda.hpp>
#include <limoe/core/params.hpp>
#include <limoe/train/optimizer.hpp>

#include "unit/backend_cases.hpp"
#if !defined(LIMOE_HARNESS_QUICK)
#include "unit/backend_model.hpp"
#endif

using namespace limoe;
using namespace limoe::backend_cases;

static_assert(std::is_same_v<Cuda::memory_space, HostSpace>, "the emulated backend runs on host memory");

#if !defined(LIMOE_HARNESS_QUICK)  // the ThreadSanitizer build runs float only
TEST_CASE("cuda backend (emulated): every op against Ref, forward and backward (double)") {
  for_each_backend<std::tuple<Cuda>, double>();
}

// The model composed from the CUDA op table (Limoe<double, ..., Cuda>): the ops' seams (views, caches, the
// dispatch plan) fit the model's calls, and its outputs, routes and gradients equal the model on Ref. Under
// emulation the model's own host code reads the "device" tensors directly; on a GPU it cannot yet (the model
// keeps host tensors), so this runs here only.
TEST_CASE("cuda backend (emulated): the whole model on Cuda against the model on Ref") { compare_model<Cuda>(1e-9); }
#endif

TEST_CASE("cuda backend (emulated): every op against Ref, forward and backward (float)") {
  for_each_backend<std::tuple<Cuda>, float>();
}

TEST_CASE("cuda backend (emulated): bad input is refused with the ops' messages") {
  using O = Ops<Cuda, float>;
  Tensor<float> table(Shape{5, 4}), y(Shape{2, 3, 4});
  Tensor<std::int32_t> ids(Shape{2, 3});
  for (index_t i = 0; i < 6; ++i) ids[i] = static_cast<std::int32_t>(i % 5);
  ids[4] = 7;
  try {
    O::token_embed_forward(ids.cview(), table.cview(), CView<float>{}, y.view());
    FAIL("an id outside the vocabulary was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("token id 7 at position 1 of sequence 1") != std::string::npos);
  }
  Tensor<std::int32_t> route(Shape{3, 1});
  route[0] = 0, route[1] = 4, route[2] = -1;
  moe::DispatchPlan plan;
  CHECK_THROWS_WITH_AS(O::make_dispatch_plan(route.cview(), 3, plan),
                       doctest::Contains("1 route entries are neither -1 nor an expert in [0, 3)"), Error);
  Tensor<float> x(Shape{4, 6}), W(Shape{5, 7}), out(Shape{4, 5});
  CHECK_THROWS_WITH_AS(O::linear_forward(x.cview(), W.cview(), CView<float>{}, out.view()),
                       doctest::Contains("must end in I = 7"), Error);
}

namespace {
Tensor<double> as_double(CView<float> v) {
  Tensor<double> d(v.shape());
  for (index_t i = 0; i < v.numel(); ++i) d[i] = static_cast<double>(v[i]);
  return d;
}
}  // namespace

TEST_CASE("cuda backend (emulated): AdamW with global-norm clipping against the CPU optimizer") {
  // A store with decayed and undecayed entries; three steps, clipping active in the first; float and the CPU
  // optimizer's arithmetic (math/adamw.hpp) on both sides, norms summed in double on both.
  ParamStore<float> ps;
  ps.add("w", Shape{37, 5}, true);
  ps.add("b", Shape{29}, false);
  ps.add("big", Shape{300, 7}, true);  // more than one block of the norm's partial sums
  ps.finalize();
  const index_t n = ps.size();
  testing::fill_normal(ps.values(), 1, 0.5);
  Tensor<float> w(Shape{n}), m(Shape{n}), v(Shape{n}), g(Shape{n});
  std::copy(ps.values().data(), ps.values().data() + n, w.data());
  Tensor<std::uint8_t> decay(Shape{n});
  for (const auto& e : ps.entries())
    for (index_t i = 0; i < e.shape.numel(); ++i) decay[e.offset + i] = e.decay ? 1 : 0;
  const AdamWConfig cfg{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0};
  AdamW<float> opt(cfg, ps);
  for (int step = 1; step <= 3; ++step) {
    CAPTURE(step);
    testing::fill_normal(ps.grads(), 10 + static_cast<std::uint64_t>(step), step == 1 ? 2.0 : 0.01);
    std::copy(ps.grads().data(), ps.grads().data() + n, g.data());
    const double lr = 1e-2 * (1.0 + 0.1 * step);
    const double norm = opt.update(ps, lr);
    const double got = cuda::ops::adamw_update<float>(cfg, step, lr, g.cview(), decay.cview(), w.view(), m.view(), v.view());
    if (step == 1) CHECK(norm > 1.0);  // the clipped step
    CHECK(got == doctest::Approx(norm).epsilon(1e-12));
    CHECK(testing::max_diff(w, as_double(ps.values())) <= 1e-6);
    CHECK(testing::max_diff(m, as_double(opt.m().cview())) <= 1e-6);
    CHECK(testing::max_diff(v, as_double(opt.v().cview())) <= 1e-6);
  }
  // A gradient that is not finite: an error naming it, and nothing changes.
  const Tensor<float> w_before = w;
  g[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(cuda::ops::adamw_update<float>(cfg, 4, 1e-2, g.cview(), decay.cview(), w.view(), m.view(), v.view()),
                       doctest::Contains("the gradient is not finite"), Error);
  CHECK(testing::max_diff(w, as_double(w_before.cview())) == 0);
}
