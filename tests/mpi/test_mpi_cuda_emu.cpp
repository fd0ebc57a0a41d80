// Data-parallel training of a model on the CUDA backend, on the CPU: the backend through the emulation
// (tests/support/cuda_emu.hpp; its device memory is opaque to host code), the ranks under mpirun. Each rank's
// Trainer copies its device gradient to the host, sums it over the ranks and copies it back, or (after
// sum_gradients_with) sums it on the device through a communicator over device memory: here MPI moving the
// emulation's device memory, standing in for NcclComm. After a few steps every rank holds the parameters of one
// process stepping the same model on the whole batch (within the rounding of the sum's order), the same bits
// as the other ranks, and the device sum gives the same bits as the staged one. Expert parallel: a device model
// holding half of the experts trains as one process does.
#define DOCTEST_CONFIG_IMPLEMENT
#include "support/cuda_emu.hpp"  // first: the CUDA keywords and LIMOE_CUDA_EMULATION

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <cuda/backend/moe_ops.cuh>
#include <limoe/backend/cuda.hpp>
#include <limoe/dist/mpi.hpp>
#include <limoe/model/model.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <limoe/train/trainer.hpp>
#include <vector>

#include "mpi/shard.hpp"  // (tests/ is on the include path)
#include "unit/backend_model.hpp"

using namespace limoe;
using dist::MpiComm;

namespace {
using DevModel = Limoe<double, ConfigRouter, moe::DefaultAuxLosses, Cuda>;

// The backend harness's tiny model (every code path), routed in groups of one pair so that no group spans ranks.
ModelConfig config() {
  ModelConfig c = backend_cases::tiny_config();
  c.group_pairs = 1;
  c.router.capacity_factor_train = 1.0;
  return c;
}
using testing::rows;

// Step s's batch of B pairs: normal images (seed first_seed + s), captions of 2-4 ids then padding (ids vary
// with `stride`).
struct StepBatch {
  Tensor<double> images;
  Tensor<std::int32_t> texts;
};
StepBatch step_batch(const ModelConfig& cfg, index_t B, int s, std::uint64_t first_seed, index_t stride) {
  StepBatch b{testing::randn<double>(Shape{B, 8, 8, 3}, first_seed + static_cast<std::uint64_t>(s)),
              Tensor<std::int32_t>(Shape{B, cfg.text_len})};
  for (index_t i = 0; i < b.texts.numel(); ++i)
    b.texts[i] = i % cfg.text_len < 2 + (i / cfg.text_len) % 3 ? static_cast<std::int32_t>(2 + (i * stride + s) % 11) : cfg.pad_id;
  return b;
}

// MPI over the emulation's device memory (host memory underneath, which MPI may read): a communicator in the
// model's memory space, as NcclComm is on a GPU.
// It counts the bytes its all-to-alls moved, over it and every communicator split from it.
class DeviceMpi {
 public:
  using memory_space = SpaceOf<Cuda>;
  explicit DeviceMpi(MpiComm c, std::shared_ptr<std::size_t> moved = std::make_shared<std::size_t>(0))
      : mpi_(std::move(c)), moved_(std::move(moved)) {}
  int rank() const { return mpi_.rank(); }
  int size() const { return mpi_.size(); }
  void all_gather_bytes(const void* s, void* r, std::size_t n) { mpi_.all_gather_bytes(s, r, n); }
  void all_to_all_bytes(const void* s, void* r, std::size_t n) {
    mpi_.all_to_all_bytes(s, r, n);
    *moved_ += n * static_cast<std::size_t>(size());
  }
  void broadcast_bytes(void* d, std::size_t n, int root) { mpi_.broadcast_bytes(d, n, root); }
  DeviceMpi split(int color, int key) const { return DeviceMpi(mpi_.split(color, key), moved_); }
  std::shared_ptr<std::size_t> moved() const { return moved_; }

 private:
  MpiComm mpi_;
  std::shared_ptr<std::size_t> moved_;
};
static_assert(dist::CommunicatorIn<DeviceMpi, SpaceOf<Cuda>>);
}  // namespace

TEST_CASE("the sum over ranks on the device: the same bits as the host sum, for even and uneven sizes") {
  using S = SpaceOf<Cuda>;
  MpiComm comm(MPI_COMM_WORLD);
  DeviceMpi dev(MpiComm(MPI_COMM_WORLD));
  const int P = comm.size(), me = comm.rank();
  Tensor<float, S> scratch;
  for (index_t n : {index_t{1}, index_t{7}, index_t{2 * P}, index_t{1000}, index_t{4099}}) {
    CAPTURE(n);
    std::vector<float> host(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i)
      host[static_cast<std::size_t>(i)] = std::ldexp(static_cast<float>((i * 37 + me * 11) % 101) - 50.f, -(me % 3)) / 3.f;
    Tensor<float, S> d(Shape{n});
    copy_from_host<float, S>(CView<float>(host.data(), Shape{n}), d.view());
    dist::all_reduce_sum_in(dev, d.view(), scratch,
                            [](CView<float, S> x, View<float, S> y) { Ops<Cuda, float>::add_into(x, y); });
    dist::all_reduce_sum(comm, std::span<float>(host));
    const Tensor<float> got = to_host(d.cview());
    index_t differ = 0;
    for (index_t i = 0; i < n; ++i) differ += got[i] != host[static_cast<std::size_t>(i)];
    CHECK(differ == 0);
  }
}

