// limoe/train/trainer.hpp: one training step (forward, contrastive + auxiliary losses, backward, AdamW) and the
// metrics it reports (semantics §4-6).
//
//   limoe::Trainer<limoe::Limoe<float>> trainer(model, {.steps = 1000});
//   for (...) { auto r = trainer.step(batch.images.cview(), batch.texts.cview()); }
//
// The step number drives the learning-rate schedule and the router noise, so a run resumed from a checkpoint
// at step s (weights, AdamW moments, data position) continues the same loss curve.
//
// Data parallel (docs/distributed.md): with a communicator of N ranks, `step` takes this rank's shard of the
// step's batch (pairs [rank * n, (rank + 1) * n) of N * n; every rank the same n). The embeddings are gathered
// so the contrastive loss is the whole batch's, the flat gradient is summed over ranks in fixed-size buckets in
// rank order (dist::all_reduce_sum), and every rank applies the same update: the parameters stay identical on
// every rank, and equal (within float rounding) those of one process stepping on the whole batch with routing
// groups that do not span ranks (ModelConfig::group_pairs dividing n, or 0: each shard one group).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/dist/background_sum.hpp"
#include "limoe/dist/comm.hpp"
#include "limoe/dist/device_sum.hpp"
#include "limoe/model/model.hpp"
#include "limoe/train/optimizer.hpp"

