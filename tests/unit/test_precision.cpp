// The bf16 mixed-precision policy (core/precision.hpp, docs/precision.md).
//
// What is asserted, and against what:
//  - rounding: to_bf16 against the nearest of the two bf16 neighbours computed in double (ties to even);
//  - every mixed product (both oneDNN and the widening fallback, all transposes, alpha/beta, threaded splits,
//    a layer's product with its bias)
//    against a naive double product of the bf16-rounded operands: |error| <= 2^-20 sum_k |a_k b_k| (fp32
//    accumulation of exact bf16 x bf16 products); and against the fp32 product of the unrounded operands within
//    the bf16 bound |error| <= 2^-7 sum_k |a_k b_k| (each operand off by at most 2^-9 relative: 2^-8 + 2^-18
//    per product term, with room for the fp32 accumulation);
//  - every op that takes the policy, Cpu against Ref under Bf16Mixed (the same rounded operands; differences
//    come from fp32 summation order, and where an activation is rounded after a product, from a rounding that
//    may fall the other way: 1e-3 of the largest value), and against Ref in fp32 within a bf16 tolerance (2e-2
//    of the largest value: a few chained products, each off by about 2^-8 in the worst element);
//  - routing: the MoE layer's routes and gates are the same bits under both policies (the router is fp32);
//  - the weights' bf16 copy is made once per optimizer step, and a model trains under bf16.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limoe/backend/ops.hpp>
#include <limoe/core/gemm_mixed.hpp>
#include <limoe/core/parallel.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/model/model.hpp>
#include <limoe/model/variants.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <limoe/train/optimizer.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "unit/precision_cases.hpp"

using namespace limoe;

// The policy is part of every model type, the variants' included.
static_assert(std::is_same_v<variants::S32<Cpu, float, Bf16Mixed>::precision_type, Bf16Mixed>);
static_assert(std::is_same_v<variants::S32<>::precision_type, Fp32>);
static_assert(std::is_same_v<Limoe<float>::precision_type, Fp32>);

using namespace limoe::precision_cases;

TEST_CASE("to_bf16 rounds to the nearest bf16, ties to even; NaN and infinities survive") {
  std::uint64_t state = 88172645463325252ull;
  for (int i = 0; i < 200000; ++i) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    const float x = std::bit_cast<float>(static_cast<std::uint32_t>(state));
    if (!std::isfinite(x)) continue;
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    // The two bf16 neighbours (truncated, and one bf16 ulp away from zero), compared in double.
    const float lo = std::bit_cast<float>(u & 0xffff0000u);
    const float hi = std::bit_cast<float>((u & 0xffff0000u) + 0x10000u);
    // Past the largest bf16 the upper neighbour is infinity, which IEEE rounding places at 2^128.
    const double hid = std::isinf(hi) ? std::copysign(0x1p128, static_cast<double>(x)) : static_cast<double>(hi);
    const double dlo = std::abs(static_cast<double>(x) - lo), dhi = std::abs(static_cast<double>(x) - hid);
    const float r = round_bf16(x);
    CAPTURE(x);
    CHECK((std::bit_cast<std::uint32_t>(r) & 0xffffu) == 0u);
    if (dlo < dhi) CHECK(r == lo);
    else if (dhi < dlo) CHECK(r == hi);
    else CHECK(((std::bit_cast<std::uint32_t>(r) >> 16) & 1u) == 0u);  // a tie: the even one
  }
  CHECK(round_bf16(1.0f) == 1.0f);
  CHECK(round_bf16(1.0f + 0x1p-8f) == 1.0f);                  // tie, 1.0 is even
  CHECK(round_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f);    // tie, rounds up to the even neighbour
  CHECK(std::isnan(round_bf16(std::nanf(""))));
  CHECK(std::isinf(round_bf16(INFINITY)));
  CHECK(round_bf16(-0.0f) == 0.0f);
  CHECK(std::isinf(round_bf16(3.4e38f)));  // above the largest bf16: rounds to infinity, as the format does
}

TEST_CASE("an activation rounded once per op: found by the policy, the same bits as rounding it in every product") {
  // The policy: a copy is found by address inside its extent only; a full policy stays as it was.
  float buf[8] = {};
  bf16_bits lo[8] = {};
  Bf16Mixed p = Bf16Mixed{}.with(buf + 2, 4, lo);
  CHECK(p.find(buf + 3, 3) == lo + 1);
  CHECK(p.find(buf + 3, 4) == nullptr);  // runs past the copy
  CHECK(p.find(buf, 1) == nullptr);
  Bf16Mixed full;
  for (int i = 0; i < Bf16Mixed::kActs; ++i) full = full.with(buf + i, 1, lo + i);
  const Bf16Mixed same = full.with(buf + 7, 1, lo + 7);
  CHECK(same.find(buf + 7, 1) == nullptr);
  CHECK(same.find(buf + Bf16Mixed::kActs - 1, 1) == lo + Bf16Mixed::kActs - 1);

  const index_t R = 300, I = 48, O = 40;
  auto x = randf(Shape{R, I}, 41), W = randf(Shape{O, I}, 42, 0.2), dy = randf(Shape{R, O}, 43);
  {  // RoundedOnce: the copy is x rounded, found through prec(); nothing under Fp32, for null, or when found already
    const RoundedOnce<float, Bf16Mixed> r(Bf16Mixed{}, x.data(), x.numel());
    const bf16_bits* c = r.prec().find(x.data(), x.numel());
    REQUIRE(c != nullptr);
    for (index_t i = 0; i < x.numel(); ++i) CHECK(c[i] == to_bf16(x[i]));
    const RoundedOnce<float, Bf16Mixed> again(r.prec(), x.data(), x.numel());
    CHECK(again.prec().find(x.data(), x.numel()) == c);
    const RoundedOnce<float, Bf16Mixed> none(Bf16Mixed{}, nullptr, x.numel());
    CHECK(none.prec().find(x.data(), x.numel()) == nullptr);
    const RoundedOnce<float, Fp32> fp32(Fp32{}, x.data(), x.numel());
    (void)fp32.prec();
  }
  // linear_backward (dy rounded once for both products) against its two products on the plain policy, which
  // round dy in each: the same bits, on 1 and 2 threads.
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Tensor<float> dx(Shape{R, I}), dW(Shape{O, I}), db(Shape{O});
    dW.zero(), db.zero();
    cpu::linear_backward<float>(x.cview(), W.cview(), dy.cview(), dx.view(), dW.view(), db.view(), Bf16Mixed{});
    Tensor<float> dx0(Shape{R, I}), dW0(Shape{O, I});
    dW0.zero();
    gemm_mixed<float>(Bf16Mixed{}, Trans::N, Trans::N, R, I, O, 1.0f, dy.data(), O, W.data(), I, 0.0f, dx0.data(), I);
    gemm_mixed<float>(Bf16Mixed{}, Trans::T, Trans::N, O, I, R, 1.0f, dy.data(), O, x.data(), I, 1.0f, dW0.data(), I);
    CHECK(std::memcmp(dx.data(), dx0.data(), sizeof(float) * dx.numel()) == 0);
    CHECK(std::memcmp(dW.data(), dW0.data(), sizeof(float) * dW.numel()) == 0);
  }
  set_num_threads(0);
}

