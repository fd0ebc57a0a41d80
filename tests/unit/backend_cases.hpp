// tests/unit/backend_cases.hpp: the backend harness's cases (used by tests/unit/test_backends.cpp for the CPU
// backends and tests/cuda_emu/test_cuda_emu_backend.cpp for the CUDA backend on emulated threads): every op of
// the backend op table (backend/ops.hpp), forward and backward, on the same random inputs as the Ref backend.
//
// Each case is a function template over the backend that builds its inputs from a seed, runs the op's forward
// and backward through Ops<B, T>, and returns every output and gradient by name. compare() runs it on B and on
// Ref and compares output by output (relative to the largest reference value): in double a tolerance of 1e-10
// says "the same arithmetic up to summation order", in float 2e-5 (summation order at float precision), at 1
// and 2 threads. The cases build host tensors, so they run on backends whose memory the host can read (Ref,
// Cpu, and Cuda under emulation).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limoe/backend/ops.hpp>
#include <limoe/core/parallel.hpp>
#include <limoe/core/rng.hpp>
#include <limoe/moe/ops.hpp>
#include <limoe/ops/ops.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace limoe::backend_cases {


struct Named {
  std::string name;
  Tensor<double> value;
};
using Outputs = std::vector<Named>;

template <class T>
void put(Outputs& out, const std::string& name, CView<T> v) {
  Tensor<double> d(v.shape());
  for (index_t i = 0; i < v.numel(); ++i) d[i] = static_cast<double>(v[i]);
  out.push_back({name, std::move(d)});
}
template <class T>
void put(Outputs& out, const std::string& name, const Tensor<T>& t) {
  put<T>(out, name, t.cview());
}
void put(Outputs& out, const std::string& name, double v) {
  out.push_back({name, Tensor<double>::from(Shape{1}, {v})});
}

template <class T>
Tensor<T> randn(Shape s, std::uint64_t seed, double scale = 1.0) {
  return testing::randn<T>(s, seed, scale);
}

// A key mask [B, N] with a masked tail of varying length (row 0 keeps all keys; one row keeps a single key).
Tensor<std::uint8_t> tail_mask(index_t B, index_t N) {
  Tensor<std::uint8_t> m(Shape{B, N});
  for (index_t b = 0; b < B; ++b)
    for (index_t n = 0; n < N; ++n) m[b * N + n] = n < std::max<index_t>(1, N - (b * 2) % N) ? 1 : 0;
  return m;
}

// ---- the cases -------------------------------------------------------------------------------------------

template <class B, class T>
Outputs case_linear(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t R = 37, I = 19, J = 23;
  auto x = randn<T>(Shape{R, I}, s), W = randn<T>(Shape{J, I}, s + 1, 0.3), b = randn<T>(Shape{J}, s + 2);
  auto dy = randn<T>(Shape{R, J}, s + 3);
  Tensor<T> y(Shape{R, J}), dx(Shape{R, I}), dW(Shape{J, I}), db(Shape{J});
  O::linear_forward(x.cview(), W.cview(), b.cview(), y.view());
  O::linear_backward(x.cview(), W.cview(), dy.cview(), dx.view(), dW.view(), db.view());
  Outputs o;
  put(o, "y", y), put(o, "dx", dx), put(o, "dW", dW), put(o, "db", db);
  return o;
}

template <class B, class T>
Outputs case_layernorm(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t R = 29, D = 48;
  auto x = randn<T>(Shape{R, D}, s, 2.0), g = randn<T>(Shape{D}, s + 1), b = randn<T>(Shape{D}, s + 2);
  auto dy = randn<T>(Shape{R, D}, s + 3);
  Tensor<T> y(Shape{R, D}), mean(Shape{R}), rstd(Shape{R}), dx(Shape{R, D}), dg(Shape{D}), db(Shape{D});
  O::layernorm_forward(x.cview(), g.cview(), b.cview(), T(1e-6), y.view(), mean.view(), rstd.view());
  O::layernorm_backward(x.cview(), g.cview(), mean.cview(), rstd.cview(), dy.cview(), dx.view(), dg.view(), db.view());
  Outputs o;
  put(o, "y", y), put(o, "mean", mean), put(o, "rstd", rstd), put(o, "dx", dx), put(o, "dg", dg), put(o, "db", db);
  return o;
}

