// limoe/backend/op_table.hpp: the list of ops every backend provides and the macro that writes a backend's
// Ops<B, T> table (backend/ops.hpp explains the table). Light: no op code, so the CUDA backend's
// nvcc-compiled sources (backend/cuda.hpp) include it without the CPU ops and Eigen.
#pragma once

#include <cstdint>
#include <utility>

#include "limoe/backend/backend.hpp"
#include "limoe/core/profile.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/moe/plan.hpp"

// The ops every backend provides: X(name) for ops of the dense tower, M(name) for the MoE layer's ops.
#define LIMOE_BACKEND_OPS(X, M)                                                                         \
  X(linear_forward) X(linear_backward) X(layernorm_forward) X(layernorm_backward) X(gelu_forward)       \
  X(gelu_backward) X(bias_gelu_forward) X(softmax_forward) X(softmax_backward) X(attention_forward)     \
  X(attention_backward) X(self_attention_forward) X(self_attention_backward) X(patch_embed_forward)     \
  X(patch_embed_backward) X(token_embed_forward) X(token_embed_backward) X(pool_forward)                 \
  X(pool_backward) X(map_head_forward) X(map_head_backward) X(l2_normalize_forward)                     \
  X(l2_normalize_backward) X(contrastive_forward) X(contrastive_backward) X(add_into) X(gather_rows)    \
  X(scatter_rows)                                                                                       \
  M(dispatch_forward) M(dispatch_backward) M(expert_mlp_forward) M(expert_mlp_backward)                 \
  M(combine_forward) M(combine_backward)

// Each op is a profiling region named after it (core/profile.hpp): free unless a profile session is active.
#define LIMOE_DETAIL_OP_FWD(NS, name)                                \
  template <class... A>                                              \
  static decltype(auto) name(A&&... a) {                             \
    ::limoe::profile::Region<profile_space> region_(#name);          \
    return NS::name<scalar_type>(std::forward<A>(a)...);             \
  }
#define LIMOE_DETAIL_DENSE_OP(name) LIMOE_DETAIL_OP_FWD(LIMOE_OPS_DENSE_NS, name)
#define LIMOE_DETAIL_MOE_OP(name) LIMOE_DETAIL_OP_FWD(LIMOE_OPS_MOE_NS, name)

// The body of an Ops<B, T> specialisation: define LIMOE_OPS_DENSE_NS and LIMOE_OPS_MOE_NS to the namespaces
// that hold the backend's dense and MoE ops (templated on the scalar, with the Ref/Cpu signatures over the
// backend's memory space SPACE), expand this, undefine them.
#define LIMOE_BACKEND_OP_TABLE(SPACE)                                                                     \
  using scalar_type = T;                                                                                  \
  using profile_space = SPACE;                                                                            \
  static void make_dispatch_plan(CView<std::int32_t, SPACE> route, int E, moe::BasicDispatchPlan<SPACE>& plan) { \
    ::limoe::profile::Region<SPACE> region_("make_dispatch_plan");                                        \
    LIMOE_OPS_MOE_NS::make_dispatch_plan(route, E, plan);                                                 \
  }                                                                                                       \
  /* A float buffer rounded to bf16 (the weight mirror of a model under Bf16Mixed, core/precision.hpp). */  \
  static void to_bf16(CView<float, SPACE> x, View<std::uint16_t, SPACE> y) {                              \
    ::limoe::profile::Region<SPACE> region_("to_bf16");                                                   \
    LIMOE_OPS_DENSE_NS::to_bf16(x, y);                                                                    \
  }                                                                                                       \
  LIMOE_BACKEND_OPS(LIMOE_DETAIL_DENSE_OP, LIMOE_DETAIL_MOE_OP)