namespace limoe {

struct TrainConfig {
  std::int64_t steps = 1000;
  AdamWConfig adam{};
  std::int64_t warmup_steps = 100;
  Decay decay = Decay::Cosine;
  double final_lr_fraction = 0.0;
  // Data parallel, host model, no expert shards: sum the gradient's buckets over the ranks on a thread of their
  // own as backward finishes them (dist/background_sum.hpp), instead of all of it after backward. The same bits
  // either way; needs a communicator callable from any thread (MPI_THREAD_SERIALIZED), else it is not used.
  bool overlap_grad_sum = true;
};

// What one step reports. `routing` and `aux_terms` are per MoE block (in block order).
struct StepReport {
  std::int64_t step = 0;  // the step just taken (1-based count of updates)
  LossOutput loss;
  double lr = 0, grad_norm = 0, seconds = 0;
  std::vector<int> moe_blocks;
  std::vector<moe::RoutingStats> routing;
  std::vector<moe::AuxLossValues> aux_terms;
};

// One JSON object per step for the metrics log: every loss term, and routing statistics per block and modality.
inline nlohmann::json to_json(const StepReport& r) {
  nlohmann::json blocks = nlohmann::json::array();
  for (std::size_t i = 0; i < r.routing.size(); ++i) {
    const auto& s = r.routing[i];
    const auto& a = r.aux_terms[i];
    nlohmann::json b = {{"block", r.moe_blocks[i]},
                        {"importance", a.importance},
                        {"load", a.load},
                        {"z", a.z},
                        {"capacity", s.capacity},
                        {"padding", s.padding},
                        {"image_share", s.image_share}};
    const char* names[2] = {"img", "txt"};
    for (int m = 0; m < 2; ++m) {
      b[names[m]] = {{"tokens", s.tokens[m]},
                     {"drop_fraction", s.drop_fraction[m]},
                     {"routed", s.routed[m]},
                     {"dropped", s.dropped[m]},
                     {"local_entropy", s.local_entropy[m]},
                     {"global_entropy", s.global_entropy[m]},
                     {"local_entropy_loss", a.local_entropy[m]},
                     {"global_entropy_loss", a.global_entropy[m]}};
    }
    blocks.push_back(b);
  }
  return {{"step", r.step},
          {"loss", r.loss.total},
          {"contrastive", r.loss.contrastive},
          {"aux", r.loss.aux},
          {"accuracy_i2t", r.loss.accuracy_i2t},
          {"accuracy_t2i", r.loss.accuracy_t2i},
          {"temperature", r.loss.scale},
          {"lr", r.lr},
          {"grad_norm", r.grad_norm},
          {"seconds", r.seconds},
          {"moe", blocks}};
}

// Routing statistics of every rank's shard merged into those of the whole batch (counts summed, means weighted
// by tokens, the global entropy of the merged mean gates); identical on every rank.
template <dist::HostCommunicator Comm>
void merge_routing_stats(Comm& comm, std::vector<moe::RoutingStats>& stats) {
  if (comm.size() == 1) return;
  std::vector<double> v;  // packed, in a fixed layout
  for (const auto& s : stats) {
    const std::size_t E = static_cast<std::size_t>(s.experts);
    v.push_back(static_cast<double>(s.groups));
    v.push_back(static_cast<double>(s.padding));
    for (int m = 0; m < moe::kModalities; ++m) {
      const double n = static_cast<double>(s.tokens[m]);
      v.push_back(n);
      v.push_back(static_cast<double>(s.tokens_fully_dropped[m]));
      v.push_back(s.local_entropy[m] * n);
      for (std::size_t e = 0; e < E; ++e) {
        v.push_back(static_cast<double>(s.routed[m][e]));
        v.push_back(static_cast<double>(s.dropped[m][e]));
        v.push_back(e < s.mean_gate[m].size() ? s.mean_gate[m][e] * n : 0.0);
      }
    }
  }
  dist::all_reduce_sum(comm, std::span<double>(v));
  std::size_t i = 0;
  for (auto& s : stats) {
    const std::size_t E = static_cast<std::size_t>(s.experts);
    s.groups = static_cast<index_t>(v[i++]);
    s.padding = static_cast<index_t>(v[i++]);
    for (int m = 0; m < moe::kModalities; ++m) {
      const double n = v[i++];
      s.tokens[m] = static_cast<index_t>(n);
      s.tokens_fully_dropped[m] = static_cast<index_t>(v[i++]);
      s.local_entropy[m] = n > 0 ? v[i] / n : 0.0;
      ++i;
      index_t dropped = 0;
      s.mean_gate[m].assign(E, 0.0);
      for (std::size_t e = 0; e < E; ++e) {
        s.routed[m][e] = static_cast<index_t>(v[i++]);
        s.dropped[m][e] = static_cast<index_t>(v[i++]);
        s.mean_gate[m][e] = n > 0 ? v[i] / n : 0.0;
        ++i;
        dropped += s.dropped[m][e];
      }
      s.drop_fraction[m] = n > 0 ? static_cast<double>(dropped) / (n * s.top_k) : 0.0;
      s.global_entropy[m] = n > 0 ? math::entropy(s.mean_gate[m].data(), static_cast<int>(E)) : 0.0;
    }
    for (std::size_t e = 0; e < E; ++e) {
      const index_t all = s.routed[0][e] + s.routed[1][e];
      s.image_share[e] = all > 0 ? static_cast<double>(s.routed[0][e]) / static_cast<double>(all) : 0.0;
    }
  }
}

// Comm: a communicator over host memory. A model on a device backend (Cuda) keeps its gradients and optimizer
// on the device (AdamW<T, S>); data parallel, its flat gradient is by default copied to the host, summed over
// the ranks exactly as a host model's, and copied back; after sum_gradients_with(NcclComm) it is summed on the
// device instead (dist::all_reduce_sum_in: the same algorithm and order, so the same bits, without the two
// copies). Expert parallel on a device: the expert exchange and the shards' gradient sums are staged through host
// memory as well (moe/expert_parallel.hpp), unless sum_gradients_with gave a device communicator: then the
// expert blocks move device to device over its expert-parallel group, and every gradient segment is summed on
// the device.
template <class Model, dist::HostCommunicator Comm = dist::SingleProcess>
class Trainer {
 public:
  using T = typename Model::scalar_type;
  using Space = typename Model::memory_space;
  // A host model that reports during backward where its gradient is final (Limoe::GradsFinal) can have it summed
  // over the ranks meanwhile (TrainConfig::overlap_grad_sum).
  static constexpr bool kCanOverlap =
      std::is_same_v<Space, HostSpace> &&
      requires(Model& m, const ForwardOutput<T>& f, const typename Model::GradsFinal& cb) { m.backward(f, cb); };
  // Gradient elements summed per all-reduce call (16 MiB of float): bounds the scratch the sum needs.
  static constexpr std::size_t kBucket = std::size_t{1} << 22;