template <class B, class T>
Outputs case_gelu(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t R = 17, M = 40;
  Outputs o;
  for (GeluKind kind : {GeluKind::Erf, GeluKind::Tanh}) {
    const std::string k = kind == GeluKind::Erf ? "erf." : "tanh.";
    auto x = randn<T>(Shape{R, M}, s, 3.0), dy = randn<T>(Shape{R, M}, s + 1), bias = randn<T>(Shape{M}, s + 2);
    Tensor<T> y(Shape{R, M}), dx(Shape{R, M}), pre = x, y2(Shape{R, M});
    O::gelu_forward(kind, x.cview(), y.view());
    O::gelu_backward(kind, x.cview(), dy.cview(), dx.view());
    O::bias_gelu_forward(kind, bias.cview(), pre.view(), y2.view());
    put(o, k + "y", y), put(o, k + "dx", dx), put(o, k + "bias_pre", pre), put(o, k + "bias_y", y2);
  }
  return o;
}

template <class B, class T>
Outputs case_softmax(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t R = 13, C = 31;
  auto x = randn<T>(Shape{R, C}, s, 4.0), dy = randn<T>(Shape{R, C}, s + 1);
  Tensor<T> y(Shape{R, C}), dx(Shape{R, C});
  O::softmax_forward(x.cview(), y.view());
  O::softmax_backward(y.cview(), dy.cview(), dx.view());
  Outputs o;
  put(o, "y", y), put(o, "dx", dx);
  return o;
}

template <class T>
struct AttnParams {
  Tensor<T> w[8], g[8];
  explicit AttnParams(index_t D, std::uint64_t s) {
    for (int i = 0; i < 8; ++i) {
      const bool bias = i % 2 == 1;
      w[i] = randn<T>(bias ? Shape{D} : Shape{D, D}, s + static_cast<std::uint64_t>(i), bias ? 0.1 : 0.3);
      g[i] = Tensor<T>(w[i].shape());
    }
  }
  AttentionWeights<T> weights() const {
    return {w[0].cview(), w[1].cview(), w[2].cview(), w[3].cview(), w[4].cview(), w[5].cview(), w[6].cview(), w[7].cview()};
  }
  AttentionGrads<T> grads() {
    return {g[0].view(), g[1].view(), g[2].view(), g[3].view(), g[4].view(), g[5].view(), g[6].view(), g[7].view()};
  }
  void put_grads(Outputs& o, const std::string& p) const {
    for (int i = 0; i < 8; ++i) put(o, p + "g" + std::to_string(i), g[i]);
  }
};

template <class B, class T>
Outputs case_attention(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t Bn = 3, Nq = 5, Nk = 9, D = 24;
  const int H = 4;
  AttnParams<T> p(D, s);
  auto xq = randn<T>(Shape{Bn, Nq, D}, s + 10), xkv = randn<T>(Shape{Bn, Nk, D}, s + 11);
  auto dy = randn<T>(Shape{Bn, Nq, D}, s + 12);
  const auto mask = tail_mask(Bn, Nk);
  Tensor<T> y(Shape{Bn, Nq, D}), dxq(Shape{Bn, Nq, D}), dxkv(Shape{Bn, Nk, D});
  AttentionCache<T> cache;
  O::attention_forward(p.weights(), H, xq.cview(), xkv.cview(), mask.cview(), y.view(), cache);
  O::attention_backward(p.weights(), H, xq.cview(), xkv.cview(), mask.cview(), cache, dy.cview(), dxq.view(),
                        dxkv.view(), p.grads());
  Outputs o;
  put(o, "y", y), put(o, "dxq", dxq), put(o, "dxkv", dxkv);
  p.put_grads(o, "cross.");
  // Self-attention, unmasked (the image path) and masked (the text path).
  for (int masked = 0; masked < 2; ++masked) {
    AttnParams<T> q(D, s + 100);
    auto x = randn<T>(Shape{Bn, Nk, D}, s + 20), dys = randn<T>(Shape{Bn, Nk, D}, s + 21);
    Tensor<T> ys(Shape{Bn, Nk, D}), dx(Shape{Bn, Nk, D});
    AttentionCache<T> c2;
    const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
    O::self_attention_forward(q.weights(), H, x.cview(), m, ys.view(), c2);
    O::self_attention_backward(q.weights(), H, x.cview(), m, c2, dys.cview(), dx.view(), q.grads());
    const std::string k = masked ? "self_masked." : "self.";
    put(o, k + "y", ys), put(o, k + "dx", dx);
    q.put_grads(o, k);
  }
  return o;
}

