// MoE layer backward against central finite differences in double (semantics §8, last item): input x,
// router weight (through the combine weights and the aux losses), fc1/fc2 weights and biases, with capacity
// drops and noise (fixed by the Rng, so identical between the +h and -h evaluations), with and without each
// auxiliary loss.
#include <doctest/doctest.h>

#include "test_moe_common.hpp"

using namespace moe_test;

namespace {
struct Case {
  const char* name;
  int K;
  double cf_train;
  Mode mode;
  index_t group;
  AuxLossConfig losses;
  double aux_scale = 1.0;  // the loss is <y, R> + aux_scale * (aux total); backward gets the same scale
};

AuxLossConfig only(int which) {
  AuxLossConfig c;
  c.importance_weight = which == 0 ? 0.3 : 0;
  c.load_weight = which == 1 ? 0.3 : 0;
  c.local_entropy_weight = which == 2 ? std::array<double, 2>{0.3, 0.2} : std::array<double, 2>{0, 0};
  c.global_entropy_weight = which == 3 ? std::array<double, 2>{0.3, 0.2} : std::array<double, 2>{0, 0};
  c.global_entropy_tau = {std::log(4.0), std::log(4.0)};  // above H(pbar) for E = 4 peaked gates: active hinge
  c.z_loss_weight = which == 4 ? 0.05 : 0;
  return c;
}

void run_case(const Case& cs) {
  const index_t N = 14, D = 5, M = 6;
  const int E = 4;
  Fixture<double> f(E, D, M, 31, 0.6, 1.5);
  Tensor<double> x(Shape{N, D}), R(Shape{N, D}), y(Shape{N, D}), dx(Shape{N, D});
  testing::fill_normal(x.view(), 17);
  testing::fill_normal(R.view(), 18);
  std::vector<std::uint8_t> mod(N, kImage);
  for (index_t t = 9; t < N; ++t) mod[t] = kText;
  auto cfg = config(E, cs.K, cs.cf_train, 0.0, true, 1.0, cs.group);
  cfg.losses = cs.losses;
  const Rng rng(123);
  MoeContext<double> ctx;
  // Scalar loss: <y, R> + aux_scale * aux total; backward with dy = R and the same aux_scale.
  auto loss = [&] {
    moe_forward<double>(cfg, f.params(), x.view(), mod, cs.mode, rng, y.view(), ctx);
    return testing::dot<double, double>(y.view(), R.view()) + cs.aux_scale * ctx.losses.total;
  };
  loss();
  const std::vector<std::int32_t> routes0(ctx.routes().data(), ctx.routes().data() + N * cs.K);
  f.zero_grads();
  moe_backward<double>(f.params(), x.view(), R.view(), dx.view(), f.grads(), ctx, cs.aux_scale);
  INFO(cs.name);
  if (cs.mode == Mode::Train && cs.cf_train < 1) CHECK(ctx.stats.drop_fraction[kImage] + ctx.stats.drop_fraction[kText] > 0);
  bool same_routes = true;
  auto checked_loss = [&] {
    const double v = loss();
    same_routes &= std::equal(routes0.begin(), routes0.end(), ctx.routes().data());
    return v;
  };
  const std::pair<const char*, std::pair<Tensor<double>*, Tensor<double>*>> items[] = {
      {"x", {&x, &dx}},         {"router", {&f.wr, &f.gwr}}, {"fc1.w", {&f.w1, &f.gw1}},
      {"fc1.b", {&f.b1, &f.gb1}}, {"fc2.w", {&f.w2, &f.gw2}},  {"fc2.b", {&f.b2, &f.gb2}}};
  for (const auto& [what, tensors] : items) {
    const auto r = testing::check_gradient(tensors.first->view(), tensors.second->cview(), checked_loss);
    INFO(what, " ", r.str());
    CHECK(r.rel_error < 1e-6);
  }
  CHECK(same_routes);
}
}  // namespace

TEST_CASE("layer gradients, no aux loss: train with noise and drops, eval dropless, K 1 and 2, groups") {
  run_case({"train K=1 drops", 1, 0.75, Mode::Train, 0, only(-1)});
  run_case({"train K=2 drops groups", 2, 0.6, Mode::Train, 7, only(-1)});
  run_case({"eval K=2 dropless", 2, 1.0, Mode::Eval, 0, only(-1)});
  run_case({"train K=3 dynamic", 3, 1.0, Mode::Train, 0, only(-1)});
}

TEST_CASE("layer gradients with each aux loss on its own, and all together") {
  const char* names[] = {"importance", "load", "local entropy", "global entropy", "z"};
  for (int which = 0; which < 5; ++which) {
    run_case({names[which], 2, 0.75, Mode::Train, 7, only(which)});
    run_case({names[which], 1, 1.0, Mode::Train, 0, only(which)});
  }
  AuxLossConfig all;  // the defaults, plus z
  all.z_loss_weight = 0.01;
  run_case({"all defaults", 2, 1.05, Mode::Train, 0, all});
  run_case({"all defaults eval", 1, 1.05, Mode::Eval, 0, all});
  // The aux losses entering the training loss with a coefficient other than 1 (the backward's aux_scale).
  run_case({"all defaults, aux scale 0.35", 2, 0.75, Mode::Train, 7, all, 0.35});
}

TEST_CASE("gradient rule: parameter grads accumulate, dx is overwritten, empty views are skipped") {
  const index_t N = 10, D = 4, M = 5;
  Fixture<double> f(4, D, M, 8);
  Tensor<double> x(Shape{N, D}), dy(Shape{N, D}), y(Shape{N, D}), dx(Shape{N, D}, 7.0);
  testing::fill_normal(x.view(), 1);
  testing::fill_normal(dy.view(), 2);
  MoeContext<double> ctx;
  const auto cfg = config(4, 2, 1.0, 0.0, true);
  moe_forward<double>(cfg, f.params(), x.view(), {}, Mode::Train, Rng(3), y.view(), ctx);
  f.zero_grads();
  moe_backward<double>(f.params(), x.view(), dy.view(), dx.view(), f.grads(), ctx);
  const Tensor<double> dx1 = dx, g1 = f.gw1, r1 = f.gwr;
  moe_backward<double>(f.params(), x.view(), dy.view(), dx.view(), f.grads(), ctx);
  for (index_t i = 0; i < dx.numel(); ++i) CHECK(dx[i] == dx1[i]);
  for (index_t i = 0; i < g1.numel(); ++i) CHECK(f.gw1[i] == doctest::Approx(2 * g1[i]));
  for (index_t i = 0; i < r1.numel(); ++i) CHECK(f.gwr[i] == doctest::Approx(2 * r1[i]));
  MoeGrads<double> none;
  moe_backward<double>(f.params(), x.view(), dy.view(), View<double>{}, none, ctx);  // nothing requested: no-op
  MoeContext<double> fresh;
  CHECK_THROWS_WITH_AS(moe_backward<double>(f.params(), x.view(), dy.view(), dx.view(), f.grads(), fresh),
                       doctest::Contains("moe_forward"), Error);
}
