// MoE layer forward (semantics §3 step 7): dropless equals the dense soft top-K mixture, K = E equals
// the full softmax mixture, capacity drops give 0, statistics, groups, float against double.
#include <doctest/doctest.h>

#include "test_moe_common.hpp"

using namespace moe_test;

TEST_CASE("dropless (eval factor 0) equals the soft top-K mixture computed densely; K = E: full softmax") {
  const index_t N = 37, D = 7, M = 9;
  const int E = 5;
  Fixture<double> f(E, D, M, 3);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 8);
  MoeContext<double> ctx;
  for (int K : {1, 2, 3, 5})
    for (index_t group : {index_t{0}, index_t{10}})
      for (bool bpr : {false, true}) {
        moe_forward<double>(config(E, K, 1.05, 0.0, bpr, 1.0, group), f.params(), x.view(), {}, Mode::Eval, Rng(1),
                            y.view(), ctx);
        const auto ref = ref_soft_topk<double>(f, x.view(), K);
        double worst = 0;
        for (index_t i = 0; i < N * D; ++i) worst = std::max(worst, std::abs(ref[i] - y[i]));
        CHECK(worst < 1e-12);
        CHECK(ctx.stats.drop_fraction[kImage] == 0.0);
        CHECK(ctx.accepted() == N * K);
      }
  // K = E against the full softmax mixture sum_e G_e Expert_e(x), written out separately.
  moe_forward<double>(config(E, E, 1.05, 0.0, true), f.params(), x.view(), {}, Mode::Eval, Rng(1), y.view(), ctx);
  for (index_t t = 0; t < N; ++t) {
    const auto g = ref_gates(f, x.view().row(t));
    std::vector<double> want(D, 0.0);
    for (int e = 0; e < E; ++e) {
      const auto o = ref_expert(f, e, x.view().row(t));
      for (index_t d = 0; d < D; ++d) want[d] += g[e] * o[d];
    }
    for (index_t d = 0; d < D; ++d) CHECK(y[t * D + d] == doctest::Approx(want[d]).epsilon(1e-12));
  }
}

TEST_CASE("with drops: y is the gate-weighted sum over accepted choices only; statistics add up") {
  const index_t N = 50, D = 6, M = 8;
  const int E = 4, K = 2;
  Fixture<double> f(E, D, M, 5, 0.5, 2.0);
  Tensor<double> x(Shape{N, D}), y(Shape{N, D});
  testing::fill_normal(x.view(), 2);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = 30; t < N; ++t) mod[t] = kText;
  MoeContext<double> ctx;
  moe_forward<double>(config(E, K, 0.6, 0.0, true, 1.0, 25), f.params(), x.view(), mod, Mode::Train, Rng(4),
                      y.view(), ctx);
  const auto r = ctx.routes();
  index_t accepted = 0, dropped = 0;
  std::vector<index_t> per_expert_group(2 * E, 0);
  for (index_t t = 0; t < N; ++t) {
    std::vector<double> want(D, 0.0);
    for (int k = 0; k < K; ++k) {
      const int e = r[t * K + k];
      if (e < 0) { ++dropped; continue; }
      ++accepted, ++per_expert_group[(t / 25) * E + e];
      const auto o = ref_expert(f, e, x.view().row(t));
      for (index_t d = 0; d < D; ++d) want[d] += ctx.gate_values()[t * E + e] * o[d];
    }
    for (index_t d = 0; d < D; ++d) CHECK(y[t * D + d] == doctest::Approx(want[d]).epsilon(1e-12));
  }
  const index_t C = compute_capacity(25, E, K, 0.6);
  CHECK(ctx.stats.capacity == C);
  for (index_t v : per_expert_group) CHECK(v <= C);
  CHECK(dropped > 0);
  const auto& st = ctx.stats;
  CHECK(st.tokens[kImage] == 30);
  CHECK(st.tokens[kText] == 20);
  index_t routed = 0, drop2 = 0;
  for (int m = 0; m < 2; ++m)
    for (int e = 0; e < E; ++e) routed += st.routed[m][e], drop2 += st.dropped[m][e];
  CHECK(routed == accepted);
  CHECK(drop2 == dropped);
  CHECK(st.drop_fraction[kImage] * 30 * K + st.drop_fraction[kText] * 20 * K == doctest::Approx(double(dropped)));
  for (int e = 0; e < E; ++e) {
    CHECK(st.image_share[e] >= 0.0);
    CHECK(st.image_share[e] <= 1.0);
  }
  CHECK(st.local_entropy[kText] > 0.0);
  CHECK(st.global_entropy[kText] <= std::log(double(E)) + 1e-12);
}