template <class B, class T>
Outputs case_embeddings(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t Bn = 2, Hh = 12, Ww = 8, C = 3, D = 10, V = 11, L = 6;
  const int P = 4;
  const index_t N = (Hh / P) * (Ww / P), F = P * P * C;
  auto img = randn<T>(Shape{Bn, Hh, Ww, C}, s), W = randn<T>(Shape{D, F}, s + 1, 0.2), b = randn<T>(Shape{D}, s + 2);
  auto pos = randn<T>(Shape{N, D}, s + 3), dy = randn<T>(Shape{Bn, N, D}, s + 4);
  Tensor<T> patches(Shape{Bn, N, F}), y(Shape{Bn, N, D}), dimg(Shape{Bn, Hh, Ww, C}), dW(Shape{D, F}), db(Shape{D}),
      dpos(Shape{N, D});
  O::patch_embed_forward(img.cview(), P, W.cview(), b.cview(), pos.cview(), patches.view(), y.view());
  O::patch_embed_backward(img.cview(), P, patches.cview(), W.cview(), dy.cview(), dimg.view(), dW.view(), db.view(),
                          dpos.view());
  Outputs o;
  put(o, "patch.y", y), put(o, "patch.dimg", dimg), put(o, "patch.dW", dW), put(o, "patch.db", db),
      put(o, "patch.dpos", dpos);
  Tensor<std::int32_t> ids(Shape{Bn, L});
  for (index_t i = 0; i < Bn * L; ++i) ids[i] = static_cast<std::int32_t>((i * 7 + 3) % V);  // repeats included
  auto table = randn<T>(Shape{V, D}, s + 5), tpos = randn<T>(Shape{L, D}, s + 6), tdy = randn<T>(Shape{Bn, L, D}, s + 7);
  Tensor<T> ty(Shape{Bn, L, D}), dtable(Shape{V, D}), dtpos(Shape{L, D});
  O::token_embed_forward(ids.cview(), table.cview(), tpos.cview(), ty.view());
  O::token_embed_backward(ids.cview(), tdy.cview(), dtable.view(), dtpos.view());
  put(o, "token.y", ty), put(o, "token.dtable", dtable), put(o, "token.dpos", dtpos);
  return o;
}

