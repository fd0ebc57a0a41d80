// src/cuda/backend/moe_ops.cuh: the CUDA backend's MoE ops (moe/ops.hpp's list and rules): the stock router on
// the device (noise, gates and moe/parallel_routing.hpp's Thrust routing), the dispatch plan by a counting sort
// without atomics, dispatch and combine as gathers, the experts as one strided-batched product per weight
// matrix over a fixed-capacity plan's [E, C] rows, else one product per expert over its block of rows (the
// grouped product of no-drop routing). A packed plan's per-expert row counts come back to the host once per plan
// (the products' sizes); nothing else synchronises.
// The routing itself is cuda_ops.hpp's route_groups: Thrust on the GPU (src/cuda/routing.cu) under nvcc, on
// Thrust's CPP system in a translation unit of its own under the emulation (tests/support/emu_routing.cpp:
// Thrust's headers and the emulation's CUDA keywords do not mix in one unit).
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../kernels/losses.cuh"
#include "../kernels/plan.cuh"
#include "ops.cuh"

namespace limoe::cuda::ops {

// The stock router (moe/router.hpp's TopKRouter with GaussianNoise, BPR or vanilla order) for every group of a
// call, on the device: kernels::router_gates (noise, gates, the clean probs), then route_groups (top-K, priority,
// capacity; padding masked). pos [N]: each routed token's noise counter row (MoeConfig::first_token + its row in
// its group's packed order), -1 for padding; sigma: the noise's standard deviation, 0 for none; capacity [G];
// modality [N] or empty. Writes noisy, gates, probs [N, E] and choice, route [N, K]; the decisions are the
// sequential router's on the same gates (the layer routing each group's non-padding tokens packed).
template <class T>
void route_topk(CV<T> logits, CV<std::int64_t> pos, const Rng& rng, double sigma, int K, std::int64_t group_size,
                CV<std::int64_t> capacity, bool bpr, CV<std::uint8_t> modality, V<T> noisy, V<T> gates, V<T> probs,
                V<std::int32_t> choice, V<std::int32_t> route, moe::parallel::BasicRoutingScratch<Space>& scratch) {
  LIMOE_CHECK(logits.rank() == 2, "cuda::route_topk: logits must be [N, E], got ", logits.shape().str());
  const index_t N = logits.dim(0);
  const int E = static_cast<int>(logits.dim(1));
  expect_shape(pos, Shape{N}, "cuda::route_topk: pos");
  expect_shape(noisy, logits.shape(), "cuda::route_topk: noisy");
  expect_shape(gates, logits.shape(), "cuda::route_topk: gates");
  expect_shape(probs, logits.shape(), "cuda::route_topk: probs");
  LIMOE_CHECK(sigma >= 0, "cuda::route_topk: sigma must be >= 0, got ", sigma);
  exec::launch("router_gates", exec::grid_for(N, 128), 128, kn::router_gates<T>, logits.data(), pos.data(), N, E,
               rng, sigma, noisy.data(), gates.data(), probs.data());
  route_groups<T>(CV<T>(gates), K, group_size, capacity, bpr, choice, route, scratch, modality);
}

// The stock auxiliary losses of every routing group and the sums behind the routing statistics, on the device
// (kernels/losses.cuh; moe/losses.hpp's terms, those in the mask `terms` of moe::StockLossMask, with cfg's weights):
// per token its entropy, logsumexp and load probabilities, per chunk of 256 tokens and group the sums in order,
// per group the values and gradient coefficients, per token the weighted gradient. sigma: the router's noise
// scale (0: no noise, no load term). Writes dlogits [N, E] (d loss / d clean logits; 0 for padding), values [G,
// kLossValues] (per group, scaled by 1 / G as the host terms add them) and sums [G, loss_quantities(E)].
template <class T>
void aux_losses(CV<T> logits, CV<T> noisy, CV<T> probs, CV<std::int32_t> choice, CV<std::int32_t> route,
                CV<std::uint8_t> modality, std::int64_t group_size, int terms, const moe::AuxLossConfig& cfg,
                double sigma, V<double> dlogits, V<double> values, V<double> sums) {
  LIMOE_CHECK(logits.rank() == 2, "cuda::aux_losses: logits must be [N, E], got ", logits.shape().str());
  LIMOE_CHECK(choice.rank() == 2 && choice.dim(0) == logits.dim(0), "cuda::aux_losses: choice must be [N, K], got ",
              choice.shape().str());
  const index_t N = logits.dim(0), K = choice.dim(1);
  const int E = static_cast<int>(logits.dim(1));
  LIMOE_CHECK(group_size >= 1 && K >= 1 && sigma >= 0, "cuda::aux_losses: group_size ", group_size, ", K ", K,
              ", sigma ", sigma, " (need group_size >= 1, K >= 1, sigma >= 0)");
  const index_t G = (N + group_size - 1) / group_size, Q = kn::loss_quantities(E);
  expect_shape(noisy, logits.shape(), "cuda::aux_losses: noisy");
  expect_shape(probs, logits.shape(), "cuda::aux_losses: probs");
  expect_shape(route, choice.shape(), "cuda::aux_losses: route");
  expect_shape(modality, Shape{N}, "cuda::aux_losses: modality");
  expect_shape(dlogits, logits.shape(), "cuda::aux_losses: dlogits");
  expect_shape(values, Shape{G, kn::kLossValues}, "cuda::aux_losses: values");
  expect_shape(sums, Shape{G, Q}, "cuda::aux_losses: sums");
  if (N == 0) return;
  kn::LossParams lp;
  lp.terms = terms;
  lp.importance_weight = cfg.importance_weight, lp.load_weight = cfg.load_weight, lp.z_weight = cfg.z_loss_weight;
  for (int m = 0; m < 2; ++m)
    lp.local_weight[m] = cfg.local_entropy_weight[static_cast<std::size_t>(m)],
    lp.global_weight[m] = cfg.global_entropy_weight[static_cast<std::size_t>(m)],
    lp.global_tau[m] = cfg.global_entropy_tau[static_cast<std::size_t>(m)];
  lp.sigma = sigma, lp.scale = 1.0 / static_cast<double>(G);
  const index_t gs = std::min(group_size, N), cpg = (gs + kn::kLossChunk - 1) / kn::kLossChunk, chunks = G * cpg;
  DTensor<double> H(Shape{N}), lse(Shape{N}), sf(Shape{N, E}), part(Shape{chunks, Q});
  DTensor<double> coef(Shape{G, kn::kLossCoefs}), vec(Shape{G, 4 * E});
  exec::launch("loss_token_terms", exec::grid_for(N, 128), 128, kn::loss_token_terms<T>, logits.data(), noisy.data(),
               probs.data(), choice.data(), modality.data(), N, E, static_cast<int>(K), sigma,
               H.data(), lse.data(), sf.data());
  exec::launch("loss_chunk_sums", exec::grid_for(chunks * Q, 128), 128, kn::loss_chunk_sums<T>, probs.data(),
               choice.data(), route.data(), modality.data(), static_cast<const double*>(H.data()),
               static_cast<const double*>(lse.data()), static_cast<const double*>(sf.data()), N, E, static_cast<int>(K),
               gs, chunks, cpg, part.data());
  exec::launch("loss_group_finish", exec::grid_for(G, 64), 64, kn::loss_group_finish<>,
               static_cast<const double*>(part.data()), G, cpg, E, lp, sums.data(), values.data(), coef.data(),
               vec.data());
  exec::launch("loss_token_grads", exec::grid_for(N, 128), 128, kn::loss_token_grads<T>, logits.data(), noisy.data(),
               probs.data(), choice.data(), modality.data(), static_cast<const double*>(H.data()),
               static_cast<const double*>(lse.data()), static_cast<const double*>(coef.data()),
               static_cast<const double*>(vec.data()), N, E, static_cast<int>(K), gs, sigma, dlogits.data());
}

// The router's logit gradient of every token (moe/formulas.hpp's router_logit_grad, one thread per token):
// dlogits [N, E] from the gates [N, E], routes [N, K], the plan's slot rows, the rows' gate gradients row_dgate
// [A] and the auxiliary losses' gradient aux [N, E] (double) times aux_scale.
template <class T>
void router_backward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> row_dgate, CV<double> aux,
                     double aux_scale, V<T> dlogits) {
  expect_shape(gates, Shape{p.N, p.E}, "cuda::router_backward: gates");
  expect_shape(route, Shape{p.N, p.K}, "cuda::router_backward: route");
  expect_shape(row_dgate, Shape{p.A}, "cuda::router_backward: row_dgate");
  expect_shape(aux, Shape{p.N, p.E}, "cuda::router_backward: aux");
  expect_shape(dlogits, Shape{p.N, p.E}, "cuda::router_backward: dlogits");
  if (p.N == 0) return;
  exec::launch("router_backward", exec::grid_for(p.N, 128), 128, kn::router_backward<T>, gates.data(), route.data(),
               static_cast<const std::int64_t*>(p.slot_row.data()), row_dgate.data(), aux.data(), aux_scale, p.N, p.E,
               p.K, dlogits.data());
}

