// The CPU ops' float results do not depend on where their operands lie. A model's tensors sit at offsets that
// change with the batch, its parameters at offsets of one flat buffer, and a thread's scratch at that thread's
// own alignment: a kernel whose order of sums follows the address (Eigen's sum() of an unaligned map starts its
// vectors at the first aligned element) gives another last bit when the same values move, and then two
// evaluation forwards of the same batch differ (session 36: the float softmax's row sum, exposed by the map
// head's per-thread scratch). Each case runs an op with every operand, input and output, moved by 0..15 floats
// from a 64-byte boundary and asserts the outputs' bits equal those at offset 0; on 2 threads.
#include <doctest/doctest.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <limoe/core/gemm.hpp>
#include <limoe/core/parallel.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/ops/attention.hpp>
#include <limoe/ops/contrastive.hpp>
#include <limoe/ops/embedding.hpp>
#include <limoe/ops/gelu.hpp>
#include <limoe/ops/l2norm.hpp>
#include <limoe/ops/layernorm.hpp>
#include <limoe/ops/linear.hpp>
#include <limoe/ops/pooling.hpp>
#include <limoe/ops/softmax.hpp>
#include <limoe/moe/layer.hpp>
#include <limoe/testing/gradcheck.hpp>

using namespace limoe;

namespace {

// Operands at a chosen offset: in(t) copies t there, out(shape) makes a zeroed buffer there; views stay valid
// for the arena's life.
class Arena {
 public:
  explicit Arena(index_t off) : off_(off) {}
  View<float> in(const Tensor<float>& t) {
    View<float> v = out(t.shape());
    std::copy(t.data(), t.data() + t.numel(), v.data());
    return v;
  }
  View<float> out(Shape s) {
    bufs_.emplace_back(static_cast<std::size_t>(s.numel() + 32), 0.0f);
    auto addr = reinterpret_cast<std::uintptr_t>(bufs_.back().data());
    float* base = reinterpret_cast<float*>((addr + 63) / 64 * 64);
    return View<float>(base + off_, s);
  }

 private:
  index_t off_;
  std::vector<std::vector<float>> bufs_;
};

// Runs op at offsets 0..15 and checks that the outputs it returns have the bits of offset 0.
void check_offsets(const char* what, const std::function<std::vector<float>(Arena&)>& op) {
  set_num_threads(2);
  Arena a0(0);
  const std::vector<float> first = op(a0);
  REQUIRE(!first.empty());
  int differing = 0;
  for (index_t off = 1; off < 16; ++off) {
    Arena a(off);
    const std::vector<float> got = op(a);
    REQUIRE(got.size() == first.size());
    std::size_t n_diff = 0, first_diff = got.size();
    for (std::size_t i = 0; i < got.size(); ++i)
      if (std::memcmp(&got[i], &first[i], sizeof(float)) != 0) {
        ++n_diff;
        first_diff = std::min(first_diff, i);
      }
    if (n_diff > 0) {
      ++differing;
      MESSAGE(std::string(what), ": offset ", off, " gives other bits in ", n_diff, " of ", got.size(),
              " outputs, the first at ", first_diff);
    }
  }
  CHECK(differing == 0);
  set_num_threads(0);
}

std::vector<float> collect(std::initializer_list<View<float>> views) {
  std::vector<float> r;
  for (const auto& v : views) r.insert(r.end(), v.data(), v.data() + v.numel());
  return r;
}

Tensor<float> randf(Shape s, std::uint64_t seed, double scale = 1.0) { return testing::randn<float>(s, seed, scale); }

}  // namespace

TEST_CASE("alignment: softmax forward and backward") {
  const auto x = randf(Shape{7, 50}, 1, 3.0), dy = randf(Shape{7, 50}, 2);
  check_offsets("softmax", [&](Arena& a) {
    auto xv = a.in(x), dyv = a.in(dy), y = a.out(x.shape()), dx = a.out(x.shape());
    cpu::softmax_forward<float>(xv, y);
    cpu::softmax_backward<float>(y, dyv, dx);
    return collect({y, dx});
  });
}