TEST_CASE("a product written as bf16 (gemm_mixed_bias_bf16): the bits of the fp32 product rounded by to_bf16") {
  // Under one policy the fp32 product (gemm_mixed_bias) and the bf16-output one run the same kernel on the same
  // blocks, so rounding in oneDNN's epilogue (or in the scratch fallback) must give to_bf16's bits exactly; with
  // a bias and without, the weight as it lies and packed once (a store: N K >= 2^19, M N K >= 2^26), an output
  // wider than its columns (ldc), 1 and 2 threads.
  struct Case {
    index_t M, N, K;
  };
  for (const Case sh : {Case{7, 40, 24}, Case{300, 96, 64}, Case{1024, 1024, 512}}) {
    const index_t M = sh.M, N = sh.N, K = sh.K, ldc = N + 3;
    auto A = randf(Shape{M, K}, 5 + M), W = randf(Shape{N, K}, 6 + N, 0.2), b = randf(Shape{N}, 7);
    std::vector<bf16_bits> W16(static_cast<std::size_t>(W.numel()));
    to_bf16(W.data(), W.numel(), W16.data());
    for (bool packed : {false, true})
      for (bool bias : {false, true})
        for (int threads : {1, 2}) {
          CAPTURE(M);
          CAPTURE(packed);
          CAPTURE(bias);
          CAPTURE(threads);
          set_num_threads(threads);
          PackedWeights store;
          Bf16Mixed prec;
          if (packed) prec.weights = Bf16Copies{W.data(), W.numel(), W16.data(), &store};
          Tensor<float> C(Shape{M, ldc});
          C.zero();
          std::vector<bf16_bits> C16(static_cast<std::size_t>(M * ldc), bf16_bits{0x7fc1});
          const float* bp = bias ? b.data() : nullptr;
          if (bias)
            gemm_mixed_bias<float>(prec, Trans::N, Trans::T, M, N, K, A.data(), K, W.data(), K, bp, C.data(), ldc);
          else
            gemm_mixed<float>(prec, Trans::N, Trans::T, M, N, K, 1.0f, A.data(), K, W.data(), K, 0.0f, C.data(), ldc);
          gemm_mixed_bias_bf16(prec, Trans::N, Trans::T, M, N, K, A.data(), K, W.data(), K, bp, C16.data(), ldc);
          index_t wrong = 0, touched = 0;
          for (index_t r = 0; r < M; ++r) {
            for (index_t c = 0; c < N; ++c) wrong += C16[static_cast<std::size_t>(r * ldc + c)] != to_bf16(C[r * ldc + c]);
            for (index_t c = N; c < ldc; ++c) touched += C16[static_cast<std::size_t>(r * ldc + c)] != 0x7fc1;
          }
          CHECK(wrong == 0);
          CHECK(touched == 0);  // the columns past N are the caller's
          if (packed && M * N * K >= (index_t{1} << 26)) CHECK(store.made() > 0);
        }
  }
  set_num_threads(0);
}

