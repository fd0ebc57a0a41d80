// Multi-head attention: cpu vs the naive reference, head slicing, masks, finite-difference gradients of every
// input and parameter, thread-count invariance, cache reuse, errors.
#include <doctest/doctest.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <limoe/limoe.hpp>
#include <limoe/ops/attention.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <vector>

using namespace limoe;

namespace {

// q/k/v/o weights and biases of one attention layer, with matching gradient buffers.
template <class T>
struct Params {
  Tensor<T> w[4], b[4], gw[4], gb[4];  // order q, k, v, o
  Params(index_t D, std::uint64_t seed) {
    for (int i = 0; i < 4; ++i) {
      w[i] = Tensor<T>(Shape{D, D});
      b[i] = Tensor<T>(Shape{D});
      gw[i] = Tensor<T>(Shape{D, D});
      gb[i] = Tensor<T>(Shape{D});
      testing::fill_normal(w[i].view(), seed + 10 * i, 1.0 / std::sqrt(double(D)));
      testing::fill_normal(b[i].view(), seed + 10 * i + 1, 0.3);
    }
  }
  AttentionWeights<T> weights() const {
    return {w[0].cview(), b[0].cview(), w[1].cview(), b[1].cview(),
            w[2].cview(), b[2].cview(), w[3].cview(), b[3].cview()};
  }
  AttentionGrads<T> grads() {
    return {gw[0].view(), gb[0].view(), gw[1].view(), gb[1].view(),
            gw[2].view(), gb[2].view(), gw[3].view(), gb[3].view()};
  }
};

Tensor<std::uint8_t> make_mask(index_t B, index_t N, std::uint64_t seed, bool one_row_all_masked) {
  Tensor<std::uint8_t> m(Shape{B, N});  // [B, N]
  const Rng rng(seed);
  for (index_t i = 0; i < B * N; ++i) m[i] = rng.uniform(0, std::uint64_t(i)) < 0.65 ? 1 : 0;
  for (index_t b = 0; b < B; ++b) m[b * N] = 1;  // keep at least one key per row
  if (one_row_all_masked)
    for (index_t n = 0; n < N; ++n) m[(B - 1) * N + n] = 0;
  return m;
}

double max_abs_diff(CView<double> a, CView<double> b) {
  double w = 0;
  for (index_t i = 0; i < a.numel(); ++i) w = std::max(w, std::abs(a[i] - b[i]));
  return w;
}

}  // namespace

TEST_CASE("attention forward: cpu matches the naive reference (self, cross, masks, heads)") {
  const index_t B = 3, D = 12;
  for (int H : {1, 2, 3, 4, 6, 12})
    for (bool cross : {false, true})
      for (int mask_mode : {0, 1, 2}) {  // none, partial, partial with one row fully masked
        CAPTURE(H);
        CAPTURE(cross);
        CAPTURE(mask_mode);
        const index_t Nq = cross ? 3 : 5, Nk = 5;
        Params<double> p(D, 100 + H);
        Tensor<double> xkv(Shape{B, Nk, D}), xq(Shape{B, Nq, D});  // tokens, queries
        testing::fill_normal(xkv.view(), 1);
        testing::fill_normal(xq.view(), 2);
        const CView<double> q = cross ? xq.cview() : xkv.cview();
        Tensor<std::uint8_t> mask;
        if (mask_mode) mask = make_mask(B, Nk, 7, mask_mode == 2);
        Tensor<double> y(Shape{B, Nq, D}), y_ref(Shape{B, Nq, D});  // outputs
        AttentionCache<double> cache;
        cpu::attention_forward<double>(p.weights(), H, q, xkv.cview(), mask.cview(), y.view(), cache);
        ref::attention_forward<double>(p.weights(), H, q, xkv.cview(), mask.cview(), y_ref.view());
        CHECK(max_abs_diff(y.cview(), y_ref.cview()) < 1e-12);
      }
}

