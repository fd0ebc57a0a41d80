// MoE routing: capacity (semantics §3 step 5), assignment order and BPR (step 6), the section 8 examples,
// properties over random inputs, thread-count invariance, a user-written router.
#include <doctest/doctest.h>

#include <limits>
#include <map>
#include <set>

#include "test_moe_common.hpp"

using namespace moe_test;

namespace {
// Runs a stock router on one group given its gates (logits = log gates, so softmax gives the gates back).
struct Routed {
  std::vector<std::int32_t> choice, route;
};
template <class Router>
Routed route_gates(const Router& router, const std::vector<std::vector<double>>& gates, index_t C) {
  const index_t S = static_cast<index_t>(gates.size());
  const int E = static_cast<int>(gates[0].size()), K = router.top_k();
  std::vector<double> logits, noisy(S * E), g(S * E);
  for (const auto& row : gates)
    for (double v : row) logits.push_back(std::log(v));
  Routed out;
  out.choice.resize(S * K), out.route.resize(S * K);
  std::vector<index_t> order(S), fill(E);
  RouteGroup<double> rg;
  rg.S = S, rg.E = E, rg.K = K, rg.capacity = C, rg.mode = Mode::Eval;
  rg.logits = logits.data(), rg.noisy = noisy.data(), rg.gates = g.data();
  rg.choice = out.choice.data(), rg.route = out.route.data(), rg.order = order.data(), rg.fill = fill.data();
  router.route(rg);
  return out;
}
using BprK1 = TopKRouter<StaticTopK<1>, NoNoise, BatchPriorityOrder>;
using VanK1 = TopKRouter<StaticTopK<1>, NoNoise, VanillaOrder>;
using BprK2 = TopKRouter<StaticTopK<2>, NoNoise, BatchPriorityOrder>;
using BprDyn = TopKRouter<DynamicTopK, NoNoise, BatchPriorityOrder>;
using VanDyn = TopKRouter<DynamicTopK, NoNoise, VanillaOrder>;

// The spec's assignment restated naively: choices by gate (ties: lower expert), tokens by priority.
std::vector<std::int32_t> naive_route(const std::vector<double>& g, index_t S, int E, int K, index_t C, bool bpr) {
  std::vector<std::vector<int>> ch(S);
  for (index_t s = 0; s < S; ++s) {
    std::vector<int> idx(E);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return g[s * E + a] > g[s * E + b]; });
    ch[s].assign(idx.begin(), idx.begin() + K);
  }
  std::vector<index_t> tok(S);
  std::iota(tok.begin(), tok.end(), 0);
  if (bpr)
    std::sort(tok.begin(), tok.end(), [&](index_t a, index_t b) {
      const double ga = g[a * E + ch[a][0]], gb = g[b * E + ch[b][0]];
      return ga != gb ? ga > gb : a < b;
    });
  std::vector<std::int32_t> route(S * K, -1);
  std::vector<index_t> cnt(E, 0);
  for (int k = 0; k < K; ++k)
    for (index_t s : tok)
      if (cnt[ch[s][k]] < C) ++cnt[ch[s][k]], route[s * K + k] = ch[s][k];
  return route;
}
}  // namespace

