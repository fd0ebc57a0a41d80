// Ops: LayerNorm, L2 normalisation, softmax and GELU against naive references and finite differences.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#include <limoe/limoe.hpp>
#include <limoe/ops/gelu.hpp>
#include <limoe/ops/l2norm.hpp>
#include <limoe/ops/layernorm.hpp>
#include <limoe/ops/softmax.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;
using testing::max_diff;
using testing::randn;

namespace {
Tensor<float> to_float(const Tensor<double>& t) { return Tensor<float>::copy_of(t.cview()); }
// Shapes: odd, and large enough (rows x width > the parallel grain) to split over 2 threads.
const Shape kShapes[] = {Shape{7, 13}, Shape{3, 5, 1}, Shape{2, 300, 96}, Shape{4, 37}};  // D (the last): below 16 lanes, a multiple of 16, 2 x 16 + a tail (core/reduce.hpp)
}  // namespace

// ---------------------------------------------------------------------------------------------------- layernorm

TEST_CASE("layernorm: cpu matches the reference (double, float, threads)") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (const Shape& s : kShapes) {
      CAPTURE(s.str());
      const index_t D = s.back(), R = s.numel() / D;
      // A large mean checks the two-pass variance.
      auto x = randn<double>(s, 1, 2.0), g = randn<double>(Shape{D}, 2), b = randn<double>(Shape{D}, 3);
      for (index_t i = 0; i < x.numel(); ++i) x[i] += 5.0;
      auto dy = randn<double>(s, 4);
      Tensor<double> y0(s), m0(Shape{R}), r0(Shape{R}), dx0(s), dg0(Shape{D}), db0(Shape{D});
      ref::layernorm_forward<double>(x, g, b, 1e-6, y0, m0, r0);
      ref::layernorm_backward<double>(x, g, m0, r0, dy, dx0, dg0, db0);
      Tensor<double> y(s), m(Shape{R}), r(Shape{R}), dx(s), dg(Shape{D}), db(Shape{D});
      cpu::layernorm_forward<double>(x, g, b, 1e-6, y, m, r);
      cpu::layernorm_backward<double>(x, g, m, r, dy, dx, dg, db);
      CHECK(max_diff(y, y0) < 1e-12);
      CHECK(max_diff(m, m0) < 1e-12);
      CHECK(max_diff(r, r0) < 1e-10);
      CHECK(max_diff(dx, dx0) < 1e-11);
      CHECK(max_diff(dg, dg0) < 1e-11);
      CHECK(max_diff(db, db0) < 1e-11);

      auto xf = to_float(x), gf = to_float(g), bf = to_float(b), dyf = to_float(dy);
      Tensor<float> yf(s), mf(Shape{R}), rf(Shape{R}), dxf(s), dgf(Shape{D}), dbf(Shape{D});
      cpu::layernorm_forward<float>(xf, gf, bf, 1e-6f, yf, mf, rf);
      cpu::layernorm_backward<float>(xf, gf, mf, rf, dyf, dxf, dgf, dbf);
      CHECK(max_diff(yf, y0) < 1e-5);
      CHECK(max_diff(dxf, dx0) < 1e-4);
      CHECK(max_diff(dgf, dg0) < 1e-4);
      CHECK(max_diff(dbf, db0) < 1e-4);
    }
  }
  set_num_threads(0);
}