TEST_CASE("mixed products agree with the double product of the bf16-rounded operands") {
  struct Shape3 {
    index_t M, N, K;
  };
  // Small (one block), and large enough to be split over the thread pool by rows and by columns.
  const std::vector<Shape3> shapes{{7, 5, 3}, {33, 70, 19}, {600, 96, 80}, {64, 700, 96}};
  for (const auto sh : shapes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (int ab = 0; ab < 2; ++ab)
          for (int threads : {1, 2}) {
            set_num_threads(threads);
            const index_t M = sh.M, N = sh.N, K = sh.K;
            const Trans TA = ta ? Trans::T : Trans::N, TB = tb ? Trans::T : Trans::N;
            // Leading dimensions wider than the rows, to test strides.
            const index_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
            auto A = randf(Shape{(ta ? K : M) * lda}, 1 + sh.M, 1.0), B = randf(Shape{(tb ? N : K) * ldb}, 2 + sh.N, 1.0);
            auto C0 = randf(Shape{M * ldc}, 3, 1.0);
            const float alpha = ab ? 0.5f : 1.0f, beta = ab ? 1.0f : 0.0f;
            auto a = [&](index_t m, index_t k) { return ta ? A[k * lda + m] : A[m * lda + k]; };
            auto b = [&](index_t k, index_t n) { return tb ? B[n * ldb + k] : B[k * ldb + n]; };
            Tensor<float> C = C0, Cf = C0;
            gemm_mixed<float>(Bf16Mixed{}, TA, TB, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
            gemm_mixed<float>(Fp32{}, TA, TB, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, Cf.data(), ldc);
            Tensor<float> Cw = C0;  // the widening fallback on one thread, whatever oneDNN offers here
            detail::ScratchLease<bf16_bits> sa(detail::operand_extent(ta ? K : M, ta ? M : K, lda)),
                sb(detail::operand_extent(tb ? N : K, tb ? K : N, ldb));
            to_bf16(A.data(), detail::operand_extent(ta ? K : M, ta ? M : K, lda), sa.data());
            to_bf16(B.data(), detail::operand_extent(tb ? N : K, tb ? K : N, ldb), sb.data());
            detail::gemm_bf16_widened(TA, TB, M, N, K, alpha, sa.data(), lda, sb.data(), ldb, beta, Cw.data(), ldc);
            // A layer's product with its bias (gemm_mixed_bias: oneDNN adds it in its epilogue, or C is seeded
            // with it where the product is too small for oneDNN; fp32: seeded). C's old values must not count.
            const auto bias = randf(Shape{N}, 4 + sh.N, 1.0);
            Tensor<float> Cb = C0, Cbf = C0;
            gemm_mixed_bias<float>(Bf16Mixed{}, TA, TB, M, N, K, A.data(), lda, B.data(), ldb, bias.data(), Cb.data(), ldc);
            gemm_mixed_bias<float>(Fp32{}, TA, TB, M, N, K, A.data(), lda, B.data(), ldb, bias.data(), Cbf.data(), ldc);
            double worst_exact = 0, worst_fp32 = 0, worst_widened = 0, worst_bias = 0, worst_bias_fp32 = 0;
            for (index_t m = 0; m < M; ++m)
              for (index_t n = 0; n < N; ++n) {
                double exact = 0, mag = 0, full = 0;
                for (index_t k = 0; k < K; ++k) {
                  exact += static_cast<double>(round_bf16(a(m, k))) * round_bf16(b(k, n));
                  full += static_cast<double>(a(m, k)) * b(k, n);
                  mag += std::abs(static_cast<double>(a(m, k)) * b(k, n));
                }
                const double c0 = C0[m * ldc + n];
                exact = alpha * exact + beta * c0;
                full = alpha * full + beta * c0;
                const double scale = alpha * mag * 1.01 + std::abs(beta * c0) + 1e-30;
                worst_exact = std::max(worst_exact, std::abs(C[m * ldc + n] - exact) / scale);
                worst_widened = std::max(worst_widened, std::abs(Cw[m * ldc + n] - exact) / scale);
                worst_fp32 = std::max(worst_fp32, std::abs(C[m * ldc + n] - full) / scale);
                const double bscale = mag * 1.01 + std::abs(bias[n]) + 1e-30;
                worst_bias = std::max(worst_bias, std::abs(Cb[m * ldc + n] - (exact - beta * c0) / alpha - bias[n]) / bscale);
                worst_bias_fp32 = std::max(worst_bias_fp32, std::abs(Cbf[m * ldc + n] - (full - beta * c0) / alpha - bias[n]) / bscale);
              }
            CAPTURE(M);
            CAPTURE(N);
            CAPTURE(K);
            CAPTURE(ta);
            CAPTURE(tb);
            CAPTURE(ab);
            CAPTURE(threads);
            CHECK(worst_exact <= 0x1p-20 * std::sqrt(static_cast<double>(K)) + 0x1p-23);
            CHECK(worst_widened <= 0x1p-20 * std::sqrt(static_cast<double>(K)) + 0x1p-23);
            CHECK(worst_fp32 <= 0x1p-7);
            CHECK(worst_bias <= 0x1p-20 * std::sqrt(static_cast<double>(K)) + 0x1p-23);
            CHECK(worst_bias_fp32 <= 0x1p-20 * std::sqrt(static_cast<double>(K)) + 0x1p-23);
            CHECK(rel_max(C.cview(), Cf.cview()) > 0);  // it did round: bf16 is not fp32
            // The padding between rows (ldc > N) is never written.
            for (index_t m = 0; m < M; ++m) CHECK((C[m * ldc + N] == C0[m * ldc + N] && Cb[m * ldc + N] == C0[m * ldc + N]));
          }
  set_num_threads(0);
  MESSAGE("bf16 products here: " << detail::bf16_kernel_name());
}

TEST_CASE("batched bf16 products (attention's heads) agree with the double product of the rounded operands") {
  // The layout of attention's per-head products: item i is head i, its operand columns i*Dh .. (i+1)*Dh of
  // rows D wide (batch stride Dh, leading dimension D), or a dense [Nq, Nk] block per head; every transpose the
  // forward and backward use, alpha and beta. oneDNN's batched kernel (where it takes the layout) and the two
  // fallbacks (per item where oneDNN refuses the layout, widened where it has no bf16 kernel) are compared with
  // the naive double product.
  const index_t H = 3, Dh = 16, D = H * Dh + 5, Nq = 9, Nk = 11;
  struct Case {
    Trans ta, tb;
    index_t M, N, K, lda, sa, ldb, sb, ldc, sc;
  };
  const std::vector<Case> cases{
      {Trans::N, Trans::T, Nq, Nk, Dh, D, Dh, D, Dh, Nk, Nq * Nk},  // scores q_h k_h^T, dP = dctx_h v_h^T
      {Trans::N, Trans::N, Nq, Dh, Nk, Nk, Nq * Nk, D, Dh, D, Dh},  // ctx_h = P_h v_h, dq_h = dS_h k_h
      {Trans::T, Trans::N, Nk, Dh, Nq, Nk, Nq * Nk, D, Dh, D, Dh},  // dv_h = P_h^T dctx_h, dk_h = dS_h^T q_h
  };
  for (const Case& c : cases)
    for (index_t batch : {H, index_t(1)})
      for (int ab = 0; ab < 2; ++ab)
        for (int path = 0; path < 3; ++path) {
        const index_t ar = c.ta == Trans::N ? c.M : c.K, ac = c.ta == Trans::N ? c.K : c.M;
        const index_t br = c.tb == Trans::N ? c.K : c.N, bc = c.tb == Trans::N ? c.N : c.K;
        const index_t na = (batch - 1) * c.sa + (ar - 1) * c.lda + ac, nb = (batch - 1) * c.sb + (br - 1) * c.ldb + bc;
        const index_t nc = (batch - 1) * c.sc + (c.M - 1) * c.ldc + c.N;
        auto A = randf(Shape{na}, 11 + na), B = randf(Shape{nb}, 12 + nb), C0 = randf(Shape{nc}, 13);
        std::vector<bf16_bits> a16(static_cast<std::size_t>(na)), b16(static_cast<std::size_t>(nb));
        to_bf16(A.data(), na, a16.data());
        to_bf16(B.data(), nb, b16.data());
        const float alpha = ab ? 0.25f : 1.0f, beta = ab ? 1.0f : 0.0f;
        Tensor<float> C = C0;
        const auto product = path == 0   ? detail::gemm_bf16_batched_serial<>
                             : path == 1 ? detail::gemm_bf16_per_item<>
                                         : detail::gemm_bf16_batched_widened<>;
        product(c.ta, c.tb, c.M, c.N, c.K, alpha, a16.data(), c.lda, c.sa, b16.data(), c.ldb, c.sb, beta, C.data(),
                c.ldc, c.sc, batch);
        std::vector<bool> written(static_cast<std::size_t>(nc), false);
        double worst = 0;
        for (index_t i = 0; i < batch; ++i)
          for (index_t m = 0; m < c.M; ++m)
            for (index_t n = 0; n < c.N; ++n) {
              double exact = 0, mag = 0;
              for (index_t k = 0; k < c.K; ++k) {
                const double x = round_bf16(c.ta == Trans::N ? A[i * c.sa + m * c.lda + k] : A[i * c.sa + k * c.lda + m]);
                const double y = round_bf16(c.tb == Trans::N ? B[i * c.sb + k * c.ldb + n] : B[i * c.sb + n * c.ldb + k]);
                exact += x * y;
                mag += std::abs(x * y);
              }
              const index_t at = i * c.sc + m * c.ldc + n;
              written[static_cast<std::size_t>(at)] = true;
              exact = alpha * exact + beta * C0[at];
              worst = std::max(worst, std::abs(C[at] - exact) / (alpha * mag * 1.01 + std::abs(beta * C0[at]) + 1e-30));
            }
        CAPTURE(static_cast<int>(c.ta));
        CAPTURE(static_cast<int>(c.tb));
        CAPTURE(batch);
        CAPTURE(ab);
        CAPTURE(path);
        CHECK(worst <= 0x1p-20 * std::sqrt(static_cast<double>(c.K)) + 0x1p-23);
        // Nothing outside the items' blocks is written (the columns of the other heads, the padding).
        for (index_t at = 0; at < nc; ++at)
          if (!written[static_cast<std::size_t>(at)]) CHECK(C[at] == C0[at]);
      }
}

TEST_CASE("attention under bf16 gives the same bits on 1 and 2 threads, forward and backward") {
  const index_t Bn = 5, N = 9, D = 48;
  const int H = 3;
  std::vector<Tensor<float>> w;
  for (int i = 0; i < 8; ++i) w.push_back(randf(i % 2 ? Shape{D} : Shape{D, D}, 40 + i, i % 2 ? 0.1 : 0.2));
  auto view = [&](int i) { return w[static_cast<std::size_t>(i)].cview(); };
  const AttentionWeights<float> aw{view(0), view(1), view(2), view(3), view(4), view(5), view(6), view(7)};
  auto x = randf(Shape{Bn, N, D}, 50), dy = randf(Shape{Bn, N, D}, 51);
  Tensor<std::uint8_t> mask(Shape{Bn, N});
  for (index_t i = 0; i < mask.numel(); ++i) mask[i] = (i % 4 == 3) ? 0 : 1;
  std::vector<std::vector<float>> runs;
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    std::vector<Tensor<float>> gr;
    for (int i = 0; i < 8; ++i) gr.emplace_back(w[static_cast<std::size_t>(i)].shape());
    auto gv = [&](int i) { return gr[static_cast<std::size_t>(i)].view(); };
    const AttentionGrads<float> ag{gv(0), gv(1), gv(2), gv(3), gv(4), gv(5), gv(6), gv(7)};
    Tensor<float> y(x.shape()), dx(x.shape());
    AttentionCache<float> cache;
    cpu::self_attention_forward<float>(aw, H, x.cview(), mask.cview(), y.view(), cache, Bf16Mixed{});
    cpu::self_attention_backward<float>(aw, H, x.cview(), mask.cview(), cache, dy.cview(), dx.view(), ag, Bf16Mixed{});
    std::vector<float> all(y.data(), y.data() + y.numel());
    all.insert(all.end(), dx.data(), dx.data() + dx.numel());
    for (auto& t : gr) all.insert(all.end(), t.data(), t.data() + t.numel());
    runs.push_back(all);
  }
  set_num_threads(0);
  CHECK(std::memcmp(runs[0].data(), runs[1].data(), sizeof(float) * runs[0].size()) == 0);
  // A backward under bf16 after a forward under fp32 is refused (it would read no bf16 copies).
  AttentionCache<float> cache;
  Tensor<float> y(x.shape()), dx(x.shape());
  cpu::self_attention_forward<float>(aw, H, x.cview(), mask.cview(), y.view(), cache, Fp32{});
  const AttentionGrads<float> none{};
  CHECK_THROWS_WITH_AS(cpu::self_attention_backward<float>(aw, H, x.cview(), mask.cview(), cache, dy.cview(), dx.view(),
                                                            none, Bf16Mixed{}),
                       doctest::Contains("no bf16 copies"), Error);
}

TEST_CASE("mixed products give the same bits on 1 and 2 threads") {
  auto A = randf(Shape{700, 96}, 5), B = randf(Shape{130, 96}, 6);
  Tensor<float> C1(Shape{700, 130}), C2(Shape{700, 130});
  set_num_threads(1);
  gemm_mixed<float>(Bf16Mixed{}, Trans::N, Trans::T, 700, 130, 96, 1.0f, A.data(), 96, B.data(), 96, 0.0f, C1.data(), 130);
  set_num_threads(2);
  gemm_mixed<float>(Bf16Mixed{}, Trans::N, Trans::T, 700, 130, 96, 1.0f, A.data(), 96, B.data(), 96, 0.0f, C2.data(), 130);
  set_num_threads(0);
  CHECK(std::memcmp(C1.data(), C2.data(), sizeof(float) * C1.numel()) == 0);
}

TEST_CASE("the weight mirror: a weight's copy is found by address, and made again only after a change") {
  ParamStore<float> ps;
  const auto w = ps.add("w", Shape{4, 3}, true);
  ps.finalize();
  for (index_t i = 0; i < 12; ++i) ps.value(w)[i] = 1.0f + static_cast<float>(i) * 0x1p-9f;
  WeightMirror m;
  const ParamStore<float>& cps = ps;
  CHECK(m.refresh(cps.values().data(), cps.size(), cps.version()));
  CHECK_FALSE(m.refresh(cps.values().data(), cps.size(), cps.version()));  // no change: no conversion
  const bf16_bits* lo = m.find(cps.value(w).data() + 3, 6);
  REQUIRE(lo != nullptr);
  for (index_t i = 0; i < 6; ++i) CHECK(from_bf16(lo[i]) == round_bf16(cps.value(w)[3 + i]));
  CHECK(m.find(cps.value(w).data() + 8, 5) == nullptr);  // runs past the buffer
  float other[4] = {};
  CHECK(m.find(other, 4) == nullptr);
  ps.values()[0] = 7.0f;  // a write through the store bumps its version
  CHECK(m.refresh(cps.values().data(), cps.size(), cps.version()));
  CHECK(from_bf16(m.find(cps.values().data(), 1)[0]) == 7.0f);
  CHECK(m.conversions() == 2);
}


TEST_CASE("a mirror's weights packed for the forward products: the same arithmetic, packed once per refresh") {
  // W [N, K] as a layer holds it, read as B = W^T (the forward products): oneDNN's packed copy in the mirror's
  // store (gemm_bf16_dnnl_packed) where this processor has its bf16 brgemm kernel and the weight and product
  // are large enough (N K >= 2^19, M N K >= 2^26 per block), else the plain path.
  const index_t N = 1024, K = 512;
  ParamStore<float> ps;
  const auto w = ps.add("w", Shape{N, K}, true);
  ps.finalize();
  const auto W0 = randf(Shape{N * K}, 11, 1.0);
  std::copy(W0.data(), W0.data() + N * K, ps.value(w).data());
  const auto bias = randf(Shape{N}, 12, 1.0);
  WeightMirror m;
  const ParamStore<float>& cps = ps;
  auto check = [&](index_t M, int threads, Tensor<float>& C) {
    set_num_threads(threads);
    m.refresh(cps);
    const Bf16Mixed prec{m.copies()};
    const auto X = randf(Shape{M * K}, 13 + M, 1.0);
    C = Tensor<float>(Shape{M, N});
    gemm_mixed_bias<float>(prec, Trans::N, Trans::T, M, N, K, X.data(), K, cps.value(w).data(), K, bias.data(), C.data(), N);
    double worst = 0;
    for (index_t i = 0; i < M; ++i)
      for (index_t j = 0; j < N; ++j) {
        double exact = bias[j], mag = std::abs(bias[j]);
        for (index_t k = 0; k < K; ++k) {
          const double t = static_cast<double>(round_bf16(X[i * K + k])) * round_bf16(cps.value(w)[j * K + k]);
          exact += t;
          mag += std::abs(t);
        }
        worst = std::max(worst, std::abs(C[i * N + j] - exact) / (mag * 1.01 + 1e-30));
      }
    CAPTURE(M);
    CAPTURE(threads);
    CHECK(worst <= 0x1p-20 * std::sqrt(static_cast<double>(K)) + 0x1p-23);
  };
  const bool brgemm = detail::bf16_kernel_name().rfind("onednn:brg", 0) == 0;
  Tensor<float> C1, C2;
  // 300 rows: two row blocks of 152, both reading the whole weight: packed once for both.
  check(300, 1, C1);
  CHECK(m.packed()->made() == (brgemm ? 1u : 0u));
  CHECK(m.packed()->entries() == (brgemm ? 1u : 0u));
  check(300, 2, C2);  // same split, same kernels: the same bits on 2 threads, and nothing packed again
  CHECK(std::memcmp(C1.data(), C2.data(), sizeof(float) * C1.numel()) == 0);
  check(600, 2, C2);  // four blocks of 152 rows: the same copy
  CHECK(m.packed()->made() == (brgemm ? 1u : 0u));
  {
    // A copy of the mirror has a store of its own, empty (its bf16 copy is another buffer).
    const WeightMirror copy = m;
    REQUIRE(copy.packed() != nullptr);
    CHECK(copy.packed() != m.packed());
    CHECK(copy.packed()->entries() == 0);
    CHECK(m.packed()->entries() == (brgemm ? 1u : 0u));
  }
  // A policy without the store (a training forward's: Limoe::prec) reads the plain copy, and packs nothing.
  {
    const Bf16Mixed plain{Bf16Copies{m.copies().base, m.copies().size, m.copies().lo, nullptr}};
    const auto X = randf(Shape{300 * K}, 13 + 300, 1.0);
    Tensor<float> C(Shape{300, N});
    gemm_mixed_bias<float>(plain, Trans::N, Trans::T, 300, N, K, X.data(), K, cps.value(w).data(), K, bias.data(), C.data(), N);
    CHECK(rel_max(C.cview(), C1.cview()) < 1e-5);
    CHECK(m.packed()->made() == (brgemm ? 1u : 0u));
  }
  // Every height from 128 to 400 rows, as single blocks on one thread: more exact-shape primitives than a
  // thread keeps (256), so the least recently used are dropped on the way; each against the widened product
  // of the same operands.
  {
    set_num_threads(1);
    const index_t R = 400;
    const auto X = randf(Shape{R * K}, 17, 1.0);
    detail::ScratchLease<bf16_bits> x16(R * K);
    to_bf16(X.data(), R * K, x16.data());
    const bf16_bits* w16 = m.find(cps.value(w).data(), N * K);
    REQUIRE(w16 != nullptr);
    Tensor<float> ref(Shape{R, N}), C(Shape{R, N});
    detail::gemm_bf16_widened(Trans::N, Trans::T, R, N, K, 1.0f, x16.data(), K, w16, K, 0.0f, ref.data(), N);
    double worst = 0;
    for (index_t M = 128; M <= R; ++M) {
      detail::gemm_bf16_serial(Trans::N, Trans::T, M, N, K, 1.0f, x16.data(), K, w16, K, 0.0f, C.data(), N, nullptr,
                               const_cast<PackedWeights*>(m.packed()));
      for (index_t i = 0; i < M * N; ++i) worst = std::max(worst, std::abs(static_cast<double>(C[i]) - ref[i]));
    }
    CHECK(worst <= 1e-4);  // |entries| about sqrt(K) = 23; fp32 sums in another order differ by ~1e-5
  }
  // A step changes the weights: the mirror is made again and the packed copies with it (a stale copy would
  // compute with the old weights and fail the check against the new ones).
  for (index_t i = 0; i < N * K; ++i) ps.values()[i] = -0.5f * W0[i] + 0.25f;
  const std::uint64_t before = m.packed()->made();
  check(300, 2, C1);
  if (brgemm) CHECK(m.packed()->made() == before + 1);
  set_num_threads(0);
}

namespace {
// Whether oneDNN's fp32 brgemm kernel (AVX-512: F, BW, DQ, VL) runs here, the kernel gemm_f32_packed uses.
bool f32_brgemm_here() {
#if defined(LIMOE_HAVE_DNNL) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}
}  // namespace

TEST_CASE("fp32 products read a model's large weights packed once: against a double product, packed once per change") {
  // W [N, K] as a layer holds it, read as B = W^T: under an Fp32 policy that carries a store (Fp32WeightStore, an
  // evaluation forward's), oneDNN's fp32 brgemm over a copy packed once (gemm_f32_packed) where the processor
  // has it and the weight and product are large enough (N K >= 2^19, M N K >= 2^26 per block); else gemm_serial.
  // Each result against a double product: |error| <= K 2^-24 sum_k |a_k b_k|, the bound of fp32 summation in
  // any order (a stale or misread weight is off by the size of the entries).
  const index_t N = 1024, K = 512;
  ParamStore<float> ps;
  const auto w = ps.add("w", Shape{N, K}, true), small = ps.add("small", Shape{N, K / 2}, true);
  ps.finalize();
  const auto W0 = randf(Shape{N * K}, 21, 1.0), S0 = randf(Shape{N * K / 2}, 22, 1.0);
  std::copy(W0.data(), W0.data() + N * K, ps.value(w).data());
  std::copy(S0.data(), S0.data() + N * K / 2, ps.value(small).data());
  const auto bias = randf(Shape{N}, 23, 1.0);
  const ParamStore<float>& cps = ps;
  Fp32WeightStore store;
  const bool brgemm = f32_brgemm_here();
  // kind 0: a layer's product with its bias (gemm_mixed_bias); 1: alpha 0.5 into C (gemm_mixed, beta 0);
  // 2: on the calling thread, accumulated into C = 1 (gemm_mixed_serial, beta 1). Kk: the weight's K.
  auto check = [&](int kind, index_t M, int threads, Tensor<float>& C, ParamRef wr, index_t Kk,
                   const Fp32* policy = nullptr) {
    set_num_threads(threads);
    const Fp32 prec = policy ? *policy : Fp32{store.weights(cps.values().data(), cps.size(), cps.version())};
    const float* W = cps.value(wr).data();
    const auto X = randf(Shape{M * Kk}, 13 + M + kind, 1.0);
    C = Tensor<float>(Shape{M, N});
    if (kind == 0) {
      gemm_mixed_bias<float>(prec, Trans::N, Trans::T, M, N, Kk, X.data(), Kk, W, Kk, bias.data(), C.data(), N);
    } else if (kind == 1) {
      gemm_mixed<float>(prec, Trans::N, Trans::T, M, N, Kk, 0.5f, X.data(), Kk, W, Kk, 0.0f, C.data(), N);
    } else {
      for (index_t i = 0; i < M * N; ++i) C[i] = 1.0f;
      gemm_mixed_serial<float>(prec, Trans::N, Trans::T, M, N, Kk, 1.0f, X.data(), Kk, W, Kk, 1.0f, C.data(), N);
    }
    double worst = 0;
    for (index_t i = 0; i < M; ++i)
      for (index_t j = 0; j < N; ++j) {
        double exact = kind == 0 ? bias[j] : kind == 2 ? 1.0 : 0.0, mag = std::abs(exact);
        const double alpha = kind == 1 ? 0.5 : 1.0;
        for (index_t k = 0; k < Kk; ++k) {
          const double t = alpha * X[i * Kk + k] * W[j * Kk + k];
          exact += t;
          mag += std::abs(t);
        }
        worst = std::max(worst, std::abs(C[i * N + j] - exact) / (mag + 1e-30));
      }
    INFO("kind " << kind << ", " << M << " rows, " << threads << " threads");
    CHECK(worst <= static_cast<double>(Kk) * 0x1p-24);
  };
  Tensor<float> C1, C2, C3;
  // 300 rows: two row blocks of 152 (detail::split_product), both reading the whole weight: packed once for both.
  check(0, 300, 1, C1, w, K);
  CHECK(store.packed().made() == (brgemm ? 1u : 0u));
  CHECK(store.packed().entries() == (brgemm ? 1u : 0u));
  check(0, 300, 2, C2, w, K);  // the same split, the same kernels: the same bits on 2 threads, nothing packed again
  CHECK(std::memcmp(C1.data(), C2.data(), sizeof(float) * C1.numel()) == 0);
  check(1, 600, 2, C2, w, K);  // four blocks, alpha 0.5, no bias: the same copy
  check(2, 300, 1, C2, w, K);  // one thread, one call of 300 rows, accumulating: the same copy
  CHECK(store.packed().made() == (brgemm ? 1u : 0u));
  // A policy without the store (a training forward's: Limoe::prec) packs nothing: the plain product, the same
  // values up to the summation order.
  {
    const Fp32 plain{};
    check(0, 300, 2, C3, w, K, &plain);
    CHECK(rel_max(C3.cview(), C1.cview()) < 1e-5);
    CHECK(store.packed().made() == (brgemm ? 1u : 0u));
  }
  // A weight of N K = 2^18 is left to the plain product (packing it pays less than compiling a shape costs).
  check(0, 300, 1, C3, small, K / 2);
  CHECK(store.packed().made() == (brgemm ? 1u : 0u));
  // A step changes the weights (a new version): the store empties and the copy is made again from the new
  // weights (a stale copy would compute with the old ones and fail the bound).
  for (index_t i = 0; i < N * K; ++i) ps.value(w)[i] = -0.5f * W0[i] + 0.25f;
  check(0, 300, 2, C1, w, K);
  CHECK(store.packed().made() == (brgemm ? 2u : 0u));
  CHECK(store.packed().entries() == (brgemm ? 1u : 0u));
  // A copy of the store starts empty.
  const Fp32WeightStore copy = store;
  CHECK(copy.packed().entries() == 0);
  set_num_threads(0);
}

TEST_CASE("every op under the bf16 policy: Cpu against Ref under bf16, and against Ref in fp32 within bf16's error") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (std::uint64_t seed : {3u, 77u}) {
      const auto cpu16 = run_ops<Cpu, Bf16Mixed>(seed);
      const auto ref16 = run_ops<Ref, Bf16Mixed>(seed);
      const auto ref32 = run_ops<Ref, Fp32>(seed);
      REQUIRE(cpu16.size() == ref16.size());
      for (std::size_t i = 0; i < cpu16.size(); ++i) {
        CAPTURE(cpu16[i].name);
        CAPTURE(threads);
        CAPTURE(seed);
        const double same = rel_max(cpu16[i].value.cview(), ref16[i].value.cview());
        const double vs32 = rel_max(cpu16[i].value.cview(), ref32[i].value.cview());
        CHECK(same <= 1e-3);
        CHECK(vs32 <= 2e-2);
        // bf16 did change the values (a policy that silently ran fp32 would fail here), except the gradients of
        // the biases that take the layer's output gradient as it comes: an fp32 sum of fp32 values under both
        // policies, over the rows in order as the reference sums them, so the same bits.
        if (cpu16[i].name == "linear.db" || cpu16[i].name == "attn.g7") CHECK(vs32 == 0);
        else CHECK(vs32 > 0);
      }
    }
  }
  set_num_threads(0);
}

