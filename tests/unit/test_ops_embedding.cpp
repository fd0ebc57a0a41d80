// Ops: patchify order, patch and token embeddings against references, finite differences, helpful errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limoe/limoe.hpp>
#include <limoe/ops/embedding.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;
using testing::max_diff;
using testing::randn;

namespace {
Tensor<float> to_float(const Tensor<double>& t) { return Tensor<float>::copy_of(t.cview()); }
}  // namespace

TEST_CASE("patchify: (py, px) patch order, (py_in, px_in, c) inside a patch, checked by hand") {
  // A 4x4 image with 2 channels, value = 100 * y + 10 * x + c, so every element names its pixel.
  Tensor<float> img(Shape{1, 4, 4, 2});
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 4; ++x)
      for (int c = 0; c < 2; ++c) img[(y * 4 + x) * 2 + c] = static_cast<float>(100 * y + 10 * x + c);
  Tensor<float> patches(Shape{1, 4, 8});
  cpu::patchify<float>(img, 2, patches);
  const float expect[4][8] = {
      {0, 1, 10, 11, 100, 101, 110, 111},      // patch (0, 0)
      {20, 21, 30, 31, 120, 121, 130, 131},    // patch (0, 1)
      {200, 201, 210, 211, 300, 301, 310, 311},  // patch (1, 0)
      {220, 221, 230, 231, 320, 321, 330, 331},  // patch (1, 1)
  };
  for (int n = 0; n < 4; ++n)
    for (int f = 0; f < 8; ++f) CHECK(patches[n * 8 + f] == expect[n][f]);

  // unpatchify is the inverse (and the adjoint: <patchify(a), p> == <a, unpatchify(p)>).
  Tensor<float> back(img.shape(), -1.f);
  cpu::unpatchify<float>(patches, 2, back);
  for (index_t i = 0; i < img.numel(); ++i) CHECK(back[i] == img[i]);
  auto a = randn<double>(Shape{2, 6, 9, 3}, 1), p = randn<double>(Shape{2, 6, 27}, 2);
  Tensor<double> pa(p.shape()), up(a.shape()), pa0(p.shape()), up0(a.shape());
  cpu::patchify<double>(a, 3, pa);
  cpu::unpatchify<double>(p, 3, up);
  ref::patchify<double>(a, 3, pa0);
  ref::unpatchify<double>(p, 3, up0);
  CHECK(max_diff(pa, pa0) == 0.0);
  CHECK(max_diff(up, up0) == 0.0);
  CHECK(testing::dot<double, double>(pa, p) == doctest::Approx(testing::dot<double, double>(a, up)));
}

TEST_CASE("patchify: sizes not divisible by P are errors that say so") {
  Tensor<float> img(Shape{1, 5, 4, 1}), patches(Shape{1, 4, 4});
  CHECK_THROWS_WITH_AS(cpu::patchify<float>(img, 2, patches), doctest::Contains("divisible by the patch size 2"),
                       Error);
  Tensor<float> img2(Shape{1, 4, 4, 1}), wrong(Shape{1, 3, 4});
  CHECK_THROWS_WITH_AS(cpu::patchify<float>(img2, 2, wrong), doctest::Contains("expected shape [1, 4, 4]"), Error);
  Tensor<float> rank3(Shape{4, 4, 1});
  CHECK_THROWS_WITH_AS(cpu::patchify<float>(rank3, 2, wrong), doctest::Contains("[B, H, W, C]"), Error);
  Tensor<float> W(Shape{8, 5}), b(Shape{8}), pos(Shape{4, 8}), y(Shape{1, 4, 8}), pt(Shape{1, 4, 4});
  CHECK_THROWS_WITH_AS(cpu::patch_embed_forward<float>(img2, 2, W, b, pos, pt, y), doctest::Contains("P*P*C = 4"),
                       Error);
}