namespace detail {
// The plan kernels' launch (kernels/plan.cuh): a block per chunk of slots (the rest strided), a thread per expert
// and one for invalid entries, in whole warps.
inline std::pair<dim3, int> plan_launch(index_t chunks, int E) {
  return {dim3(static_cast<unsigned>(chunks < 65535 ? chunks : 65535)), E + 1 < 256 ? 32 * ((E + 32) / 32) : 256};
}
}  // namespace detail

// route [N, K] (expert or -1) -> plan, as moe::cpu::make_dispatch_plan: experts' blocks in expert order,
// choices in call order inside a block. An entry that is neither -1 nor an expert is an error.
// Not inline: one translation unit per program compiles the backend (src/cuda/backend.cu, or an emulated
// test), and plain C++ callers link it through cuda_ops.hpp's declaration.
void make_dispatch_plan(CV<std::int32_t> route, int E, DispatchPlan& p) {
  LIMOE_CHECK(route.rank() == 2 && E >= 1, "cuda::make_dispatch_plan: route must be [N, K] and E >= 1, got ",
              route.shape().str(), ", E = ", E);
  const index_t N = route.dim(0), K = route.dim(1), slots = N * K;
  // The per-(chunk, expert) counts (kernels/plan.cuh), scanned on the host into each one's first row.
  const index_t chunks = (slots + kn::kPlanChunk - 1) / kn::kPlanChunk;
  const auto Es = static_cast<std::size_t>(E);
  std::vector<std::int64_t> c(static_cast<std::size_t>(chunks) * (Es + 1), 0);
  const auto [grid, threads] = detail::plan_launch(chunks, E);
  if (chunks > 0) {
    DTensor<std::int64_t> counts(Shape{chunks * (E + 1)});
    exec::launch("plan_count", grid, threads, kn::plan_count, route.data(), slots, E, counts.data());
    exec::to_host(c.data(), counts.data(), c.size());
  }
  std::vector<std::int64_t> off(Es + 1, 0), starts(static_cast<std::size_t>(chunks) * Es);
  std::int64_t invalid = 0;
  for (index_t ch = 0; ch < chunks; ++ch) invalid += c[static_cast<std::size_t>(ch) * (Es + 1) + Es];
  LIMOE_CHECK(invalid == 0, "cuda::make_dispatch_plan: ", invalid, " route entries are neither -1 nor an expert in [0, ",
              E, ")");
  for (std::size_t e = 0; e < Es; ++e) {
    std::int64_t r = off[e];
    for (std::size_t ch = 0; ch < static_cast<std::size_t>(chunks); ++ch) {
      starts[ch * Es + e] = r;
      r += c[ch * (Es + 1) + e];
    }
    off[e + 1] = r;
  }
  p.offsets.resize(Shape{E + 1});
  exec::to_device(p.offsets.data(), off.data(), off.size());
  moe::detail::plan_resize(p, N, static_cast<int>(K), E, off[Es]);
  p.host_offsets = off;  // what the experts' products size their blocks by, without a read-back
  if (chunks == 0) return;
  DTensor<std::int64_t> dstarts(Shape{chunks * E});
  exec::to_device(dstarts.data(), starts.data(), starts.size());
  exec::launch("plan_assign", grid, threads, kn::plan_assign, route.data(), slots, static_cast<int>(K), E,
               static_cast<const std::int64_t*>(dstarts.data()), std::int64_t{0}, p.row_token.data(),
               p.row_slot.data(), p.slot_row.data());
}