  // Expert parallel (a model holding part p of E of the experts, Limoe's ExpertShard): rank r of the communicator
  // must hold part r % E; ranks r - r % E .. r - r % E + E - 1 form its expert-parallel group (the model gets
  // that communicator here), ranks with the same part its data-parallel group (they sum their expert gradients).
  Trainer(Model& model, TrainConfig cfg, Comm comm = Comm{}) : model_(model), cfg_(cfg), comm_(std::move(comm)) {
    LIMOE_CHECK(cfg_.steps >= 1, "TrainConfig: steps must be >= 1, got ", cfg_.steps);
    // 0 is allowed (a run that only measures: no parameter moves, weight decay included).
    LIMOE_CHECK(std::isfinite(cfg_.adam.lr) && cfg_.adam.lr >= 0,
                "TrainConfig: the learning rate (limoe train --lr) must be finite and >= 0, got ", cfg_.adam.lr);
    opt_ = AdamW<T, Space>(cfg_.adam, model_.params());
    sched_ = LrSchedule{cfg_.warmup_steps, cfg_.steps, cfg_.decay, cfg_.final_lr_fraction};
    if constexpr (requires { model.expert_shard(); }) {
      const int E = model_.expert_shard().count, rank = comm_.rank();
      if (E > 1) {
        LIMOE_CHECK(comm_.size() % E == 0, "Trainer: the model's experts are in ", E, " parts, but the communicator has ",
                    comm_.size(), " rank(s); the ranks must be a multiple of the parts");
        LIMOE_CHECK(model_.expert_shard().index == rank % E, "Trainer: rank ", rank, " must hold expert part ", rank % E,
                    " of ", E, ", the model holds part ", model_.expert_shard().index);
        model_.set_expert_comm(dist::AnyComm(comm_.split(rank / E, rank)));
        ep_comm_.emplace(comm_.split(rank / E, rank));
        dp_comm_.emplace(comm_.split(rank % E, rank));
        // The flat gradient's segments: whole tensors (summed over every rank) and expert shards (over the
        // ranks holding the same part).
        for (const auto& e : model_.params().entries())
          (e.shards > 1 ? sharded_ : whole_).push_back({e.offset, e.shape.numel()});
      }
    }
  }

  Trainer(const Trainer&) = delete;  // the gradient-sum thread holds on to comm_
  Trainer& operator=(const Trainer&) = delete;

  // Expert parallel: the whole model's parameters and AdamW moments, in the store's entry order with every
  // expert tensor whole (what a checkpoint holds). Collective over the trainer's communicator.
  // A device model's state is copied to the host first.
  void gather_whole_state(std::vector<T>& values, std::vector<T>& m, std::vector<T>& v) {
    const auto& ps = std::as_const(model_).params();
    if constexpr (std::is_same_v<Space, HostSpace>) {
      gather_whole_state_from(ps.values().data(), opt_.m().data(), opt_.v().data(), values, m, v);
    } else {
      const Tensor<T> hv = to_host(ps.values()), hm = to_host(opt_.m().cview()), hs = to_host(opt_.v().cview());
      gather_whole_state_from(hv.data(), hm.data(), hs.data(), values, m, v);
    }
  }

 private:
  // The whole state from this rank's flat values and moments (host memory, the store's layout).
  void gather_whole_state_from(const T* pv, const T* pm, const T* ps_, std::vector<T>& values, std::vector<T>& m,
                               std::vector<T>& v) {
    const auto& ps = std::as_const(model_).params();
    values.clear(), m.clear(), v.clear();
    std::vector<T> whole;
    for (const auto& e : ps.entries()) {
      const index_t n = e.shape.numel();
      for (auto [src, dst] : {std::pair<const T*, std::vector<T>*>{pv, &values}, {pm, &m}, {ps_, &v}}) {
        if (e.shards == 1) {
          dst->insert(dst->end(), src + e.offset, src + e.offset + n);
          continue;
        }
        LIMOE_CHECK(ep_comm_.has_value(), "Trainer::gather_whole_state: sharded experts without their group");
        whole.resize(static_cast<std::size_t>(n * e.shards));
        dist::all_gather(*ep_comm_, std::span<const T>(src + e.offset, static_cast<std::size_t>(n)), std::span<T>(whole));
        dst->insert(dst->end(), whole.begin(), whole.end());
      }
    }
  }

