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
#include "limoe/moe/ops.hpp"
#include "limoe/ops/ops.hpp"

// The ops every backend provides: X(name) for ops of the dense tower, M(name) for the MoE layer's ops.
#define LIMOE_BACKEND_OPS(X, M)                                                                         \
  X(linear_forward) X(linear_backward) X(layernorm_forward) X(layernorm_backward) X(gelu_forward)       \
  X(gelu_backward) X(bias_gelu_forward) X(softmax_forward) X(softmax_backward) X(attention_forward)     \
  X(attention_backward) X(self_attention_forward) X(self_attention_backward) X(patch_embed_forward)     \
  X(patch_embed_backward) X(token_embed_forward) X(token_embed_backward) X(pool_forward)                 \
  X(pool_backward) X(map_head_forward) X(map_head_backward) X(l2_normalize_forward)                     \
  X(l2_normalize_backward) X(contrastive_forward) X(contrastive_backward)                               \
  M(dispatch_forward) M(dispatch_backward) M(expert_mlp_forward) M(expert_mlp_backward)                 \
  M(combine_forward) M(combine_backward)

#define LIMOE_DETAIL_OP_FWD(NS, name)                    \
  template <class... A>                                  \
  static decltype(auto) name(A&&... a) {                 \
    return NS::name<scalar_type>(std::forward<A>(a)...); \
  }
#define LIMOE_DETAIL_DENSE_OP(name) LIMOE_DETAIL_OP_FWD(LIMOE_OPS_DENSE_NS, name)
#define LIMOE_DETAIL_MOE_OP(name) LIMOE_DETAIL_OP_FWD(LIMOE_OPS_MOE_NS, name)

// The body of an Ops<B, T> specialisation: define LIMOE_OPS_DENSE_NS and LIMOE_OPS_MOE_NS to the namespaces
// that hold the backend's dense and MoE ops (templated on the scalar, with the Ref/Cpu signatures), expand
// this, undefine them.
#define LIMOE_BACKEND_OP_TABLE                                                                \
  using scalar_type = T;                                                                      \
  static void make_dispatch_plan(CView<std::int32_t> route, int E, moe::DispatchPlan& plan) { \
    LIMOE_OPS_MOE_NS::make_dispatch_plan(route, E, plan);                                     \
  }                                                                                           \
  LIMOE_BACKEND_OPS(LIMOE_DETAIL_DENSE_OP, LIMOE_DETAIL_MOE_OP)

namespace limoe {

template <class T>
struct Ops<Ref, T> {
#define LIMOE_OPS_DENSE_NS ::limoe::ref
#define LIMOE_OPS_MOE_NS ::limoe::moe::ref
  LIMOE_BACKEND_OP_TABLE
#undef LIMOE_OPS_DENSE_NS
#undef LIMOE_OPS_MOE_NS
};

template <class T>
struct Ops<Cpu, T> {
#define LIMOE_OPS_DENSE_NS ::limoe::cpu
#define LIMOE_OPS_MOE_NS ::limoe::moe::cpu
  LIMOE_BACKEND_OP_TABLE
#undef LIMOE_OPS_DENSE_NS
#undef LIMOE_OPS_MOE_NS
};

}  // namespace limoe
