// Ops: the linear layer against a naive double loop, finite differences, the accumulate rule, shape errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limoe/limoe.hpp>
#include <limoe/ops/linear.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;
using testing::max_diff;
using testing::randn;


TEST_CASE("linear forward/backward: cpu matches the naive reference (double, float, threads)") {
  struct Case {
    Shape x;
    index_t O;
    bool bias;
  };
  // Odd sizes, a rank-3 input, and sizes above the gemm threading threshold (2 R I O > 4e6).
  const Case cases[] = {{Shape{7, 13}, 5, true}, {Shape{3, 7, 13}, 5, false}, {Shape{1, 1}, 1, true},
                        {Shape{2, 150, 96}, 160, true}, {Shape{40, 300}, 200, true}};
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (const Case& c : cases) {
      CAPTURE(c.x.str());
      CAPTURE(threads);
      const index_t I = c.x.back();
      Shape ys = c.x;
      ys[ys.rank() - 1] = c.O;
      auto x = randn<double>(c.x, 1), W = randn<double>(Shape{c.O, I}, 2, 0.3), b = randn<double>(Shape{c.O}, 3);
      auto dy = randn<double>(ys, 4);
      Tensor<double> y_ref(ys), dx_ref(c.x), dW_ref(W.shape()), db_ref(Shape{c.O});
      const CView<double> bias = c.bias ? b.cview() : CView<double>{};
      ref::linear_forward<double>(x, W, bias, y_ref);
      ref::linear_backward<double>(x, W, dy, dx_ref, dW_ref, db_ref);

      Tensor<double> y(ys), dx(c.x), dW(W.shape()), db(Shape{c.O});
      cpu::linear_forward<double>(x, W, bias, y);
      cpu::linear_backward<double>(x, W, dy, dx, dW, db);
      CHECK(max_diff(y, y_ref) < 1e-12);
      CHECK(max_diff(dx, dx_ref) < 1e-12);
      CHECK(max_diff(dW, dW_ref) < 1e-12);
      CHECK(max_diff(db, db_ref) < 1e-12);

      auto xf = Tensor<float>::copy_of(x.cview()), Wf = Tensor<float>::copy_of(W.cview());
      auto bf = Tensor<float>::copy_of(b.cview()), dyf = Tensor<float>::copy_of(dy.cview());
      Tensor<float> yf(ys), dxf(c.x), dWf(W.shape()), dbf(Shape{c.O});
      cpu::linear_forward<float>(xf, Wf, c.bias ? bf.cview() : CView<float>{}, yf);
      cpu::linear_backward<float>(xf, Wf, dyf, dxf, dWf, dbf);
      CHECK(max_diff(yf, y_ref) < 1e-5);
      CHECK(max_diff(dxf, dx_ref) < 1e-5);
      CHECK(max_diff(dWf, dW_ref) < 1e-5);
      CHECK(max_diff(dbf, db_ref) < 1e-5);
    }
  }
  set_num_threads(0);
}

TEST_CASE("linear gradients agree with central finite differences") {
  const index_t R = 7, I = 13, O = 5;
  auto x = randn<double>(Shape{R, I}, 11), W = randn<double>(Shape{O, I}, 12, 0.5), b = randn<double>(Shape{O}, 13);
  auto up = randn<double>(Shape{R, O}, 14);
  Tensor<double> y(Shape{R, O});
  auto loss = [&] {
    cpu::linear_forward<double>(x, W, b, y);
    return testing::dot<double, double>(y, up);
  };
  Tensor<double> dx(x.shape()), dW(W.shape()), db(b.shape());
  cpu::linear_backward<double>(x, W, up, dx, dW, db);
  auto rx = testing::check_gradient(x.view(), dx.cview(), loss);
  auto rW = testing::check_gradient(W.view(), dW.cview(), loss);
  auto rb = testing::check_gradient(b.view(), db.cview(), loss);
  INFO(rx.str(), " | ", rW.str(), " | ", rb.str());
  CHECK(rx.rel_error < 1e-8);
  CHECK(rW.rel_error < 1e-8);
  CHECK(rb.rel_error < 1e-8);
}

TEST_CASE("linear backward: parameter grads accumulate, dx is overwritten, empty views are skipped") {
  const index_t R = 6, I = 4, O = 3;
  auto x = randn<double>(Shape{R, I}, 21), W = randn<double>(Shape{O, I}, 22), dy = randn<double>(Shape{R, O}, 23);
  Tensor<double> dx(x.shape(), 7.0), dW(W.shape()), db(Shape{O});
  cpu::linear_backward<double>(x, W, dy, dx, dW, db);
  const Tensor<double> dx1 = dx, dW1 = dW, db1 = db;
  cpu::linear_backward<double>(x, W, dy, dx, dW, db);
  for (index_t i = 0; i < dx.numel(); ++i) CHECK(dx[i] == dx1[i]);
  for (index_t i = 0; i < dW.numel(); ++i) CHECK(dW[i] == doctest::Approx(2 * dW1[i]));
  for (index_t i = 0; i < db.numel(); ++i) CHECK(db[i] == doctest::Approx(2 * db1[i]));

  // Skipping dx and db leaves only dW touched.
  Tensor<double> dW2(W.shape());
  cpu::linear_backward<double>(x, W, dy, View<double>{}, dW2, View<double>{});
  for (index_t i = 0; i < dW2.numel(); ++i) CHECK(dW2[i] == doctest::Approx(dW1[i]));
}

TEST_CASE("linear: shape errors name the arguments and shapes") {
  Tensor<float> x(Shape{4, 3}), W(Shape{2, 5}), b(Shape{2}), y(Shape{4, 2});
  CHECK_THROWS_WITH_AS(cpu::linear_forward<float>(x, W, b, y), doctest::Contains("[4, 3]"), Error);
  Tensor<float> W2(Shape{2, 3}), b3(Shape{3}), y3(Shape{4, 3});
  CHECK_THROWS_WITH_AS(cpu::linear_forward<float>(x, W2, b3, y), doctest::Contains("bias"), Error);
  CHECK_THROWS_WITH_AS(cpu::linear_forward<float>(x, W2, b, y3), doctest::Contains("y [4, 3]"), Error);
  Tensor<float> dW(Shape{3, 2});
  CHECK_THROWS_WITH_AS(cpu::linear_backward<float>(x, W2, y, View<float>{}, dW, View<float>{}),
                       doctest::Contains("dW"), Error);
  CHECK_NOTHROW(cpu::linear_forward<float>(x, W2, CView<float>{}, y));
}