 public:
  // A device model: its flat gradient is summed over the ranks through `grad_comm`, a communicator over the
  // model's memory space (dist::NcclComm for CudaSpace) joining the same ranks in the same order as the
  // trainer's, on the device, bucket by bucket, in rank order (dist/device_sum.hpp). Without it the sum is
  // staged through host memory. Embeddings, losses and statistics still go through the trainer's communicator.
  // Expert parallel, `grad_comm` is split as the trainer's communicator is: the model's expert blocks move over
  // its expert-parallel group (Limoe::set_expert_blocks_comm), each expert shard's gradient is summed over its
  // replicas, the whole tensors over every rank, all on the device. Collective over both communicators.
  template <class GradComm>
    requires dist::CommunicatorIn<GradComm, Space>
  void sum_gradients_with(GradComm grad_comm) {
    static_assert(!std::is_same_v<Space, HostSpace>, "Trainer::sum_gradients_with: a host model's gradient is "
                  "summed through the trainer's own communicator");
    // Every rank checks and all agree (over the trainer's communicator) before any rank goes on: a mismatch on
    // one rank is an error on every rank, never a rank left waiting in the next collective.
    const bool same = grad_comm.size() == comm_.size() && grad_comm.rank() == comm_.rank();
    const bool all_same = dist::all_reduce_max(comm_, same ? 0 : 1) == 0;
    LIMOE_CHECK(all_same, "Trainer::sum_gradients_with: the gradient communicator is rank ", grad_comm.rank(), " of ",
                grad_comm.size(), ", the trainer's rank ", comm_.rank(), " of ", comm_.size(),
                same ? " here, but not on another rank" : "", "; both must join the same ranks in the same order");
    auto comm = std::make_shared<GradComm>(std::move(grad_comm));  // shared: std::function copies its target
    if (!dp_comm_) {
      device_sum_ = [comm](View<T, Space> g, Tensor<T, Space>& scratch, std::optional<double>&) {
        for_each_bucket(g.numel(), [&](index_t i, index_t len) {
          dist::all_reduce_sum_in(*comm, View<T, Space>(g.data() + i, Shape{len}), scratch, add_on_device);
        });
      };
      return;
    }
    if constexpr (requires(Model& m, dist::BasicAnyComm<Space> c) { m.set_expert_blocks_comm(std::move(c)); }) {
      const int E = model_.expert_shard().count, rank = comm_.rank();
      model_.set_expert_blocks_comm(dist::BasicAnyComm<Space>(comm->split(rank / E, rank)));
      auto dp = std::make_shared<GradComm>(comm->split(rank % E, rank));
      // The trainer outlives its sum (a member), and is neither copied nor moved: `this` stays valid.
      device_sum_ = [this, comm, dp](View<T, Space> g, Tensor<T, Space>& scratch, std::optional<double>& grad_norm) {
        const auto sum_over = [&scratch](GradComm& c) {
          return [&c, &scratch](View<T, Space> pack) { dist::all_reduce_sum_in(c, pack, scratch, add_on_device); };
        };
        grad_norm = sum_expert_parallel<Space>(g, device_pack_, sum_over(*comm), sum_over(*dp));
      };
    } else {
      fail("Trainer::sum_gradients_with: this model holds a part of the experts but cannot take a device "
           "communicator for them");
    }
  }
  bool sums_gradients_on_device() const { return static_cast<bool>(device_sum_); }

  AdamW<T, Space>& optimizer() { return opt_; }
  Comm& comm() { return comm_; }
  // Seconds the last step spent in collectives (gathering embeddings, summing gradients and statistics) on the
  // calling thread: with the gradient sum overlapped, only the wait for what backward did not hide.
  double comm_seconds() const { return comm_seconds_; }
  // Seconds the last step's gradient-sum thread spent summing (0 when the sum was not overlapped).
  double overlapped_comm_seconds() const { return overlapped_seconds_; }
  // Whether steps sum the gradient during the backward pass (TrainConfig::overlap_grad_sum, when it applies).
  bool overlaps_grad_sum() const {
    if constexpr (kCanOverlap)
      return cfg_.overlap_grad_sum && comm_.size() > 1 && !dp_comm_ && dist::calls_from_any_thread(comm_);
    else
      return false;
  }
  // Gradient elements per bucket of the overlapped sum: a bucket is sent once at least `min_elems` more are
  // final (or backward is over), cut into pieces of at most kBucket. Fewer, larger messages cost less latency.
  void set_overlap_min_bucket(std::size_t min_elems) { overlap_min_ = std::max<std::size_t>(1, min_elems); }
  const TrainConfig& config() const { return cfg_; }
  std::int64_t step_count() const { return opt_.step(); }
  double lr_at(std::int64_t step) const { return cfg_.adam.lr * sched_.factor(step); }

