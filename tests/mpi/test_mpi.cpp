// Many processes over MPI (run by CTest under mpirun with 2 and 4 ranks): the collectives against sums written
// out in rank order, and data-parallel training against one process stepping on the whole batch.
//
// Own main: MPI is initialised before doctest runs and finalised after. Assertions are CHECKs (never REQUIRE),
// so a failing rank still enters every collective the others enter; an exception ends all ranks through
// MpiSession::abort. `--throw-on-rank R` makes rank R fail before a collective, `--throw-in-backward R` in the
// middle of a backward pass whose gradient is being summed on another thread (the fail-fast tests).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <limoe/dist/mpi.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/model/model.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/train/optimizer.hpp>
#include <limoe/train/trainer.hpp>

#include "shard.hpp"

using namespace limoe;
using dist::MpiComm;

namespace {

MpiComm world() { return MpiComm(MPI_COMM_WORLD); }

// A value every rank can compute for any rank: rank r's element i. Not inlined, so the compiler cannot fuse its
// product into the reference sums below (a fused multiply-add would round differently from the collective).
[[gnu::noinline]] double value_of(int r, std::size_t i) { return std::sin(1.7 * static_cast<double>(r) + 0.3 * static_cast<double>(i)) * std::pow(10.0, r % 3); }

ModelConfig small_config(int top_k, int group_pairs) {
  ModelConfig c = preset("tiny");
  c.vocab_size = 40;
  c.text_len = 6;
  c.moe_blocks = {0, 1};
  c.experts = 4;
  c.top_k = top_k;
  c.text_mask = true;
  c.pool_txt = Pooling::Gap;
  c.router.capacity_factor_train = 1.0;  // drops happen: capacity must be decided per group exactly as in one process
  c.group_pairs = group_pairs;
  c.validate();
  return c;
}

struct Batch {
  Tensor<double> images;        // [B, 28, 28, 1]
  Tensor<std::int32_t> texts;   // [B, T]
};
Batch make_batch(const ModelConfig& c, index_t B, std::uint64_t seed) {
  const Rng rng(seed);
  Batch b{Tensor<double>(Shape{B, c.image_size[0], c.image_size[1], c.channels}), Tensor<std::int32_t>(Shape{B, c.text_len})};
  for (index_t i = 0; i < b.images.numel(); ++i) b.images[i] = std::tanh(rng.normal(0, static_cast<std::uint64_t>(i)));
  for (index_t p = 0; p < B; ++p) {
    const index_t len = 2 + p % (c.text_len - 1);
    for (index_t t = 0; t < c.text_len; ++t)
      b.texts[p * c.text_len + t] = t < len ? 1 + static_cast<std::int32_t>(rng.bits(1, static_cast<std::uint64_t>(p * 64 + t))[0] % static_cast<std::uint32_t>(c.vocab_size - 1)) : 0;
  }
  return b;
}
// Three short steps; `clip` the global-norm bound.
TrainConfig three_steps(double clip) {
  TrainConfig tc;
  tc.steps = 3;
  tc.warmup_steps = 1;
  tc.adam.lr = 3e-3;
  tc.adam.clip_norm = clip;
  return tc;
}
void same_start(std::initializer_list<Limoe<double>*> models) {
  for (auto* m : models) {
    m->init(9);
    m->set_noise_seed(5);
  }
}

using testing::rows;

// A model whose backward fails on one rank after its first parts went to the gradient-sum thread (the fail-fast
// test of the overlapped sum: the failing rank must end the job, not wait for buckets it never sends).
struct FailingBackward : Limoe<double> {
  using Limoe<double>::Limoe;
  int fail_rank = -1, rank = 0;
  void backward(const ForwardOutput<double>& fwd, const GradsFinal& on_final = {}) {
    int reports = 0;
    Limoe<double>::backward(fwd, [&](index_t first) {
      if (on_final) on_final(first);
      if (rank == fail_rank && ++reports == 2) fail("injected failure in backward");
    });
  }
};

// Relative to the reference tensor's largest entry; gradients that are zero in exact arithmetic (the key bias:
// softmax ignores a shift shared by all keys) are rounding noise, compared on an absolute floor of 1e-13.
double max_rel_diff(CView<double> a, CView<double> b) {
  double scale = 1e-3, d = 0;
  for (index_t i = 0; i < a.numel(); ++i) scale = std::max(scale, std::abs(b[i]));
  for (index_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d / scale;
}

}  // namespace

TEST_CASE("collectives: the sum is added in rank order and equal on every rank; gather, broadcast, split") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{1000}}) {
    std::vector<double> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = value_of(me, i);
    dist::all_reduce_sum(comm, std::span<double>(v));
    int exact = 1;
    for (std::size_t i = 0; i < n; ++i) {
      double want = value_of(0, i);
      for (int r = 1; r < P; ++r) want += value_of(r, i);
      exact &= v[i] == want;  // the same additions in the same order: bitwise
    }
    CHECK_MESSAGE(exact, "n = ", n);
    std::vector<float> f(n);
    for (std::size_t i = 0; i < n; ++i) f[i] = static_cast<float>(value_of(me, i));
    dist::all_reduce_sum(comm, std::span<float>(f));
    float want0 = static_cast<float>(value_of(0, n - 1));
    for (int r = 1; r < P; ++r) want0 += static_cast<float>(value_of(r, n - 1));
    CHECK(f[n - 1] == want0);
  }
  std::vector<std::int32_t> all(static_cast<std::size_t>(2 * P));
  const std::int32_t mine[2] = {me, 10 * me};
  dist::all_gather(comm, std::span<const std::int32_t>(mine, 2), std::span<std::int32_t>(all));
  for (int r = 0; r < P; ++r) CHECK((all[2 * r] == r && all[2 * r + 1] == 10 * r));
  std::vector<double> b{me == P - 1 ? 3.5 : 0.0, me == P - 1 ? -1.0 : 0.0};
  dist::broadcast(comm, std::span<double>(b), P - 1);
  CHECK((b[0] == 3.5 && b[1] == -1.0));
  MpiComm half = comm.split(me % 2, me);
  CHECK(half.size() == (P + 1 - me % 2) / 2);
  CHECK(half.rank() == me / 2);
  CHECK(dist::all_reduce_max(comm, me) == P - 1);
  CHECK_THROWS_WITH_AS(comm.broadcast_bytes(b.data(), 8, P), doctest::Contains("is not a rank"), Error);
}

