// `limoe bench --workload W ...`: the benchmark workloads of bench/README.md, one JSON line each.
//
//   moe_layer   one MoE layer (router, BPR, dispatch, E expert MLPs D -> 4D -> D, combine) on T tokens, training
//               mode (router noise on, capacity factor --capacity-factor, default 1.0), 3/4 image and 1/4 text
//               tokens (as bench/bench_moe.cpp), one routing group; --backward adds moe_backward.   tokens/s
//   dense_mlp   Linear D -> 4D, bias + GELU, Linear 4D -> D on T tokens through limoe::cpu ops, as a dense
//               block of the model runs it; --backward adds its backward.                           tokens/s
//   gemm        C[T, 4D] = A[T, D] B[D, 4D], single precision, through limoe::gemm; under --precision bf16
//               the same product on bf16 operands (converted before timing) with fp32 accumulation: the
//               machine's bf16 product rate through limoe's kernel. Timed in two forms, operands as they lie
//               ("plain": the kernel packs B in every call, as a training step's products do) and B a weight
//               packed once ("packed": as an evaluation forward reads its weights); the line reports the
//               faster ("form"), and both rates (gflops_plain, gflops_packed).                      GFLOP/s
//   embed       image embeddings (Limoe::forward, evaluation mode) of --batch 224x224x3 images with the
//               variant --config (default S/32).                                                    images/s
//   train_step  one Trainer::step (forward, contrastive + auxiliary losses, backward, AdamW) on --batch
//               image-text pairs with the variant --config (default S/32).                          pairs/s
//   peak        the machine's arithmetic ceiling (core/peak.hpp): independent multiply-adds from registers
//               on the widest unit for --precision (fp32: AVX-512 F or AVX2 + FMA; bf16: AMX tiles or AVX-512
//               BF16), --threads threads at once, each repeat about 0.2 s of work; "kernel" names the unit.
//                                                                                                   GFLOP/s
//
// Timing: --warmup untimed iterations, then --repeats timed ones (steady_clock around each); the JSON line
// reports the median, min and max, throughput = units per iteration / median, and the analytic FLOP count
// (2*M*N*K per matrix product, a backward pass counted as twice its forward; elementwise work, softmaxes,
// LayerNorms and the optimizer are not counted). MoE experts are counted for K * tokens rows (the nominal
// per-token compute, independent of routing); "gflop_accepted" counts only the rows the experts accepted.
// peak_rss_mb is getrusage's ru_maxrss of the whole process (setup included).
// --profile (embed, train_step, moe_layer): after the timed iterations, as many again under a profile session
// (core/profile.hpp, docs/profiling.md); "profile" gives each op's calls and self time per iteration.
// --precision bf16 (core/precision.hpp) runs every workload under the Bf16Mixed policy; the layer workloads
// keep their weights in a parameter store whose bf16 copy is made once before timing, as a training step
// makes it once per optimizer step.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include <limoe/core/gemm.hpp>
#include <limoe/core/gemm_mixed.hpp>
#include <limoe/core/params.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/core/profile.hpp>
#include <limoe/core/parallel.hpp>
#include <limoe/core/peak.hpp>
#include <limoe/core/rng.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/moe/moe.hpp>
#include <limoe/ops/gelu.hpp>
#include <limoe/ops/linear.hpp>
#include <limoe/train/trainer.hpp>

#include "cli.hpp"
#include "session.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_bench {
namespace {
using namespace limoe;
using json = nlohmann::ordered_json;  // keys in insertion order: workload first

constexpr std::uint64_t kSeed = 0x5EED;

// N(0, std^2) values from the counter-based generator (stream 0, index i): thread-count independent.
void fill_normal(View<float> v, const Rng& r, double std) {
  parallel_for(0, v.numel(), 1 << 14, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) v[i] = static_cast<float>(std * r.normal(0, static_cast<std::uint64_t>(i)));
  });
}
void fill_uniform(View<float> v, const Rng& r, double lo, double hi) {
  parallel_for(0, v.numel(), 1 << 14, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i)
      v[i] = static_cast<float>(lo + (hi - lo) * r.uniform(0, static_cast<std::uint64_t>(i)));
  });
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux: kilobytes
}

struct Timing {
  std::vector<double> times;  // seconds per timed iteration
  double median = 0, min = 0, max = 0;
  json profile;  // --profile: where the time of `repeats` more iterations went (null otherwise)
};

bool g_profile = false;  // --profile

// `repeats` calls of fn(i) under a profile session (core/profile.hpp): each region's calls and self time per
// iteration, largest first, and the time spent outside every region (host work between ops).
json profile_of(int first, int repeats, const std::function<void(int)>& fn) {
  profile::Profiler prof;
  double wall = 0;
  {
    profile::Session on(prof);
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) fn(first + r);
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  json regions = json::array();
  for (const auto& r : prof.totals())
    regions.push_back({{"region", r.path}, {"calls", static_cast<double>(r.calls) / repeats},
                       {"ms", 1e3 * r.seconds / repeats}, {"share", wall > 0 ? r.seconds / wall : 0.0}});
  return {{"iterations", repeats}, {"ms_per_iter", 1e3 * wall / repeats},
          {"outside_regions_ms", 1e3 * std::max(0.0, wall - prof.seconds()) / repeats}, {"regions", regions}};
}