TEST_CASE("attention's heads under bf16 at head widths of 16 to 80 (limoe's AMX or AVX-512 BF16 kernel where the "
          "processor has one)") {
  // Keys not a multiple of 32 or 16 and an odd key count (padded with zeros by the kernels), a key mask, 1 and 2
  // threads: Cpu against Ref under bf16 (the same rounded operands, sums in another order) and against Ref in
  // fp32. Head widths 32 and 64 take the AMX tile kernel where the processor has AMX; 16 to 80 the AVX-512 BF16
  // kernel where it has that and no AMX (80: H/14's heads); oneDNN's batched products elsewhere.
  for (const auto& [D, H, N] : {std::tuple<index_t, int, index_t>{64, 2, 7}, {128, 2, 40}, {128, 4, 33}, {64, 4, 17},
                                {160, 2, 50}, {128, 2, 49}}) {
    std::vector<Tensor<float>> w;
    for (int i = 0; i < 8; ++i) w.push_back(randf(i % 2 ? Shape{D} : Shape{D, D}, 60 + i, i % 2 ? 0.1 : 0.15));
    const AttentionWeights<float> aw{w[0].cview(), w[1].cview(), w[2].cview(), w[3].cview(),
                                     w[4].cview(), w[5].cview(), w[6].cview(), w[7].cview()};
    const index_t Bn = 3;
    Tensor<std::uint8_t> mask(Shape{Bn, N});
    for (index_t i = 0; i < Bn * N; ++i) mask[i] = i % N < N - 2 * (i / N) ? 1 : 0;
    const auto x = randf(Shape{Bn, N, D}, 70);
    // Also 3 queries of their own against the same keys (a pooling head's cross-attention: Nq != Nk).
    const auto xq = randf(Shape{Bn, 3, D}, 71);
    auto run = [&]<class Bk, class P>(Bk, P, bool cross) {
      Tensor<float> y(cross ? xq.shape() : x.shape());
      AttentionCache<float> cache;
      if (cross) Ops<Bk, float>::attention_forward(aw, H, xq.cview(), x.cview(), mask.cview(), y.view(), cache, P{});
      else Ops<Bk, float>::self_attention_forward(aw, H, x.cview(), mask.cview(), y.view(), cache, P{});
      return y;
    };
    for (bool cross : {false, true}) {
      const auto ref16 = run(Ref{}, Bf16Mixed{}, cross), ref32 = run(Ref{}, Fp32{}, cross);
      for (int threads : {1, 2}) {
        set_num_threads(threads);
        const auto cpu16 = run(Cpu{}, Bf16Mixed{}, cross);
        INFO("D ", D, " H ", H, " N ", N, " threads ", threads, " cross ", cross);
        CHECK(rel_max(cpu16.cview(), ref16.cview()) <= 1e-3);
        const double vs32 = rel_max(cpu16.cview(), ref32.cview());
        CHECK(vs32 <= 2e-2);
        CHECK(vs32 > 0);
      }
    }
  }
  set_num_threads(0);
}