// The fixed-capacity plan (moe/plan.hpp): expert e owns rows [e C, (e + 1) C), its accepted choices first in
// slot order (as the packed plan's), the rest empty. Nothing comes back to the host: the counts are scanned on
// the device (kernels::plan_fixed_starts), and the sizes (A = E C) are the caller's. route must respect the
// capacity (at most C choices per expert, as the stock router's do; a choice past an expert's C rows would be
// treated as dropped). Route entries are not checked here (the packed plan checks them, with a read-back).
void make_fixed_dispatch_plan(CV<std::int32_t> route, int E, index_t C, DispatchPlan& p) {
  LIMOE_CHECK(route.rank() == 2 && E >= 1 && C >= 1, "cuda::make_fixed_dispatch_plan: route must be [N, K], E >= 1 "
              "and C >= 1, got ", route.shape().str(), ", E = ", E, ", C = ", C);
  const index_t N = route.dim(0), K = route.dim(1), slots = N * K;
  moe::detail::plan_resize(p, N, static_cast<int>(K), E, E * C);
  p.fixed = C;
  p.offsets.resize(Shape{E + 1});
  exec::launch("plan_fixed_offsets", exec::grid_for(E + 1, 64), 64, kn::plan_fixed_offsets, E, std::int64_t{C},
               p.offsets.data());
  exec::launch("fill (row_token)", exec::grid_for(p.A), 256, kn::fill<std::int64_t>, p.row_token.data(), p.A,
               std::int64_t{-1});
  exec::launch("fill (row_slot)", exec::grid_for(p.A), 256, kn::fill<std::int64_t>, p.row_slot.data(), p.A,
               std::int64_t{-1});
  const index_t chunks = (slots + kn::kPlanChunk - 1) / kn::kPlanChunk;
  if (chunks == 0) return;
  const auto [grid, threads] = detail::plan_launch(chunks, E);
  DTensor<std::int64_t> counts(Shape{chunks * (E + 1)}), starts(Shape{chunks * E});
  exec::launch("plan_count", grid, threads, kn::plan_count, route.data(), slots, E, counts.data());
  exec::launch("plan_fixed_starts", exec::grid_for(E, 64), 64, kn::plan_fixed_starts,
               static_cast<const std::int64_t*>(counts.data()), chunks, E, C, starts.data());
  exec::launch("plan_assign", grid, threads, kn::plan_assign, route.data(), slots, static_cast<int>(K), E,
               static_cast<const std::int64_t*>(starts.data()), C, p.row_token.data(), p.row_slot.data(),
               p.slot_row.data());
}