// t.median, t.min and t.max of t.times (at least one).
void summarize(Timing& t) {
  std::vector<double> s = t.times;
  std::sort(s.begin(), s.end());
  const std::size_t n = s.size();
  t.median = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  t.min = s.front();
  t.max = s.back();
}

// warmup untimed calls of fn(i), then `repeats` timed ones (i counts every call, warmup included); with
// --profile, `repeats` more under a profile session (so the timed ones are not slowed by its waits).
Timing time_it(int warmup, int repeats, const std::function<void(int)>& fn) {
  int i = 0;
  for (; i < warmup; ++i) fn(i);
  Timing t;
  for (int r = 0; r < repeats; ++r, ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn(i);
    t.times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (g_profile) t.profile = profile_of(i, repeats, fn);
  summarize(t);
  return t;
}

// ---- analytic FLOPs of the model (2*M*N*K per product) ----------------------------------------------------
//
// One sequence of L tokens (L = N patches for an image, text_len for a text), width D, MLP width M, E experts,
// top-K, projection P, patch dimension F = patch^2 * channels:
//   patch embedding (images only)      2 L F D
//   per block: q, k, v, o              4 * 2 L D^2
//              scores q k^T, context   2 * 2 L^2 D   (all heads together: H * L^2 * D/H)
//              dense MLP               2 * 2 L D M
//              MoE block               2 L D E (router) + K * 2 * 2 L D M (each token through its K experts)
//   map head:  probe query, o          2 * 2 D^2     (the probe is projected once per sequence)
//              k, v over the tokens    2 * 2 L D^2
//              scores, context         2 * 2 L D     (one query)
//              MLP                     2 * 2 D M
//   projection                         2 D P
// Contrastive logits for a batch of B pairs: 2 B^2 P. gap/first/last pooling: no product.
double sequence_flops(const ModelConfig& c, double L, bool image, Pooling pool) {
  const double D = c.width, M = c.mlp_dim, E = c.experts, K = c.top_k, P = c.proj_dim;
  double f = image ? 2 * L * c.patch_dim() * D : 0.0;
  for (int l = 0; l < c.depth; ++l) {
    f += 8 * L * D * D + 4 * L * L * D;
    f += c.is_moe(l) ? 2 * L * D * E + K * 4 * L * D * M : 4 * L * D * M;
  }
  if (pool == Pooling::Map) f += 4 * D * D + 4 * L * D * D + 4 * L * D + 4 * D * M;
  return f + 2 * D * P;
}
// Expert rows of one sequence type the nominal count assumes (per sequence), for the accepted-rows variant.
double expert_row_flops(const ModelConfig& c) { return 4.0 * c.width * c.mlp_dim; }

// ---- the workloads ----------------------------------------------------------------------------------------

struct Params {
  std::string workload, config;
  PrecisionKind precision = PrecisionKind::Fp32;
  index_t width = 384, tokens = 4096, batch = 32;
  int experts = 8, top_k = 1, repeats = 5, warmup = 1;
  double capacity_factor = 1.0;
  bool backward = false, grad_overlap = true;
  bool packed_weights = true;  // --packed-weights (the model workloads)
  bool has_width = false, has_experts = false, has_top_k = false, has_cf = false;
};

// Layer weights in one parameter store, with the bf16 copy the policy P reads, or under Fp32 the store its
// products keep the weights packed in; both as a model's evaluation forward has them (Limoe::prec), for the
// MoE layer and the dense MLP alike.
template <class P>
struct LayerWeights {
  ParamStore<float> ps;
  WeightMirror mirror;
  Fp32WeightStore fp32;
  P prec() {
    const ParamStore<float>& c = ps;
    if constexpr (P::mixed) {
      mirror.refresh(c);
      return P{mirror.copies()};
    } else {
      return P{fp32.weights(c.values().data(), c.size(), c.version())};
    }
  }
};

template <class P>
json moe_layer(const Params& p) {
  const index_t T = p.tokens, D = p.width, M = 4 * p.width;
  const int E = p.experts, K = p.top_k;
  moe::MoeConfig cfg;
  cfg.experts = E;
  cfg.top_k = K;
  cfg.router.capacity_factor_train = p.capacity_factor;
  cfg.router.bpr = true;
  cfg.router.noise_std = 1.0;
  cfg.router.group_size = 0;
  cfg.validate();
  const Rng rng(kSeed);
  // Weights as Limoe::init does: router N(0, 0.02^2), matrices LeCun normal, zero biases.
  LayerWeights<P> lw;
  const auto rwr = lw.ps.add("router", Shape{E, D}, true), rw1 = lw.ps.add("fc1.weight", Shape{E, M, D}, true),
             rb1 = lw.ps.add("fc1.bias", Shape{E, M}, false), rw2 = lw.ps.add("fc2.weight", Shape{E, D, M}, true),
             rb2 = lw.ps.add("fc2.bias", Shape{E, D}, false);
  lw.ps.finalize();
  const View<float> wr = lw.ps.value(rwr), w1 = lw.ps.value(rw1), w2 = lw.ps.value(rw2);
  const CView<float> b1 = lw.ps.value(rb1), b2 = lw.ps.value(rb2);
  Tensor<float> gwr(Shape{E, D}), gw1(Shape{E, M, D}), gb1(Shape{E, M}), gw2(Shape{E, D, M}), gb2(Shape{E, D});
  Tensor<float> x(Shape{T, D}), y(Shape{T, D}), dy(Shape{T, D}), dx(Shape{T, D});  // [T, D]
  fill_normal(wr, rng.derive(1), 0.02);
  fill_normal(w1, rng.derive(2), 1.0 / std::sqrt(double(D)));
  fill_normal(w2, rng.derive(3), 1.0 / std::sqrt(double(M)));
  fill_normal(x.view(), rng.derive(4), 1.0);  // a LayerNorm output: unit scale
  fill_normal(dy.view(), rng.derive(5), 1.0 / std::sqrt(double(T)));
  std::vector<std::uint8_t> modality(static_cast<std::size_t>(T), moe::kImage);  // images then texts, 3:1
  for (index_t t = T * 3 / 4; t < T; ++t) modality[static_cast<std::size_t>(t)] = moe::kText;
  const moe::MoeParams<float> params{wr, w1, b1, w2, b2};
  const P prec = lw.prec();
  const moe::MoeGrads<float> grads{gwr.view(), gw1.view(), gb1.view(), gw2.view(), gb2.view()};
  moe::MoeContext<float> ctx;
  double accepted = 0;
  int calls = 0;
  const Timing t = time_it(p.warmup, p.repeats, [&](int i) {
    // A new noise draw every call, as successive training steps get.
    moe::moe_forward<float>(cfg, params, x.cview(), modality, moe::Mode::Train, rng.derive(1000 + i), y.view(), ctx,
                            nullptr, prec);
    if (p.backward) moe::moe_backward<float>(params, x.cview(), dy.cview(), dx.view(), grads, ctx, 1.0, nullptr, prec);
    accepted += static_cast<double>(ctx.accepted());
    ++calls;
  });
  const double pass = p.backward ? 3.0 : 1.0;
  const double mean_accepted = accepted / calls;
  // Router [T, D] x [D, E] + K * T expert rows of D -> M -> D.
  const double flop = pass * (2.0 * T * D * E + 4.0 * K * T * D * M);
  const double flop_acc = pass * (2.0 * T * D * E + 4.0 * mean_accepted * D * M);
  return {{"unit", "tokens/s"},       {"units_per_iter", T},
          {"gflop", flop / 1e9},      {"gflop_accepted", flop_acc / 1e9},
          {"flop_basis", "K*tokens"}, {"drop_fraction", 1.0 - mean_accepted / (double(K) * T)},
          {"accepted", mean_accepted}, {"capacity", ctx.stats.capacity},
          {"mlp_dim", M},             {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times},
          {"profile", t.profile}};
}

template <class P>
json dense_mlp(const Params& p) {
  const index_t T = p.tokens, D = p.width, M = 4 * p.width;
  const Rng rng(kSeed);
  LayerWeights<P> lw;
  const auto rw1 = lw.ps.add("fc1.weight", Shape{M, D}, true), rb1 = lw.ps.add("fc1.bias", Shape{M}, false),
             rw2 = lw.ps.add("fc2.weight", Shape{D, M}, true), rb2 = lw.ps.add("fc2.bias", Shape{D}, false);
  lw.ps.finalize();
  const View<float> w1 = lw.ps.value(rw1), w2 = lw.ps.value(rw2);
  const CView<float> b1 = lw.ps.value(rb1), b2 = lw.ps.value(rb2);
  Tensor<float> gw1(Shape{M, D}), gb1(Shape{M}), gw2(Shape{D, M}), gb2(Shape{D});
  Tensor<float> x(Shape{T, D}), pre(Shape{T, M}), h(Shape{T, M}), y(Shape{T, D});  // [T, D], [T, M], [T, M], [T, D]
  Tensor<float> dy(Shape{T, D}), dh(Shape{T, M}), dx(Shape{T, D});                  // [T, D], [T, M], [T, D]
  fill_normal(w1, rng.derive(2), 1.0 / std::sqrt(double(D)));
  fill_normal(w2, rng.derive(3), 1.0 / std::sqrt(double(M)));
  fill_normal(x.view(), rng.derive(4), 1.0);
  fill_normal(dy.view(), rng.derive(5), 1.0 / std::sqrt(double(T)));
  const GeluKind g = GeluKind::Erf;
  const P prec = lw.prec();
  const Timing t = time_it(p.warmup, p.repeats, [&](int) {
    // Exactly the dense block of Limoe (model.hpp block_forward / block_backward).
    cpu::linear_forward<float>(x.cview(), w1, CView<float>{}, pre.view(), prec);
    cpu::bias_gelu_forward<float>(g, b1, pre.view(), h.view());
    cpu::linear_forward<float>(h.cview(), w2, b2, y.view(), prec);
    if (p.backward) {
      cpu::linear_backward<float>(h.cview(), w2, dy.cview(), dh.view(), gw2.view(), gb2.view(), prec);
      cpu::gelu_backward<float>(g, pre.cview(), dh.cview(), dh.view());
      cpu::linear_backward<float>(x.cview(), w1, dh.cview(), dx.view(), gw1.view(), gb1.view(), prec);
    }
  });
  const double flop = (p.backward ? 3.0 : 1.0) * 4.0 * T * D * M;
  return {{"unit", "tokens/s"}, {"units_per_iter", T}, {"gflop", flop / 1e9}, {"mlp_dim", M},
          {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times}};
}

json gemm_workload(const Params& p) {
  const index_t T = p.tokens, D = p.width, N = 4 * p.width;
  const Rng rng(kSeed);
  Tensor<float> a(Shape{T, D}), b(Shape{D, N}), w(Shape{N, D}), c(Shape{T, N});  // [T, D] x [D, 4D] -> [T, 4D]
  fill_normal(a.view(), rng.derive(1), 1.0);
  fill_normal(b.view(), rng.derive(2), 1.0 / std::sqrt(double(D)));
  for (index_t k = 0; k < D; ++k)  // w = b^T: the same product as a layer's x W^T
    for (index_t n = 0; n < N; ++n) w[n * D + k] = b[k * N + n];
  const bool bf16 = p.precision == PrecisionKind::Bf16;
  std::vector<bf16_bits> a16, b16, w16;
  if (bf16) {
    a16.resize(static_cast<std::size_t>(a.numel())), b16.resize(static_cast<std::size_t>(b.numel()));
    w16.resize(static_cast<std::size_t>(w.numel()));
    to_bf16(a.data(), a.numel(), a16.data()), to_bf16(b.data(), b.numel(), b16.data());
    to_bf16(w.data(), w.numel(), w16.data());
  }
  // Plain: both operands as they lie, the kernel packs B inside every call (a training step's products).
  const Timing plain = time_it(p.warmup, p.repeats, [&](int) {
    if (bf16)
      detail::split_product(T, N, D, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
        detail::gemm_bf16_serial(Trans::N, Trans::N, m1 - m0, n1 - n0, D, 1.0f, a16.data() + m0 * D, D,
                                 b16.data() + n0, N, 0.0f, c.data() + m0 * N + n0, N);
      });
    else
      gemm<float>(Trans::N, Trans::N, T, N, D, 1.0f, a.data(), D, b.data(), N, 0.0f, c.data(), N);
  });
  // Packed: B a weight packed once (during the warm-up) and read packed by every call, as a model's evaluation
  // products read their weights (PackedWeights; under bf16 with AMX, its tile kernel).
  PackedWeights store;
  const Timing packed = time_it(std::max(p.warmup, 1), p.repeats, [&](int) {
    if (bf16) {
      Bf16Mixed prec;
      prec.weights = Bf16Copies{w.data(), w.numel(), w16.data(), &store};
      gemm_mixed<float>(prec.with(a.data(), a.numel(), a16.data()), Trans::N, Trans::T, T, N, D, 1.0f, a.data(), D,
                        w.data(), D, 0.0f, c.data(), N);
    } else {
      gemm_mixed<float>(Fp32{Fp32Weights{w.data(), w.numel(), &store}}, Trans::N, Trans::T, T, N, D, 1.0f, a.data(),
                        D, w.data(), D, 0.0f, c.data(), N);
    }
  });
  const double flop = 2.0 * T * D * N;
  const bool packed_best = packed.median < plain.median;
  const Timing& t = packed_best ? packed : plain;
  std::string kernel = bf16 ? detail::bf16_kernel_name() : std::string("fp32");
  std::string kernel_packed = bf16 && amx::available() && amx::eligible(N, D) ? std::string("amx") : kernel;
  return {{"unit", "GFLOP/s"}, {"gflop", flop / 1e9}, {"shape", {T, D, N}},
          {"kernel", packed_best ? kernel_packed : kernel}, {"form", packed_best ? "packed" : "plain"},
          {"gflops_plain", plain.median > 0 ? flop / 1e9 / plain.median : 0.0},
          {"gflops_packed", packed.median > 0 ? flop / 1e9 / packed.median : 0.0},
          {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times}};
}

