// Ops: the symmetric contrastive loss (semantics §4 and 8): golden value, symmetry, reference,
// finite differences for the embeddings and the temperature, the clamp.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limoe/limoe.hpp>
#include <limoe/ops/contrastive.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;
using testing::max_diff;
using testing::randn;

namespace {
// Rows scaled to unit norm, like the model's embeddings.
Tensor<double> unit_rows(Shape s, std::uint64_t seed) {
  auto t = randn<double>(s, seed);
  const index_t P = s[1];
  for (index_t i = 0; i < s[0]; ++i) {
    double n = 0;
    for (index_t p = 0; p < P; ++p) n += t[i * P + p] * t[i * P + p];
    for (index_t p = 0; p < P; ++p) t[i * P + p] /= std::sqrt(n);
  }
  return t;
}
}  // namespace

TEST_CASE("contrastive: semantics §8 golden value, t = 1, orthonormal pairs: log(n - 1 + e) - 1") {
  for (index_t n : {2, 4, 7}) {
    Tensor<double> z(Shape{n, n + 1});  // orthonormal rows: unit vectors e_i
    for (index_t i = 0; i < n; ++i) z[i * (n + 1) + i] = 1.0;
    Tensor<double> logits(Shape{n, n});
    const auto r = cpu::contrastive_forward<double>(z, z, 0.0, 0.0, logits);
    CHECK(r.loss == doctest::Approx(std::log(static_cast<double>(n) - 1 + std::exp(1.0)) - 1).epsilon(1e-14));
    CHECK(r.scale == 1.0);
    CHECK(r.accuracy_i2t == 1.0);
    CHECK(r.accuracy_t2i == 1.0);
    if (n == 4) CHECK(r.loss == doctest::Approx(0.7437).epsilon(1e-4));
    const auto r0 = ref::contrastive_forward<double>(z, z, 0.0, 0.0, logits);
    CHECK(r0.loss == doctest::Approx(r.loss).epsilon(1e-14));
    auto zf = Tensor<float>::copy_of(z.cview());
    Tensor<float> lf(Shape{n, n});
    CHECK(cpu::contrastive_forward<float>(zf, zf, 0.f, 0.f, lf).loss == doctest::Approx(r.loss).epsilon(1e-6));
  }
}

TEST_CASE("contrastive: symmetric under swapping images and texts; accuracies swap; matches the reference") {
  const index_t n = 9, P = 6;
  auto zi = unit_rows(Shape{n, P}, 1), zt = unit_rows(Shape{n, P}, 2);
  // Make a few pairs match so the accuracies are neither 0 nor 1 and differ between directions.
  for (index_t p = 0; p < P; ++p) zt[0 * P + p] = zi[0 * P + p], zt[3 * P + p] = zi[3 * P + p];
  const double theta = std::log(10.0);
  Tensor<double> l1(Shape{n, n}), l2(Shape{n, n}), l0(Shape{n, n});
  const auto a = cpu::contrastive_forward<double>(zi, zt, theta, 100.0, l1);
  const auto b = cpu::contrastive_forward<double>(zt, zi, theta, 100.0, l2);
  const auto c = ref::contrastive_forward<double>(zi, zt, theta, 100.0, l0);
  CHECK(a.loss == doctest::Approx(b.loss).epsilon(1e-14));
  CHECK(a.accuracy_i2t == b.accuracy_t2i);
  CHECK(a.accuracy_t2i == b.accuracy_i2t);
  CHECK(a.accuracy_i2t >= 2.0 / n);
  CHECK(a.loss == doctest::Approx(c.loss).epsilon(1e-13));
  CHECK(a.accuracy_i2t == c.accuracy_i2t);
  CHECK(a.accuracy_t2i == c.accuracy_t2i);
  CHECK(a.scale == doctest::Approx(10.0).epsilon(1e-14));
  CHECK(max_diff(l1, l0) < 1e-13);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < n; ++j) CHECK(l1[i * n + j] == doctest::Approx(l2[j * n + i]).epsilon(1e-14));

  // Backward: swapping swaps the gradients.
  Tensor<double> dzi(zi.shape()), dzt(zt.shape()), ezi(zi.shape()), ezt(zt.shape());
  double ta = 0, tb = 0;
  cpu::contrastive_backward<double>(zi, zt, theta, 100.0, l1, 1.0, dzi, dzt, &ta);
  cpu::contrastive_backward<double>(zt, zi, theta, 100.0, l2, 1.0, ezt, ezi, &tb);
  CHECK(max_diff(dzi, Tensor<double>(ezi)) < 1e-14);
  CHECK(max_diff(dzt, Tensor<double>(ezt)) < 1e-14);
  CHECK(ta == doctest::Approx(tb).epsilon(1e-13));
}