TEST_CASE("data parallel: losses, routes and every parameter gradient equal one process on the whole batch") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  const index_t B = 8, n = B / P;
  for (int top_k : {1, 2}) {
    // group_pairs = 2 on any rank count, and 0 (each rank's shard one group) against groups of n in one process.
    for (int gp : {2, 0}) {
      CAPTURE(top_k);
      CAPTURE(gp);
      const ModelConfig cfg = small_config(top_k, gp);
      ModelConfig one_cfg = cfg;
      if (gp == 0) one_cfg.group_pairs = static_cast<int>(n);
      const Batch batch = make_batch(cfg, B, 11);
      const std::uint64_t step = 5;

      Limoe<double> one(one_cfg);  // one process, the whole batch
      one.init(3);
      one.set_noise_seed(77);
      one.zero_grad();
      const auto f1 = one.forward(batch.images.cview(), batch.texts.cview(), Mode::Train, step);
      const LossOutput l1 = one.loss(f1);
      one.backward(f1);

      Limoe<double> dp(cfg);  // this rank's shard
      dp.init(3);
      dp.set_noise_seed(77);
      dp.zero_grad();
      const index_t first = me * n;
      const auto fd = dp.forward(rows(batch.images, first, n), rows(batch.texts, first, n), Mode::Train, step,
                                 std::nullopt, BatchShard{first});
      const index_t Pd = cfg.proj_dim;
      Tensor<double> img_all(Shape{B, Pd}), txt_all(Shape{B, Pd});
      dist::all_gather(comm, std::span<const double>(fd.img_emb.data(), n * Pd), std::span<double>(img_all.data(), B * Pd));
      dist::all_gather(comm, std::span<const double>(fd.txt_emb.data(), n * Pd), std::span<double>(txt_all.data(), B * Pd));
      LossOutput ld = dp.loss(fd, img_all.cview(), txt_all.cview(), first, P);
      const double aux = dist::all_reduce_sum(comm, ld.aux) / P;
      dp.backward(fd);
      dist::all_reduce_sum(comm, std::span<double>(dp.params().grads().data(), static_cast<std::size_t>(dp.params().size())));

      CHECK(std::abs(ld.contrastive - l1.contrastive) <= 1e-12 * std::abs(l1.contrastive));
      CHECK(std::abs(aux - l1.aux) <= 1e-12 * std::abs(l1.aux) + 1e-15);
      CHECK(l1.aux > 0);
      // Routes: this rank's rows of the whole batch's (images [B, N] then texts [B, T] in one process).
      const index_t N = cfg.num_patches(), L = cfg.text_len, K = top_k;
      REQUIRE(f1.routes.size() == fd.routes.size());
      int drops = 0, same = 1;
      for (std::size_t b = 0; b < f1.routes.size(); ++b) {
        const auto& r1 = f1.routes[b];
        const auto& rd = fd.routes[b];
        for (index_t t = 0; t < n * N * K; ++t) same &= rd[t] == r1[first * N * K + t];
        for (index_t t = 0; t < n * L * K; ++t) same &= rd[n * N * K + t] == r1[(B * N + first * L) * K + t];
        for (index_t t = 0; t < r1.numel(); ++t) drops += r1[t] < 0;
      }
      CHECK(same);
      CHECK(drops > 0);  // capacity bound: the comparison covers dropped choices
      // Every parameter gradient (each tensor on its own scale).
      for (const auto& e : one.params().entries()) {
        const auto r = one.params().get(e.name);
        const double d = max_rel_diff(dp.params().grad(r), one.params().grad(r));
        CHECK_MESSAGE(d < 1e-10, e.name, ": max relative difference ", d);
      }
    }
  }
}