TEST_CASE("patch embedding: cpu matches the reference (double, float, threads) and finite differences") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    // Small odd case, and a case whose product crosses the threaded gemm threshold.
    for (auto [B, H, W, C, P, D] : {std::array<index_t, 6>{2, 6, 9, 1, 3, 5}, std::array<index_t, 6>{4, 28, 28, 3, 4, 256}}) {
      CAPTURE(H);
      const index_t N = (H / P) * (W / P), F = P * P * C;
      auto img = randn<double>(Shape{B, H, W, C}, 10), Wt = randn<double>(Shape{D, F}, 11, 0.2);
      auto b = randn<double>(Shape{D}, 12), pos = randn<double>(Shape{N, D}, 13), dy = randn<double>(Shape{B, N, D}, 14);
      Tensor<double> pt0(Shape{B, N, F}), y0(Shape{B, N, D}), di0(img.shape()), dW0(Wt.shape()), db0(b.shape()),
          dp0(pos.shape());
      ref::patch_embed_forward<double>(img, int(P), Wt, b, pos, pt0, y0);
      ref::patch_embed_backward<double>(img, int(P), pt0, Wt, dy, di0, dW0, db0, dp0);
      Tensor<double> pt(pt0.shape()), y(y0.shape()), di(img.shape()), dW(Wt.shape()), db(b.shape()), dp(pos.shape());
      cpu::patch_embed_forward<double>(img, int(P), Wt, b, pos, pt, y);
      cpu::patch_embed_backward<double>(img, int(P), pt, Wt, dy, di, dW, db, dp);
      CHECK(max_diff(pt, pt0) == 0.0);
      CHECK(max_diff(y, y0) < 1e-12);
      CHECK(max_diff(di, di0) < 1e-12);
      CHECK(max_diff(dW, dW0) < 1e-12);
      CHECK(max_diff(db, db0) < 1e-12);
      CHECK(max_diff(dp, dp0) < 1e-12);

      auto imgf = to_float(img), Wf = to_float(Wt), bf = to_float(b), posf = to_float(pos), dyf = to_float(dy);
      Tensor<float> ptf(pt0.shape()), yf(y0.shape()), dif(img.shape()), dWf(Wt.shape()), dbf(b.shape()),
          dpf(pos.shape());
      cpu::patch_embed_forward<float>(imgf, int(P), Wf, bf, posf, ptf, yf);
      cpu::patch_embed_backward<float>(imgf, int(P), ptf, Wf, dyf, dif, dWf, dbf, dpf);
      CHECK(max_diff(yf, y0) < 1e-5);
      CHECK(max_diff(dif, di0) < 1e-5);
      CHECK(max_diff(dWf, dW0) < 1e-5);
      CHECK(max_diff(dpf, dp0) < 1e-5);
    }
  }
  set_num_threads(0);

  const index_t B = 2, H = 4, W = 6, C = 2, P = 2, D = 3, N = 6, F = 8;
  auto img = randn<double>(Shape{B, H, W, C}, 20), Wt = randn<double>(Shape{D, F}, 21);
  auto b = randn<double>(Shape{D}, 22), pos = randn<double>(Shape{N, D}, 23), up = randn<double>(Shape{B, N, D}, 24);
  Tensor<double> pt(Shape{B, N, F}), y(Shape{B, N, D});
  auto loss = [&] {
    cpu::patch_embed_forward<double>(img, P, Wt, b, pos, pt, y);
    return testing::dot<double, double>(y, up);
  };
  loss();
  Tensor<double> di(img.shape()), dW(Wt.shape()), db(b.shape()), dp(pos.shape());
  cpu::patch_embed_backward<double>(img, P, pt, Wt, up, di, dW, db, dp);
  auto ri = testing::check_gradient(img.view(), di.cview(), loss);
  auto rW = testing::check_gradient(Wt.view(), dW.cview(), loss);
  auto rb = testing::check_gradient(b.view(), db.cview(), loss);
  auto rp = testing::check_gradient(pos.view(), dp.cview(), loss);
  INFO(ri.str(), " | ", rW.str(), " | ", rb.str(), " | ", rp.str());
  CHECK(ri.rel_error < 1e-8);
  CHECK(rW.rel_error < 1e-8);
  CHECK(rb.rel_error < 1e-8);
  CHECK(rp.rel_error < 1e-8);

  // Accumulate rule: parameters double, the image gradient is overwritten; empty views are skipped.
  loss();
  const Tensor<double> di1 = di, dW1 = dW, dp1 = dp;
  cpu::patch_embed_backward<double>(img, P, pt, Wt, up, di, dW, db, dp);
  for (index_t i = 0; i < di.numel(); ++i) CHECK(di[i] == di1[i]);
  for (index_t i = 0; i < dW.numel(); ++i) CHECK(dW[i] == doctest::Approx(2 * dW1[i]));
  for (index_t i = 0; i < dp.numel(); ++i) CHECK(dp[i] == doctest::Approx(2 * dp1[i]));
  Tensor<double> dW2(Wt.shape());
  cpu::patch_embed_backward<double>(img, P, pt, Wt, up, View<double>{}, dW2, View<double>{}, View<double>{});
  for (index_t i = 0; i < dW.numel(); ++i) CHECK(dW2[i] == doctest::Approx(dW1[i]));
}

