// limoe/model/model.hpp: the one-tower LIMoE model (semantics §1), forward and backward on any backend.
//
// A batch flows as ONE activation matrix X[R, D], R = Bi*N + Bt*T: all image tokens (image by image), then all
// text tokens (text by text). That is exactly the order in which the routers group tokens (section 3), so the
// LayerNorms, MLPs and MoE layers run once over all R rows, and image and text tokens of a training step share
// routing groups. Attention is per sequence: it sees the image rows as [Bi, N, D] and the text rows as
// [Bt, T, D]. Only the embeddings, the pooling heads and the projections are per modality.
//
// A two-tower config (ModelConfig::towers 2, dense blocks only) gives the text rows their own blocks and final
// LayerNorm: every row-wise op (LayerNorm, MLP) then runs once per tower on its rows, and the text attention uses
// the text tower's weights. Everything else (the one activation matrix, the heads, the loss) is unchanged.
//
// Template parameters are policies (what changes the code path); sizes are data in ModelConfig:
//   Limoe<T, Router, Losses, BackendT>: T scalar (float; double for gradient checks), Router a router policy,
//   Losses the auxiliary-loss set (moe/layer.hpp), BackendT the backend whose ops run (backend/backend.hpp: Cpu, the
//   default, Ref, the naive reference, or Cuda, backend/cuda.hpp; every op is called through Ops<BackendT, T>).
//
// Memory: parameters, gradients, activations and caches live in the backend's memory space (device memory for
// Cuda: the model never reads them on the host). Inputs, outputs and routing are host data: forward() copies the
// images and token ids in and the embeddings out (ForwardOutput holds host tensors), and the MoE layers route on
// the host over a copy of the router logits (moe/layer.hpp). The few other values that cross are scalars (the
// logit scale and its gradient).
//
// Gradient rule: backward() ACCUMULATES into the parameter gradients of params() (call zero_grad() first).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "limoe/backend/ops.hpp"
#include "limoe/core/amx.hpp"
#include "limoe/core/params.hpp"
#include "limoe/core/precision.hpp"
#include "limoe/core/profile.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/dist/comm.hpp"
#include "limoe/model/config.hpp"
#include "limoe/moe/moe.hpp"
#include "limoe/ops/ops.hpp"

namespace limoe {

using moe::Mode;

// Parameter handles of one attention layer (docs/cli.md `attn.{q,k,v,o}.{weight,bias}`).
struct AttnRefs {
  ParamRef q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
};
struct MlpRefs {
  ParamRef fc1_w, fc1_b, fc2_w, fc2_b;
};
struct BlockRefs {
  bool moe = false;
  ParamRef ln1_w, ln1_b, ln2_w, ln2_b;
  AttnRefs attn;
  MlpRefs mlp;                                             // dense block, or the experts [E, ...] of a MoE block
  ParamRef router;                                         // MoE block: [E, D]
};
struct HeadRefs {
  Pooling kind = Pooling::Gap;
  ParamRef probe, ln_w, ln_b, proj;
  AttnRefs attn;
  MlpRefs mlp;
};

// What one forward call computed. Embeddings are L2-normalised, [B, P_out].
template <class T>
struct ForwardOutput {
  Tensor<T> img_emb, txt_emb;  // [Bi, P], [Bt, P] (empty when that modality is absent)
  // Per MoE block (in moe_blocks order): the expert that accepted each choice, -1 where dropped, [R, K].
  std::vector<Tensor<std::int32_t>> routes;
  std::vector<int> route_blocks;                           // the block index of each entry of routes
  std::vector<moe::RoutingStats> stats;                    // per MoE block
  double aux_loss = 0;                                     // weighted, summed over MoE blocks
  std::vector<moe::AuxLossValues> aux_terms;               // per MoE block, unweighted terms
  // Which forward() call of its model produced this output (1, 2, ...): loss() and backward() accept only the
  // output of the model's last forward, whose activations the model still holds.
  std::uint64_t generation = 0;
  Mode mode = Mode::Eval;
};

struct LossOutput {
  double total = 0, contrastive = 0, aux = 0;
  double accuracy_i2t = 0, accuracy_t2i = 0, scale = 0;
};

// Where the pairs of one forward call sit in the whole batch of a training step: a data-parallel rank holds pairs
// [first_pair, first_pair + n) of it. The router noise of a token is drawn by its index in the whole batch, and
// routing groups of pairs (ModelConfig::group_pairs) start at the call's first pair, so a rank routes its
// tokens exactly as one process routes the same tokens of the whole batch.
struct BatchShard {
  index_t first_pair = 0;
};

// Expert parallelism: this model holds part `index` of `count` equal parts of every MoE block's experts (experts
// [index E / count, (index + 1) E / count)); its expert tensors are registered with that shape, under their usual
// names, as shards of the whole tensors (ParamStore::Entry::shard). The MoE blocks then exchange rows with the
// other parts over the communicator given to set_expert_comm (docs/distributed.md).
struct ExpertShard {
  int index = 0, count = 1;
};

// The router policy a model uses when none is given: the stock top-K router that the config describes
// (moe::visit_router: K = 1 and 2 compiled, other K at run time; BPR or vanilla order; Gaussian noise).
struct ConfigRouter {};

template <class T = float, class Router = ConfigRouter, class Losses = moe::DefaultAuxLosses, Backend BackendT = Cpu,
          PrecisionPolicy Precision = Fp32>
class Limoe {
 public:
  using scalar_type = T;
  using backend_type = BackendT;
  using precision_type = Precision;
  static_assert(!Precision::mixed || std::is_same_v<T, float>, "Limoe: the bf16 precision policy computes in float");
  // Parameters, gradients, activations, caches and the MoE layers' rows live in the backend's memory space
  // (device memory for Cuda); inputs and outputs (images, token ids, embeddings, routes, losses) are host data,
  // copied in and out. The routers and auxiliary losses run on the host over copies of the router logits.
  using memory_space = typename BackendT::memory_space;

 private:
  using S = memory_space;
  template <class U>
  using DTensor = Tensor<U, S>;

 public:

  // `router` is the router policy instance (ignored for ConfigRouter, which builds the stock router from the
  // config); its top_k() must equal the config's top_k.
  explicit Limoe(ModelConfig cfg, Router router = Router{}, ExpertShard experts = {})
      : Limoe(std::move(cfg), std::move(router), experts, true) {}

  // The parameters a config's model holds (every tensor's name, shape, offset and shard, in the store's order),
  // registered as the constructor does but without allocating their values: a checkpoint can be checked against
  // a large model's list (checkpoint.hpp's check_weights) in the memory of one tensor.
  static std::vector<typename ParamStore<T, memory_space>::Entry> parameter_entries(ModelConfig cfg,
                                                                                 ExpertShard experts = {}) {
    return Limoe(std::move(cfg), Router{}, experts, false).params_.entries();
  }

 private:
  Limoe(ModelConfig cfg, Router router, ExpertShard experts, bool allocate)
      : cfg_(std::move(cfg)), router_(std::move(router)), ep_(experts) {
    cfg_.validate();
    LIMOE_CHECK(ep_.count >= 1 && ep_.index >= 0 && ep_.index < ep_.count, "Limoe: expert shard ", ep_.index, " of ",
                ep_.count, " does not exist");
    LIMOE_CHECK(ep_.count == 1 || cfg_.experts % ep_.count == 0, "Limoe: ", cfg_.experts,
                " experts do not split into ", ep_.count, " equal expert-parallel parts");
    if constexpr (!std::is_same_v<Router, ConfigRouter>) {
      static_assert(moe::RouterPolicy<Router, T>, "Limoe<T, Router>: Router must satisfy moe::RouterPolicy");
      LIMOE_CHECK(router_.top_k() == cfg_.top_k, "Limoe: the router's top_k() = ", router_.top_k(),
                  " differs from the config's top_k = ", cfg_.top_k);
    }
    register_params();
    if (!allocate) return;
    params_.finalize();
    blocks_acts_.resize(static_cast<std::size_t>(cfg_.depth));
    moe_ctx_.resize(static_cast<std::size_t>(cfg_.depth));
  }

 public:

  const ModelConfig& config() const { return cfg_; }
  ParamStore<T, memory_space>& params() { return params_; }
  const ParamStore<T, memory_space>& params() const { return params_; }
  void zero_grad() {
    profile::Region<S> region("zero_grad");
    params_.zero_grad();
  }
  // The router noise of training step s is a function of (noise seed, s, block) only.
  void set_noise_seed(std::uint64_t seed) { noise_seed_ = seed; }
  const ExpertShard& expert_shard() const { return ep_; }
  // How many times the bf16 copy of the weights was made (Bf16Mixed: once per change of the parameters, i.e.
  // once per optimizer step in training; always 0 under Fp32).
  std::uint64_t weight_conversions() const { return mirror_.conversions(); }
  // Whether the products keep the large weights packed for their kernel (default on; core/precision.hpp's
  // PackedWeights): evaluation forwards, and with AMX training too. The copies cost memory: under Fp32 up to the
  // size of those weights again (B/32: 1,459 -> 2,078 MB after an evaluation forward of 32 images), under
  // Bf16Mixed about their bf16 size. Off, every product packs its operands inside the call, as a training
  // forward does (slower: docs/precision.md), and the copies held now are dropped.
  void set_keep_packed_weights(bool on) {
    keep_packed_ = on;
    if (!on) mirror_.drop_packed(), fp32_store_.clear();
  }
  bool keep_packed_weights() const { return keep_packed_; }
  // The weights its evaluation forwards keep packed for the products (on host memory: the bf16 mirror's store
  // under Bf16Mixed, the fp32 weights' under Fp32; nullptr on a device).
  const PackedWeights* packed_weights() const {
    if constexpr (Precision::mixed || !S::host_accessible) return mirror_.packed();
    else return &fp32_store_.packed();
  }
  // Expert parallelism: the communicator of the ranks holding the other parts of the experts (its rank r holds
  // part r). Every forward and backward with MoE blocks is then collective over it.
  void set_expert_comm(dist::AnyComm comm) {
    check_expert_group("Limoe::set_expert_comm", comm.rank(), comm.size());
    ep_comm_.emplace(std::move(comm));
  }
  // ... and, on a device, the same group over device memory (NcclComm): the expert blocks then move device to
  // device instead of through host copies (moe/expert_parallel.hpp). Call after set_expert_comm.
  void set_expert_blocks_comm(dist::BasicAnyComm<S> comm)
    requires(!S::host_accessible)
  {
    check_expert_group("Limoe::set_expert_blocks_comm", comm.rank(), comm.size());
    ep_blocks_comm_.emplace(std::move(comm));
  }
  bool expert_blocks_on_device() const { return ep_blocks_comm_.has_value(); }

  // Initialisation (ViT/big_vision style, adapted): LeCun-normal matrices, zero biases, unit LayerNorm gains,
  // N(0, 0.02) positions and token table, a small router, logit_scale = theta_0. Counter-based: the values do
  // not depend on the thread count.
  void init(std::uint64_t seed) {
    const Rng rng(seed);
    int tag = 0;
    Tensor<T> host(Shape{params_.size()});  // drawn on the host, then copied into the store's memory
    for (const auto& e : params_.entries()) {
      View<T> v(host.data() + e.offset, e.shape);
      const Rng r = rng.derive(static_cast<std::uint64_t>(tag++));
      const std::string& n = e.name;
      auto ends = [&](const char* s) { return n.size() >= std::string(s).size() && n.compare(n.size() - std::string(s).size(), std::string::npos, s) == 0; };
      if (n == "logit_scale") {
        v[0] = static_cast<T>(cfg_.logit_scale_init);
      } else if (ends(".bias") || ends("_b")) {
        std::fill(v.span().begin(), v.span().end(), T(0));
      } else if (ends("ln1.weight") || ends("ln2.weight") || ends("ln.weight") || n == "norm.weight" ||
                 n == "txt.norm.weight") {
        std::fill(v.span().begin(), v.span().end(), T(1));
      } else if (ends(".pos") || n == "txt.embed" || ends(".probe")) {
        fill(v, r, 0.02);
      } else if (ends("router.weight")) {
        fill(v, r, 0.02);
      } else {
        // A shard draws the whole tensor's values at its own indices: the same model on any expert layout.
        const index_t fan_in = v.shape().back();
        fill(v, r, 1.0 / std::sqrt(static_cast<double>(fan_in)), e.shard * v.numel());
      }
    }
    copy_from_host<T, S>(host.cview(), params_.values());
  }

  // ---- forward ------------------------------------------------------------------------------------------

  // Images [Bi, H, W, C] in [-1, 1] and/or token ids [Bt, T] (either may be empty) in one call: image and text
  // tokens share routing groups. `step` picks the router noise (training only). `capacity_factor`, when given,
  // replaces the config's factor for this mode in this call only (0 = no drop): evaluating at another factor
  // needs no other model.
  // `shard` places the call's pairs in the step's whole batch (data parallel; the default: the call is the batch).
  ForwardOutput<T> forward(CView<T> images, CView<std::int32_t> texts, Mode mode, std::uint64_t step = 0,
                           std::optional<double> capacity_factor = std::nullopt, BatchShard shard = {}) {
    return forward_from<HostSpace>(images, texts, mode, step, capacity_factor, shard);
  }
  // The same with the images already in the model's memory (a device backend's: images on the GPU go in
  // without a host round trip; they are copied device to device into the model's input buffer, which backward
  // reads). The token ids stay host data: their mask and the MoE layers' modality are decided on the host.
  template <class IS>
    requires(std::is_same_v<IS, S> && !std::is_same_v<S, HostSpace>)
  ForwardOutput<T> forward(CView<T, IS> images, CView<std::int32_t> texts, Mode mode, std::uint64_t step = 0,
                           std::optional<double> capacity_factor = std::nullopt, BatchShard shard = {}) {
    return forward_from<IS>(images, texts, mode, step, capacity_factor, shard);
  }