TEST_CASE("data parallel training: a few steps on every rank end with one process's parameters") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  const index_t B = 8, n = B / P;
  const ModelConfig cfg = small_config(1, 1);
  const TrainConfig tc = three_steps(1.0);
  Limoe<double> one(cfg), dp(cfg);
  same_start({&one, &dp});
  Trainer<Limoe<double>> t1(one, tc);
  Trainer<Limoe<double>, MpiComm> td(dp, tc, world());
  for (int s = 0; s < 3; ++s) {
    const Batch batch = make_batch(cfg, B, 100 + static_cast<std::uint64_t>(s));
    const StepReport r1 = t1.step(batch.images.cview(), batch.texts.cview());
    const StepReport rd = td.step(rows(batch.images, me * n, n), rows(batch.texts, me * n, n));
    CHECK(std::abs(rd.loss.total - r1.loss.total) <= 1e-10 * std::abs(r1.loss.total));
    CHECK(std::abs(rd.grad_norm - r1.grad_norm) <= 1e-10 * r1.grad_norm);
    // The merged routing statistics are the whole batch's.
    REQUIRE(rd.routing.size() == r1.routing.size());
    for (std::size_t b = 0; b < r1.routing.size(); ++b) {
      CHECK(rd.routing[b].tokens == r1.routing[b].tokens);
      CHECK(rd.routing[b].routed == r1.routing[b].routed);
      CHECK(rd.routing[b].dropped == r1.routing[b].dropped);
      CHECK(std::abs(rd.routing[b].global_entropy[1] - r1.routing[b].global_entropy[1]) < 1e-12);
      CHECK(std::abs(rd.routing[b].local_entropy[0] - r1.routing[b].local_entropy[0]) < 1e-12);
    }
    CHECK(td.comm_seconds() > 0);
  }
  CHECK(max_rel_diff(dp.params().values(), one.params().values()) < 1e-10);
  // Every rank holds the same bits.
  std::vector<double> sums(static_cast<std::size_t>(P));
  double mine = 0;
  for (index_t i = 0; i < dp.params().size(); ++i) mine += dp.params().values()[i] * static_cast<double>(i % 7 + 1);
  dist::all_gather(comm, std::span<const double>(&mine, 1), std::span<double>(sums));
  for (double s : sums) CHECK(s == sums[0]);
  // A shard of another size on one rank is an error on every rank, not a hang.
  if (P > 1) {
    const Batch batch = make_batch(cfg, B, 7);
    const index_t mine_n = me == 0 ? n - 1 : n;
    CHECK_THROWS_WITH_AS(td.step(rows(batch.images, 0, mine_n), rows(batch.texts, 0, mine_n)),
                         doctest::Contains("shard of the same size"), Error);
    // Texts missing rows on one rank: an error on every rank before any collective of the step.
    const index_t texts_n = me == P - 1 ? n - 1 : n;
    CHECK_THROWS_WITH_AS(td.step(rows(batch.images, 0, n), rows(batch.texts, 0, texts_n)),
                         doctest::Contains("n images and their n texts"), Error);
  }
}

