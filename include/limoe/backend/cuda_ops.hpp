// limoe/backend/cuda_ops.hpp: the declarations of the CUDA backend's ops (namespace limoe::cuda::ops), the
// functions Ops<Cuda, T> forwards to. Their definitions are src/cuda/backend/ops.cuh and moe_ops.cuh, compiled
// by nvcc into limoe_cuda for T = float (src/cuda/backend.cu), so a plain C++ translation unit that links
// limoe::cuda calls them through these declarations; the tests' emulation compiles the definitions directly.
// Names, shape checks and gradient rules are the CPU ops' (backend/ops.hpp, docs/conventions.md); views live
// in the backend's memory space (device memory).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

#include "limoe/core/block_pool.hpp"
#include "limoe/core/enums.hpp"
#include "limoe/core/policies.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/adamw.hpp"
#include "limoe/moe/config.hpp"
#include "limoe/moe/plan.hpp"
#include "limoe/ops/shapes.hpp"

#if defined(LIMOE_CUDA_EMULATION)
namespace limoe {
// Emulated device memory: host memory that host code may not read through views, as on a GPU (the kernels
// and the emulated cuBLAS read it through raw pointers). Code that would read device memory on the host (the
// model, the MoE layer, the tests) then fails to compile under the emulation too, and every host <-> device
// move goes through upload / download, as it must on a GPU.
// Allocations go through the same caching pool as CudaSpace's (core/block_pool.hpp), over host memory.
struct EmulatedDeviceSpace {
  static constexpr bool host_accessible = false;
  static constexpr const char* name = "cuda (emulated)";
  struct Raw {
    static void* allocate(std::size_t bytes) noexcept {
      return ::operator new(bytes, std::align_val_t{HostSpace::kAlign}, std::nothrow);
    }
    static void release(void* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{HostSpace::kAlign}); }
  };
  static BlockPool<Raw>& pool() {
    static BlockPool<Raw>* p = new BlockPool<Raw>;
    return *p;
  }
  static void* allocate(std::size_t bytes) {
    void* p = pool().allocate(bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) noexcept { pool().deallocate(p, bytes); }
  static void zero(void* p, std::size_t bytes) { HostSpace::zero(p, bytes); }
  static void copy(void* dst, const void* src, std::size_t bytes) { HostSpace::copy(dst, src, bytes); }
  static void upload(void* dst, const void* host_src, std::size_t bytes) {
    note_wait();
    HostSpace::copy(dst, host_src, bytes);
  }
  static void download(void* host_dst, const void* src, std::size_t bytes) {
    note_wait();
    HostSpace::copy(host_dst, src, bytes);
  }
  // Waits for every queued launch (a profiling region's ends, core/profile.hpp); counted for the tests.
  static void synchronize() { ++synchronizations; }
  static inline std::atomic<std::int64_t> synchronizations{0};

  // Where a GPU would make the host wait for it: a copy to host memory waits for the work queued before it,
  // and so does a copy from pageable host memory (cudaMemcpy). Each such copy records how many launches
  // (kernels and products, counted by the backend's exec::) came before it, so a test can see where in a
  // sequence of ops the host would have waited.
  static inline std::atomic<std::int64_t> launches{0};
  static std::vector<std::int64_t> waits() {
    std::lock_guard<std::mutex> lock(wait_mutex_);
    return waits_;
  }
  static void clear_waits() {
    std::lock_guard<std::mutex> lock(wait_mutex_);
    waits_.clear();
  }

 private:
  static void note_wait() {
    std::lock_guard<std::mutex> lock(wait_mutex_);
    waits_.push_back(launches.load());
  }
  static inline std::mutex wait_mutex_;
  static inline std::vector<std::int64_t> waits_;
};
using CudaBackendSpace = EmulatedDeviceSpace;
}
#else
#include "limoe/core/cuda_space.hpp"
namespace limoe {
using CudaBackendSpace = CudaSpace;
}
#endif

