// limoe/moe/layer.hpp: the sparse MoE layer, forward and backward (semantics §3, 4, 6).
//
//   logits = x W_r^T ([N, E]); per group: noise, gates = softmax(noisy), top-K, capacity, assignment;
//   then the ops of moe/ops.hpp: a dispatch plan (per-expert blocks of the accepted choices), dispatch,
//   the grouped expert MLP, combine: y[t] = sum over accepted choices of gate[t, e] * Expert_e(x[t]) (gates
//   not renormalised; dropped -> 0); and the auxiliary losses of moe/losses.hpp per group.
//
// Parameters are views into the model's storage (docs/cli.md shapes): router [E, D], fc1 [E, M, D] / [E, M],
// fc2 [E, D, M] / [E, D]. Forward fills a reusable MoeContext (buffers keep their storage between calls; no
// per-token allocation) that backward consumes. Gradient rule (docs/conventions.md): parameter gradients
// accumulate, dx is overwritten, an empty view skips that gradient.
//
// Determinism: every product runs on fixed-size row or column chunks with gemm_serial, or (the router's logits)
// as per-row dot products (gemm_nt_narrow), so results, and with them the routing, are bitwise identical on any
// thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "limoe/backend/ops.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/profile.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/balance.hpp"
#include "limoe/math/softmax.hpp"
#include "limoe/moe/config.hpp"
#include "limoe/moe/expert_parallel.hpp"
#include "limoe/moe/formulas.hpp"
#include "limoe/moe/losses.hpp"
#include "limoe/moe/ops.hpp"
#include "limoe/moe/router.hpp"
#include "limoe/moe/stats.hpp"
#include "limoe/ops/gelu.hpp"

namespace limoe::moe {

// Read-only parameters of one MoE layer, in the memory space S of the backend that runs it.
template <class T, class S = HostSpace>
struct MoeParams {
  CView<T, S> router_w;  // [E, D]
  CView<T, S> fc1_w;     // [E, M, D]
  CView<T, S> fc1_b;     // [E, M]
  CView<T, S> fc2_w;     // [E, D, M]
  CView<T, S> fc2_b;     // [E, D]
};

// Their gradients (accumulated); any empty view is skipped.
template <class T, class S = HostSpace>
struct MoeGrads {
  View<T, S> router_w, fc1_w, fc1_b, fc2_w, fc2_b;
};

// Everything forward leaves for backward, plus the call's outputs besides y: routes, losses, statistics.
// Reuse one context per layer (and per micro-batch in flight); buffers only grow.
// The routing state (logits, gates, choices, routes, losses, statistics) is host data on every backend: the
// loss policies and custom routers are host code. The rows the experts see (the dispatch plan, xe, ..., dxe)
// live in the backend's memory space S; a device backend also keeps device copies of what its ops read (gates,
// routes, the router's logit gradient) and host copies of what the router's backward reads. A device backend
// runs the stock router there (noise, gates, routing: one pass, no host round trip before the experts) and
// brings its results over for host loss terms; with the stock terms there too, only the routes, loss values
// and statistics' sums come back (the rest on request: sync_host_routing).
template <class T, class S = HostSpace>
struct MoeContext {
  // ---- outputs of the last forward ----
  AuxLossValues losses;  // averaged over groups; `total` is weighted (add it to the training loss)
  RoutingStats stats;
  // [N, K]: the expert that accepted each choice of each token, -1 where dropped (docs/cli.md img_route/txt_route).
  CView<std::int32_t> routes() const {
    LIMOE_CHECK(!results_pending, "MoeContext::routes: this forward's results are still on the device (the context ",
                "defers them): call moe::collect_results(ctx) first");
    return CView<std::int32_t>(route.data(), Shape{N, K});
  }
  // [N, E]: the gates the combine weights came from (softmax of the noisy logits in training).
  CView<T> gate_values() {
    sync_host_routing();
    return CView<T>(gates.data(), Shape{N, E});
  }
  CView<T> router_logits() {
    sync_host_routing();
    return CView<T>(logits.data(), Shape{N, E});
  }
  index_t accepted() const { return accepted_rows; }  // choices accepted by an expert

  // A device backend's forward with the stock router and loss terms leaves the routes, the loss values and the
  // statistics' sums on the device when defer_results is set: moe::collect_results(ctx) brings them over and
  // fills routes(), losses, stats and accepted(). Such a forward with a fixed-capacity plan waits for nothing,
  // so a caller with one context per layer (the model's training forward) collects every layer's results after
  // its last launch: one wait for the device instead of one per layer. Unset, the forward collects them itself.
  bool defer_results = false;
  bool results_pending = false;  // set by such a forward, cleared by collect_results