TEST_CASE("capacity: ceil(K * S * factor / E) as written, rounded up to the multiple") {
  CHECK(compute_capacity(16, 8, 1, 1.0) == 2);     // the section 8 table
  CHECK(compute_capacity(16, 8, 2, 1.0) == 4);
  CHECK(compute_capacity(10, 4, 1, 1.0) == 3);
  CHECK(compute_capacity(16, 8, 1, 1.0, 4) == 4);
  CHECK(compute_capacity(7, 8, 1, 0.0) == 7);      // factor 0: no drop
  CHECK(compute_capacity(10, 4, 1, 1.0, 4) == 4);  // ceil(2.5) = 3, up to the multiple 4
  CHECK(compute_capacity(33, 8, 2, 1.0, 4) == 12); // ceil(8.25) = 9 -> 12
  CHECK(compute_capacity(40, 8, 1, 1.0, 1) == 5);  // exact: no rounding up
  // The formula is evaluated in double as written (vmoe's math.ceil does the same): 100 * 1.1 is
  // 110.00000000000001, whose ceiling is 111 (10 * 1.1 happens to round to exactly 11).
  CHECK(compute_capacity(100, 1, 1, 1.1) == 111);
  CHECK(compute_capacity(10, 1, 1, 1.1) == 11);
  CHECK(compute_capacity(32, 8, 1, 1.0, 4) == 4);  // already a multiple: unchanged
  // Any positive factor gives a group at least one slot per expert: K*S*factor/E = 0.05 -> 1, as a shorter last
  // group needs; a model's configured group size that small is refused (check_group_capacity, test_model).
  CHECK(compute_capacity(4, 8, 1, 0.1) == 1);
  CHECK(compute_capacity(1, 256, 1, 1e-6) == 1);
  CHECK(compute_capacity(1, 8, 1, 1e-300) == 1);
  CHECK_THROWS_WITH_AS(compute_capacity(1, 8, 1, std::numeric_limits<double>::denorm_min()), doctest::Contains("C < 1"), Error);  // underflow
  CHECK_THROWS_WITH_AS(compute_capacity(16, 8, 1, 1e300), doctest::Contains("too large"), Error);
  CHECK_THROWS_WITH_AS(compute_capacity(16, 8, 1, -1.0), doctest::Contains("capacity factor"), Error);
  CHECK_THROWS_WITH_AS(compute_capacity(16, 8, 1, std::nan("")), doctest::Contains("capacity factor"), Error);
  CHECK_THROWS_WITH_AS(compute_capacity(16, 8, 9, 1.0), doctest::Contains("K <= E"), Error);
  // Through the layer: one group of S = 4 tokens at factor 0.1 routes with one slot per expert.
  Fixture<double> f(8, 3, 4, 7);
  Tensor<double> x(Shape{4, 3}), y(Shape{4, 3});
  MoeContext<double> ctx;
  auto cfg = config(8, 1, 0.1, 0.0, true);
  moe_forward<double>(cfg, f.params(), x.view(), {}, Mode::Train, Rng(1), y.view(), ctx);
  REQUIRE(ctx.capacity.numel() == 1);
  CHECK(ctx.capacity[0] == 1);
  cfg.top_k = 9;
  CHECK_THROWS_WITH_AS(cfg.validate(), doctest::Contains("top_k"), Error);
}

TEST_CASE("section 8: all tokens choose expert 0, top-1 gates 0.3 0.9 0.5 0.8, C = 2") {
  const std::vector<std::vector<double>> g{
      {0.3, 0.25, 0.25, 0.2}, {0.9, 0.05, 0.03, 0.02}, {0.5, 0.2, 0.2, 0.1}, {0.8, 0.1, 0.05, 0.05}};
  const auto van = route_gates(VanK1{}, g, 2), bpr = route_gates(BprK1{}, g, 2);
  CHECK(van.route == std::vector<std::int32_t>{0, 0, -1, -1});  // vanilla keeps {0, 1}
  CHECK(bpr.route == std::vector<std::int32_t>{-1, 0, -1, 0});  // BPR keeps {1, 3}
  // Through the layer: N = 4, E = 4, K = 1, factor 2 gives C = 2; no noise.
  Fixture<double> f(4, 4, 3, 1);
  Tensor<double> x(Shape{4, 4}), y(Shape{4, 4});
  for (index_t t = 0; t < 4; ++t) x[t * 4 + t] = 1;  // x = I, W_r = log gates^T: logits = log gates
  for (index_t t = 0; t < 4; ++t)
    for (index_t e = 0; e < 4; ++e) f.wr[e * 4 + t] = std::log(g[t][e]);
  MoeContext<double> ctx;
  for (bool use_bpr : {false, true}) {
    moe_forward<double>(config(4, 1, 2.0, 0.0, use_bpr, 0.0), f.params(), x.view(), {}, Mode::Train, Rng(3),
                        y.view(), ctx);
    const auto r = ctx.routes();
    std::vector<std::int32_t> got(r.data(), r.data() + 4);
    CHECK(got == (use_bpr ? std::vector<std::int32_t>{-1, 0, -1, 0} : std::vector<std::int32_t>{0, 0, -1, -1}));
    CHECK(ctx.stats.capacity == 2);
    CHECK(ctx.stats.drop_fraction[0] == doctest::Approx(0.5));
    CHECK(ctx.stats.tokens_fully_dropped[0] == 2);
    for (index_t d = 0; d < 4; ++d) CHECK(y[(use_bpr ? 0 : 2) * 4 + d] == 0.0);  // dropped token: y = 0
  }
}

TEST_CASE("section 8: BPR with K = 2, C = 1, E = 2: B kept at both experts, A dropped entirely") {
  const std::vector<std::vector<double>> g{{0.51, 0.49}, {0.95, 0.05}};  // token A, token B
  const auto r = route_gates(BprK2{}, g, 1);
  CHECK(r.choice == std::vector<std::int32_t>{0, 1, 0, 1});
  CHECK(r.route == std::vector<std::int32_t>{-1, -1, 0, 1});
  CHECK(route_gates(BprDyn{DynamicTopK{2}}, g, 1).route == r.route);
  // Vanilla would keep A at both instead.
  CHECK(route_gates(VanDyn{DynamicTopK{2}}, g, 1).route == std::vector<std::int32_t>{0, 1, -1, -1});
}

