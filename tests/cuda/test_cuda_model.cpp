// The whole model on a GPU (Limoe<float, ..., Cuda>: parameters, activations and optimizer in device memory,
// the routers on the host over the downloaded logits) against the same model on the CPU (Limoe<float>, the Cpu
// backend): evaluation embeddings and routes, three training steps (losses and the parameters after them), and
// one checkpoint file read by both. Float on both sides with different summation orders (cuBLAS, the CPU's
// Eigen/oneDNN products), so the comparisons are within float tolerances, and routes may differ where two
// experts' gates tie to within rounding; the exact checks (double, Ref, identical routes) are the emulated
// ones (tests/cuda_emu/test_cuda_emu_backend.cpp). Skips (exit 77) without a GPU.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limoe/backend/cuda.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <limoe/train/trainer.hpp>

#include <doctest/doctest.h>

// Compiled once, in limoe_instances_cuda.
extern template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cuda>;

using namespace limoe;

namespace {
using CpuModel = Limoe<float>;
using GpuModel = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda>;

// Every code path: MoE blocks with K = 2, BPR and a capacity that drops in training, a map head, a masked
// text head, routing groups of pairs.
ModelConfig config() {
  ModelConfig c;
  c.image_size = {16, 16};
  c.channels = 3;
  c.patch = 4;
  c.width = 64;
  c.depth = 3;
  c.heads = 4;
  c.mlp_dim = 128;
  c.vocab_size = 50;
  c.text_len = 8;
  c.proj_dim = 32;
  c.experts = 4;
  c.top_k = 2;
  c.moe_blocks = {1, 2};
  c.text_mask = true;
  c.pool_img = Pooling::Map;
  c.pool_txt = Pooling::Last;
  c.group_pairs = 4;
  c.router.capacity_factor_train = 1.0;
  c.router.noise_std = 0.0;  // no noise: the two backends see the same gates up to rounding
  return c;
}

struct Batch {
  Tensor<float> images;
  Tensor<std::int32_t> texts;
};
Batch batch(const ModelConfig& c, index_t n, std::uint64_t seed) {
  Batch b{testing::randn<float>(Shape{n, 16, 16, 3}, seed, 0.5), Tensor<std::int32_t>(Shape{n, c.text_len})};
  for (index_t i = 0; i < b.texts.numel(); ++i)
    b.texts[i] = i % c.text_len < 3 + (i / c.text_len) % 4 ? static_cast<std::int32_t>(2 + (i * 13 + seed) % 47) : c.pad_id;
  return b;
}

double max_abs(CView<float> a, CView<float> b) {
  REQUIRE(a.numel() == b.numel());
  double d = 0;
  for (index_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
  return d;
}

// The share of route entries on which the two outputs agree.
double route_agreement(const ForwardOutput<float>& a, const ForwardOutput<float>& b) {
  REQUIRE(a.routes.size() == b.routes.size());
  double same = 0, all = 0;
  for (std::size_t i = 0; i < a.routes.size(); ++i)
    for (index_t j = 0; j < a.routes[i].numel(); ++j) same += a.routes[i][j] == b.routes[i][j], all += 1;
  return all > 0 ? same / all : 1.0;
}
}  // namespace

TEST_CASE("the model on the GPU: evaluation embeddings and routes equal the CPU model's") {
  const ModelConfig c = config();
  CpuModel cpu(c);
  GpuModel gpu(c);
  cpu.init(5), gpu.init(5);
  const Batch b = batch(c, 16, 1);
  const auto fc = cpu.forward(b.images.cview(), b.texts.cview(), Mode::Eval);
  const auto fg = gpu.forward(b.images.cview(), b.texts.cview(), Mode::Eval);
  CHECK(max_abs(fg.img_emb.cview(), fc.img_emb.cview()) <= 1e-4);
  CHECK(max_abs(fg.txt_emb.cview(), fc.txt_emb.cview()) <= 1e-4);
  CHECK(route_agreement(fg, fc) >= 0.99);
  CHECK(fg.aux_loss == doctest::Approx(fc.aux_loss).epsilon(1e-3));
}

TEST_CASE("the model on the GPU: training steps follow the CPU model's") {
  const ModelConfig c = config();
  CpuModel cpu(c);
  GpuModel gpu(c);
  cpu.init(9), gpu.init(9);
  TrainConfig tc;
  tc.steps = 100, tc.warmup_steps = 2;
  tc.adam.lr = 1e-3;
  Trainer<CpuModel> tcpu(cpu, tc);
  Trainer<GpuModel> tgpu(gpu, tc);
  for (int s = 0; s < 3; ++s) {
    CAPTURE(s);
    const Batch b = batch(c, 16, 10 + static_cast<std::uint64_t>(s));
    const auto rc = tcpu.step(b.images.cview(), b.texts.cview());
    const auto rg = tgpu.step(b.images.cview(), b.texts.cview());
    CHECK(rg.loss.contrastive == doctest::Approx(rc.loss.contrastive).epsilon(1e-3));
    CHECK(rg.grad_norm == doctest::Approx(rc.grad_norm).epsilon(1e-2));
  }
  CHECK(max_abs(to_host(gpu.params().values()).cview(), std::as_const(cpu.params()).values()) <= 1e-3);
}

TEST_CASE("the model on the GPU: one checkpoint for the GPU and the CPU") {
  const ModelConfig c = config();
  GpuModel gpu(c);
  gpu.init(3);
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 1;
  Trainer<GpuModel> trainer(gpu, tc);
  const Batch b = batch(c, 8, 4);
  trainer.step(b.images.cview(), b.texts.cview());
  const std::string path = (std::filesystem::temp_directory_path() / "limoe_gpu_model.safetensors").string();
  save_checkpoint(gpu, path, TrainState<float, Cuda::memory_space>{&trainer.optimizer(), "{}"});
  CpuModel cpu(c);
  load_weights(cpu, io::SafetensorsReader::open(path));
  CHECK(max_abs(to_host(gpu.params().values()).cview(), std::as_const(cpu.params()).values()) == 0);
  GpuModel back(c);  // and the file read back onto the device
  load_weights(back, io::SafetensorsReader::open(path));
  CHECK(max_abs(to_host(back.params().values()).cview(), std::as_const(cpu.params()).values()) == 0);
  const Batch e = batch(c, 8, 6);
  const auto fc = cpu.forward(e.images.cview(), e.texts.cview(), Mode::Eval);
  const auto fg = back.forward(e.images.cview(), e.texts.cview(), Mode::Eval);
  CHECK(max_abs(fg.img_emb.cview(), fc.img_emb.cview()) <= 1e-4);
  CHECK(max_abs(fg.txt_emb.cview(), fc.txt_emb.cview()) <= 1e-4);
  std::remove(path.c_str());
}
