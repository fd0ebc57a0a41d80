// tests/support/cuda_from_host.hpp: a test-only adapter backend, CudaFromHost, that runs the CUDA backend's ops
// (Ops<Cuda, T>) on host tensors: each op's inputs are copied to the device (CudaBackendSpace: device memory,
// or the emulation's opaque host memory), the op runs there, and its outputs are copied back; the device
// caches and dispatch plans that cases reuse between forward and backward are kept per host object. The
// backend harness's cases (tests/unit/backend_cases.hpp) build host tensors, so this is how they check the
// CUDA backend: on a GPU (tests/cuda/test_cuda_backend.cpp) and under the emulation
// (tests/cuda_emu/test_cuda_emu_backend.cpp), with the same code.
#pragma once

#include <map>
#include <type_traits>

#include <limoe/backend/cuda.hpp>
#include <limoe/core/tensor.hpp>

namespace limoe::testing_cuda {

struct CudaFromHost {
  using memory_space = HostSpace;
  static constexpr const char* name = "cuda (device, through host copies)";
};

using DS = CudaBackendSpace;

// A device copy of a host view (T may be const); back() copies a writable view's device values to the host.
template <class T>
struct Mirror {
  using U = std::remove_const_t<T>;
  View<T> host;
  mutable Tensor<U, DS> dev;
  explicit Mirror(View<T> h) : host(h) {
    if (host.empty() || host.numel() == 0) return;
    dev.resize(host.shape());
    DS::upload(dev.data(), host.data(), sizeof(U) * static_cast<std::size_t>(host.numel()));
  }
  View<T, DS> v() const { return host.empty() ? View<T, DS>{} : View<T, DS>(dev.data(), host.shape()); }
  void back() const {
    if constexpr (!std::is_const_v<T>)
      if (!host.empty() && host.numel() > 0)
        DS::download(host.data(), dev.data(), sizeof(U) * static_cast<std::size_t>(host.numel()));
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
  if (d.numel() > 0) DS::download(h.data(), d.data(), sizeof(T) * static_cast<std::size_t>(d.numel()));
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

}  // namespace limoe::testing_cuda

namespace limoe {
template <class T>
struct Ops<testing_cuda::CudaFromHost, T> {
  using D = Ops<Cuda, T>;
  using St = testing_cuda::DeviceState<T>;
  template <class Prec = Fp32>
  static void linear_forward(CView<T> x, CView<T> W, CView<T> b, View<T> y, const Prec& prec = Prec{}) {
    auto mx = testing_cuda::mirror(x), mw = testing_cuda::mirror(W), mb = testing_cuda::mirror(b);
    auto my = testing_cuda::mirror(y);
    D::linear_forward(mx.v(), mw.v(), mb.v(), my.v(), prec);
    my.back();
  }
  template <class Prec = Fp32>
  static void linear_backward(CView<T> x, CView<T> W, CView<T> dy, View<T> dx, View<T> dW, View<T> db, const Prec& prec = Prec{}) {
    auto mx = testing_cuda::mirror(x), mw = testing_cuda::mirror(W), mdy = testing_cuda::mirror(dy);
    auto mdx = testing_cuda::mirror(dx), mdW = testing_cuda::mirror(dW), mdb = testing_cuda::mirror(db);
    D::linear_backward(mx.v(), mw.v(), mdy.v(), mdx.v(), mdW.v(), mdb.v(), prec);
    mdx.back(), mdW.back(), mdb.back();
  }
  static void layernorm_forward(CView<T> x, CView<T> g, CView<T> b, T eps, View<T> y, View<T> mean, View<T> rstd) {
    auto mx = testing_cuda::mirror(x), mg = testing_cuda::mirror(g), mb = testing_cuda::mirror(b);
    auto my = testing_cuda::mirror(y), mm = testing_cuda::mirror(mean), mr = testing_cuda::mirror(rstd);
    D::layernorm_forward(mx.v(), mg.v(), mb.v(), eps, my.v(), mm.v(), mr.v());
    my.back(), mm.back(), mr.back();
  }
  static void layernorm_backward(CView<T> x, CView<T> g, CView<T> mean, CView<T> rstd, CView<T> dy, View<T> dx,
                                 View<T> dg, View<T> db) {
    auto mx = testing_cuda::mirror(x), mg = testing_cuda::mirror(g), mm = testing_cuda::mirror(mean), mr = testing_cuda::mirror(rstd), mdy = testing_cuda::mirror(dy);
    auto mdx = testing_cuda::mirror(dx), mdg = testing_cuda::mirror(dg), mdb = testing_cuda::mirror(db);
    D::layernorm_backward(mx.v(), mg.v(), mm.v(), mr.v(), mdy.v(), mdx.v(), mdg.v(), mdb.v());
    mdx.back(), mdg.back(), mdb.back();
  }
  static void gelu_forward(GeluKind k, CView<T> x, View<T> y) {
    auto mx = testing_cuda::mirror(x);
    auto my = testing_cuda::mirror(y);
    D::gelu_forward(k, mx.v(), my.v());
    my.back();
  }
  static void gelu_backward(GeluKind k, CView<T> x, CView<T> dy, View<T> dx) {
    auto mx = testing_cuda::mirror(x), mdy = testing_cuda::mirror(dy);
    auto mdx = testing_cuda::mirror(dx);
    D::gelu_backward(k, mx.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void bias_gelu_forward(GeluKind k, CView<T> b, View<T> pre, View<T> y) {
    auto mb = testing_cuda::mirror(b);
    auto mp = testing_cuda::mirror(pre), my = testing_cuda::mirror(y);
    D::bias_gelu_forward(k, mb.v(), mp.v(), my.v());
    mp.back(), my.back();
  }
  static void softmax_forward(CView<T> x, View<T> y) {
    auto mx = testing_cuda::mirror(x);
    auto my = testing_cuda::mirror(y);
    D::softmax_forward(mx.v(), my.v());
    my.back();
  }
  static void softmax_backward(CView<T> y, CView<T> dy, View<T> dx) {
    auto my = testing_cuda::mirror(y), mdy = testing_cuda::mirror(dy);
    auto mdx = testing_cuda::mirror(dx);
    D::softmax_backward(my.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void attention_forward(const AttentionWeights<T>& w, int H, CView<T> xq, CView<T> xkv,
                                CView<std::uint8_t> mask, View<T> y, AttentionCache<T>& cache) {
    testing_cuda::AttnMirror<T> mw(w);
    auto mq = testing_cuda::mirror(xq), mkv = testing_cuda::mirror(xkv);
    auto mm = testing_cuda::mirror(mask);
    auto my = testing_cuda::mirror(y);
    D::attention_forward(mw.v(), H, mq.v(), mkv.v(), mm.v(), my.v(), St::get().attn[&cache]);
    my.back();
  }
  static void attention_backward(const AttentionWeights<T>& w, int H, CView<T> xq, CView<T> xkv,
                                 CView<std::uint8_t> mask, AttentionCache<T>& cache, CView<T> dy, View<T> dxq,
                                 View<T> dxkv, const AttentionGrads<T>& g) {
    testing_cuda::AttnMirror<T> mw(w);
    testing_cuda::AttnGradMirror<T> mg(g);
    auto mq = testing_cuda::mirror(xq), mkv = testing_cuda::mirror(xkv), mdy = testing_cuda::mirror(dy);
    auto mm = testing_cuda::mirror(mask);
    auto mdq = testing_cuda::mirror(dxq), mdkv = testing_cuda::mirror(dxkv);
    D::attention_backward(mw.v(), H, mq.v(), mkv.v(), mm.v(), St::get().attn.at(&cache), mdy.v(), mdq.v(), mdkv.v(), mg.v());
    mdq.back(), mdkv.back(), mg.back();
  }
  template <class Prec = Fp32>
  static void self_attention_forward(const AttentionWeights<T>& w, int H, CView<T> x, CView<std::uint8_t> mask,
                                     View<T> y, AttentionCache<T>& cache, const Prec& prec = Prec{}) {
    testing_cuda::AttnMirror<T> mw(w);
    auto mx = testing_cuda::mirror(x);
    auto mm = testing_cuda::mirror(mask);
    auto my = testing_cuda::mirror(y);
    D::self_attention_forward(mw.v(), H, mx.v(), mm.v(), my.v(), St::get().attn[&cache], prec);
    my.back();
  }
  template <class Prec = Fp32>
  static void self_attention_backward(const AttentionWeights<T>& w, int H, CView<T> x, CView<std::uint8_t> mask,
                                      AttentionCache<T>& cache, CView<T> dy, View<T> dx, const AttentionGrads<T>& g, const Prec& prec = Prec{}) {
    testing_cuda::AttnMirror<T> mw(w);
    testing_cuda::AttnGradMirror<T> mg(g);
    auto mx = testing_cuda::mirror(x), mdy = testing_cuda::mirror(dy);
    auto mm = testing_cuda::mirror(mask);
    auto mdx = testing_cuda::mirror(dx);
    D::self_attention_backward(mw.v(), H, mx.v(), mm.v(), St::get().attn.at(&cache), mdy.v(), mdx.v(), mg.v(), prec);
    mdx.back(), mg.back();
  }
  template <class Prec = Fp32>
  static void patch_embed_forward(CView<T> images, int P, CView<T> W, CView<T> b, CView<T> pos, View<T> patches,
                                  View<T> y, const Prec& prec = Prec{}) {
    auto mi = testing_cuda::mirror(images), mw = testing_cuda::mirror(W), mb = testing_cuda::mirror(b), mpos = testing_cuda::mirror(pos);
    auto mp = testing_cuda::mirror(patches), my = testing_cuda::mirror(y);
    D::patch_embed_forward(mi.v(), P, mw.v(), mb.v(), mpos.v(), mp.v(), my.v(), prec);
    mp.back(), my.back();
  }
  template <class Prec = Fp32>
  static void patch_embed_backward(CView<T> images, int P, CView<T> patches, CView<T> W, CView<T> dy, View<T> dimages,
                                   View<T> dW, View<T> db, View<T> dpos, const Prec& prec = Prec{}) {
    auto mi = testing_cuda::mirror(images), mp = testing_cuda::mirror(patches), mw = testing_cuda::mirror(W), mdy = testing_cuda::mirror(dy);
    auto mdi = testing_cuda::mirror(dimages), mdw = testing_cuda::mirror(dW), mdb = testing_cuda::mirror(db), mdpos = testing_cuda::mirror(dpos);
    D::patch_embed_backward(mi.v(), P, mp.v(), mw.v(), mdy.v(), mdi.v(), mdw.v(), mdb.v(), mdpos.v(), prec);
    mdi.back(), mdw.back(), mdb.back(), mdpos.back();
  }
  static void token_embed_forward(CView<std::int32_t> ids, CView<T> table, CView<T> pos, View<T> y) {
    auto mi = testing_cuda::mirror(ids);
    auto mt = testing_cuda::mirror(table), mp = testing_cuda::mirror(pos);
    auto my = testing_cuda::mirror(y);
    D::token_embed_forward(mi.v(), mt.v(), mp.v(), my.v());
    my.back();
  }
  static void token_embed_backward(CView<std::int32_t> ids, CView<T> dy, View<T> dtable, View<T> dpos) {
    auto mi = testing_cuda::mirror(ids);
    auto mdy = testing_cuda::mirror(dy);
    auto mdt = testing_cuda::mirror(dtable), mdp = testing_cuda::mirror(dpos);
    D::token_embed_backward(mi.v(), mdy.v(), mdt.v(), mdp.v());
    mdt.back(), mdp.back();
  }
  static void pool_forward(Pooling k, CView<T> x, CView<std::uint8_t> mask, View<T> y) {
    auto mx = testing_cuda::mirror(x);
    auto mm = testing_cuda::mirror(mask);
    auto my = testing_cuda::mirror(y);
    D::pool_forward(k, mx.v(), mm.v(), my.v());
    my.back();
  }
  static void pool_backward(Pooling k, CView<std::uint8_t> mask, CView<T> dy, View<T> dx) {
    auto mm = testing_cuda::mirror(mask);
    auto mdy = testing_cuda::mirror(dy);
    auto mdx = testing_cuda::mirror(dx);
    D::pool_backward(k, mm.v(), mdy.v(), mdx.v());
    mdx.back();
  }
  static void map_head_forward(const MapHeadWeights<T>& w, int H, GeluKind gelu, T eps, CView<T> x,
                               CView<std::uint8_t> mask, View<T> y, MapHeadCache<T>& cache) {
    testing_cuda::MapMirror<T> mw(w);
    auto mx = testing_cuda::mirror(x);
    auto mm = testing_cuda::mirror(mask);
    auto my = testing_cuda::mirror(y);
    D::map_head_forward(mw.v(), H, gelu, eps, mx.v(), mm.v(), my.v(), St::get().map[&cache]);
    my.back();
  }
  static void map_head_backward(const MapHeadWeights<T>& w, int H, GeluKind gelu, CView<T> x, CView<std::uint8_t> mask,
                                MapHeadCache<T>& cache, CView<T> dy, View<T> dx, const MapHeadGrads<T>& g) {
    testing_cuda::MapMirror<T> mw(w);
    testing_cuda::MapGradMirror<T> mg(g);
    auto mx = testing_cuda::mirror(x), mdy = testing_cuda::mirror(dy);
    auto mm = testing_cuda::mirror(mask);
    auto mdx = testing_cuda::mirror(dx);
    D::map_head_backward(mw.v(), H, gelu, mx.v(), mm.v(), St::get().map.at(&cache), mdy.v(), mdx.v(), mg.v());
    mdx.back(), mg.back();
  }
  static void l2_normalize_forward(CView<T> u, View<T> z, View<T> norms) {
    auto mu = testing_cuda::mirror(u);
    auto mz = testing_cuda::mirror(z), mn = testing_cuda::mirror(norms);
    D::l2_normalize_forward(mu.v(), mz.v(), mn.v());
    mz.back(), mn.back();
  }
  static void l2_normalize_backward(CView<T> u, CView<T> z, CView<T> norms, CView<T> dz, View<T> du) {
    auto mu = testing_cuda::mirror(u), mz = testing_cuda::mirror(z), mn = testing_cuda::mirror(norms), mdz = testing_cuda::mirror(dz);
    auto mdu = testing_cuda::mirror(du);
    D::l2_normalize_backward(mu.v(), mz.v(), mn.v(), mdz.v(), mdu.v());
    mdu.back();
  }
  static ContrastiveResult contrastive_forward(CView<T> zi, CView<T> zt, T theta, T max_scale, View<T> logits) {
    auto mi = testing_cuda::mirror(zi), mt = testing_cuda::mirror(zt);
    auto ml = testing_cuda::mirror(logits);
    const auto r = D::contrastive_forward(mi.v(), mt.v(), theta, max_scale, ml.v());
    ml.back();
    return r;
  }
  static void contrastive_backward(CView<T> zi, CView<T> zt, T theta, T max_scale, CView<T> logits, T dloss,
                                   View<T> dzi, View<T> dzt, T* dtheta) {
    auto mi = testing_cuda::mirror(zi), mt = testing_cuda::mirror(zt), ml = testing_cuda::mirror(logits);
    auto mdi = testing_cuda::mirror(dzi), mdt = testing_cuda::mirror(dzt);
    D::contrastive_backward(mi.v(), mt.v(), theta, max_scale, ml.v(), dloss, mdi.v(), mdt.v(), dtheta);
    mdi.back(), mdt.back();
  }
  static void add_into(CView<T> x, View<T> y) {
    auto mx = testing_cuda::mirror(x);
    auto my = testing_cuda::mirror(y);
    D::add_into(mx.v(), my.v());
    my.back();
  }
  static void gather_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
    auto ms = testing_cuda::mirror(src), mi = testing_cuda::mirror(idx);
    auto md = testing_cuda::mirror(dst);
    D::gather_rows(ms.v(), mi.v(), md.v());
    md.back();
  }
  static void scatter_rows(CView<T> src, CView<std::int64_t> idx, View<T> dst) {
    auto ms = testing_cuda::mirror(src), mi = testing_cuda::mirror(idx);
    auto md = testing_cuda::mirror(dst);
    D::scatter_rows(ms.v(), mi.v(), md.v());
    md.back();
  }
  static void to_bf16(CView<float> x, View<std::uint16_t> y) {
    auto mx = testing_cuda::mirror(x);
    auto my = testing_cuda::mirror(y);
    D::to_bf16(mx.v(), my.v());
    my.back();
  }
  static void make_dispatch_plan(CView<std::int32_t> route, int E, moe::DispatchPlan& plan) {
    auto mr = testing_cuda::mirror(route);
    auto& dp = St::get().plans[&plan];
    D::make_dispatch_plan(mr.v(), E, dp);
    plan.N = dp.N, plan.A = dp.A, plan.E = dp.E, plan.K = dp.K;
    testing_cuda::download(dp.offsets, plan.offsets), testing_cuda::download(dp.row_token, plan.row_token), testing_cuda::download(dp.row_slot, plan.row_slot),
        testing_cuda::download(dp.slot_row, plan.slot_row);
  }
  static void dispatch_forward(const moe::DispatchPlan& p, CView<T> x, View<T> xe) {
    auto mx = testing_cuda::mirror(x);
    auto mxe = testing_cuda::mirror(xe);
    D::dispatch_forward(St::get().plans.at(&p), mx.v(), mxe.v());
    mxe.back();
  }
  static void dispatch_backward(const moe::DispatchPlan& p, CView<T> dxe, View<T> dx) {
    auto mdxe = testing_cuda::mirror(dxe);
    auto mdx = testing_cuda::mirror(dx);
    D::dispatch_backward(St::get().plans.at(&p), mdxe.v(), mdx.v());
    mdx.back();
  }
  template <class Prec = Fp32>
  static void expert_mlp_forward(const moe::DispatchPlan& p, const moe::ExpertWeights<T>& w, GeluKind gelu, CView<T> xe,
                                 View<T> hpre, View<T> h, View<T> ye, moe::ExpertScratch& s, const Prec& prec = Prec{}) {
    auto m1 = testing_cuda::mirror(w.fc1_w), mb1 = testing_cuda::mirror(w.fc1_b), m2 = testing_cuda::mirror(w.fc2_w), mb2 = testing_cuda::mirror(w.fc2_b), mxe = testing_cuda::mirror(xe);
    auto mhp = testing_cuda::mirror(hpre), mh = testing_cuda::mirror(h), mye = testing_cuda::mirror(ye);
    D::expert_mlp_forward(St::get().plans.at(&p), moe::ExpertWeights<T, testing_cuda::DS>{m1.v(), mb1.v(), m2.v(), mb2.v()}, gelu,
                          mxe.v(), mhp.v(), mh.v(), mye.v(), s, prec);
    mhp.back(), mh.back(), mye.back();
  }
  template <class Prec = Fp32>
  static void expert_mlp_backward(const moe::DispatchPlan& p, const moe::ExpertWeights<T>& w, GeluKind gelu,
                                  CView<T> xe, CView<T> hpre, CView<T> h, CView<T> dye, View<T> dh, View<T> dxe,
                                  const moe::ExpertGrads<T>& g, moe::ExpertScratch& s, const Prec& prec = Prec{}) {
    auto m1 = testing_cuda::mirror(w.fc1_w), mb1 = testing_cuda::mirror(w.fc1_b), m2 = testing_cuda::mirror(w.fc2_w), mb2 = testing_cuda::mirror(w.fc2_b);
    auto mxe = testing_cuda::mirror(xe), mhp = testing_cuda::mirror(hpre), mh = testing_cuda::mirror(h), mdye = testing_cuda::mirror(dye);
    auto mdh = testing_cuda::mirror(dh), mdxe = testing_cuda::mirror(dxe), g1 = testing_cuda::mirror(g.fc1_w), gb1 = testing_cuda::mirror(g.fc1_b), g2 = testing_cuda::mirror(g.fc2_w),
         gb2 = testing_cuda::mirror(g.fc2_b);
    D::expert_mlp_backward(St::get().plans.at(&p), moe::ExpertWeights<T, testing_cuda::DS>{m1.v(), mb1.v(), m2.v(), mb2.v()}, gelu,
                           mxe.v(), mhp.v(), mh.v(), mdye.v(), mdh.v(), mdxe.v(),
                           moe::ExpertGrads<T, testing_cuda::DS>{g1.v(), gb1.v(), g2.v(), gb2.v()}, s, prec);
    mdh.back(), mdxe.back(), g1.back(), gb1.back(), g2.back(), gb2.back();
  }
  static void combine_forward(const moe::DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye,
                              View<T> y) {
    auto mg = testing_cuda::mirror(gates), mye = testing_cuda::mirror(ye);
    auto mr = testing_cuda::mirror(route);
    auto my = testing_cuda::mirror(y);
    D::combine_forward(St::get().plans.at(&p), mg.v(), mr.v(), mye.v(), my.v());
    my.back();
  }
  static void combine_backward(const moe::DispatchPlan& p, CView<T> gates, CView<std::int32_t> route, CView<T> ye,
                               CView<T> dy, View<T> dye, View<T> dgate) {
    auto mg = testing_cuda::mirror(gates), mye = testing_cuda::mirror(ye), mdy = testing_cuda::mirror(dy);
    auto mr = testing_cuda::mirror(route);
    auto mdye = testing_cuda::mirror(dye), mdg = testing_cuda::mirror(dgate);
    D::combine_backward(St::get().plans.at(&p), mg.v(), mr.v(), mye.v(), mdy.v(), mdye.v(), mdg.v());
    mdye.back(), mdg.back();
  }
};
}  // namespace limoe