TEST_CASE("tie rules: equal top-1 gates go to the lower token index; equal gates to the lower expert") {
  const std::vector<std::vector<double>> g{{0.2, 0.6, 0.2}, {0.2, 0.6, 0.2}, {0.1, 0.7, 0.2}};
  const auto r = route_gates(BprK1{}, g, 2);
  CHECK(r.route == std::vector<std::int32_t>{1, -1, 1});  // token 2 first (0.7), then token 0 before token 1
  const auto r2 = route_gates(BprK2{}, std::vector<std::vector<double>>{{0.4, 0.3, 0.3}}, 1);
  CHECK(r2.choice == std::vector<std::int32_t>{0, 1});
  // Exactly equal best gates: the lower expert id, in every top-K implementation (K = 1 has its own loop).
  const std::vector<std::vector<double>> tie{{0.2, 0.4, 0.4}, {0.4, 0.2, 0.4}};
  CHECK(route_gates(BprK1{}, tie, 2).choice == std::vector<std::int32_t>{1, 0});
  CHECK(route_gates(VanK1{}, tie, 2).choice == std::vector<std::int32_t>{1, 0});
  CHECK(route_gates(BprDyn{DynamicTopK{1}}, tie, 2).choice == std::vector<std::int32_t>{1, 0});
  CHECK(route_gates(BprK2{}, tie, 2).choice == std::vector<std::int32_t>{1, 2, 0, 2});
  CHECK(route_gates(BprDyn{DynamicTopK{2}}, tie, 2).choice == std::vector<std::int32_t>{1, 2, 0, 2});
}

TEST_CASE("properties over random groups: capacity, at most K, naive reference, BPR order invariance") {
  Rng rng(2024);
  for (int trial = 0; trial < 300; ++trial) {
    const auto u = [&](int i) { return rng.uniform(trial, static_cast<std::uint64_t>(i)); };
    const int E = 2 + static_cast<int>(u(0) * 7);
    const int K = 1 + static_cast<int>(u(1) * std::min(E, 3));
    const index_t S = 1 + static_cast<index_t>(u(2) * 40);
    const index_t C = 1 + static_cast<index_t>(u(3) * S);
    std::vector<std::vector<double>> g(S, std::vector<double>(E));
    std::vector<double> flat;
    for (index_t s = 0; s < S; ++s) {
      double tot = 0;
      for (int e = 0; e < E; ++e) tot += (g[s][e] = std::exp(2.0 * rng.normal(1000 + trial, s * E + e)));
      for (int e = 0; e < E; ++e) flat.push_back(g[s][e] /= tot);
    }
    for (bool bpr : {false, true}) {
      Routed r;
      if (K == 1) r = bpr ? route_gates(BprK1{}, g, C) : route_gates(VanK1{}, g, C);
      else if (K == 2 && bpr) r = route_gates(BprK2{}, g, C);
      else r = bpr ? route_gates(BprDyn{DynamicTopK{K}}, g, C) : route_gates(VanDyn{DynamicTopK{K}}, g, C);
      std::vector<index_t> cnt(E, 0);
      for (index_t s = 0; s < S; ++s) {
        std::set<int> seen;
        for (int k = 0; k < K; ++k) {
          const int e = r.route[s * K + k];
          CHECK(seen.insert(r.choice[s * K + k]).second);  // distinct choices
          if (k > 0) CHECK(g[s][r.choice[s * K + k - 1]] >= g[s][r.choice[s * K + k]]);
          if (e >= 0) {
            CHECK(e == r.choice[s * K + k]);
            ++cnt[e];
          }
        }
      }
      for (int e = 0; e < E; ++e) CHECK(cnt[e] <= C);
      CHECK(r.route == naive_route(flat, S, E, K, C, bpr));
      if (!bpr) continue;
      // BPR: permuting the tokens permutes the kept set and nothing else.
      std::vector<index_t> perm(S);
      std::iota(perm.begin(), perm.end(), 0);
      for (index_t i = S - 1; i > 0; --i) std::swap(perm[i], perm[static_cast<index_t>(u(10 + i) * (i + 1))]);
      std::vector<std::vector<double>> gp(S);
      for (index_t i = 0; i < S; ++i) gp[i] = g[perm[i]];
      const auto rp = K == 1 ? route_gates(BprK1{}, gp, C) : route_gates(BprDyn{DynamicTopK{K}}, gp, C);
      for (index_t i = 0; i < S; ++i)
        for (int k = 0; k < K; ++k) CHECK(rp.route[i * K + k] == r.route[perm[i] * K + k]);
    }
  }
}