template <class T>
void dispatch_forward(const DispatchPlan& p, CV<T> x, V<T> xe) {
  moe::detail::dispatch_check<T, Space>("cuda::dispatch_forward", p, x, xe);
  const index_t D = x.dim(1);
  exec::launch("dispatch_forward", exec::grid_for(p.A * D), 256, kn::dispatch_forward<T>,
               static_cast<const std::int64_t*>(p.row_token.data()), p.A, D, x.data(), xe.data());
}

template <class T>
void dispatch_backward(const DispatchPlan& p, CV<T> dxe, V<T> dx) {
  moe::detail::dispatch_check<T, Space>("cuda::dispatch_backward", p, dx, dxe);
  const index_t D = dx.dim(1);
  exec::launch("dispatch_backward", exec::grid_for(p.N * D), 256, kn::dispatch_backward<T>,
               static_cast<const std::int64_t*>(p.slot_row.data()), p.N, p.K, D, dxe.data(), dx.data());
}

namespace detail {
// An operand of the expert products as policy Prec reads it: fp32 in place, or (a mixed policy) the whole
// [rows, cols] buffer as exec::Bf16Operand reads it (the mirror's copy of a weight, else rounded once per op),
// so each expert's product reads its block of it instead of rounding its own operands.
template <class Prec, class T>
class ExpertOperand {
 public:
  ExpertOperand(const Prec& prec, const T* src, index_t rows, index_t cols) : f_(src) {
    if constexpr (Prec::mixed) lo_.emplace(prec, src, rows, cols, cols);
    else (void)prec, (void)rows, (void)cols;
  }
  // A bf16 copy already made elsewhere (the forward's GELU output, written by expert_bias_gelu), packed.
  ExpertOperand(const T* src, const std::uint16_t* lo, index_t cols) : f_(src) {
    if constexpr (Prec::mixed) lo_.emplace(lo, cols);
    else (void)lo, (void)cols;
  }
  const T* f() const { return f_; }
  const std::uint16_t* lo() const { return lo_->data(); }

