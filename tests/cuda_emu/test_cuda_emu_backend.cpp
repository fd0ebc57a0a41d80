// The CUDA backend on the CPU: Ops<Cuda, T> (src/cuda/backend/) compiled by the host compiler through
// tests/support/cuda_emu.hpp (host threads as CUDA threads, host memory as device memory, plain loops standing
// in for cuBLAS), through the backend harness's cases (tests/unit/backend_cases.hpp): every op of the op
// table, forward and backward, against the Ref backend, in double (1e-10) and float (2e-5). The routes of the
// MoE case come from the CUDA dispatch plan and must equal Ref's exactly; the whole model runs on the op table too. Built a second time with
// ThreadSanitizer (test_cuda_emu_backend_tsan: float, one seed), so a kernel reading shared memory without a
// barrier fails.
#include "support/cuda_emu.hpp"  // first: the CUDA keywords and LIMOE_CUDA_EMULATION

#include <cuda/backend/moe_ops.cuh>
#include <limoe/backend/cuda.hpp>
#include <limoe/core/params.hpp>
#include <limoe/core/profile.hpp>
#include <limoe/train/optimizer.hpp>

#include "support/cuda_from_host.hpp"
#include "unit/backend_cases.hpp"
#include "unit/precision_cases.hpp"
#if !defined(LIMOE_HARNESS_QUICK)
#include "unit/backend_model.hpp"

#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <limoe/model/checkpoint.hpp>
#include <limoe/train/trainer.hpp>
#endif

using namespace limoe;
using namespace limoe::backend_cases;
using limoe::testing_cuda::CudaFromHost;
using limoe::testing_cuda::Mirror;

// The emulated device memory is host memory the host may not read through views, as on a GPU.
static_assert(!Cuda::memory_space::host_accessible, "the emulated backend's memory is opaque to host code");

#if !defined(LIMOE_HARNESS_QUICK)  // the ThreadSanitizer build runs float only
TEST_CASE("cuda backend (emulated): every op against Ref, forward and backward (double)") {
  for_each_backend<std::tuple<CudaFromHost>, double>();
}

// The model on the CUDA backend (Limoe<double, ..., Cuda>): parameters, activations and the MoE layer's
// buffers in device memory, the router's decisions on the host over the downloaded logits; its outputs,
// routes and gradients equal the model on Ref.
TEST_CASE("cuda backend (emulated): the whole model on Cuda against the model on Ref") { compare_model<Cuda>(1e-9); }

