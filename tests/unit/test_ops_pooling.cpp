// Pooling heads: gap / first / last against hand computations, the map head against the reference composition
// and a hand-built single-example case, and every gradient (tokens, probe, attention, LN, MLP) by central
// differences.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limoe/limoe.hpp>
#include <limoe/ops/pooling.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <vector>

using namespace limoe;

namespace {

// Every parameter of a map head with a gradient buffer of the same shape, in one list for the gradient checks.
struct MapParams {
  std::vector<Tensor<double>> val, grad;  // probe, q.w, q.b, k.w, k.b, v.w, v.b, o.w, o.b, ln.g, ln.b, fc1.w,
                                          // fc1.b, fc2.w, fc2.b
  MapParams(index_t D, index_t M, std::uint64_t seed) {
    const std::vector<Shape> shapes{Shape{D},    Shape{D, D}, Shape{D}, Shape{D, D}, Shape{D},
                                    Shape{D, D}, Shape{D},    Shape{D, D}, Shape{D}, Shape{D},
                                    Shape{D},    Shape{M, D}, Shape{M},    Shape{D, M}, Shape{D}};
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      val.emplace_back(shapes[i]);
      grad.emplace_back(shapes[i]);
      const double scale = shapes[i].rank() == 2 ? 1.0 / std::sqrt(double(shapes[i][1])) : 0.5;
      testing::fill_normal(val.back().view(), seed + i, scale);
    }
    for (index_t c = 0; c < D; ++c) val[9][c] += 1.0;  // LN gain around 1
  }
  MapHeadWeights<double> weights() const {
    auto c = [&](int i) { return val[std::size_t(i)].cview(); };
    return {c(0), {c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8)}, c(9), c(10), c(11), c(12), c(13), c(14)};
  }
  MapHeadGrads<double> grads() {
    auto g = [&](int i) { return grad[std::size_t(i)].view(); };
    return {g(0), {g(1), g(2), g(3), g(4), g(5), g(6), g(7), g(8)}, g(9), g(10), g(11), g(12), g(13), g(14)};
  }
};

}  // namespace

TEST_CASE("gap, first, last: forward by hand, masked mean, backward by finite differences") {
  const index_t B = 3, N = 4, D = 5;
  Tensor<double> x(Shape{B, N, D}), y(Shape{B, D});  // tokens, pooled
  testing::fill_normal(x.view(), 1);
  Tensor<std::uint8_t> mask = Tensor<std::uint8_t>::from(Shape{B, N}, {1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0});
  for (Pooling kind : {Pooling::Gap, Pooling::First, Pooling::Last})
    for (bool masked : {false, true}) {
      CAPTURE(pooling_name(kind));
      CAPTURE(masked);
      const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
      cpu::pool_forward<double>(kind, x.cview(), m, y.view());
      for (index_t b = 0; b < B; ++b)
        for (index_t c = 0; c < D; ++c) {
          double expect = 0;
          if (kind == Pooling::First) expect = x[(b * N) * D + c];
          else if (kind == Pooling::Last) {
            // The final position, or with a mask the last unmasked one (rows: 3, none -> N-1, 2).
            const index_t at = !masked ? N - 1 : (b == 0 ? 3 : b == 1 ? N - 1 : 2);
            expect = x[(b * N + at) * D + c];
          }
          else {
            double count = 0;
            for (index_t n = 0; n < N; ++n)
              if (!masked || mask[b * N + n]) {
                expect += x[(b * N + n) * D + c];
                count += 1;
              }
            expect = count > 0 ? expect / count : 0.0;  // row 1 is fully masked: 0
          }
          CHECK(y[b * D + c] == doctest::Approx(expect).epsilon(1e-14));
        }
      Tensor<double> r(Shape{B, D}), dx(Shape{B, N, D}, 5.0);  // upstream; dx garbage-filled (overwritten)
      testing::fill_normal(r.view(), 2);
      cpu::pool_backward<double>(kind, m, r.cview(), dx.view());
      auto loss = [&] {
        cpu::pool_forward<double>(kind, x.cview(), m, y.view());
        return testing::dot<double, double>(y.cview(), r.cview());
      };
      CHECK(testing::check_gradient(x.view(), dx.cview(), loss).rel_error < 1e-8);
    }
}

