// The CUDA backend on a GPU: the backend harness's cases (tests/unit/backend_cases.hpp), float, on
// Ops<Cuda, float> from limoe_cuda (nvcc-compiled kernels and cuBLAS) against the Ref backend. The cases build
// host tensors; a test-only adapter backend (CudaFromHost) copies each op's inputs to the device, runs the
// op there and copies its outputs back, keeping the device caches and dispatch plans the cases reuse between
// forward and backward. The same cases run on the CPU through the emulation (test_cuda_emu_backend); this
// program adds what the emulation cannot check: the real cuBLAS calls (operand order, transposes, strides),
// device memory and launch limits. Skips (exit 77) without a GPU.
#include <cuda_runtime.h>

#include <limoe/backend/cuda.hpp>
#include <limoe/core/params.hpp>
#include <limoe/train/optimizer.hpp>
#include <map>

#include "unit/backend_cases.hpp"

using namespace limoe;

namespace {

struct CudaFromHost {
  using memory_space = HostSpace;
  static constexpr const char* name = "cuda (device, through host copies)";
};

using DS = CudaSpace;

void copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return;
  const cudaError_t e = cudaMemcpy(dst, src, bytes, kind);
  LIMOE_CHECK(e == cudaSuccess, "test_cuda_backend: cudaMemcpy failed: ", cudaGetErrorString(e));
}

// A device copy of a host view (T may be const); back() copies a writable view's device values to the host.
template <class T>
struct Mirror {
  using U = std::remove_const_t<T>;
  View<T> host;
  mutable Tensor<U, DS> dev;
  explicit Mirror(View<T> h) : host(h) {
    if (host.empty() || host.numel() == 0) return;
    dev.resize(host.shape());
    copy(dev.data(), host.data(), sizeof(U) * static_cast<std::size_t>(host.numel()), cudaMemcpyHostToDevice);
  }
  View<T, DS> v() const { return host.empty() ? View<T, DS>{} : View<T, DS>(dev.data(), host.shape()); }
  void back() const {
    if constexpr (!std::is_const_v<T>)
      if (!host.empty() && host.numel() > 0)
        copy(host.data(), dev.data(), sizeof(U) * static_cast<std::size_t>(host.numel()), cudaMemcpyDeviceToHost);
  }
};
template <class T>
Mirror<T> mirror(View<T> h) {
  return Mirror<T>(h);
}

// Device copies of a host tensor into a device tensor (the plan's arrays, the caches' shapes are the device's).
template <class T>
void download(const Tensor<T, DS>& d, Tensor<T>& h) {
  h.resize(d.shape());
  copy(h.data(), d.data(), sizeof(T) * static_cast<std::size_t>(d.numel()), cudaMemcpyDeviceToHost);
}

