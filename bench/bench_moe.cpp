// bench_moe: the sparse MoE layer against a dense MLP of equal per-token compute (semantics §7 claim 1
// compares at equal per-token compute): T = 4096 tokens, E = 8 experts of D -> 4D -> D, K = 1, capacity
// factor 1.0, BPR, training mode (noise on); the dense MLP is one D -> 4D -> D. Forward, and forward+backward.
// Reports tokens per second (items_per_second). Arguments: D.
//   ./bench_moe --benchmark_filter='/384'
#include <benchmark/benchmark.h>

#include <cstdint>
#include <limoe/limoe.hpp>
#include <limoe/moe/moe.hpp>
#include <limoe/ops/gelu.hpp>
#include <limoe/ops/linear.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <vector>

namespace {
using namespace limoe;
constexpr index_t kTokens = 4096;
constexpr int kExperts = 8;

struct MoeSetup {
  index_t D, M;
  Tensor<float> wr, w1, b1, w2, b2, gwr, gw1, gb1, gw2, gb2;
  Tensor<float> x, y, dy, dx;
  std::vector<std::uint8_t> modality;
  moe::MoeConfig cfg;
  moe::MoeContext<float> ctx;
  explicit MoeSetup(index_t D_)
      : D(D_), M(4 * D_), wr(Shape{kExperts, D}), w1(Shape{kExperts, M, D}), b1(Shape{kExperts, M}),
        w2(Shape{kExperts, D, M}), b2(Shape{kExperts, D}), gwr(Shape{kExperts, D}), gw1(Shape{kExperts, M, D}),
        gb1(Shape{kExperts, M}), gw2(Shape{kExperts, D, M}), gb2(Shape{kExperts, D}), x(Shape{kTokens, D}),
        y(Shape{kTokens, D}), dy(Shape{kTokens, D}), dx(Shape{kTokens, D}), modality(kTokens, moe::kImage) {
    testing::fill_normal(wr.view(), 1, 0.05);
    testing::fill_normal(w1.view(), 2, 0.05);
    testing::fill_normal(w2.view(), 3, 0.05);
    testing::fill_normal(x.view(), 4);
    testing::fill_normal(dy.view(), 5);
    for (index_t t = kTokens * 3 / 4; t < kTokens; ++t) modality[t] = moe::kText;  // images then texts
    cfg.experts = kExperts;
    cfg.top_k = 1;
    cfg.router.capacity_factor_train = 1.0;
    cfg.router.bpr = true;
  }
  moe::MoeParams<float> params() const { return {wr.view(), w1.view(), b1.view(), w2.view(), b2.view()}; }
  moe::MoeGrads<float> grads() { return {gwr.view(), gw1.view(), gb1.view(), gw2.view(), gb2.view()}; }
  void forward(std::uint64_t step) {
    moe::moe_forward<float>(cfg, params(), x.view(), modality, moe::Mode::Train, Rng(7).derive(step), y.view(), ctx);
  }
  void backward() { moe::moe_backward<float>(params(), x.view(), dy.view(), dx.view(), grads(), ctx); }
};

struct DenseSetup {
  index_t D, M;
  Tensor<float> w1, b1, w2, b2, gw1, gb1, gw2, gb2, x, pre, h, y, dy, dh, dx;
  explicit DenseSetup(index_t D_)
      : D(D_), M(4 * D_), w1(Shape{M, D}), b1(Shape{M}), w2(Shape{D, M}), b2(Shape{D}), gw1(Shape{M, D}),
        gb1(Shape{M}), gw2(Shape{D, M}), gb2(Shape{D}), x(Shape{kTokens, D}), pre(Shape{kTokens, M}),
        h(Shape{kTokens, M}), y(Shape{kTokens, D}), dy(Shape{kTokens, D}), dh(Shape{kTokens, M}),
        dx(Shape{kTokens, D}) {
    testing::fill_normal(w1.view(), 2, 0.05);
    testing::fill_normal(w2.view(), 3, 0.05);
    testing::fill_normal(x.view(), 4);
    testing::fill_normal(dy.view(), 5);
  }
  void forward() {
    cpu::linear_forward<float>(x.view(), w1.view(), b1.view(), pre.view());
    cpu::gelu_forward<float>(GeluKind::Erf, pre.view(), h.view());
    cpu::linear_forward<float>(h.view(), w2.view(), b2.view(), y.view());
  }
  void backward() {
    cpu::linear_backward<float>(h.view(), w2.view(), dy.view(), dh.view(), gw2.view(), gb2.view());
    cpu::gelu_backward<float>(GeluKind::Erf, pre.view(), dh.view(), dh.view());
    cpu::linear_backward<float>(x.view(), w1.view(), dh.view(), dx.view(), gw1.view(), gb1.view());
  }
};

void BM_MoeForward(benchmark::State& state) {
  MoeSetup s(state.range(0));
  std::uint64_t step = 0;
  for (auto _ : state) {
    s.forward(step++);
    benchmark::DoNotOptimize(s.y.data());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["drop_frac"] = s.ctx.stats.drop_fraction[0];
}
void BM_MoeForwardBackward(benchmark::State& state) {
  MoeSetup s(state.range(0));
  std::uint64_t step = 0;
  for (auto _ : state) {
    s.forward(step++);
    s.backward();
    benchmark::DoNotOptimize(s.dx.data());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
}
void BM_DenseForward(benchmark::State& state) {
  DenseSetup s(state.range(0));
  for (auto _ : state) {
    s.forward();
    benchmark::DoNotOptimize(s.y.data());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
}
void BM_DenseForwardBackward(benchmark::State& state) {
  DenseSetup s(state.range(0));
  for (auto _ : state) {
    s.forward();
    s.backward();
    benchmark::DoNotOptimize(s.dx.data());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
}
}  // namespace

BENCHMARK(BM_MoeForward)->Arg(384)->Arg(768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DenseForward)->Arg(384)->Arg(768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_MoeForwardBackward)->Arg(384)->Arg(768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DenseForwardBackward)->Arg(384)->Arg(768)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