namespace {
template <class B>
using DModel = Limoe<double, ConfigRouter, moe::DefaultAuxLosses, B>;

// A batch of n pairs for tiny_config (some texts padded).
struct Batch {
  Tensor<double> images;
  Tensor<std::int32_t> texts;
};
Batch tiny_batch(const ModelConfig& cfg, index_t n, std::uint64_t seed) {
  Batch b{testing::randn<double>(Shape{n, 8, 8, 3}, seed), Tensor<std::int32_t>(Shape{n, cfg.text_len})};
  for (index_t i = 0; i < n * cfg.text_len; ++i)
    b.texts[i] = i % cfg.text_len < 2 + (i / cfg.text_len + static_cast<index_t>(seed)) % 3
                     ? static_cast<std::int32_t>(2 + (i * 7 + static_cast<index_t>(seed)) % 11)
                     : cfg.pad_id;
  return b;
}
// The largest |a - b| over two host views of one size.
double diff(CView<double> a, CView<double> b) {
  REQUIRE(a.numel() == b.numel());
  double d = 0;
  for (index_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}
std::string scratch_file(const char* name) {
  return (std::filesystem::temp_directory_path() / name).string();
}
}  // namespace

// bf16 on the device (the Bf16Mixed policy): the products take their operands rounded to bf16 on the
// device and accumulate in fp32; against the model on Ref under the same policy (which rounds the same operands
// with the same rounding and accumulates exactly), the difference is float accumulation order only: embeddings
// to 1e-4 (unit vectors), the loss to 1e-5 relative, every gradient to 1e-3 of its largest entry (1e-7 absolute
// for the key bias, whose gradient is zero up to rounding), routes identical.
// The same model in fp32 differs from both by bf16's rounding (more than 1e-3): the policy is not fp32 under
// its name.
TEST_CASE("cuda backend (emulated): the model in bf16 on Cuda against the model in bf16 on Ref") {
  using RefBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Ref, Bf16Mixed>;
  using DevBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda, Bf16Mixed>;
  using DevFp32 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda>;
  ModelConfig cfg = tiny_config();
  cfg.group_pairs = 2;
  RefBf16 ref(cfg);
  DevBf16 dev(cfg);
  DevFp32 f32(cfg);
  ref.init(4), dev.init(4), f32.init(4);
  const Batch b = tiny_batch(cfg, 3, 17);
  Tensor<float> images(b.images.shape());
  for (index_t i = 0; i < images.numel(); ++i) images[i] = static_cast<float>(b.images[i]);
  auto fdiff = [](CView<float> x, CView<float> y) {
    REQUIRE(x.numel() == y.numel());
    double d = 0, m = 0;
    for (index_t i = 0; i < x.numel(); ++i)
      d = std::max(d, std::abs(static_cast<double>(x[i]) - y[i])), m = std::max(m, std::abs(static_cast<double>(y[i])));
    return std::pair{d, m};
  };
  const auto fr = ref.forward(images.cview(), b.texts.cview(), Mode::Train, 3);
  const auto fd = dev.forward(images.cview(), b.texts.cview(), Mode::Train, 3);
  const auto ff = f32.forward(images.cview(), b.texts.cview(), Mode::Train, 3);
  CHECK(fdiff(fd.img_emb.cview(), fr.img_emb.cview()).first <= 1e-4);
  CHECK(fdiff(fd.txt_emb.cview(), fr.txt_emb.cview()).first <= 1e-4);
  CHECK(fdiff(ff.img_emb.cview(), fr.img_emb.cview()).first > 1e-3);  // bf16 is not fp32
  REQUIRE(fd.routes.size() == fr.routes.size());
  for (std::size_t i = 0; i < fr.routes.size(); ++i)
    for (index_t j = 0; j < fr.routes[i].numel(); ++j) CHECK(fd.routes[i][j] == fr.routes[i][j]);
  const auto lr = ref.loss(fr), ld = dev.loss(fd);
  CHECK(ld.total == doctest::Approx(lr.total).epsilon(1e-5));
  ref.zero_grad(), dev.zero_grad();
  ref.backward(fr), dev.backward(fd);
  const Tensor<float> gd = to_host(dev.params().grads());
  for (const auto& e : ref.params().entries()) {
    CAPTURE(e.name);
    const CView<float> want = std::as_const(ref.params()).grad(ref.params().get(e.name));
    const auto [d, m] = fdiff(CView<float>(gd.data() + e.offset, e.shape), want);
    CHECK(d <= 1e-3 * std::max(m, 1e-4));  // the floor: the key bias's gradient is 0 up to rounding
  }
}

// bf16 training on the device: the model's weights are read from its bf16 mirror in device memory (made by
// the backend's to_bf16 once per optimizer step, core/precision.hpp), against the same steps on Ref under bf16
// (a host mirror). Losses to 1e-4 relative and routes identical at every step, and the embeddings of the trained
// models to 1e-2: before any step they agree to 1.2e-7, after 3 steps to 2.2e-3 (measured), because the two
// backends sum in different orders, an operand near a bf16 rounding boundary can round the other way, and Adam
// turns gradients that are rounding noise (the key bias's is zero in exact arithmetic; under bf16 the per-head
// products make it bf16 noise) into steps of about lr either way. A mirror left stale after a step (the previous
// step's weights) moves them by 0.60 (measured with mutation M65).
TEST_CASE("cuda backend (emulated): bf16 training on Cuda against bf16 training on Ref, one weight copy per step") {
  using RefBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Ref, Bf16Mixed>;
  using DevBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda, Bf16Mixed>;
  const ModelConfig cfg = tiny_config();
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 1;
  tc.adam.lr = 1e-2;
  RefBf16 want(cfg);
  DevBf16 got(cfg);
  want.init(11), got.init(11);
  want.set_noise_seed(5), got.set_noise_seed(5);
  Trainer<RefBf16> tw(want, tc);
  Trainer<DevBf16> tg(got, tc);
  auto images_of = [](const Batch& b) {
    Tensor<float> f(b.images.shape());
    for (index_t i = 0; i < f.numel(); ++i) f[i] = static_cast<float>(b.images[i]);
    return f;
  };
  for (int s = 0; s < 3; ++s) {
    CAPTURE(s);
    const Batch b = tiny_batch(cfg, 3, 100 + static_cast<std::uint64_t>(s));
    const Tensor<float> im = images_of(b);
    const StepReport rw = tw.step(im.cview(), b.texts.cview());
    const StepReport rg = tg.step(im.cview(), b.texts.cview());
    CHECK(rg.loss.total == doctest::Approx(rw.loss.total).epsilon(1e-4));
    REQUIRE(rg.routing.size() == rw.routing.size());
    for (std::size_t i = 0; i < rw.routing.size(); ++i)
      for (int m = 0; m < 2; ++m) CHECK(rg.routing[i].routed[m] == rw.routing[i].routed[m]);
    CHECK(got.weight_conversions() == static_cast<std::uint64_t>(s + 1));  // this step's forward made it
  }
  const Batch b = tiny_batch(cfg, 3, 7);
  const Tensor<float> im = images_of(b);
  const auto fw = want.forward(im.cview(), b.texts.cview(), Mode::Eval);
  const auto fg = got.forward(im.cview(), b.texts.cview(), Mode::Eval);
  const auto fg2 = got.forward(im.cview(), b.texts.cview(), Mode::Eval);
  CHECK(got.weight_conversions() == 4);  // after the last step, once; not again without a change
  double d = 0;
  for (index_t i = 0; i < fw.img_emb.numel(); ++i) {
    d = std::max(d, static_cast<double>(std::abs(fg.img_emb[i] - fw.img_emb[i])));
    d = std::max(d, static_cast<double>(std::abs(fg.txt_emb[i] - fw.txt_emb[i])));
    CHECK(fg2.img_emb[i] == fg.img_emb[i]);
  }
  CHECK(d <= 1e-2);
}

// Training on the device: the Trainer with the model's parameters, gradients and AdamW moments in device
// memory (AdamW<double, device space>, cuda::ops::adamw_update) against the same steps on Ref: losses, routing
// statistics and every parameter and moment after 3 steps (the first clipped).
TEST_CASE("cuda backend (emulated): training steps on Cuda against training on Ref") {
  const ModelConfig cfg = tiny_config();
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 2;
  tc.adam.lr = 3e-3, tc.adam.clip_norm = 0.5;
  DModel<Ref> want(cfg);
  DModel<Cuda> got(cfg);
  want.init(11), got.init(11);
  want.set_noise_seed(5), got.set_noise_seed(5);
  Trainer<DModel<Ref>> tw(want, tc);
  Trainer<DModel<Cuda>> tg(got, tc);
  static_assert(!std::is_same_v<decltype(tg.optimizer().m()), Tensor<double>&>, "the moments live on the device");
  bool clipped = false;
  for (int s = 0; s < 3; ++s) {
    CAPTURE(s);
    const Batch b = tiny_batch(cfg, 3, 100 + static_cast<std::uint64_t>(s));
    const StepReport rw = tw.step(b.images.cview(), b.texts.cview());
    const StepReport rg = tg.step(b.images.cview(), b.texts.cview());
    CHECK(rg.loss.total == doctest::Approx(rw.loss.total).epsilon(1e-10));
    CHECK(rg.grad_norm == doctest::Approx(rw.grad_norm).epsilon(1e-9));
    clipped |= rw.grad_norm > tc.adam.clip_norm;
    REQUIRE(rg.routing.size() == rw.routing.size());
    for (std::size_t i = 0; i < rw.routing.size(); ++i)
      for (int m = 0; m < 2; ++m) CHECK(rg.routing[i].routed[m] == rw.routing[i].routed[m]);
  }
  CHECK(clipped);
  CHECK(diff(to_host(got.params().values()).cview(), want.params().values()) <= 1e-9);
  CHECK(diff(to_host(tg.optimizer().m().cview()).cview(), tw.optimizer().m().cview()) <= 1e-9);
  CHECK(diff(to_host(tg.optimizer().v().cview()).cview(), tw.optimizer().v().cview()) <= 1e-12);
  CHECK(tg.optimizer().step() == 3);
}

// Where the model's forward on a GPU would make the host wait (emulated: each copy to the host, or from it,
// records how many launches came before it). Training, with a capacity that binds: the inputs go up and the
// token ids are checked at the start, then nothing until the heads, after which the embeddings and every MoE
// block's results come back. Evaluation (no drop: the packed plan) waits twice per MoE block, for the plan's
// counts and for the block's results (its context is shared with the other blocks). The backward waits at its
// start (the temperature and its gradient, scalars) and at its end (the token embedding's check of the ids).
TEST_CASE("cuda backend (emulated): where the model's forward waits for the device") {
  using DS = testing_cuda::DS;
  for (int group_pairs : {0, 2}) {
    CAPTURE(group_pairs);
    ModelConfig cfg = tiny_config();
    cfg.group_pairs = group_pairs;
    DModel<Cuda> m(cfg);
    m.init(7);
    const Batch b = tiny_batch(cfg, 3, 17);
    const int moe_blocks = static_cast<int>(cfg.moe_blocks.size());
    for (Mode mode : {Mode::Train, Mode::Eval}) {
      CAPTURE(static_cast<int>(mode));
      (void)m.forward(b.images.cview(), b.texts.cview(), mode, 1);  // first call: buffers and cached inputs
      DS::clear_waits();
      const std::int64_t l0 = DS::launches.load();
      const auto fwd = m.forward(b.images.cview(), b.texts.cview(), mode, 2);
      const std::int64_t l1 = DS::launches.load();
      REQUIRE(fwd.routes.size() == static_cast<std::size_t>(moe_blocks));
      const auto w = DS::waits();
      // The wait points between the embeddings (a few launches after l0) and the heads (a few before l1).
      std::set<std::int64_t> inside;
      for (const std::int64_t at : w) {
        CHECK(at >= l0);
        CHECK(at <= l1);
        if (at > l0 + 8 && at < l1 - 8) inside.insert(at);
      }
      CHECK(l1 - l0 > 100);  // the blocks' launches
      CHECK(static_cast<int>(inside.size()) == (mode == Mode::Train ? 0 : 2 * moe_blocks));
      // After the last launch: the text embeddings, and in training every MoE block's three copies.
      CHECK(std::count(w.begin(), w.end(), l1) == (mode == Mode::Train ? 1 + 3 * moe_blocks : 1));
      if (mode == Mode::Train) {  // the backward waits at its ends only
        (void)m.loss(fwd);
        m.zero_grad();
        DS::clear_waits();
        const std::int64_t b0 = DS::launches.load();
        m.backward(fwd);
        const std::int64_t b1 = DS::launches.load();
        CHECK(b1 - b0 > 100);
        for (const std::int64_t at : DS::waits()) CHECK((at <= b0 + 8 || at >= b1 - 8));
      }
    }
  }
}

// Images already on the device (Limoe::forward and Trainer::step with a view in the model's memory): the same
// embeddings, losses and trained parameters as from host memory, bitwise, and no upload to wait for at the start
// of an images-only forward.
TEST_CASE("cuda backend (emulated): a profiled training step waits for the device at every region's ends") {
  using DS = testing_cuda::DS;
  ModelConfig cfg = tiny_config();
  DModel<Cuda> m(cfg);
  m.init(7);
  const Batch b = tiny_batch(cfg, 3, 17);
  (void)m.forward(b.images.cview(), b.texts.cview(), Mode::Train, 1);  // buffers made outside the profile
  profile::Profiler prof;
  const std::int64_t s0 = DS::synchronizations.load();
  {
    profile::Session on(prof);
    m.zero_grad();
    const auto fwd = m.forward(b.images.cview(), b.texts.cview(), Mode::Train, 2);
    (void)m.loss(fwd);
    m.backward(fwd);
  }
  std::map<std::string, std::int64_t> calls;
  std::int64_t regions = 0;
  for (const auto& t : prof.totals()) calls[t.path] = t.calls, regions += t.calls;
  // Every region (op, MoE part, attention's heads) waited for the device when it began and when it ended.
  CHECK(regions > 50);
  CHECK(DS::synchronizations.load() - s0 == 2 * regions);
  const auto moe_blocks = static_cast<std::int64_t>(cfg.moe_blocks.size());
  CHECK(calls["moe_forward"] == calls["moe_backward"]);
  CHECK(calls["moe_forward"] >= moe_blocks);
  // The device's own parts of the MoE layer, under the regions that call them.
  CHECK(calls["moe_forward/route/route_topk"] == calls["moe_forward"]);
  CHECK(calls["moe_forward/route/aux_losses"] == calls["moe_forward"]);
  CHECK(calls["moe_forward/expert_mlp_forward"] == calls["moe_forward"]);
  CHECK(calls["moe_backward/router_backward"] == calls["moe_forward"]);
  CHECK(calls["moe_collect_results"] == calls["moe_forward"]);
  CHECK(calls["self_attention_forward/heads"] == calls["self_attention_forward"]);
  CHECK(calls["self_attention_backward/heads"] == calls["self_attention_backward"]);
  CHECK(calls["self_attention_forward"] == calls["self_attention_backward"]);
  // Nothing is recorded, and nothing waits, without a session.
  const std::int64_t s1 = DS::synchronizations.load();
  const double recorded = prof.seconds();
  (void)m.forward(b.images.cview(), b.texts.cview(), Mode::Eval);
  CHECK(DS::synchronizations.load() == s1);
  CHECK(prof.seconds() == recorded);
}

TEST_CASE("cuda backend (emulated): images already on the device go in without an upload") {
  using DS = testing_cuda::DS;
  const ModelConfig cfg = tiny_config();
  const Batch b = tiny_batch(cfg, 3, 23);
  Tensor<double, DS> images_d(b.images.shape());
  copy_from_host<double, DS>(b.images.cview(), images_d.view());
  DModel<Cuda> m(cfg);
  m.init(5);
  const auto from_host = m.forward(b.images.cview(), CView<std::int32_t>{}, Mode::Eval);
  const Batch other = tiny_batch(cfg, 3, 24);  // the model's input buffer then holds other images
  (void)m.forward(other.images.cview(), CView<std::int32_t>{}, Mode::Eval);
  DS::clear_waits();
  const std::int64_t l0 = DS::launches.load();
  const auto from_device = m.forward(images_d.cview(), CView<std::int32_t>{}, Mode::Eval);
  const auto w = DS::waits();
  CHECK(std::count(w.begin(), w.end(), l0) == 0);  // from host memory: the images' upload, before any launch
  CHECK(diff(from_device.img_emb.cview(), from_host.img_emb.cview()) == 0);
  REQUIRE(from_device.routes.size() == from_host.routes.size());
  for (std::size_t r = 0; r < from_host.routes.size(); ++r)
    for (index_t i = 0; i < from_host.routes[r].numel(); ++i) CHECK(from_device.routes[r][i] == from_host.routes[r][i]);
  CHECK_THROWS_WITH(m.forward(CView<double, DS>(images_d.data(), Shape{3, 8, 8, 2}), CView<std::int32_t>{}, Mode::Eval),
                    doctest::Contains("images: expected [B, 8, 8, 3]"));

  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 2;
  DModel<Cuda> a(cfg), c(cfg);
  a.init(9), c.init(9);
  Trainer<DModel<Cuda>> ta(a, tc), tcd(c, tc);
  for (int s = 0; s < 2; ++s) {
    const StepReport ra = ta.step(b.images.cview(), b.texts.cview());
    const StepReport rc = tcd.step(images_d.cview(), b.texts.cview());
    CHECK(rc.loss.total == ra.loss.total);
  }
  CHECK(diff(to_host(c.params().values()).cview(), to_host(a.params().values()).cview()) == 0);
}

// One checkpoint file for both backends: written by the model on the device (with its optimizer state) and
// read by the model on the CPU, and the reverse; the two give the same embeddings and routes.
TEST_CASE("cuda backend (emulated): checkpoints move between the device and the CPU") {
  const ModelConfig cfg = tiny_config();
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 1;
  DModel<Cuda> dev(cfg);
  dev.init(3);
  Trainer<DModel<Cuda>> trainer(dev, tc);
  const Batch b = tiny_batch(cfg, 3, 7);
  trainer.step(b.images.cview(), b.texts.cview());  // moments that are not zero
  const std::string a = scratch_file("limoe_emu_dev.safetensors"), c = scratch_file("limoe_emu_cpu.safetensors");
  save_checkpoint(dev, a, TrainState<double, Cuda::memory_space>{&trainer.optimizer(), R"({"step": 1})"});

  // Device -> CPU: the weights (as float, the file's type) and the moments arrive; the embeddings agree.
  DModel<Cpu> cpu(cfg);
  const auto r = io::SafetensorsReader::open(a);
  load_weights(cpu, r);
  AdamW<double> opt(tc.adam, cpu.params());
  REQUIRE(load_optimizer(opt, r));
  CHECK(opt.step() == 1);
  auto as_float = [](CView<double> v) {
    Tensor<double> t(v.shape());
    for (index_t i = 0; i < v.numel(); ++i) t[i] = static_cast<double>(static_cast<float>(v[i]));
    return t;
  };
  CHECK(diff(std::as_const(cpu.params()).values(), as_float(to_host(dev.params().values()).cview()).cview()) == 0);
  CHECK(diff(opt.m().cview(), as_float(to_host(trainer.optimizer().m().cview()).cview()).cview()) == 0);

  // CPU -> device: a CPU model's file loads on the device; forward in evaluation on both.
  save_checkpoint(cpu, c);
  DModel<Cuda> dev2(cfg);
  load_weights(dev2, io::SafetensorsReader::open(c));
  const Batch e = tiny_batch(cfg, 4, 9);
  const auto fc = cpu.forward(e.images.cview(), e.texts.cview(), Mode::Eval);
  const auto fd = dev2.forward(e.images.cview(), e.texts.cview(), Mode::Eval);
  CHECK(diff(fd.img_emb.cview(), fc.img_emb.cview()) <= 1e-9);
  CHECK(diff(fd.txt_emb.cview(), fc.txt_emb.cview()) <= 1e-9);
  REQUIRE(fd.routes.size() == fc.routes.size());
  for (std::size_t i = 0; i < fc.routes.size(); ++i)
    for (index_t j = 0; j < fc.routes[i].numel(); ++j) CHECK(fd.routes[i][j] == fc.routes[i][j]);
  // The user's own loss gradient (host data) goes into the device model too: backward_from against Ref.
  DModel<Ref> ref(cfg);
  load_weights(ref, io::SafetensorsReader::open(c));
  const auto tr = ref.forward(e.images.cview(), e.texts.cview(), Mode::Train, 2);
  const auto td = dev2.forward(e.images.cview(), e.texts.cview(), Mode::Train, 2);
  const auto dz = testing::randn<double>(tr.img_emb.shape(), 4);
  ref.zero_grad(), dev2.zero_grad();
  ref.backward_from(tr, dz.cview(), CView<double>{});
  dev2.backward_from(td, dz.cview(), CView<double>{});
  CHECK(diff(to_host(dev2.params().grads()).cview(), std::as_const(ref.params()).grads()) <= 1e-9);
  CHECK(diff(dev2.input_image_grad().cview(), ref.input_image_grad().cview()) <= 1e-9);
  std::remove(a.c_str());
  std::remove(c.c_str());
}

// The MoE layer on the device routes with the stock router there (noise, gates, Thrust routing:
// cuda::ops::route_topk) and takes a stock loss set's terms and the statistics' sums there too
// (cuda::ops::aux_losses), and the router's backward (cuda::ops::router_backward); a router of the user's own
// routes on the host over the logits, a loss set with a term of the user's own is computed on the host. The
// layer on Ref does all of it on the host. Same decisions, gates, outputs, loss terms, statistics and gradients:
// groups with a shorter last one, padding (a whole group of it too), groups longer than the device's chunk of
// sums, K = 1 and 2, BPR and vanilla, capacity that drops (the device's fixed-capacity plan) and no drop (its
// packed plan), training noise drawn at each token's packed place from a nonzero first token, every term with a
// gradient (aux_scale 0.7), subsets of the terms.
namespace {
// The stock router behind a type of the user's own: moe_forward on a device backend routes it on the host.
struct HostRouted {
  moe::TopKRouter<moe::DynamicTopK, moe::GaussianNoise, moe::BatchPriorityOrder> r;
  int top_k() const { return r.top_k(); }
  double noise_sigma(int E) const { return r.noise_sigma(E); }
  bool noise_active(Mode m) const { return r.noise_active(m); }
  template <class T>
  void route(const moe::RouteGroup<T>& g) const {
    r.route(g);
  }
};
static_assert(!moe::IsStockRouter<HostRouted>::value);
static_assert(moe::IsStockRouter<moe::TopKRouter<moe::StaticTopK<2>, moe::NoNoise, moe::VanillaOrder>>::value);
}  // namespace

// A loss term of the user's own (a loss set holding one is computed on the host on every backend): the squared
// mean of the clean gate of expert 0.
struct FirstExpertLoss {
  template <class T>
  static void accumulate(const moe::LossGroup<T>& g, const moe::AuxLossConfig&, moe::AuxLossValues& v, double* dl) {
    double mean = 0;
    for (index_t s = 0; s < g.S; ++s) mean += static_cast<double>(g.probs[s * g.E]) / static_cast<double>(g.S);
    v.total += g.scale * 0.01 * mean * mean;
    if (dl == nullptr) return;
    for (index_t s = 0; s < g.S; ++s) {
      std::array<double, moe::kMaxExperts> du{};
      du[0] = g.scale * 0.01 * 2 * mean / static_cast<double>(g.S);
      moe::formulas::add_softmax_grad(g.probs + s * g.E, du.data(), g.E, 1.0, dl + s * g.E);
    }
  }
};
static_assert(moe::kStockLossMask<moe::AuxLosses<moe::ImportanceLoss, FirstExpertLoss>> == -1);

TEST_CASE("cuda backend (emulated): the MoE layer's device routing and losses against the host router on Ref") {
  using T = double;
  using DS = testing_cuda::DS;
  const index_t D = 6, M = 10;
  const int E = 5;
  const Tensor<T> wr = testing::randn<T>(Shape{E, D}, 13), w1 = testing::randn<T>(Shape{E, M, D}, 14, 0.5);
  const Tensor<T> b1 = testing::randn<T>(Shape{E, M}, 15, 0.1), w2 = testing::randn<T>(Shape{E, D, M}, 16, 0.5);
  const Tensor<T> b2 = testing::randn<T>(Shape{E, D}, 17, 0.1);
  const auto dwr = Mirror<const T>(wr.cview()), dw1 = Mirror<const T>(w1.cview()), db1 = Mirror<const T>(b1.cview());
  const auto dw2 = Mirror<const T>(w2.cview()), db2 = Mirror<const T>(b2.cview());
  int cases = 0, dropped = 0, global_active = 0, fixed_plans = 0, packed_plans = 0;
  // One configuration: the layer on Ref and on the device with loss set L, compared (N tokens, groups of gs).
  auto run = [&]<class L>(L, bool own_router, int K, bool bpr, Mode mode, bool pad, bool all_terms, index_t N = 61,
                          index_t gs = 12) {
    CAPTURE(N);
    CAPTURE(gs);
    const Tensor<T> x = testing::randn<T>(Shape{N, D}, 11), dy = testing::randn<T>(Shape{N, D}, 12);
    const auto dx_ = Mirror<const T>(x.cview()), ddy = Mirror<const T>(dy.cview());
    CAPTURE(own_router);
    CAPTURE(K);
    CAPTURE(bpr);
    CAPTURE(static_cast<int>(mode));
    CAPTURE(pad);
    CAPTURE(all_terms);
    CAPTURE(moe::kStockLossMask<L>);
    moe::MoeConfig cfg;
    cfg.experts = E, cfg.top_k = K, cfg.first_token = 7;
    cfg.router.bpr = bpr, cfg.router.group_size = gs, cfg.router.noise_std = 2.0;
    // Dropping capacity: the device's fixed-capacity plan; no drop (vanilla order in evaluation): the packed plan.
    cfg.router.capacity_factor_train = 0.8, cfg.router.capacity_factor_eval = bpr ? 1.0 : 0.0;
    if (all_terms) {  // every term with a gradient; the global entropy's threshold above any group's entropy
      cfg.losses.z_loss_weight = 0.02, cfg.losses.importance_weight = 0.03, cfg.losses.load_weight = 0.04;
      cfg.losses.local_entropy_weight = {0.05, 0.06}, cfg.losses.global_entropy_weight = {0.07, 0.08};
      cfg.losses.global_entropy_tau = {std::log(5.0), std::log(5.0)};
    }
    std::vector<std::uint8_t> modality(static_cast<std::size_t>(N), moe::kImage);
    for (index_t t = 0; t < N; ++t) {
      if (t % 4 == 1) modality[static_cast<std::size_t>(t)] = moe::kText;
      if (pad && ((t >= 24 && t < 36) || t % 5 == 3)) modality[static_cast<std::size_t>(t)] = moe::kPad;
    }
    const Rng rng(21);
    // Ref: the host router and loss terms.
    Tensor<T> y(Shape{N, D}), dx(Shape{N, D});
    Tensor<T> gwr(Shape{E, D}), gw1(Shape{E, M, D}), gb1(Shape{E, M}), gw2(Shape{E, D, M}), gb2(Shape{E, D});
    moe::MoeContext<T> ctx;
    moe::moe_forward<T, L, Ref>(cfg, {wr.cview(), w1.cview(), b1.cview(), w2.cview(), b2.cview()}, x.cview(), modality,
                                mode, rng, y.view(), ctx);
    moe::moe_backward<T, Ref>({wr.cview(), w1.cview(), b1.cview(), w2.cview(), b2.cview()}, x.cview(), dy.cview(),
                              dx.view(), {gwr.view(), gw1.view(), gb1.view(), gw2.view(), gb2.view()}, ctx, 0.7);
    // Cuda: the stock router and a stock loss set on the device (kernels/losses.cuh), others on the host.
    Tensor<T, DS> y_d(Shape{N, D}), dx_d(Shape{N, D});
    Tensor<T, DS> gwr_d(Shape{E, D}), gw1_d(Shape{E, M, D}), gb1_d(Shape{E, M}), gw2_d(Shape{E, D, M}),
        gb2_d(Shape{E, D});
    const moe::MoeParams<T, DS> pd{dwr.v(), dw1.v(), db1.v(), dw2.v(), db2.v()};
    moe::MoeContext<T, DS> ctx_d;
    {  // a call before, on the same context with other noise and inputs and no drop (the packed plan, every row
       // filled): nothing of it may leak into the next, whose fixed-capacity plan has empty rows
      Tensor<T, DS> y0(Shape{N, D}), dx0(Shape{N, D}), g0(Shape{E, D}), g1(Shape{E, M, D}), g2(Shape{E, M}),
          g3(Shape{E, D, M}), g4(Shape{E, D});
      const Tensor<T> x0 = testing::randn<T>(Shape{N, D}, 31);
      const auto dx0_ = Mirror<const T>(x0.cview());
      moe::MoeConfig cfg0 = cfg;
      cfg0.router.capacity_factor_train = 0;
      moe::moe_forward<T, L, Cuda>(cfg0, pd, dx0_.v(), modality, Mode::Train, Rng(99), y0.view(), ctx_d);
      moe::moe_backward<T, Cuda>(pd, dx0_.v(), ddy.v(), dx0.view(), {g0.view(), g1.view(), g2.view(), g3.view(),
                                 g4.view()}, ctx_d);
    }
    auto forward_d = [&] {
      if (own_router)
        moe::moe_forward<T, L, Cuda>(HostRouted{{{K}, {cfg.router.noise_std}}}, cfg, pd, dx_.v(), modality, mode, rng,
                                     y_d.view(), ctx_d);
      else
        moe::moe_forward<T, L, Cuda>(cfg, pd, dx_.v(), modality, mode, rng, y_d.view(), ctx_d);
    };
    // Where the host would wait for a GPU: with the stock router and loss terms a fixed-capacity forward waits
    // nowhere when it defers its results, else once at its end; a packed plan adds one wait for its counts
    // (one point: the counts down, the offsets and row starts up). The backward waits nowhere.
    const bool stock = !own_router && moe::kStockLossMask<L> >= 0;
    const bool defer = stock && cases % 2 == 0;
    CAPTURE(defer);
    ctx_d.defer_results = defer;
    auto wait_points = [] {
      const auto w = DS::waits();
      return static_cast<int>(std::set<std::int64_t>(w.begin(), w.end()).size());
    };
    forward_d();  // uploads what differs from the call before (its capacities)
    if (stock) {
      moe::collect_results(ctx_d);
      DS::clear_waits();
      forward_d();  // the same call again: nothing to upload
      CHECK(wait_points() == (ctx_d.plan.fixed > 0 ? 0 : 1) + (defer ? 0 : 1));
      CHECK(ctx_d.results_pending == defer);
      if (defer) {
        CHECK_THROWS_WITH(ctx_d.routes(), doctest::Contains("call moe::collect_results(ctx) first"));
        DS::clear_waits();
        moe::collect_results(ctx_d);
        CHECK(wait_points() == 1);
      }
    }
    CHECK_FALSE(ctx_d.results_pending);
    DS::clear_waits();
    moe::moe_backward<T, Cuda>(pd, dx_.v(), ddy.v(), dx_d.view(),
                               {gwr_d.view(), gw1_d.view(), gb1_d.view(), gw2_d.view(), gb2_d.view()}, ctx_d, 0.7);
    if (stock) CHECK(DS::waits().empty());
    CHECK(ctx_d.accepted() == ctx.accepted());
    if (ctx_d.plan.fixed > 0) CHECK(ctx_d.plan.A == E * ctx_d.plan.fixed);
    if (own_router || (mode == Mode::Eval && !bpr)) CHECK(ctx_d.plan.fixed == 0);  // host routes; no drop
    (ctx_d.plan.fixed > 0 ? fixed_plans : packed_plans) += !own_router;
    for (index_t i = 0; i < N * K; ++i) {
      REQUIRE(ctx_d.routes()[i] == ctx.routes()[i]);
      dropped += ctx.routes()[i] < 0 && modality[static_cast<std::size_t>(i / K)] != moe::kPad;
    }
    // With the stock router and loss terms the forward brought back only the routes; the rest on request.
    CHECK(ctx_d.host_routing_stale == (!own_router && moe::kStockLossMask<L> >= 0));
    ctx_d.sync_host_routing();
    CHECK_FALSE(ctx_d.host_routing_stale);
    for (index_t i = 0; i < N * E; ++i) {
      REQUIRE(std::abs(ctx_d.gate_values()[i] - ctx.gate_values()[i]) <= 1e-14);
      REQUIRE(std::abs(ctx_d.noisy[i] - ctx.noisy[i]) <= 1e-14);
      REQUIRE(std::abs(ctx_d.probs[i] - ctx.probs[i]) <= 1e-14);
    }
    // Every term's value (summed over tokens in another order on the device: 1e-12), and the statistics.
    const auto& a = ctx_d.losses;
    const auto& b = ctx.losses;
    CHECK(a.total == doctest::Approx(b.total).epsilon(1e-12));
    CHECK(a.importance == doctest::Approx(b.importance).epsilon(1e-12));
    CHECK(a.load == doctest::Approx(b.load).epsilon(1e-12));
    CHECK(a.z == doctest::Approx(b.z).epsilon(1e-12));
    for (int m = 0; m < moe::kModalities; ++m) {
      CHECK(a.local_entropy[m] == doctest::Approx(b.local_entropy[m]).epsilon(1e-12));
      CHECK(a.global_entropy[m] == doctest::Approx(b.global_entropy[m]).epsilon(1e-12));
      global_active += b.global_entropy[m] > 0;
    }
    if (std::is_same_v<L, moe::DefaultAuxLosses> && mode == Mode::Train) CHECK(b.load > 0);
    const auto& sa = ctx_d.stats;
    const auto& sb = ctx.stats;
    CHECK(sa.padding == sb.padding);
    CHECK(sa.tokens == sb.tokens);
    CHECK(sa.tokens_fully_dropped == sb.tokens_fully_dropped);
    CHECK(sa.routed == sb.routed);
    CHECK(sa.dropped == sb.dropped);
    CHECK(sa.image_share == sb.image_share);
    for (int m = 0; m < moe::kModalities; ++m) {
      CHECK(sa.drop_fraction[m] == sb.drop_fraction[m]);
      CHECK(sa.local_entropy[m] == doctest::Approx(sb.local_entropy[m]).epsilon(1e-12));
      CHECK(sa.global_entropy[m] == doctest::Approx(sb.global_entropy[m]).epsilon(1e-12));
      for (int e = 0; e < E; ++e) CHECK(sa.mean_gate[m][e] == doctest::Approx(sb.mean_gate[m][e]).epsilon(1e-12));
    }
    auto down = [](const Tensor<T, DS>& d) {
      Tensor<T> h;
      testing_cuda::download(d, h);
      return h;
    };
    auto widen = [](const Tensor<T>& t) {
      Tensor<double> w(t.shape());
      for (index_t i = 0; i < t.numel(); ++i) w[i] = t[i];
      return w;
    };
    CHECK(testing::max_diff(down(y_d), widen(y)) <= 1e-10);
    CHECK(testing::max_diff(down(dx_d), widen(dx)) <= 1e-10);
    CHECK(testing::max_diff(down(gwr_d), widen(gwr)) <= 1e-10);
    CHECK(testing::max_diff(down(gw1_d), widen(gw1)) <= 1e-10);
    CHECK(testing::max_diff(down(gb1_d), widen(gb1)) <= 1e-10);
    CHECK(testing::max_diff(down(gw2_d), widen(gw2)) <= 1e-10);
    CHECK(testing::max_diff(down(gb2_d), widen(gb2)) <= 1e-10);
    ++cases;
  };
  for (bool own_router : {false, true})  // the stock router (on the device), or one of the user's (on the host)
    for (int K : {1, 2})
      for (bool bpr : {true, false})
        for (Mode mode : {Mode::Train, Mode::Eval})
          for (bool pad : {false, true}) {
            if (own_router && !bpr) continue;  // HostRouted orders by priority
            run(moe::DefaultAuxLosses{}, own_router, K, bpr, mode, pad, false);
          }
  // Every term with a gradient; a subset of the stock terms; a set with a term of the user's own.
  for (int K : {1, 2})
    for (bool pad : {false, true}) {
      run(moe::DefaultAuxLosses{}, false, K, true, Mode::Train, pad, true);
      run(moe::AuxLosses<moe::ImportanceLoss, moe::GlobalEntropyLoss, moe::ZLoss>{}, false, K, true, Mode::Train, pad,
          true);
      run(moe::AuxLosses<moe::LoadLoss, FirstExpertLoss>{}, false, K, true, Mode::Train, pad, true);
    }
  // Groups longer than the device's chunk of 256 tokens: one group of 700, and groups of 300 (the last of 100).
  for (index_t gs : {0, 300})
    for (bool pad : {false, true}) run(moe::DefaultAuxLosses{}, false, 2, true, Mode::Train, pad, true, 700, gs);
  CHECK(cases == 40);
  CHECK(fixed_plans >= 20);  // the device router's cases: most with the fixed-capacity plan,
  CHECK(packed_plans >= 4);  // some with the packed one (no drop, or too many empty rows)
  CHECK(dropped > 0);        // capacity binds
  CHECK(global_active > 0);  // the global entropy term is above 0 somewhere
}

#endif

TEST_CASE("cuda backend (emulated): every op against Ref, forward and backward (float)") {
  for_each_backend<std::tuple<CudaFromHost>, float>();
}

// Every op that takes the precision policy (tests/unit/precision_cases.hpp: linear, self-attention, the patch
// embedding, the experts with an empty expert and dropped tokens), on the device under Bf16Mixed against Ref under
// Bf16Mixed (the same operands rounded the same way, exact accumulation: 1e-3 of the largest value covers fp32
// accumulation order and a bf16 rounding of h that may fall the other way), and against Ref in fp32 within bf16's
// error (2e-2), and not equal to it where a product is involved (the policy did round).
TEST_CASE("cuda backend (emulated): every op under the bf16 policy against Ref under bf16 and in fp32") {
  for (std::uint64_t seed : {3u, 77u}) {
    const auto dev16 = precision_cases::run_ops<CudaFromHost, Bf16Mixed>(seed);
    const auto ref16 = precision_cases::run_ops<Ref, Bf16Mixed>(seed);
    const auto ref32 = precision_cases::run_ops<Ref, Fp32>(seed);
    REQUIRE(dev16.size() == ref16.size());
    for (std::size_t i = 0; i < dev16.size(); ++i) {
      CAPTURE(dev16[i].name);
      CAPTURE(seed);
      const double same = precision_cases::rel_max(dev16[i].value.cview(), ref16[i].value.cview());
      const double vs32 = precision_cases::rel_max(dev16[i].value.cview(), ref32[i].value.cview());
      CHECK(same <= 1e-3);
      CHECK(vs32 <= 2e-2);
      // The output biases' gradients are column sums of dy, no product: the same bits as fp32 here.
      if (dev16[i].name != "linear.db" && dev16[i].name != "attn.g7") CHECK(vs32 > 0);
    }
  }
}

// The fixed-capacity plan (expert e owns rows [e C, (e + 1) C), made without reading the routes back) against
// the packed plan on the same routes: the same choices accepted, each expert's in the same order (row e C + i
// for the packed plan's i-th row of e), the rest of its C rows empty; over chunks of the plan's 512 slots, with
// experts that get no choice and experts filled to C. A route past an expert's C rows (never the stock router's)
// is treated as dropped.
namespace {
// A route [N, K] for the fixed-plan cases: each choice -1 (dropped) or an expert, expert E - 1 never chosen (a
// whole empty block), at most C choices per expert but expert 0, which may take `over` more.
Tensor<std::int32_t> capped_route(index_t N, int K, int E, index_t C, index_t over) {
  Tensor<std::int32_t> route(Shape{N, K});
  std::vector<index_t> count(static_cast<std::size_t>(E), 0);
  const Rng rng(static_cast<std::uint64_t>(N * 100 + K * 10 + E));
  for (index_t s = 0; s < N * K; ++s) {
    int e = static_cast<int>(rng.uniform(0, static_cast<std::uint64_t>(s)) * (E + 1)) - 1;
    if (e == E - 1) e = 0;
    if (e >= 0 && count[static_cast<std::size_t>(e)] >= C + (e == 0 ? over : 0)) e = -1;
    if (e >= 0) ++count[static_cast<std::size_t>(e)];
    route[s] = e;
  }
  return route;
}
}  // namespace

TEST_CASE("cuda backend (emulated): the fixed-capacity dispatch plan against the packed plan") {
  using DS = testing_cuda::DS;
  using O = Ops<Cuda, float>;
  int cases = 0;
  for (index_t N : {1, 7, 600})
    for (int K : {1, 2})
      for (int E : {3, 8})
        for (bool over : {false, true}) {
          CAPTURE(N);
          CAPTURE(K);
          CAPTURE(E);
          CAPTURE(over);
          const index_t C = std::max<index_t>(1, N * K / E);
          const Tensor<std::int32_t> route = capped_route(N, K, E, C, over ? 2 : 0);
          const auto droute = Mirror<const std::int32_t>(route.cview());
          moe::BasicDispatchPlan<DS> packed_d, fixed_d;
          if (!over) O::make_dispatch_plan(droute.v(), E, packed_d);
          O::make_fixed_dispatch_plan(droute.v(), E, C, fixed_d);
          REQUIRE(fixed_d.A == E * C);
          REQUIRE(fixed_d.fixed == C);
          Tensor<index_t> off, rt, rs, sr;
          testing_cuda::download(fixed_d.offsets, off);
          testing_cuda::download(fixed_d.row_token, rt);
          testing_cuda::download(fixed_d.row_slot, rs);
          testing_cuda::download(fixed_d.slot_row, sr);
          for (int e = 0; e <= E; ++e) CHECK(off[e] == e * C);
          // Expected: expert e's first C choices in slot order at rows e C, e C + 1, ...; the rest dropped.
          std::vector<index_t> next(static_cast<std::size_t>(E), 0);
          std::vector<index_t> want_sr(static_cast<std::size_t>(N * K), -1);
          for (index_t s = 0; s < N * K; ++s) {
            const int e = route[s];
            if (e < 0 || next[static_cast<std::size_t>(e)] == C) continue;
            want_sr[static_cast<std::size_t>(s)] = e * C + next[static_cast<std::size_t>(e)]++;
          }
          for (index_t s = 0; s < N * K; ++s) {
            REQUIRE(sr[s] == want_sr[static_cast<std::size_t>(s)]);
            if (sr[s] >= 0) CHECK((rs[sr[s]] == s && rt[sr[s]] == s / K));
          }
          for (int e = 0; e < E; ++e)
            for (index_t r = e * C + next[static_cast<std::size_t>(e)]; r < (e + 1) * C; ++r)
              CHECK((rt[r] == -1 && rs[r] == -1));
          if (!over) {  // the packed plan agrees: row i of e there is row e C + i here
            Tensor<index_t> poff, psr;
            testing_cuda::download(packed_d.offsets, poff);
            testing_cuda::download(packed_d.slot_row, psr);
            for (index_t s = 0; s < N * K; ++s) {
              if (psr[s] < 0) {
                CHECK(sr[s] == -1);
                continue;
              }
              const int e = route[s];
              CHECK(sr[s] == e * C + psr[s] - poff[e]);
            }
          }
          ++cases;
        }
  CHECK(cases == 24);
}

namespace {
// Uniform values in [-scale, scale) from stream `stream` of a fixed generator.
Tensor<float> uniform_tensor(Shape s, std::uint64_t stream, double scale) {
  Tensor<float> t(s);
  const Rng rng(99);
  for (index_t i = 0; i < t.numel(); ++i)
    t[i] = static_cast<float>((2 * rng.uniform(stream, static_cast<std::uint64_t>(i)) - 1) * scale);
  return t;
}
// max |a - b| over max |b| of n values.
double relative_maxdiff(const float* a, const float* b, index_t n) {
  double d = 0, m = 0;
  for (index_t i = 0; i < n; ++i)
    d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i])), m = std::max(m, std::abs(static_cast<double>(b[i])));
  return d / std::max(m, 1e-30);
}
}  // namespace