// Weights and gradients of attention and the map head, mirrored member by member.
template <class T>
struct AttnMirror {
  Mirror<const T> wq, bq, wk, bk, wv, bv, wo, bo;
  explicit AttnMirror(const AttentionWeights<T>& w)
      : wq(w.wq), bq(w.bq), wk(w.wk), bk(w.bk), wv(w.wv), bv(w.bv), wo(w.wo), bo(w.bo) {}
  AttentionWeights<T, DS> v() const { return {wq.v(), bq.v(), wk.v(), bk.v(), wv.v(), bv.v(), wo.v(), bo.v()}; }
};
template <class T>
struct AttnGradMirror {
  Mirror<T> wq, bq, wk, bk, wv, bv, wo, bo;
  explicit AttnGradMirror(const AttentionGrads<T>& g)
      : wq(g.wq), bq(g.bq), wk(g.wk), bk(g.bk), wv(g.wv), bv(g.bv), wo(g.wo), bo(g.bo) {}
  AttentionGrads<T, DS> v() const { return {wq.v(), bq.v(), wk.v(), bk.v(), wv.v(), bv.v(), wo.v(), bo.v()}; }
  void back() const {
    for (const auto* m : {&wq, &bq, &wk, &bk, &wv, &bv, &wo, &bo}) m->back();
  }
};
template <class T>
struct MapMirror {
  Mirror<const T> probe;
  AttnMirror<T> attn;
  Mirror<const T> ln_g, ln_b, fc1_w, fc1_b, fc2_w, fc2_b;
  explicit MapMirror(const MapHeadWeights<T>& w)
      : probe(w.probe), attn(w.attn), ln_g(w.ln_g), ln_b(w.ln_b), fc1_w(w.fc1_w), fc1_b(w.fc1_b), fc2_w(w.fc2_w),
        fc2_b(w.fc2_b) {}
  MapHeadWeights<T, DS> v() const {
    return {probe.v(), attn.v(), ln_g.v(), ln_b.v(), fc1_w.v(), fc1_b.v(), fc2_w.v(), fc2_b.v()};
  }
};
template <class T>
struct MapGradMirror {
  Mirror<T> probe;
  AttnGradMirror<T> attn;
  Mirror<T> ln_g, ln_b, fc1_w, fc1_b, fc2_w, fc2_b;
  explicit MapGradMirror(const MapHeadGrads<T>& g)
      : probe(g.probe), attn(g.attn), ln_g(g.ln_g), ln_b(g.ln_b), fc1_w(g.fc1_w), fc1_b(g.fc1_b), fc2_w(g.fc2_w),
        fc2_b(g.fc2_b) {}
  MapHeadGrads<T, DS> v() const {
    return {probe.v(), attn.v(), ln_g.v(), ln_b.v(), fc1_w.v(), fc1_b.v(), fc2_w.v(), fc2_b.v()};
  }
  void back() const {
    probe.back(), attn.back();
    for (const auto* m : {&ln_g, &ln_b, &fc1_w, &fc1_b, &fc2_w, &fc2_b}) m->back();
  }
};

// The device state a case's host objects stand for, found by the host object's address.
template <class T>
struct DeviceState {
  std::map<const void*, AttentionCache<T, DS>> attn;
  std::map<const void*, MapHeadCache<T, DS>> map;
  std::map<const void*, moe::BasicDispatchPlan<DS>> plans;
  static DeviceState& get() {
    static DeviceState s;
    return s;
  }
};

}  // namespace