namespace limoe::cuda::ops {

using Space = CudaBackendSpace;
template <class T>
using CV = CView<T, Space>;
template <class T>
using V = View<T, Space>;
using DispatchPlan = moe::BasicDispatchPlan<Space>;

// The products' precision policy (core/policies.hpp): Fp32 (the default), or Bf16Mixed (the products read
// bf16 operands, converted on the device as they enter the product, through tensor cores with fp32
// accumulation; the policy's host mirror is not used). Compiled for both.

template <class T, class Prec = Fp32>
void linear_forward(CV<T> x, CV<T> W, CV<T> b, V<T> y, const Prec& = {});
template <class T, class Prec = Fp32>
void linear_backward(CV<T> x, CV<T> W, CV<T> dy, V<T> dx, V<T> dW, V<T> db, const Prec& = {});
template <class T>
void layernorm_forward(CV<T> x, CV<T> g, CV<T> b, T eps, V<T> y, V<T> mean, V<T> rstd);
template <class T>
void layernorm_backward(CV<T> x, CV<T> g, CV<T> mean, CV<T> rstd, CV<T> dy, V<T> dx, V<T> dg, V<T> db);
template <class T>
void gelu_forward(GeluKind kind, CV<T> x, V<T> y);
template <class T>
void gelu_backward(GeluKind kind, CV<T> x, CV<T> dy, V<T> dx);
template <class T>
void bias_gelu_forward(GeluKind kind, CV<T> b, V<T> pre_out, V<T> y);
template <class T>
void softmax_forward(CV<T> x, V<T> y);
template <class T>
void softmax_backward(CV<T> y, CV<T> dy, V<T> dx);
template <class T>
void l2_normalize_forward(CV<T> u, V<T> z, V<T> norms);
template <class T>
void l2_normalize_backward(CV<T> u, CV<T> z, CV<T> norms, CV<T> dz, V<T> du);
template <class T, class Prec = Fp32>
void patch_embed_forward(CV<T> images, int P, CV<T> W, CV<T> b, CV<T> pos, V<T> patches, V<T> y, const Prec& = {});
template <class T, class Prec = Fp32>
void patch_embed_backward(CV<T> images, int P, CV<T> patches, CV<T> W, CV<T> dy, V<T> dimages, V<T> dW, V<T> db,
                          V<T> dpos, const Prec& = {});
template <class T>
void token_embed_forward(CV<std::int32_t> ids, CV<T> table, CV<T> pos, V<T> y);
template <class T>
void token_embed_backward(CV<std::int32_t> ids, CV<T> dy, V<T> dtable, V<T> dpos);
template <class T>
void pool_forward(Pooling kind, CV<T> x, CV<std::uint8_t> key_mask, V<T> y);
template <class T>
void pool_backward(Pooling kind, CV<std::uint8_t> key_mask, CV<T> dy, V<T> dx);
template <class T, class Prec = Fp32>
void attention_forward(const AttentionWeights<T, Space>& w, int heads, CV<T> xq, CV<T> xkv, CV<std::uint8_t> key_mask,
                       V<T> y, AttentionCache<T, Space>& cache, const Prec& = {});
template <class T, class Prec = Fp32>
void attention_backward(const AttentionWeights<T, Space>& w, int heads, CV<T> xq, CV<T> xkv,
                        CV<std::uint8_t> key_mask, AttentionCache<T, Space>& cache, CV<T> dy, V<T> dxq, V<T> dxkv,
                        const AttentionGrads<T, Space>& g, const Prec& = {});
template <class T, class Prec = Fp32>
void self_attention_forward(const AttentionWeights<T, Space>& w, int heads, CV<T> x, CV<std::uint8_t> key_mask, V<T> y,
                            AttentionCache<T, Space>& cache, const Prec& = {});
template <class T, class Prec = Fp32>
void self_attention_backward(const AttentionWeights<T, Space>& w, int heads, CV<T> x, CV<std::uint8_t> key_mask,
                             AttentionCache<T, Space>& cache, CV<T> dy, V<T> dx, const AttentionGrads<T, Space>& g,
                             const Prec& = {});
template <class T, class Prec = Fp32>
void map_head_forward(const MapHeadWeights<T, Space>& w, int heads, GeluKind gelu, T ln_eps, CV<T> x,
                      CV<std::uint8_t> key_mask, V<T> y, MapHeadCache<T, Space>& c, const Prec& = {});
template <class T, class Prec = Fp32>
void map_head_backward(const MapHeadWeights<T, Space>& w, int heads, GeluKind gelu, CV<T> x, CV<std::uint8_t> key_mask,
                       MapHeadCache<T, Space>& c, CV<T> dy, V<T> dx, const MapHeadGrads<T, Space>& g, const Prec& = {});
template <class T>
ContrastiveResult contrastive_forward(CV<T> zi, CV<T> zt, T theta, T max_scale, V<T> logits);
template <class T>
void contrastive_backward(CV<T> zi, CV<T> zt, T theta, T max_scale, CV<T> logits, T dloss, V<T> dzi, V<T> dzt,
                          T* dtheta);

// The row moves of limoe/ops/rows.hpp: y += x; dst[i] = src[idx[i]]; dst[idx[i]] = src[i]. The indices are
// not read back to the host for a check (they stay on the device): they must be rows of the indexed side.
template <class T>
void add_into(CV<T> x, V<T> y);
template <class T>
void gather_rows(CV<T> src, CV<std::int64_t> idx, V<T> dst);
template <class T>
void scatter_rows(CV<T> src, CV<std::int64_t> idx, V<T> dst);
// y = x rounded to bf16 (math/bf16.hpp), elementwise: a device model's weight mirror (core/precision.hpp).
void to_bf16(CV<float> x, V<std::uint16_t> y);

void make_dispatch_plan(CV<std::int32_t> route, int E, DispatchPlan& p);
// The fixed-capacity plan (moe/plan.hpp, fixed = C: expert e owns rows [e C, (e + 1) C)), made without a
// synchronisation; route must hold at most C choices per expert (the stock router's routes do).
void make_fixed_dispatch_plan(CV<std::int32_t> route, int E, index_t C, DispatchPlan& p);
template <class T>
void dispatch_forward(const DispatchPlan& p, CV<T> x, V<T> xe);
template <class T>
void dispatch_backward(const DispatchPlan& p, CV<T> dxe, V<T> dx);
// The scratch (moe::ExpertScratch: the CPU backend's tile lists) is accepted and unused.
template <class T, class Prec = Fp32>
void expert_mlp_forward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe, V<T> hpre,
                        V<T> h, V<T> ye, moe::ExpertScratch& scratch, const Prec& = {});