// The machine's ceiling at this precision: `threads` threads of core/peak.hpp's loop at once, `repeats` times
// (its calibration is the warm-up). The time of a repeat is its slowest thread's.
json peak_workload(const Params& p) {
  const peak::Kind k = peak::kind(p.precision);
  LIMOE_CHECK(k != peak::Kind::None, "--workload peak: this processor or process has no ",
              p.precision == PrecisionKind::Bf16 ? "AMX-BF16 or AVX-512 BF16" : "AVX-512 F or AVX2 + FMA",
              " unit to measure");
  const peak::Timings m = peak::measure(k, num_threads(), p.repeats);
  Timing t;
  t.times = m.seconds;
  summarize(t);
  // gflops (every workload's: at the median) and gflops_best (at the fastest repeat: the ceiling, since the
  // host's noise can only slow the loop down).
  return {{"unit", "GFLOP/s"}, {"gflop", m.flop / 1e9}, {"kernel", peak::name(k)}, {"gflops_best", m.best_gflops()},
          {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times}};
}

// The named variant with the overrides given on the command line. A name is a preset (limoe inspect lists
// them), or a JSON config file (docs/cli.md "config"), or an inline JSON object.
ModelConfig model_config(const Params& p, bool training) {
  ModelConfig c;
  const std::string& n = p.config;
  if (!n.empty() && n.front() == '{') {
    c = config_from_json_string(n);
  } else if (n.size() > 5 && n.substr(n.size() - 5) == ".json") {  // a file (no preset name ends so)
    const std::vector<std::uint8_t> bytes = io::read_file(n);  // a folder or a device: named
    c = config_from_json_string(std::string(bytes.begin(), bytes.end()));
  } else {
    c = preset(n);
  }
  if (p.has_width) {  // a custom width keeps the ViT proportions: MLP 4D, projection D
    c.width = static_cast<int>(p.width);
    c.mlp_dim = static_cast<int>(4 * p.width);
    c.proj_dim = static_cast<int>(p.width);
  }
  if (p.has_experts) c.experts = p.experts;
  if (p.has_top_k) c.top_k = p.top_k;
  if (p.has_cf) (training ? c.router.capacity_factor_train : c.router.capacity_factor_eval) = p.capacity_factor;
  c.validate();
  return c;
}