namespace limoe {
template <class T>
struct Ops<CudaFromHost, T> {
  using D = Ops<Cuda, T>;
  using St = DeviceState<T>;
  static void linear_forward(CView<T> x, CView<T> W, CView<T> b, View<T> y) {
    auto mx = mirror(x), mw = mirror(W), mb = mirror(b);
    auto my = mirror(y);
    D::linear_forward(mx.v(), mw.v(), mb.v(), my.v());
    my.back();
  }
  static void linear_backward(CView<T> x, CView<T> W, CView<T> dy, View<T> dx, View<T> dW, View<T> db) {
    auto mx = mirror(x), mw = mirror(W), mdy = mirror(dy);
    auto mdx = mirror(dx), mdW = mirror(dW), mdb = mirror(db);
    D::linear_backward(mx.v(), mw.v(), mdy.v(), mdx.v(), mdW.v(), mdb.v());
    mdx.back(), mdW.back(), mdb.back();
  }
  static void layernorm_forward(CView<T> x, CView<T> g, CView<T> b, T eps, View<T> y, View<T> mean, View<T> rstd) {
    auto mx = mirror(x), mg = mirror(g), mb = mirror(b);
    auto my = mirror(y), mm = mirror(mean), mr = mirror(rstd);
    D::layernorm_forward(mx.v(), mg.v(), mb.v(), eps, my.v(), mm.v(), mr.v());
    my.back(), mm.back(), mr.back();
  }
  static void layernorm_backward(CView<T> x, CView<T> g, CView<T> mean, CView<T> rstd, CView<T> dy, View<T> dx,
                                 View<T> dg, View<T> db) {
    auto mx = mirror(x), mg = mirror(g), mm = mirror(mean), mr = mirror(rstd), mdy = mirror(dy);
    auto mdx = mirror(dx), mdg = mirror(dg), mdb = mirror(db);
    D::layernorm_backward(mx.v(), mg.v(), mm.v(), mr.v(), mdy.v(), mdx.v(), mdg.v(), mdb.v());
    mdx.back(), mdg.back(), mdb.back();
  }
  static void gelu_forward(GeluKind k, CView<T> x, View<T> y) {
    auto mx = mirror(x);
    auto my = mirror(y);
    D::gelu_forward(k, mx.v(), my.v());
    my.back();
  }
  static void gelu_backward(GeluKind k, CView<T> x, CView<T> dy, View<T> dx) {
    auto mx = mirror(x), mdy = mirror(dy);
    auto mdx = mirror(dx);
    D::gelu_backward(k, mx.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void bias_gelu_forward(GeluKind k, CView<T> b, View<T> pre, View<T> y) {
    auto mb = mirror(b);
    auto mp = mirror(pre), my = mirror(y);
    D::bias_gelu_forward(k, mb.v(), mp.v(), my.v());
    mp.back(), my.back();
  }
  static void softmax_forward(CView<T> x, View<T> y) {
    auto mx = mirror(x);
    auto my = mirror(y);
    D::softmax_forward(mx.v(), my.v());
    my.back();
  }
  static void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
    auto my = mirror(y), mdy = mirror(dy);
    auto mdx = mirror(dx);
    D::softmax_backward(my.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void attention_forward(const AttentionWeights<T>& w, int H, CView<T> xq, CView<T> xkv,
                                CView<std::uint8_t> mask, View<T> y, AttentionCache<T>& cache) {
    AttnMirror<T> mw(w);
    auto mq = mirror(xq), mkv = mirror(xkv);
    auto mm = mirror(mask);
    auto my = mirror(y);
    D::attention_forward(mw.v(), H, mq.v(), mkv.v(), mm.v(), my.v(), St::get().attn[&cache]);
    my.back();
  }
  static void attention_backward(const AttentionWeights<T>& w, int H, CView<T> xq, CView<T> xkv,
                                 CView<std::uint8_t> mask, AttentionCache<T>& cache, CView<T> dy, View<T> dxq,
                                 View<T> dxkv, const AttentionGrads<T>& g) {
    AttnMirror<T> mw(w);
    AttnGradMirror<T> mg(g);
    auto mq = mirror(xq), mkv = mirror(xkv), mdy = mirror(dy);
    auto mm = mirror(mask);
    auto mdq = mirror(dxq), mdkv = mirror(dxkv);
    D::attention_backward(mw.v(), H, mq.v(), mkv.v(), mm.v(), St::get().attn.at(&cache), mdy.v(), mdq.v(), mdkv.v(), mg.v());
    mdq.back(), mdkv.back(), mg.back();
  }
  static void self_attention_forward(const AttentionWeights<T>& w, int H, CView<T> x, CView<std::uint8_t> mask,
                                     View<T> y, AttentionCache<T>& cache) {
    AttnMirror<T> mw(w);
    auto mx = mirror(x);
    auto mm = mirror(mask);
    auto my = mirror(y);
    D::self_attention_forward(mw.v(), H, mx.v(), mm.v(), my.v(), St::get().attn[&cache]);
    my.back();
  }
  static void self_attention_backward(const AttentionWeights<T>& w, int H, CView<T> x, CView<std::uint8_t> mask,
                                      AttentionCache<T>& cache, CView<T> dy, View<T> dx, const AttentionGrads<T>& g) {
    AttnMirror<T> mw(w);
    AttnGradMirror<T> mg(g);
    auto mx = mirror(x), mdy = mirror(dy);
    auto mm = mirror(mask);
    auto mdx = mirror(dx);
    D::self_attention_backward(mw.v(), H, mx.v(), mm.v(), St::get().attn.at(&cache), mdy.v(), mdx.v(), mg.v());
    mdx.back(), mg.back();
  }
  static void patch_embed_forward(CView<T> images, int P, CView<T> W, CView<T> b, CView<T> pos, View<T> patches,
                                  View<T> y) {
    auto mi = mirror(images), mw = mirror(W), mb = mirror(b), mpos = mirror(pos);
    auto mp = mirror(patches), my = mirror(y);
    D::patch_embed_forward(mi.v(), P, mw.v(), mb.v(), mpos.v(), mp.v(), my.v());
    mp.back(), my.back();
  }
  static void patch_embed_backward(CView<T> images, int P, CView<T> patches, CView<T> W, CView<T> dy, View<T> dimages,
                                   View<T> dW, View<T> db, View<T> dpos) {
    auto mi = mirror(images), mp = mirror(patches), mw = mirror(W), mdy = mirror(dy);
    auto mdi = mirror(dimages), mdw = mirror(dW), mdb = mirror(db), mdpos = mirror(dpos);
    D::patch_embed_backward(mi.v(), P, mp.v(), mw.v(), mdy.v(), mdi.v(), mdw.v(), mdb.v(), mdpos.v());
    mdi.back(), mdw.back(), mdb.back(), mdpos.back();
  }
  static void token_embed_forward(CView<std::int32_t> ids, CView<T> table, CView<T> pos, View<T> y) {
    auto mi = mirror(ids);
    auto mt = mirror(table), mp = mirror(pos);
    auto my = mirror(y);
    D::token_embed_forward(mi.v(), mt.v(), mp.v(), my.v());
    my.back();
  }
  static void token_embed_backward(CView<std::int32_t> ids, CView<T> dy, View<T> dtable, View<T> dpos) {
    auto mi = mirror(ids);
    auto mdy = mirror(dy);
    auto mdt = mirror(dtable), mdp = mirror(dpos);
    D::token_embed_backward(mi.v(), mdy.v(), mdt.v(), mdp.v());
    mdt.back(), mdp.back();
  }
  static void pool_forward(Pooling k, CView<T> x, CView<std::uint8_t> mask, View<T> y) {
    auto mx = mirror(x);
    auto mm = mirror(mask);
    auto my = mirror(y);
    D::pool_forward(k, mx.v(), mm.v(), my.v());
    my.back();
  }
  static void pool_backward(Pooling k, CView<std::uint8_t> mask, CView<T> dy, View<T> dx) {
    auto mm = mirror(mask);
    auto mdy = mirror(dy);
    auto mdx = mirror(dx);
    D::pool_backward(k, mm.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void map_head_forward(const MapHeadWeights<T>& w, int H, GeluKind gelu, T eps, CView<T> x,
                               CView<std::uint8_t> mask, View<T> y, MapHeadCache<T>& cache) {
    MapMirror<T> mw(w);
    auto mx = mirror(x);
    auto mm = mirror(mask);
    auto my = mirror(y);
    D::map_head_forward(mw.v(), H, gelu, eps, mx.v(), mm.v(), my.v(), St::get().map[&cache]);
    my.back();
  }
  static void map_head_backward(const MapHeadWeights<T>& w, int H, GeluKind gelu, CView<T> x, CView<std::uint8_t> mask,
                                MapHeadCache<T>& cache, CView<T> dy, View<T> dx, const MapHeadGrads<T>& g) {
    MapMirror<T> mw(w);
    MapGradMirror<T> mg(g);
    auto mx = mirror(x), mdy = mirror(dy);
    auto mm = mirror(mask);
    auto mdx = mirror(dx);
    D::map_head_backward(mw.v(), H, gelu, mx.v(), mm.v(), St::get().map.at(&cache), mdy.v(), mdx.v(), mg.v());
    mdx.back(), mg.back();
  }
  static void l2_normalize_forward(CView<T> u, View<T> z, View<T> norms) {
    auto mu = mirror(u);
    auto mz = mirror(z), mn = mirror(norms);
    D::l2_normalize_forward(mu.v(), mz.v(), mn.v());
    mz.back(), mn.back();
  }
  static void l2_normalize_backward(CView<T> u, CView<T> z, CView<T> norms, CView<T> dz, View<T> du) {
    auto mu = mirror(u), mz = mirror(z), mn = mirror(norms), mdz = mirror(dz);
    auto mdu = mirror(du);
    D::l2_normalize_backward(mu.v(), mz.v(), mn.v(), mdz.v(), mdu.v());
    mdu.back();
  }
  static ContrastiveResult contrastive_forward(CView<T> zi, CView<T> zt, T theta, T max_scale, View<T> logits) {
    auto mi = mirror(zi), mt = mirror(zt);
    auto ml = mirror(logits);
    const auto r = D::contrastive_forward(mi.v(), mt.v(), theta, max_scale, ml.v());
    ml.back();
    return r;
  }
  static void contrastive_backward(CView<T> zi, CView<T> zt, T theta, T max_scale, CView<T> logits, T dloss,
                                   View<T> dzi, View<T> dzt, T* dtheta) {
    auto mi = mirror(zi), mt = mirror(zt), ml = mirror(logits);
    auto mdi = mirror(dzi), mdt = mirror(dzt);
    D::contrastive_backward(mi.v(), mt.v(), theta, max_scale, ml.v(), dloss, mdi.v(), mdt.v(), dtheta);
    mdi.back(), mdt.back();
  }
  static void make_dispatch_plan(CView<std::int32_t> route, int E, moe::DispatchPlan& plan) {
    auto mr = mirror(route);
    auto& dp = St::get().plans[&plan];
    D::make_dispatch_plan(mr.v(), E, dp);
    plan.N = dp.N, plan.A = dp.A, plan.E = dp.E, plan.K = dp.K;
    download(dp.offsets, plan.offsets), download(dp.row_token, plan.row_token), download(dp.row_slot, plan.row_slot),
        download(dp.slot_row, plan.slot_row);
  }
  static void dispatch_forward(const moe::DispatchPlan& p, CView<T> x, View<T> xe) {
    auto mx = mirror(x);
    auto mxe = mirror(xe);
    D::dispatch_forward(St::get().plans.at(&p), mx.v(), mxe.v());
    mxe.back();
  }
  static void dispatch_backward(const moe::DispatchPlan& p, CView<T> dxe, View<T> dx) {
    auto mdxe = mirror(dxe);
    auto mdx = mirror(dx);
    D::dispatch_backward(St::get().plans.at(&p), mdxe.v(), mdx.v());
    mdx.back();
  }
  static void expert_mlp_forward(const moe::DispatchPlan& p, const moe::ExpertWeights<T>& w, GeluKind gelu, CView<T> xe,
                                 View<T> hpre, View<T> h, View<T> ye, moe::ExpertScratch& s) {
    auto m1 = mirror(w.fc1_w), mb1 = mirror(w.fc1_b), m2 = mirror(w.fc2_w), mb2 = mirror(w.fc2_b), mxe = mirror(xe);
    auto mhp = mirror(hpre), mh = mirror(h), mye = mirror(ye);
    D::expert_mlp_forward(St::get().plans.at(&p), moe::ExpertWeights<T, DS>{m1.v(), mb1.v(), m2.v(), mb2.v()}, gelu,
                          mxe.v(), mhp.v(), mh.v(), mye.v(), s);
    mhp.back(), mh.back(), mye.back();
  }
  static void expert_mlp_backward(const moe::DispatchPlan& p, const moe::ExpertWeights<T>& w, GeluKind gelu,
                                  CView<T> xe, CView<T> hpre, CView<T> h, CView<T> dye, View<T> dh, View<T> dxe,
                                  const moe::ExpertGrads<T>& g, moe::ExpertScratch& s) {
    auto m1 = mirror(w.fc1_w), mb1 = mirror(w.fc1_b), m2 = mirror(w.fc2_w), mb2 = mirror(w.fc2_b);
    auto mxe = mirror(xe), mhp = mirror(hpre), mh = mirror(h), mdye = mirror(dye);
    auto mdh = mirror(dh), mdxe = mirror(dxe), g1 = mirror(g.fc1_w), gb1 = mirror(g.fc1_b), g2 = mirror(g.fc2_w),
         gb2 = mirror(g.fc2_b);
    D::expert_mlp_backward(St::get().plans.at(&p), moe::ExpertWeights<T, DS>{m1.v(), mb1.v(), m2.v(), mb2.v()}, gelu,
                           mxe.v(), mhp.v(), mh.v(), mdye.v(), mdh.v(), mdxe.v(),
                           moe::ExpertGrads<T, DS>{g1.v(), gb1.v(), g2.v(), gb2.v()}, s);
    mdh.back(), mdxe.back(), g1.back(), gb1.back(), g2.back(), gb2.back();
  }
  static void combine_forward(const moe::DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye,
                              View<T> y) {
    auto mg = mirror(gates), mye = mirror(ye);
    auto mr = mirror(route);
    auto my = mirror(y);
    D::combine_forward(St::get().plans.at(&p), mg.v(), mr.v(), mye.v(), my.v());
    my.back();
  }
  static void combine_backward(const moe::DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye,
                               CView<T> dy, View<T> dye, View<T> dgate) {
    auto mg = mirror(gates), mye = mirror(ye), mdy = mirror(dy);
    auto mr = mirror(route);
    auto mdye = mirror(dye), mdg = mirror(dgate);
    D::combine_backward(St::get().plans.at(&p), mg.v(), mr.v(), mye.v(), mdy.v(), mdye.v(), mdg.v());
    mdye.back(), mdg.back();
  }
};
}  // namespace limoe

TEST_CASE("cuda backend on the GPU: every op against Ref, forward and backward (float)") {
  limoe::backend_cases::for_each_backend<std::tuple<CudaFromHost>, float>();
}

TEST_CASE("cuda backend on the GPU: AdamW with global-norm clipping against the CPU optimizer") {
  const index_t n = 5000;
  ParamStore<float> ps;
  ps.add("w", Shape{n - 100}, true);
  ps.add("b", Shape{100}, false);
  ps.finalize();
  testing::fill_normal(ps.values(), 1, 0.5);
  Tensor<std::uint8_t> decay(Shape{n});
  for (const auto& e : ps.entries())
    for (index_t i = 0; i < e.shape.numel(); ++i) decay[e.offset + i] = e.decay ? 1 : 0;
  const AdamWConfig cfg{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0};
  AdamW<float> opt(cfg, ps);
  Tensor<float> w(Shape{n}), zeros(Shape{n});
  std::copy(ps.values().data(), ps.values().data() + n, w.data());
  auto dw = Mirror<float>(w.view()), dm = Mirror<float>(zeros.view()), dv = Mirror<float>(zeros.view());
  auto dd = Mirror<const std::uint8_t>(decay.cview());
  for (int step = 1; step <= 3; ++step) {
    testing::fill_normal(ps.grads(), 10 + static_cast<std::uint64_t>(step), step == 1 ? 2.0 : 0.01);
    auto dg = Mirror<const float>(ps.grads());
    const double norm = opt.update(ps, 1e-2);
    const double got = cuda::ops::adamw_update<float>(cfg, step, 1e-2, dg.v(), dd.v(), dw.v(), dm.v(), dv.v());
    CHECK(got == doctest::Approx(norm).epsilon(1e-9));
  }
  dw.back();
  Tensor<double> want(Shape{n});
  for (index_t i = 0; i < n; ++i) want[i] = ps.values()[i];
  CHECK(testing::max_diff(w, want) <= 1e-6);
}