  // ---- internal state (read-only outside the layer) ----
  index_t N = 0, D = 0, M = 0;
  int E = 0, K = 0;
  index_t groups = 0, group_size = 0;
  index_t accepted_rows = 0;  // the plan's rows, less a fixed-capacity plan's empty ones
  GeluKind gelu = GeluKind::Erf;
  bool valid = false;
  Tensor<T> logits, noisy, gates, probs;          // [N, E]
  Tensor<std::int32_t> choice, route;             // [N, K]
  Tensor<index_t> order;                          // [N] routing scratch
  Tensor<index_t> fill;                           // [groups, E] routing scratch
  Tensor<index_t> capacity;                       // [groups]
  Tensor<double> aux_dlogits;                     // [N, E] weighted aux-loss gradient wrt the clean logits
  std::vector<AuxLossValues> group_losses;        // [groups]
  std::vector<std::uint8_t> default_modality;     // [N] all image, when the caller passes no modality
  std::vector<double> token_entropy;              // [N] H of each token's clean gates (the losses', the statistics')
  // Padding (kPad tokens): each group's routed tokens, packed. Group g's routed rows are
  // active_rows[row0, row0 + group_active[g]) (row0 = its first row); the pk_ buffers hold their router values
  // at the same offsets while the group is routed and its losses are taken. Unused when no token is padding.
  std::vector<index_t> group_active;              // [groups] routed tokens per group
  std::vector<index_t> active_rows;               // [N]
  std::vector<std::uint8_t> pk_modality;          // [N]
  Tensor<T> pk_logits, pk_noisy, pk_gates, pk_probs;  // [N, E]
  Tensor<std::int32_t> pk_choice, pk_route;       // [N, K]
  Tensor<double> pk_dlogits;                      // [N, E]
  BasicDispatchPlan<S> plan;                      // which accepted choice is which row of which expert block
  ExpertScratch scratch;                          // the CPU expert MLP's tiles and jobs
  Tensor<T, S> xe, hpre, h, ye;                   // [A, D], [A, M], [A, M], [A, D]
  Tensor<T, S> row_dgate;                         // [A] backward: d loss / d gate of each row
  Tensor<T, S> dye, dh, dxe;                      // [A, D], [A, M], [A, D]
  Tensor<T> dlogits;                              // [N, E]
  // A device backend (S not host memory) only: the router logits as computed, the gates, routes and logit
  // gradient its ops read, and the auxiliary losses' gradient (made there, or uploaded from the host terms).
  Tensor<T, S> logits_d, gates_d, dlogits_d;      // [N, E]
  Tensor<std::int32_t, S> route_d;                // [N, K]
  Tensor<double, S> aux_dlogits_d;                // [N, E]
  // ... and, when it routes on the device (the stock router): what the routing reads and writes there.
  Tensor<T, S> noisy_d, probs_d;                  // [N, E]
  Tensor<std::int32_t, S> choice_d;               // [N, K]
  Tensor<index_t, S> pos_d, capacity_d;           // [N] noise counter row (-1 padding), [groups]
  Tensor<std::uint8_t, S> modality_d;             // [N] (calls with padding, or with the stock loss terms)
  Tensor<index_t> pos_h;                          // [N]
  std::vector<index_t> pos_up, capacity_up;      // what pos_d and capacity_d hold (an upload only when it changes)
  std::vector<std::uint8_t> modality_up;          // ... and modality_d
  parallel::BasicRoutingScratch<S> route_scratch;
  // ... and, when the loss set is the stock terms' (kStockLossMask): each group's loss values and sums there.
  Tensor<double, S> loss_values_d, loss_sums_d;   // [groups, kValues], [groups, size(E)] (formulas::loss_layout)
  Tensor<double> loss_values, loss_sums;          // their host copies
  // A device backend's stock router: its results into the host copies above. With the stock loss terms on the
  // device too, a forward brings back only the routes (what the model reads) and leaves the logits, noisy
  // logits, gates, clean probabilities and choices there until sync_host_routing() asks for them
  // (gate_values() and router_logits() do): 4 N E values and N K choices less to copy per block.
  bool host_routing_stale = false;
  void sync_host_routing() {
    if constexpr (!std::is_same_v<S, HostSpace>) {
      if (!host_routing_stale) return;
      copy_to_host<T, S>(logits_d.cview(), logits.view());
      copy_to_host<T, S>(noisy_d.cview(), noisy.view());
      copy_to_host<T, S>(gates_d.cview(), gates.view());
      copy_to_host<T, S>(probs_d.cview(), probs.view());
      copy_to_host<std::int32_t, S>(choice_d.cview(), choice.view());
      host_routing_stale = false;
    }
  }
  void download_routes()
    requires(!std::is_same_v<S, HostSpace>)
  {
    copy_to_host<std::int32_t, S>(route_d.cview(), route.view());
    host_routing_stale = true;
  }
  void download_routing()
    requires(!std::is_same_v<S, HostSpace>)
  {
    download_routes();
    sync_host_routing();
  }
  // The gates and routes as the backend's ops see them.
  CView<T, S> gates_for_ops() const {
    if constexpr (std::is_same_v<S, HostSpace>) return gates.cview();
    else return gates_d.cview();
  }
  CView<std::int32_t, S> routes_for_ops() const {
    if constexpr (std::is_same_v<S, HostSpace>) return route.cview();
    else return route_d.cview();
  }
};

namespace detail {
// dst [n] := src, unless it holds that already (`held`: what it was last given). A device backend's upload from
// pageable host memory waits for the work queued before it; inputs that repeat from call to call go over once.
template <class U, class S>
void upload_if_changed(const U* src, index_t n, std::vector<U>& held, Tensor<U, S>& dst) {
  if (dst.rank() == 1 && dst.dim(0) == n && static_cast<index_t>(held.size()) == n && std::equal(src, src + n, held.begin()))
    return;
  held.clear();
  dst.resize(Shape{n});
  copy_from_host<U, S>(CView<U>(src, Shape{n}), dst.view());
  held.assign(src, src + n);
}

inline constexpr index_t kRowChunk = 64;   // fixed chunk of rows/columns for every product (determinism)

// C[rows, cols] (+)= A B^T style products over fixed row chunks of C; deterministic on any thread count.
template <class T>
void gemm_rows(Trans ta, Trans tb, index_t M, index_t N, index_t K, const T* A, index_t lda, const T* B, index_t ldb,
               T beta, T* C, index_t ldc) {
  const index_t chunks = (M + kRowChunk - 1) / kRowChunk;
  parallel_for(0, chunks, 1, [&](index_t c0, index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      const index_t r0 = c * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
      const T* a = ta == Trans::N ? A + r0 * lda : A + r0;
      gemm_serial<T>(ta, tb, r1 - r0, N, K, T(1), a, lda, B, ldb, beta, C + r0 * ldc, ldc);
    }
  });
}
// The same over fixed column chunks of C (for reductions over a long K, e.g. weight gradients).
template <class T>
void gemm_cols(Trans ta, Trans tb, index_t M, index_t N, index_t K, const T* A, index_t lda, const T* B, index_t ldb,
               T beta, T* C, index_t ldc) {
  const index_t chunks = (N + kRowChunk - 1) / kRowChunk;
  parallel_for(0, chunks, 1, [&](index_t c0, index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      const index_t j0 = c * kRowChunk, j1 = std::min(N, j0 + kRowChunk);
      const T* b = tb == Trans::N ? B + j0 : B + j0 * ldb;
      gemm_serial<T>(ta, tb, M, j1 - j0, K, T(1), A, lda, b, ldb, beta, C + j0, ldc);
    }
  });
}