json model_info(const ModelConfig& c) {
  return {{"depth", c.depth}, {"heads", c.heads}, {"mlp_dim", c.mlp_dim}, {"patch", c.patch},
          {"patches", c.num_patches()}, {"text_len", c.text_len}, {"moe_blocks", c.moe_blocks.size()},
          {"params_total", count_params(c).total}};
}

// Accepted expert rows over all MoE blocks of one forward, and the nominal K * rows.
std::pair<double, double> accepted_rows(const std::vector<moe::RoutingStats>& stats) {
  double acc = 0, nominal = 0;
  for (const auto& s : stats)
    for (int m = 0; m < moe::kModalities; ++m) {
      for (auto r : s.routed[m]) acc += static_cast<double>(r);
      nominal += static_cast<double>(s.tokens[m]) * s.top_k;
    }
  return {acc, nominal};
}

// The model workloads run on the model type the command chose (cli::with_model: CPU fp32 or bf16, or CUDA).
// A forward returns its embeddings in host memory, so a timed iteration on the GPU ends when the device is done.
// The images where the model reads them: a model on a device gets them uploaded once, before the timing (as
// the peer keeps its inputs on the GPU), and fn(images) sees them there; a host model reads host memory.
template <class Model, class Fn>
void with_resident_images(CView<float> images, Fn&& fn) {
  using S = typename Model::memory_space;
  if constexpr (std::is_same_v<S, HostSpace>) {
    fn(images);
  } else {
    Tensor<float, S> on_device(images.shape());
    copy_from_host<float, S>(images, on_device.view());
    fn(on_device.cview());
  }
}