template <class B, class T>
Outputs case_pooling(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t Bn = 4, N = 7, D = 16, M = 24;
  const int H = 2;
  auto x = randn<T>(Shape{Bn, N, D}, s), dy = randn<T>(Shape{Bn, D}, s + 1);
  const auto mask = tail_mask(Bn, N);
  Outputs o;
  for (Pooling kind : {Pooling::Gap, Pooling::First, Pooling::Last})
    for (int masked = 0; masked < 2; ++masked) {
      const CView<std::uint8_t> m = masked ? mask.cview() : CView<std::uint8_t>{};
      Tensor<T> y(Shape{Bn, D}), dx(Shape{Bn, N, D});
      O::pool_forward(kind, x.cview(), m, y.view());
      O::pool_backward(kind, m, dy.cview(), dx.view());
      const std::string k = std::string(pooling_name(kind)) + (masked ? ".masked." : ".");
      put(o, k + "y", y), put(o, k + "dx", dx);
    }
  // The map head, masked.
  AttnParams<T> a(D, s + 50);
  auto probe = randn<T>(Shape{D}, s + 60), lng = randn<T>(Shape{D}, s + 61), lnb = randn<T>(Shape{D}, s + 62);
  auto w1 = randn<T>(Shape{M, D}, s + 63, 0.3), b1 = randn<T>(Shape{M}, s + 64, 0.1);
  auto w2 = randn<T>(Shape{D, M}, s + 65, 0.3), b2 = randn<T>(Shape{D}, s + 66, 0.1);
  Tensor<T> gprobe(Shape{D}), glng(Shape{D}), glnb(Shape{D}), gw1(Shape{M, D}), gb1(Shape{M}), gw2(Shape{D, M}),
      gb2(Shape{D});
  const MapHeadWeights<T> w{probe.cview(), a.weights(), lng.cview(), lnb.cview(), w1.cview(), b1.cview(), w2.cview(), b2.cview()};
  const MapHeadGrads<T> g{gprobe.view(), a.grads(), glng.view(), glnb.view(), gw1.view(), gb1.view(), gw2.view(), gb2.view()};
  Tensor<T> y(Shape{Bn, D}), dx(Shape{Bn, N, D});
  MapHeadCache<T> cache;
  O::map_head_forward(w, H, GeluKind::Erf, T(1e-6), x.cview(), mask.cview(), y.view(), cache);
  O::map_head_backward(w, H, GeluKind::Erf, x.cview(), mask.cview(), cache, dy.cview(), dx.view(), g);
  put(o, "map.y", y), put(o, "map.dx", dx), put(o, "map.dprobe", gprobe), put(o, "map.dln_g", glng),
      put(o, "map.dln_b", glnb), put(o, "map.dw1", gw1), put(o, "map.db1", gb1), put(o, "map.dw2", gw2),
      put(o, "map.db2", gb2);
  a.put_grads(o, "map.attn.");
  return o;
}

template <class B, class T>
Outputs case_l2_contrastive(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t n = 9, P = 12;
  auto u = randn<T>(Shape{n, P}, s), v = randn<T>(Shape{n, P}, s + 1);
  auto dzi_up = randn<T>(Shape{n, P}, s + 2);
  Tensor<T> zi(Shape{n, P}), zt(Shape{n, P}), ni(Shape{n}), nt(Shape{n}), du(Shape{n, P});
  O::l2_normalize_forward(u.cview(), zi.view(), ni.view());
  O::l2_normalize_forward(v.cview(), zt.view(), nt.view());
  O::l2_normalize_backward(u.cview(), zi.cview(), ni.cview(), dzi_up.cview(), du.view());
  Outputs o;
  put(o, "l2.z", zi), put(o, "l2.norms", ni), put(o, "l2.du", du);
  for (double theta : {2.0, 5.0}) {  // 5 > log(100): the clamped branch
    Tensor<T> logits(Shape{n, n}), dzi(Shape{n, P}), dzt(Shape{n, P});
    const auto r = O::contrastive_forward(zi.cview(), zt.cview(), T(theta), T(100), logits.view());
    T dtheta = 0;
    O::contrastive_backward(zi.cview(), zt.cview(), T(theta), T(100), logits.cview(), T(1), dzi.view(), dzt.view(),
                            &dtheta);
    const std::string k = "contrastive" + std::to_string(static_cast<int>(theta)) + ".";
    put(o, k + "loss", r.loss), put(o, k + "acc_i2t", r.accuracy_i2t), put(o, k + "acc_t2i", r.accuracy_t2i),
        put(o, k + "scale", r.scale), put(o, k + "logits", logits), put(o, k + "dzi", dzi), put(o, k + "dzt", dzt),
        put(o, k + "dtheta", static_cast<double>(dtheta));
  }
  return o;
}