TEST_CASE("token embedding: lookup plus position, finite differences with repeated ids, bad ids") {
  const index_t B = 3, L = 5, V = 7, D = 4;
  auto ids = Tensor<std::int32_t>::from(Shape{B, L}, {0, 3, 3, 6, 1, 2, 2, 2, 0, 5, 6, 6, 4, 3, 0});
  auto table = randn<double>(Shape{V, D}, 30), pos = randn<double>(Shape{L + 2, D}, 31);  // pos longer than L
  auto up = randn<double>(Shape{B, L, D}, 32);
  Tensor<double> y(Shape{B, L, D}), y0(Shape{B, L, D});
  ref::token_embed_forward<double>(ids, table, pos, y0);
  cpu::token_embed_forward<double>(ids, table, pos, y);
  CHECK(max_diff(y, y0) == 0.0);
  CHECK(y[(1 * L + 4) * D + 2] == table[5 * D + 2] + pos[4 * D + 2]);

  auto loss = [&] {
    cpu::token_embed_forward<double>(ids, table, pos, y);
    return testing::dot<double, double>(y, up);
  };
  Tensor<double> dt(table.shape()), dp(pos.shape()), dt0(table.shape()), dp0(pos.shape());
  cpu::token_embed_backward<double>(ids, up, dt, dp);
  ref::token_embed_backward<double>(ids, up, dt0, dp0);
  CHECK(max_diff(dt, dt0) < 1e-15);
  CHECK(max_diff(dp, dp0) < 1e-15);
  auto rt = testing::check_gradient(table.view(), dt.cview(), loss);
  auto rp = testing::check_gradient(pos.view(), dp.cview(), loss);
  INFO(rt.str(), " | ", rp.str());
  CHECK(rt.rel_error < 1e-8);
  CHECK(rp.rel_error < 1e-8);
  cpu::token_embed_backward<double>(ids, up, dt, View<double>{});
  for (index_t i = 0; i < dt.numel(); ++i) CHECK(dt[i] == doctest::Approx(2 * dt0[i]));

  // Large enough to run on two threads, float; the one-sequence [T] form and no position table.
  set_num_threads(2);
  const index_t B2 = 64, L2 = 16, V2 = 300, D2 = 256;
  Tensor<std::int32_t> ids2(Shape{B2, L2});
  for (index_t i = 0; i < ids2.numel(); ++i) ids2[i] = static_cast<std::int32_t>((i * 37) % V2);
  auto tab2 = randn<float>(Shape{V2, D2}, 40), pos2 = randn<float>(Shape{L2, D2}, 41), g2 = randn<float>(Shape{B2, L2, D2}, 42);
  Tensor<float> y2(Shape{B2, L2, D2}), dt2(tab2.shape()), dp2(pos2.shape());
  cpu::token_embed_forward<float>(ids2, tab2, pos2, y2);
  cpu::token_embed_backward<float>(ids2, g2, dt2, dp2);
  Tensor<float> y3(Shape{B2, L2, D2}), dt3(tab2.shape()), dp3(pos2.shape());
  ref::token_embed_forward<float>(ids2, tab2, pos2, y3);
  ref::token_embed_backward<float>(ids2, g2, dt3, dp3);
  for (index_t i = 0; i < y2.numel(); ++i) REQUIRE(y2[i] == y3[i]);
  for (index_t i = 0; i < dt2.numel(); ++i) REQUIRE(dt2[i] == doctest::Approx(dt3[i]).epsilon(1e-5));
  for (index_t i = 0; i < dp2.numel(); ++i) REQUIRE(dp2[i] == doctest::Approx(dp3[i]).epsilon(1e-5));
  set_num_threads(0);
  auto one = Tensor<std::int32_t>::from(Shape{2}, {6, 1});
  Tensor<double> y1(Shape{2, D});
  cpu::token_embed_forward<double>(one, table, CView<double>{}, y1);
  CHECK(y1[D + 3] == table[D + 3]);

  auto bad = Tensor<std::int32_t>::from(Shape{2, 3}, {0, 1, 2, 3, 7, 4});
  Tensor<double> yb(Shape{2, 3, D});
  CHECK_THROWS_WITH_AS(cpu::token_embed_forward<double>(bad, table, pos, yb),
                       doctest::Contains("token id 7 at position 1 of sequence 1"), Error);
  bad[4] = -2;
  CHECK_THROWS_WITH_AS(cpu::token_embed_forward<double>(bad, table, pos, yb), doctest::Contains("id -2"), Error);
  Tensor<double> short_pos(Shape{2, D});
  bad[4] = 1;
  CHECK_THROWS_WITH_AS(cpu::token_embed_forward<double>(bad, table, short_pos, yb), doctest::Contains("pos"), Error);
}