namespace {
ModelConfig small_config() {
  ModelConfig c;
  c.image_size = {16, 16};
  c.channels = 3;
  c.patch = 4;
  c.width = 32;
  c.depth = 2;
  c.heads = 4;
  c.mlp_dim = 64;
  c.vocab_size = 20;
  c.text_len = 6;
  c.proj_dim = 16;
  c.experts = 4;
  c.top_k = 1;
  c.moe_blocks = {1};
  c.text_mask = true;
  c.router.noise_std = 0.0;
  return c;
}
}  // namespace

namespace {
// A model of type Model large enough that the dense MLP's and the experts' products take the packed path (N K >=
// 2^19, M N K >= 2^26): width 512, hidden 1024, 16 images of 64 patches, about 256 rows an expert. No noise and
// no capacity in either mode, so its evaluation and training forwards differ only in how the products read the
// weights (packed, and as they lie). Asserted: the embeddings within `tol` of the largest entry, the same
// routes; the copies made on the first evaluation forward (where `packs`: this processor has the kernel) and
// not by a training forward (unless `train_packs`), none made again for a second evaluation (the same bits),
// all again after the weights change (a stale copy would leave the embeddings where they were), and dropped
// by a training forward.
template <class Model>
void check_eval_packing(bool packs, bool train_packs, double tol) {
  ModelConfig c = small_config();
  c.image_size = {32, 32};
  c.width = 512;
  c.heads = 8;
  c.mlp_dim = 1024;
  c.proj_dim = 64;
  c.router.capacity_factor_train = 0.0;
  c.router.capacity_factor_eval = 0.0;
  Model m(c);
  m.init(7);
  const index_t n = 16;
  auto images = randf(Shape{n, 32, 32, 3}, 41);
  Tensor<std::int32_t> texts(Shape{n, c.text_len});
  for (index_t i = 0; i < n * c.text_len; ++i)
    texts[i] = i % c.text_len < 4 ? static_cast<std::int32_t>(2 + (i / c.text_len * 3 + i) % 17) : c.pad_id;
  REQUIRE(m.packed_weights() != nullptr);
  const auto ft = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  if (train_packs) CHECK(m.packed_weights()->made() >= 10);
  else CHECK(m.packed_weights()->made() == 0);
  const auto fe = m.forward(images.cview(), texts.cview(), Mode::Eval);
  const std::uint64_t made = m.packed_weights()->made();
  // The dense MLP's two weights and the experts' 2 x 4 blocks (the attention's [512, 512] are too small).
  if (packs) CHECK(made >= 10);
  else CHECK(made == 0);
  MESSAGE(std::string(Model::precision_type::name), " evaluation (packed) against training forward: images ",
          rel_max(fe.img_emb.cview(), ft.img_emb.cview()), ", texts ", rel_max(fe.txt_emb.cview(), ft.txt_emb.cview()));
  CHECK(rel_max(fe.img_emb.cview(), ft.img_emb.cview()) <= tol);
  CHECK(rel_max(fe.txt_emb.cview(), ft.txt_emb.cview()) <= tol);
  REQUIRE(fe.routes.size() == ft.routes.size());
  for (std::size_t b = 0; b < fe.routes.size(); ++b)
    CHECK(std::memcmp(fe.routes[b].data(), ft.routes[b].data(), sizeof(std::int32_t) * ft.routes[b].numel()) == 0);
  const auto fe2 = m.forward(images.cview(), texts.cview(), Mode::Eval);
  CHECK(m.packed_weights()->made() == made);
  CHECK(std::memcmp(fe2.img_emb.data(), fe.img_emb.data(), sizeof(float) * fe.img_emb.numel()) == 0);
  {  // new weights (an optimizer step, a load)
    auto values = m.params().values();
    for (index_t i = 0; i < values.numel(); ++i) values[i] *= 0.5f;
  }
  const auto fe3 = m.forward(images.cview(), texts.cview(), Mode::Eval);
  if (packs) CHECK(m.packed_weights()->made() >= 2 * made);
  const auto ft3 = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  if (!train_packs) CHECK(m.packed_weights()->entries() == 0);
  CHECK(rel_max(fe3.img_emb.cview(), ft3.img_emb.cview()) <= tol);
  CHECK(rel_max(fe3.img_emb.cview(), fe.img_emb.cview()) > 10 * tol);  // the weights did change
  // Packing turned off (set_keep_packed_weights: the memory is the user's): the copies held go, none are made,
  // and the evaluation forward reads the weights as the training forward does.
  const auto fe4 = m.forward(images.cview(), texts.cview(), Mode::Eval);
  CHECK((m.packed_weights()->entries() > 0) == packs);
  const std::uint64_t before_off = m.packed_weights()->made();
  m.set_keep_packed_weights(false);
  CHECK_FALSE(m.keep_packed_weights());
  CHECK(m.packed_weights()->entries() == 0);
  const auto fe5 = m.forward(images.cview(), texts.cview(), Mode::Eval);
  const auto ft5 = m.forward(images.cview(), texts.cview(), Mode::Train, 0);
  CHECK(m.packed_weights()->made() == before_off);
  CHECK(m.packed_weights()->entries() == 0);
  // The towers then give the training forward's bits (its routes, exactly); the `map` heads of an evaluation
  // forward fold the probe's query into the key and value weights (MapHeadCache::inference: fp32 products, the
  // training forward's are the policy's), so the embeddings agree within tol.
  REQUIRE(fe5.routes.size() == ft5.routes.size());
  for (std::size_t b = 0; b < fe5.routes.size(); ++b)
    CHECK(std::memcmp(fe5.routes[b].data(), ft5.routes[b].data(), sizeof(std::int32_t) * ft5.routes[b].numel()) == 0);
  CHECK(rel_max(fe5.img_emb.cview(), ft5.img_emb.cview()) <= tol);
  CHECK(rel_max(fe5.txt_emb.cview(), ft5.txt_emb.cview()) <= tol);
  CHECK(rel_max(fe5.img_emb.cview(), fe4.img_emb.cview()) <= tol);
  m.set_keep_packed_weights(true);
  (void)m.forward(images.cview(), texts.cview(), Mode::Eval);
  if (packs) CHECK(m.packed_weights()->made() > before_off);
}
}  // namespace