// The experts over a fixed-capacity plan (every product one strided-batched product over the E blocks of C
// rows: cuBLAS's strided-batched sgemm in fp32, its bf16 GemmStridedBatchedEx under Bf16Mixed) against Ref's
// experts over its packed plan of the same route, under the same policy: each accepted choice's output row and
// input gradient, and the four parameter gradients accumulated onto nonzero values. An expert no token chose
// has a whole block of empty rows, the others some; the empty rows' output gradient is 0 (as the combine's
// backward writes it), so they must add nothing. fp32 to 2e-5 of the largest entry; bf16 to 1e-3, as the bf16
// model case: both sides round the same operands the same way, but an intermediate (h, dh) that the two
// accumulation orders leave an ulp apart can round to neighbouring bf16 values, moving one term of a later sum
// by 2^-8 of itself (seen: 3.7e-4).
template <class Prec>
void check_fixed_experts(double tol) {
  using DS = testing_cuda::DS;
  using O = Ops<Cuda, float>;
  using R = Ops<Ref, float>;
  const Prec prec{};
  const index_t D = 24, M = 40;
  const auto rnd = uniform_tensor;
  const auto maxdiff = relative_maxdiff;
  int cases = 0;
  for (index_t N : {5, 300})
    for (int K : {1, 2})
      for (int E : {3, 8})
        for (GeluKind gelu : {GeluKind::Erf, GeluKind::Tanh}) {
          CAPTURE(N);
          CAPTURE(K);
          CAPTURE(E);
          const index_t C = std::max<index_t>(1, N * K / E);
          const Tensor<std::int32_t> route = capped_route(N, K, E, C, 0);
          const Tensor<float> x = rnd(Shape{N, D}, 2, 1.0), dslot = rnd(Shape{N * K, D}, 3, 1.0);
          const Tensor<float> w1 = rnd(Shape{E, M, D}, 4, 0.3), b1 = rnd(Shape{E, M}, 5, 0.3),
                              w2 = rnd(Shape{E, D, M}, 6, 0.3), b2 = rnd(Shape{E, D}, 7, 0.3);
          const Tensor<float> g1_0 = rnd(Shape{E, M, D}, 8, 0.1), gb1_0 = rnd(Shape{E, M}, 9, 0.1),
                              g2_0 = rnd(Shape{E, D, M}, 10, 0.1), gb2_0 = rnd(Shape{E, D}, 11, 0.1);

          // Ref: the packed plan; dye row r is its slot's gradient.
          moe::DispatchPlan rp;
          R::make_dispatch_plan(route.cview(), E, rp);
          const index_t A = rp.A;
          Tensor<float> xe(Shape{A, D}), hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), dye(Shape{A, D}),
              dh(Shape{A, M}), dxe(Shape{A, D});
          Tensor<float> rg1 = g1_0, rgb1 = gb1_0, rg2 = g2_0, rgb2 = gb2_0;
          moe::ExpertScratch rs;
          const moe::ExpertWeights<float> rw{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
          R::dispatch_forward(rp, x.cview(), xe.view());
          R::expert_mlp_forward(rp, rw, gelu, xe.cview(), hp.view(), h.view(), ye.view(), rs, prec);
          for (index_t s = 0; s < N * K; ++s)
            if (rp.slot_row[s] >= 0)
              std::copy_n(dslot.data() + s * D, D, dye.data() + rp.slot_row[s] * D);
          R::expert_mlp_backward(rp, rw, gelu, xe.cview(), hp.cview(), h.cview(), dye.cview(), dh.view(), dxe.view(),
                                 moe::ExpertGrads<float>{rg1.view(), rgb1.view(), rg2.view(), rgb2.view()}, rs, prec);

          // The device: the fixed plan; dye from the same slots, zero on the empty rows.
          const auto droute = Mirror<const std::int32_t>(route.cview());
          moe::BasicDispatchPlan<DS> fp;
          O::make_fixed_dispatch_plan(droute.v(), E, C, fp);
          REQUIRE(fp.A == E * C);
          Tensor<index_t> sr;
          testing_cuda::download(fp.slot_row, sr);
          Tensor<float> fx(Shape{E * C, D}), fye(Shape{E * C, D}), fdye(Shape{E * C, D}), fdxe(Shape{E * C, D});
          for (index_t s = 0; s < N * K; ++s)
            if (sr[s] >= 0) std::copy_n(dslot.data() + s * D, D, fdye.data() + sr[s] * D);
          Tensor<float> fg1 = g1_0, fgb1 = gb1_0, fg2 = g2_0, fgb2 = gb2_0;
          {
            auto mx = Mirror<const float>(x.cview());
            auto m1 = Mirror<const float>(w1.cview()), mb1 = Mirror<const float>(b1.cview()),
                 m2 = Mirror<const float>(w2.cview()), mb2 = Mirror<const float>(b2.cview());
            auto mye = Mirror<float>(fye.view()), mdxe = Mirror<float>(fdxe.view());
            auto mdye = Mirror<const float>(fdye.cview());
            auto g1 = Mirror<float>(fg1.view()), gb1 = Mirror<float>(fgb1.view()), g2 = Mirror<float>(fg2.view()),
                 gb2 = Mirror<float>(fgb2.view());
            Tensor<float, DS> dxe_d(Shape{E * C, D}), dhp(Shape{E * C, M}), dh_(Shape{E * C, M}), ddh(Shape{E * C, M});
            moe::ExpertScratch ds;
            const moe::ExpertWeights<float, DS> dw{m1.v(), mb1.v(), m2.v(), mb2.v()};
            O::dispatch_forward(fp, mx.v(), dxe_d.view());
            O::expert_mlp_forward(fp, dw, gelu, dxe_d.cview(), dhp.view(), dh_.view(), mye.v(), ds, prec);
            O::expert_mlp_backward(fp, dw, gelu, dxe_d.cview(), dhp.cview(), dh_.cview(), mdye.v(), ddh.view(), mdxe.v(),
                                   moe::ExpertGrads<float, DS>{g1.v(), gb1.v(), g2.v(), gb2.v()}, ds, prec);
            mye.back(), mdxe.back(), g1.back(), gb1.back(), g2.back(), gb2.back();
          }
          // Row by row through the slots, then the gradients.
          Tensor<float> got_y(Shape{A, D}), got_dx(Shape{A, D});
          for (index_t s = 0; s < N * K; ++s) {
            REQUIRE((sr[s] >= 0) == (rp.slot_row[s] >= 0));
            if (sr[s] < 0) continue;
            std::copy_n(fye.data() + sr[s] * D, D, got_y.data() + rp.slot_row[s] * D);
            std::copy_n(fdxe.data() + sr[s] * D, D, got_dx.data() + rp.slot_row[s] * D);
          }
          CHECK(maxdiff(got_y.data(), ye.data(), A * D) <= tol);
          CHECK(maxdiff(got_dx.data(), dxe.data(), A * D) <= tol);
          CHECK(maxdiff(fg1.data(), rg1.data(), E * M * D) <= tol);
          CHECK(maxdiff(fgb1.data(), rgb1.data(), E * M) <= tol);
          CHECK(maxdiff(fg2.data(), rg2.data(), E * D * M) <= tol);
          CHECK(maxdiff(fgb2.data(), rgb2.data(), E * D) <= tol);
          ++cases;
        }
  CHECK(cases == 16);
}