TEST_CASE("alignment: LayerNorm forward and backward") {
  const index_t R = 9, D = 100;
  const auto x = randf(Shape{R, D}, 3, 2.0), g = randf(Shape{D}, 4), b = randf(Shape{D}, 5), dy = randf(Shape{R, D}, 6);
  check_offsets("layernorm", [&](Arena& a) {
    auto xv = a.in(x), gv = a.in(g), bv = a.in(b), dyv = a.in(dy);
    auto y = a.out(Shape{R, D}), mean = a.out(Shape{R}), rstd = a.out(Shape{R});
    auto dx = a.out(Shape{R, D}), dg = a.out(Shape{D}), db = a.out(Shape{D});
    cpu::layernorm_forward<float>(xv, gv, bv, 1e-6f, y, mean, rstd);
    cpu::layernorm_backward<float>(xv, gv, mean, rstd, dyv, dx, dg, db);
    return collect({y, mean, rstd, dx, dg, db});
  });
}

TEST_CASE("alignment: GELU, bias + GELU, L2 normalisation") {
  const auto x = randf(Shape{5, 70}, 7, 2.0), b = randf(Shape{70}, 8), u = randf(Shape{6, 37}, 9);
  check_offsets("gelu", [&](Arena& a) {
    auto xv = a.in(x), bv = a.in(b), y = a.out(x.shape()), pre = a.in(x), act = a.out(x.shape());
    auto uv = a.in(u), z = a.out(u.shape()), norms = a.out(Shape{6});
    cpu::gelu_forward<float>(GeluKind::Erf, xv, y);
    cpu::bias_gelu_forward<float>(GeluKind::Tanh, bv, pre, act);
    cpu::l2_normalize_forward<float>(uv, z, norms);
    return collect({y, pre, act, z, norms});
  });
}

TEST_CASE("alignment: linear forward and backward, fp32 and bf16") {
  const index_t R = 40, I = 96, O = 72;
  const auto x = randf(Shape{R, I}, 10), W = randf(Shape{O, I}, 11, 0.1), b = randf(Shape{O}, 12),
             dy = randf(Shape{R, O}, 13);
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    check_offsets(bf16 ? "linear bf16" : "linear fp32", [&](Arena& a) {
      auto xv = a.in(x), Wv = a.in(W), bv = a.in(b), dyv = a.in(dy);
      auto y = a.out(Shape{R, O}), dx = a.out(Shape{R, I}), dW = a.out(Shape{O, I}), db = a.out(Shape{O});
      if (bf16) {
        cpu::linear_forward<float>(xv, Wv, bv, y, Bf16Mixed{});
        cpu::linear_backward<float>(xv, Wv, dyv, dx, dW, db, Bf16Mixed{});
      } else {
        cpu::linear_forward<float>(xv, Wv, bv, y);
        cpu::linear_backward<float>(xv, Wv, dyv, dx, dW, db);
      }
      return collect({y, dx, dW, db});
    });
  }
}

TEST_CASE("alignment: the narrow product (router logits)") {
  const index_t M = 37, N = 8, K = 75;
  const auto A = randf(Shape{M, K}, 40), Bm = randf(Shape{N, K}, 41);
  check_offsets("gemm_nt_narrow", [&](Arena& a) {
    auto Av = a.in(A), Bv = a.in(Bm), C = a.out(Shape{M, N});
    gemm_nt_narrow<float>(M, N, K, Av.data(), K, Bv.data(), K, C.data(), N);
    return collect({C});
  });
}