template <class T, class S>
ExpertWeights<T, S> experts_of(const MoeParams<T, S>& p) {
  return {p.fc1_w, p.fc1_b, p.fc2_w, p.fc2_b};
}

// The router sees all E experts; the expert weights are this rank's Ex of them (Ex = E without expert
// parallelism).
template <class T, class S>
void check_params(const MoeParams<T, S>& p, int E, index_t D, int Ex) {
  LIMOE_CHECK(p.fc1_w.rank() == 3, "moe: fc1.weight must be [E, M, D], got ", p.fc1_w.shape().str());
  const index_t M = p.fc1_w.dim(1);
  expect_shape(p.router_w, Shape{E, D}, "moe: router.weight");
  expect_shape(p.fc1_w, Shape{Ex, M, D}, "moe: fc1.weight");
  expect_shape(p.fc1_b, Shape{Ex, M}, "moe: fc1.bias");
  expect_shape(p.fc2_w, Shape{Ex, D, M}, "moe: fc2.weight");
  expect_shape(p.fc2_b, Shape{Ex, D}, "moe: fc2.bias");
}
template <class T, class S>
int local_experts(int E, const ExpertExchange<T, S>* ex) {
  if (ex == nullptr || ex->shards() == 1) return E;
  LIMOE_CHECK(E % ex->shards() == 0, "moe: ", E, " experts do not split over ", ex->shards(), " expert-parallel ranks");
  return E / ex->shards();
}

// The groups' loss values summed in group order (each already carries 1/G: their mean; deterministic).
template <class T, class S>
void sum_group_losses(MoeContext<T, S>& c) {
  c.losses = AuxLossValues{};
  for (const auto& v : c.group_losses) {
    c.losses.total += v.total, c.losses.importance += v.importance, c.losses.load += v.load, c.losses.z += v.z;
    for (int m = 0; m < kModalities; ++m)
      c.losses.local_entropy[m] += v.local_entropy[m], c.losses.global_entropy[m] += v.global_entropy[m];
  }
}
// The statistics zeroed for the call's shape; returns the per-modality gate sums to fill.
template <class T, class S>
std::array<std::vector<double>, kModalities> reset_stats(MoeContext<T, S>& c) {
  auto& st = c.stats;
  const int E = c.E;
  st.experts = E, st.top_k = c.K, st.groups = c.groups, st.capacity = c.groups > 0 ? c.capacity[0] : 0;
  st.padding = 0;
  st.image_share.assign(static_cast<std::size_t>(E), 0.0);
  std::array<std::vector<double>, kModalities> pbar;
  for (int m = 0; m < kModalities; ++m) {
    st.routed[m].assign(static_cast<std::size_t>(E), 0);
    st.dropped[m].assign(static_cast<std::size_t>(E), 0);
    st.tokens[m] = 0, st.tokens_fully_dropped[m] = 0, st.local_entropy[m] = 0, st.global_entropy[m] = 0;
    pbar[m].assign(static_cast<std::size_t>(E), 0.0);
  }
  return pbar;
}
// From the counts and sums: drop fractions, means, the global entropy, each expert's image share.
template <class T, class S>
void finish_stats(MoeContext<T, S>& c, std::array<std::vector<double>, kModalities> pbar) {
  auto& st = c.stats;
  const int E = c.E;
  for (int m = 0; m < kModalities; ++m) {
    index_t dropped = 0;
    for (int e = 0; e < E; ++e) dropped += st.dropped[m][e];
    if (st.tokens[m] == 0) { st.drop_fraction[m] = 0; continue; }
    const double n = static_cast<double>(st.tokens[m]);
    st.drop_fraction[m] = static_cast<double>(dropped) / (n * c.K);
    st.local_entropy[m] /= n;
    for (int e = 0; e < E; ++e) pbar[m][e] /= n;
    st.global_entropy[m] = math::entropy(pbar[m].data(), E);
  }
  st.mean_gate = std::move(pbar);
  c.accepted_rows = 0;
  for (int e = 0; e < E; ++e) {
    const index_t all = st.routed[0][e] + st.routed[1][e];
    st.image_share[e] = all > 0 ? static_cast<double>(st.routed[0][e]) / static_cast<double>(all) : 0.0;
    c.accepted_rows += all;
  }
}
}  // namespace detail

// The results a device forward left there (MoeContext::defer_results): the routes, each group's loss values and
// the statistics' sums (formulas::loss_layout) come over, in three copies, and fill routes(), losses, stats and
// accepted(). Nothing to do after any other forward.
template <class T, class S>
void collect_results(MoeContext<T, S>& c) {
  if constexpr (!std::is_same_v<S, HostSpace>) {
    if (!c.results_pending) return;
    profile::Region<S> region("moe_collect_results");
    namespace lo = formulas::loss_layout;
    const index_t G = c.groups;
    const int E = c.E;
    c.download_routes();  // the rest of the routing stays there until asked for (sync_host_routing)
    c.loss_values.resize(c.loss_values_d.shape()), c.loss_sums.resize(c.loss_sums_d.shape());
    copy_to_host<double, S>(c.loss_values_d.cview(), c.loss_values.view());
    copy_to_host<double, S>(c.loss_sums_d.cview(), c.loss_sums.view());
    c.results_pending = false;
    for (index_t g = 0; g < G; ++g) {
      const double* v = c.loss_values.data() + g * lo::kValues;
      auto& gl = c.group_losses[static_cast<std::size_t>(g)];
      gl.total = v[lo::kTotal], gl.importance = v[lo::kImportance], gl.load = v[lo::kLoad], gl.z = v[lo::kZ];
      for (int m = 0; m < kModalities; ++m) gl.local_entropy[m] = v[lo::kLocal + m], gl.global_entropy[m] = v[lo::kGlobal + m];
    }
    detail::sum_group_losses(c);
    // 7. Routing statistics (semantics §6) from each group's sums, in group order.
    auto& st = c.stats;
    auto pbar = detail::reset_stats(c);
    auto count = [](double v) { return static_cast<index_t>(std::llround(v)); };
    for (index_t g = 0; g < G; ++g) {
      const double* q = c.loss_sums.data() + g * lo::size(E);
      for (int m = 0; m < kModalities; ++m) {
        st.tokens[m] += count(q[lo::tokens(E, m)]);
        st.local_entropy[m] += q[lo::entropy(E, m)];
        st.tokens_fully_dropped[m] += count(q[lo::fully_dropped(E, m)]);
        for (int e = 0; e < E; ++e) {
          pbar[m][e] += q[lo::gates_of(E, m, e)];
          st.routed[m][e] += count(q[lo::routed(E, m, e)]);
          st.dropped[m][e] += count(q[lo::dropped(E, m, e)]);
        }
      }
    }
    st.padding = c.N - st.tokens[0] - st.tokens[1];
    detail::finish_stats(c, std::move(pbar));
  } else {
    (void)c;
  }
}