 private:
  const T* f_;
  std::optional<exec::Bf16Operand> lo_;
};

// For i < batch: C_i = op(A_i) op(B_i) (+ C_i when accumulate) with A_i the operand's elements from a0 + i * sa
// (B_i, C_i likewise), under policy Prec: gemm_batched in fp32, gemm_bf16_rounded_batched on the bf16 copies.
template <class Prec, class T>
void expert_product(bool ta, bool tb, index_t M, index_t N, index_t K, const ExpertOperand<Prec, T>& A, index_t a0,
                    index_t lda, index_t sa, const ExpertOperand<Prec, T>& B, index_t b0, index_t ldb, index_t sb,
                    bool accumulate, T* C, index_t ldc, index_t sc, index_t batch) {
  if constexpr (Prec::mixed)
    exec::gemm_bf16_rounded_batched(ta, tb, M, N, K, 1.0f, A.lo() + a0, lda, sa, B.lo() + b0, ldb, sb,
                                    accumulate ? 1.0f : 0.0f, C, ldc, sc, batch);
  else
    exec::gemm_batched<T>(ta, tb, M, N, K, T(1), A.f() + a0, lda, sa, B.f() + b0, ldb, sb, accumulate ? T(1) : T(0),
                          C, ldc, sc, batch);
}

// The products of the experts with rows, one problem each: in fp32 one grouped product (exec::gemm_grouped); on
// bf16 operands one product per expert (cuBLAS has no grouped product with bf16 operands and an fp32 output).
template <class Prec, class T>
void expert_grouped(bool ta, bool tb, const ExpertOperand<Prec, T>& A, index_t lda, const ExpertOperand<Prec, T>& B,
                    index_t ldb, bool accumulate, T* C, index_t ldc, std::vector<exec::GemmProblem> problems) {
  if constexpr (Prec::mixed) {
    for (const exec::GemmProblem& q : problems)
      expert_product<Prec, T>(ta, tb, q.M, q.N, q.K, A, q.a, lda, 0, B, q.b, ldb, 0, accumulate, C + q.c, ldc, 0, 1);
  } else {
    exec::gemm_grouped<T>(ta, tb, T(1), A.f(), lda, B.f(), ldb, accumulate ? T(1) : T(0), C, ldc, std::move(problems));
  }
}

// The experts' blocks of rows as the products see them. A fixed-capacity plan: every expert's block is C rows,
// so each product is one strided-batched product over the E blocks (expert e's rows at e C, its weights at e times
// a weight matrix's size). Otherwise one product per expert with rows (no-drop routing, a capacity with slack):
// in fp32 all of them one grouped product (expert_grouped), their row counts from the plan's host copy of its
// offsets (moe/plan.hpp: every packed plan on the device has one, so nothing is read back).
class ExpertBlocks {
 public:
  explicit ExpertBlocks(const DispatchPlan& p) : fixed_(p.fixed), E_(p.E), off_(p.host_offsets) {
    LIMOE_CHECK(fixed_ > 0 || off_.size() == static_cast<std::size_t>(E_ + 1),
                "cuda experts: the dispatch plan has no host copy of its offsets (build it with make_dispatch_plan)");
  }
  // C = op(A) op(B) (+ C when accumulate) over every expert's block: problem(e, r0, n) gives expert e's product
  // over its n rows from row r0 (sizes and element offsets); sa, sb, sc are the strides from one expert to the
  // next that a fixed plan's batched product takes (its problem(0, 0, C) is expert 0's).
  template <class Prec, class T, class Problem>
  void product(bool ta, bool tb, const ExpertOperand<Prec, T>& A, index_t lda, index_t sa,
               const ExpertOperand<Prec, T>& B, index_t ldb, index_t sb, bool accumulate, T* C, index_t ldc,
               index_t sc, Problem&& problem) const {
    if (fixed_ > 0) {
      const exec::GemmProblem q = problem(index_t{0}, index_t{0}, fixed_);
      expert_product<Prec, T>(ta, tb, q.M, q.N, q.K, A, q.a, lda, sa, B, q.b, ldb, sb, accumulate, C + q.c, ldc, sc,
                              E_);
      return;
    }
    std::vector<exec::GemmProblem> problems;
    for (std::size_t e = 0; e + 1 < off_.size(); ++e)
      if (off_[e + 1] > off_[e]) problems.push_back(problem(static_cast<index_t>(e), off_[e], off_[e + 1] - off_[e]));
    expert_grouped<Prec, T>(ta, tb, A, lda, B, ldb, accumulate, C, ldc, std::move(problems));
  }

