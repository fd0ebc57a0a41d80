// A model with a user-written router policy and a user-written auxiliary loss, plugged in by type, trained for
// a few steps on the synthetic shapes.   usage: example_custom_policies [steps]
//
// Router: top-1 with "random token selection": capacity is filled in a random token order instead of BPR's
// top-1-gate order. Loss: the Switch Transformer load-balancing loss E * sum_e f_e P_e (Fedus et al. 2021).
#include <cstdio>
#include <cstdlib>
#include <limoe/data/data.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/train/trainer.hpp>
#include <numeric>

using namespace limoe;

struct RandomOrderTop1 {  // satisfies moe::RouterPolicy (see limoe/moe/router.hpp for the contract)
  int top_k() const { return 1; }
  template <class T>
  void route(const moe::RouteGroup<T>& g) const {
    for (index_t s = 0; s < g.S; ++s) {
      const T* l = g.logits + s * g.E;
      T mx = l[0], sum = 0;
      int best = 0;
      for (int e = 0; e < g.E; ++e) if (l[e] > mx) mx = l[e], best = e;
      for (int e = 0; e < g.E; ++e) sum += (g.gates[s * g.E + e] = std::exp(l[e] - mx));
      for (int e = 0; e < g.E; ++e) g.noisy[s * g.E + e] = l[e], g.gates[s * g.E + e] /= sum;
      g.choice[s] = best;
    }
    std::iota(g.order, g.order + g.S, index_t{0});  // a shuffle keyed by the step's counter-based generator
    for (index_t i = g.S - 1; i > 0; --i)
      std::swap(g.order[i], g.order[static_cast<index_t>(g.rng->uniform(7, static_cast<std::uint64_t>(g.row0 + i)) * (i + 1))]);
    std::fill(g.fill, g.fill + g.E, index_t{0});
    for (index_t i = 0; i < g.S; ++i) {
      const index_t s = g.order[i];
      g.route[s] = g.fill[g.choice[s]] < g.capacity ? (++g.fill[g.choice[s]], g.choice[s]) : -1;
    }
  }
};

struct SwitchBalanceLoss {  // satisfies moe::AuxLossTerm: adds its value and its gradient wrt the logits
  static constexpr double kWeight = 0.01;
  template <class T>
  static void accumulate(const moe::LossGroup<T>& g, const moe::AuxLossConfig&, moe::AuxLossValues& v, double* dl) {
    std::vector<double> f(g.E, 0.0), p(g.E, 0.0);
    for (index_t s = 0; s < g.S; ++s) {
      f[g.choice[s * g.K]] += 1.0 / g.S;
      for (int e = 0; e < g.E; ++e) p[e] += g.probs[s * g.E + e] / g.S;
    }
    double L = 0;
    for (int e = 0; e < g.E; ++e) L += g.E * f[e] * p[e];
    v.total += g.scale * kWeight * L;
    if (!dl) return;
    for (index_t s = 0; s < g.S; ++s) {  // dL/dlogit[s,i] = sum_e du_e G[s,e] (1[e=i] - G[s,i]), du_e = E f_e / S
      const T* G = g.probs + s * g.E;
      double dot = 0;
      for (int e = 0; e < g.E; ++e) dot += g.E * f[e] / g.S * G[e];
      for (int i = 0; i < g.E; ++i) dl[s * g.E + i] += g.scale * kWeight * G[i] * (g.E * f[i] / g.S - dot);
    }
  }
};

using MyLosses = moe::AuxLosses<moe::ImportanceLoss, moe::LocalEntropyLoss, moe::GlobalEntropyLoss, SwitchBalanceLoss>;
using MyModel = Limoe<float, RandomOrderTop1, MyLosses>;

int main(int argc, char** argv) try {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 50;
  data::DataSource src;
  src.kind = "synthetic";
  const auto train = data::open_dataset(src, data::Split::train);
  ModelConfig cfg = preset("tiny");
  const auto tok = data::WordTokenizer::build(train.corpus(), cfg.text_len);
  cfg.vocab_size = static_cast<int>(tok.vocab_size());
  MyModel model(cfg);
  model.init(0);
  Trainer<MyModel> trainer(model, {.steps = steps, .warmup_steps = 2});
  data::Loader<data::AnyDataset, data::WordTokenizer> loader(train, tok, {.batch_size = 32});
  for (int s = 0; s < steps; ++s) {
    const auto b = loader.next();
    const auto r = trainer.step(b->images.cview(), b->texts.cview());
    std::printf("step %d  loss %.4f  aux %.4f  text drop %.3f\n", s + 1, r.loss.total, r.loss.aux,
                r.routing[0].drop_fraction[moe::kText]);
  }
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
