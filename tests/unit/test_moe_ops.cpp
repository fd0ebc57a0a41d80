// The MoE layer's ops (moe/ops.hpp): each CPU op against its naive moe::ref:: twin on the same random inputs,
// forward and backward, on 1 and 2 threads, with drops, K = 2 and an expert that receives nothing; the plan's
// invariants; and the expert MLP's gradients against central finite differences.
#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include <limoe/core/parallel.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/moe/ops.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;
using moe::DispatchPlan;
using moe::ExpertGrads;
using moe::ExpertScratch;
using moe::ExpertWeights;


namespace {
// A route [N, K]: distinct experts per token, some choices dropped (-1), expert E-1 never chosen.
Tensor<std::int32_t> random_route(index_t N, int K, int E, std::uint64_t seed) {
  Tensor<std::int32_t> r(Shape{N, K});
  const Rng rng(seed);
  for (index_t t = 0; t < N; ++t)
    for (int k = 0; k < K; ++k) {
      std::int32_t e;
      bool taken;
      std::uint64_t i = 0;
      do {
        e = static_cast<std::int32_t>(rng.uniform(t, (k << 8) + i++) * (E - 1));
        taken = false;
        for (int j = 0; j < k; ++j) taken |= r[t * K + j] == e;
      } while (taken);
      r[t * K + k] = rng.uniform(t, 1000 + k) < 0.25 ? -1 : e;
    }
  return r;
}

double max_abs_diff(CView<double> a, CView<double> b) {
  REQUIRE(a.numel() == b.numel());
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

struct Weights {
  Tensor<double> w1, b1, w2, b2;
  Weights(int E, index_t D, index_t M, std::uint64_t seed)
      : w1(Shape{E, M, D}), b1(Shape{E, M}), w2(Shape{E, D, M}), b2(Shape{E, D}) {
    testing::fill_normal(w1.view(), seed, 0.5);
    testing::fill_normal(b1.view(), seed + 1, 0.1);
    testing::fill_normal(w2.view(), seed + 2, 0.5);
    testing::fill_normal(b2.view(), seed + 3, 0.1);
  }
  ExpertWeights<double> view() const { return {w1.cview(), b1.cview(), w2.cview(), b2.cview()}; }
};
}  // namespace

TEST_CASE("dispatch plan: cpu equals ref; blocks by expert in slot order; every accepted choice once") {
  for (int K : {1, 2, 3}) {
    CAPTURE(K);
    const int E = 5;
    const index_t N = 57;
    const auto route = random_route(N, K, E, 10 + K);
    DispatchPlan a, b;
    moe::cpu::make_dispatch_plan(route.cview(), E, a);
    moe::ref::make_dispatch_plan(route.cview(), E, b);
    REQUIRE(a.A == b.A);
    for (int e = 0; e <= E; ++e) CHECK(a.offsets[e] == b.offsets[e]);
    for (index_t r = 0; r < a.A; ++r) CHECK((a.row_token[r] == b.row_token[r] && a.row_slot[r] == b.row_slot[r]));
    for (index_t s = 0; s < N * K; ++s) CHECK(a.slot_row[s] == b.slot_row[s]);
    // Invariants, from the definition: row r of expert e's block holds a choice of e; slots increase inside a
    // block; slot_row and row_slot are inverse; dropped slots have no row; the unused expert has no rows.
    index_t accepted = 0;
    for (index_t s = 0; s < N * K; ++s) accepted += route[s] >= 0;
    CHECK(a.A == accepted);
    CHECK(a.rows_of(E - 1) == 0);
    for (int e = 0; e < E; ++e)
      for (index_t r = a.offsets[e]; r < a.offsets[e + 1]; ++r) {
        CHECK(route[a.row_slot[r]] == e);
        CHECK(a.row_token[r] == a.row_slot[r] / K);
        CHECK(a.slot_row[a.row_slot[r]] == r);
        if (r > a.offsets[e]) CHECK(a.row_slot[r] > a.row_slot[r - 1]);
      }
    for (index_t s = 0; s < N * K; ++s) CHECK((route[s] >= 0) == (a.slot_row[s] >= 0));
  }
  Tensor<std::int32_t> bad(Shape{2, 1});
  bad[0] = 0, bad[1] = 7;
  DispatchPlan p;
  CHECK_THROWS_WITH_AS(moe::cpu::make_dispatch_plan(bad.cview(), 4, p), doctest::Contains("route entry 7"), Error);
}

TEST_CASE("dispatch, expert MLP and combine: cpu equals ref, forward and backward, 1 and 2 threads") {
  const int E = 5;
  const index_t N = 300, D = 6, M = 10;  // > one 256-row tile for the busiest expert with K = 3
  for (int K : {1, 3})
    for (GeluKind gk : {GeluKind::Erf, GeluKind::Tanh})
      for (int threads : {1, 2}) {
        CAPTURE(K);
        CAPTURE(threads);
        set_num_threads(threads);
        const auto route = random_route(N, K, E, 20 + K);
        DispatchPlan plan;
        moe::cpu::make_dispatch_plan(route.cview(), E, plan);
        const index_t A = plan.A;
        const Weights w(E, D, M, 30);
        Tensor<double> x(Shape{N, D}), gates(Shape{N, E}), dy(Shape{N, D});
        testing::fill_normal(x.view(), 1), testing::fill_normal(gates.view(), 2, 0.3), testing::fill_normal(dy.view(), 3);
        ExpertScratch sc;

        Tensor<double> xe[2] = {Tensor<double>(Shape{A, D}), Tensor<double>(Shape{A, D})};
        moe::cpu::dispatch_forward<double>(plan, x.cview(), xe[0].view());
        moe::ref::dispatch_forward<double>(plan, x.cview(), xe[1].view());
        CHECK(max_abs_diff(xe[0].cview(), xe[1].cview()) == 0.0);

        Tensor<double> hp[2], h[2], ye[2];
        for (int i = 0; i < 2; ++i) hp[i] = Tensor<double>(Shape{A, M}), h[i] = Tensor<double>(Shape{A, M}), ye[i] = Tensor<double>(Shape{A, D});
        moe::cpu::expert_mlp_forward<double>(plan, w.view(), gk, xe[0].cview(), hp[0].view(), h[0].view(), ye[0].view(), sc);
        moe::ref::expert_mlp_forward<double>(plan, w.view(), gk, xe[0].cview(), hp[1].view(), h[1].view(), ye[1].view(), sc);
        CHECK(max_abs_diff(hp[0].cview(), hp[1].cview()) < 1e-12);
        CHECK(max_abs_diff(ye[0].cview(), ye[1].cview()) < 1e-12);

        Tensor<double> y[2] = {Tensor<double>(Shape{N, D}), Tensor<double>(Shape{N, D})};
        moe::cpu::combine_forward<double>(plan, gates.cview(), route.cview(), ye[0].cview(), y[0].view());
        moe::ref::combine_forward<double>(plan, gates.cview(), route.cview(), ye[0].cview(), y[1].view());
        CHECK(max_abs_diff(y[0].cview(), y[1].cview()) < 1e-13);
        for (index_t t = 0; t < N; ++t) {  // a token with no accepted choice gets 0
          bool any = false;
          for (int k = 0; k < K; ++k) any |= route[t * K + k] >= 0;
          if (!any)
            for (index_t d = 0; d < D; ++d) CHECK(y[0][t * D + d] == 0.0);
        }

        Tensor<double> dye[2], dg[2];
        for (int i = 0; i < 2; ++i) dye[i] = Tensor<double>(Shape{A, D}), dg[i] = Tensor<double>(Shape{A});
        moe::cpu::combine_backward<double>(plan, gates.cview(), route.cview(), ye[0].cview(), dy.cview(), dye[0].view(), dg[0].view());
        moe::ref::combine_backward<double>(plan, gates.cview(), route.cview(), ye[0].cview(), dy.cview(), dye[1].view(), dg[1].view());
        CHECK(max_abs_diff(dye[0].cview(), dye[1].cview()) < 1e-13);
        CHECK(max_abs_diff(dg[0].cview(), dg[1].cview()) < 1e-12);

        Tensor<double> dh[2], dxe[2], g[2][4];
        for (int i = 0; i < 2; ++i) {
          dh[i] = Tensor<double>(Shape{A, M}), dxe[i] = Tensor<double>(Shape{A, D});
          g[i][0] = Tensor<double>(Shape{E, M, D}), g[i][1] = Tensor<double>(Shape{E, M});
          g[i][2] = Tensor<double>(Shape{E, D, M}), g[i][3] = Tensor<double>(Shape{E, D});
          for (auto& t : g[i]) t.fill(0.5);  // gradients accumulate onto what is there
        }
        auto grads = [&](int i) { return ExpertGrads<double>{g[i][0].view(), g[i][1].view(), g[i][2].view(), g[i][3].view()}; };
        moe::cpu::expert_mlp_backward<double>(plan, w.view(), gk, xe[0].cview(), hp[0].cview(), h[0].cview(), dye[0].cview(),
                                         dh[0].view(), dxe[0].view(), grads(0), sc);
        moe::ref::expert_mlp_backward<double>(plan, w.view(), gk, xe[0].cview(), hp[0].cview(), h[0].cview(), dye[0].cview(),
                                         dh[1].view(), dxe[1].view(), grads(1), sc);
        CHECK(max_abs_diff(dxe[0].cview(), dxe[1].cview()) < 1e-12);
        for (int j = 0; j < 4; ++j) CHECK(max_abs_diff(g[0][j].cview(), g[1][j].cview()) < 1e-11);
        for (index_t i = 0; i < g[0][3].numel(); ++i)  // the unused expert's rows stay as they were
          if (i / D == E - 1) CHECK(g[0][3][i] == 0.5);

        Tensor<double> dx[2] = {Tensor<double>(Shape{N, D}), Tensor<double>(Shape{N, D})};
        dx[0].fill(1.0), dx[1].fill(1.0);  // dispatch_backward accumulates
        moe::cpu::dispatch_backward<double>(plan, dxe[0].cview(), dx[0].view());
        moe::ref::dispatch_backward<double>(plan, dxe[0].cview(), dx[1].view());
        CHECK(max_abs_diff(dx[0].cview(), dx[1].cview()) < 1e-13);
      }
  set_num_threads(0);
}

TEST_CASE("expert MLP and combine gradients against central finite differences") {
  const int E = 3, K = 2;
  const index_t N = 9, D = 4, M = 5;
  const auto route = random_route(N, K, E + 1, 40);  // experts 0..2 chosen (E + 1 - 1 = 3 values)
  DispatchPlan plan;
  moe::ref::make_dispatch_plan(route.cview(), E, plan);
  const index_t A = plan.A;
  Weights w(E, D, M, 50);
  Tensor<double> x(Shape{N, D}), gates(Shape{N, E}), up(Shape{N, D});
  testing::fill_normal(x.view(), 4), testing::fill_normal(gates.view(), 5, 0.3), testing::fill_normal(up.view(), 6);
  ExpertScratch sc;
  // loss = <up, combine(expert_mlp(dispatch(x)))>
  auto loss = [&] {
    Tensor<double> xe(Shape{A, D}), hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), y(Shape{N, D});
    moe::cpu::dispatch_forward<double>(plan, x.cview(), xe.view());
    moe::cpu::expert_mlp_forward<double>(plan, w.view(), GeluKind::Erf, xe.cview(), hp.view(), h.view(), ye.view(), sc);
    moe::cpu::combine_forward<double>(plan, gates.cview(), route.cview(), ye.cview(), y.view());
    return testing::dot(y.cview(), up.cview());
  };
  Tensor<double> xe(Shape{A, D}), hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), dye(Shape{A, D}), dg(Shape{A});
  Tensor<double> dh(Shape{A, M}), dxe(Shape{A, D}), dx(Shape{N, D});
  Tensor<double> gw1(Shape{E, M, D}), gb1(Shape{E, M}), gw2(Shape{E, D, M}), gb2(Shape{E, D});
  moe::cpu::dispatch_forward<double>(plan, x.cview(), xe.view());
  moe::cpu::expert_mlp_forward<double>(plan, w.view(), GeluKind::Erf, xe.cview(), hp.view(), h.view(), ye.view(), sc);
  moe::cpu::combine_backward<double>(plan, gates.cview(), route.cview(), ye.cview(), up.cview(), dye.view(), dg.view());
  moe::cpu::expert_mlp_backward<double>(plan, w.view(), GeluKind::Erf, xe.cview(), hp.cview(), h.cview(), dye.cview(),
                                   dh.view(), dxe.view(), {gw1.view(), gb1.view(), gw2.view(), gb2.view()}, sc);
  dx.zero();
  moe::cpu::dispatch_backward<double>(plan, dxe.cview(), dx.view());
  CHECK(testing::check_gradient(x.view(), dx.cview(), loss).rel_error < 1e-7);
  CHECK(testing::check_gradient(w.w1.view(), gw1.cview(), loss).rel_error < 1e-7);
  CHECK(testing::check_gradient(w.b1.view(), gb1.cview(), loss).rel_error < 1e-7);
  CHECK(testing::check_gradient(w.w2.view(), gw2.cview(), loss).rel_error < 1e-7);
  CHECK(testing::check_gradient(w.b2.view(), gb2.cview(), loss).rel_error < 1e-7);
  // d loss / d gate of each row, through the gate tensor.
  Tensor<double> dgates(Shape{N, E});
  dgates.zero();
  for (index_t r = 0; r < A; ++r) dgates[plan.row_token[r] * E + route[plan.row_slot[r]]] += dg[r];
  CHECK(testing::check_gradient(gates.view(), dgates.cview(), loss).rel_error < 1e-7);
}