TEST_CASE("layernorm: gradients by finite differences; accumulate rule; output statistics") {
  const index_t R = 5, D = 7;
  auto x = randn<double>(Shape{R, D}, 11), g = randn<double>(Shape{D}, 12), b = randn<double>(Shape{D}, 13);
  auto up = randn<double>(Shape{R, D}, 14);
  Tensor<double> y(x.shape()), m(Shape{R}), r(Shape{R});
  auto loss = [&] {
    cpu::layernorm_forward<double>(x, g, b, 1e-6, y, m, r);
    return testing::dot<double, double>(y, up);
  };
  loss();
  Tensor<double> dx(x.shape()), dg(g.shape()), db(b.shape());
  cpu::layernorm_backward<double>(x, g, m, r, up, dx, dg, db);
  auto rx = testing::check_gradient(x.view(), dx.cview(), loss);
  auto rg = testing::check_gradient(g.view(), dg.cview(), loss);
  auto rb = testing::check_gradient(b.view(), db.cview(), loss);
  INFO(rx.str(), " | ", rg.str(), " | ", rb.str());
  CHECK(rx.rel_error < 1e-7);
  CHECK(rg.rel_error < 1e-7);
  CHECK(rb.rel_error < 1e-7);

  loss();
  const Tensor<double> dx1 = dx, dg1 = dg, db1 = db;
  cpu::layernorm_backward<double>(x, g, m, r, up, dx, dg, db);
  for (index_t i = 0; i < dx.numel(); ++i) CHECK(dx[i] == dx1[i]);
  for (index_t i = 0; i < D; ++i) {
    CHECK(dg[i] == doctest::Approx(2 * dg1[i]));
    CHECK(db[i] == doctest::Approx(2 * db1[i]));
  }

  // With g = 1, b = 0 every row has mean 0 and (population) variance 1 - eps-ish.
  Tensor<double> ones(Shape{D}, 1.0);
  cpu::layernorm_forward<double>(x, ones, CView<double>{}, 0.0, y, m, r);
  for (index_t row = 0; row < R; ++row) {
    double s = 0, s2 = 0;
    for (index_t d = 0; d < D; ++d) s += y[row * D + d], s2 += y[row * D + d] * y[row * D + d];
    CHECK(s / D == doctest::Approx(0.0).epsilon(1e-12));
    CHECK(s2 / D == doctest::Approx(1.0).epsilon(1e-12));
  }
  // Inference: mean and rstd may be empty.
  Tensor<double> y_inf(x.shape());
  cpu::layernorm_forward<double>(x, ones, CView<double>{}, 0.0, y_inf, View<double>{}, View<double>{});
  for (index_t i = 0; i < y.numel(); ++i) CHECK(y_inf[i] == y[i]);
  Tensor<double> bad(Shape{D + 1});
  CHECK_THROWS_WITH_AS(cpu::layernorm_forward<double>(x, bad, CView<double>{}, 1e-6, y, m, r),
                       doctest::Contains("[5, 7]"), Error);
}

// ---------------------------------------------------------------------------------------------------- softmax