template <class T, class Prec = Fp32>
void expert_mlp_backward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe,
                         CV<T> hpre, CV<T> h, CV<T> dye, V<T> dh, V<T> dxe, const moe::ExpertGrads<T, Space>& g,
                         moe::ExpertScratch& scratch, const Prec& = {});
// How the experts of a packed plan (make_dispatch_plan) run their products: one grouped product per weight
// matrix over the experts with rows (the default), or one product per expert (benchmarks compare the two). The
// results are the same; the setting is process-wide.
void set_grouped_expert_products(bool grouped);
// How a linear layer adds its bias: in the product's epilogue through cuBLASLt (the default), or written into the
// output by a launch with the product accumulated onto it (benchmarks compare the two). Process-wide.
void set_bias_epilogue(bool epilogue);
template <class T>
void combine_forward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, V<T> y);
template <class T>
void combine_backward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, CV<T> dy, V<T> dye,
                      V<T> dgate);

// The sum of x's squares in double, in a fixed order (the optimizer's norm; the trainer's norm of a model
// holding a shard of the experts).
template <class T>
double sum_squares(CV<T> x);
// One AdamW step with global-norm clipping over flat buffers (w, m, v updated in place; decay[i] != 0 where
// weight decay applies), step t counted from 1: AdamW::update's arithmetic (math/adamw.hpp). Returns the
// gradient norm before clipping; a non-finite norm throws and changes nothing.
template <class T>
double adamw_update(const AdamWConfig& cfg, std::int64_t step, double lr, CV<T> g, CV<std::uint8_t> decay, V<T> w,
                    V<T> m, V<T> v);
// The same step with the norm given by the caller (a model holding a shard: the whole model's norm).
template <class T>
void adamw_apply(const AdamWConfig& cfg, std::int64_t step, double lr, double norm, CV<T> g, CV<std::uint8_t> decay,
                 V<T> w, V<T> m, V<T> v);

// The stock router on the device (src/cuda/backend/moe_ops.cuh: noise, gates, then route_groups below on the
// backend's stream); what moe_forward runs for TopKRouter with GaussianNoise on a device backend.
template <class T>
void route_topk(CV<T> logits, CV<std::int64_t> pos, const Rng& rng, double sigma, int K, std::int64_t group_size,
                CV<std::int64_t> capacity, bool bpr, CV<std::uint8_t> modality, V<T> noisy, V<T> gates, V<T> probs,
                V<std::int32_t> choice, V<std::int32_t> route, moe::parallel::BasicRoutingScratch<Space>& scratch);

// The stock auxiliary losses (moe/losses.hpp's terms in the mask `terms`, moe::StockLossMask) of every routing
// group of a call and the sums behind its routing statistics, on the device (src/cuda/backend/moe_ops.cuh):
// dlogits [N, E] the weighted gradient with respect to the clean logits (0 for padding), values [G, 8] per group
// (total, importance, load, local entropy image / text, global entropy image / text, z; each scaled by 1 / G),
// sums [G, 8E + 7] (kernels/losses.cuh's layout). modality [N]; sigma the router's noise scale (0: none).
template <class T>
void aux_losses(CV<T> logits, CV<T> noisy, CV<T> probs, CV<std::int32_t> choice, CV<std::int32_t> route,
                CV<std::uint8_t> modality, std::int64_t group_size, int terms, const moe::AuxLossConfig& cfg, double sigma,
                V<double> dlogits, V<double> values, V<double> sums);
// The router's logit gradient [N, E] from the rows' gate gradients [A] and the auxiliary losses' [N, E] times
// aux_scale (moe/formulas.hpp's router_logit_grad per token).
template <class T>
void router_backward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> row_dgate, CV<double> aux,
                     double aux_scale, V<T> dlogits);

// Routing on the device (src/cuda/routing.cu): moe::parallel::route_groups with thrust::cuda::par on device
// views (gates [N, E], capacity per group, choice and route [N, K], modality [N] or empty); the same decisions as
// the sequential router on the same gates, padding (kPad) masked out as the CPU layer masks it. T = float or
// double.
template <class T>
void route_groups(CV<T> gates, int K, std::int64_t group_size, CV<std::int64_t> capacity, bool bpr,
                  V<std::int32_t> choice, V<std::int32_t> route, moe::parallel::BasicRoutingScratch<Space>& scratch,
                  CV<std::uint8_t> modality = {});

}  // namespace limoe::cuda::ops