TEST_CASE("data parallel training of a device model: every rank ends with one process's parameters") {
  MpiComm comm(MPI_COMM_WORLD);
  const int P = comm.size(), me = comm.rank();
  const index_t n = 2, B = n * P;
  const ModelConfig cfg = config();
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 1;
  tc.adam.lr = 3e-3, tc.adam.clip_norm = 0.5;
  DevModel one(cfg), dp(cfg), dd(cfg);
  for (DevModel* m : {&one, &dp, &dd}) m->init(9), m->set_noise_seed(5);
  Trainer<DevModel> t1(one, tc);
  Trainer<DevModel, MpiComm> td(dp, tc, MpiComm(MPI_COMM_WORLD));  // the gradient staged through the host
  Trainer<DevModel, MpiComm> tv(dd, tc, MpiComm(MPI_COMM_WORLD));  // summed on the device
  tv.sum_gradients_with(DeviceMpi(MpiComm(MPI_COMM_WORLD)));
  CHECK(tv.sums_gradients_on_device());
  CHECK_FALSE(td.sums_gradients_on_device());
  {
    // A gradient communicator over other ranks (here: each rank alone) is refused, naming both.
    DevModel other(cfg);
    Trainer<DevModel, MpiComm> tx(other, tc, MpiComm(MPI_COMM_WORLD));
    DeviceMpi alone(MpiComm(MPI_COMM_WORLD).split(me, 0));
    CHECK_THROWS_WITH(tx.sum_gradients_with(std::move(alone)), doctest::Contains("both must join the same ranks"));
  }
  for (int s = 0; s < 2; ++s) {
    CAPTURE(s);
    const auto [images, texts] = step_batch(cfg, B, s, 50, 7);
    const StepReport r1 = t1.step(images.cview(), texts.cview());
    const StepReport rd = td.step(rows(images, me * n, n), rows(texts, me * n, n));
    const StepReport rv = tv.step(rows(images, me * n, n), rows(texts, me * n, n));
    CHECK(std::abs(rd.loss.total - r1.loss.total) <= 1e-10 * std::abs(r1.loss.total));
    CHECK(std::abs(rd.grad_norm - r1.grad_norm) <= 1e-10 * r1.grad_norm);
    CHECK(rv.loss.total == rd.loss.total);
    CHECK(rv.grad_norm == rd.grad_norm);
  }
  // The device sum adds in the staged sum's order: the same parameters to the bit.
  {
    const Tensor<double> staged = to_host(dp.params().values()), on_device = to_host(dd.params().values());
    index_t differ = 0;
    for (index_t i = 0; i < staged.numel(); ++i) differ += staged[i] != on_device[i];
    CHECK(differ == 0);
  }
  const Tensor<double> a = to_host(dp.params().values()), b = to_host(one.params().values());
  double d = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a[i] - b[i])), scale = std::max(scale, std::abs(b[i]));
  CHECK(d <= 1e-10 * scale);
  // Every rank holds the same bits.
  double mine = 0;
  for (index_t i = 0; i < a.numel(); ++i) mine += a[i] * static_cast<double>(i % 7 + 1);
  std::vector<double> all(static_cast<std::size_t>(P));
  dist::all_gather(comm, std::span<const double>(&mine, 1), std::span<double>(all));
  for (double x : all) CHECK(x == all[0]);
}

