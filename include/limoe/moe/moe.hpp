// limoe/moe/moe.hpp: the sparse Mixture-of-Experts layer of LIMoE (semantics §3, 4, 6).
//   config.hpp  RouterConfig (the checkpoint "router" object), AuxLossConfig, MoeConfig (E, K and the two), compute_capacity
//   ops.hpp     the dispatch plan, dispatch, grouped expert MLP, combine (moe::cpu:: and moe::ref::)
//   parallel_routing.hpp  routing on Thrust (not included here: needs the CUDA toolkit's cccl headers)
//   router.hpp  RouteGroup, the RouterPolicy concept, TopKRouter<KPolicy, NoisePolicy, OrderPolicy>, visit_router
//   losses.hpp  AuxLosses<Terms...> (importance, load, local/global entropy per modality, z-loss), AuxLossValues
//   stats.hpp   RoutingStats
//   layer.hpp   MoeParams, MoeGrads, MoeContext, moe_forward, moe_backward (generic over the backend)
#pragma once

#include "limoe/moe/config.hpp"
#include "limoe/moe/layer.hpp"
#include "limoe/moe/losses.hpp"
#include "limoe/moe/router.hpp"
#include "limoe/moe/stats.hpp"