TEST_CASE("losses are averaged over groups: two identical groups give the one-group values") {
  const index_t S = 20, D = 5;
  Fixture<double> f(4, D, 6, 9);
  Tensor<double> x(Shape{2 * S, D}), y(Shape{2 * S, D});
  testing::fill_normal(x.view().slice(0, S), 3);
  std::copy_n(x.data(), S * D, x.data() + S * D);
  std::vector<std::uint8_t> mod(2 * S, kImage);
  for (index_t t = 12; t < S; ++t) mod[t] = mod[S + t] = kText;
  MoeContext<double> one, two;
  auto cfg = config(4, 2, 1.0, 0.0, true, 0.0);
  cfg.losses.z_loss_weight = 0.1;
  moe_forward<double>(cfg, f.params(), x.view().slice(0, S), std::span(mod).first(S), Mode::Train, Rng(1),
                      y.view().slice(0, S), one);
  cfg.router.group_size = S;
  moe_forward<double>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(1), y.view(), two);
  CHECK(two.stats.groups == 2);
  CHECK(two.losses.total == doctest::Approx(one.losses.total).epsilon(1e-12));
  CHECK(two.losses.importance == doctest::Approx(one.losses.importance).epsilon(1e-12));
  CHECK(two.losses.local_entropy[kText] == doctest::Approx(one.losses.local_entropy[kText]).epsilon(1e-12));
  CHECK(two.losses.global_entropy[kImage] == doctest::Approx(one.losses.global_entropy[kImage]).epsilon(1e-12));
  CHECK(two.losses.z == doctest::Approx(one.losses.z).epsilon(1e-12));
  CHECK(one.losses.total > 0);
}

TEST_CASE("float agrees with double; empty input; shape errors name the argument") {
  const index_t N = 64, D = 16, M = 32;
  Fixture<double> fd(8, D, M, 12);
  Fixture<float> ff(8, D, M, 12);
  Tensor<double> xd(Shape{N, D}), yd(Shape{N, D});
  Tensor<float> xf(Shape{N, D}), yf(Shape{N, D});
  testing::fill_normal(xd.view(), 1);
  testing::fill_normal(xf.view(), 1);
  MoeContext<double> cd;
  MoeContext<float> cf;
  const auto cfg = config(8, 2, 1.05, 0.0, true);
  moe_forward<double>(cfg, fd.params(), xd.view(), {}, Mode::Eval, Rng(1), yd.view(), cd);
  moe_forward<float>(cfg, ff.params(), xf.view(), {}, Mode::Eval, Rng(1), yf.view(), cf);
  for (index_t i = 0; i < N * D; ++i) CHECK(yf[i] == doctest::Approx(yd[i]).epsilon(1e-4).scale(1.0));
  Tensor<float> x0(Shape{0, D}), y0(Shape{0, D});
  moe_forward<float>(cfg, ff.params(), x0.view(), {}, Mode::Train, Rng(1), y0.view(), cf);
  CHECK(cf.accepted() == 0);
  Tensor<float> bad(Shape{N, D + 1});
  CHECK_THROWS_WITH_AS(moe_forward<float>(cfg, ff.params(), xf.view(), {}, Mode::Eval, Rng(1), bad.view(), cf),
                       doctest::Contains("y: expected shape [64, 16]"), Error);
  Tensor<float> wbad(Shape{8, D + 1});
  auto p = ff.params();
  p.router_w = wbad.view();
  CHECK_THROWS_WITH_AS(moe_forward<float>(cfg, p, xf.view(), {}, Mode::Eval, Rng(1), yf.view(), cf),
                       doctest::Contains("router.weight"), Error);
  std::vector<std::uint8_t> mod(3, kText);
  CHECK_THROWS_WITH_AS(moe_forward<float>(cfg, ff.params(), xf.view(), mod, Mode::Eval, Rng(1), yf.view(), cf),
                       doctest::Contains("modality"), Error);
}