TEST_CASE("layer routing is identical on 1 and 2 threads (noise, groups, K = 2); so are y and the gradients") {
  const index_t N = 300, D = 32, M = 48;
  Fixture<float> f(8, D, M, 11);
  Tensor<float> x(Shape{N, D}), dy(Shape{N, D});
  testing::fill_normal(x.view(), 5);
  testing::fill_normal(dy.view(), 6);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = 200; t < N; ++t) mod[t] = kText;
  auto cfg = config(8, 2, 1.0, 0.0, true, 1.0, 128);
  std::vector<std::vector<float>> outs;
  std::vector<std::vector<std::int32_t>> routes;
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Tensor<float> y(Shape{N, D}), dx(Shape{N, D});
    MoeContext<float> ctx;
    f.zero_grads();
    moe_forward<float>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(77), y.view(), ctx);
    moe_backward<float>(f.params(), x.view(), dy.view(), dx.view(), f.grads(), ctx);
    routes.emplace_back(ctx.routes().data(), ctx.routes().data() + N * 2);
    std::vector<float> all(y.data(), y.data() + y.numel());
    all.insert(all.end(), dx.data(), dx.data() + dx.numel());
    for (auto* g : {&f.gwr, &f.gw1, &f.gb1, &f.gw2, &f.gb2}) all.insert(all.end(), g->data(), g->data() + g->numel());
    outs.push_back(all);
    CHECK(ctx.stats.groups == 3);
    CHECK(ctx.stats.drop_fraction[0] > 0);  // capacity factor 1 with noise: some drops
  }
  set_num_threads(0);
  CHECK(routes[0] == routes[1]);
  CHECK(outs[0] == outs[1]);
}

TEST_CASE("noise: training only, fixed by the Rng, independent of grouping") {
  const index_t N = 40, D = 8;
  Fixture<double> f(4, D, 6, 3);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 9);
  MoeContext<double> a, b, c, ev;
  moe_forward<double>(config(4, 1, 0.0, 0.0, true, 1.0, 0), f.params(), x.view(), {}, Mode::Train, Rng(5), y.view(), a);
  moe_forward<double>(config(4, 1, 0.0, 0.0, true, 1.0, 10), f.params(), x.view(), {}, Mode::Train, Rng(5), y.view(), b);
  moe_forward<double>(config(4, 1, 0.0, 0.0, true, 1.0, 0), f.params(), x.view(), {}, Mode::Train, Rng(6), y.view(), c);
  moe_forward<double>(config(4, 1, 0.0, 0.0, true, 1.0, 0), f.params(), x.view(), {}, Mode::Eval, Rng(5), y.view(), ev);
  double diff_rng = 0, diff_eval = 0, diff_group = 0, sq = 0;
  for (index_t i = 0; i < N * 4; ++i) {
    diff_group = std::max(diff_group, std::abs(a.noisy[i] - b.noisy[i]));
    diff_rng = std::max(diff_rng, std::abs(a.noisy[i] - c.noisy[i]));
    diff_eval = std::max(diff_eval, std::abs(ev.noisy[i] - ev.logits[i]));
    sq += (a.noisy[i] - a.logits[i]) * (a.noisy[i] - a.logits[i]);
  }
  CHECK(diff_group == 0.0);
  CHECK(diff_rng > 0.0);
  CHECK(diff_eval == 0.0);
  CHECK(std::sqrt(sq / (N * 4)) == doctest::Approx(0.25).epsilon(0.25));  // std noise_std / E = 0.25
}