TEST_CASE("softmax: cpu matches the reference; rows sum to 1; large inputs stay finite") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (const Shape& s : kShapes) {
      CAPTURE(s.str());
      auto x = randn<double>(s, 31, 3.0), dy = randn<double>(s, 32);
      Tensor<double> y0(s), dx0(s), y(s), dx(s);
      ref::softmax_forward<double>(x, y0);
      ref::softmax_backward<double>(y0, dy, dx0);
      cpu::softmax_forward<double>(x, y);
      cpu::softmax_backward<double>(y, dy, dx);
      CHECK(max_diff(y, y0) < 1e-14);
      CHECK(max_diff(dx, dx0) < 1e-13);
      // Independent of limoe/math: exp / sum straight from the definition, and the backward through the full
      // Jacobian J_ij = y_i (delta_ij - y_j), dx_j = sum_i dy_i J_ij.
      {
        const index_t D = s.back(), R = x.numel() / D;
        Tensor<double> yn(s), dxn(s);
        for (index_t r = 0; r < R; ++r) {
          double sum = 0;
          for (index_t d = 0; d < D; ++d) sum += std::exp(x[r * D + d]);
          for (index_t d = 0; d < D; ++d) yn[r * D + d] = std::exp(x[r * D + d]) / sum;
          for (index_t j = 0; j < D; ++j) {
            double acc = 0;
            for (index_t i = 0; i < D; ++i)
              acc += dy[r * D + i] * yn[r * D + i] * ((i == j ? 1.0 : 0.0) - yn[r * D + j]);
            dxn[r * D + j] = acc;
          }
        }
        CHECK(max_diff(y0, yn) < 1e-13);
        CHECK(max_diff(dx0, dxn) < 1e-12);
      }
      auto xf = to_float(x), dyf = to_float(dy);
      Tensor<float> yf(s), dxf(s);
      cpu::softmax_forward<float>(xf, yf);
      cpu::softmax_backward<float>(yf, dyf, dxf);
      CHECK(max_diff(yf, y0) < 1e-6);
      CHECK(max_diff(dxf, dx0) < 1e-5);
    }
  }
  set_num_threads(0);

  auto big = Tensor<float>::from(Shape{2, 3}, {1e4f, -1e4f, 1e4f - 1.f, -3e4f, -3e4f, -3e4f});
  Tensor<float> y(big.shape());
  cpu::softmax_forward<float>(big, y);
  for (index_t r = 0; r < 2; ++r) {
    float s = 0;
    for (index_t d = 0; d < 3; ++d) {
      CHECK(std::isfinite(y[r * 3 + d]));
      s += y[r * 3 + d];
    }
    CHECK(s == doctest::Approx(1.0f).epsilon(1e-6));
  }
  CHECK(y[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(y[1] == 0.0f);
  CHECK(y[3] == doctest::Approx(1.0f / 3));

  // Rows longer than a vector with the large entry anywhere, the last ones included (the CPU takes a row's
  // maximum over whole vectors and then its tail): still finite, the large entry taking nearly all the mass.
  for (index_t n : {17, 40, 49}) {
    for (index_t at : {index_t{0}, n / 2, n - 1}) {
      INFO("n ", n, " at ", at);
      Tensor<float> row(Shape{1, n}), p(Shape{1, n});
      for (index_t j = 0; j < n; ++j) row[j] = static_cast<float>(j % 5);
      row[at] = 1e4f;
      cpu::softmax_forward<float>(row, p);
      CHECK(p[at] == doctest::Approx(1.0f).epsilon(1e-6));
      for (index_t j = 0; j < n; ++j) CHECK(std::isfinite(p[j]));
    }
  }

  // Masked (-inf) entries get 0; a fully masked row is all zeros rather than NaN.
  const float inf = std::numeric_limits<float>::infinity();
  auto masked = Tensor<float>::from(Shape{2, 3}, {0.f, -inf, 0.f, -inf, -inf, -inf});
  cpu::softmax_forward<float>(masked, y);
  CHECK(y[0] == 0.5f);
  CHECK(y[1] == 0.0f);
  CHECK(y[2] == 0.5f);
  for (index_t d = 3; d < 6; ++d) CHECK(y[d] == 0.0f);
  Tensor<float> y0(y.shape());
  ref::softmax_forward<float>(masked, y0);
  for (index_t d = 0; d < 6; ++d) CHECK(y0[d] == y[d]);
}

// The float exp behind the CPU softmaxes (ops/softmax.hpp's exp_in_place: Eigen's vectorised exp on every
// element, the last partial vector padded): within 2 ulp of std::exp at every length from 1 to 70 (every tail of
// a 16- or 8-wide vector), and an element's bits the same whatever its offset in the buffer (the router's gates
// and attention's rows are taken in blocks that start anywhere).
TEST_CASE("softmax's float exp: every element against std::exp at every length; bits independent of the offset") {
  std::vector<float> src(80), buf(80);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(-20.0 + 0.37 * static_cast<double>(i));
  auto ulps = [](float a, float b) { return std::abs(static_cast<double>(a) - b) / std::abs(std::nextafter(b, 0.f) - b); };
  std::vector<float> alone(src.size());
  for (std::size_t i = 0; i < src.size(); ++i) {
    alone[i] = src[i];
    detail::exp_in_place(&alone[i], 1);
  }
  double worst = 0;
  for (index_t n = 1; n <= 70; ++n) {
    for (index_t off : {0, 1, 3, 8}) {
      std::copy(src.begin(), src.end(), buf.begin());
      detail::exp_in_place(buf.data() + off, n);
      for (index_t i = 0; i < 80; ++i) {
        const std::size_t k = static_cast<std::size_t>(i);
        if (i < off || i >= off + n) {
          CHECK(buf[k] == src[k]);  // untouched outside
          continue;
        }
        worst = std::max(worst, ulps(buf[k], std::exp(src[k])));
        CHECK(buf[k] == alone[k]);
      }
    }
  }
  CHECK(worst <= 2.0);
}

// The float softmax's rows give the same bits wherever they lie: the map head's evaluation forward takes its
// scores in each thread's own scratch, so the same example's row sat at another alignment depending on which
// thread ran it, and Eigen's sum() (aligned packets from the first aligned element) gave another last bit.
TEST_CASE("softmax: a float row's probabilities do not depend on the buffer's alignment") {
  for (index_t n : {7, 17, 49, 64, 100}) {
    std::vector<float> src(static_cast<std::size_t>(3 * n));
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(std::sin(0.7 * static_cast<double>(i)) * 3.0);
    std::vector<float> first;
    for (index_t off = 0; off < 17; ++off) {
      INFO("n ", n, " offset ", off);
      std::vector<float> buf(src.size() + 17);
      std::copy(src.begin(), src.end(), buf.begin() + off);
      detail::softmax_rows_vec(buf.data() + off, buf.data() + off, 3, n, 0.125f);
      std::vector<float> got(buf.begin() + off, buf.begin() + off + 3 * n);
      if (off == 0) first = got;
      CHECK(std::memcmp(got.data(), first.data(), sizeof(float) * got.size()) == 0);
    }
  }
}

TEST_CASE("softmax: gradient by finite differences; dx may alias dy") {
  const index_t R = 4, D = 9;
  auto x = randn<double>(Shape{R, D}, 41), up = randn<double>(Shape{R, D}, 42);
  Tensor<double> y(x.shape()), dx(x.shape());
  auto loss = [&] {
    cpu::softmax_forward<double>(x, y);
    return testing::dot<double, double>(y, up);
  };
  loss();
  cpu::softmax_backward<double>(y, up, dx);
  auto r = testing::check_gradient(x.view(), dx.cview(), loss);
  INFO(r.str());
  CHECK(r.rel_error < 1e-7);
  loss();  // the checker leaves y at the last perturbed input
  cpu::softmax_backward<double>(y, up, dx);
  Tensor<double> inplace = up;
  cpu::softmax_backward<double>(y, inplace, inplace);
  for (index_t i = 0; i < dx.numel(); ++i) CHECK(inplace[i] == dx[i]);
}

// ---------------------------------------------------------------------------------------------------- l2 norm

TEST_CASE("l2 normalize: cpu matches the reference, unit norms, finite differences") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (const Shape& s : kShapes) {
      CAPTURE(s.str());
      const index_t R = s.numel() / s.back();
      auto u = randn<double>(s, 51), dz = randn<double>(s, 52);
      Tensor<double> z0(s), n0(Shape{R}), du0(s), z(s), n(Shape{R}), du(s);
      ref::l2_normalize_forward<double>(u, z0, n0);
      cpu::l2_normalize_forward<double>(u, z, n);
      cpu::l2_normalize_backward<double>(u, z, n, dz, du);
      CHECK(max_diff(z, z0) < 1e-14);
      CHECK(max_diff(n, n0) < 1e-13);
      if (s.back() <= 13) {  // the reference builds the full Jacobian
        ref::l2_normalize_backward<double>(u, z0, n0, dz, du0);
        CHECK(max_diff(du, du0) < 1e-12);
      }
      auto uf = to_float(u), dzf = to_float(dz);
      Tensor<float> zf(s), nf(Shape{R}), duf(s);
      cpu::l2_normalize_forward<float>(uf, zf, nf);
      cpu::l2_normalize_backward<float>(uf, zf, nf, dzf, duf);
      CHECK(max_diff(zf, z0) < 1e-6);
      CHECK(max_diff(duf, du) < 1e-5);
      for (index_t r = 0; r < R; ++r) {
        double ss = 0;
        for (index_t d = 0; d < s.back(); ++d) ss += z[r * s.back() + d] * z[r * s.back() + d];
        CHECK(std::abs(std::sqrt(ss) - n[r] / (n[r] + kL2NormEps)) < 1e-14);
      }
    }
  }
  set_num_threads(0);

  const index_t R = 3, D = 6;
  auto u = randn<double>(Shape{R, D}, 61), up = randn<double>(Shape{R, D}, 62);
  Tensor<double> z(u.shape()), n(Shape{R}), du(u.shape());
  auto loss = [&] {
    cpu::l2_normalize_forward<double>(u, z, n);
    return testing::dot<double, double>(z, up);
  };
  loss();
  cpu::l2_normalize_backward<double>(u, z, n, up, du);
  auto r = testing::check_gradient(u.view(), du.cview(), loss);
  INFO(r.str());
  CHECK(r.rel_error < 1e-7);

  // A zero row stays zero and finite (documented eps = 1e-8 in the denominator).
  Tensor<double> zero(Shape{1, 4}), zz(Shape{1, 4}), nn(Shape{1}), g(Shape{1, 4}, 1.0), dd(Shape{1, 4});
  cpu::l2_normalize_forward<double>(zero, zz, nn);
  cpu::l2_normalize_backward<double>(zero, zz, nn, g, dd);
  CHECK(nn[0] == 0.0);
  for (index_t i = 0; i < 4; ++i) CHECK(zz[i] == 0.0);
  for (index_t i = 0; i < 4; ++i) CHECK(std::isfinite(dd[i]));
  CHECK(kL2NormEps == 1e-8);
}