TEST_CASE("pooling: names, parse, errors") {
  for (Pooling p : {Pooling::Gap, Pooling::Map, Pooling::First, Pooling::Last}) CHECK(parse_pooling(pooling_name(p)) == p);
  CHECK_THROWS_WITH_AS(parse_pooling("cls"), doctest::Contains("gap, map, first, last"), Error);
  Tensor<double> x(Shape{2, 3, 4}), y(Shape{2, 4}), bad(Shape{2, 3});
  CHECK_THROWS_WITH_AS(cpu::pool_forward<double>(Pooling::Map, x.cview(), CView<std::uint8_t>{}, y.view()),
                       doctest::Contains("map_head_forward"), Error);
  CHECK_THROWS_AS(cpu::pool_forward<double>(Pooling::Gap, x.cview(), CView<std::uint8_t>{}, bad.view()), Error);
  Tensor<std::uint8_t> m(Shape{2, 4});
  CHECK_THROWS_WITH_AS(cpu::pool_forward<double>(Pooling::Gap, x.cview(), m.cview(), y.view()),
                       doctest::Contains("key_mask"), Error);
}

TEST_CASE("map head forward: matches the reference composition and a hand-built case") {
  const index_t B = 3, N = 5, D = 8, M = 12;
  MapParams p(D, M, 10);
  Tensor<double> x(Shape{B, N, D}), y(Shape{B, D}), y_ref(Shape{B, D});  // tokens, pooled
  testing::fill_normal(x.view(), 1);
  Tensor<std::uint8_t> mask(Shape{B, N}, 1);  // [B, N]
  mask[1] = mask[3] = mask[2 * N + 4] = 0;
  MapHeadCache<double> cache;
  for (GeluKind gk : {GeluKind::Erf, GeluKind::Tanh})
    for (int H : {1, 2, 4})
      for (bool masked : {false, true}) {
        const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
        cpu::map_head_forward<double>(p.weights(), H, gk, 1e-6, x.cview(), m, y.view(), cache);
        ref::map_head_forward<double>(p.weights(), H, gk, 1e-6, x.cview(), m, y_ref.view());
        double worst = 0;
        for (index_t i = 0; i < B * D; ++i) worst = std::max(worst, std::abs(y[i] - y_ref[i]));
        CHECK(worst < 1e-12);
      }

  // By hand, one head, one example: u = o(sum_j softmax_j(q.k_j / sqrt D) v_j), y = u + fc2(gelu(fc1(LN(u)))).
  const auto w = p.weights();
  auto lin = [](CView<double> W, CView<double> b, const std::vector<double>& in) {
    std::vector<double> out(std::size_t(W.dim(0)));
    for (index_t o = 0; o < W.dim(0); ++o) {
      out[std::size_t(o)] = b[o];
      for (index_t i = 0; i < W.dim(1); ++i) out[std::size_t(o)] += W[o * W.dim(1) + i] * in[std::size_t(i)];
    }
    return out;
  };
  std::vector<double> probe(w.probe.data(), w.probe.data() + D);
  const auto q = lin(w.attn.wq, w.attn.bq, probe);
  std::vector<std::vector<double>> v(static_cast<std::size_t>(N));
  std::vector<double> s(static_cast<std::size_t>(N), 0.0);
  double mx = -1e300, sum = 0;
  for (index_t j = 0; j < N; ++j) {
    std::vector<double> xj(x.data() + j * D, x.data() + (j + 1) * D);
    const auto k = lin(w.attn.wk, w.attn.bk, xj);
    v[std::size_t(j)] = lin(w.attn.wv, w.attn.bv, xj);
    for (index_t c = 0; c < D; ++c) s[std::size_t(j)] += q[std::size_t(c)] * k[std::size_t(c)] / std::sqrt(double(D));
    mx = std::max(mx, s[std::size_t(j)]);
  }
  for (auto& e : s) sum += (e = std::exp(e - mx));
  std::vector<double> ctx(static_cast<std::size_t>(D), 0.0);
  for (index_t j = 0; j < N; ++j)
    for (index_t c = 0; c < D; ++c) ctx[std::size_t(c)] += s[std::size_t(j)] / sum * v[std::size_t(j)][std::size_t(c)];
  const auto u = lin(w.attn.wo, w.attn.bo, ctx);
  double mean = 0, var = 0;
  for (double e : u) mean += e / double(D);
  for (double e : u) var += (e - mean) * (e - mean) / double(D);
  std::vector<double> ln(static_cast<std::size_t>(D));
  for (index_t c = 0; c < D; ++c)
    ln[std::size_t(c)] = (u[std::size_t(c)] - mean) / std::sqrt(var + 1e-6) * w.ln_g[c] + w.ln_b[c];
  auto h = lin(w.fc1_w, w.fc1_b, ln);
  for (auto& e : h) e = 0.5 * e * (1.0 + std::erf(e / std::sqrt(2.0)));
  const auto mlp = lin(w.fc2_w, w.fc2_b, h);
  cpu::map_head_forward<double>(w, 1, GeluKind::Erf, 1e-6, x.cview(), CView<std::uint8_t>{}, y.view(), cache);
  for (index_t c = 0; c < D; ++c) CHECK(y[c] == doctest::Approx(u[std::size_t(c)] + mlp[std::size_t(c)]).epsilon(1e-12));
}