TEST_CASE("contrastive: cpu matches the reference in double and float, with threads") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (index_t n : {5, 200}) {
      CAPTURE(n);
      const index_t P = n == 5 ? 3 : 64;  // n = 200, P = 64: 2 n^2 P > 4e6, the threaded gemm path
      auto zi = unit_rows(Shape{n, P}, 10 + n), zt = unit_rows(Shape{n, P}, 20 + n);
      const double theta = 1.7, dloss = 0.8;
      Tensor<double> l0(Shape{n, n}), l(Shape{n, n});
      const auto r0 = ref::contrastive_forward<double>(zi, zt, theta, 0.0, l0);
      const auto r = cpu::contrastive_forward<double>(zi, zt, theta, 0.0, l);
      CHECK(r.loss == doctest::Approx(r0.loss).epsilon(1e-12));
      CHECK(r.accuracy_i2t == r0.accuracy_i2t);
      CHECK(r.accuracy_t2i == r0.accuracy_t2i);
      Tensor<double> di0(zi.shape()), dt0(zt.shape()), di(zi.shape()), dt(zt.shape());
      double th0 = 0.25, th = 0.25;
      ref::contrastive_backward<double>(zi, zt, theta, 0.0, l0, dloss, di0, dt0, &th0);
      cpu::contrastive_backward<double>(zi, zt, theta, 0.0, l, dloss, di, dt, &th);
      CHECK(max_diff(di, di0) < 1e-13);
      CHECK(max_diff(dt, dt0) < 1e-13);
      CHECK(th == doctest::Approx(th0).epsilon(1e-12));

      auto zif = Tensor<float>::copy_of(zi.cview()), ztf = Tensor<float>::copy_of(zt.cview());
      Tensor<float> lf(Shape{n, n}), dif(zi.shape()), dtf(zt.shape());
      float thf = 0.25f;
      const auto rf = cpu::contrastive_forward<float>(zif, ztf, float(theta), 0.f, lf);
      cpu::contrastive_backward<float>(zif, ztf, float(theta), 0.f, lf, float(dloss), dif, dtf, &thf);
      CHECK(rf.loss == doctest::Approx(r0.loss).epsilon(1e-5));
      CHECK(max_diff(dif, di0) < 1e-5);
      CHECK(max_diff(dtf, dt0) < 1e-5);
      CHECK(thf == doctest::Approx(th0).epsilon(1e-4));
    }
  }
  set_num_threads(0);
}

TEST_CASE("contrastive: gradients of zi, zt and theta by finite differences; accumulate rule") {
  const index_t n = 6, P = 5;
  auto zi = unit_rows(Shape{n, P}, 31), zt = unit_rows(Shape{n, P}, 32);
  Tensor<double> theta(Shape{1}, std::log(3.0));
  Tensor<double> logits(Shape{n, n});
  const double dloss = 1.3;
  auto loss = [&] { return dloss * cpu::contrastive_forward<double>(zi, zt, theta[0], 0.0, logits).loss; };
  loss();
  Tensor<double> dzi(zi.shape(), 9.0), dzt(zt.shape(), 9.0), dth(Shape{1});
  cpu::contrastive_backward<double>(zi, zt, theta[0], 0.0, logits, dloss, dzi, dzt, &dth[0]);
  auto ri = testing::check_gradient(zi.view(), dzi.cview(), loss);
  auto rt = testing::check_gradient(zt.view(), dzt.cview(), loss);
  auto rth = testing::check_gradient(theta.view(), dth.cview(), loss);
  INFO(ri.str(), " | ", rt.str(), " | ", rth.str());
  CHECK(ri.rel_error < 1e-8);
  CHECK(rt.rel_error < 1e-8);
  CHECK(rth.rel_error < 1e-8);

  // dzi, dzt overwritten, dtheta accumulated; empty views skipped, null dtheta allowed.
  loss();
  const Tensor<double> dzi1 = dzi;
  const double dth1 = dth[0];
  cpu::contrastive_backward<double>(zi, zt, theta[0], 0.0, logits, dloss, dzi, View<double>{}, &dth[0]);
  for (index_t i = 0; i < dzi.numel(); ++i) CHECK(dzi[i] == dzi1[i]);
  CHECK(dth[0] == doctest::Approx(2 * dth1));
  CHECK_NOTHROW(cpu::contrastive_backward<double>(zi, zt, theta[0], 0.0, logits, dloss, View<double>{},
                                                  View<double>{}, nullptr));
}

TEST_CASE("contrastive: the clamp t <= max_scale caps the scale and stops the theta gradient") {
  const index_t n = 4, P = 3;
  auto zi = unit_rows(Shape{n, P}, 41), zt = unit_rows(Shape{n, P}, 42);
  Tensor<double> logits(Shape{n, n}), dzi(zi.shape()), dzt(zt.shape());
  const double theta = std::log(200.0);
  const auto clamped = cpu::contrastive_forward<double>(zi, zt, theta, 100.0, logits);
  CHECK(clamped.scale == 100.0);
  double dth = 0.5;
  cpu::contrastive_backward<double>(zi, zt, theta, 100.0, logits, 1.0, dzi, dzt, &dth);
  CHECK(dth == 0.5);  // nothing added: the clamp is a constant in theta
  // The loss equals the unclamped loss at t = 100.
  Tensor<double> l2(Shape{n, n});
  const auto at100 = cpu::contrastive_forward<double>(zi, zt, std::log(100.0), 0.0, l2);
  CHECK(clamped.loss == doctest::Approx(at100.loss).epsilon(1e-12));
  // Below the cap the clamp changes nothing and the gradient flows.
  const auto free = cpu::contrastive_forward<double>(zi, zt, std::log(50.0), 100.0, logits);
  CHECK(free.scale == doctest::Approx(50.0).epsilon(1e-14));
  cpu::contrastive_backward<double>(zi, zt, std::log(50.0), 100.0, logits, 1.0, dzi, dzt, &dth);
  CHECK(dth != 0.5);
  // No clamp when max_scale <= 0.
  CHECK(cpu::contrastive_forward<double>(zi, zt, theta, 0.0, logits).scale == doctest::Approx(200.0).epsilon(1e-12));
  Tensor<double> bad(Shape{n + 1, P});
  CHECK_THROWS_WITH_AS(cpu::contrastive_forward<double>(zi, bad, 0.0, 0.0, logits), doctest::Contains("zt"), Error);
}