// ---------------------------------------------------------------------------------------------------- gelu

TEST_CASE("gelu: erf form is x Phi(x), tanh form differs slightly, cpu matches the reference") {
  auto x = randn<double>(Shape{5, 11}, 71, 2.0);
  Tensor<double> ye(x.shape()), yt(x.shape()), re(x.shape()), rt(x.shape());
  cpu::gelu_forward<double>(GeluKind::Erf, x, ye);
  cpu::gelu_forward<double>(GeluKind::Tanh, x, yt);
  ref::gelu_forward<double>(GeluKind::Erf, x, re);
  ref::gelu_forward<double>(GeluKind::Tanh, x, rt);
  double diff = 0;
  for (index_t i = 0; i < x.numel(); ++i) {
    const double phi = 0.5 * std::erfc(-x[i] / std::sqrt(2.0));
    CHECK(ye[i] == doctest::Approx(x[i] * phi).epsilon(1e-14));
    CHECK(re[i] == doctest::Approx(ye[i]).epsilon(1e-12));
    CHECK(rt[i] == doctest::Approx(yt[i]).epsilon(1e-12));
    diff = std::max(diff, std::abs(ye[i] - yt[i]));
  }
  CHECK(diff > 1e-5);  // the two kinds really differ
  CHECK(diff < 1e-2);  // but only slightly

  // Float, large enough to go parallel, and in place (y aliases x).
  set_num_threads(2);
  auto xb = randn<double>(Shape{300, 128}, 72, 3.0);
  for (GeluKind kind : {GeluKind::Erf, GeluKind::Tanh}) {
    Tensor<double> y0(xb.shape()), dx0(xb.shape());
    auto dy = randn<double>(xb.shape(), 73);
    ref::gelu_forward<double>(kind, xb, y0);
    ref::gelu_backward<double>(kind, xb, dy, dx0);
    auto xf = to_float(xb), dyf = to_float(dy);
    Tensor<float> yf(xb.shape()), dxf(xb.shape());
    cpu::gelu_forward<float>(kind, xf, yf);
    cpu::gelu_backward<float>(kind, xf, dyf, dxf);
    CHECK(max_diff(yf, y0) < 1e-6);
    CHECK(max_diff(dxf, dx0) < 1e-5);
    cpu::gelu_backward<float>(kind, xf, dyf, dyf);  // dx aliases dy
    for (index_t i = 0; i < dxf.numel(); ++i) REQUIRE(dyf[i] == dxf[i]);
  }
  set_num_threads(0);
}