TEST_CASE("map head inference forward (the probe's query folded into the key and value weights) matches the reference") {
  // MapHeadCache::inference: the same function as the attention of every token, summed in another order.
  const index_t B = 4, N = 7, M = 12;
  Tensor<std::uint8_t> mask(Shape{B, N}, 1);  // [B, N]: example 1 partly masked, example 2 fully masked
  mask[N + 1] = mask[N + 5] = 0;
  for (index_t j = 0; j < N; ++j) mask[2 * N + j] = 0;
  for (index_t D : {8, 24})
    for (int H : {1, 2, 4})
      for (bool masked : {false, true}) {
        CAPTURE(D);
        CAPTURE(H);
        CAPTURE(masked);
        MapParams p(D, M, 20 + static_cast<std::uint64_t>(D));
        Tensor<double> x(Shape{B, N, D}), y(Shape{B, D}), y_ref(Shape{B, D});  // tokens, pooled
        testing::fill_normal(x.view(), 2);
        const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
        ref::map_head_forward<double>(p.weights(), H, GeluKind::Erf, 1e-6, x.cview(), m, y_ref.view());
        MapHeadCache<double> cache;
        cache.inference = true;
        cpu::map_head_forward<double>(p.weights(), H, GeluKind::Erf, 1e-6, x.cview(), m, y.view(), cache);
        double worst = 0;
        for (index_t i = 0; i < B * D; ++i) worst = std::max(worst, std::abs(y[i] - y_ref[i]));
        CHECK(worst < 1e-12);
        // No backward after it: refused by name, nothing computed.
        Tensor<double> dy(Shape{B, D}, 1.0), dx(Shape{B, N, D});
        CHECK_THROWS_WITH_AS(cpu::map_head_backward<double>(p.weights(), H, GeluKind::Erf, x.cview(), m, cache,
                                                            dy.cview(), dx.view(), p.grads()),
                             doctest::Contains("inference forward"), Error);
        // In float, under fp32 and bf16, against the reference in double; 1 and 2 threads give the same bits.
        MapHeadWeights<float> wf;
        std::vector<Tensor<float>> vf;
        for (const auto& t : p.val) {
          vf.emplace_back(t.shape());
          for (index_t i = 0; i < t.numel(); ++i) vf.back()[i] = static_cast<float>(t[i]);
        }
        auto c = [&](int i) { return vf[std::size_t(i)].cview(); };
        wf = {c(0), {c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8)}, c(9), c(10), c(11), c(12), c(13), c(14)};
        Tensor<float> xf(x.shape()), yf(Shape{B, D}), yf2(Shape{B, D});
        for (index_t i = 0; i < x.numel(); ++i) xf[i] = static_cast<float>(x[i]);
        double scale = 0;
        for (index_t i = 0; i < B * D; ++i) scale = std::max(scale, std::abs(y_ref[i]));
        for (bool bf16 : {false, true}) {
          CAPTURE(bf16);
          MapHeadCache<float> cf;
          cf.inference = true;
          auto run = [&](Tensor<float>& out) {
            if (bf16)
              cpu::map_head_forward<float>(wf, H, GeluKind::Erf, 1e-6f, xf.cview(), m, out.view(), cf, Bf16Mixed{});
            else
              cpu::map_head_forward<float>(wf, H, GeluKind::Erf, 1e-6f, xf.cview(), m, out.view(), cf);
          };
          set_num_threads(1);
          run(yf);
          set_num_threads(2);
          run(yf2);
          set_num_threads(0);
          double err = 0;
          for (index_t i = 0; i < B * D; ++i) {
            err = std::max(err, std::abs(double(yf[i]) - y_ref[i]));
            CHECK(yf[i] == yf2[i]);
          }
          // fp32: a few ulp of the output's scale; bf16: the MLP's products round LN(u) and the weights to 8 bits
          CHECK(err < (bf16 ? 3e-2 : 2e-5) * scale);
        }
      }
}