TEST_CASE("padding is masked out: each group routes, drops, losses and gradients as if its padding were absent") {
  // Two groups of 24 tokens (images, then texts whose tails are padding), training noise, capacity 0.6 (drops),
  // K = 2, all five loss terms. Reference: each group's non-padding tokens run alone as one group, with the
  // noise positions they take when packed (first_token = the group's first row) and the loss scale 1/G.
  const index_t gs = 24, G = 2, N = gs * G, D = 6, M = 8;
  const int E = 4, K = 2;
  Fixture<double> f(E, D, M, 21, 0.5, 2.0);
  Tensor<double> x(Shape{N, D}), dy(Shape{N, D}), y(Shape{N, D}), dx(Shape{N, D});
  testing::fill_normal(x.view(), 5);
  testing::fill_normal(dy.view(), 6);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = 10; t < gs; ++t) mod[t] = kText;
  for (index_t t = gs + 14; t < N; ++t) mod[t] = kText;
  for (index_t t : {14, 15, 19, 20, 21, 22, 23, 40, 41, 47}) mod[static_cast<std::size_t>(t)] = kPad;
  auto cfg = config(E, K, 0.6, 0.0, true, 1.0, gs);
  cfg.losses.z_loss_weight = 0.1;
  MoeContext<double> ctx;
  moe_forward<double>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(3), y.view(), ctx);
  f.zero_grads();
  moe_backward<double>(f.params(), x.view(), dy.view(), dx.view(), f.grads(), ctx);
  const Tensor<double> gwr = Tensor<double>::copy_of(f.gwr.view()), gw1 = Tensor<double>::copy_of(f.gw1.view());

  f.zero_grads();
  double total = 0, importance = 0;
  index_t dropped = 0;
  for (index_t g = 0; g < G; ++g) {
    std::vector<index_t> rows;
    for (index_t t = g * gs; t < (g + 1) * gs; ++t)
      if (mod[static_cast<std::size_t>(t)] != kPad) rows.push_back(t);
    const auto n = static_cast<index_t>(rows.size());
    Tensor<double> xs(Shape{n, D}), dys(Shape{n, D}), ys(Shape{n, D}), dxs(Shape{n, D});
    std::vector<std::uint8_t> ms;
    for (index_t j = 0; j < n; ++j) {
      std::copy_n(x.data() + rows[j] * D, D, xs.data() + j * D);
      std::copy_n(dy.data() + rows[j] * D, D, dys.data() + j * D);
      ms.push_back(mod[static_cast<std::size_t>(rows[j])]);
    }
    auto one = cfg;
    one.router.group_size = 0;
    one.first_token = g * gs;
    MoeContext<double> c1;
    moe_forward<double>(one, f.params(), xs.view(), ms, Mode::Train, Rng(3), ys.view(), c1);
    moe_backward<double>(f.params(), xs.view(), dys.view(), dxs.view(), f.grads(), c1, 1.0 / G);
    if (g == 0) CHECK(ctx.stats.capacity == compute_capacity(n, E, K, 0.6));
    total += c1.losses.total / G, importance += c1.losses.importance / G;
    for (index_t j = 0; j < n; ++j) {
      for (int k = 0; k < K; ++k) {
        CHECK(ctx.routes()[rows[j] * K + k] == c1.routes()[j * K + k]);
        dropped += c1.routes()[j * K + k] < 0;
      }
      for (index_t d = 0; d < D; ++d) {
        CHECK(y[rows[j] * D + d] == doctest::Approx(ys[j * D + d]).epsilon(1e-12));
        CHECK(dx[rows[j] * D + d] == doctest::Approx(dxs[j * D + d]).epsilon(1e-12));
      }
    }
  }
  CHECK(dropped > 0);  // capacity binds, so the padding's slots matter
  CHECK(ctx.losses.total == doctest::Approx(total).epsilon(1e-12));
  CHECK(ctx.losses.importance == doctest::Approx(importance).epsilon(1e-12));
  for (index_t i = 0; i < gwr.numel(); ++i) CHECK(gwr[i] == doctest::Approx(f.gwr[i]).epsilon(1e-11));
  for (index_t i = 0; i < gw1.numel(); ++i) CHECK(gw1[i] == doctest::Approx(f.gw1[i]).epsilon(1e-11));
  // Padding: no route, output 0, no gradient to its input, not in the statistics.
  for (index_t t = 0; t < N; ++t) {
    if (mod[static_cast<std::size_t>(t)] != kPad) continue;
    for (int k = 0; k < K; ++k) CHECK(ctx.routes()[t * K + k] == -1);
    for (index_t d = 0; d < D; ++d) {
      CHECK(y[t * D + d] == 0.0);
      CHECK(dx[t * D + d] == 0.0);
    }
  }
  CHECK(ctx.stats.padding == 10);
  CHECK(ctx.stats.tokens[kImage] + ctx.stats.tokens[kText] == N - 10);
  index_t drops = 0;
  for (int m = 0; m < kModalities; ++m)
    for (int e = 0; e < E; ++e) drops += ctx.stats.dropped[m][e];
  CHECK(drops == dropped);

  // A group of padding only routes nothing and adds no loss; an unknown modality value is an error.
  std::fill(mod.begin() + gs, mod.end(), std::uint8_t{kPad});
  moe_forward<double>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(3), y.view(), ctx);
  for (index_t t = gs; t < N; ++t) CHECK(ctx.routes()[t * K] == -1);
  CHECK(ctx.stats.padding == gs + 7);
  mod[0] = 3;
  CHECK_THROWS_WITH_AS(moe_forward<double>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(3), y.view(), ctx),
                       doctest::Contains("modality value 3"), Error);
}