template <class Model>
const char* inputs_where() {
  return std::is_same_v<typename Model::memory_space, HostSpace> ? "host" : "device";
}

template <class Model>
json embed(const Params& p) {
  const ModelConfig c = model_config(p, false);
  Model model(c);
  model.init(kSeed);
  model.set_keep_packed_weights(p.packed_weights);
  const index_t B = p.batch;
  Tensor<float> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});  // [B, H, W, C] in [-1, 1]
  fill_uniform(images.view(), Rng(kSeed).derive(7), -1.0, 1.0);
  std::pair<double, double> rows{0, 0};
  Timing t;
  with_resident_images<Model>(images.cview(), [&](auto resident) {
    t = time_it(p.warmup, p.repeats, [&](int) {
      const auto f = model.forward(resident, CView<std::int32_t>{}, Mode::Eval);
      rows = accepted_rows(f.stats);
    });
  });
  const double flop = B * sequence_flops(c, c.num_patches(), true, c.pool_img);
  const double flop_acc = flop - (rows.second - rows.first) * expert_row_flops(c);
  json j = {{"unit", "images/s"}, {"units_per_iter", B}, {"gflop", flop / 1e9}, {"gflop_accepted", flop_acc / 1e9},
            {"flop_basis", "K*tokens"}, {"drop_fraction", rows.second > 0 ? 1.0 - rows.first / rows.second : 0.0},
            {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times},
            {"width", c.width}, {"experts", c.experts}, {"top_k", c.top_k},
            {"capacity_factor", c.router.capacity_factor_eval}, {"tokens", B * c.num_patches()},
            {"inputs", inputs_where<Model>()}, {"profile", t.profile}};
  j.update(model_info(c));
  return j;
}