TEST_CASE("map head gradients: tokens, probe, attention, LN and MLP weights by central differences") {
  const index_t B = 2, N = 4, D = 6, M = 8;
  for (int H : {1, 2})
    for (bool masked : {false, true}) {
      CAPTURE(H);
      CAPTURE(masked);
      MapParams p(D, M, 100 + H);
      Tensor<double> x(Shape{B, N, D}), y(Shape{B, D}), r(Shape{B, D});  // tokens, pooled, upstream
      testing::fill_normal(x.view(), 1);
      testing::fill_normal(r.view(), 2);
      Tensor<std::uint8_t> mask(Shape{B, N}, 1);  // [B, N]
      mask[2] = mask[N + 0] = mask[N + 3] = 0;
      const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
      MapHeadCache<double> cache;
      auto loss = [&] {
        cpu::map_head_forward<double>(p.weights(), H, GeluKind::Erf, 1e-6, x.cview(), m, y.view(), cache);
        return testing::dot<double, double>(y.cview(), r.cview());
      };
      loss();
      Tensor<double> dx(Shape{B, N, D}, 3.0);  // overwritten
      cpu::map_head_backward<double>(p.weights(), H, GeluKind::Erf, x.cview(), m, cache, r.cview(), dx.view(),
                                     p.grads());
      CHECK(testing::check_gradient(x.view(), dx.cview(), loss).rel_error < 1e-6);
      for (std::size_t i = 0; i < p.val.size(); ++i) {
        CAPTURE(i);
        const auto res = testing::check_gradient(p.val[i].view(), p.grad[i].cview(), loss);
        // Index 4 is the key bias: softmax ignores a per-row shift, so its true gradient is 0.
        if (i == 4) CHECK(res.max_abs_error < 1e-8);
        else CHECK(res.rel_error < 1e-6);
      }
      // Accumulation: a second backward doubles the probe gradient.
      const Tensor<double> once = p.grad[0];
      loss();  // the checks left the cache at a perturbed point
      cpu::map_head_backward<double>(p.weights(), H, GeluKind::Erf, x.cview(), m, cache, r.cview(), View<double>{},
                                     p.grads());
      for (index_t c = 0; c < D; ++c) CHECK(p.grad[0][c] == doctest::Approx(2 * once[c]).epsilon(1e-12));
    }
}