TEST_CASE("one large group: routes, losses, outputs and gradients are the same bits on 1 and 2 threads") {
  // The router and the loss terms spread a group's per-token work over the pool (moe/config.hpp kRowGrain);
  // every sum over tokens must stay in token order. 1500 tokens: six tasks of 256, the last one short.
  const index_t N = 1500, D = 24, M = 32;
  const int E = 8;
  Fixture<float> f(E, D, M, 41);
  Tensor<float> x(Shape{N, D}), dy(Shape{N, D});
  testing::fill_normal(x.view(), 42);
  testing::fill_normal(dy.view(), 43);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = N - 300; t < N; ++t) mod[static_cast<std::size_t>(t)] = kText;
  auto cfg = config(E, 2, 1.0, 0.0, true);
  cfg.losses.z_loss_weight = 0.01;
  cfg.losses.local_entropy_weight = {0.01, 0.02};
  cfg.losses.global_entropy_weight = {0.05, 0.05};
  cfg.losses.global_entropy_tau = {2.5, 2.5};  // above log 8, H(pbar)'s largest value: the term and its gradient are active
  struct Run {
    Tensor<float> y, dx, gwr, gw1, gb1, gw2, gb2;
    std::vector<std::int32_t> route;
    AuxLossValues losses;
  };
  auto copy_of = [](const Tensor<float>& t) {
    Tensor<float> c(t.shape());
    std::copy_n(t.data(), t.numel(), c.data());
    return c;
  };
  auto run = [&](int threads) {
    set_num_threads(threads);
    f.zero_grads();
    Run r{Tensor<float>(Shape{N, D}), Tensor<float>(Shape{N, D}), {}, {}, {}, {}, {}, {}, {}};
    MoeContext<float> ctx;
    moe_forward<float>(cfg, f.params(), x.view(), mod, Mode::Train, Rng(7), r.y.view(), ctx);
    moe_backward<float>(f.params(), x.view(), dy.view(), r.dx.view(), f.grads(), ctx);
    r.route.assign(ctx.routes().data(), ctx.routes().data() + N * 2);
    r.losses = ctx.losses;
    r.gwr = copy_of(f.gwr), r.gw1 = copy_of(f.gw1), r.gb1 = copy_of(f.gb1), r.gw2 = copy_of(f.gw2), r.gb2 = copy_of(f.gb2);
    return r;
  };
  const Run one = run(1), two = run(2);
  set_num_threads(0);
  auto same = [](const Tensor<float>& a, const Tensor<float>& b) {
    return a.numel() == b.numel() && std::equal(a.data(), a.data() + a.numel(), b.data());
  };
  CHECK(std::count(one.route.begin(), one.route.end(), -1) > 0);  // capacity 1.0 with K = 2: some drops
  CHECK(one.route == two.route);
  CHECK(one.losses.total == two.losses.total);
  CHECK(one.losses.load == two.losses.load);
  CHECK(one.losses.global_entropy[kText] > 0);
  CHECK(one.losses.local_entropy[kText] == two.losses.local_entropy[kText]);
  CHECK(one.losses.z == two.losses.z);
  CHECK(same(one.y, two.y));
  CHECK(same(one.dx, two.dx));
  CHECK(same(one.gwr, two.gwr));
  CHECK(same(one.gw1, two.gw1));
  CHECK(same(one.gb2, two.gb2));
}