// In float the heads run on AVX-512's fp32 kernel where the processor has it (core/fma512.hpp; keys and values
// transposed per image, probabilities and score gradients per head, score rows in column panels of 64, the last
// vector masked): head widths 12 to 80, key counts on both sides of 16, 49 and 64 (two panels), a key mask with a
// fully masked row, cross-attention; forward and backward (inputs', weights' and biases' gradients) against the
// reference in double, and the same bits on 1 and 2 threads.
TEST_CASE("attention in float: cpu matches the reference in double at head widths 12 to 80, forward and backward") {
  for (const auto& [D, H, Nk] : {std::tuple<index_t, int, index_t>{48, 4, 7}, {64, 4, 17}, {128, 2, 49}, {96, 4, 50},
                                 {160, 2, 70}, {64, 1, 33}}) {
    for (bool cross : {false, true}) {
      const index_t B = 3, Nq = cross ? 5 : Nk;
      Params<double> pd(D, 300 + D);
      Params<float> pf(D, 300 + D);
      for (int i = 0; i < 4; ++i) {
        for (index_t j = 0; j < pd.w[i].numel(); ++j) pd.w[i][j] = static_cast<double>(pf.w[i][j]);
        for (index_t j = 0; j < pd.b[i].numel(); ++j) pd.b[i][j] = static_cast<double>(pf.b[i][j]);
      }
      Tensor<float> xkv(Shape{B, Nk, D}), xq(Shape{B, Nq, D});
      testing::fill_normal(xkv.view(), 5);
      testing::fill_normal(xq.view(), 6);
      Tensor<double> xkv_d(xkv.shape()), xq_d(xq.shape());
      for (index_t j = 0; j < xkv.numel(); ++j) xkv_d[j] = xkv[j];
      for (index_t j = 0; j < xq.numel(); ++j) xq_d[j] = xq[j];
      const Tensor<std::uint8_t> mask = make_mask(B, Nk, 9, true);
      Tensor<float> dy(Shape{B, Nq, D});
      testing::fill_normal(dy.view(), 8);
      Tensor<double> dy_d(dy.shape());
      for (index_t j = 0; j < dy.numel(); ++j) dy_d[j] = dy[j];
      Tensor<double> y_ref(Shape{B, Nq, D}), dxq_ref(xq.shape()), dxkv_ref(xkv.shape());
      {
        AttentionCache<double> cache;
        ref::attention_forward<double>(pd.weights(), H, cross ? xq_d.cview() : xkv_d.cview(), xkv_d.cview(),
                                       mask.cview(), y_ref.view(), cache);
        ref::attention_backward<double>(pd.weights(), H, cross ? xq_d.cview() : xkv_d.cview(), xkv_d.cview(),
                                        mask.cview(), cache, dy_d.cview(), cross ? dxq_ref.view() : dxkv_ref.view(),
                                        dxkv_ref.view(), pd.grads());
      }
      // Relative to the largest entry of each reference tensor (fp32 sums over up to 160 terms).
      auto close = [](const auto& got, const auto& want) {
        double worst = 0, big = 0;
        for (index_t j = 0; j < want.numel(); ++j)
          worst = std::max(worst, std::abs(double(got[j]) - double(want[j]))), big = std::max(big, std::abs(double(want[j])));
        return worst <= 2e-5 * big;
      };
      std::vector<float> first;
      for (int threads : {1, 2}) {
        set_num_threads(threads);
        CAPTURE(D);
        CAPTURE(H);
        CAPTURE(Nk);
        CAPTURE(cross);
        CAPTURE(threads);
        Tensor<float> y(Shape{B, Nq, D}), dxq(xq.shape()), dxkv(xkv.shape());
        Params<float> g = pf;  // its gradient buffers start at zero
        AttentionCache<float> cache;
        cpu::attention_forward<float>(pf.weights(), H, cross ? xq.cview() : xkv.cview(), xkv.cview(), mask.cview(),
                                      y.view(), cache);
        cpu::attention_backward<float>(pf.weights(), H, cross ? xq.cview() : xkv.cview(), xkv.cview(), mask.cview(),
                                       cache, dy.cview(), cross ? dxq.view() : dxkv.view(), dxkv.view(), g.grads());
        CHECK(close(y, y_ref));
        CHECK(close(dxkv, dxkv_ref));
        if (cross) CHECK(close(dxq, dxq_ref));
        for (int i = 0; i < 4; ++i) {
          CAPTURE(i);
          CHECK(close(g.gw[i], pd.gw[i]));
          if (i != 1) CHECK(close(g.gb[i], pd.gb[i]));  // bk's true gradient is 0: only rounding noise
        }
        std::vector<float> all(y.data(), y.data() + y.numel());
        all.insert(all.end(), dxkv.data(), dxkv.data() + dxkv.numel());
        for (int i = 0; i < 4; ++i) all.insert(all.end(), g.gw[i].data(), g.gw[i].data() + g.gw[i].numel());
        if (threads == 1) first = all;
        else CHECK(first == all);
      }
    }
  }
  set_num_threads(0);
}