 private:
  template <class IS>
  ForwardOutput<T> forward_from(CView<T, IS> images, CView<std::int32_t> texts, Mode mode, std::uint64_t step,
                                std::optional<double> capacity_factor, BatchShard shard) {
    check_inputs(images, texts);
    LIMOE_CHECK(!capacity_factor || (*capacity_factor >= 0 && std::isfinite(*capacity_factor)),
                "Limoe::forward: the capacity factor must be finite and >= 0 (0 = no drop), got ", *capacity_factor);
    const index_t D = cfg_.width, N = cfg_.num_patches(), L = cfg_.text_len;
    Bi_ = images.empty() ? 0 : images.dim(0);
    Bt_ = texts.empty() ? 0 : texts.dim(0);
    Ni_ = Bi_ * N;
    const index_t R = Ni_ + Bt_ * L;
    LIMOE_CHECK(R > 0, "Limoe::forward: empty batch (no images and no texts)");
    LIMOE_CHECK(shard.first_pair >= 0, "Limoe::forward: BatchShard::first_pair must be >= 0, got ", shard.first_pair);
    ++generation_;
    refresh_weight_mirror();
    aux_scale_ = 1.0;  // backward_from (a user's own loss) after this forward: the auxiliary losses unscaled
    dp_.on = false;
    // What this call decides besides the batch: its mode, router noise and capacity factor.
    const CallSettings call{mode, step, capacity_factor};

    // Modality of every row, and the text key mask.
    modality_.resize(static_cast<std::size_t>(R));
    std::fill(modality_.begin(), modality_.begin() + Ni_, std::uint8_t{moe::kImage});
    std::fill(modality_.begin() + Ni_, modality_.end(), std::uint8_t{moe::kText});
    if (Bt_ > 0) {
      texts_.resize(Shape{Bt_, L});
      copy_from_host<std::int32_t, S>(texts, texts_.view());
      txt_mask_host_.resize(Shape{Bt_, L});
      for (index_t i = 0; i < Bt_ * L; ++i) txt_mask_host_[i] = texts[i] != cfg_.pad_id ? 1 : 0;
      txt_mask_.resize(Shape{Bt_, L});
      copy_from_host<std::uint8_t, S>(txt_mask_host_.cview(), txt_mask_.view());
      // Masked routing (ModelConfig::route_padding false): the MoE layers leave padding tokens out.
      if (!cfg_.route_padding)
        for (index_t i = 0; i < Bt_ * L; ++i)
          if (!txt_mask_host_[i]) modality_[static_cast<std::size_t>(Ni_ + i)] = moe::kPad;
    }
    plan_routing_groups(shard.first_pair);
    if (Bi_ > 0) {
      images_.resize(images.shape());
      if constexpr (std::is_same_v<IS, S>) copy_within<T, S>(images, images_.view());
      else copy_from_host<T, S>(images, images_.view());
    }

    // Embeddings -> X0 (the input of block 0). Training keeps every block's activations for backward();
    // evaluation keeps none: all blocks share one scratch set and the block inputs ping-pong between two
    // buffers, so an evaluation forward holds one block's activations, not depth of them.
    const bool tape = mode == Mode::Train;
    if (tape && pack_weights_) {  // training after evaluation: the packed copies go
      if constexpr (Precision::mixed) mirror_.drop_packed();
      else fp32_store_.clear();
    }
    pack_weights_ = !tape;
    DTensor<T>& x0 = tape ? blocks_acts_[0].x_in : eval_x_[0];
    x0.resize(Shape{R, D});  // [R, D]
    if (Bi_ > 0) {
      patches_.resize(Shape{Bi_, N, static_cast<index_t>(cfg_.patch_dim())});  // [Bi, N, P*P*C]
      O::patch_embed_forward(images_.cview(), cfg_.patch, pv(img_patch_w_), pv(img_patch_b_), pv(img_pos_),
                                  patches_.view(), img_rows(x0.view()), prec());
    }
    if (Bt_ > 0) O::token_embed_forward(texts_.cview(), pv(txt_embed_), pv(txt_pos_), txt_rows(x0.view()));

    ForwardOutput<T> out;
    out.generation = generation_;
    out.mode = mode;
    for (int l = 0; l < cfg_.depth; ++l) {
      const auto i = static_cast<std::size_t>(l);
      DTensor<T>& x_in = tape ? blocks_acts_[i].x_in : eval_x_[i % 2];
      DTensor<T>& x_out = l + 1 == cfg_.depth ? x_final_ : tape ? blocks_acts_[i + 1].x_in : eval_x_[(i + 1) % 2];
      block_forward(l, call, x_in, x_out, tape ? blocks_acts_[i] : blocks_acts_[0], tape ? moe_ctx_[i] : moe_ctx_[0],
                    out);
    }

    // Final LayerNorm, pooling heads, projections, L2 normalisation.
    xn_.resize(Shape{R, D});        // [R, D]
    xn_mean_.resize(Shape{R});      // [R]
    xn_rstd_.resize(Shape{R});      // [R]
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      O::layernorm_forward(rows(x_final_.cview(), r0, r1), pv(final_norm(tw).first), pv(final_norm(tw).second),
                           static_cast<T>(cfg_.ln_eps), rows(xn_.view(), r0, r1), rows(xn_mean_.view(), r0, r1),
                           rows(xn_rstd_.view(), r0, r1));
    });
    // The embeddings stay in the model's memory for loss() and backward(); the output holds host copies. An
    // evaluation forward's `map` heads compute their output only (MapHeadCache::inference).
    img_acts_.map.inference = txt_acts_.map.inference = !tape;
    if (Bi_ > 0) {
      head_forward(img_head_, img_acts_, img_rows(xn_.cview()), CView<std::uint8_t, S>{}, z_img_);
      out.img_emb = to_host(z_img_.cview());
    }
    if (Bt_ > 0) {
      head_forward(txt_head_, txt_acts_, txt_rows(xn_.cview()), text_mask(), z_txt_);
      out.txt_emb = to_host(z_txt_.cview());
    }
    // A training forward's MoE results, left on the device by each block (MoeContext::defer_results).
    for (int l = 0; tape && l < cfg_.depth; ++l)
      if (blocks_[static_cast<std::size_t>(l)].moe) moe_outputs(l, moe_ctx_[static_cast<std::size_t>(l)], out);
    return out;
  }

 public:
  // ---- loss and backward --------------------------------------------------------------------------------

  // Contrastive loss over the pairs of the last forward (Bi == Bt) plus the auxiliary losses it returned.
  LossOutput loss(const ForwardOutput<T>& fwd) {
    check_latest(fwd, "loss");
    LIMOE_CHECK(Bi_ == Bt_ && Bi_ > 0, "Limoe::loss: needs a forward over n images and n texts, got ", Bi_,
                " images and ", Bt_, " texts");
    dp_.on = false;
    aux_scale_ = 1.0;
    return contrastive_loss(fwd, z_img_.cview(), z_txt_.cview());
  }

  // Data parallel: the contrastive loss over the whole batch of a step, of which the last forward computed the
  // pairs [first_pair, first_pair + n). img_all / txt_all [n_all, P] are the normalised embeddings of every
  // rank in rank order (dist::all_gather of each forward's img_emb / txt_emb). Every rank computes the same
  // contrastive loss; backward() then gives the gradient of that loss with respect to this rank's pairs only
  // (the logit scale's on the rank holding pair 0), so the sum over ranks of the parameter gradients is the
  // whole batch's. The auxiliary losses are this call's; their gradients are scaled by 1 / replicas, as the
  // step's auxiliary loss is their mean over the `replicas` ranks (the returned `aux` and `total` hold this
  // rank's unscaled value: dist::all_reduce_sum(aux) / replicas is the step's).
  LossOutput loss(const ForwardOutput<T>& fwd, CView<T> img_all, CView<T> txt_all, index_t first_pair, int replicas) {
    check_latest(fwd, "loss");
    LIMOE_CHECK(Bi_ == Bt_ && Bi_ > 0, "Limoe::loss: needs a forward over n images and n texts, got ", Bi_,
                " images and ", Bt_, " texts");
    LIMOE_CHECK(replicas >= 1, "Limoe::loss: replicas must be >= 1, got ", replicas);
    const index_t P = cfg_.proj_dim;
    LIMOE_CHECK(img_all.rank() == 2 && img_all.dim(1) == P && txt_all.shape() == img_all.shape(),
                "Limoe::loss: the gathered embeddings must both be [n_all, ", P, "], got ", img_all.shape().str(),
                " and ", txt_all.shape().str());
    const index_t n = Bi_, n_all = img_all.dim(0);
    LIMOE_CHECK(first_pair >= 0 && first_pair + n <= n_all, "Limoe::loss: this call's pairs [", first_pair, ", ",
                first_pair + n, ") are not inside the gathered batch of ", n_all);
    // The gathered rows of this call must be its own embeddings (a wrong offset would train on wrong gradients).
    // Bytes, not values: the gather copies them exactly, and a NaN (a diverged step) still compares equal.
    LIMOE_CHECK(std::memcmp(fwd.img_emb.data(), img_all.data() + first_pair * P, static_cast<std::size_t>(n * P) * sizeof(T)) == 0 &&
                    std::memcmp(fwd.txt_emb.data(), txt_all.data() + first_pair * P, static_cast<std::size_t>(n * P) * sizeof(T)) == 0,
                "Limoe::loss: rows [", first_pair, ", ", first_pair + n, ") of the gathered embeddings are not this "
                "forward's; gather every rank's embeddings in rank order and pass this rank's first pair");
    dp_.on = true;
    dp_.first_pair = first_pair;
    dp_.img_all.resize(img_all.shape()), dp_.txt_all.resize(txt_all.shape());
    copy_from_host<T, S>(img_all, dp_.img_all.view());
    copy_from_host<T, S>(txt_all, dp_.txt_all.view());
    aux_scale_ = 1.0 / static_cast<double>(replicas);
    return contrastive_loss(fwd, dp_.img_all.cview(), dp_.txt_all.cview());
  }

 private:
  LossOutput contrastive_loss(const ForwardOutput<T>& fwd, CView<T, S> img, CView<T, S> txt) {
    const index_t n = img.dim(0);
    logits_.resize(Shape{n, n});  // [n, n]
    const T theta = logit_scale();
    const auto r = O::contrastive_forward(img, txt, theta, static_cast<T>(cfg_.logit_scale_max), logits_.view());
    loss_generation_ = generation_;
    LossOutput o;
    o.contrastive = r.loss;
    o.aux = fwd.aux_loss;
    o.total = r.loss + fwd.aux_loss;
    o.accuracy_i2t = r.accuracy_i2t;
    o.accuracy_t2i = r.accuracy_t2i;
    o.scale = r.scale;
    return o;
  }

 public:

  // Called during backward() with `first`: from here on, params().grads()[first, size()) holds its final value
  // for this pass (nothing later in the pass writes there). `first` only decreases; the last call gives 0. A data-
  // parallel trainer sums those parts over the ranks while the pass goes on (docs/distributed.md). On a device
  // backend "final" is in the order of the backend's stream.
  using GradsFinal = std::function<void(index_t first)>;

  // Gradient of (contrastive + auxiliary losses) of the last forward + loss(), accumulated into params().grads().
  void backward(const ForwardOutput<T>& fwd, const GradsFinal& on_final = {}) {
    LIMOE_CHECK(loss_generation_ == generation_, "Limoe::backward: call loss() on the output of the last forward() first");
    check_latest(fwd, "backward");
    check_tape(fwd, "backward");
    const T theta = logit_scale();
    T dtheta = 0;
    // The gradient of the loss's whole batch (data parallel: every rank's pairs), of which this call keeps its
    // own pairs' rows; the logit scale's is added once, by the call holding pair 0.
    const CView<T, S> img = dp_.on ? dp_.img_all.cview() : z_img_.cview();
    const CView<T, S> txt = dp_.on ? dp_.txt_all.cview() : z_txt_.cview();
    dz_img_.resize(img.shape());
    dz_txt_.resize(txt.shape());
    O::contrastive_backward(img, txt, theta, static_cast<T>(cfg_.logit_scale_max), logits_.cview(), T(1),
                            dz_img_.view(), dz_txt_.view(), &dtheta);
    const index_t first = dp_.on ? dp_.first_pair : 0, n = Bi_, P = cfg_.proj_dim;
    if (first == 0) add_to_logit_scale_grad(dtheta);
    backward_in_space(CView<T, S>(dz_img_.data() + first * P, Shape{n, P}),
                      CView<T, S>(dz_txt_.data() + first * P, Shape{n, P}), on_final);
  }

  // Backward from given gradients of the normalised embeddings (host data; either may be empty): for users with
  // their own loss. The auxiliary losses' gradients are always included.
  void backward_from(const ForwardOutput<T>& fwd, CView<T> dz_img, CView<T> dz_txt) {
    check_latest(fwd, "backward_from");
    check_tape(fwd, "backward_from");
    backward_in_space(host_into<S>(dz_img, dz_in_img_), host_into<S>(dz_txt, dz_in_txt_));
  }

  // Gradient of the loss with respect to the input images of the last forward (after backward): [Bi, H, W, C].
  // Computed on request (it is not needed for training).
  Tensor<T> input_image_grad() {
    DTensor<T> dimg(images_.shape());
    DTensor<T> dW(pv(img_patch_w_).shape()), db(pv(img_patch_b_).shape()), dpos(pv(img_pos_).shape());
    O::patch_embed_backward(images_.cview(), cfg_.patch, patches_.cview(), pv(img_patch_w_),
                                 img_rows(dx_.cview()), dimg.view(), dW.view(), db.view(), dpos.view(), prec());
    return to_host(dimg.cview());
  }

 private:
  using O = Ops<BackendT, T>;

  // backward_from on gradients already in the model's memory (the caller checked the forward output).
  void backward_in_space(CView<T, S> dz_img, CView<T, S> dz_txt, const GradsFinal& on_final = {}) {
    const auto report = [&](index_t first) {
      if (on_final) on_final(first);
    };
    const index_t D = cfg_.width, R = Ni_ + Bt_ * cfg_.text_len;
    dxn_.resize(Shape{R, D});  // [R, D]
    dxn_.zero();
    if (Bi_ > 0 && !dz_img.empty()) head_backward(img_head_, img_acts_, img_rows(xn_.cview()), {}, z_img_.cview(), dz_img, img_rows(dxn_.view()));
    if (Bt_ > 0 && !dz_txt.empty()) head_backward(txt_head_, txt_acts_, txt_rows(xn_.cview()), text_mask(), z_txt_.cview(), dz_txt, txt_rows(dxn_.view()));
    dx_.resize(Shape{R, D});  // [R, D] gradient of the current block output
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      const auto [w, b] = final_norm(tw);
      O::layernorm_backward(rows(x_final_.cview(), r0, r1), pv(w), rows(xn_mean_.cview(), r0, r1),
                            rows(xn_rstd_.cview(), r0, r1), rows(dxn_.cview(), r0, r1), rows(dx_.view(), r0, r1),
                            pg(w), pg(b));
    });
    report(final_from_[static_cast<std::size_t>(cfg_.depth)]);  // the heads, final norms (and a text tower's blocks)
    for (int l = cfg_.depth - 1; l >= 0; --l) {
      block_backward(l);
      report(final_from_[static_cast<std::size_t>(l)]);
    }
    if (Bi_ > 0)
      O::patch_embed_backward(images_.cview(), cfg_.patch, patches_.cview(), pv(img_patch_w_),
                                   img_rows(dx_.cview()), View<T, S>{}, pg(img_patch_w_), pg(img_patch_b_), pg(img_pos_), prec());
    if (Bt_ > 0) O::token_embed_backward(texts_.cview(), txt_rows(dx_.cview()), pg(txt_embed_), pg(txt_pos_));
    report(0);
  }

  // ---- parameters ---------------------------------------------------------------------------------------

  ParamRef add(const std::string& name, Shape shape, bool decay) { return params_.add(name, shape, decay); }

  AttnRefs add_attn(const std::string& p) {
    const index_t D = cfg_.width;
    AttnRefs a;
    a.q_w = add(p + ".q.weight", {D, D}, true);
    a.q_b = add(p + ".q.bias", {D}, false);
    a.k_w = add(p + ".k.weight", {D, D}, true);
    a.k_b = add(p + ".k.bias", {D}, false);
    a.v_w = add(p + ".v.weight", {D, D}, true);
    a.v_b = add(p + ".v.bias", {D}, false);
    a.o_w = add(p + ".o.weight", {D, D}, true);
    a.o_b = add(p + ".o.bias", {D}, false);
    return a;
  }
  MlpRefs add_mlp(const std::string& p) {
    const index_t D = cfg_.width, M = cfg_.mlp_dim;
    return {add(p + ".fc1.weight", {M, D}, true), add(p + ".fc1.bias", {M}, false),
            add(p + ".fc2.weight", {D, M}, true), add(p + ".fc2.bias", {D}, false)};
  }
  HeadRefs add_head(const std::string& m, Pooling kind) {
    const index_t D = cfg_.width;
    HeadRefs h;
    h.kind = kind;
    if (kind == Pooling::Map) {
      h.probe = add(m + ".head.probe", {D}, false);
      h.attn = add_attn(m + ".head.attn");
      h.ln_w = add(m + ".head.ln.weight", {D}, false);
      h.ln_b = add(m + ".head.ln.bias", {D}, false);
      h.mlp = add_mlp(m + ".head.mlp");
    }
    return h;
  }

  void register_params() {
    const index_t D = cfg_.width, M = cfg_.mlp_dim, E = cfg_.experts, P = cfg_.proj_dim;
    img_patch_w_ = add("img.patch.weight", {D, cfg_.patch_dim()}, true);
    img_patch_b_ = add("img.patch.bias", {D}, false);
    img_pos_ = add("img.pos", {cfg_.num_patches(), D}, false);
    txt_embed_ = add("txt.embed", {cfg_.vocab_size, D}, false);
    txt_pos_ = add("txt.pos", {cfg_.text_len, D}, false);
    // block_end[l]: the end of block l's entries in the flat store (of either tower), for final_from_.
    std::vector<index_t> block_end(static_cast<std::size_t>(cfg_.depth), 0);
    const index_t embed_end = params_.size();
    auto add_block = [&](const std::string& p, bool moe) {
      BlockRefs b;
      b.moe = moe;
      b.ln1_w = add(p + ".ln1.weight", {D}, false);
      b.ln1_b = add(p + ".ln1.bias", {D}, false);
      b.attn = add_attn(p + ".attn");
      b.ln2_w = add(p + ".ln2.weight", {D}, false);
      b.ln2_b = add(p + ".ln2.bias", {D}, false);
      if (!moe) b.mlp = add_mlp(p + ".mlp");
      return b;
    };
    blocks_.resize(static_cast<std::size_t>(cfg_.depth));
    for (int l = 0; l < cfg_.depth; ++l) {
      const std::string p = "blocks." + std::to_string(l);
      BlockRefs& b = blocks_[static_cast<std::size_t>(l)];
      b = add_block(p, cfg_.is_moe(l));
      if (b.moe) {
        b.router = add(p + ".moe.router.weight", {E, D}, true);
        const index_t Ex = E / ep_.count;  // this model's part of the experts
        auto part = [&](const std::string& n, Shape s, bool decay) { return params_.add(n, s, decay, ep_.index, ep_.count); };
        b.mlp = {part(p + ".moe.fc1.weight", {Ex, M, D}, true), part(p + ".moe.fc1.bias", {Ex, M}, false),
                 part(p + ".moe.fc2.weight", {Ex, D, M}, true), part(p + ".moe.fc2.bias", {Ex, D}, false)};
      }
      block_end[static_cast<std::size_t>(l)] = params_.size();
    }
    norm_w_ = add("norm.weight", {D}, false);
    norm_b_ = add("norm.bias", {D}, false);
    if (cfg_.towers == 2) {  // the text tower (dense: validate() allows no MoE block in a two-tower config)
      txt_blocks_.resize(static_cast<std::size_t>(cfg_.depth));
      for (int l = 0; l < cfg_.depth; ++l) {
        txt_blocks_[static_cast<std::size_t>(l)] = add_block("txt.blocks." + std::to_string(l), false);
        block_end[static_cast<std::size_t>(l)] = params_.size();
      }
      txt_norm_w_ = add("txt.norm.weight", {D}, false);
      txt_norm_b_ = add("txt.norm.bias", {D}, false);
    }
    img_head_ = add_head("img", cfg_.pool_img);
    txt_head_ = add_head("txt", cfg_.pool_txt);
    img_head_.proj = add("img.proj.weight", {P, D}, true);
    txt_head_.proj = add("txt.proj.weight", {P, D}, true);
    logit_scale_ = add("logit_scale", Shape{}, false);
    // Once blocks l..depth-1 are through backward, what is still to come are blocks 0..l-1 and the embeddings:
    // the gradient is final from the end of the last of their entries on.
    final_from_.assign(static_cast<std::size_t>(cfg_.depth) + 1, embed_end);
    for (int l = 1; l <= cfg_.depth; ++l)
      final_from_[static_cast<std::size_t>(l)] =
          std::max(final_from_[static_cast<std::size_t>(l - 1)], block_end[static_cast<std::size_t>(l - 1)]);
  }

  CView<T, S> pv(ParamRef r) const { return params_.value(r); }
  // The logit scale theta (one value; read from device memory on a device backend) and its gradient's update.
  T logit_scale() const {
    T theta{};
    copy_to_host<T, S>(pv(logit_scale_), View<T>(&theta, Shape{}));
    return theta;
  }
  void add_to_logit_scale_grad(T dtheta) {
    T g{};
    copy_to_host<T, S>(pg(logit_scale_), View<T>(&g, Shape{}));
    g += dtheta;
    copy_from_host<T, S>(CView<T>(&g, Shape{}), pg(logit_scale_));
  }

  // The precision policy the ops receive: Bf16Mixed reads the weights from this model's bf16 mirror, made again
  // only when the parameters changed since (once per optimizer step in training; core/precision.hpp), in the
  // memory of the backend by its to_bf16 op (on a device, one launch per step). An evaluation forward lets the
  // products keep the weights packed for their kernel (PackedWeights, until the weights change); a training
  // forward and its backward do not, since the next step changes the weights.
  Precision prec() const {
    if constexpr (Precision::mixed) {
      Precision p{mirror_.copies()};
      // With AMX the tile kernel's packing (a transpose pass per weight) costs less than one product saves,
      // so training forwards keep packed copies too, made once per optimizer step (core/amx.hpp).
      if ((!pack_weights_ && !amx::available()) || !keep_packed_) p.weights.packed = nullptr;
      return p;
    } else {
      // Fp32: evaluation forwards keep the large weights packed too (gemm_f32_packed), training does not.
      Precision p{};
      if (pack_weights_ && keep_packed_) p.weights = fp32_weights_;
      return p;
    }
  }
  void refresh_weight_mirror() {
    if constexpr (!Precision::mixed && std::is_same_v<T, float> && S::host_accessible) {
      const ParamStore<T, S>& ps = params_;
      fp32_weights_ = fp32_store_.weights(ps.values().data(), ps.size(), ps.version());
    }
    if constexpr (Precision::mixed) {
      profile::Region<S> region("bf16_weights");
      const ParamStore<T, S>& ps = params_;
      mirror_.refresh(ps.values().data(), ps.size(), ps.version(), [](const float* x, index_t n, bf16_bits* out) {
        Ops<BackendT, T>::to_bf16(CView<float, S>(x, Shape{n}), View<bf16_bits, S>(out, Shape{n}));
      });
    }
  }
  View<T, S> pg(ParamRef r) { return params_.grad(r); }

  AttentionWeights<T, S> attn_weights(const AttnRefs& a) const {
    return {pv(a.q_w), pv(a.q_b), pv(a.k_w), pv(a.k_b), pv(a.v_w), pv(a.v_b), pv(a.o_w), pv(a.o_b)};
  }
  AttentionGrads<T, S> attn_grads(const AttnRefs& a) {
    return {pg(a.q_w), pg(a.q_b), pg(a.k_w), pg(a.k_b), pg(a.v_w), pg(a.v_b), pg(a.o_w), pg(a.o_b)};
  }

  // Rows of the image tokens as [Bi, N, D] and of the text tokens as [Bt, T, D].
  template <class U>
  View<U, S> img_rows(View<U, S> x) const {
    return View<U, S>(x.data(), Shape{Bi_, cfg_.num_patches(), cfg_.width});
  }
  template <class U>
  View<U, S> txt_rows(View<U, S> x) const {
    return View<U, S>(x.data() + Ni_ * cfg_.width, Shape{Bt_, cfg_.text_len, cfg_.width});
  }
  CView<std::uint8_t, S> text_mask() const { return cfg_.text_mask ? txt_mask_.cview() : CView<std::uint8_t, S>{}; }

  // Rows [r0, r1) of a [R, D] or [R] tensor.
  template <class U>
  static View<U, S> rows(View<U, S> x, index_t r0, index_t r1) {
    const index_t w = x.rank() == 2 ? x.dim(1) : 1;
    return x.rank() == 2 ? View<U, S>(x.data() + r0 * w, Shape{r1 - r0, w}) : View<U, S>(x.data() + r0, Shape{r1 - r0});
  }
  // The towers of the R rows of a call and the rows each runs: one tower, f(0, 0, R); two towers, f(0, 0, Ni) for
  // the image rows and f(1, Ni, R) for the text rows (a tower without rows is skipped).
  template <class F>
  void for_each_tower(index_t R, F&& f) const {
    if (cfg_.towers == 1) return f(0, index_t{0}, R);
    if (Ni_ > 0) f(0, index_t{0}, Ni_);
    if (R > Ni_) f(1, Ni_, R);
  }
  // Block l of tower tw (0: the shared or image tower, 1: the text tower), and tower tw's final LayerNorm.
  const BlockRefs& tower_block(int tw, int l) const {
    return (tw == 0 ? blocks_ : txt_blocks_)[static_cast<std::size_t>(l)];
  }
  std::pair<ParamRef, ParamRef> final_norm(int tw) const {
    return tw == 0 ? std::pair{norm_w_, norm_b_} : std::pair{txt_norm_w_, txt_norm_b_};
  }
  // The tower that runs the text rows.
  int text_tower() const { return cfg_.towers == 2 ? 1 : 0; }

  // The settings of one forward call (not model state: block_forward receives them).
  struct CallSettings {
    Mode mode;
    std::uint64_t step;                      // picks the router noise (training)
    std::optional<double> capacity_factor;   // this call's override of the config's factor
  };

  void check_latest(const ForwardOutput<T>& fwd, const char* who) const {
    LIMOE_CHECK(fwd.generation == generation_ && generation_ > 0, "Limoe::", who, ": this output is from forward() call ",
                fwd.generation, ", but the model holds the activations of call ", generation_,
                " only; pass the output of the last forward()");
  }

  // An expert communicator's rank r must be the rank holding expert part r, and its size the number of parts.
  void check_expert_group(const char* who, int rank, int size) const {
    LIMOE_CHECK(size == ep_.count && rank == ep_.index, who, ": this model holds expert part ", ep_.index, " of ",
                ep_.count, ", the communicator is rank ", rank, " of ", size);
  }
  // Only a training forward keeps the activations a backward pass needs (fwd is the last forward's output).
  void check_tape(const ForwardOutput<T>& fwd, const char* who) const {
    LIMOE_CHECK(fwd.mode == Mode::Train, "Limoe::", who, ": the last forward() ran in evaluation mode, which keeps no "
                "activations for a backward pass; run forward(..., Mode::Train, step) instead (with the router's "
                "noise_std 0 for a deterministic pass)");
  }

  template <class IS>
  void check_inputs(CView<T, IS> images, CView<std::int32_t> texts) const {
    if (!images.empty()) {
      const Shape want{images.rank() ? images.dim(0) : 0, cfg_.image_size[0], cfg_.image_size[1], cfg_.channels};
      LIMOE_CHECK(images.shape() == want, "images: expected [B, ", cfg_.image_size[0], ", ", cfg_.image_size[1],
                  ", ", cfg_.channels, "] for this model, got ", images.shape().str());
    }
    if (!texts.empty()) {
      LIMOE_CHECK(texts.rank() == 2 && texts.dim(1) == cfg_.text_len, "texts: expected [B, ", cfg_.text_len,
                  "] token ids for this model, got ", texts.shape().str());
    }
  }

  // ---- blocks -------------------------------------------------------------------------------------------

  struct BlockActs {
    DTensor<T> x_in;                       // [R, D] block input
    DTensor<T> ln1, ln1_mean, ln1_rstd;    // [R, D], [R], [R]
    AttentionCache<T, S> attn_img, attn_txt;
    DTensor<T> x_mid;                      // [R, D] x_in + attention
    DTensor<T> ln2, ln2_mean, ln2_rstd;    // [R, D], [R], [R]
    DTensor<T> h_pre, h_act;               // [R, M] dense MLP hidden, before / after GELU
    DTensor<T> moe_x;                      // [R, D] MoE block with routing groups of pairs: ln2 in group order
  };

  // Routing groups of the call (ModelConfig::group_pairs): the MoE layers cut their input into groups of
  // consecutive rows, so with groups of pairs over images and texts they see the rows in group order (for each
  // group its image tokens, then its text tokens), gathered through moe_perm_ (group-order row -> row). A call
  // with one group, or with one modality, is in group order already and is not permuted.
  void plan_routing_groups(index_t first_pair) {
    const index_t N = cfg_.num_patches(), L = cfg_.text_len, gp = cfg_.group_pairs;
    const index_t per_pair = (Bi_ > 0 ? N : 0) + (Bt_ > 0 ? L : 0);
    first_token_ = first_pair * per_pair;
    moe_permute_ = false;
    if (gp == 0) {
      moe_group_tokens_ = cfg_.router.group_size;
      return;
    }
    LIMOE_CHECK(Bi_ == 0 || Bt_ == 0 || Bi_ == Bt_, "Limoe::forward: routing groups of pairs (group_pairs ", gp,
                ") need as many images as texts in a call, got ", Bi_, " and ", Bt_,
                "; embed unpaired images and texts in separate calls");
    moe_group_tokens_ = gp * per_pair;
    const index_t B = std::max(Bi_, Bt_), G = (B + gp - 1) / gp;
    if (Bi_ == 0 || Bt_ == 0 || G <= 1) return;
    moe_permute_ = true;
    moe_perm_.clear();
    moe_modality_.clear();
    for (index_t g = 0; g < G; ++g) {
      const index_t p0 = g * gp, p1 = std::min(B, p0 + gp);
      for (index_t r = p0 * N; r < p1 * N; ++r) moe_perm_.push_back(r);
      for (index_t r = Ni_ + p0 * L; r < Ni_ + p1 * L; ++r) moe_perm_.push_back(r);
    }
    for (const index_t r : moe_perm_) moe_modality_.push_back(modality_[static_cast<std::size_t>(r)]);
    moe_perm_idx_ = host_into<S>(CView<index_t>(moe_perm_.data(), Shape{static_cast<index_t>(moe_perm_.size())}),
                                 moe_perm_dev_);
  }

  // Block l's expert exchange under expert parallelism, else none.
  moe::ExpertExchange<T, S>* exchange(int l) {
    if (ep_.count == 1) return nullptr;
    LIMOE_CHECK(ep_comm_.has_value(), "Limoe: this model holds expert part ", ep_.index, " of ", ep_.count,
                "; give it the expert-parallel communicator (set_expert_comm) before running it");
    ep_ex_.resize(static_cast<std::size_t>(cfg_.depth));
    auto& ex = ep_ex_[static_cast<std::size_t>(l)];
    ex.comm = &*ep_comm_;
    ex.blocks_comm = ep_blocks_comm_ ? &*ep_blocks_comm_ : nullptr;
    ex.experts = cfg_.experts;
    return &ex;
  }

  // gather: dst[i] = src[perm[i]] (rows to group order); else scatter: dst[perm[i]] = src[i].
  void permute_rows(CView<T, S> src, View<T, S> dst, bool gather) const {
    if (gather) O::gather_rows(src, moe_perm_idx_, dst);
    else O::scatter_rows(src, moe_perm_idx_, dst);
  }

  moe::MoeParams<T, S> expert_weights(const BlockRefs& b) const {
    return {pv(b.router), pv(b.mlp.fc1_w), pv(b.mlp.fc1_b), pv(b.mlp.fc2_w), pv(b.mlp.fc2_b)};
  }
  moe::MoeGrads<T, S> expert_grads(const BlockRefs& b) {
    return {pg(b.router), pg(b.mlp.fc1_w), pg(b.mlp.fc1_b), pg(b.mlp.fc2_w), pg(b.mlp.fc2_b)};
  }

  // Block l from x_in to x_out; `a` and `ctx` receive the activations (block l's own in training, the shared
  // scratch in evaluation). a.x_in is not used here: x_in is passed explicitly.
  void block_forward(int l, const CallSettings& call, const DTensor<T>& x_in, DTensor<T>& x_out, BlockActs& a, moe::MoeContext<T, S>& ctx,
                     ForwardOutput<T>& out) {
    const BlockRefs& b = blocks_[static_cast<std::size_t>(l)];
    const index_t R = x_in.dim(0), D = cfg_.width, M = cfg_.mlp_dim;
    const T eps = static_cast<T>(cfg_.ln_eps);
    a.ln1.resize(Shape{R, D});  // [R, D]
    a.ln1_mean.resize(Shape{R});
    a.ln1_rstd.resize(Shape{R});
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      const BlockRefs& bt = tower_block(tw, l);
      O::layernorm_forward(rows(x_in.cview(), r0, r1), pv(bt.ln1_w), pv(bt.ln1_b), eps, rows(a.ln1.view(), r0, r1),
                           rows(a.ln1_mean.view(), r0, r1), rows(a.ln1_rstd.view(), r0, r1));
    });
    // Attention per modality, written into x_mid, then the residual.
    a.x_mid.resize(Shape{R, D});  // [R, D]
    if (Bi_ > 0)
      O::self_attention_forward(attn_weights(b.attn), cfg_.heads, img_rows(a.ln1.cview()), CView<std::uint8_t, S>{},
                                img_rows(a.x_mid.view()), a.attn_img, prec());
    if (Bt_ > 0)
      O::self_attention_forward(attn_weights(tower_block(text_tower(), l).attn), cfg_.heads, txt_rows(a.ln1.cview()),
                                text_mask(), txt_rows(a.x_mid.view()), a.attn_txt, prec());
    O::add_into(x_in.cview(), a.x_mid.view());  // the residual

    a.ln2.resize(Shape{R, D});  // [R, D]
    a.ln2_mean.resize(Shape{R});
    a.ln2_rstd.resize(Shape{R});
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      const BlockRefs& bt = tower_block(tw, l);
      O::layernorm_forward(rows(a.x_mid.cview(), r0, r1), pv(bt.ln2_w), pv(bt.ln2_b), eps, rows(a.ln2.view(), r0, r1),
                           rows(a.ln2_mean.view(), r0, r1), rows(a.ln2_rstd.view(), r0, r1));
    });
    x_out.resize(Shape{R, D});  // [R, D]
    if (!b.moe) {
      a.h_pre.resize(Shape{R, M});  // [R, M]
      a.h_act.resize(Shape{R, M});  // [R, M]
      for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
        const MlpRefs& m = tower_block(tw, l).mlp;
        O::linear_forward(rows(a.ln2.cview(), r0, r1), pv(m.fc1_w), CView<T, S>{}, rows(a.h_pre.view(), r0, r1), prec());
        O::bias_gelu_forward(cfg_.gelu, pv(m.fc1_b), rows(a.h_pre.view(), r0, r1), rows(a.h_act.view(), r0, r1));
        O::linear_forward(rows(a.h_act.cview(), r0, r1), pv(m.fc2_w), pv(m.fc2_b), rows(x_out.view(), r0, r1), prec());
      });
    } else {
      moe::MoeConfig mc{cfg_.experts, cfg_.top_k, cfg_.router, cfg_.aux, cfg_.gelu};
      mc.router.group_size = moe_group_tokens_;
      mc.first_token = first_token_;
      if (call.capacity_factor)
        (call.mode == Mode::Train ? mc.router.capacity_factor_train : mc.router.capacity_factor_eval) = *call.capacity_factor;
      // Router noise: a function of (seed, step, block) only, so a resumed run draws the same noise.
      const Rng noise = Rng(noise_seed_).derive(call.step * 4096 + static_cast<std::uint64_t>(l));
      // The layer sees the rows in routing-group order (plan_routing_groups); a permuted call gathers them.
      CView<T, S> xin = a.ln2.cview();
      View<T, S> yout = x_out.view();
      std::span<const std::uint8_t> modality(modality_.data(), modality_.size());
      if (moe_permute_) {
        a.moe_x.resize(Shape{R, D});  // [R, D] ln2 in group order
        moe_y_.resize(Shape{R, D});   // [R, D]
        permute_rows(a.ln2.cview(), a.moe_x.view(), true);
        xin = a.moe_x.cview(), yout = moe_y_.view();
        modality = std::span<const std::uint8_t>(moe_modality_.data(), moe_modality_.size());
      }
      auto* ex = exchange(l);
      // Training: every block has its own context, so the results stay on the device until forward() has
      // launched its heads (moe_outputs, after the blocks); evaluation reuses one context and collects each block's.
      ctx.defer_results = call.mode == Mode::Train;
      if constexpr (std::is_same_v<Router, ConfigRouter>)
        moe::moe_forward<T, Losses, BackendT>(mc, expert_weights(b), xin, modality, call.mode, noise, yout, ctx, ex, prec());
      else
        moe::moe_forward<T, Losses, BackendT>(router_, mc, expert_weights(b), xin, modality, call.mode, noise, yout, ctx,
                                              ex, prec());
      if (moe_permute_) permute_rows(moe_y_.cview(), x_out.view(), false);
      if (!ctx.defer_results) moe_outputs(l, ctx, out);
    }
    O::add_into(a.x_mid.cview(), x_out.view());  // the residual
  }

  // MoE block l's routes (in row order), statistics and auxiliary losses into the forward's output.
  void moe_outputs(int l, moe::MoeContext<T, S>& ctx, ForwardOutput<T>& out) {
    moe::collect_results(ctx);
    if (moe_permute_) {
      Tensor<std::int32_t> routes(ctx.routes().shape());  // [R, K] back in row order
      const index_t R = routes.dim(0), K = cfg_.top_k;
      for (index_t i = 0; i < R; ++i)
        std::copy_n(ctx.routes().data() + i * K, K, routes.data() + moe_perm_[static_cast<std::size_t>(i)] * K);
      out.routes.push_back(std::move(routes));
    } else {
      out.routes.push_back(Tensor<std::int32_t>::copy_of(ctx.routes()));
    }
    out.route_blocks.push_back(l);
    out.stats.push_back(ctx.stats);
    out.aux_terms.push_back(ctx.losses);
    out.aux_loss += ctx.losses.total;
  }

  // dx_ holds the gradient of block l's output on entry and of its input on exit.
  void block_backward(int l) {
    const BlockRefs& b = blocks_[static_cast<std::size_t>(l)];
    BlockActs& a = blocks_acts_[static_cast<std::size_t>(l)];
    const index_t R = a.x_in.dim(0), D = cfg_.width, M = cfg_.mlp_dim;
    dln_.resize(Shape{R, D});  // [R, D]
    if (!b.moe) {
      dh_.resize(Shape{R, M});  // [R, M]
      for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
        const MlpRefs& m = tower_block(tw, l).mlp;
        O::linear_backward(rows(a.h_act.cview(), r0, r1), pv(m.fc2_w), rows(dx_.cview(), r0, r1),
                           rows(dh_.view(), r0, r1), pg(m.fc2_w), pg(m.fc2_b), prec());
        O::gelu_backward(cfg_.gelu, rows(a.h_pre.cview(), r0, r1), rows(dh_.cview(), r0, r1), rows(dh_.view(), r0, r1));
        O::linear_backward(rows(a.ln2.cview(), r0, r1), pv(m.fc1_w), rows(dh_.cview(), r0, r1),
                           rows(dln_.view(), r0, r1), pg(m.fc1_w), pg(m.fc1_b), prec());
      });
    } else {
      auto& ctx = moe_ctx_[static_cast<std::size_t>(l)];
      if (moe_permute_) {  // the layer's rows are in routing-group order
        moe_dy_.resize(Shape{R, D});  // [R, D]
        moe_dx_.resize(Shape{R, D});  // [R, D]
        permute_rows(dx_.cview(), moe_dy_.view(), true);
        moe::moe_backward<T, BackendT>(expert_weights(b), a.moe_x.cview(), moe_dy_.cview(), moe_dx_.view(),
                                       expert_grads(b), ctx, aux_scale_, exchange(l), prec());
        permute_rows(moe_dx_.cview(), dln_.view(), false);
      } else {
        moe::moe_backward<T, BackendT>(expert_weights(b), a.ln2.cview(), dx_.cview(), dln_.view(), expert_grads(b), ctx,
                                       aux_scale_, exchange(l), prec());
      }
    }
    // dx_mid = dx_out + LN2^T dln
    dtmp_.resize(Shape{R, D});  // [R, D]
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      const BlockRefs& bt = tower_block(tw, l);
      O::layernorm_backward(rows(a.x_mid.cview(), r0, r1), pv(bt.ln2_w), rows(a.ln2_mean.cview(), r0, r1),
                            rows(a.ln2_rstd.cview(), r0, r1), rows(dln_.cview(), r0, r1), rows(dtmp_.view(), r0, r1),
                            pg(bt.ln2_w), pg(bt.ln2_b));
    });
    O::add_into(dtmp_.cview(), dx_.view());
    // Attention per modality: dln = Attn^T dx_mid.
    if (Bi_ > 0)
      O::self_attention_backward(attn_weights(b.attn), cfg_.heads, img_rows(a.ln1.cview()), CView<std::uint8_t, S>{},
                                 a.attn_img, img_rows(dx_.cview()), img_rows(dln_.view()), attn_grads(b.attn), prec());
    if (Bt_ > 0) {
      const AttnRefs& ta = tower_block(text_tower(), l).attn;
      O::self_attention_backward(attn_weights(ta), cfg_.heads, txt_rows(a.ln1.cview()), text_mask(), a.attn_txt,
                                 txt_rows(dx_.cview()), txt_rows(dln_.view()), attn_grads(ta), prec());
    }
    for_each_tower(R, [&](int tw, index_t r0, index_t r1) {
      const BlockRefs& bt = tower_block(tw, l);
      O::layernorm_backward(rows(a.x_in.cview(), r0, r1), pv(bt.ln1_w), rows(a.ln1_mean.cview(), r0, r1),
                            rows(a.ln1_rstd.cview(), r0, r1), rows(dln_.cview(), r0, r1), rows(dtmp_.view(), r0, r1),
                            pg(bt.ln1_w), pg(bt.ln1_b));
    });
    O::add_into(dtmp_.cview(), dx_.view());
  }

  // ---- heads --------------------------------------------------------------------------------------------

  struct HeadActs {
    DTensor<T> pooled;  // [B, D]
    MapHeadCache<T, S> map;
    DTensor<T> proj;    // [B, P] before normalisation
    DTensor<T> norms;   // [B]
    DTensor<T> dpooled, dproj;
  };

  MapHeadWeights<T, S> map_weights(const HeadRefs& h) const {
    return {pv(h.probe), attn_weights(h.attn), pv(h.ln_w), pv(h.ln_b), pv(h.mlp.fc1_w), pv(h.mlp.fc1_b),
            pv(h.mlp.fc2_w), pv(h.mlp.fc2_b)};
  }
  MapHeadGrads<T, S> map_grads(const HeadRefs& h) {
    return {pg(h.probe), attn_grads(h.attn), pg(h.ln_w), pg(h.ln_b), pg(h.mlp.fc1_w), pg(h.mlp.fc1_b),
            pg(h.mlp.fc2_w), pg(h.mlp.fc2_b)};
  }

  void head_forward(const HeadRefs& h, HeadActs& a, CView<T, S> x, CView<std::uint8_t, S> mask, DTensor<T>& z) {
    const index_t B = x.dim(0), D = cfg_.width, P = cfg_.proj_dim;
    a.pooled.resize(Shape{B, D});  // [B, D]
    if (h.kind == Pooling::Map)
      O::map_head_forward(map_weights(h), cfg_.heads, cfg_.gelu, static_cast<T>(cfg_.ln_eps), x, mask,
                               a.pooled.view(), a.map, prec());
    else
      O::pool_forward(h.kind, x, mask, a.pooled.view());
    a.proj.resize(Shape{B, P});  // [B, P]
    O::linear_forward(a.pooled.cview(), pv(h.proj), CView<T, S>{}, a.proj.view(), prec());
    a.norms.resize(Shape{B});  // [B]
    z.resize(Shape{B, P});     // [B, P]
    O::l2_normalize_forward(a.proj.cview(), z.view(), a.norms.view());
  }

  void head_backward(const HeadRefs& h, HeadActs& a, CView<T, S> x, CView<std::uint8_t, S> mask, CView<T, S> z,
                     CView<T, S> dz, View<T, S> dx) {
    const index_t B = x.dim(0), D = cfg_.width, P = cfg_.proj_dim;
    expect_shape(dz, Shape{B, P}, "backward: embedding gradient");
    a.dproj.resize(Shape{B, P});   // [B, P]
    a.dpooled.resize(Shape{B, D}); // [B, D]
    O::l2_normalize_backward(a.proj.cview(), z, a.norms.cview(), dz, a.dproj.view());
    O::linear_backward(a.pooled.cview(), pv(h.proj), a.dproj.cview(), a.dpooled.view(), pg(h.proj), View<T, S>{}, prec());
    if (h.kind == Pooling::Map)
      O::map_head_backward(map_weights(h), cfg_.heads, cfg_.gelu, x, mask, a.map, a.dpooled.cview(), dx,
                                map_grads(h), prec());
    else
      O::pool_backward(h.kind, mask, a.dpooled.cview(), dx);
  }

  // Counter-based draws: element i depends on (r, first + i) only, so the parallel split cannot change the values.
  static void fill(View<T> v, const Rng& r, double std, index_t first = 0) {
    parallel_for(0, v.numel(), 1 << 14, [&](index_t i0, index_t i1) {
      for (index_t i = i0; i < i1; ++i) v[i] = static_cast<T>(std * r.normal(0, static_cast<std::uint64_t>(first + i)));
    });
  }

  ModelConfig cfg_;
  Router router_{};
  ParamStore<T, memory_space> params_;
  ParamRef img_patch_w_, img_patch_b_, img_pos_, txt_embed_, txt_pos_, norm_w_, norm_b_, logit_scale_;
  std::vector<BlockRefs> blocks_;
  std::vector<BlockRefs> txt_blocks_;      // the text tower's blocks (towers 2 only)
  ParamRef txt_norm_w_, txt_norm_b_;       // and its final LayerNorm
  HeadRefs img_head_, txt_head_;
  // final_from_[l]: the flat gradient is final from this offset on once blocks l..depth-1 are through backward.
  std::vector<index_t> final_from_;

  // Activations of the last forward (kept for backward; buffers are reused across steps).
  std::uint64_t noise_seed_ = 0x11A0E;
  index_t Bi_ = 0, Bt_ = 0, Ni_ = 0;
  std::uint64_t generation_ = 0, loss_generation_ = ~std::uint64_t{0};  // forward() / loss() call counters
  std::vector<std::uint8_t> modality_;
  // Routing of the last forward: groups, their order, the noise offset, the aux-loss gradient scale.
  index_t moe_group_tokens_ = 0, first_token_ = 0;
  bool moe_permute_ = false;
  std::vector<index_t> moe_perm_;
  DTensor<index_t> moe_perm_dev_;          // moe_perm_ in the model's memory (a device backend)
  CView<index_t, S> moe_perm_idx_;         // moe_perm_ as the row ops read it
  std::vector<std::uint8_t> moe_modality_;
  DTensor<T> moe_y_, moe_dy_, moe_dx_;
  double aux_scale_ = 1.0;
  // Expert parallelism: this model's part of the experts, the group's communicator, one exchange per block.
  ExpertShard ep_;
  std::optional<dist::AnyComm> ep_comm_;
  std::optional<dist::BasicAnyComm<S>> ep_blocks_comm_;  // set_expert_blocks_comm (device models)
  std::vector<moe::ExpertExchange<T, S>> ep_ex_;
  BasicWeightMirror<S> mirror_;  // the weights in bf16, in the backend's memory (Bf16Mixed only)
  bool pack_weights_ = false;    // the last forward ran in evaluation mode (prec())
  bool keep_packed_ = true;      // set_keep_packed_weights
  // Fp32 on host memory: the packed copies of the weights its evaluation forwards' products keep (prec()), and
  // what the policy carries for them, set by refresh_weight_mirror.
  Fp32WeightStore fp32_store_;
  Fp32Weights fp32_weights_{};
  // Data parallel (the loss over gathered embeddings): the whole batch's embeddings and this call's place in it.
  struct DataParallelLoss {
    bool on = false;
    index_t first_pair = 0;
    DTensor<T> img_all, txt_all;
  } dp_;
  DTensor<T> images_, patches_;
  DTensor<std::int32_t> texts_;
  Tensor<std::uint8_t> txt_mask_host_;     // the text key mask, made on the host
  DTensor<std::uint8_t> txt_mask_;
  std::vector<BlockActs> blocks_acts_;
  DTensor<T> eval_x_[2];  // evaluation: block inputs/outputs ping-pong here (blocks_acts_[0] is the scratch)
  std::vector<moe::MoeContext<T, S>> moe_ctx_;
  DTensor<T> x_final_, xn_, xn_mean_, xn_rstd_;
  HeadActs img_acts_, txt_acts_;
  DTensor<T> z_img_, z_txt_;               // the last forward's normalised embeddings [B, P]
  DTensor<T> logits_, dz_img_, dz_txt_;
  DTensor<T> dz_in_img_, dz_in_txt_;       // backward_from's host gradients, copied in (a device backend)
  DTensor<T> dxn_, dx_, dln_, dtmp_, dh_;
};

// The project's own programs compile Limoe<float> and Limoe<double> once (src/instances/, CMake target
// limoe_instances, which defines LIMOE_EXTERN_TEMPLATES for whatever links it) instead of in every translation
// unit. Users of the header-only library never define the macro and instantiate what they use, as usual.
#if defined(LIMOE_EXTERN_TEMPLATES)
extern template class Limoe<float>;
extern template class Limoe<double>;
extern template class Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cpu, Bf16Mixed>;
#endif

}  // namespace limoe