 private:
  index_t fixed_, E_;
  const std::vector<index_t>& off_;  // the plan's: an ExpertBlocks lives within one op's call
};
}  // namespace detail

// xe [A, D] -> hpre [A, M] (kept for the backward), h = GELU(hpre), ye [A, D]: per expert e over its rows,
// hpre = xe W1_e^T + b1_e and ye = h W2_e^T + b2_e. One product per weight matrix over all experts for a
// fixed-capacity plan (strided-batched: no host synchronisation), else one per expert and weight matrix
// (detail::ExpertBlocks); the biases and the activation are one launch each over all rows
// (kernels::expert_bias_gelu, expert_bias_add), not one per expert. Under a mixed policy every operand is
// rounded once per call (detail::ExpertOperand), h as GELU writes it.
template <class T, class Prec>
void expert_mlp_forward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe, V<T> hpre,
                        V<T> h, V<T> ye, moe::ExpertScratch&, const Prec& prec) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = moe::detail::expert_check<T, Space>("cuda::expert_mlp_forward", p, w, D);
  expect_shape(xe, Shape{p.A, D}, "cuda::expert_mlp_forward: xe");
  expect_shape(hpre, Shape{p.A, M}, "cuda::expert_mlp_forward: hpre");
  expect_shape(h, Shape{p.A, M}, "cuda::expert_mlp_forward: h");
  expect_shape(ye, Shape{p.A, D}, "cuda::expert_mlp_forward: ye");
  if (p.A == 0) return;
  using Op = detail::ExpertOperand<Prec, T>;
  const detail::ExpertBlocks blocks(p);
  const std::int64_t* offsets = p.offsets.data();
  const index_t C = p.fixed;  // the strides below matter for a fixed plan only (batch 1 otherwise)
  {
    const Op x(prec, xe.data(), p.A, D), w1(prec, w.fc1_w.data(), p.E * M, D);
    blocks.product(false, true, x, D, C * D, w1, D, M * D, false, hpre.data(), M, C * M,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{n, M, D, r0 * D, e * M * D, r0 * M};
                   });
  }
  DTensor<std::uint16_t> h16(Shape{Prec::mixed ? p.A : 0, M});
  exec::launch("expert_bias_gelu", exec::grid_for(p.A * M), 256, kn::expert_bias_gelu<T>, offsets, p.E, p.A, M, gelu,
               w.fc1_b.data(), hpre.data(), h.data(), Prec::mixed ? h16.data() : nullptr);
  {
    const Op hop(h.data(), h16.data(), M), w2(prec, w.fc2_w.data(), p.E * D, M);
    blocks.product(false, true, hop, M, C * M, w2, M, D * M, false, ye.data(), D, C * D,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{n, D, M, r0 * M, e * D * M, r0 * D};
                   });
  }
  exec::launch("expert_bias_add", exec::grid_for(p.A * D), 256, kn::expert_bias_add<T>, offsets, p.E, p.A, D,
               w.fc2_b.data(), ye.data());
}