TEST_CASE("attention: head h reads rows h*D/H .. (h+1)*D/H of Wq, Wk, Wv") {
  // Zero the query rows (and bias) of every head but head 1: those heads see equal scores, attend uniformly,
  // and their context columns are the mean of their value columns. Head 1 must not.
  const index_t B = 2, N = 6, D = 12;
  const int H = 3;
  const index_t Dh = D / H;
  Params<double> p(D, 5);
  for (index_t r = 0; r < D; ++r)
    if (r / Dh != 1) {
      p.b[0][r] = 0;
      for (index_t c = 0; c < D; ++c) p.w[0][r * D + c] = 0;
    }
  Tensor<double> x(Shape{B, N, D}), y(Shape{B, N, D});  // tokens, output
  testing::fill_normal(x.view(), 3);
  AttentionCache<double> cache;
  cpu::self_attention_forward<double>(p.weights(), H, x.cview(), CView<std::uint8_t>{}, y.view(), cache);
  for (index_t b = 0; b < B; ++b)
    for (index_t c = 0; c < D; ++c) {
      double mean_v = 0;
      for (index_t j = 0; j < N; ++j) mean_v += cache.v[(b * N + j) * D + c] / double(N);
      double worst = 0;
      for (index_t i = 0; i < N; ++i) worst = std::max(worst, std::abs(cache.ctx[(b * N + i) * D + c] - mean_v));
      if (c / Dh == 1) CHECK(worst > 1e-3);
      else CHECK(worst < 1e-12);
    }
  // The probabilities of heads 0 and 2 are uniform, those of head 1 are not.
  for (index_t h = 0; h < H; ++h) {
    double spread = 0;
    for (index_t i = 0; i < N * N; ++i) spread = std::max(spread, std::abs(cache.probs[h * N * N + i] - 1.0 / N));
    if (h == 1) CHECK(spread > 1e-3);
    else CHECK(spread < 1e-12);
  }
}

TEST_CASE("attention gradients: every input, weight and bias by central differences") {
  const index_t B = 2, D = 6;
  for (int H : {2, 3})
    for (bool cross : {false, true})
      for (bool masked : {false, true}) {
        CAPTURE(H);
        CAPTURE(cross);
        CAPTURE(masked);
        const index_t Nq = cross ? 3 : 4, Nk = 4;
        Params<double> p(D, 200 + H);
        Tensor<double> xq(Shape{B, Nq, D}), xkv(Shape{B, Nk, D});  // inputs
        testing::fill_normal(xq.view(), 11);
        testing::fill_normal(xkv.view(), 12);
        Tensor<std::uint8_t> mask;
        if (masked) mask = make_mask(B, Nk, 9, true);
        Tensor<double> r(Shape{B, Nq, D}), y(Shape{B, Nq, D});  // upstream gradient, output
        testing::fill_normal(r.view(), 13);
        AttentionCache<double> cache;
        auto run = [&]() -> double {
          const CView<double> q = cross ? xq.cview() : xkv.cview();
          cpu::attention_forward<double>(p.weights(), H, q, xkv.cview(), mask.cview(), y.view(), cache);
          return testing::dot<double, double>(y.cview(), r.cview());
        };
        run();
        Tensor<double> dxq(Shape{B, Nq, D}, 7.0), dxkv(Shape{B, Nk, D}, 7.0);  // overwritten, so garbage-filled
        if (cross) {
          cpu::attention_backward<double>(p.weights(), H, xq.cview(), xkv.cview(), mask.cview(), cache, r.cview(),
                                          dxq.view(), dxkv.view(), p.grads());
          CHECK(testing::check_gradient(xq.view(), dxq.cview(), run).rel_error < 1e-6);
        } else {
          // Self-attention: one dx = dxq + dxkv through the same view.
          cpu::attention_backward<double>(p.weights(), H, xkv.cview(), xkv.cview(), mask.cview(), cache,
                                          r.cview(), dxkv.view(), dxkv.view(), p.grads());
        }
        CHECK(testing::check_gradient(xkv.view(), dxkv.cview(), run).rel_error < 1e-6);
        for (int i = 0; i < 4; ++i) {
          CAPTURE(i);
          CHECK(testing::check_gradient(p.w[i].view(), p.gw[i].cview(), run).rel_error < 1e-6);
          const auto rb = testing::check_gradient(p.b[i].view(), p.gb[i].cview(), run);
          // bk shifts every score of a query row by the same q.bk: softmax ignores it, the true gradient is 0
          // and only absolute error is meaningful.
          if (i == 1) CHECK(rb.max_abs_error < 1e-8);
          else CHECK(rb.rel_error < 1e-6);
        }
      }
}

