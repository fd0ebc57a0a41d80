// Shared helpers of the test_moe_*.cpp files: random parameters and a naive double-precision reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limoe/moe/moe.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <numeric>
#include <vector>

namespace moe_test {
using namespace limoe;
using namespace limoe::moe;

template <class T>
struct Fixture {
  index_t E, D, M;
  Tensor<T> wr, w1, b1, w2, b2;       // parameters
  Tensor<T> gwr, gw1, gb1, gw2, gb2;  // gradients
  Fixture(index_t E_, index_t D_, index_t M_, std::uint64_t seed, double wscale = 0.5, double rscale = 1.0)
      : E(E_), D(D_), M(M_), wr(Shape{E, D}), w1(Shape{E, M, D}), b1(Shape{E, M}), w2(Shape{E, D, M}),
        b2(Shape{E, D}), gwr(Shape{E, D}), gw1(Shape{E, M, D}), gb1(Shape{E, M}), gw2(Shape{E, D, M}),
        gb2(Shape{E, D}) {
    testing::fill_normal(wr.view(), seed + 1, rscale);
    testing::fill_normal(w1.view(), seed + 2, wscale);
    testing::fill_normal(b1.view(), seed + 3, 0.1);
    testing::fill_normal(w2.view(), seed + 4, wscale);
    testing::fill_normal(b2.view(), seed + 5, 0.1);
  }
  MoeParams<T> params() const { return {wr.view(), w1.view(), b1.view(), w2.view(), b2.view()}; }
  MoeGrads<T> grads() { return {gwr.view(), gw1.view(), gb1.view(), gw2.view(), gb2.view()}; }
  void zero_grads() {
    gwr.zero(), gw1.zero(), gb1.zero(), gw2.zero(), gb2.zero();
  }
};

// Expert e applied to one token, naive loops in double (exact erf GELU).
template <class T>
std::vector<double> ref_expert(const Fixture<T>& f, index_t e, const T* x) {
  std::vector<double> h(static_cast<std::size_t>(f.M)), y(static_cast<std::size_t>(f.D));
  for (index_t m = 0; m < f.M; ++m) {
    double a = f.b1[e * f.M + m];
    for (index_t d = 0; d < f.D; ++d) a += static_cast<double>(f.w1[(e * f.M + m) * f.D + d]) * x[d];
    h[m] = 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
  }
  for (index_t d = 0; d < f.D; ++d) {
    double a = f.b2[e * f.D + d];
    for (index_t m = 0; m < f.M; ++m) a += static_cast<double>(f.w2[(e * f.D + d) * f.M + m]) * h[m];
    y[d] = a;
  }
  return y;
}

// Clean gates softmax(x W_r^T) of one token, naive.
template <class T>
std::vector<double> ref_gates(const Fixture<T>& f, const T* x) {
  std::vector<double> l(static_cast<std::size_t>(f.E));
  for (index_t e = 0; e < f.E; ++e) {
    double a = 0;
    for (index_t d = 0; d < f.D; ++d) a += static_cast<double>(f.wr[e * f.D + d]) * x[d];
    l[e] = a;
  }
  const double mx = *std::max_element(l.begin(), l.end());
  double s = 0;
  for (auto& v : l) s += (v = std::exp(v - mx));
  for (auto& v : l) v /= s;
  return l;
}

// The soft top-K mixture, computed densely: y[t] = sum over the K largest gates of gate * Expert_e(x[t]).
template <class T>
Tensor<double> ref_soft_topk(const Fixture<T>& f, CView<T> x, int K) {
  const index_t N = x.dim(0), D = f.D;
  Tensor<double> y(Shape{N, D});
  for (index_t t = 0; t < N; ++t) {
    const auto g = ref_gates(f, x.row(t));
    std::vector<int> idx(static_cast<std::size_t>(f.E));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return g[a] > g[b]; });
    for (int k = 0; k < K; ++k) {
      const auto o = ref_expert(f, idx[k], x.row(t));
      for (index_t d = 0; d < D; ++d) y[t * D + d] += g[idx[k]] * o[d];
    }
  }
  return y;
}

inline MoeConfig config(int E, int K, double cf_train, double cf_eval, bool bpr, double noise = 1.0,
                        index_t group_size = 0) {
  MoeConfig c;
  c.experts = E;
  c.top_k = K;
  c.router.capacity_factor_train = cf_train;
  c.router.capacity_factor_eval = cf_eval;
  c.router.bpr = bpr;
  c.router.noise_std = noise;
  c.router.group_size = group_size;
  return c;
}

}  // namespace moe_test