template <class B, class T>
Outputs case_moe_ops(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t N = 41, D = 12, M = 20;
  const int E = 5, K = 2;
  // Distinct experts per token, a quarter of the choices dropped, expert E-1 never chosen.
  Tensor<std::int32_t> route(Shape{N, K});
  const Rng rng(s);
  for (index_t t = 0; t < N; ++t) {
    const auto e0 = static_cast<std::int32_t>(rng.uniform(t, 0) * (E - 1));
    const std::int32_t e1 = (e0 + 1 + static_cast<std::int32_t>(rng.uniform(t, 1) * (E - 2))) % (E - 1);
    route[t * K] = rng.uniform(t, 2) < 0.25 ? -1 : e0;
    route[t * K + 1] = rng.uniform(t, 3) < 0.25 ? -1 : e1;
  }
  moe::DispatchPlan plan;
  O::make_dispatch_plan(route.cview(), E, plan);
  const index_t A = plan.A;
  auto x = randn<T>(Shape{N, D}, s + 1), gates = randn<T>(Shape{N, E}, s + 2, 0.3), dy = randn<T>(Shape{N, D}, s + 3);
  auto w1 = randn<T>(Shape{E, M, D}, s + 4, 0.4), b1 = randn<T>(Shape{E, M}, s + 5, 0.1);
  auto w2 = randn<T>(Shape{E, D, M}, s + 6, 0.4), b2 = randn<T>(Shape{E, D}, s + 7, 0.1);
  Tensor<T> gw1(w1.shape()), gb1(b1.shape()), gw2(w2.shape()), gb2(b2.shape());
  Tensor<T> xe(Shape{A, D}), hpre(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), y(Shape{N, D});
  Tensor<T> dye(Shape{A, D}), dgate(Shape{A}), dh(Shape{A, M}), dxe(Shape{A, D}), dx(Shape{N, D});
  moe::ExpertScratch scratch;
  const moe::ExpertWeights<T> w{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
  O::dispatch_forward(plan, x.cview(), xe.view());
  O::expert_mlp_forward(plan, w, GeluKind::Erf, xe.cview(), hpre.view(), h.view(), ye.view(), scratch);
  O::combine_forward(plan, gates.cview(), route.cview(), ye.cview(), y.view());
  O::combine_backward(plan, gates.cview(), route.cview(), ye.cview(), dy.cview(), dye.view(), dgate.view());
  O::expert_mlp_backward(plan, w, GeluKind::Erf, xe.cview(), hpre.cview(), h.cview(), dye.cview(), dh.view(), dxe.view(),
                         moe::ExpertGrads<T>{gw1.view(), gb1.view(), gw2.view(), gb2.view()}, scratch);
  O::dispatch_backward(plan, dxe.cview(), dx.view());
  Outputs o;
  put(o, "plan.offsets", plan.offsets.cview()), put(o, "plan.row_token", plan.row_token.cview()),
      put(o, "plan.slot_row", plan.slot_row.cview());
  put(o, "xe", xe), put(o, "hpre", hpre), put(o, "h", h), put(o, "ye", ye), put(o, "y", y), put(o, "dye", dye),
      put(o, "dgate", dgate), put(o, "dh", dh), put(o, "dxe", dxe), put(o, "dx", dx), put(o, "dw1", gw1),
      put(o, "db1", gb1), put(o, "dw2", gw2), put(o, "db2", gb2);
  return o;
}

// The row moves: the residual add, and a permutation's gather and scatter (the model's routing-group order).
template <class B, class T>
Outputs case_rows(std::uint64_t s) {
  using O = Ops<B, T>;
  const index_t R = 23, D = 12;
  auto x = randn<T>(Shape{R, D}, s), y = randn<T>(Shape{R, D}, s + 1);
  Tensor<std::int64_t> perm(Shape{R});
  for (index_t i = 0; i < R; ++i) perm[i] = (i * 7 + static_cast<index_t>(s % 5)) % R;  // 7 is prime to 23
  Tensor<T> gathered(Shape{R, D}), scattered(Shape{R, D});
  O::add_into(x.cview(), y.view());
  O::gather_rows(y.cview(), perm.cview(), gathered.view());
  O::scatter_rows(gathered.cview(), perm.cview(), scattered.view());
  // to_bf16 (a weight mirror's conversion): the bits must be identical on every backend, compared as high and
  // low bytes (at most 255, so float's 2e-5 relative tolerance is far below one unit). Values at ties (x + 2^-8
  // for |x| near 1) and beyond bf16's range (x 1e38) too.
  Tensor<float> f(Shape{R, D});
  for (index_t i = 0; i < R * D; ++i) f[i] = static_cast<float>(x[i]) * (i % 5 == 0 ? 1e38f : 1.0f) + (i % 7 == 0 ? 0x1p-8f : 0.0f);
  Tensor<std::uint16_t> bits(Shape{R, D});
  O::to_bf16(f.cview(), bits.view());
  Outputs o;
  Tensor<double> hi(Shape{R, D}), lo(Shape{R, D});
  for (index_t i = 0; i < R * D; ++i) hi[i] = bits[i] >> 8, lo[i] = bits[i] & 0xff;
  put(o, "y", y), put(o, "gathered", gathered), put(o, "scattered", scattered), put(o, "to_bf16.hi", hi),
      put(o, "to_bf16.lo", lo);
  return o;
}

// ---- the harness -----------------------------------------------------------------------------------------

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-5;
}