TEST_CASE("a bf16 model's evaluation forward reads its weights packed: the training forward's embeddings and routes") {
  // The packed copies are oneDNN's (gemm_dnnl_packed) where its bf16 kernel is brgemm; with AMX the tile
  // kernel's, and the training forward packs too (core/amx.hpp: packing costs less than a product saves). The
  // two kernels sum in different orders, so an fp32 result may differ in its last bit, and a hidden
  // activation's rounding to bf16 (the next product's operand) then falls the other way: 2^-8 of that element.
  // Measured 1.4e-3 and 2.1e-3 of the largest entry; a wrong or stale packed copy moves the embeddings by far more.
  const bool brgemm = detail::bf16_kernel_name().rfind("onednn:brg", 0) == 0;
  const bool amx = amx::available();
  check_eval_packing<Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cpu, Bf16Mixed>>(brgemm || amx, amx, 1e-2);
}

TEST_CASE("an fp32 model's evaluation forward reads its large weights packed: the training forward's embeddings") {
  // The fp32 store (gemm_f32_packed) where oneDNN has its fp32 brgemm kernel; the training forward reads the
  // parameters as they lie (oneDNN's sgemm, which packs inside every call). Both are fp32 sums of the same terms
  // in different orders: 1e-4 of the largest entry after two blocks and the heads (measured: under 1e-6).
  check_eval_packing<Limoe<float>>(f32_brgemm_here(), false, 1e-4);
}