TEST_CASE("attention backward: parameter gradients accumulate, wrappers match, empty views skip") {
  const index_t B = 2, N = 4, D = 8;
  const int H = 2;
  Params<double> p(D, 31);
  Tensor<double> x(Shape{B, N, D}), y(Shape{B, N, D}), r(Shape{B, N, D});  // input, output, upstream
  testing::fill_normal(x.view(), 1);
  testing::fill_normal(r.view(), 2);
  AttentionCache<double> cache;
  cpu::self_attention_forward<double>(p.weights(), H, x.cview(), CView<std::uint8_t>{}, y.view(), cache);
  Tensor<double> dx1(Shape{B, N, D}), dx2(Shape{B, N, D}), dxq(Shape{B, N, D}), dxkv(Shape{B, N, D});
  cpu::self_attention_backward<double>(p.weights(), H, x.cview(), CView<std::uint8_t>{}, cache, r.cview(),
                                       dx1.view(), p.grads());
  const Tensor<double> once = p.gw[0];
  cpu::attention_backward<double>(p.weights(), H, x.cview(), x.cview(), CView<std::uint8_t>{}, cache, r.cview(),
                                  dxq.view(), dxkv.view(), p.grads());
  for (index_t i = 0; i < once.numel(); ++i) CHECK(p.gw[0][i] == doctest::Approx(2 * once[i]).epsilon(1e-12));
  for (index_t i = 0; i < dx1.numel(); ++i) CHECK(dx1[i] == doctest::Approx(dxq[i] + dxkv[i]).epsilon(1e-12));
  // Everything skipped: nothing written, no error.
  cpu::self_attention_backward<double>(p.weights(), H, x.cview(), CView<std::uint8_t>{}, cache, r.cview(),
                                       View<double>{}, AttentionGrads<double>{});
  for (index_t i = 0; i < once.numel(); ++i) CHECK(p.gw[0][i] == doctest::Approx(2 * once[i]).epsilon(1e-12));
}

TEST_CASE("attention masks: masked keys have no influence; all-masked rows give zero context, no NaN") {
  const index_t B = 3, Nq = 2, Nk = 6, D = 8;
  const int H = 2;
  Params<double> p(D, 41);
  Tensor<double> xq(Shape{B, Nq, D}), xkv(Shape{B, Nk, D});  // inputs
  testing::fill_normal(xq.view(), 1);
  testing::fill_normal(xkv.view(), 2);
  const Tensor<std::uint8_t> mask = make_mask(B, Nk, 5, true);  // row B-1 fully masked
  Tensor<double> y(Shape{B, Nq, D}), y2(Shape{B, Nq, D});       // outputs
  AttentionCache<double> cache;
  cpu::attention_forward<double>(p.weights(), H, xq.cview(), xkv.cview(), mask.cview(), y.view(), cache);
  // Perturb every masked token: nothing changes, bit for bit.
  Tensor<double> xkv2 = xkv;
  for (index_t b = 0; b < B; ++b)
    for (index_t j = 0; j < Nk; ++j)
      if (!mask[b * Nk + j])
        for (index_t c = 0; c < D; ++c) xkv2[(b * Nk + j) * D + c] += 3.0 + double(c);
  cpu::attention_forward<double>(p.weights(), H, xq.cview(), xkv2.cview(), mask.cview(), y2.view(), cache);
  for (index_t i = 0; i < y.numel(); ++i) CHECK(y[i] == y2[i]);
  // Fully masked row: zero context, so y = bo.
  for (index_t i = 0; i < Nq; ++i)
    for (index_t c = 0; c < D; ++c) {
      CHECK(cache.ctx[((B - 1) * Nq + i) * D + c] == 0.0);
      CHECK(y[((B - 1) * Nq + i) * D + c] == p.b[3][c]);
    }
  // Gradients reaching masked tokens are exactly zero, and finite everywhere.
  Tensor<double> r(Shape{B, Nq, D}), dxq(Shape{B, Nq, D}), dxkv(Shape{B, Nk, D});
  testing::fill_normal(r.view(), 3);
  cpu::attention_backward<double>(p.weights(), H, xq.cview(), xkv2.cview(), mask.cview(), cache, r.cview(),
                                  dxq.view(), dxkv.view(), p.grads());
  for (index_t b = 0; b < B; ++b)
    for (index_t j = 0; j < Nk; ++j)
      for (index_t c = 0; c < D; ++c) {
        const double g = dxkv[(b * Nk + j) * D + c];
        CHECK(std::isfinite(g));
        if (!mask[b * Nk + j]) CHECK(g == 0.0);
      }
  for (index_t i = 0; i < dxq.numel(); ++i) CHECK(std::isfinite(dxq[i]));
  // The reference agrees on the masked case too.
  Tensor<double> y_ref(Shape{B, Nq, D});
  ref::attention_forward<double>(p.weights(), H, xq.cview(), xkv.cview(), mask.cview(), y_ref.view());
  CHECK(max_abs_diff(y.cview(), y_ref.cview()) < 1e-12);
}