// A batch without a capacity can send most of its tokens to one expert: expert_mlp_forward then cuts that
// expert's rows into several tiles about the mean tile's height (over twice the mean tile's rows; moe/ops.hpp).
// The tiles against Ref, in double and under the bf16 policy, on 1 and 2 threads, and the same bits on both
// thread counts.
TEST_CASE("expert MLP: an expert holding most of the rows is cut into several tiles; cpu equals ref, any thread count") {
  const int E = 4;
  const index_t N = 320, D = 256, M = 512;  // tiles of up to 256 rows (block_rows), so 4 before the cut
  Tensor<std::int32_t> route(Shape{N, 1});
  for (index_t t = 0; t < N; ++t) route[t] = t % 10 < 7 ? 1 : static_cast<std::int32_t>(t % 3 == 0 ? 0 : t % 3 == 1 ? 2 : 3);
  DispatchPlan plan;
  moe::cpu::make_dispatch_plan(route.cview(), E, plan);
  const index_t A = plan.A;
  REQUIRE(plan.rows_of(1) * E > 2 * A);  // the busy expert (224 of 320 rows) holds over twice the mean tile
  // The tiles: the busy expert's rows in 3 tiles of at most 80 (the mean), each other expert's in one.
  {
    Tensor<float> w1(Shape{E, M, D}), b1(Shape{E, M}), w2(Shape{E, D, M}), b2(Shape{E, D}), xe(Shape{A, D});
    for (Tensor<float>* t : {&w1, &b1, &w2, &b2, &xe}) t->zero();
    Tensor<float> hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D});
    ExpertScratch sc;
    moe::cpu::expert_mlp_forward<float>(plan, {w1.cview(), b1.cview(), w2.cview(), b2.cview()}, GeluKind::Erf,
                                        xe.cview(), hp.view(), h.view(), ye.view(), sc);
    std::vector<int> per_expert(E, 0);
    index_t covered = 0;
    for (const auto& tile : sc.tiles) {
      ++per_expert[static_cast<std::size_t>(tile.e)];
      CHECK(tile.r0 == covered);
      CHECK(tile.r1 - tile.r0 <= 80);
      if (tile.e == 1) CHECK(tile.r1 - tile.r0 >= moe::detail::kMinCutRows);
      covered = tile.r1;
    }
    CHECK(covered == A);
    CHECK(per_expert == std::vector<int>{1, 3, 1, 1});
  }
  auto run = [&]<class T, class P>(const P& prec, std::vector<T>& ye_cpu, std::vector<T>& h_cpu, std::vector<T>& ye_ref,
                                    int threads) {
    set_num_threads(threads);
    Tensor<T> w1(Shape{E, M, D}), b1(Shape{E, M}), w2(Shape{E, D, M}), b2(Shape{E, D}), xe(Shape{A, D});
    Tensor<double> tmp;
    for (Tensor<T>* t : {&w1, &b1, &w2, &b2, &xe}) {
      tmp = Tensor<double>(t->shape());
      testing::fill_normal(tmp.view(), 40 + t->numel(), t == &xe ? 1.0 : 0.1);
      for (index_t i = 0; i < t->numel(); ++i) (*t)[i] = static_cast<T>(tmp[i]);
    }
    const ExpertWeights<T> w{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
    Tensor<T> hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), hp_r(Shape{A, M}), h_r(Shape{A, M}), ye_r(Shape{A, D});
    ExpertScratch sc, sr;
    moe::cpu::expert_mlp_forward<T>(plan, w, GeluKind::Erf, xe.cview(), hp.view(), h.view(), ye.view(), sc, prec);
    moe::ref::expert_mlp_forward<T>(plan, w, GeluKind::Erf, xe.cview(), hp_r.view(), h_r.view(), ye_r.view(), sr, prec);
    ye_cpu.assign(ye.data(), ye.data() + ye.numel());
    h_cpu.assign(h.data(), h.data() + h.numel());
    ye_ref.assign(ye_r.data(), ye_r.data() + ye_r.numel());
  };
  auto max_diff = [](const auto& a, const auto& b) {
    double m = 0, big = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      m = std::max(m, std::abs(double(a[i]) - double(b[i]))), big = std::max(big, std::abs(double(b[i])));
    return m / std::max(big, 1e-30);
  };
  {
    std::vector<double> ye1, h1, r1, ye2, h2, r2;
    run.template operator()<double>(Fp32{}, ye1, h1, r1, 1);
    run.template operator()<double>(Fp32{}, ye2, h2, r2, 2);
    CHECK(max_diff(ye1, r1) < 1e-13);
    CHECK(ye1 == ye2);
    CHECK(h1 == h2);
  }
  {
    std::vector<float> ye1, h1, r1, ye2, h2, r2;
    run.template operator()<float>(Bf16Mixed{}, ye1, h1, r1, 1);
    run.template operator()<float>(Bf16Mixed{}, ye2, h2, r2, 2);
    CHECK(max_diff(ye1, r1) < 1e-3);  // the same rounded operands, fp32 sums in another order (docs/precision.md)
    CHECK(ye1 == ye2);
    CHECK(h1 == h2);
  }
  set_num_threads(0);
}