TEST_CASE("cuda backend (emulated): the experts over a fixed-capacity plan against Ref's over the packed plan") {
  check_fixed_experts<Fp32>(2e-5);
  check_fixed_experts<Bf16Mixed>(1e-3);
}

// The experts over a packed plan (no-drop routing, a capacity with slack): in fp32 each of the six products one
// grouped product over the experts with rows (exec::gemm_grouped: the operands' addresses written on the device by
// one launch per 64 experts, then one library call), against Ref's experts over its plan of the same route, under
// the same policy, and against the same products run one per expert (exec::grouped_products(false)): the same
// values, and 6 (G - 1 - ceil(G / 64)) launches fewer for G experts with rows; under bf16, one product per expert
// either way. E = 80 (70 with rows), so the addresses take two launches; every eighth expert is never chosen (an
// empty group is not a problem of the call).
template <class Prec>
void check_grouped_experts(double tol) {
  using DS = testing_cuda::DS;
  using O = Ops<Cuda, float>;
  using R = Ops<Ref, float>;
  const Prec prec{};
  const index_t N = 300, D = 8, M = 12;
  const int E = 80, K = 2;
  Tensor<std::int32_t> route(Shape{N, K});
  const Rng rng(17);
  for (index_t t = 0; t < N; ++t) {
    const auto e0 = static_cast<std::int32_t>(rng.uniform(t, 0) * E);
    const auto e1 = static_cast<std::int32_t>((e0 + 1 + static_cast<std::int32_t>(rng.uniform(t, 1) * (E - 2))) % E);
    route[t * K] = e0 % 8 == 7 ? -1 : e0;
    route[t * K + 1] = e1 % 8 == 7 ? -1 : e1;
  }
  const Tensor<float> x = uniform_tensor(Shape{N, D}, 2, 1.0);
  const Tensor<float> w1 = uniform_tensor(Shape{E, M, D}, 4, 0.3), b1 = uniform_tensor(Shape{E, M}, 5, 0.3),
                      w2 = uniform_tensor(Shape{E, D, M}, 6, 0.3), b2 = uniform_tensor(Shape{E, D}, 7, 0.3);
  const Tensor<float> g1_0 = uniform_tensor(Shape{E, M, D}, 8, 0.1), gb1_0 = uniform_tensor(Shape{E, M}, 9, 0.1),
                      g2_0 = uniform_tensor(Shape{E, D, M}, 10, 0.1), gb2_0 = uniform_tensor(Shape{E, D}, 11, 0.1);

  moe::DispatchPlan rp;
  R::make_dispatch_plan(route.cview(), E, rp);
  const index_t A = rp.A;
  int G = 0;
  for (int e = 0; e < E; ++e) G += rp.offsets[e + 1] > rp.offsets[e];
  REQUIRE(G > 64);
  REQUIRE(G < E);
  const Tensor<float> dye = uniform_tensor(Shape{A, D}, 3, 1.0);
  Tensor<float> xe(Shape{A, D}), hp(Shape{A, M}), h(Shape{A, M}), ye(Shape{A, D}), dh(Shape{A, M}), dxe(Shape{A, D});
  Tensor<float> rg1 = g1_0, rgb1 = gb1_0, rg2 = g2_0, rgb2 = gb2_0;
  moe::ExpertScratch rs;
  const moe::ExpertWeights<float> rw{w1.cview(), b1.cview(), w2.cview(), b2.cview()};
  R::dispatch_forward(rp, x.cview(), xe.view());
  R::expert_mlp_forward(rp, rw, GeluKind::Erf, xe.cview(), hp.view(), h.view(), ye.view(), rs, prec);
  R::expert_mlp_backward(rp, rw, GeluKind::Erf, xe.cview(), hp.cview(), h.cview(), dye.cview(), dh.view(), dxe.view(),
                         moe::ExpertGrads<float>{rg1.view(), rgb1.view(), rg2.view(), rgb2.view()}, rs, prec);

  struct Run {
    Tensor<float> ye, dxe, g1, gb1, g2, gb2;
    std::int64_t launches;
  };
  const auto device = [&](bool grouped) {
    cuda::exec::grouped_products(grouped);
    Run r{Tensor<float>(Shape{A, D}), Tensor<float>(Shape{A, D}), g1_0, gb1_0, g2_0, gb2_0, 0};
    const auto droute = Mirror<const std::int32_t>(route.cview());
    moe::BasicDispatchPlan<DS> dp;
    O::make_dispatch_plan(droute.v(), E, dp);
    REQUIRE(dp.A == A);
    auto mx = Mirror<const float>(x.cview()), mdye = Mirror<const float>(dye.cview());
    auto m1 = Mirror<const float>(w1.cview()), mb1 = Mirror<const float>(b1.cview()),
         m2 = Mirror<const float>(w2.cview()), mb2 = Mirror<const float>(b2.cview());
    auto mye = Mirror<float>(r.ye.view()), mdxe = Mirror<float>(r.dxe.view());
    auto g1 = Mirror<float>(r.g1.view()), gb1 = Mirror<float>(r.gb1.view()), g2 = Mirror<float>(r.g2.view()),
         gb2 = Mirror<float>(r.gb2.view());
    Tensor<float, DS> dxe_d(Shape{A, D}), dhp(Shape{A, M}), dh_(Shape{A, M}), ddh(Shape{A, M});
    moe::ExpertScratch ds;
    const moe::ExpertWeights<float, DS> dw{m1.v(), mb1.v(), m2.v(), mb2.v()};
    O::dispatch_forward(dp, mx.v(), dxe_d.view());
    const std::int64_t l0 = DS::launches.load();
    O::expert_mlp_forward(dp, dw, GeluKind::Erf, dxe_d.cview(), dhp.view(), dh_.view(), mye.v(), ds, prec);
    O::expert_mlp_backward(dp, dw, GeluKind::Erf, dxe_d.cview(), dhp.cview(), dh_.cview(), mdye.v(), ddh.view(), mdxe.v(),
                           moe::ExpertGrads<float, DS>{g1.v(), gb1.v(), g2.v(), gb2.v()}, ds, prec);
    r.launches = DS::launches.load() - l0;
    mye.back(), mdxe.back(), g1.back(), gb1.back(), g2.back(), gb2.back();
    cuda::exec::grouped_products(true);
    return r;
  };
  const Run on = device(true), off = device(false);
  for (const Run* r : {&on, &off}) {
    CHECK(relative_maxdiff(r->ye.data(), ye.data(), A * D) <= tol);
    CHECK(relative_maxdiff(r->dxe.data(), dxe.data(), A * D) <= tol);
    CHECK(relative_maxdiff(r->g1.data(), rg1.data(), E * M * D) <= tol);
    CHECK(relative_maxdiff(r->gb1.data(), rgb1.data(), E * M) <= tol);
    CHECK(relative_maxdiff(r->g2.data(), rg2.data(), E * D * M) <= tol);
    CHECK(relative_maxdiff(r->gb2.data(), rgb2.data(), E * D) <= tol);
  }
  // Both run the emulation's loop product at the same addresses: the same bits.
  CHECK(relative_maxdiff(on.ye.data(), off.ye.data(), A * D) == 0);
  CHECK(relative_maxdiff(on.g1.data(), off.g1.data(), E * M * D) == 0);
  if constexpr (Prec::mixed)  // no grouped product of bf16 operands into fp32: one product per expert either way
    CHECK(off.launches == on.launches);
  else
    CHECK(off.launches - on.launches == 6 * (G - 1 - (G + 63) / 64));
}

