// src/cuda/backend.cu: the CUDA backend's ops (src/cuda/backend/ops.cuh, moe_ops.cuh) compiled for the device:
// explicit instantiations for float, the ops with products once per precision policy (Ops<Cuda, float>). The
// same sources run in the tests on the CPU through tests/support/cuda_emu.hpp; this translation unit is where
// nvcc compiles the kernels and the cuBLAS calls, so CI's build checks that all of it compiles and links.
#include "backend/moe_ops.cuh"
#include "limoe/backend/cuda.hpp"

namespace limoe::cuda::ops {

using F = float;
template <class T>
using AW = AttentionWeights<T, Space>;
template <class T>
using AG = AttentionGrads<T, Space>;
template <class T>
using AC = AttentionCache<T, Space>;

// The ops with products, once per precision policy (fp32; bf16 operands with fp32 accumulation).
#define LIMOE_CUDA_PRODUCT_OPS(P) \
  template void linear_forward<F, P>(CV<F>, CV<F>, CV<F>, V<F>, const P&); \
  template void linear_backward<F, P>(CV<F>, CV<F>, CV<F>, V<F>, V<F>, V<F>, const P&); \
  template void patch_embed_forward<F, P>(CV<F>, int, CV<F>, CV<F>, CV<F>, V<F>, V<F>, const P&); \
  template void patch_embed_backward<F, P>(CV<F>, int, CV<F>, CV<F>, CV<F>, V<F>, V<F>, V<F>, V<F>, const P&); \
  template void attention_forward<F, P>(const AW<F>&, int, CV<F>, CV<F>, CV<std::uint8_t>, V<F>, AC<F>&, const P&); \
  template void attention_backward<F, P>(const AW<F>&, int, CV<F>, CV<F>, CV<std::uint8_t>, AC<F>&, CV<F>, V<F>, V<F>, \
                                         const AG<F>&, const P&); \
  template void self_attention_forward<F, P>(const AW<F>&, int, CV<F>, CV<std::uint8_t>, V<F>, AC<F>&, const P&); \
  template void self_attention_backward<F, P>(const AW<F>&, int, CV<F>, CV<std::uint8_t>, AC<F>&, CV<F>, V<F>, \
                                              const AG<F>&, const P&); \
  template void map_head_forward<F, P>(const MapHeadWeights<F, Space>&, int, GeluKind, F, CV<F>, CV<std::uint8_t>, V<F>, \
                                       MapHeadCache<F, Space>&, const P&); \
  template void map_head_backward<F, P>(const MapHeadWeights<F, Space>&, int, GeluKind, CV<F>, CV<std::uint8_t>, \
                                        MapHeadCache<F, Space>&, CV<F>, V<F>, const MapHeadGrads<F, Space>&, const P&); \
  template void expert_mlp_forward<F, P>(const DispatchPlan&, const moe::ExpertWeights<F, Space>&, GeluKind, CV<F>, V<F>, V<F>, \
                                         V<F>, moe::ExpertScratch&, const P&); \
  template void expert_mlp_backward<F, P>(const DispatchPlan&, const moe::ExpertWeights<F, Space>&, GeluKind, CV<F>, CV<F>, \
                                          CV<F>, CV<F>, V<F>, V<F>, const moe::ExpertGrads<F, Space>&, moe::ExpertScratch&, \
                                          const P&);

template void route_topk<F>(CV<F>, CV<std::int64_t>, const Rng&, double, int, std::int64_t, CV<std::int64_t>, bool,
                            CV<std::uint8_t>, V<F>, V<F>, V<F>, V<std::int32_t>, V<std::int32_t>,
                            moe::parallel::BasicRoutingScratch<Space>&);

template void aux_losses<F>(CV<F>, CV<F>, CV<F>, CV<std::int32_t>, CV<std::int32_t>, CV<std::uint8_t>, std::int64_t, int,
                            const moe::AuxLossConfig&, double, V<double>, V<double>, V<double>);
template void router_backward<F>(const DispatchPlan&, CV<F>, CV<std::int32_t>, CV<F>, CV<double>, double, V<F>);

void set_grouped_expert_products(bool grouped) { exec::grouped_products(grouped); }
void set_bias_epilogue(bool epilogue) { exec::bias_epilogue(epilogue); }

LIMOE_CUDA_PRODUCT_OPS(Fp32)
LIMOE_CUDA_PRODUCT_OPS(Bf16Mixed)
#undef LIMOE_CUDA_PRODUCT_OPS

template void layernorm_forward<F>(CV<F>, CV<F>, CV<F>, F, V<F>, V<F>, V<F>);
template void layernorm_backward<F>(CV<F>, CV<F>, CV<F>, CV<F>, CV<F>, V<F>, V<F>, V<F>);
template void gelu_forward<F>(GeluKind, CV<F>, V<F>);
template void gelu_backward<F>(GeluKind, CV<F>, CV<F>, V<F>);
template void bias_gelu_forward<F>(GeluKind, CV<F>, V<F>, V<F>);
template void softmax_forward<F>(CV<F>, V<F>);
template void softmax_backward<F>(CV<F>, CV<F>, V<F>);
template void l2_normalize_forward<F>(CV<F>, V<F>, V<F>);
template void l2_normalize_backward<F>(CV<F>, CV<F>, CV<F>, CV<F>, V<F>);
template void token_embed_forward<F>(CV<std::int32_t>, CV<F>, CV<F>, V<F>);
template void token_embed_backward<F>(CV<std::int32_t>, CV<F>, V<F>, V<F>);
template void pool_forward<F>(Pooling, CV<F>, CV<std::uint8_t>, V<F>);
template void pool_backward<F>(Pooling, CV<std::uint8_t>, CV<F>, V<F>);
template ContrastiveResult contrastive_forward<F>(CV<F>, CV<F>, F, F, V<F>);
template void contrastive_backward<F>(CV<F>, CV<F>, F, F, CV<F>, F, V<F>, V<F>, F*);
template void add_into<F>(CV<F>, V<F>);
template void gather_rows<F>(CV<F>, CV<std::int64_t>, V<F>);
template void scatter_rows<F>(CV<F>, CV<std::int64_t>, V<F>);
template void dispatch_forward<F>(const DispatchPlan&, CV<F>, V<F>);
template void dispatch_backward<F>(const DispatchPlan&, CV<F>, V<F>);
template void combine_forward<F>(const DispatchPlan&, CV<F>, CV<std::int32_t>, CV<F>, V<F>);
template double sum_squares<F>(CV<F>);
template double adamw_update<F>(const AdamWConfig&, std::int64_t, double, CV<F>, CV<std::uint8_t>, V<F>, V<F>, V<F>);
template void adamw_apply<F>(const AdamWConfig&, std::int64_t, double, double, CV<F>, CV<std::uint8_t>, V<F>, V<F>, V<F>);
template void combine_backward<F>(const DispatchPlan&, CV<F>, CV<std::int32_t>, CV<F>, CV<F>, V<F>, V<F>);

}  // namespace limoe::cuda::ops