// Under bf16 the backward's weight gradients read xe and h as bf16: the forward's copies (each tile rounds its
// rows as it goes) when the backward is given the very tensors that forward read and wrote, else rounded
// again. Given copies of them at other addresses, after a forward on other rows into other tensors, or after an
// fp32 forward, the backward must give the bits it gives right after its own forward.
TEST_CASE("expert MLP backward under bf16: the forward's bf16 rows and hidden layer reused only for the same tensors") {
  const int E = 3;
  const index_t N = 96, D = 48, M = 80;
  const Tensor<std::int32_t> route = random_route(N, 1, E + 1, 77);
  DispatchPlan plan;
  moe::cpu::make_dispatch_plan(route.cview(), E + 1, plan);
  const index_t A = plan.A;
  REQUIRE(A > 0);
  auto randf = [](Shape s, std::uint64_t seed, double scale) {
    Tensor<double> d(s);
    testing::fill_normal(d.view(), seed, scale);
    Tensor<float> f(s);
    for (index_t i = 0; i < f.numel(); ++i) f[i] = static_cast<float>(d[i]);
    return f;
  };
  const Tensor<float> w1 = randf(Shape{E + 1, M, D}, 1, 0.2), b1 = randf(Shape{E + 1, M}, 2, 0.1);
  const Tensor<float> w2 = randf(Shape{E + 1, D, M}, 3, 0.2), b2 = randf(Shape{E + 1, D}, 4, 0.1);
  const Tensor<float> xe = randf(Shape{A, D}, 5, 1.0), other = randf(Shape{A, D}, 6, 1.0), dye = randf(Shape{A, D}, 7, 1.0);
  const ExpertWeights<float> w{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
  struct Out {
    Tensor<float> dh, dxe, gw1, gb1, gw2, gb2;
  };
  // The backward's outputs from (xe_in, hp, h) on scratch sc.
  auto backward = [&](ExpertScratch& sc, const Tensor<float>& xe_in, const Tensor<float>& hp, const Tensor<float>& h) {
    Out o{Tensor<float>(Shape{A, M}), Tensor<float>(Shape{A, D}), Tensor<float>(w1.shape()), Tensor<float>(b1.shape()),
          Tensor<float>(w2.shape()), Tensor<float>(b2.shape())};
    for (Tensor<float>* t : {&o.gw1, &o.gb1, &o.gw2, &o.gb2}) t->zero();
    moe::cpu::expert_mlp_backward<float>(plan, w, GeluKind::Erf, xe_in.cview(), hp.cview(), h.cview(), dye.cview(),
                                         o.dh.view(), o.dxe.view(),
                                         ExpertGrads<float>{o.gw1.view(), o.gb1.view(), o.gw2.view(), o.gb2.view()}, sc,
                                         Bf16Mixed{});
    return o;
  };
  auto same = [](const Out& a, const Out& b) {
    auto eq = [](const Tensor<float>& x, const Tensor<float>& y) {
      return std::equal(x.data(), x.data() + x.numel(), y.data());
    };
    return eq(a.dh, b.dh) && eq(a.dxe, b.dxe) && eq(a.gw1, b.gw1) && eq(a.gb1, b.gb1) && eq(a.gw2, b.gw2) &&
           eq(a.gb2, b.gb2);
  };
  Tensor<float> hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D});
  ExpertScratch sc;
  moe::cpu::expert_mlp_forward<float>(plan, w, GeluKind::Erf, xe.cview(), hp.view(), h.view(), ye.view(), sc, Bf16Mixed{});
  const Out own = backward(sc, xe, hp, h);
  const Tensor<float> xe_copy = xe, hp_copy = hp, h_copy = h;
  // The reference: the weight gradients against the double product of the rounded operands, so that `own`
  // itself is checked too (the rows and the hidden layer rounded to bf16: the policy's operands).
  {
    double worst = 0;
    for (index_t e = 0; e <= E; ++e)
      for (index_t j = 0; j < D; ++j)
        for (index_t m = 0; m < M; ++m) {
          double acc = 0;
          for (index_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r)
            acc += double(from_bf16(to_bf16(dye[r * D + j]))) * double(from_bf16(to_bf16(h[r * M + m])));
          worst = std::max(worst, std::abs(acc - double(own.gw2[(e * D + j) * M + m])) / (1.0 + std::abs(acc)));
        }
    CHECK(worst < 1e-5);
  }
  SUBCASE("copies at other addresses, after a forward on other rows into other tensors") {
    Tensor<float> hp2(Shape{A, M}), h2(Shape{A, M}), ye2(Shape{A, D});
    moe::cpu::expert_mlp_forward<float>(plan, w, GeluKind::Erf, other.cview(), hp2.view(), h2.view(), ye2.view(), sc,
                                        Bf16Mixed{});
    CHECK(same(backward(sc, xe_copy, hp_copy, h_copy), own));
  }
  SUBCASE("the same hidden layer's tensors, rewritten by an fp32 forward (which rounds nothing)") {
    moe::cpu::expert_mlp_forward<float>(plan, w, GeluKind::Erf, other.cview(), hp.view(), h.view(), ye.view(), sc);
    Tensor<float> hp3(Shape{A, M}), h3(Shape{A, M}), ye3(Shape{A, D});
    ExpertScratch fresh;
    moe::cpu::expert_mlp_forward<float>(plan, w, GeluKind::Erf, other.cview(), hp3.view(), h3.view(), ye3.view(), fresh);
    REQUIRE(std::equal(h.data(), h.data() + h.numel(), h3.data()));
    const Out want = backward(fresh, other, hp3, h3);
    CHECK(same(backward(sc, other, hp, h), want));
    CHECK(!same(want, own));
  }
  SUBCASE("the forward's tensors again after a backward on other values (which rounded its own copies)") {
    Tensor<float> hp2(Shape{A, M}), h2(Shape{A, M}), ye2(Shape{A, D});
    ExpertScratch other_scratch;
    moe::cpu::expert_mlp_forward<float>(plan, w, GeluKind::Erf, other.cview(), hp2.view(), h2.view(), ye2.view(),
                                        other_scratch, Bf16Mixed{});
    CHECK(!same(backward(sc, other, hp2, h2), own));
    CHECK(same(backward(sc, xe, hp, h), own));
  }
  SUBCASE("the forward's own tensors, twice") {
    CHECK(same(backward(sc, xe, hp, h), own));
  }
}
