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