TEST_CASE("data parallel: the gradient summed during backward gives the same bits as summed after it") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  const index_t B = 8, n = B / P;
  const ModelConfig cfg = small_config(2, 1);
  TrainConfig after = three_steps(1.0), during = three_steps(1.0);
  after.overlap_grad_sum = false;
  Limoe<double> a(cfg), d(cfg);
  same_start({&a, &d});
  Trainer<Limoe<double>, MpiComm> ta(a, after, world()), td(d, during, world());
  CHECK_FALSE(ta.overlaps_grad_sum());
  REQUIRE(comm.calls_from_any_thread());  // MpiSession asks for MPI_THREAD_SERIALIZED
  CHECK(td.overlaps_grad_sum() == (P > 1));
  td.set_overlap_min_bucket(1);  // a bucket per part backward reports: the tiny model's store in several pieces
  for (int s = 0; s < 3; ++s) {
    const Batch batch = make_batch(cfg, B, 300 + static_cast<std::uint64_t>(s));
    const StepReport ra = ta.step(rows(batch.images, me * n, n), rows(batch.texts, me * n, n));
    const StepReport rd = td.step(rows(batch.images, me * n, n), rows(batch.texts, me * n, n));
    CHECK(rd.loss.total == ra.loss.total);
    CHECK(rd.grad_norm == ra.grad_norm);
    if (P > 1) CHECK(td.overlapped_comm_seconds() > 0);
    CHECK(ta.overlapped_comm_seconds() == 0);
  }
  index_t differ = 0;
  for (index_t i = 0; i < a.params().size(); ++i) differ += a.params().values()[i] != d.params().values()[i];
  CHECK_MESSAGE(differ == 0, differ, " parameters differ between the overlapped and the after-backward sums");
}

namespace {
// The expert layouts a job of P ranks can take: E parts of the experts (E divides P and the 4 experts).
std::vector<int> expert_layouts(int P) {
  std::vector<int> v;
  for (int E : {2, 4})
    if (P % E == 0) v.push_back(E);
  return v;
}
// rank's slice of a whole tensor's flat values for an entry (the part it holds), or all of it.
template <class Store>
std::vector<double> part_of(const Store& whole, const typename Store::Entry& local) {
  const auto v = whole.grad(whole.get(local.name));
  const index_t n = local.shape.numel(), first = local.shard * n;
  return std::vector<double>(v.data() + first, v.data() + first + n);
}
}  // namespace