template <class Model>
json train_step(const Params& p) {
  const ModelConfig c = model_config(p, true);
  Model model(c);
  model.init(kSeed);
  model.set_keep_packed_weights(p.packed_weights);
  TrainConfig tc;
  tc.steps = 1000;
  tc.warmup_steps = 10;
  tc.overlap_grad_sum = p.grad_overlap;
  // Under mpirun: data parallel over the ranks, --batch the whole batch of a step (each rank steps on its part).
  dist::AnyComm comm = cli::world();
  const int ranks = comm.size(), rank = comm.rank();
  const index_t B = p.batch;
  LIMOE_CHECK(B % ranks == 0, "--batch ", B, " must split evenly over the ", ranks, " ranks");
  const index_t n = B / ranks;
  Trainer<Model, dist::AnyComm> trainer(model, tc, std::move(comm));
#if defined(LIMOE_CLI_NCCL)
  if constexpr (!std::is_same_v<typename Model::memory_space, HostSpace>)
    if (ranks > 1)
      if (auto nccl = cli::nccl_world()) trainer.sum_gradients_with(std::move(*nccl));  // as limoe train
#endif
  Tensor<float> images(Shape{B, c.image_size[0], c.image_size[1], c.channels});  // [B, H, W, C] in [-1, 1]
  Tensor<std::int32_t> texts(Shape{B, c.text_len});                              // [B, T] ids in [1, V)
  const Rng rng(kSeed);
  fill_uniform(images.view(), rng.derive(7), -1.0, 1.0);
  const Rng ids = rng.derive(8);
  for (index_t i = 0; i < texts.numel(); ++i)
    texts[i] = 1 + static_cast<std::int32_t>(ids.uniform(0, static_cast<std::uint64_t>(i)) * (c.vocab_size - 1));
  const index_t H = c.image_size[0], W = c.image_size[1];
  const CView<float> my_images(images.data() + rank * n * H * W * c.channels, Shape{n, H, W, c.channels});
  const CView<std::int32_t> my_texts(texts.data() + rank * n * c.text_len, Shape{n, c.text_len});
  std::pair<double, double> rows{0, 0};
  double comm_s = 0, hidden_s = 0, step_s = 0;
  Timing t;
  with_resident_images<Model>(my_images, [&](auto resident) {
    t = time_it(p.warmup, p.repeats, [&](int) {
      const auto r = trainer.step(resident, my_texts);
      rows = accepted_rows(r.routing);
      comm_s += trainer.comm_seconds();
      hidden_s += trainer.overlapped_comm_seconds();
      step_s += r.seconds;
    });
  });
  // Forward of B images and B texts plus the contrastive logits; backward counted twice.
  const double fwd = B * sequence_flops(c, c.num_patches(), true, c.pool_img) +
                     B * sequence_flops(c, c.text_len, false, c.pool_txt) + 2.0 * B * B * c.proj_dim;
  const double flop = 3.0 * fwd;
  const double flop_acc = flop - 3.0 * (rows.second - rows.first) * expert_row_flops(c);
  json j = {{"unit", "pairs/s"}, {"units_per_iter", B}, {"gflop", flop / 1e9}, {"gflop_accepted", flop_acc / 1e9},
            {"flop_basis", "K*tokens"}, {"drop_fraction", rows.second > 0 ? 1.0 - rows.first / rows.second : 0.0},
            {"median_s", t.median}, {"min_s", t.min}, {"max_s", t.max}, {"times_s", t.times},
            {"width", c.width}, {"experts", c.experts}, {"top_k", c.top_k},
            {"capacity_factor", c.router.capacity_factor_train}, {"tokens", B * (c.num_patches() + c.text_len)},
            {"inputs", inputs_where<Model>()}, {"ranks", ranks}, {"comm_share", step_s > 0 ? comm_s / step_s : 0.0},
            {"overlapped_comm_share", step_s > 0 ? hidden_s / step_s : 0.0},
            {"gradient_sum", ranks == 1                         ? "none"
                             : trainer.sums_gradients_on_device() ? "device"
                             : trainer.overlaps_grad_sum()        ? "host-overlapped"
                                                                  : "host"},
            {"profile", t.profile}};
  j.update(model_info(c));
  return j;
}