TEST_CASE("alignment: attention, the map head (its evaluation forward, which folds the query into the weights, "
          "and its training path), patch embedding, contrastive loss, L2 norm; forward and backward") {
  const index_t B = 3, N = 13, D = 64, H = 4, M = 96;
  std::vector<Tensor<float>> p;
  for (int i = 0; i < 8; ++i) p.push_back(randf(i % 2 == 0 ? Shape{D, D} : Shape{D}, 60 + i, i % 2 == 0 ? 0.125 : 0.3));
  const auto x = randf(Shape{B, N, D}, 70), dy = randf(Shape{B, N, D}, 71), dpool = randf(Shape{B, D}, 72);
  Tensor<std::uint8_t> mask(Shape{B, N}, 1);
  for (index_t j = 9; j < N; ++j) mask[2 * N + j] = 0;
  const auto probe = randf(Shape{D}, 73), ln_g = randf(Shape{D}, 74), ln_b = randf(Shape{D}, 75);
  const auto fc1_w = randf(Shape{M, D}, 76, 0.1), fc1_b = randf(Shape{M}, 77), fc2_w = randf(Shape{D, M}, 78, 0.1),
             fc2_b = randf(Shape{D}, 79);
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    check_offsets(bf16 ? "attention and map head, bf16" : "attention and map head, fp32", [&](Arena& a) {
      std::vector<View<float>> w, g;
      for (const auto& t : p) w.push_back(a.in(t)), g.push_back(a.out(t.shape()));
      const AttentionWeights<float> aw{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]};
      const AttentionGrads<float> ag{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
      auto xv = a.in(x), dyv = a.in(dy), y = a.out(x.shape()), dx = a.out(x.shape());
      AttentionCache<float> cache;
      const MapHeadWeights<float> mw{a.in(probe), aw, a.in(ln_g), a.in(ln_b), a.in(fc1_w), a.in(fc1_b), a.in(fc2_w),
                                     a.in(fc2_b)};
      std::vector<View<float>> mg;
      for (const Shape& s : {Shape{D}, Shape{D}, Shape{D}, Shape{M, D}, Shape{M}, Shape{D, M}, Shape{D}})
        mg.push_back(a.out(s));
      std::vector<View<float>> mga;
      for (const auto& t : p) mga.push_back(a.out(t.shape()));
      const MapHeadGrads<float> mgr{mg[0], {mga[0], mga[1], mga[2], mga[3], mga[4], mga[5], mga[6], mga[7]},
                                    mg[1], mg[2], mg[3], mg[4], mg[5], mg[6]};
      auto pooled = a.out(Shape{B, D}), pooled_eval = a.out(Shape{B, D}), dpv = a.in(dpool), dxm = a.out(x.shape());
      MapHeadCache<float> mc;  // the training path: full attention, a cache for the backward
      MapHeadCache<float> mci;
      mci.inference = true;  // the fold: scores and contexts in each thread's own scratch
      auto run = [&](const auto& prec) {
        cpu::self_attention_forward<float>(aw, static_cast<int>(H), xv, mask.cview(), y, cache, prec);
        cpu::self_attention_backward<float>(aw, static_cast<int>(H), xv, mask.cview(), cache, dyv, dx, ag, prec);
        cpu::map_head_forward<float>(mw, static_cast<int>(H), GeluKind::Erf, 1e-6f, xv, mask.cview(), pooled, mc, prec);
        cpu::map_head_backward<float>(mw, static_cast<int>(H), GeluKind::Erf, xv, mask.cview(), mc, dpv, dxm, mgr, prec);
        cpu::map_head_forward<float>(mw, static_cast<int>(H), GeluKind::Erf, 1e-6f, xv, mask.cview(), pooled_eval, mci,
                                     prec);
      };
      if (bf16) run(Bf16Mixed{});
      else run(Fp32{});
      std::vector<float> out = collect({y, dx, pooled, dxm, pooled_eval});
      for (const auto& v : g) out.insert(out.end(), v.data(), v.data() + v.numel());
      for (const auto& v : mg) out.insert(out.end(), v.data(), v.data() + v.numel());
      for (const auto& v : mga) out.insert(out.end(), v.data(), v.data() + v.numel());
      return out;
    });
  }

  // Patch embedding: 2 images of 8 x 8 x 3 in patches of 4 (4 patches of 48 values) to width 32.
  const index_t Bi = 2, Pp = 4, Np = 4, F = 48, Dp = 32;
  const auto images = randf(Shape{Bi, 8, 8, 3}, 80), pw = randf(Shape{Dp, F}, 81, 0.1), pb = randf(Shape{Dp}, 82),
             pos = randf(Shape{Np, Dp}, 83), dyp = randf(Shape{Bi, Np, Dp}, 84);
  check_offsets("patch embedding", [&](Arena& a) {
    auto im = a.in(images), Wv = a.in(pw), bv = a.in(pb), posv = a.in(pos), dyv = a.in(dyp);
    auto patches = a.out(Shape{Bi, Np, F}), y = a.out(Shape{Bi, Np, Dp}), dim = a.out(images.shape());
    auto dW = a.out(Shape{Dp, F}), db = a.out(Shape{Dp}), dpos = a.out(Shape{Np, Dp});
    cpu::patch_embed_forward<float>(im, static_cast<int>(Pp), Wv, bv, posv, patches, y);
    cpu::patch_embed_backward<float>(im, static_cast<int>(Pp), patches, Wv, dyv, dim, dW, db, dpos);
    return collect({patches, y, dim, dW, db, dpos});
  });

  // The contrastive loss and the L2 normalisation before it.
  const index_t n = 9, P = 24;
  const auto ui = randf(Shape{n, P}, 85), ut = randf(Shape{n, P}, 86), dzl = randf(Shape{n, P}, 87);
  check_offsets("contrastive and L2 norm", [&](Arena& a) {
    auto uiv = a.in(ui), utv = a.in(ut), zi = a.out(Shape{n, P}), zt = a.out(Shape{n, P}), ni = a.out(Shape{n}),
         nt = a.out(Shape{n}), logits = a.out(Shape{n, n}), dzi = a.out(Shape{n, P}), dzt = a.out(Shape{n, P}),
         dui = a.out(Shape{n, P}), dzlv = a.in(dzl);
    cpu::l2_normalize_forward<float>(uiv, zi, ni);
    cpu::l2_normalize_forward<float>(utv, zt, nt);
    const ContrastiveResult r = cpu::contrastive_forward<float>(zi, zt, 2.3f, 4.6f, logits);
    float dtheta = 0;
    cpu::contrastive_backward<float>(zi, zt, 2.3f, 4.6f, logits, 1.0f, dzi, dzt, &dtheta);
    cpu::l2_normalize_backward<float>(uiv, zi, ni, dzlv, dui);
    std::vector<float> out = collect({zi, zt, logits, dzi, dzt, dui});
    out.push_back(static_cast<float>(r.loss));
    out.push_back(dtheta);
    return out;
  });
}