TEST_CASE("gelu and fused bias-gelu: gradients by finite differences") {
  for (GeluKind kind : {GeluKind::Erf, GeluKind::Tanh}) {
    const index_t R = 4, M = 9;
    auto x = randn<double>(Shape{R, M}, 81, 2.0), up = randn<double>(Shape{R, M}, 82);
    Tensor<double> y(x.shape()), dx(x.shape());
    auto loss = [&] {
      cpu::gelu_forward<double>(kind, x, y);
      return testing::dot<double, double>(y, up);
    };
    cpu::gelu_backward<double>(kind, x, up, dx);
    auto r = testing::check_gradient(x.view(), dx.cview(), loss);
    INFO(r.str());
    CHECK(r.rel_error < 1e-8);

    // bias_gelu: pre = xW (given) + b, y = gelu(pre); d/db = row sums of gelu_backward(pre, up).
    auto b = randn<double>(Shape{M}, 83);
    Tensor<double> pre(x.shape()), y2(x.shape()), pre0(x.shape()), y0(x.shape());
    auto fused_loss = [&] {
      pre = x;
      cpu::bias_gelu_forward<double>(kind, b, pre, y2);
      return testing::dot<double, double>(y2, up);
    };
    fused_loss();
    pre0 = x;
    ref::bias_gelu_forward<double>(kind, b, pre0, y0);
    CHECK(max_diff(pre, pre0) < 1e-15);
    CHECK(max_diff(y2, y0) < 1e-14);
    for (index_t i = 0; i < x.numel(); ++i) CHECK(pre[i] == x[i] + b[i % M]);
    Tensor<double> dpre(x.shape()), dbias(Shape{M});
    cpu::gelu_backward<double>(kind, pre, up, dpre);
    for (index_t i = 0; i < dpre.numel(); ++i) dbias[i % M] += dpre[i];
    auto rb = testing::check_gradient(b.view(), dbias.cview(), fused_loss);
    auto rx = testing::check_gradient(x.view(), dpre.cview(), fused_loss);
    INFO(rb.str(), " | ", rx.str());
    CHECK(rb.rel_error < 1e-8);
    CHECK(rx.rel_error < 1e-8);
  }
  Tensor<float> p(Shape{2, 3}), y(Shape{2, 3}), b(Shape{4}), b3(Shape{3});
  CHECK_THROWS_WITH_AS(cpu::bias_gelu_forward<float>(GeluKind::Erf, b, p, y), doctest::Contains("[2, 3]"), Error);
  CHECK_THROWS_WITH_AS(cpu::bias_gelu_forward<float>(GeluKind::Erf, b3, p, p), doctest::Contains("alias"), Error);
  CHECK_THROWS_AS(cpu::gelu_forward<float>(GeluKind::Erf, p, View<float>{}), Error);
}