TEST_CASE("cuda backend (emulated): the experts over a packed plan as one grouped product per weight matrix") {
  check_grouped_experts<Fp32>(2e-5);
  check_grouped_experts<Bf16Mixed>(1e-3);
}

// A product's bias in cuBLASLt's epilogue (exec::gemm_bias_as, what linear_forward runs), through the
// emulated library (tests/support/cublaslt_emu.hpp: the documented column-major semantics, layouts, attribute
// sizes and the operands' alignments the chosen algorithm may assume): C = A B^T + bias against a double product
// of the same operands (bf16: of the operands rounded to bf16), one launch (fp32) where the seeded path takes two
// (exec::bias_epilogue(false): the bias written into C, the product accumulated onto it), the same bits either
// way; operands at 256-byte-aligned addresses, then at addresses only 4-byte aligned (the second shape's
// algorithm must not be the first's), and K = 0 (the bias alone, seeded).
template <class Prec>
void check_bias_epilogue(int extra_launches) {
  using DS = testing_cuda::DS;
  namespace ex = cuda::exec;
  const Prec prec{};
  for (index_t K : {19, 0}) {
    const index_t M = 37, N = 24;
    const Tensor<float> A = uniform_tensor(Shape{M * K + 1}, 1, 1.0), B = uniform_tensor(Shape{N * K + 1}, 2, 1.0),
                        bias = uniform_tensor(Shape{N + 1}, 3, 1.0);
    const auto dA = Mirror<const float>(A.cview()), dB = Mirror<const float>(B.cview()),
               dbias = Mirror<const float>(bias.cview());
    const auto q = [](float v) { return Prec::mixed ? math::bf16_value(math::bf16_round(v)) : v; };
    for (int off : {0, 1}) {
      CAPTURE(K);
      CAPTURE(off);
      Tensor<float> got[2];
      std::int64_t launches[2] = {0, 0};
      for (bool epilogue : {true, false}) {
        ex::bias_epilogue(epilogue);
        Tensor<float, DS> C(Shape{M * N + 1});
        const std::int64_t l0 = DS::launches.load();
        ex::gemm_bias_as<Prec, float>(prec, false, true, M, N, K, dA.v().data() + off, K, dB.v().data() + off, K,
                                      dbias.v().data() + off, C.data() + off);
        launches[epilogue] = DS::launches.load() - l0;
        testing_cuda::download(C, got[epilogue]);
        ex::bias_epilogue(true);
      }
      double worst = 0;
      for (index_t m = 0; m < M; ++m)
        for (index_t n = 0; n < N; ++n) {
          double want = bias[off + n];
          for (index_t k = 0; k < K; ++k)
            want += static_cast<double>(q(A[off + m * K + k])) * static_cast<double>(q(B[off + n * K + k]));
          worst = std::max(worst, std::abs(got[1][off + m * N + n] - want) / (1 + std::abs(want)));
          REQUIRE(got[1][off + m * N + n] == got[0][off + m * N + n]);
        }
      CHECK(worst < 1e-5);
      if (K > 0) {
        CHECK(launches[1] == 1 + extra_launches);  // the product with its epilogue
        CHECK(launches[0] == 2 + extra_launches);  // the bias written, the product onto it
      } else {
        CHECK(launches[1] == 2);  // no product to carry the bias (and nothing to round): seeded
      }
    }
  }
}