namespace {
// A user-written router: token t goes to expert (row0 + t) % E, gate from the softmax, no capacity limit needed
// beyond the contract (each expert still never exceeds C because the group is spread evenly).
struct RoundRobinRouter {
  int top_k() const { return 1; }
  template <class T>
  void route(const RouteGroup<T>& g) const {
    std::copy(g.logits, g.logits + g.S * g.E, g.noisy);
    std::fill(g.fill, g.fill + g.E, index_t{0});
    for (index_t s = 0; s < g.S; ++s) {
      T mx = g.noisy[s * g.E], tot = 0;
      for (int e = 1; e < g.E; ++e) mx = std::max(mx, g.noisy[s * g.E + e]);
      for (int e = 0; e < g.E; ++e) tot += (g.gates[s * g.E + e] = std::exp(g.noisy[s * g.E + e] - mx));
      for (int e = 0; e < g.E; ++e) g.gates[s * g.E + e] /= tot;
      const auto e = static_cast<std::int32_t>((g.row0 + s) % g.E);
      g.choice[s] = e;
      g.route[s] = g.fill[e] < g.capacity ? (++g.fill[e], e) : -1;
    }
  }
};
struct BrokenRouter : RoundRobinRouter {
  template <class T>
  void route(const RouteGroup<T>& g) const {
    RoundRobinRouter::route(g);
    for (index_t s = 0; s < g.S; ++s) g.choice[s] = g.route[s] = 0;  // ignores capacity
  }
};
static_assert(RouterPolicy<RoundRobinRouter, float> && RouterPolicy<RoundRobinRouter, double>);
static_assert(RouterPolicy<TopKRouter<StaticTopK<2>, GaussianNoise, BatchPriorityOrder>, float>);
static_assert(!RouterPolicy<int, float>);
}  // namespace

TEST_CASE("a user-written router plugs into the layer; a router breaking the contract is caught") {
  const index_t N = 8, D = 4;
  Fixture<double> f(4, D, 5, 21);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 4);
  MoeContext<double> ctx;
  const auto cfg = config(4, 1, 1.0, 1.0, true);
  moe_forward<double>(RoundRobinRouter{}, cfg, f.params(), x.view(), {}, Mode::Eval, Rng(1), y.view(), ctx);
  for (index_t t = 0; t < N; ++t) {
    CHECK(ctx.routes()[t] == t % 4);
    const auto o = ref_expert(f, t % 4, x.view().row(t));
    const double gate = ctx.gate_values()[t * 4 + t % 4];
    for (index_t d = 0; d < D; ++d) CHECK(y[t * D + d] == doctest::Approx(gate * o[d]).epsilon(1e-12));
  }
  CHECK_THROWS_WITH_AS(
      moe_forward<double>(BrokenRouter{}, cfg, f.params(), x.view(), {}, Mode::Eval, Rng(1), y.view(), ctx),
      doctest::Contains("exceeds capacity"), Error);
}

TEST_CASE("the load loss takes its noise scale from the router policy, not from the config") {
  const index_t N = 24, D = 4;
  const int E = 4;
  Fixture<double> f(E, D, 5, 22);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 5);
  MoeContext<double> ctx;
  CHECK(router_noise_sigma(RoundRobinRouter{}, E, Mode::Train) == 0.0);  // no noise members: no noise
  // A noiseless router with noise_std 1 in the config: no load loss.
  moe_forward<double>(TopKRouter<StaticTopK<1>, NoNoise, BatchPriorityOrder>{}, config(E, 1, 0.0, 0.0, true, 1.0),
                      f.params(), x.view(), {}, Mode::Train, Rng(1), y.view(), ctx);
  CHECK(ctx.losses.load == 0.0);
  // A Gaussian router of std 2 with noise_std 0 in the config: the load loss of sigma = 2 / E, recomputed here
  // from the router's noisy logits (K = 1: the threshold is the chosen expert's noisy logit).
  const TopKRouter<StaticTopK<1>, GaussianNoise, BatchPriorityOrder> noisy_router{{}, {2.0}};
  CHECK(router_noise_sigma(noisy_router, E, Mode::Train) == 0.5);
  CHECK(router_noise_sigma(noisy_router, E, Mode::Eval) == 0.0);
  moe_forward<double>(noisy_router, config(E, 1, 0.0, 0.0, true, 0.0), f.params(), x.view(), {}, Mode::Train, Rng(1),
                      y.view(), ctx);
  std::vector<double> load(E, 0.0);
  for (index_t t = 0; t < N; ++t) {
    const int k = ctx.choice[t];
    const double thr = ctx.noisy[t * E + k];
    for (int e = 0; e < E; ++e) load[e] += 0.5 * std::erfc((thr - ctx.logits[t * E + e]) / 0.5 / std::sqrt(2.0)) / N;
  }
  double mean = 0, var = 0;
  for (double l : load) mean += l / E;
  for (double l : load) var += (l - mean) * (l - mean) / E;
  CHECK(ctx.losses.load == doctest::Approx(var / (mean * mean)).epsilon(1e-10));
  CHECK(ctx.losses.load > 0.0);
}