  // A loss that is not finite ends training, naming the likely cause: after updates the step size; before any
  // (step 0: the initial model) the inputs or the config (a loss weight or logit scale that overflows).
  static void check_finite(double loss, std::int64_t s) {
    LIMOE_CHECK(std::isfinite(loss), "training diverged at step ", s, " (loss ", loss, "); ",
                s == 0 ? "the initial model's loss is not finite, before any update: check the inputs and the "
                         "config's loss weights and logit scale"
                       : "lower the learning rate or raise the warmup");
  }

  // One update on a batch of n image-text pairs (images [n, H, W, C], texts [n, T]): the whole batch, or this
  // rank's shard of it under data parallelism. The images may be host data or, for a model on a device, already
  // in its memory (Limoe::forward).
  template <class IS = HostSpace>
  StepReport step(CView<T, IS> images, CView<std::int32_t> texts) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    comm_seconds_ = 0;
    overlapped_seconds_ = 0;
    const std::int64_t s = opt_.step();
    const int P = comm_.size(), rank = comm_.rank();
    model_.zero_grad();
    StepReport r;
    std::optional<double> grad_norm;  // given when the store holds a shard of the model
    if (P == 1) {
      const auto fwd = model_.forward(images, texts, Mode::Train, static_cast<std::uint64_t>(s));
      r.loss = model_.loss(fwd);
      check_finite(r.loss.total, s);
      model_.backward(fwd);
      fill_routing(r, fwd);
    } else {
      // Every rank checks its shard and all agree before any rank runs a collective of the step, so a bad shard
      // on one rank is an error on every rank, never a rank left waiting.
      const index_t n = images.empty() ? 0 : images.dim(0);
      const bool paired = n > 0 && texts.rank() == 2 && texts.dim(0) == n;
      auto tc = clock::now();
      const std::array<index_t, 2> mine{n, paired ? 0 : 1};  // every rank's (pairs, unpaired) in one gather
      std::vector<index_t> all(static_cast<std::size_t>(2 * P));
      dist::all_gather(comm_, std::span<const index_t>(mine), std::span<index_t>(all));
      comm_seconds_ += seconds_since(tc);
      index_t n_min = n, n_max = n, unpaired = 0;
      for (int p = 0; p < P; ++p) {
        n_min = std::min(n_min, all[static_cast<std::size_t>(2 * p)]);
        n_max = std::max(n_max, all[static_cast<std::size_t>(2 * p)]);
        unpaired += all[static_cast<std::size_t>(2 * p + 1)];
      }
      LIMOE_CHECK(!unpaired, "Trainer::step: every rank must step on n images and their n texts; ",
                  paired ? "another rank's shard is not" : "this rank's is not", " (images ", images.shape().str(),
                  ", texts ", texts.shape().str(), " here)");
      LIMOE_CHECK(n_min == n_max, "Trainer::step: every rank must step on a shard of the same size, got ",
                  n, " pairs here and shards of ", n_min, " to ", n_max, " pairs over the ", P, " ranks");
      const index_t first = static_cast<index_t>(rank) * n;
      const auto fwd = model_.forward(images, texts, Mode::Train, static_cast<std::uint64_t>(s), std::nullopt,
                                      BatchShard{first});
      const index_t Pd = fwd.img_emb.dim(1);
      img_all_.resize(Shape{n * P, Pd});  // [N * n, proj]
      txt_all_.resize(Shape{n * P, Pd});
      tc = clock::now();
      dist::all_gather(comm_, std::span<const T>(fwd.img_emb.data(), n * Pd), std::span<T>(img_all_.data(), n * P * Pd));
      dist::all_gather(comm_, std::span<const T>(fwd.txt_emb.data(), n * Pd), std::span<T>(txt_all_.data(), n * P * Pd));
      comm_seconds_ += seconds_since(tc);
      r.loss = model_.loss(fwd, img_all_.cview(), txt_all_.cview(), first, P);
      tc = clock::now();
      r.loss.aux = dist::all_reduce_sum(comm_, r.loss.aux) / P;  // the step's: the mean over ranks
      comm_seconds_ += seconds_since(tc);
      r.loss.total = r.loss.contrastive + r.loss.aux;
      check_finite(r.loss.total, s);
      fill_routing(r, fwd);
      tc = clock::now();
      reduce_aux_terms(r.aux_terms);
      merge_routing_stats(comm_, r.routing);
      comm_seconds_ += seconds_since(tc);
      if (overlaps_grad_sum()) {
        if constexpr (kCanOverlap) backward_summing(fwd);
      } else {
        model_.backward(fwd);
        tc = clock::now();
        if (device_sum_) {
          device_sum_(model_.params().grads(), device_scratch_, grad_norm);
        } else {
          sum_flat_gradient_on_host(grad_norm);
        }
        comm_seconds_ += seconds_since(tc);
      }
    }
    r.lr = lr_at(s);
    r.grad_norm = opt_.update(model_.params(), r.lr, grad_norm);
    r.step = opt_.step();
    r.seconds = seconds_since(t0);
    return r;
  }