TEST_CASE("alignment: the MoE layer, forward (gates, top-2 with noise and capacity, experts, combine) and backward") {
  const index_t N = 96, D = 32, M = 48, E = 8;
  moe::MoeConfig mc;
  mc.experts = static_cast<int>(E);
  mc.top_k = 2;
  mc.router.capacity_factor_train = 1.0;
  mc.router.noise_std = 1.0;
  const auto x = randf(Shape{N, D}, 90), rw = randf(Shape{E, D}, 91, 0.3), w1 = randf(Shape{E, M, D}, 92, 0.2),
             b1 = randf(Shape{E, M}, 93, 0.1), w2 = randf(Shape{E, D, M}, 94, 0.2), b2 = randf(Shape{E, D}, 95, 0.1),
             dy = randf(Shape{N, D}, 96);
  std::vector<std::uint8_t> modality(static_cast<std::size_t>(N));
  for (index_t i = 0; i < N; ++i) modality[static_cast<std::size_t>(i)] = i % 5 == 0 ? 1 : 0;
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    check_offsets(bf16 ? "moe backward bf16" : "moe backward fp32", [&](Arena& a) {
      const moe::MoeParams<float> p{a.in(rw), a.in(w1), a.in(b1), a.in(w2), a.in(b2)};
      const moe::MoeGrads<float> g{a.out(rw.shape()), a.out(w1.shape()), a.out(b1.shape()), a.out(w2.shape()),
                                   a.out(b2.shape())};
      auto xv = a.in(x), dyv = a.in(dy), y = a.out(Shape{N, D}), dx = a.out(Shape{N, D});
      moe::MoeContext<float> c;
      if (bf16) {
        moe::moe_forward<float>(mc, p, xv, modality, Mode::Train, Rng(4), y, c, nullptr, Bf16Mixed{});
        moe::moe_backward<float>(p, xv, dyv, dx, g, c, 1.0, nullptr, Bf16Mixed{});
      } else {
        moe::moe_forward<float>(mc, p, xv, modality, Mode::Train, Rng(4), y, c, nullptr, Fp32{});
        moe::moe_backward<float>(p, xv, dyv, dx, g, c, 1.0, nullptr, Fp32{});
      }
      return collect({y, dx, g.router_w, g.fc1_w, g.fc1_b, g.fc2_w, g.fc2_b});
    });
  }
}