// ---- BPR ties on many tokens, per-group capacities ------------------------------------------------------------
namespace {
// Gates given row by row through the layer: D = E, W_r = I, x[t] = log gates[t] (exact: the products are x * 1
// and x * 0, so identical rows give bitwise identical logits and gates).
std::vector<std::int32_t> layer_route_gates(const std::vector<std::vector<double>>& gates, int K, double cf_eval,
                                            index_t group_size, MoeContext<double>& ctx) {
  const index_t N = static_cast<index_t>(gates.size());
  const int E = static_cast<int>(gates[0].size());
  Fixture<double> f(E, E, 3, 13);
  for (int e = 0; e < E; ++e)
    for (int d = 0; d < E; ++d) f.wr[e * E + d] = e == d ? 1.0 : 0.0;
  Tensor<double> x(Shape{N, E}), y(Shape{N, E});
  for (index_t t = 0; t < N; ++t)
    for (int e = 0; e < E; ++e) x[t * E + e] = std::log(gates[t][e]);
  // Eval: no noise whatever noise_std says; capacity from capacity_factor_eval.
  moe_forward<double>(config(E, K, 1.05, cf_eval, true, 1.0, group_size), f.params(), x.view(), {}, Mode::Eval,
                      Rng(9), y.view(), ctx);
  return std::vector<std::int32_t>(ctx.routes().data(), ctx.routes().data() + N * K);
}
std::vector<double> flatten(const std::vector<std::vector<double>>& g) {
  std::vector<double> out;
  for (const auto& r : g) out.insert(out.end(), r.begin(), r.end());
  return out;
}
}  // namespace

TEST_CASE("BPR ties on many tokens: identical top-1 gates keep the lowest token indices (a stable order)") {
  // K = 1: S = 40 identical rows, all to expert 0, C = ceil(1 * 40 * 1.0 / 4) = 10: exactly tokens 0..9 kept.
  for (index_t S : {index_t{40}, index_t{100}}) {
    const std::vector<std::vector<double>> g(S, std::vector<double>{0.55, 0.15, 0.15, 0.15});
    std::vector<std::int32_t> want(S, -1);
    for (index_t t = 0; t < 10; ++t) want[t] = 0;
    INFO("S = ", S);
    CHECK(route_gates(BprK1{}, g, 10).route == want);
    CHECK(route_gates(BprDyn{DynamicTopK{1}}, g, 10).route == want);
    MoeContext<double> ctx;
    const double factor = 10.0 * 4 / static_cast<double>(S);  // K * S * factor / E = 10
    CHECK(layer_route_gates(g, 1, factor, 0, ctx) == want);
    REQUIRE(ctx.capacity.numel() == 1);
    CHECK(ctx.capacity[0] == 10);
  }
  // K = 2: identical rows (first choice expert 0, second expert 1), C = ceil(2 * 40 * 0.5 / 4) = 10: the second
  // choices follow the same top-1 order, so tokens 0..9 keep both and every other token is dropped entirely.
  {
    const std::vector<std::vector<double>> g(40, std::vector<double>{0.4, 0.3, 0.2, 0.1});
    std::vector<std::int32_t> want(80, -1);
    for (index_t t = 0; t < 10; ++t) want[t * 2] = 0, want[t * 2 + 1] = 1;
    CHECK(route_gates(BprK2{}, g, 10).route == want);
    CHECK(route_gates(BprDyn{DynamicTopK{2}}, g, 10).route == want);
    MoeContext<double> ctx;
    CHECK(layer_route_gates(g, 2, 0.5, 0, ctx) == want);
    CHECK(ctx.capacity[0] == 10);
    CHECK(ctx.stats.tokens_fully_dropped[kImage] == 30);
  }
}