TEST_CASE("cuda backend (emulated): a product's bias in cuBLASLt's epilogue") {
  check_bias_epilogue<Fp32>(0);
  check_bias_epilogue<Bf16Mixed>(2);  // each operand rounded to bf16 by a launch
}

TEST_CASE("cuda backend (emulated): bad input is refused with the ops' messages") {
  using O = Ops<Cuda, float>;
  using S = Cuda::memory_space;
  Tensor<float> table(Shape{5, 4});
  Tensor<std::int32_t> ids(Shape{2, 3});
  for (index_t i = 0; i < 6; ++i) ids[i] = static_cast<std::int32_t>(i % 5);
  ids[4] = 7;
  Mirror<const float> dtable(table.cview());
  Mirror<const std::int32_t> dids(ids.cview());
  Tensor<float, S> y(Shape{2, 3, 4});
  try {
    O::token_embed_forward(dids.v(), dtable.v(), CView<float, S>{}, y.view());
    FAIL("an id outside the vocabulary was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("token id 7 at position 1 of sequence 1") != std::string::npos);
  }
  const Tensor<std::int32_t> route = Tensor<std::int32_t>::from(Shape{3, 1}, {0, 4, -1});
  Mirror<const std::int32_t> droute(route.cview());
  moe::BasicDispatchPlan<S> plan;
  CHECK_THROWS_WITH_AS(O::make_dispatch_plan(droute.v(), 3, plan),
                       doctest::Contains("1 route entries are neither -1 nor an expert in [0, 3)"), Error);
  Tensor<float, S> x(Shape{4, 6}), W(Shape{5, 7}), out(Shape{4, 5});
  CHECK_THROWS_WITH_AS(O::linear_forward(x.cview(), W.cview(), CView<float, S>{}, out.view()),
                       doctest::Contains("must end in I = 7"), Error);
  CHECK_THROWS_WITH_AS(O::add_into(x.cview(), out.view()), doctest::Contains("must have one shape"), Error);
}

// The plan cuts the slots into chunks of kernels::kPlanChunk (512) and hands each expert its rows chunk by
// chunk: routes over several chunks, with drops, an expert never chosen, and (in the full build) more experts
// than a block has threads, give exactly Ref's plan.
TEST_CASE("cuda backend (emulated): the dispatch plan over several chunks equals Ref's") {
  struct Case {
    index_t N;
    int K, E;
  };
  std::vector<Case> cases{{700, 2, 5}, {512, 1, 3}, {1, 1, 1}};
#if !defined(LIMOE_HARNESS_QUICK)
  cases.push_back({600, 1, 300});
#endif
  for (const Case& cs : cases) {
    CAPTURE(cs.N);
    CAPTURE(cs.K);
    CAPTURE(cs.E);
    Tensor<std::int32_t> route(Shape{cs.N, cs.K});
    const Rng rng(23);
    for (index_t i = 0; i < route.numel(); ++i)
      route[i] = rng.uniform(i, 0) < 0.2 ? -1 : static_cast<std::int32_t>(rng.uniform(i, 1) * std::max(1, cs.E - 1));
    moe::DispatchPlan got, want;
    Ops<testing_cuda::CudaFromHost, float>::make_dispatch_plan(route.cview(), cs.E, got);
    Ops<Ref, float>::make_dispatch_plan(route.cview(), cs.E, want);
    REQUIRE(got.A == want.A);
    CHECK(got.N == want.N);
    const auto same = [](const Tensor<index_t>& a, const Tensor<index_t>& b) {
      if (a.numel() != b.numel()) return false;
      for (index_t i = 0; i < a.numel(); ++i)
        if (a[i] != b[i]) return false;
      return true;
    };
    CHECK(same(got.offsets, want.offsets));
    CHECK(same(got.row_token, want.row_token));
    CHECK(same(got.row_slot, want.row_slot));
    CHECK(same(got.slot_row, want.slot_row));
  }
}

namespace {
Tensor<double> as_double(CView<float> v) {
  Tensor<double> d(v.shape());
  for (index_t i = 0; i < v.numel(); ++i) d[i] = static_cast<double>(v[i]);
  return d;
}
// cuda::ops::adamw_update on device copies of host buffers; w, m, v copied back.
double adamw_on_device(const AdamWConfig& cfg, int step, double lr, const Tensor<float>& g,
                       const Tensor<std::uint8_t>& decay, Tensor<float>& w, Tensor<float>& m, Tensor<float>& v) {
  Mirror<const float> dg(g.cview());
  Mirror<const std::uint8_t> dd(decay.cview());
  Mirror<float> dw(w.view()), dm(m.view()), dv(v.view());
  double norm = 0;
  try {
    norm = cuda::ops::adamw_update<float>(cfg, step, lr, dg.v(), dd.v(), dw.v(), dm.v(), dv.v());
  } catch (...) {
    dw.back(), dm.back(), dv.back();  // what the device holds after a refused step
    throw;
  }
  dw.back(), dm.back(), dv.back();
  return norm;
}
}  // namespace

TEST_CASE("cuda backend (emulated): AdamW with global-norm clipping against the CPU optimizer") {
  // A store with decayed and undecayed entries; three steps, clipping active in the first; float and the CPU
  // optimizer's arithmetic (math/adamw.hpp) on both sides, norms summed in double on both.
  ParamStore<float> ps;
  ps.add("w", Shape{37, 5}, true);
  ps.add("b", Shape{29}, false);
  ps.add("big", Shape{300, 7}, true);  // more than one block of the norm's partial sums
  ps.finalize();
  const index_t n = ps.size();
  testing::fill_normal(ps.values(), 1, 0.5);
  Tensor<float> w(Shape{n}), m(Shape{n}), v(Shape{n}), g(Shape{n});
  std::copy(ps.values().data(), ps.values().data() + n, w.data());
  Tensor<std::uint8_t> decay(Shape{n});
  for (const auto& e : ps.entries())
    for (index_t i = 0; i < e.shape.numel(); ++i) decay[e.offset + i] = e.decay ? 1 : 0;
  const AdamWConfig cfg{.lr = 1e-2, .weight_decay = 0.1, .clip_norm = 1.0};
  AdamW<float> opt(cfg, ps);
  for (int step = 1; step <= 3; ++step) {
    CAPTURE(step);
    testing::fill_normal(ps.grads(), 10 + static_cast<std::uint64_t>(step), step == 1 ? 2.0 : 0.01);
    std::copy(ps.grads().data(), ps.grads().data() + n, g.data());
    const double lr = 1e-2 * (1.0 + 0.1 * step);
    const double norm = opt.update(ps, lr);
    const double got = adamw_on_device(cfg, step, lr, g, decay, w, m, v);
    if (step == 1) CHECK(norm > 1.0);  // the clipped step
    CHECK(got == doctest::Approx(norm).epsilon(1e-12));
    CHECK(testing::max_diff(w, as_double(ps.values())) <= 1e-6);
    CHECK(testing::max_diff(m, as_double(opt.m().cview())) <= 1e-6);
    CHECK(testing::max_diff(v, as_double(opt.v().cview())) <= 1e-6);
  }
  // A gradient that is not finite: an error naming it, and nothing changes.
  const Tensor<float> w_before = w;
  g[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(adamw_on_device(cfg, 4, 1e-2, g, decay, w, m, v),
                       doctest::Contains("the gradient is not finite"), Error);
  CHECK(testing::max_diff(w, as_double(w_before.cview())) == 0);
}
