// tests/unit/precision_cases.hpp: the ops that take a precision policy, run on one backend under one policy
// (run_ops<B, P>): linear, self-attention with a key mask, the patch embedding and the experts, forward and
// backward, on the same random inputs for every backend. tests/unit/test_precision.cpp compares Cpu with Ref
// through it, tests/cuda_emu/test_cuda_emu_backend.cpp the CUDA backend (on host tensors, CudaFromHost).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limoe/backend/ops.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/moe/ops.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <string>
#include <vector>

namespace limoe::precision_cases {

inline Tensor<float> randf(Shape s, std::uint64_t seed, double scale = 1.0) { return testing::randn<float>(s, seed, scale); }

// The largest |a - b| over the largest |b| (b the reference), or over 1 when every |b| is below 1: a
// gradient that is zero in exact arithmetic (a key bias's) holds only rounding noise, compared absolutely.
inline double rel_max(CView<float> a, CView<float> b) {
  REQUIRE(a.numel() == b.numel());
  double num = 0, den = 1;
  for (index_t i = 0; i < a.numel(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / den;
}

// Runs the ops that take a policy on backend B under policy P and returns every output and gradient.
struct Named {
  std::string name;
  Tensor<float> value;
};

template <class B, class P>
std::vector<Named> run_ops(std::uint64_t s) {
  using O = Ops<B, float>;
  const P prec{};
  std::vector<Named> o;
  auto put = [&](const std::string& n, const Tensor<float>& t) { o.push_back({n, t}); };
  {  // linear
    const index_t R = 41, I = 48, J = 40;
    auto x = randf(Shape{R, I}, s), W = randf(Shape{J, I}, s + 1, 0.2), b = randf(Shape{J}, s + 2);
    auto dy = randf(Shape{R, J}, s + 3);
    Tensor<float> y(Shape{R, J}), dx(Shape{R, I}), dW(Shape{J, I}), db(Shape{J});
    O::linear_forward(x.cview(), W.cview(), b.cview(), y.view(), prec);
    O::linear_backward(x.cview(), W.cview(), dy.cview(), dx.view(), dW.view(), db.view(), prec);
    put("linear.y", y), put("linear.dx", dx), put("linear.dW", dW), put("linear.db", db);
  }
  {  // self-attention with a key mask
    const index_t Bn = 3, N = 7, D = 32;
    const int H = 4;
    std::vector<Tensor<float>> w, g;
    for (int i = 0; i < 8; ++i) {
      w.push_back(randf(i % 2 ? Shape{D} : Shape{D, D}, s + 10 + i, i % 2 ? 0.1 : 0.2));
      g.emplace_back(w.back().shape());
    }
    const AttentionWeights<float> aw{w[0].cview(), w[1].cview(), w[2].cview(), w[3].cview(),
                                     w[4].cview(), w[5].cview(), w[6].cview(), w[7].cview()};
    const AttentionGrads<float> ag{g[0].view(), g[1].view(), g[2].view(), g[3].view(),
                                   g[4].view(), g[5].view(), g[6].view(), g[7].view()};
    Tensor<std::uint8_t> mask(Shape{Bn, N});
    for (index_t i = 0; i < Bn * N; ++i) mask[i] = i % N < N - i / N ? 1 : 0;
    auto x = randf(Shape{Bn, N, D}, s + 30), dy = randf(Shape{Bn, N, D}, s + 31);
    Tensor<float> y(Shape{Bn, N, D}), dx(Shape{Bn, N, D});
    AttentionCache<float> cache;
    O::self_attention_forward(aw, H, x.cview(), mask.cview(), y.view(), cache, prec);
    O::self_attention_backward(aw, H, x.cview(), mask.cview(), cache, dy.cview(), dx.view(), ag, prec);
    put("attn.y", y), put("attn.dx", dx);
    for (int i = 0; i < 8; ++i) put("attn.g" + std::to_string(i), g[static_cast<std::size_t>(i)]);
  }
  {  // patch embedding
    auto img = randf(Shape{2, 8, 8, 3}, s + 40), W = randf(Shape{24, 48}, s + 41, 0.2), b = randf(Shape{24}, s + 42);
    auto pos = randf(Shape{4, 24}, s + 43), dy = randf(Shape{2, 4, 24}, s + 44);
    Tensor<float> patches(Shape{2, 4, 48}), y(Shape{2, 4, 24}), dimg(img.shape()), dW(W.shape()), db(b.shape()),
        dpos(pos.shape());
    O::patch_embed_forward(img.cview(), 4, W.cview(), b.cview(), pos.cview(), patches.view(), y.view(), prec);
    O::patch_embed_backward(img.cview(), 4, patches.cview(), W.cview(), dy.cview(), dimg.view(), dW.view(), db.view(),
                            dpos.view(), prec);
    put("patch.y", y), put("patch.dimg", dimg), put("patch.dW", dW);
  }
  {  // experts
    const index_t N = 40, D = 32, M = 48;
    const int E = 4;
    Tensor<std::int32_t> route(Shape{N, 1});
    // Expert 2 gets no token (an empty block between two full ones), and every ninth token is dropped.
    for (index_t t = 0; t < N; ++t) {
      const auto e = static_cast<std::int32_t>((t * 7) % E);
      route[t] = t % 9 == 4 ? -1 : e == 2 ? 0 : e;
    }
    moe::DispatchPlan plan;
    O::make_dispatch_plan(route.cview(), E, plan);
    const index_t A = plan.A;
    auto x = randf(Shape{N, D}, s + 50);
    auto w1 = randf(Shape{E, M, D}, s + 51, 0.2), b1 = randf(Shape{E, M}, s + 52, 0.1);
    auto w2 = randf(Shape{E, D, M}, s + 53, 0.2), b2 = randf(Shape{E, D}, s + 54, 0.1);
    auto dye = randf(Shape{A, D}, s + 55);
    Tensor<float> gw1(w1.shape()), gb1(b1.shape()), gw2(w2.shape()), gb2(b2.shape());
    Tensor<float> xe(Shape{A, D}), hpre(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), dh(Shape{A, M}), dxe(Shape{A, D});
    moe::ExpertScratch scratch;
    const moe::ExpertWeights<float> w{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
    O::dispatch_forward(plan, x.cview(), xe.view());
    O::expert_mlp_forward(plan, w, GeluKind::Erf, xe.cview(), hpre.view(), h.view(), ye.view(), scratch, prec);
    O::expert_mlp_backward(plan, w, GeluKind::Erf, xe.cview(), hpre.cview(), h.cview(), dye.cview(), dh.view(),
                           dxe.view(), moe::ExpertGrads<float>{gw1.view(), gb1.view(), gw2.view(), gb2.view()}, scratch,
                           prec);
    put("experts.ye", ye), put("experts.dxe", dxe), put("experts.dw1", gw1), put("experts.dw2", gw2);
    put("experts.db1", gb1);
  }
  return o;
}


}  // namespace limoe::precision_cases
