// limoe/ops/shapes.hpp: what each op accepts, shared by every backend: the shape checks (each names the
// argument and the fix in its message) and the argument structs (weights, gradients, caches) of the ops in
// limoe/ops/. Plain C++ with no Eigen and no TBB, so the CUDA backend's nvcc-compiled sources include it too;
// views, tensors and caches take the backend's memory space S (HostSpace by default).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "limoe/core/enums.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/math/host_device.hpp"

namespace limoe {

// The eps of the L2 normalisation z = u / (||u|| + eps) (ops/l2norm.hpp), for every backend and scalar.
inline constexpr double kL2NormEps = 1e-8;

struct ContrastiveResult {
  double loss = 0;
  double accuracy_i2t = 0;  // fraction of images whose best text is their own
  double accuracy_t2i = 0;  // fraction of texts whose best image is their own
  double scale = 0;         // the temperature t actually used (after the clamp)
};

// The weights of one attention layer (docs/cli.md `attn.{q,k,v,o}.weight` [D, D] / `.bias` [D]).
template <class T, class S = HostSpace>
struct AttentionWeights {
  CView<T, S> wq, bq, wk, bk, wv, bv, wo, bo;
};

// Their gradients (accumulated); an empty view skips that gradient.
template <class T, class S = HostSpace>
struct AttentionGrads {
  View<T, S> wq, bq, wk, bk, wv, bv, wo, bo;
};

// What the forward keeps for the backward, plus the backward's scratch. Reuse one cache across calls: the
// buffers are resized, and keep their storage when the sizes do not grow.
template <class T, class S = HostSpace>
struct AttentionCache {
  Tensor<T, S> q, k, v;     // [B, Nq, D], [B, Nk, D], [B, Nk, D] projections (with bias)
  Tensor<T, S> probs;       // [B, H, Nq, Nk] softmax probabilities (0 at masked keys)
  Tensor<T, S> ctx;         // [B, Nq, D] concatenated per-head contexts
  // Backward scratch.
  Tensor<T, S> dctx, dq, dk, dv;  // [B, Nq, D], [B, Nq, D], [B, Nk, D], [B, Nk, D]
  Tensor<T, S> dscores;           // [chunks, Nq, Nk] one score gradient per parallel chunk
  // Under a mixed precision policy (core/precision.hpp) the per-head products read bf16 operands: the forward
  // keeps q, k, v and the probabilities rounded once (as the backward reads them too); the backward rounds dctx
  // and the score gradients into the last two. Empty under fp32. The CPU backend's projections write q16, k16,
  // v16 directly under a mixed policy and leave q, k, v (sized) unwritten: nothing reads them there.
  Tensor<std::uint16_t, S> q16, k16, v16, probs16;  // shapes of q, k, v, probs
  Tensor<std::uint16_t, S> dctx16, dscores16;       // shapes of dctx, dscores

  // Sizes what a forward fills (every backend's forward calls this: the layout is written once).
  void size_forward(index_t B, index_t Nq, index_t Nk, index_t D, index_t H) {
    q.resize(Shape{B, Nq, D});
    k.resize(Shape{B, Nk, D});
    v.resize(Shape{B, Nk, D});
    probs.resize(Shape{B, H, Nq, Nk});
    ctx.resize(Shape{B, Nq, D});
  }
  // A forward under fp32 drops the bf16 copies, so that a backward under a mixed policy cannot read stale ones.
  void drop_bf16_copies() {
    for (auto* t : {&q16, &k16, &v16, &probs16}) t->resize(Shape{0});
  }
};

// The weights of a `map` head. fc1_w [M, D], fc1_b [M], fc2_w [D, M], fc2_b [D], the rest [D] or [D, D].
template <class T, class S = HostSpace>
struct MapHeadWeights {
  CView<T, S> probe;              // [D]
  AttentionWeights<T, S> attn;    // q/k/v/o [D, D] / [D]
  CView<T, S> ln_g, ln_b;         // [D]
  CView<T, S> fc1_w, fc1_b;       // [M, D], [M]
  CView<T, S> fc2_w, fc2_b;       // [D, M], [D]
};

// Their gradients (accumulated; an empty view skips it).
template <class T, class S = HostSpace>
struct MapHeadGrads {
  View<T, S> probe;
  AttentionGrads<T, S> attn;
  View<T, S> ln_g, ln_b, fc1_w, fc1_b, fc2_w, fc2_b;
};

// Activations for the backward and its scratch; reuse across calls (buffers keep their storage).
template <class T, class S = HostSpace>
struct MapHeadCache {
  Tensor<T, S> query;            // [B, 1, D] the probe repeated per example (the attention's xq)
  Tensor<T, S> u;                // [B, 1, D] attention output
  Tensor<T, S> ln, mean, rstd;   // [B, D], [B], [B]
  Tensor<T, S> h, a;             // [B, M] fc1 output before / after GELU
  AttentionCache<T, S> attn;
  Tensor<T, S> da, dln, du, dquery;  // [B, M], [B, D], [B, 1, D], [B, 1, D] backward scratch
  // true: the forward computes y only, and no backward may follow (an evaluation forward: Limoe sets it). The
  // CPU backend then folds the probe's query into the key and value weights (cpu::map_head_forward): the
  // attention reads the tokens twice, in products of H columns, instead of projecting every token to k and v.
  bool inference = false;
  Tensor<T, S> fold, mixed;  // inference scratch: [H + 1, D] (q Wk per head, then q), [B, H, D]