// Forward with an explicit router policy and loss set.
//   x [N, D] tokens in the fixed order (all image tokens, then all text tokens; semantics §3);
//   modality [N] (kImage, kText, or kPad for padding; an empty span means all image); y [N, D] overwritten.
//   Padding is masked out of the layer: a group's capacity counts its routed (non-padding) tokens only, the
//   router and the auxiliary losses see those tokens packed in order (a router or loss term needs no notion of
//   padding), and the statistics skip padding. A padding token's route is -1, its gates the clean softmax, its
//   output 0, and no gradient reaches the router from it.
// Outputs besides y land in ctx: ctx.routes() [N, K], ctx.losses, ctx.stats (after collect_results(ctx) when
// the context defers them: MoeContext::defer_results).
//   BackendT is the backend whose ops run the dispatch plan, gather, expert MLP and combine (backend/ops.hpp).
//   `ex` (expert parallel, moe/expert_parallel.hpp): the experts are sharded over its ranks, p holds this rank's;
//   the call is then collective over them.
//   `prec` (core/precision.hpp): the policy of the expert products; the router's logits stay fp32.
template <class T, class Losses = DefaultAuxLosses, Backend BackendT = Cpu, class Router, PrecisionPolicy Prec = Fp32>
  requires RouterPolicy<Router, T>