// dh = (dye W2_e) GELU'(hpre) (overwritten), dxe = dh W1_e (overwritten; skipped when empty); dW2_e += dye^T h,
// db2_e += column sums of dye, dW1_e += dh^T xe, db1_e += column sums of dh (each skipped when empty). The
// products as in the forward (one strided-batched product each for a fixed plan, whose empty rows have dye = 0
// and so add nothing to the weight gradients); the bias gradients one launch each (kernels::expert_column_sums);
// under a mixed policy each operand is rounded once.
template <class T, class Prec>
void expert_mlp_backward(const DispatchPlan& p, const moe::ExpertWeights<T, Space>& w, GeluKind gelu, CV<T> xe,
                         CV<T> hpre, CV<T> h, CV<T> dye, V<T> dh, V<T> dxe, const moe::ExpertGrads<T, Space>& g,
                         moe::ExpertScratch&, const Prec& prec) {
  const index_t D = xe.rank() == 2 ? xe.dim(1) : 0;
  const index_t M = moe::detail::expert_check<T, Space>("cuda::expert_mlp_backward", p, w, D);
  expect_shape(xe, Shape{p.A, D}, "cuda::expert_mlp_backward: xe");
  expect_shape(hpre, Shape{p.A, M}, "cuda::expert_mlp_backward: hpre");
  expect_shape(h, Shape{p.A, M}, "cuda::expert_mlp_backward: h");
  expect_shape(dye, Shape{p.A, D}, "cuda::expert_mlp_backward: dye");
  expect_shape(dh, Shape{p.A, M}, "cuda::expert_mlp_backward: dh");
  if (!dxe.empty()) expect_shape(dxe, Shape{p.A, D}, "cuda::expert_mlp_backward: dxe");
  if (p.A == 0) return;
  using Op = detail::ExpertOperand<Prec, T>;
  const detail::ExpertBlocks blocks(p);
  const std::int64_t* offsets = p.offsets.data();
  const index_t C = p.fixed;
  const Op dy(prec, dye.data(), p.A, D);
  {
    const Op w2(prec, w.fc2_w.data(), p.E * D, M);
    blocks.product(false, false, dy, D, C * D, w2, M, D * M, false, dh.data(), M, C * M,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{n, M, D, r0 * D, e * D * M, r0 * M};
                   });
  }
  gelu_backward<T>(gelu, hpre, CV<T>(dh), dh);
  const Op dhop(prec, dh.data(), p.A, M);
  if (!dxe.empty()) {
    const Op w1(prec, w.fc1_w.data(), p.E * M, D);
    blocks.product(false, false, dhop, M, C * M, w1, D, M * D, false, dxe.data(), D, C * D,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{n, D, M, r0 * M, e * M * D, r0 * D};
                   });
  }
  if (!g.fc2_w.empty()) {
    const Op hop(prec, h.data(), p.A, M);
    blocks.product(true, false, dy, D, C * D, hop, M, C * M, true, g.fc2_w.data(), M, D * M,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{D, M, n, r0 * D, r0 * M, e * D * M};
                   });
  }
  if (!g.fc1_w.empty()) {
    const Op x(prec, xe.data(), p.A, D);
    blocks.product(true, false, dhop, M, C * M, x, D, C * D, true, g.fc1_w.data(), D, M * D,
                   [&](index_t e, index_t r0, index_t n) {
                     return exec::GemmProblem{M, D, n, r0 * M, r0 * D, e * M * D};
                   });
  }
  const dim3 cols_d(exec::grid_for(D, kColThreads).x, static_cast<unsigned>(p.E)),
      cols_m(exec::grid_for(M, kColThreads).x, static_cast<unsigned>(p.E));
  if (!g.fc2_b.empty())
    exec::launch("expert_column_sums (db2)", cols_d, kColThreads, kn::expert_column_sums<T>, offsets, D, dye.data(),
                 g.fc2_b.data());
  if (!g.fc1_b.empty())
    exec::launch("expert_column_sums (db1)", cols_m, kColThreads, kn::expert_column_sums<T>, offsets, M,
                 static_cast<const T*>(dh.data()), g.fc1_b.data());
}