TEST_CASE("BPR ties, mixed: higher gates first (descending), then the tied tokens by index; K = 1 and 2") {
  // K = 1, S = 40, all to expert 0, C = 10. Five tokens have higher, distinct top-1 gates; the other 35 tie.
  {
    std::vector<std::vector<double>> g(40, std::vector<double>{0.55, 0.15, 0.15, 0.15});
    const std::vector<index_t> high{3, 17, 22, 31, 38};
    for (std::size_t i = 0; i < high.size(); ++i) {
      const double top = 0.6 + 0.05 * static_cast<double>(i);
      g[high[i]] = {top, (1 - top) / 3, (1 - top) / 3, (1 - top) / 3};
    }
    std::vector<std::int32_t> want(40, -1);
    for (index_t t : {0, 1, 2, 4, 5}) want[t] = 0;  // the first five tied tokens
    for (index_t t : high) want[t] = 0;
    CHECK(route_gates(BprK1{}, g, 10).route == want);
    CHECK(naive_route(flatten(g), 40, 4, 1, 10, true) == want);
    MoeContext<double> ctx;
    CHECK(layer_route_gates(g, 1, 1.0, 0, ctx) == want);
    // C = 3: only the three highest gates (tokens 38, 31, 22), none of the ties.
    std::vector<std::int32_t> want3(40, -1);
    for (index_t t : {22, 31, 38}) want3[t] = 0;
    CHECK(route_gates(BprK1{}, g, 3).route == want3);
  }
  // K = 2, S = 40, C = 10. 33 "A" tokens tie: {0.4, 0.3, 0.2, 0.1} (expert 0, then 1). 7 "B" tokens
  // {0.2, 0.3, 0.45, 0.05} (expert 2, then 1) come first in the top-1 order (0.45 > 0.4), tied among themselves.
  // Expert 0: the first ten A tokens by index. Expert 2: all seven B. Expert 1 (second choices, same order):
  // the seven B, then the first three A tokens (0, 1, 3) - vanilla order would take tokens 0..9 instead.
  {
    const std::vector<index_t> B{2, 9, 13, 20, 27, 33, 39};
    std::vector<std::vector<double>> g(40, std::vector<double>{0.4, 0.3, 0.2, 0.1});
    for (index_t t : B) g[t] = {0.2, 0.3, 0.45, 0.05};
    std::vector<index_t> A;
    for (index_t t = 0; t < 40; ++t)
      if (std::find(B.begin(), B.end(), t) == B.end()) A.push_back(t);
    std::vector<std::int32_t> want(80, -1);
    for (index_t t : B) want[t * 2] = 2, want[t * 2 + 1] = 1;
    for (std::size_t i = 0; i < 10; ++i) want[A[i] * 2] = 0;
    for (std::size_t i = 0; i < 3; ++i) want[A[i] * 2 + 1] = 1;
    CHECK(A[0] == 0);
    CHECK(A[1] == 1);
    CHECK(A[2] == 3);
    CHECK(route_gates(BprK2{}, g, 10).route == want);
    CHECK(route_gates(BprDyn{DynamicTopK{2}}, g, 10).route == want);
    CHECK(naive_route(flatten(g), 40, 4, 2, 10, true) == want);
    MoeContext<double> ctx;
    CHECK(layer_route_gates(g, 2, 0.5, 0, ctx) == want);
    CHECK(ctx.capacity[0] == 10);
    // Two groups of 40 (the same rows twice): each group keeps its own lowest indices, offset by 40.
    std::vector<std::vector<double>> g2 = g;
    g2.insert(g2.end(), g.begin(), g.end());
    std::vector<std::int32_t> want2 = want;
    want2.insert(want2.end(), want.begin(), want.end());
    CHECK(layer_route_gates(g2, 2, 0.5, 40, ctx) == want2);
    REQUIRE(ctx.capacity.numel() == 2);
    CHECK(ctx.capacity[0] == 10);
    CHECK(ctx.capacity[1] == 10);
  }
}

// BatchPriorityOrder's radix sort against std::stable_sort comparing the top-1 gates, for float and double gates
// spread over many binades (1e-30 to 1: every byte of the keys matters, the top one included), with runs of
// exact ties, zeros and negative zeros (taken as equal to +0), and group sizes from 1 up.
template <class T>
void check_bpr_order_against_stable_sort() {
  const Rng rng(29);
  for (index_t S : {index_t{1}, index_t{2}, index_t{3}, index_t{17}, index_t{256}, index_t{1000}}) {
    for (int trial = 0; trial < 4; ++trial) {
      const int E = 5, K = 2;
      std::vector<T> gates(static_cast<std::size_t>(S * E));
      std::vector<std::int32_t> choice(static_cast<std::size_t>(S * K));
      for (index_t i = 0; i < S * E; ++i) {
        const double u = rng.uniform(static_cast<std::uint64_t>(trial), static_cast<std::uint64_t>(i));
        const int kind = static_cast<int>(u * 1000) % 5;
        gates[i] = kind == 0 ? T(0.25)                                 // a run of exact ties
                   : kind == 1 ? (i % 2 ? T(0) : T(-0.0))              // zeros of both signs
                               : static_cast<T>(std::pow(10.0, -30.0 * u));  // 1e-30 .. 1
      }
      for (index_t s = 0; s < S; ++s)
        for (int k = 0; k < K; ++k) choice[s * K + k] = static_cast<std::int32_t>((s * 3 + k * 2) % E);
      RouteGroup<T> rg;
      std::vector<index_t> order(static_cast<std::size_t>(S)), want(static_cast<std::size_t>(S));
      rg.S = S, rg.E = E, rg.K = K, rg.gates = gates.data(), rg.choice = choice.data(), rg.order = order.data();
      BatchPriorityOrder::order(rg);
      std::iota(want.begin(), want.end(), index_t{0});
      std::stable_sort(want.begin(), want.end(), [&](index_t a, index_t b) {
        return gates[a * E + choice[a * K]] > gates[b * E + choice[b * K]];
      });
      INFO("S = ", S, ", trial ", trial, ", sizeof(T) = ", sizeof(T));
      CHECK(order == want);
    }
  }
}