  // Sizes what a forward fills (every backend's forward; the layout is written once).
  void size_forward(index_t B, index_t D, index_t M) {
    query.resize(Shape{B, 1, D});
    u.resize(Shape{B, 1, D});
    ln.resize(Shape{B, D});
    mean.resize(Shape{B});
    rstd.resize(Shape{B});
    h.resize(Shape{B, M});
    a.resize(Shape{B, M});
  }
  // The host backends' start: size_forward, then the query is the probe per example.
  void start_forward(CView<T, S> probe, index_t B, index_t D, index_t M)
    requires S::host_accessible
  {
    size_forward(B, D, M);
    for (index_t b = 0; b < B; ++b)
      for (index_t d = 0; d < D; ++d) query[b * D + d] = probe[d];
  }
};

namespace detail {
// Views as check arguments: not deduced (the caller names T, and S when it is not HostSpace), so a View<T>
// binds to a CView<T> parameter as it does in the ops' own signatures.
template <class T, class S>
using CArg = std::type_identity_t<CView<T, S>>;
template <class T, class S>
using Arg = std::type_identity_t<View<T, S>>;

// Checks the shapes of a linear layer and returns the row count R.
template <class T, class S = HostSpace>
index_t linear_check(const char* fn, detail::CArg<T, S> x, detail::CArg<T, S> W, detail::CArg<T, S> b, const Shape& y, const char* yname) {
  LIMOE_CHECK(W.rank() == 2, fn, ": W must be [O, I], got ", W.shape().str());
  const index_t O = W.dim(0), I = W.dim(1);
  LIMOE_CHECK(x.rank() >= 1 && x.shape().back() == I, fn, ": x ", x.shape().str(), " must end in I = ", I,
              " (W is ", W.shape().str(), ")");
  const index_t R = I > 0 ? x.numel() / I : 0;
  LIMOE_CHECK(y.rank() >= 1 && y.back() == O && y.numel() == R * O, fn, ": ", yname, " ", y.str(),
              " must hold ", R, " rows of O = ", O, " (x is ", x.shape().str(), ", W is ", W.shape().str(), ")");
  LIMOE_CHECK(b.empty() || b.numel() == O, fn, ": bias ", b.shape().str(), " must have O = ", O,
              " elements (or be empty for no bias)");
  return R;
}

template <class T, class S = HostSpace>
index_t layernorm_check(const char* fn, detail::CArg<T, S> x, detail::CArg<T, S> g, detail::CArg<T, S> b) {
  const index_t D = g.numel();
  LIMOE_CHECK(g.rank() == 1 && D > 0, fn, ": g must be [D] with D > 0, got ", g.shape().str());
  LIMOE_CHECK(x.rank() >= 1 && x.shape().back() == D, fn, ": x ", x.shape().str(), " must end in D = ", D,
              " (g is ", g.shape().str(), ")");
  LIMOE_CHECK(b.empty() || b.shape() == g.shape(), fn, ": b ", b.shape().str(), " must match g ", g.shape().str());
  return x.numel() / D;
}
template <class T, class S = HostSpace>
void layernorm_check_rows(const char* fn, const char* what, detail::CArg<T, S> v, index_t R) {
  LIMOE_CHECK(!v.empty() && v.numel() == R, fn, ": ", what, " ", v.shape().str(), " must hold one value per row (", R, ")");
}
template <class T, class S = HostSpace>
void layernorm_check_like(const char* fn, const char* what, detail::CArg<T, S> v, detail::CArg<T, S> x) {
  LIMOE_CHECK(v.numel() == x.numel() && v.rank() >= 1 && v.shape().back() == x.shape().back(), fn, ": ", what, " ",
              v.shape().str(), " must match x ", x.shape().str());
}

template <class T, class S = HostSpace>
index_t softmax_check(const char* fn, const char* what, detail::CArg<T, S> v, detail::CArg<T, S> x) {
  LIMOE_CHECK(x.rank() >= 1 && x.shape().back() > 0, fn, ": input ", x.shape().str(),
              " must have a non-empty last dimension");
  LIMOE_CHECK(v.numel() == x.numel() && v.rank() >= 1 && v.shape().back() == x.shape().back(), fn, ": ", what, " ",
              v.shape().str(), " must match ", x.shape().str());
  return x.numel() / x.shape().back();
}

template <class T, class S = HostSpace>
index_t l2norm_check(const char* fn, detail::CArg<T, S> u, detail::CArg<T, S> z, detail::CArg<T, S> norms) {
  LIMOE_CHECK(u.rank() >= 1 && u.shape().back() > 0, fn, ": u ", u.shape().str(),
              " must have a non-empty last dimension");
  const index_t R = u.numel() / u.shape().back();
  LIMOE_CHECK(!z.empty() && z.numel() == u.numel() && z.rank() >= 1 && z.shape().back() == u.shape().back(), fn, ": z ",
              z.shape().str(), " must match u ", u.shape().str());
  LIMOE_CHECK(!norms.empty() && norms.numel() == R, fn, ": norms ", norms.shape().str(), " must hold one value per row (", R, ")");
  return R;
}

template <class T, class S = HostSpace>
void gelu_check_like(const char* fn, const char* what, detail::CArg<T, S> v, detail::CArg<T, S> x) {
  LIMOE_CHECK((!v.empty() || x.numel() == 0) && v.numel() == x.numel(), fn, ": ", what, " ", v.shape().str(), " must have as many elements as x ",
              x.shape().str());
}

struct PatchGeom {
  index_t B, H, W, C, P, nh, nw, N, F;  // F = P * P * C
};
template <class T, class S = HostSpace>
PatchGeom patch_geom(const char* fn, detail::CArg<T, S> images, int P) {
  LIMOE_CHECK(images.rank() == 4, fn, ": images must be [B, H, W, C], got ", images.shape().str());
  LIMOE_CHECK(P > 0, fn, ": patch size must be positive, got ", P);
  PatchGeom g{images.dim(0), images.dim(1), images.dim(2), images.dim(3), P, 0, 0, 0, 0};
  LIMOE_CHECK(g.H % P == 0 && g.W % P == 0, fn, ": image height and width ", g.H, "x", g.W,
              " must be divisible by the patch size ", P, " (images ", images.shape().str(),
              "); resize or crop the images, or choose a patch size that divides both");
  g.nh = g.H / P;
  g.nw = g.W / P;
  g.N = g.nh * g.nw;
  g.F = index_t{P} * P * g.C;
  return g;
}
inline Shape patch_shape(const PatchGeom& g) { return Shape{g.B, g.N, g.F}; }

template <class T, class S = HostSpace>
void token_check(const char* fn, detail::CArg<std::int32_t, S> ids, index_t D, detail::CArg<T, S> pos, const Shape& y, const char* yname) {
  LIMOE_CHECK(ids.rank() >= 1, fn, ": ids must be [B, T] or [T], got ", ids.shape().str());
  LIMOE_CHECK(y.rank() == ids.rank() + 1 && y.back() == D && y.numel() == ids.numel() * D, fn, ": ", yname, " ",
              y.str(), " must be ids ", ids.shape().str(), " plus the width D = ", D);
  const index_t T_ = ids.shape().back();
  LIMOE_CHECK(pos.empty() || (pos.rank() == 2 && pos.dim(1) == D && pos.dim(0) >= T_), fn, ": pos ",
              pos.shape().str(), " must be [L >= ", T_, ", ", D, "] (or empty)");
}

[[noreturn]] inline void bad_token(const char* fn, std::int32_t id, index_t at, index_t T_, index_t V) {
  fail(fn, ": token id ", id, " at position ", at % T_, " of sequence ", at / T_, " is outside the vocabulary [0, ",
       V, "); check the tokenizer's vocabulary size against the model config");
}

struct AttentionDims {
  index_t B = 0, Nq = 0, Nk = 0, D = 0, H = 0, Dh = 0;
};

// The scores are scale * q_h k_h^T with scale = 1 / sqrt(Dh) (every backend's forward and backward).
template <class T>
T attention_scale(const AttentionDims& d) {
  return T(1) / std::sqrt(T(d.Dh));
}

template <class T, class S = HostSpace>
AttentionDims attention_check(const char* fn, const std::type_identity_t<AttentionWeights<T, S>>& w, int heads, detail::CArg<T, S> xq, detail::CArg<T, S> xkv,
                              detail::CArg<std::uint8_t, S> key_mask) {
  LIMOE_CHECK(xq.rank() == 3, fn, ": xq must be [B, Nq, D], got ", xq.shape().str());
  LIMOE_CHECK(xkv.rank() == 3, fn, ": xkv must be [B, Nk, D], got ", xkv.shape().str());
  AttentionDims d;
  d.B = xq.dim(0);
  d.Nq = xq.dim(1);
  d.D = xq.dim(2);
  d.Nk = xkv.dim(1);
  LIMOE_CHECK(xkv.dim(0) == d.B && xkv.dim(2) == d.D, fn, ": xkv ", xkv.shape().str(),
              " must have the batch and width of xq ", xq.shape().str());
  LIMOE_CHECK(heads >= 1, fn, ": heads must be >= 1, got H=", heads);
  LIMOE_CHECK(d.D % heads == 0, fn, ": width D=", d.D, " is not divisible by the number of heads H=", heads,
              "; choose H dividing D");
  d.H = heads;
  d.Dh = d.D / heads;
  const Shape dd{d.D, d.D}, d1{d.D};
  expect_shape(w.wq, dd, "attention: wq");
  expect_shape(w.wk, dd, "attention: wk");
  expect_shape(w.wv, dd, "attention: wv");
  expect_shape(w.wo, dd, "attention: wo");
  expect_shape(w.bq, d1, "attention: bq");
  expect_shape(w.bk, d1, "attention: bk");
  expect_shape(w.bv, d1, "attention: bv");
  expect_shape(w.bo, d1, "attention: bo");
  if (!key_mask.empty()) expect_shape(key_mask, Shape{d.B, d.Nk}, "attention: key_mask");
  return d;
}

// The backward's check that `cache` holds what attention_forward left for these inputs and heads.
template <class T, class S = HostSpace>
void attention_cache_check(const char* fn, const AttentionCache<T, S>& cache, const Shape& xq, const Shape& xkv,
                           const AttentionDims& d) {
  LIMOE_CHECK(cache.q.shape() == xq && cache.k.shape() == xkv && cache.probs.shape() == (Shape{d.B, d.H, d.Nq, d.Nk}),
              fn, ": the cache holds q ", cache.q.shape().str(), ", k ", cache.k.shape().str(), ", probs ",
              cache.probs.shape().str(), " which do not match xq ", xq.str(), ", xkv ", xkv.str(), " and H=", d.H,
              "; run attention_forward with these inputs first");
}

// Under a mixed policy the backward reads the forward's bf16 copies as well.
template <class T, class S = HostSpace>
void attention_cache16_check(const char* fn, const AttentionCache<T, S>& cache) {
  LIMOE_CHECK(cache.q16.shape() == cache.q.shape() && cache.k16.shape() == cache.k.shape() &&
                  cache.v16.shape() == cache.v.shape() && cache.probs16.shape() == cache.probs.shape(),
              fn, ": the cache holds no bf16 copies of the forward's q, k, v and probabilities (the forward ran under "
              "fp32); run attention_forward under the backward's precision policy first");
}

template <class T, class S = HostSpace>
void pool_check(const char* fn, Pooling kind, detail::CArg<T, S> x_or_dx, detail::CArg<std::uint8_t, S> key_mask, detail::CArg<T, S> y_or_dy) {
  LIMOE_CHECK(kind != Pooling::Map, fn, ": map pooling has weights; call map_head_forward/backward instead");
  LIMOE_CHECK(x_or_dx.rank() == 3, fn, ": tokens must be [B, N, D], got ", x_or_dx.shape().str());
  const index_t B = x_or_dx.dim(0), N = x_or_dx.dim(1), D = x_or_dx.dim(2);
  expect_shape(y_or_dy, Shape{B, D}, fn);
  LIMOE_CHECK(kind == Pooling::Gap || N >= 1, fn, ": ", pooling_name(kind), " pooling needs N >= 1 tokens, got ",
              x_or_dx.shape().str());
  if (!key_mask.empty()) expect_shape(key_mask, Shape{B, N}, "pooling: key_mask");
}

// The token `last` pooling reads in a row with mask m[N] (or null): the last unmasked one, N-1 without a mask
// or when all are masked. Host and device.
LIMOE_HD inline index_t last_position(const std::uint8_t* m, index_t N) {
  if (m)
    for (index_t n = N - 1; n >= 0; --n)
      if (m[n]) return n;
  return N - 1;
}
inline index_t last_position(CView<std::uint8_t> key_mask, index_t b, index_t N) {
  return last_position(key_mask.empty() ? nullptr : key_mask.data() + b * N, N);
}

// Number of attended tokens of a row with mask m[N] (N without a mask). Host and device.
LIMOE_HD inline index_t pool_count(const std::uint8_t* m, index_t N) {
  if (!m) return N;
  index_t c = 0;
  for (index_t n = 0; n < N; ++n) c += m[n] != 0;
  return c;
}
inline index_t pool_count(CView<std::uint8_t> key_mask, index_t b, index_t N) {
  return pool_count(key_mask.empty() ? nullptr : key_mask.data() + b * N, N);
}

template <class T>
struct MapDims {
  index_t B, N, D, M;
};

template <class T, class S = HostSpace>
MapDims<T> map_head_check(const char* fn, const std::type_identity_t<MapHeadWeights<T, S>>& w, detail::CArg<T, S> x) {
  LIMOE_CHECK(x.rank() == 3, fn, ": x must be [B, N, D], got ", x.shape().str());
  const index_t B = x.dim(0), N = x.dim(1), D = x.dim(2);
  LIMOE_CHECK(w.fc1_w.rank() == 2, fn, ": fc1_w must be [M, D], got ", w.fc1_w.shape().str());
  const index_t M = w.fc1_w.dim(0);
  expect_shape(w.probe, Shape{D}, "map_head: probe");
  expect_shape(w.ln_g, Shape{D}, "map_head: ln_g");
  expect_shape(w.ln_b, Shape{D}, "map_head: ln_b");
  expect_shape(w.fc1_w, Shape{M, D}, "map_head: fc1_w");
  expect_shape(w.fc1_b, Shape{M}, "map_head: fc1_b");
  expect_shape(w.fc2_w, Shape{D, M}, "map_head: fc2_w");
  expect_shape(w.fc2_b, Shape{D}, "map_head: fc2_b");
  return {B, N, D, M};
}

template <class T, class S = HostSpace>
index_t contrastive_check(const char* fn, detail::CArg<T, S> zi, detail::CArg<T, S> zt, detail::CArg<T, S> logits) {
  LIMOE_CHECK(zi.rank() == 2 && zi.dim(0) > 0, fn, ": zi must be [n, P] with n > 0, got ", zi.shape().str());
  expect_shape(zt, zi.shape(), "contrastive: zt (must match zi)");
  const index_t n = zi.dim(0);
  expect_shape(logits, Shape{n, n}, "contrastive: logits");
  return n;
}
// The temperature and whether the clamp is active.
template <class T, class S = HostSpace>
std::pair<T, bool> contrastive_scale(T theta, T max_scale) {
  const T t = std::exp(theta);
  if (max_scale > T(0) && t > max_scale) return {max_scale, true};
  return {t, false};
}


// add_into: y += x, the same shape. gather_rows: dst [n, D] from src [R, D] by idx [n]; scatter_rows: dst [R, D]
// from src [n, D] by idx [n]. Returns D.
template <class T, class S = HostSpace>
void add_into_check(const char* fn, detail::CArg<T, S> x, detail::CArg<T, S> y) {
  LIMOE_CHECK(x.shape() == y.shape(), fn, ": x ", x.shape().str(), " and y ", y.shape().str(), " must have one shape");
}
// to_bf16: y [same shape] = x rounded to bf16 (a weight mirror's copy).
template <class S = HostSpace>
void to_bf16_check(const char* fn, detail::CArg<float, S> x, detail::CArg<std::uint16_t, S> y) {
  LIMOE_CHECK(x.shape() == y.shape(), fn, ": x ", x.shape().str(), " and y ", y.shape().str(), " must have one shape");
}
template <class T, class S = HostSpace>
index_t rows_by_index_check(const char* fn, detail::CArg<T, S> from, detail::CArg<std::int64_t, S> idx,
                            detail::CArg<T, S> to, bool gather) {
  const detail::CArg<T, S>& packed = gather ? to : from;  // the [n, D] side, one row per index
  const detail::CArg<T, S>& full = gather ? from : to;
  LIMOE_CHECK(full.rank() == 2 && packed.rank() == 2 && packed.dim(1) == full.dim(1), fn, ": src ",
              from.shape().str(), " and dst ", to.shape().str(), " must be matrices of one row width");
  LIMOE_CHECK(idx.rank() == 1 && idx.dim(0) == packed.dim(0), fn, ": idx ", idx.shape().str(), " must hold one row index per row of ",
              packed.shape().str());
  return full.dim(1);
}
}  // namespace detail
}  // namespace limoe