TEST_CASE("expert parallel training of a device model: losses, routing and the whole state equal one process's") {
  // Experts in 2 parts over the ranks (rank r holds part r % 2): the rows cross between the emulated devices
  // through host copies and MPI (moe/expert_parallel.hpp), and the shards' gradients are summed over their
  // replicas only. Clipping is active, so the norm must be the whole model's. A second copy does the same
  // through a communicator of device memory (sum_gradients_with: as NcclComm would), blocks and gradient
  // segments never staged on the host.
  MpiComm comm(MPI_COMM_WORLD);
  const int P = comm.size(), me = comm.rank(), parts = 2;
  if (P % parts != 0) return;
  const index_t n = 2, B = n * P;
  const ModelConfig cfg = config();
  TrainConfig tc;
  tc.steps = 10, tc.warmup_steps = 1;
  tc.adam.lr = 3e-3, tc.adam.clip_norm = 0.05;
  DevModel one(cfg), ep(cfg, ConfigRouter{}, ExpertShard{me % parts, parts}), epd(cfg, ConfigRouter{}, ExpertShard{me % parts, parts});
  for (DevModel* m : {&one, &ep, &epd}) m->init(9), m->set_noise_seed(5);
  Trainer<DevModel> t1(one, tc);
  Trainer<DevModel, MpiComm> te(ep, tc, MpiComm(MPI_COMM_WORLD));
  Trainer<DevModel, MpiComm> td(epd, tc, MpiComm(MPI_COMM_WORLD));
  DeviceMpi dev(MpiComm(MPI_COMM_WORLD));
  const auto moved = dev.moved();
  td.sum_gradients_with(std::move(dev));
  CHECK(epd.expert_blocks_on_device());
  CHECK_FALSE(ep.expert_blocks_on_device());
  for (int s = 0; s < 2; ++s) {
    CAPTURE(s);
    const auto [images, texts] = step_batch(cfg, B, s, 70, 5);
    const StepReport r1 = t1.step(images.cview(), texts.cview());
    const StepReport re = te.step(rows(images, me * n, n), rows(texts, me * n, n));
    const std::size_t before = *moved;
    const StepReport rd = td.step(rows(images, me * n, n), rows(texts, me * n, n));
    // The whole tensors' gradient sums went over the device communicator (with 2 parts on 2 ranks each shard
    // has no replica to be summed with), and the blocks, checked below.
    CHECK(*moved > before);
    CHECK(std::abs(re.loss.total - r1.loss.total) <= 1e-10 * std::abs(r1.loss.total));
    CHECK(std::abs(re.grad_norm - r1.grad_norm) <= 1e-10 * r1.grad_norm);
    CHECK(std::abs(rd.loss.total - r1.loss.total) <= 1e-10 * std::abs(r1.loss.total));
    CHECK(std::abs(rd.grad_norm - r1.grad_norm) <= 1e-10 * r1.grad_norm);
    CHECK(rd.routing.size() == re.routing.size());
    for (std::size_t b = 0; b < std::min(rd.routing.size(), re.routing.size()); ++b) {
      CHECK(rd.routing[b].routed == re.routing[b].routed);
      CHECK(rd.routing[b].dropped == re.routing[b].dropped);
    }
    CHECK(r1.grad_norm > tc.adam.clip_norm);
    // The merged routing statistics are the whole batch's: the same choices reached the same experts.
    REQUIRE(re.routing.size() == r1.routing.size());
    index_t dropped = 0;
    for (std::size_t b = 0; b < r1.routing.size(); ++b) {
      CHECK(re.routing[b].routed == r1.routing[b].routed);
      CHECK(re.routing[b].dropped == r1.routing[b].dropped);
      for (int m = 0; m < 2; ++m)
        for (index_t d : r1.routing[b].dropped[m]) dropped += d;
    }
    CHECK(dropped > 0);  // capacity 1.0 over groups of one pair: the comparison covers drops
  }
  // The whole state, gathered from the device shards, is one process's.
  std::vector<double> values, m, v;
  te.gather_whole_state(values, m, v);
  const index_t N = one.params().size();
  REQUIRE(values.size() == static_cast<std::size_t>(N));
  const Tensor<double> want_v = to_host(one.params().values()), want_m = to_host(t1.optimizer().m().cview()),
                       want_s = to_host(t1.optimizer().v().cview());
  auto rel = [&](const std::vector<double>& got, const double* want) {
    double d = 0, scale = 1e-3;
    for (index_t i = 0; i < N; ++i)
      d = std::max(d, std::abs(got[static_cast<std::size_t>(i)] - want[i])), scale = std::max(scale, std::abs(want[i]));
    return d / scale;
  };
  CHECK(rel(values, want_v.data()) < 1e-10);
  CHECK(rel(m, want_m.data()) < 1e-10);
  CHECK(rel(v, want_s.data()) < 1e-8);
  // A forward moves the expert blocks over the device communicator (it sums no gradient), the staged model's none.
  {
    const auto [images, texts] = step_batch(cfg, B, 9, 70, 5);
    const std::size_t before = *moved;
    epd.forward(rows(images, me * n, n), rows(texts, me * n, n), Mode::Eval);
    CHECK(*moved > before);
    const std::size_t after = *moved;
    ep.forward(rows(images, me * n, n), rows(texts, me * n, n), Mode::Eval);
    CHECK(*moved == after);
  }
  // The device path sums in the staged path's rank order; only the norm's double sum is taken in another order.
  std::vector<double> dvalues, dm, dv;
  td.gather_whole_state(dvalues, dm, dv);
  REQUIRE(dvalues.size() == static_cast<std::size_t>(N));
  CHECK(rel(dvalues, values.data()) < 1e-13);
  CHECK(rel(dm, m.data()) < 1e-13);
  CHECK(rel(dv, v.data()) < 1e-12);
}

int main(int argc, char** argv) {
  dist::MpiSession mpi(&argc, &argv);
  set_num_threads(1);
  try {
    MpiComm comm(MPI_COMM_WORLD);
    doctest::Context ctx(argc, argv);
    if (comm.rank() != 0) ctx.setOption("out", "/dev/null");
    const int rc = ctx.run();
    return dist::all_reduce_max(comm, rc);
  } catch (const std::exception& e) {
    dist::MpiSession::abort(e.what());
  }
}