void moe_forward(const Router& router, const MoeConfig& cfg, const MoeParams<T, SpaceOf<BackendT>>& p,
                 CView<T, SpaceOf<BackendT>> x, std::span<const std::uint8_t> modality, Mode mode, const Rng& rng,
                 View<T, SpaceOf<BackendT>> y, MoeContext<T, SpaceOf<BackendT>>& ctx, ExpertExchange<T, SpaceOf<BackendT>>* ex = nullptr,
                 const Prec& prec = {}) {
  using O = Ops<BackendT, T>;
  using S = SpaceOf<BackendT>;
  constexpr bool host_memory = std::is_same_v<S, HostSpace>;
  cfg.validate();
  const int E = cfg.experts;
  const int K = router.top_k();
  LIMOE_CHECK(K == cfg.top_k, "moe_forward: the router's top_k() = ", K, " differs from the config's top_k = ",
              cfg.top_k);
  LIMOE_CHECK(E <= detail::kMaxStackExperts, "moe_forward: at most ", detail::kMaxStackExperts,
              " experts are supported, got ", E);
  LIMOE_CHECK(x.rank() == 2, "moe_forward: x must be [N, D], got ", x.shape().str());
  const index_t N = x.dim(0), D = x.dim(1);
  const bool sharded = ex != nullptr && ex->shards() > 1;
  detail::check_params(p, E, D, detail::local_experts(E, ex));
  const index_t M = p.fc1_w.dim(1);
  expect_shape(y, Shape{N, D}, "moe_forward: y");
  LIMOE_CHECK(modality.empty() || static_cast<index_t>(modality.size()) == N, "moe_forward: modality has ",
              modality.size(), " entries for N = ", N, " tokens (pass one per token, or none for all image)");
  bool padded = false;
  for (const std::uint8_t m : modality) {
    LIMOE_CHECK(m <= kPad, "moe_forward: modality value ", int{m}, " is none of kImage (0), kText (1), kPad (2)");
    padded |= m == kPad;
  }

  profile::Region<S> whole("moe_forward");  // core/profile.hpp; its parts below and the ops inside
  auto& c = ctx;
  c.valid = false;
  c.host_routing_stale = false;
  c.results_pending = false;
  c.N = N, c.D = D, c.M = M, c.E = E, c.K = K;
  c.gelu = cfg.gelu;
  const bool training = mode == Mode::Train;
  const index_t gs = cfg.router.group_size > 0 ? std::min(cfg.router.group_size, std::max<index_t>(N, 1)) : N;
  const index_t G = N == 0 ? 0 : (N + gs - 1) / gs;
  c.groups = G, c.group_size = gs;

  c.logits.resize(Shape{N, E});   // [N, E]
  c.noisy.resize(Shape{N, E});    // [N, E]
  c.gates.resize(Shape{N, E});    // [N, E]
  c.probs.resize(Shape{N, E});    // [N, E]
  c.choice.resize(Shape{N, K});   // [N, K]
  c.route.resize(Shape{N, K});    // [N, K]
  c.order.resize(Shape{N});       // [N]
  c.fill.resize(Shape{G, E});     // [G, E]
  c.capacity.resize(Shape{G});    // [G]
  c.aux_dlogits.resize(Shape{N, E});  // [N, E]
  c.group_losses.assign(static_cast<std::size_t>(G), AuxLossValues{});
  if (modality.empty() && N > 0) {  // none given: all image
    c.default_modality.assign(static_cast<std::size_t>(N), kImage);
    modality = c.default_modality;
  }

  profile::Region<S> route_region("route");
  // 1. Router logits (semantics §3 step 1) and clean gates G = softmax(logits) for the losses. A device
  // backend computes the logits there (fp32); it routes there too with the stock router, and on the host over
  // a copy with any other (host code).
  constexpr bool device_routing = !host_memory && IsStockRouter<Router>::value;
  constexpr bool device_losses = device_routing && kStockLossMask<Losses> >= 0;
  if constexpr (host_memory) {
    // A narrow product (E columns): gemm_nt_narrow's per-row dot products, whose bits do not depend on the split.
    parallel_for(0, N, detail::kRowChunk, [&](index_t t0, index_t t1) {
      gemm_nt_narrow<T>(t1 - t0, E, D, x.data() + t0 * D, D, p.router_w.data(), D, c.logits.data() + t0 * E, E);
    });
  } else {
    c.logits_d.resize(Shape{N, E});  // [N, E]
    O::linear_forward(x, p.router_w, CView<T, S>{}, c.logits_d.view());
    if constexpr (!device_routing) copy_to_host<T, S>(c.logits_d.cview(), c.logits.view());
  }
  if constexpr (!device_routing)  // as the router takes its gates: detail::softmax_rows_pool
    detail::softmax_rows_pool(c.logits.data(), c.probs.data(), N, E);

  // Padding: each group's routed tokens, in order (a group without padding is routed in place).
  c.group_active.assign(static_cast<std::size_t>(G), 0);
  if (padded && !device_losses) {
    c.active_rows.resize(static_cast<std::size_t>(N));
    c.pk_modality.resize(static_cast<std::size_t>(N));
    c.pk_logits.resize(Shape{N, E}), c.pk_noisy.resize(Shape{N, E}), c.pk_gates.resize(Shape{N, E});  // [N, E]
    c.pk_probs.resize(Shape{N, E}), c.pk_dlogits.resize(Shape{N, E});                                  // [N, E]
    c.pk_choice.resize(Shape{N, K}), c.pk_route.resize(Shape{N, K});                                   // [N, K]
  }
  for (index_t g = 0; g < G; ++g) {
    const index_t row0 = g * gs, S = std::min(gs, N - row0);
    index_t n = S;
    if (padded) {
      n = 0;
      for (index_t s = row0; s < row0 + S; ++s)
        if (modality[static_cast<std::size_t>(s)] != kPad) {
          if constexpr (!device_losses) c.active_rows[static_cast<std::size_t>(row0 + n)] = s;
          ++n;
        }
    }
    c.group_active[static_cast<std::size_t>(g)] = n;
    c.capacity[g] = compute_capacity(n, E, K, cfg.router.capacity_factor(training), cfg.router.capacity_multiple_of);
  }

  // The load loss needs the router's noise scale: the router policy owns it (router_noise_sigma), not the
  // config, so a custom noise policy gets a consistent load loss and a noiseless router none.
  const double sigma = router_noise_sigma(router, E, mode);
  const bool noise_active = sigma > 0;

  // 2. Route every group (steps 2-6), then check the router kept its contract. On a device backend the stock
  // router runs there: each routed token's noise counter row (its packed place, as the host router draws it),
  // the capacities and the modality go over; the stock loss terms and the statistics' sums are taken there too,
  // and everything comes back after the experts (any other loss set: here, for the host terms).
  if constexpr (device_routing) {
    c.pos_h.resize(Shape{N});  // [N]
    for (index_t g = 0; g < G; ++g) {  // a routed token's place in its group's packed order; -1 for padding
      const index_t row0 = g * gs, S = std::min(gs, N - row0);
      index_t j = 0;
      for (index_t s = row0; s < row0 + S; ++s)
        c.pos_h[s] = padded && modality[static_cast<std::size_t>(s)] == kPad ? -1 : cfg.first_token + row0 + j++;
    }
    c.noisy_d.resize(Shape{N, E}), c.gates_d.resize(Shape{N, E}), c.probs_d.resize(Shape{N, E});  // [N, E]
    c.choice_d.resize(Shape{N, K}), c.route_d.resize(Shape{N, K});               // [N, K]
    // The same for every layer of a model's forward and every step of a run: uploaded when they change.
    detail::upload_if_changed(c.pos_h.data(), N, c.pos_up, c.pos_d);             // [N]
    detail::upload_if_changed(c.capacity.data(), G, c.capacity_up, c.capacity_d);  // [G]
    CView<std::uint8_t, S> mod_d;
    if (padded || device_losses) {  // the stock losses read it on the device
      detail::upload_if_changed(modality.data(), N, c.modality_up, c.modality_d);  // [N]
      mod_d = c.modality_d.cview();
    }
    O::route_topk(c.logits_d.cview(), c.pos_d.cview(), rng, sigma, K, gs, c.capacity_d.cview(),
                  IsStockRouter<Router>::bpr, padded ? mod_d : CView<std::uint8_t, S>{}, c.noisy_d.view(),
                  c.gates_d.view(), c.probs_d.view(), c.choice_d.view(), c.route_d.view(), c.route_scratch);
    if constexpr (device_losses) {  // 3. on the device; the results come back with the routing's, after the experts
      c.aux_dlogits_d.resize(Shape{N, E}), c.loss_values_d.resize(Shape{G, formulas::loss_layout::kValues});
      c.loss_sums_d.resize(Shape{G, formulas::loss_layout::size(E)});
      O::aux_losses(c.logits_d.cview(), c.noisy_d.cview(), c.probs_d.cview(), c.choice_d.cview(), c.route_d.cview(),
                    mod_d, gs, kStockLossMask<Losses>, cfg.losses, sigma, c.aux_dlogits_d.view(),
                    c.loss_values_d.view(), c.loss_sums_d.view());
    } else {
      c.download_routing();
    }
    // What the host's loss terms read of a group with padding, packed as the host router would have left it.
    for (index_t g = 0; padded && !device_losses && g < G; ++g) {
      const index_t row0 = g * gs, S = std::min(gs, N - row0), n = c.group_active[static_cast<std::size_t>(g)];
      if (n == S) continue;  // no padding in this group: the terms read it in place
      for (index_t j = 0; j < n; ++j) {
        const index_t s = c.active_rows[static_cast<std::size_t>(row0 + j)], q = row0 + j;
        std::copy_n(c.logits.data() + s * E, E, c.pk_logits.data() + q * E);
        std::copy_n(c.noisy.data() + s * E, E, c.pk_noisy.data() + q * E);
        std::copy_n(c.probs.data() + s * E, E, c.pk_probs.data() + q * E);
        std::copy_n(c.choice.data() + s * K, K, c.pk_choice.data() + q * K);
        c.pk_modality[static_cast<std::size_t>(q)] = modality[static_cast<std::size_t>(s)];
      }
    }
  } else parallel_for(0, G, 1, [&](index_t g0, index_t g1) {
    for (index_t g = g0; g < g1; ++g) {
      const index_t row0 = g * gs, S = std::min(gs, N - row0), n = c.group_active[static_cast<std::size_t>(g)];
      const bool packed = n < S;  // the group holds padding: route its other tokens, packed
      const index_t* rows = packed ? c.active_rows.data() + row0 : nullptr;
      for (index_t j = 0; packed && j < n; ++j) {  // what the router and the loss terms read, packed once
        const index_t s = rows[j], p = row0 + j;
        std::copy_n(c.logits.data() + s * E, E, c.pk_logits.data() + p * E);
        std::copy_n(c.probs.data() + s * E, E, c.pk_probs.data() + p * E);
        c.pk_modality[static_cast<std::size_t>(p)] = modality[static_cast<std::size_t>(s)];
      }
      RouteGroup<T> rg;
      rg.row0 = cfg.first_token + row0, rg.S = n, rg.E = E, rg.K = K, rg.capacity = c.capacity[g], rg.mode = mode, rg.rng = &rng;
      rg.logits = (packed ? c.pk_logits : c.logits).data() + row0 * E;
      rg.noisy = (packed ? c.pk_noisy : c.noisy).data() + row0 * E;
      rg.gates = (packed ? c.pk_gates : c.gates).data() + row0 * E;
      rg.choice = (packed ? c.pk_choice : c.choice).data() + row0 * K;
      rg.route = (packed ? c.pk_route : c.route).data() + row0 * K;
      rg.order = c.order.data() + row0;
      rg.fill = c.fill.data() + g * E;
      if (n > 0) router.route(rg);
      index_t* count = c.fill.data() + g * E;
      std::fill(count, count + E, index_t{0});
      for (index_t s = 0; s < n * K; ++s) {
        const std::int32_t ch = rg.choice[s], r = rg.route[s];
        LIMOE_CHECK(ch >= 0 && ch < E, "moe router: choice ", ch, " out of range [0, ", E, ")");
        LIMOE_CHECK(r == -1 || r == ch, "moe router: route must be the choice or -1, got ", r, " for choice ", ch);
        if (r >= 0) LIMOE_CHECK(++count[r] <= rg.capacity, "moe router: expert ", r, " exceeds capacity ", rg.capacity);
      }
      if (!packed) continue;
      // Unpack; a padding token keeps its clean values, its best choices for reference, and no route.
      for (index_t s = row0; s < row0 + S; ++s) {
        std::copy_n(c.logits.data() + s * E, E, c.noisy.data() + s * E);
        std::copy_n(c.probs.data() + s * E, E, c.gates.data() + s * E);
        detail::select_top_k<0>(c.probs.data() + s * E, E, K, c.choice.data() + s * K);
        std::fill_n(c.route.data() + s * K, K, std::int32_t{-1});
      }
      for (index_t j = 0; j < n; ++j) {
        const index_t s = rows[j], p = row0 + j;
        std::copy_n(c.pk_noisy.data() + p * E, E, c.noisy.data() + s * E);
        std::copy_n(c.pk_gates.data() + p * E, E, c.gates.data() + s * E);
        std::copy_n(c.pk_choice.data() + p * K, K, c.choice.data() + s * K);
        std::copy_n(c.pk_route.data() + p * K, K, c.route.data() + s * K);
      }
    }
  });

  route_region.stop();

  // 3. Auxiliary losses per group, averaged over groups (semantics §4); on the device above with the stock terms.
  if constexpr (!device_losses) {
    profile::Region<S> losses_region("losses");
    // Each token's entropy H(G), once: the loss terms read it (LossGroup::entropy) and so do the statistics.
    c.token_entropy.resize(static_cast<std::size_t>(N));
    parallel_for_each_index(0, N, detail::kRowGrain, [&](index_t t) {
      c.token_entropy[static_cast<std::size_t>(t)] = detail::token_entropy(c.probs.data() + t * E, E);
    });
    std::fill(c.aux_dlogits.data(), c.aux_dlogits.data() + N * E, 0.0);
    parallel_for(0, G, 1, [&](index_t g0, index_t g1) {
      for (index_t g = g0; g < g1; ++g) {
        const index_t row0 = g * gs, S = std::min(gs, N - row0), n = c.group_active[static_cast<std::size_t>(g)];
        if (n == 0) continue;  // a group of padding only: no loss
        const bool packed = n < S;  // the terms see the routed tokens as routing packed them
        const index_t* rows = packed ? c.active_rows.data() + row0 : nullptr;
        LossGroup<T> lg;
        lg.S = n, lg.E = E, lg.K = K;
        lg.logits = (packed ? c.pk_logits : c.logits).data() + row0 * E;
        lg.noisy = (packed ? c.pk_noisy : c.noisy).data() + row0 * E;
        lg.probs = (packed ? c.pk_probs : c.probs).data() + row0 * E;
        lg.choice = (packed ? c.pk_choice : c.choice).data() + row0 * K;
        lg.modality = (packed ? c.pk_modality.data() : modality.data()) + row0;
        lg.entropy = packed ? nullptr : c.token_entropy.data() + row0;  // a packed group's terms take their own
        lg.noise_active = noise_active;
        lg.sigma = sigma;
        lg.scale = 1.0 / static_cast<double>(G);
        double* dl = (packed ? c.pk_dlogits.data() : c.aux_dlogits.data()) + row0 * E;
        if (packed) std::fill_n(dl, n * E, 0.0);
        Losses::template accumulate<T>(lg, cfg.losses, c.group_losses[static_cast<std::size_t>(g)], dl);
        for (index_t j = 0; packed && j < n; ++j) std::copy_n(dl + j * E, E, c.aux_dlogits.data() + rows[j] * E);
      }
    });
    if constexpr (!host_memory) {  // what the device's router backward reads
      c.aux_dlogits_d.resize(Shape{N, E});
      copy_from_host<double, S>(c.aux_dlogits.cview(), c.aux_dlogits_d.view());
    }
  }

  // 4-6. Dispatch plan, gather, the grouped expert MLP, combine (moe/ops.hpp).
  if constexpr (!host_memory && !device_routing) {  // what the device ops read of the routing
    c.gates_d.resize(Shape{N, E}), c.route_d.resize(Shape{N, K});
    copy_from_host<T, S>(c.gates.cview(), c.gates_d.view());
    copy_from_host<std::int32_t, S>(c.route.cview(), c.route_d.view());
  }
  // On a device with the stock router and a capacity that binds, the fixed-capacity plan (every expert C = the
  // sum of the groups' capacities rows; no read-back of the counts) when its empty rows are at most a quarter of
  // the routed choices; otherwise the packed plan, whose sizes come back from the device.
  bool planned = false;
  if constexpr (device_routing && requires(CView<std::int32_t, S> r, BasicDispatchPlan<S>& pl) {
                  O::make_fixed_dispatch_plan(r, 1, index_t{1}, pl);
                }) {
    index_t rows = 0, routed = 0;
    for (index_t g = 0; g < G; ++g) rows += c.capacity[g], routed += c.group_active[static_cast<std::size_t>(g)];
    if (!sharded && cfg.router.capacity_factor(training) > 0 && rows > 0 && 4 * E * rows <= 5 * K * routed) {
      O::make_fixed_dispatch_plan(c.routes_for_ops(), E, rows, c.plan);
      planned = true;
    }
  }
  if (!planned) O::make_dispatch_plan(c.routes_for_ops(), E, c.plan);
  const index_t A = c.plan.A;
  c.xe.resize(Shape{A, D});    // [A, D]
  c.ye.resize(Shape{A, D});    // [A, D]
  O::dispatch_forward(c.plan, x, c.xe.view());
  if (sharded) {
    expert_parallel_forward<T, BackendT>(*ex, c.plan, detail::experts_of(p), c.gelu, c.xe.cview(), c.ye.view(), prec);
  } else {
    c.hpre.resize(Shape{A, M});  // [A, M]
    c.h.resize(Shape{A, M});     // [A, M]
    O::expert_mlp_forward(c.plan, detail::experts_of(p), c.gelu, c.xe.cview(), c.hpre.view(), c.h.view(),
                          c.ye.view(), c.scratch, prec);
  }
  O::combine_forward(c.plan, c.gates_for_ops(), c.routes_for_ops(), c.ye.cview(), y);

  // The device's routing and loss results, once the experts are under way (or later: collect_results).
  c.valid = true;
  if constexpr (device_losses) {
    c.results_pending = true;
    if (!c.defer_results) collect_results(c);
    return;
  }
  detail::sum_group_losses(c);

  // 7. Routing statistics (semantics §6), from the host's routing results.
  profile::Region<S> stats_region("statistics");
  auto& st = c.stats;
  auto pbar = detail::reset_stats(c);
  // In token order: the same bits on any thread count. The entropies were taken before the losses.
  for (index_t t = 0; t < N; ++t) {
    if (modality[static_cast<std::size_t>(t)] == kPad) {
      ++st.padding;
      continue;
    }
    const int m = modality[static_cast<std::size_t>(t)] == kText ? 1 : 0;
    ++st.tokens[m];
    bool any = false;
    for (int k = 0; k < K; ++k) {
      const std::int32_t r = c.route[t * K + k];
      if (r >= 0) ++st.routed[m][r], any = true;
      else ++st.dropped[m][c.choice[t * K + k]];
    }
    if (!any) ++st.tokens_fully_dropped[m];
    for (int e = 0; e < E; ++e) pbar[m][e] += static_cast<double>(c.probs[t * E + e]);
    st.local_entropy[m] += c.token_entropy[static_cast<std::size_t>(t)];
  }
  detail::finish_stats(c, std::move(pbar));
}

