// The backend harness for the CPU backends: every op of the backend op table (backend/ops.hpp) on Cpu against
// Ref, forward and backward (the cases: tests/unit/backend_cases.hpp; the CUDA backend runs the same cases in
// tests/cuda_emu/test_cuda_emu_backend.cpp), and whole models: Limoe<double, ..., Cpu> against
// Limoe<double, ..., Ref>, forward, routes, loss and every parameter gradient (tests/unit/backend_model.hpp).
#include "backend_model.hpp"

using namespace limoe;
using namespace limoe::backend_cases;

TEST_CASE("backend harness: every op on the Cpu backend against Ref, forward and backward (double)") {
  for_each_backend<std::tuple<Cpu>, double>();
}

TEST_CASE("backend harness: every op on the Cpu backend against Ref, forward and backward (float)") {
  for_each_backend<std::tuple<Cpu>, float>();
}

TEST_CASE("backend harness: the whole model on the Cpu backend against the model on Ref") { compare_model<Cpu>(1e-9); }