template <class T>
void combine_forward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, V<T> y) {
  const index_t D = y.rank() == 2 ? y.dim(1) : 0;
  LIMOE_CHECK(y.rank() == 2 && y.dim(0) == p.N, "cuda::combine_forward: y must be [N = ", p.N, ", D], got ",
              y.shape().str());
  expect_shape(ye, Shape{p.A, D}, "cuda::combine_forward: ye");
  expect_shape(gates, Shape{p.N, p.E}, "cuda::combine_forward: gates");
  expect_shape(route, Shape{p.N, p.K}, "cuda::combine_forward: route");
  exec::launch("combine_forward", exec::grid_for(p.N * D), 256, kn::combine_forward<T>,
               static_cast<const std::int64_t*>(p.slot_row.data()), route.data(), gates.data(), p.N, p.E, p.K, D,
               ye.data(), y.data());
}

template <class T>
void combine_backward(const DispatchPlan& p, CV<T> gates, CV<std::int32_t> route, CV<T> ye, CV<T> dy, V<T> dye,
                      V<T> dgate) {
  const index_t D = dy.rank() == 2 ? dy.dim(1) : 0;
  LIMOE_CHECK(dy.rank() == 2 && dy.dim(0) == p.N, "cuda::combine_backward: dy must be [N = ", p.N, ", D], got ",
              dy.shape().str());
  expect_shape(ye, Shape{p.A, D}, "cuda::combine_backward: ye");
  expect_shape(dye, Shape{p.A, D}, "cuda::combine_backward: dye");
  expect_shape(dgate, Shape{p.A}, "cuda::combine_backward: dgate");
  expect_shape(gates, Shape{p.N, p.E}, "cuda::combine_backward: gates");
  expect_shape(route, Shape{p.N, p.K}, "cuda::combine_backward: route");
  exec::launch("combine_backward", rows_grid(p.A), kRowThreads, kn::combine_backward<kRowThreads, T>,
               static_cast<const std::int64_t*>(p.row_token.data()), static_cast<const std::int64_t*>(p.row_slot.data()),
               route.data(), gates.data(), p.E, D, ye.data(), dy.data(), dye.data(), dgate.data());
}

}  // namespace limoe::cuda::ops