 private:
  // Data parallel: the flat gradient summed over the ranks through host memory (the store's own, or a copy of
  // a device store's); with expert shards, the whole tensors over every rank and each shard over its replicas,
  // and grad_norm the whole model's.
  void sum_flat_gradient_on_host(std::optional<double>& grad_norm) {
    View<T> g;
    if constexpr (std::is_same_v<Space, HostSpace>) {
      g = model_.params().grads();
    } else {
      grad_host_.resize(Shape{model_.params().size()});
      copy_to_host<T, Space>(std::as_const(model_.params()).grads(), grad_host_.view());
      g = grad_host_.view();
    }
    if (!dp_comm_) {
      // The flat gradient, summed over ranks bucket by bucket.
      for_each_bucket(g.numel(), [&](index_t i, index_t len) {
        dist::all_reduce_sum(comm_, std::span<T>(g.data() + i, static_cast<std::size_t>(len)), scratch_);
      });
    } else {
      // Whole tensors over every rank; expert shards over the ranks holding the same part. The norm for
      // clipping is the whole model's: whole tensors once, every expert part once (summed over its group).
      const auto sum_over = [this](Comm& c) {
        return [&c, this](View<T> pack) { dist::all_reduce_sum(c, std::span<T>(pack.data(), static_cast<std::size_t>(pack.numel())), scratch_); };
      };
      grad_norm = sum_expert_parallel<HostSpace>(g, pack_, sum_over(comm_), sum_over(*dp_comm_));
    }
    if constexpr (!std::is_same_v<Space, HostSpace>) copy_from_host<T, Space>(grad_host_.cview(), model_.params().grads());
  }

  // Backward with the flat gradient summed over the ranks as it becomes final: each part the model reports final
  // goes to the sum thread once at least overlap_min_ elements are waiting (the rest when backward is over), in
  // the same order on every rank. The wait at the end is what the pass did not hide.
  template <class Fwd>
  void backward_summing(const Fwd& fwd) {
    if (!background_) background_ = std::make_unique<dist::BackgroundSum<Comm, T>>(comm_);
    const View<T> g = model_.params().grads();
    index_t queued = g.numel();  // [queued, size) is with the sum thread
    const auto send = [&](index_t first, bool last) {
      if (queued - first < static_cast<index_t>(overlap_min_) && !(last && first < queued)) return;
      for_each_bucket(queued - first, [&](index_t i, index_t len) {
        background_->push(std::span<T>(g.data() + first + i, static_cast<std::size_t>(len)));
      });
      queued = first;
    };
    model_.backward(fwd, [&](index_t first) { send(first, false); });
    send(0, true);
    const auto tc = std::chrono::steady_clock::now();
    background_->wait();
    comm_seconds_ += seconds_since(tc);
    overlapped_seconds_ = background_->take_busy_seconds();
  }