TEST_CASE("expert parallel: routes, losses and every gradient (expert shards included) equal one process") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  const index_t B = 8, n = B / P;
  for (int E : expert_layouts(P)) {
    for (int top_k : {1, 2}) {
      CAPTURE(E);
      CAPTURE(top_k);
      const ModelConfig cfg = small_config(top_k, 1);
      const Batch batch = make_batch(cfg, B, 21);
      Limoe<double> one(cfg);
      one.init(4);
      one.set_noise_seed(8);
      one.zero_grad();
      const auto f1 = one.forward(batch.images.cview(), batch.texts.cview(), Mode::Train, 2);
      const LossOutput l1 = one.loss(f1);
      one.backward(f1);

      Limoe<double> ep(cfg, ConfigRouter{}, ExpertShard{me % E, E});
      ep.init(4);
      ep.set_noise_seed(8);
      ep.set_expert_comm(dist::AnyComm(comm.split(me / E, me)));
      MpiComm replicas = comm.split(me % E, me);  // the ranks holding the same experts
      ep.zero_grad();
      const index_t first = me * n;
      const auto fe = ep.forward(rows(batch.images, first, n), rows(batch.texts, first, n), Mode::Train, 2,
                                 std::nullopt, BatchShard{first});
      const index_t Pd = cfg.proj_dim;
      Tensor<double> img_all(Shape{B, Pd}), txt_all(Shape{B, Pd});
      dist::all_gather(comm, std::span<const double>(fe.img_emb.data(), n * Pd), std::span<double>(img_all.data(), B * Pd));
      dist::all_gather(comm, std::span<const double>(fe.txt_emb.data(), n * Pd), std::span<double>(txt_all.data(), B * Pd));
      const LossOutput le = ep.loss(fe, img_all.cview(), txt_all.cview(), first, P);
      const double aux = dist::all_reduce_sum(comm, le.aux) / P;
      ep.backward(fe);
      CHECK(std::abs(le.contrastive - l1.contrastive) <= 1e-12 * std::abs(l1.contrastive));
      CHECK(std::abs(aux - l1.aux) <= 1e-12 * std::abs(l1.aux));
      const index_t N = cfg.num_patches(), L = cfg.text_len, K = top_k;
      int same = 1, drops = 0;
      for (std::size_t b = 0; b < f1.routes.size(); ++b) {
        for (index_t t = 0; t < n * N * K; ++t) same &= fe.routes[b][t] == f1.routes[b][first * N * K + t];
        for (index_t t = 0; t < n * L * K; ++t) same &= fe.routes[b][n * N * K + t] == f1.routes[b][(B * N + first * L) * K + t];
        for (index_t t = 0; t < f1.routes[b].numel(); ++t) drops += f1.routes[b][t] < 0;
      }
      CHECK(same);
      CHECK(drops > 0);
      for (const auto& e : ep.params().entries()) {
        auto g = ep.params().grad(ep.params().get(e.name));
        if (e.shards > 1) dist::all_reduce_sum(replicas, std::span<double>(g.data(), static_cast<std::size_t>(g.numel())));
        else dist::all_reduce_sum(comm, std::span<double>(g.data(), static_cast<std::size_t>(g.numel())));
        const auto want = part_of(one.params(), e);
        CHECK_MESSAGE(max_rel_diff(CView<double>(g.data(), Shape{g.numel()}), CView<double>(want.data(), Shape{g.numel()})) < 1e-10,
                      e.name, " (part ", e.shard, " of ", e.shards, ")");
      }
    }
  }
}