TEST_CASE("BPR order: the radix sort gives std::stable_sort's order on float and double gates over 30 decades") {
  check_bpr_order_against_stable_sort<float>();
  check_bpr_order_against_stable_sort<double>();
}

TEST_CASE("per-group capacities: N = 30, group_size 8 -> groups [8, 8, 8, 6], each with its own C") {
  const index_t N = 30, D = 5;
  const int E = 4;
  const std::vector<index_t> sizes{8, 8, 8, 6};
  // The spec's formula written out here: ceil(K * S * factor / E), up to a multiple; factor 0: C = S.
  auto C_of = [](index_t S, int K, double factor, int multiple) -> index_t {
    if (factor == 0.0) return S;
    auto c = static_cast<index_t>(std::ceil(K * static_cast<double>(S) * factor / E));
    return (c + multiple - 1) / multiple * multiple;
  };
  // Every token strongly prefers expert 0 (then 1): W_r row 0 = 10 * u, row 1 = 5 * u, x[t] = u + small.
  Fixture<double> f(E, D, 6, 17);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 18, 0.05);
  for (index_t t = 0; t < N; ++t) x[t * D] += 1.0;
  for (int e = 0; e < E; ++e)
    for (index_t d = 0; d < D; ++d) f.wr[e * D + d] = d == 0 ? (e == 0 ? 10.0 : e == 1 ? 5.0 : 0.0) : 0.0;
  struct Case { int K; double factor; int multiple; Mode mode; };
  for (const Case cs : {Case{2, 1.05, 1, Mode::Train}, Case{2, 1.05, 4, Mode::Train}, Case{1, 1.05, 1, Mode::Train},
                        Case{1, 0.5, 4, Mode::Train}, Case{2, 0.0, 1, Mode::Eval}, Case{1, 0.0, 4, Mode::Eval}}) {
    auto cfg = config(E, cs.K, cs.mode == Mode::Train ? cs.factor : 1.05, cs.mode == Mode::Eval ? cs.factor : 1.0,
                      true, 1.0, 8);
    cfg.router.capacity_multiple_of = cs.multiple;
    MoeContext<double> ctx;
    moe_forward<double>(cfg, f.params(), x.view(), {}, cs.mode, Rng(3), y.view(), ctx);
    INFO("K = ", cs.K, ", factor = ", cs.factor, ", multiple_of = ", cs.multiple);
    REQUIRE(ctx.groups == 4);
    REQUIRE(ctx.capacity.numel() == 4);
    CHECK(ctx.stats.groups == 4);
    const auto r = ctx.routes();
    for (index_t g = 0; g < 4; ++g) {
      const index_t S = sizes[g], C = C_of(S, cs.K, cs.factor, cs.multiple);
      CHECK(ctx.capacity[g] == C);
      // Fill per expert counted from the routes; none above the group's own C; the layer's fill agrees.
      std::vector<index_t> cnt(E, 0);
      for (index_t s = 0; s < S; ++s)
        for (int k = 0; k < cs.K; ++k) {
          const std::int32_t e = r[(g * 8 + s) * cs.K + k];
          if (e >= 0) ++cnt[e];
        }
      for (int e = 0; e < E; ++e) {
        CHECK(cnt[e] <= C);
        CHECK(ctx.fill[g * E + e] == cnt[e]);
      }
      // Expert 0 gets every first choice, so it fills to exactly min(S, C): the shorter last group uses its own C.
      CHECK(cnt[0] == std::min(S, C));
    }
    CHECK(ctx.stats.capacity == ctx.capacity[0]);
    if (cs.factor == 0.0) CHECK(ctx.stats.drop_fraction[kImage] == 0.0);
  }
  // The cases above distinguish the last group: [5, 5, 5, 4] (K 2), [8, 8, 8, 4] (K 2, multiple 4),
  // [3, 3, 3, 2] (K 1), and C = S = [8, 8, 8, 6] without drop.
  CHECK(C_of(8, 2, 1.05, 1) == 5);
  CHECK(C_of(6, 2, 1.05, 1) == 4);
  CHECK(C_of(8, 2, 1.05, 4) == 8);
  CHECK(C_of(6, 2, 1.05, 4) == 4);
  CHECK(C_of(8, 1, 1.05, 1) == 3);
  CHECK(C_of(6, 1, 1.05, 1) == 2);
}