TEST_CASE("routing under bf16 is decided on fp32 gates: the MoE layer routes identically under both policies") {
  const index_t N = 96, D = 32, M = 48;
  moe::MoeConfig mc;
  mc.experts = 8;
  mc.top_k = 2;
  mc.router.capacity_factor_train = 1.0;
  mc.router.noise_std = 1.0;
  auto x = randf(Shape{N, D}, 9), rw = randf(Shape{8, D}, 10, 0.3);
  auto w1 = randf(Shape{8, M, D}, 11, 0.2), b1 = randf(Shape{8, M}, 12, 0.1);
  auto w2 = randf(Shape{8, D, M}, 13, 0.2), b2 = randf(Shape{8, D}, 14, 0.1);
  const moe::MoeParams<float> p{rw.cview(), w1.cview(), b1.cview(), w2.cview(), b2.cview()};
  std::vector<std::uint8_t> modality(N);
  for (index_t i = 0; i < N; ++i) modality[static_cast<std::size_t>(i)] = i % 5 == 0 ? 1 : 0;
  Tensor<float> y32(Shape{N, D}), y16(Shape{N, D});
  moe::MoeContext<float> c32, c16;
  moe::moe_forward<float>(mc, p, x.cview(), modality, Mode::Train, Rng(4), y32.view(), c32, nullptr, Fp32{});
  moe::moe_forward<float>(mc, p, x.cview(), modality, Mode::Train, Rng(4), y16.view(), c16, nullptr, Bf16Mixed{});
  REQUIRE(c32.routes().numel() == c16.routes().numel());
  CHECK(std::memcmp(c32.routes().data(), c16.routes().data(), sizeof(std::int32_t) * c32.routes().numel()) == 0);
  CHECK(c32.losses.total == c16.losses.total);  // the auxiliary losses come from the same fp32 gates
  const double d = rel_max(y16.cview(), y32.cview());
  CHECK(d > 0);
  CHECK(d <= 2e-2);
}