int run(const std::vector<std::string>& argv) {
  cli::Args args(argv,
                 {"workload", "config", "width", "tokens", "experts", "top-k", "capacity-factor", "batch", "threads",
                  "repeats", "warmup", "device", "precision", "packed-weights"},
                 {"backward", "no-grad-overlap", "profile"}, "bench");
  const cli::BackendChoice backend = cli::check_backend(args);
  const PrecisionKind precision = backend.precision;
  LIMOE_CHECK(args.positional().empty(), "unexpected argument \"",
              args.positional().empty() ? "" : args.positional()[0], "\"");
  Params p;
  p.workload = args.required("workload");
  p.precision = precision;
  p.packed_weights = backend.packed_weights;
  const std::vector<std::string> known{"moe_layer", "dense_mlp", "gemm", "embed", "train_step", "peak"};
  LIMOE_CHECK(std::find(known.begin(), known.end(), p.workload) != known.end(), "unknown --workload \"", p.workload,
              "\"; expected one of moe_layer, dense_mlp, gemm, embed, train_step, peak");
  auto positive = [&](const char* name, long long def, long long max = 1LL << 40) {
    return args.integer(name, def, 1, max);
  };
  p.width = positive("width", 384, 1 << 16);
  p.tokens = positive("tokens", 4096, 1 << 24);
  p.experts = static_cast<int>(positive("experts", 8, moe::detail::kMaxStackExperts));
  p.top_k = static_cast<int>(positive("top-k", 1, moe::detail::kMaxStackExperts));
  LIMOE_CHECK(p.top_k <= p.experts, "--top-k ", p.top_k, " must be at most --experts ", p.experts);
  p.capacity_factor = args.number("capacity-factor", 1.0, 0.0);  // 0: no token dropped
  p.batch = positive("batch", 32, 1 << 16);
  p.repeats = static_cast<int>(positive("repeats", 5, 1 << 20));
  p.warmup = static_cast<int>(args.integer("warmup", 1, 0, 1 << 20));
  p.backward = args.flag("backward");
  p.grad_overlap = !args.flag("no-grad-overlap");
  LIMOE_CHECK(p.grad_overlap || p.workload == "train_step", "--no-grad-overlap applies to train_step only");
  g_profile = args.flag("profile");
  LIMOE_CHECK(!g_profile || (p.workload != "gemm" && p.workload != "dense_mlp" && p.workload != "peak"),
              "--profile breaks down the model workloads and moe_layer by op; ", p.workload,
              p.workload == "peak" ? " is one loop of multiply-adds" : " is one product or a fixed sequence of three",
              ", so there is nothing to break down");
  p.has_width = args.has("width");
  p.has_experts = args.has("experts");
  p.has_top_k = args.has("top-k");
  p.has_cf = args.has("capacity-factor");
  const bool model_workload = p.workload == "embed" || p.workload == "train_step";
  p.config = args.str("config", model_workload ? "S/32" : "");
  LIMOE_CHECK(!args.has("config") || !p.config.empty(), "--config needs a variant name");
  LIMOE_CHECK(p.workload != "peak" || !args.has("config"), "--workload peak measures the processor, not a variant: "
              "drop --config");
  LIMOE_CHECK(!p.backward || (p.workload != "gemm" && p.workload != "embed" && p.workload != "peak"),
              "--backward applies to moe_layer and dense_mlp (train_step always runs it), not to ", p.workload);
  if (!model_workload && args.has("config")) {
    // A layer workload with a named variant: its width, experts and top-k unless given explicitly.
    Params q = p;
    q.has_width = q.has_experts = q.has_top_k = q.has_cf = false;
    const ModelConfig c = model_config(q, true);
    if (!p.has_width) p.width = c.width;
    if (!p.has_experts) p.experts = c.experts;
    if (!p.has_top_k) p.top_k = c.top_k;
  }
  cli::set_threads(args);  // 0 or absent: all cores (oneTBB's default)

  if (p.workload != "train_step") cli::require_one_rank("bench --workload " + p.workload);
  LIMOE_CHECK(!backend.cuda || model_workload, "--device cuda times the model workloads (embed, train_step); the "
              "GPU's MoE layer and products are timed by bench_cuda_moe (scripts/gpu-check)");
  json j;
  if (model_workload) {
    j = cli::with_model(backend, [&]<class Model>() {
      return p.workload == "embed" ? embed<Model>(p) : train_step<Model>(p);
    });
  } else {
    auto workload = [&]<class P>() {
      if (p.workload == "moe_layer") return moe_layer<P>(p);
      if (p.workload == "dense_mlp") return dense_mlp<P>(p);
      if (p.workload == "peak") return peak_workload(p);
      return gemm_workload(p);
    };
    if (precision == PrecisionKind::Bf16) j = workload.template operator()<Bf16Mixed>();
    else j = workload.template operator()<Fp32>();
  }

  json out = {{"workload", p.workload}, {"impl", "limoe"}};
  const double gflop = j["gflop"].get<double>(), median = j["median_s"].get<double>();
  const double gflops = median > 0 ? gflop / median : 0.0;
  out["throughput"] = j["unit"] == "GFLOP/s" ? gflops : (median > 0 ? j["units_per_iter"].get<double>() / median : 0.0);
  out["unit"] = j["unit"];
  out["median_s"] = median;
  out["min_s"] = j["min_s"];
  out["max_s"] = j["max_s"];
  out["gflop"] = gflop;
  out["gflops"] = gflops;
  out["threads"] = num_threads();
  out["precision"] = precision_name(precision);
  out["packed_weights"] = p.packed_weights;
  out["device"] = backend.cuda ? "cuda" : "cpu";
  // Parameters used (for embed/train_step: the model's; --tokens is then the tokens of one batch).
  out["width"] = j.contains("width") ? j["width"] : json(p.width);
  out["tokens"] = j.contains("tokens") ? j["tokens"] : json(p.tokens);
  out["experts"] = j.contains("experts") ? j["experts"] : json(p.experts);
  out["top_k"] = j.contains("top_k") ? j["top_k"] : json(p.top_k);
  out["capacity_factor"] = j.contains("capacity_factor") ? j["capacity_factor"] : json(p.capacity_factor);
  out["batch"] = p.batch;
  out["config"] = p.config.empty() ? json(nullptr) : json(p.config);
  out["backward"] = p.backward || p.workload == "train_step";
  out["repeats"] = p.repeats;
  out["warmup"] = p.warmup;
  for (const char* k : {"gflop_accepted", "flop_basis", "drop_fraction", "accepted", "capacity", "mlp_dim", "shape", "kernel",
                        "form", "gflops_plain", "gflops_packed", "gflops_best",
                        "depth", "heads", "patch", "patches", "text_len", "moe_blocks", "params_total", "ranks",
                        "comm_share", "overlapped_comm_share", "gradient_sum", "inputs"})
    if (j.contains(k)) out[k] = j[k];
  out["times_s"] = j["times_s"];
  out["peak_rss_mb"] = peak_rss_mb();
  if (j.contains("profile") && !j["profile"].is_null()) out["profile"] = j["profile"];
  if (cli::world().rank() != 0) return 0;  // one line, rank 0's (its timings are the step's: ranks synchronise)
  std::cout << out.dump() << std::endl;
  return 0;
}