// The CPU thread counts a backend runs at: the Cpu backend's results must not depend on them; the others do
// not use the CPU thread pool (the CUDA backend's parallelism is its launch geometry), so once is enough.
template <class B>
std::vector<int> thread_counts() {
  if constexpr (std::is_same_v<B, Cpu>) return {1, 2};
  else return {1};
}

// The seeds each case runs at (one under LIMOE_HARNESS_QUICK: the ThreadSanitizer builds, where a race shows
// on any input and every launch costs ten times more).
inline std::vector<std::uint64_t> seeds() {
#if defined(LIMOE_HARNESS_QUICK)
  return {11u};
#else
  return {11u, 12345u};
#endif
}

template <class B, class T, class Case>
void compare(const char* name, Case&& run) {
  for (int threads : thread_counts<B>()) {
    set_num_threads(threads);
    for (std::uint64_t seed : seeds()) {
      const Outputs got = run.template operator()<B, T>(seed);
      const Outputs want = run.template operator()<Ref, T>(seed);
      REQUIRE(got.size() == want.size());
      for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(name);
        CAPTURE(B::name);
        CAPTURE(threads);
        CAPTURE(seed);
        CAPTURE(got[i].name);
        REQUIRE(got[i].name == want[i].name);
        REQUIRE(got[i].value.shape() == want[i].value.shape());
        CHECK(testing::max_diff(got[i].value, want[i].value) <= tolerance<T>());
      }
    }
  }
  set_num_threads(0);
}

template <class B, class T>
void all_cases() {
  compare<B, T>("linear", []<class B2, class T2>(std::uint64_t s) { return case_linear<B2, T2>(s); });
  compare<B, T>("layernorm", []<class B2, class T2>(std::uint64_t s) { return case_layernorm<B2, T2>(s); });
  compare<B, T>("gelu", []<class B2, class T2>(std::uint64_t s) { return case_gelu<B2, T2>(s); });
  compare<B, T>("softmax", []<class B2, class T2>(std::uint64_t s) { return case_softmax<B2, T2>(s); });
  compare<B, T>("attention", []<class B2, class T2>(std::uint64_t s) { return case_attention<B2, T2>(s); });
  compare<B, T>("embeddings", []<class B2, class T2>(std::uint64_t s) { return case_embeddings<B2, T2>(s); });
  compare<B, T>("pooling", []<class B2, class T2>(std::uint64_t s) { return case_pooling<B2, T2>(s); });
  compare<B, T>("l2+contrastive", []<class B2, class T2>(std::uint64_t s) { return case_l2_contrastive<B2, T2>(s); });
  compare<B, T>("moe ops", []<class B2, class T2>(std::uint64_t s) { return case_moe_ops<B2, T2>(s); });
  compare<B, T>("rows", []<class B2, class T2>(std::uint64_t s) { return case_rows<B2, T2>(s); });
}

template <class Tuple, class T>
void for_each_backend() {
  std::apply([](auto... b) { (all_cases<decltype(b), T>(), ...); }, Tuple{});
}

}  // namespace limoe::backend_cases