// Forward with the stock router that cfg.router describes (top-K 1 and 2 compiled, others at run time; BPR or
// vanilla) and the given loss set (default: all five terms; set a weight to 0 to drop a term's gradient).
template <class T, class Losses = DefaultAuxLosses, Backend BackendT = Cpu, PrecisionPolicy Prec = Fp32>
void moe_forward(const MoeConfig& cfg, const MoeParams<T, SpaceOf<BackendT>>& p, CView<T, SpaceOf<BackendT>> x,
                 std::span<const std::uint8_t> modality, Mode mode, const Rng& rng, View<T, SpaceOf<BackendT>> y,
                 MoeContext<T, SpaceOf<BackendT>>& ctx, ExpertExchange<T, SpaceOf<BackendT>>* ex = nullptr, const Prec& prec = {}) {
  cfg.validate();
  visit_router(cfg.router, cfg.top_k, [&](const auto& router) {
    moe_forward<T, Losses, BackendT>(router, cfg, p, x, modality, mode, rng, y, ctx, ex, prec);
  });
}

// Backward of the last forward on ctx.
//   dy [N, D]: upstream gradient of y. dx [N, D] overwritten (empty: skipped). Parameter gradients accumulate.
//   The aux losses' gradients (already weighted and averaged over groups) are added to the router's, times
//   aux_scale (1 when the aux losses enter the training loss with coefficient 1). `ex`: as in forward.
template <class T, Backend BackendT = Cpu, PrecisionPolicy Prec = Fp32>
void moe_backward(const MoeParams<T, SpaceOf<BackendT>>& p, CView<T, SpaceOf<BackendT>> x,
                  CView<T, SpaceOf<BackendT>> dy, View<T, SpaceOf<BackendT>> dx,
                  const MoeGrads<T, SpaceOf<BackendT>>& grads, MoeContext<T, SpaceOf<BackendT>>& ctx,
                  double aux_scale = 1.0, ExpertExchange<T, SpaceOf<BackendT>>* ex = nullptr, const Prec& prec = {}) {
  using S = SpaceOf<BackendT>;
  constexpr bool host_memory = std::is_same_v<S, HostSpace>;
  profile::Region<S> whole("moe_backward");
  auto& c = ctx;
  LIMOE_CHECK(c.valid, "moe_backward: run moe_forward on this context first");
  const index_t N = c.N, D = c.D, M = c.M, A = c.plan.A;
  const int E = c.E, K = c.K;
  expect_shape(x, Shape{N, D}, "moe_backward: x");
  expect_shape(dy, Shape{N, D}, "moe_backward: dy");
  if (!dx.empty()) expect_shape(dx, Shape{N, D}, "moe_backward: dx");
  const bool sharded = ex != nullptr && ex->shards() > 1;
  const int Ex = detail::local_experts(E, ex);
  detail::check_params(p, E, D, Ex);
  LIMOE_CHECK(p.fc1_w.dim(1) == M, "moe_backward: parameters changed shape since forward (M ", M, " -> ",
              p.fc1_w.dim(1), ")");
  if (!grads.router_w.empty()) expect_shape(grads.router_w, Shape{E, D}, "moe_backward: grad router.weight");
  if (!grads.fc1_w.empty()) expect_shape(grads.fc1_w, Shape{Ex, M, D}, "moe_backward: grad fc1.weight");
  if (!grads.fc1_b.empty()) expect_shape(grads.fc1_b, Shape{Ex, M}, "moe_backward: grad fc1.bias");
  if (!grads.fc2_w.empty()) expect_shape(grads.fc2_w, Shape{Ex, D, M}, "moe_backward: grad fc2.weight");
  if (!grads.fc2_b.empty()) expect_shape(grads.fc2_b, Shape{Ex, D}, "moe_backward: grad fc2.bias");
  const bool need_dx = !dx.empty();

  using O = Ops<BackendT, T>;
  // 1. Combine backward: d gate = <dy[t], ye[r]>, d ye[r] = gate * dy[t].
  c.row_dgate.resize(Shape{A});  // [A]
  c.dye.resize(Shape{A, D});     // [A, D]
  O::combine_backward(c.plan, c.gates_for_ops(), c.routes_for_ops(), c.ye.cview(), dy, c.dye.view(), c.row_dgate.view());

  // 2. Router: through softmax(noisy) of the combine weights (the noise is a constant), plus the aux losses
  // (moe/formulas.hpp's router_logit_grad per token; a device backend runs it there).
  if constexpr (host_memory) {
    c.dlogits.resize(Shape{N, E});  // [N, E]
    const index_t* slot_row = c.plan.slot_row.data();
    parallel_for(0, N, 256, [&](index_t t0, index_t t1) {
      for (index_t t = t0; t < t1; ++t)
        formulas::router_logit_grad(c.gates.data() + t * E, c.route.data() + t * K, slot_row + t * K,
                                    c.row_dgate.data(), E, K, aux_scale, c.aux_dlogits.data() + t * E,
                                    c.dlogits.data() + t * E);
    });
  } else {
    c.dlogits_d.resize(Shape{N, E});  // [N, E]
    O::router_backward(c.plan, c.gates_for_ops(), c.routes_for_ops(), c.row_dgate.cview(), c.aux_dlogits_d.cview(),
                       aux_scale, c.dlogits_d.view());
  }

  // 3-4. The expert MLPs: dxe, and the expert weight gradients (accumulated).
  if (need_dx) c.dxe.resize(Shape{A, D});  // [A, D]
  const ExpertGrads<T, S> eg{grads.fc1_w, grads.fc1_b, grads.fc2_w, grads.fc2_b};
  if (sharded) {
    expert_parallel_backward<T, BackendT>(*ex, c.plan, detail::experts_of(p), c.gelu, c.dye.cview(),
                                          need_dx ? c.dxe.view() : View<T, S>{}, eg, prec);
  } else {
    c.dh.resize(Shape{A, M});  // [A, M]
    O::expert_mlp_backward(c.plan, detail::experts_of(p), c.gelu, c.xe.cview(), c.hpre.cview(), c.h.cview(),
                           c.dye.cview(), c.dh.view(), need_dx ? c.dxe.view() : View<T, S>{}, eg, c.scratch, prec);
  }

  // 5. Router weight and input: dW_r += dlogits^T x; dx = dlogits W_r + sum_k dxe[row(t, k)].
  if constexpr (host_memory) {
    if (!grads.router_w.empty() && N > 0)
      detail::gemm_cols<T>(Trans::T, Trans::N, E, D, N, c.dlogits.data(), E, x.data(), D, T(1),
                           grads.router_w.data(), D);
    if (need_dx && N > 0)
      detail::gemm_rows<T>(Trans::N, Trans::N, N, D, E, c.dlogits.data(), E, p.router_w.data(), D, T(0), dx.data(),
                           D);
  } else {  // the same products on the device (fp32)
    O::linear_backward(x, p.router_w, c.dlogits_d.cview(), need_dx ? dx : View<T, S>{}, grads.router_w, View<T, S>{});
  }
  if (need_dx) O::dispatch_backward(c.plan, c.dxe.cview(), dx);
}

}  // namespace limoe::moe