TEST_CASE("attention: 1 and 2 threads give bitwise identical results; the cache is reused") {
  // Large enough (B*N = 512 rows, D = 64) that the projections are split over threads.
  const index_t B = 8, N = 64, D = 64;
  const int H = 4;
  Params<float> pf(D, 51);
  Tensor<float> x(Shape{B, N, D}), r(Shape{B, N, D});  // input, upstream
  testing::fill_normal(x.view(), 1);
  testing::fill_normal(r.view(), 2);
  const Tensor<std::uint8_t> mask = make_mask(B, N, 3, true);
  std::vector<Tensor<float>> results[2];
  AttentionCache<float> cache;
  const float* probs_storage = nullptr;
  for (int t : {1, 2}) {
    set_num_threads(t);
    Params<float> p = pf;
    Tensor<float> y(Shape{B, N, D}), dx(Shape{B, N, D});  // output, input gradient
    cpu::self_attention_forward<float>(p.weights(), H, x.cview(), mask.cview(), y.view(), cache);
    cpu::self_attention_backward<float>(p.weights(), H, x.cview(), mask.cview(), cache, r.cview(), dx.view(),
                                        p.grads());
    if (t == 1) probs_storage = cache.probs.data();
    else CHECK(cache.probs.data() == probs_storage);  // same sizes: no reallocation
    auto& out = results[t - 1];
    out = {y, dx};
    for (int i = 0; i < 4; ++i) {
      out.push_back(p.gw[i]);
      out.push_back(p.gb[i]);
    }
  }
  set_num_threads(0);
  for (std::size_t k = 0; k < results[0].size(); ++k) {
    CAPTURE(k);
    const auto& a = results[0][k];
    const auto& b = results[1][k];
    bool same = true;
    for (index_t i = 0; i < a.numel(); ++i) same = same && a[i] == b[i];
    CHECK(same);
  }
}

TEST_CASE("attention errors name the sizes") {
  Params<double> p(12, 1);
  Tensor<double> x(Shape{1, 3, 12}), y(Shape{1, 3, 12});
  AttentionCache<double> cache;
  CHECK_THROWS_WITH_AS(cpu::self_attention_forward<double>(p.weights(), 5, x.cview(), CView<std::uint8_t>{},
                                                           y.view(), cache),
                       doctest::Contains("D=12 is not divisible by the number of heads H=5"), Error);
  Tensor<std::uint8_t> bad_mask(Shape{1, 4});
  CHECK_THROWS_WITH_AS(cpu::self_attention_forward<double>(p.weights(), 3, x.cview(), bad_mask.cview(), y.view(),
                                                           cache),
                       doctest::Contains("key_mask"), Error);
  Tensor<double> xkv(Shape{1, 4, 8});
  CHECK_THROWS_AS(cpu::attention_forward<double>(p.weights(), 3, x.cview(), xkv.cview(), CView<std::uint8_t>{},
                                                 y.view(), cache),
                  Error);
}
