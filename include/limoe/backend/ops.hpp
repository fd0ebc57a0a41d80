// limoe/backend/ops.hpp: Ops<B, T>, the table through which generic code (the model, the MoE layer, the tests'
// backend harness) calls an op on backend B with scalar T:
//
//   using O = Ops<Cpu, float>;
//   O::layernorm_forward(x, g, b, eps, y, mean, rstd);
//
// Every backend implements the same list (LIMOE_BACKEND_OPS below) under the same names, signatures and
// gradient rules (docs/conventions.md); the table for a backend forwards each name to the namespace that holds
// its code: Ref -> limoe::ref and limoe::moe::ref, Cpu -> limoe::cpu and limoe::moe::cpu. A new backend
// writes its ops in its own namespace and adds one specialisation here (or in its own header) with
// LIMOE_BACKEND_OP_TABLE; the harness in tests/unit/test_backends.cpp then checks it against Ref by adding
// the tag to one list.
#pragma once

#include <utility>

#include "limoe/backend/backend.hpp"
#include "limoe/backend/op_table.hpp"
#include "limoe/moe/ops.hpp"
#include "limoe/ops/ops.hpp"

namespace limoe {

template <class T>
struct Ops<Ref, T> {
#define LIMOE_OPS_DENSE_NS ::limoe::ref
#define LIMOE_OPS_MOE_NS ::limoe::moe::ref
  LIMOE_BACKEND_OP_TABLE(HostSpace)
#undef LIMOE_OPS_DENSE_NS
#undef LIMOE_OPS_MOE_NS
};

template <class T>
struct Ops<Cpu, T> {
#define LIMOE_OPS_DENSE_NS ::limoe::cpu
#define LIMOE_OPS_MOE_NS ::limoe::moe::cpu
  LIMOE_BACKEND_OP_TABLE(HostSpace)
#undef LIMOE_OPS_DENSE_NS
#undef LIMOE_OPS_MOE_NS
};

}  // namespace limoe