  // fn(first, count) for consecutive buckets of at most kBucket elements covering [0, n).
  template <class Fn>
  static void for_each_bucket(index_t n, Fn&& fn) {
    for (index_t i = 0; i < n; i += static_cast<index_t>(kBucket)) fn(i, std::min<index_t>(static_cast<index_t>(kBucket), n - i));
  }
  static double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }
  template <class Fwd>
  static void fill_routing(StepReport& r, const Fwd& fwd) {
    r.moe_blocks = fwd.route_blocks;
    r.routing = fwd.stats;
    r.aux_terms = fwd.aux_terms;
  }
  struct Segment {
    index_t offset, numel;
  };
  // Expert parallel: whole tensors summed by `sum_all` (over every rank), expert shards by `sum_replicas` (over
  // the ranks holding the same part); returns the whole model's gradient norm (every part once).
  template <class S, class SumAll, class SumReplicas>
  double sum_expert_parallel(View<T, S> g, Tensor<T, S>& pack, SumAll&& sum_all, SumReplicas&& sum_replicas) {
    const double sq_whole = reduce_segments<S>(whole_, g, pack, sum_all);
    const double sq_part = reduce_segments<S>(sharded_, g, pack, sum_replicas);
    return std::sqrt(sq_whole + dist::all_reduce_sum(*ep_comm_, sq_part));
  }
  // Sums the listed segments of g (memory of space S), packed into buckets of at most kBucket elements (one
  // sum(pack) per bucket: the sum over ranks, in place), and returns the sum of the summed segments' squares.
  template <class S, class Sum>
  static double reduce_segments(const std::vector<Segment>& segs, View<T, S> g, Tensor<T, S>& pack, Sum&& sum) {
    const auto bytes = [](index_t k) { return static_cast<std::size_t>(k) * sizeof(T); };
    double sq = 0;
    std::size_t k = 0;
    while (k < segs.size()) {
      const std::size_t k0 = k;
      index_t len = 0;
      while (k < segs.size() && (len == 0 || len + segs[k].numel <= static_cast<index_t>(kBucket))) len += segs[k++].numel;
      if (pack.numel() < len) pack.resize(Shape{len});
      index_t at = 0;
      for (std::size_t j = k0; j < k; ++j) S::copy(pack.data() + at, g.data() + segs[j].offset, bytes(segs[j].numel)), at += segs[j].numel;
      const View<T, S> p(pack.data(), Shape{len});
      sum(p);
      sq += sum_squares(CView<T, S>(p));
      at = 0;
      for (std::size_t j = k0; j < k; ++j) S::copy(g.data() + segs[j].offset, pack.data() + at, bytes(segs[j].numel)), at += segs[j].numel;
    }
    return sq;
  }
  static void add_on_device(CView<T, Space> x, View<T, Space> y) { Ops<typename Model::backend_type, T>::add_into(x, y); }

  // Every block's auxiliary loss terms: the mean over ranks (one sum for all blocks).
  void reduce_aux_terms(std::vector<moe::AuxLossValues>& terms) {
    std::vector<double> v;
    for (const auto& a : terms) {
      v.insert(v.end(), {a.total, a.importance, a.load, a.z});
      for (int m = 0; m < moe::kModalities; ++m) v.push_back(a.local_entropy[m]), v.push_back(a.global_entropy[m]);
    }
    dist::all_reduce_sum(comm_, std::span<double>(v));
    const double P = comm_.size();
    const double* x = v.data();
    for (auto& a : terms) {
      a.total = x[0] / P, a.importance = x[1] / P, a.load = x[2] / P, a.z = x[3] / P;
      for (int m = 0; m < moe::kModalities; ++m)
        a.local_entropy[m] = x[4 + 2 * m] / P, a.global_entropy[m] = x[5 + 2 * m] / P;
      x += 4 + 2 * moe::kModalities;
    }
  }

  Model& model_;
  TrainConfig cfg_;
  Comm comm_;
  double comm_seconds_ = 0, overlapped_seconds_ = 0;
  std::size_t overlap_min_ = std::size_t{1} << 18;  // 1 MiB of float
  Tensor<T> img_all_, txt_all_;
  Tensor<T> grad_host_;  // a device model's flat gradient, staged on the host for the sum over ranks
  // sum_gradients_with's sum on the device, and its scratch
  // (expert parallel: it also gives the whole model's gradient norm)
  std::function<void(View<T, Space>, Tensor<T, Space>&, std::optional<double>&)> device_sum_;
  Tensor<T, Space> device_scratch_, device_pack_;
  std::vector<T> scratch_;
  Tensor<T> pack_;
  // Expert parallel: the expert-parallel and data-parallel groups, and the gradient's segments.
  std::optional<Comm> ep_comm_, dp_comm_;
  std::vector<Segment> whole_, sharded_;
  AdamW<T, Space> opt_;
  LrSchedule sched_;
  // The overlapped gradient sum's thread (after comm_: it ends, finishing what was pushed, before comm_ goes).
  std::unique_ptr<dist::BackgroundSum<Comm, T>> background_;
};

}  // namespace limoe