const cli::Register reg(
    {"bench", "benchmark workloads (bench/README.md): one JSON line with throughput, GFLOP/s and timings",
     "usage: limoe bench --workload W [--config NAME] [--width D] [--tokens T] [--experts E] [--top-k K]\n"
     "                   [--capacity-factor F] [--batch B] [--threads N] [--repeats R] [--warmup W] [--backward]\n"
     "                   [--no-grad-overlap] [--profile]\n\n"
     "  --workload W          moe_layer | dense_mlp | gemm | embed | train_step | peak\n"
     "                          moe_layer   one MoE layer (router, BPR, dispatch, E experts D->4D->D, combine)\n"
     "                                      on T tokens, training mode, noise on            (tokens/s)\n"
     "                          dense_mlp   the dense MLP D->4D->D on T tokens                (tokens/s)\n"
     "                          gemm        [T, D] x [D, 4D] through limoe's products, the faster of B as it\n"
     "                                      lies and B packed once as a weight (GFLOP/s)\n"
     "                          embed       image embeddings of B 224x224x3 images            (images/s)\n"
     "                          train_step  one training step on B image-text pairs          (pairs/s)\n"
     "                          peak        the machine's ceiling: independent multiply-adds from registers\n"
     "                                      on the widest unit for --precision, N threads at once (GFLOP/s)\n"
     "  --config NAME         embed/train_step variant: a preset (S/32, B/32, ...; default S/32), a .json\n"
     "                        config file, or an inline JSON config object\n"
     "  --width D             width (default 384; for embed/train_step overrides the variant's, MLP = 4D)\n"
     "  --tokens T            tokens (default 4096)\n"
     "  --experts E, --top-k K  experts (default 8) and choices per token (default 1)\n"
     "  --capacity-factor F   expert capacity factor (default 1.0; train_step: the variant's train factor,\n"
     "                        embed: its evaluation factor, 0 = no drop)\n"
     "  --batch B             images or pairs per step (default 32)\n"
     "  --threads N           worker threads (default: all)\n"
     LIMOE_CLI_BACKEND_HELP
     "  --repeats R           timed iterations (default 5); --warmup W untimed ones first (default 1)\n"
     "  --backward            moe_layer/dense_mlp: time forward + backward\n"
     "  --no-grad-overlap     train_step under mpirun: sum the gradient after the backward pass, not during it\n"
     "  --profile             embed, train_step, moe_layer: R more iterations with every op timed (on a GPU each\n"
     "                        waited for), reported as \"profile\": each op's calls and self time per iteration,\n"
     "                        largest first, and the time outside every op (docs/profiling.md)\n\n"
     "Prints one JSON line: workload, throughput, unit, median_s, min_s, max_s, gflop (analytic: 2*M*N*K per\n"
     "matrix product, backward = 2x forward, MoE experts counted for K*tokens rows), gflops, threads, the\n"
     "parameters used, peak_rss_mb (getrusage), and for MoE workloads drop_fraction and gflop_accepted.\n",
     run});
}  // namespace
}  // namespace limoe_cmd_bench