TEST_CASE("expert parallel training: the whole state after three steps equals one process's; shards load a checkpoint") {
  MpiComm comm = world();
  const int P = comm.size(), me = comm.rank();
  const index_t B = 8, n = B / P;
  for (int E : expert_layouts(P)) {
    CAPTURE(E);
    const ModelConfig cfg = small_config(2, 1);
    const TrainConfig tc = three_steps(0.05);  // clipping active: the norm must be the whole model's
    Limoe<double> one(cfg), ep(cfg, ConfigRouter{}, ExpertShard{me % E, E});
    same_start({&one, &ep});
    Trainer<Limoe<double>> t1(one, tc);
    Trainer<Limoe<double>, MpiComm> te(ep, tc, world());
    for (int s = 0; s < 3; ++s) {
      const Batch batch = make_batch(cfg, B, 200 + static_cast<std::uint64_t>(s));
      const StepReport r1 = t1.step(batch.images.cview(), batch.texts.cview());
      const StepReport re = te.step(rows(batch.images, me * n, n), rows(batch.texts, me * n, n));
      CHECK(std::abs(re.loss.total - r1.loss.total) <= 1e-10 * std::abs(r1.loss.total));
      CHECK(std::abs(re.grad_norm - r1.grad_norm) <= 1e-10 * r1.grad_norm);
      CHECK(r1.grad_norm > tc.adam.clip_norm);
    }
    // A checkpoint holds the whole model: saving a part is refused (gather first).
    CHECK_THROWS_WITH_AS(save_checkpoint(ep, "/tmp/limoe_test_mpi_part.safetensors"),
                         doctest::Contains("gather the parts first"), Error);
    std::vector<double> values, m, v;
    te.gather_whole_state(values, m, v);
    REQUIRE(values.size() == static_cast<std::size_t>(one.params().size()));
    CHECK(max_rel_diff(CView<double>(values.data(), Shape{one.params().size()}), one.params().values()) < 1e-10);
    CHECK(max_rel_diff(CView<double>(m.data(), Shape{one.params().size()}), t1.optimizer().m().cview()) < 1e-10);
    CHECK(max_rel_diff(CView<double>(v.data(), Shape{one.params().size()}), t1.optimizer().v().cview()) < 1e-8);
    // A whole checkpoint (one process's) loads into the shards: each rank reads its part.
    if (me == 0) save_checkpoint(one, "/tmp/limoe_test_mpi_ep.safetensors", TrainState<double>{&t1.optimizer(), "{}"});
    std::vector<int> sync(1);
    dist::broadcast(comm, std::span<int>(sync));  // the file is written
    Limoe<double> again(cfg, ConfigRouter{}, ExpertShard{me % E, E});
    const auto reader = io::SafetensorsReader::open("/tmp/limoe_test_mpi_ep.safetensors");
    load_weights(again, reader);
    AdamW<double> opt(tc.adam, again.params());
    CHECK(load_optimizer(opt, reader));
    int exact = 1;
    for (const auto& e : again.params().entries()) {
      const auto got = again.params().value(again.params().get(e.name));
      const auto mine = ep.params().value(ep.params().get(e.name));
      for (index_t i = 0; i < got.numel(); ++i) exact &= got[i] == static_cast<double>(static_cast<float>(mine[i])) || std::abs(got[i] - mine[i]) < 1e-6;
    }
    CHECK(exact);
    CHECK(std::abs(opt.m()[opt.m().numel() - 1] - static_cast<double>(static_cast<float>(te.optimizer().m()[opt.m().numel() - 1]))) < 1e-9);
    dist::broadcast(comm, std::span<int>(sync));
  }
}

int main(int argc, char** argv) {
  dist::MpiSession mpi(&argc, &argv);
  set_num_threads(1);  // the ranks share the machine's cores
  int throw_on = -1, throw_in_backward = -1;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--throw-on-rank") == 0 && i + 1 < argc) throw_on = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--throw-in-backward") == 0 && i + 1 < argc) throw_in_backward = std::atoi(argv[++i]);
    else args.push_back(argv[i]);
  }
  try {
    MpiComm comm = world();
    if (throw_in_backward >= 0) {
      const ModelConfig cfg = small_config(1, 1);
      FailingBackward m(cfg);
      m.init(9);
      m.fail_rank = throw_in_backward, m.rank = comm.rank();
      Trainer<FailingBackward, MpiComm> t(m, three_steps(1.0), world());
      t.set_overlap_min_bucket(1);
      if (!t.overlaps_grad_sum()) fail("the trainer does not overlap its gradient sum");
      const Batch batch = make_batch(cfg, 2 * comm.size(), 1);
      t.step(rows(batch.images, 2 * comm.rank(), 2), rows(batch.texts, 2 * comm.rank(), 2));
      return 0;
    }
    if (throw_on >= 0) {
      if (comm.rank() == throw_on) fail("injected failure on this rank");
      std::vector<double> v(4, 1.0);
      dist::all_reduce_sum(comm, std::span<double>(v));  // the others wait here: the abort must end them
      return 0;
    }
    doctest::Context ctx(static_cast<int>(args.size()), args.data());
    if (comm.rank() != 0) ctx.setOption("out", "/dev/null");  // one report, rank 0's
    const int rc = ctx.run();
    const int worst = dist::all_reduce_max(comm, rc);  // any rank's failure fails the test
    return worst;
  } catch (const std::exception& e) {
    dist::MpiSession::abort(e.what());
  }
}