TEST_CASE("a bf16 model: the weights' copy is made once per optimizer step, and it learns like the fp32 model") {
  const ModelConfig cfg = small_config();
  Limoe<float> m32(cfg);
  Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cpu, Bf16Mixed> m16(cfg);
  m32.init(5);
  m16.init(5);
  AdamWConfig oc;
  oc.lr = 3e-3;
  AdamW<float> o32(oc, m32.params()), o16(oc, m16.params());
  const index_t n = 8;
  auto images = randf(Shape{n, 16, 16, 3}, 31);
  Tensor<std::int32_t> texts(Shape{n, cfg.text_len});
  for (index_t i = 0; i < n * cfg.text_len; ++i)
    texts[i] = i % cfg.text_len < 4 ? static_cast<std::int32_t>(2 + (i / cfg.text_len * 3 + i) % 17) : cfg.pad_id;
  double first32 = 0, first16 = 0, last32 = 0, last16 = 0;
  const int steps = 30;
  for (int s = 0; s < steps; ++s) {
    auto f32 = m32.forward(images.cview(), texts.cview(), Mode::Train, static_cast<std::uint64_t>(s));
    auto f16 = m16.forward(images.cview(), texts.cview(), Mode::Train, static_cast<std::uint64_t>(s));
    CHECK(m16.weight_conversions() == static_cast<std::uint64_t>(s + 1));
    const auto l32 = m32.loss(f32), l16 = m16.loss(f16);
    if (s == 0) first32 = l32.total, first16 = l16.total;
    last32 = l32.total, last16 = l16.total;
    m32.zero_grad(), m16.zero_grad();
    m32.backward(f32), m16.backward(f16);
    // Another forward before the optimizer step finds the copy current: no conversion.
    (void)m16.forward(images.cview(), texts.cview(), Mode::Eval);
    CHECK(m16.weight_conversions() == static_cast<std::uint64_t>(s + 1));
    o32.update(m32.params(), oc.lr), o16.update(m16.params(), oc.lr);
  }
  CHECK(m32.weight_conversions() == 0);
  MESSAGE("loss fp32 " << first32 << " -> " << last32 << ", bf16 " << first16 << " -> " << last16);
  CHECK(std::abs(first16 - first32) <= 1e-2 * std::abs(first32));
  CHECK(last16 < 0.5 * first16);  // it learned the 8 pairs
  CHECK(std::abs(last16 - last32) <= 0.1 * first32);
}
