// limoe/model/variants.hpp: blocks, heads and the tower layout as types; the LIMoE variants as one-line aliases.
//
// What changes the code is in the type: which blocks are MoE, E and K, the router and loss set of the MoE
// blocks, the pooling head of each modality, the backend and the scalar. Sizes (width, depth, heads, MLP
// width, patch, image, vocabulary, text length) stay data in a ModelConfig, so one instantiation serves every
// size of a layout. A user writes
//
//   limoe::variants::B16<limoe::Cpu, float> model;            // B/16 at its paper sizes
//   limoe::variants::B16<limoe::Cpu, float> small(cfg);       // the B/16 layout at other sizes (checked)
//
// or composes a layout of their own:
//
//   using Block = limoe::PreLnBlock<limoe::MultiHeadAttention, limoe::DenseMlp>;
//   using Sparse = limoe::PreLnBlock<limoe::MultiHeadAttention, limoe::MoeMlp<16, 2>>;
//   using Mine = limoe::TowerLayout<Block, Sparse, limoe::EveryOther<1>, limoe::MapHead, limoe::LastTokenHead>;
//   limoe::Model<Mine, limoe::Cpu, float> model(cfg);
//
// Model<Layout, B, T, Prec> is Limoe<T, Router, Losses, B, Prec> (model/model.hpp) built from a config that agrees with the
// layout: the constructor rejects a config whose experts, top_k, MoE blocks, pooling or routing order contradict
// the type, naming the field; Model::config(sizes) writes the layout into a config of any sizes. Presets by name
// (model/presets.hpp) still serve the command line and checkpoints; Layout::preset names the one whose sizes the
// default constructor uses.
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "limoe/backend/backend.hpp"
#include "limoe/core/enums.hpp"
#include "limoe/core/error.hpp"
#include "limoe/model/config.hpp"
#include "limoe/model/model.hpp"
#include "limoe/model/presets.hpp"
#include "limoe/moe/losses.hpp"
#include "limoe/moe/router.hpp"

namespace limoe {

// ---- blocks -------------------------------------------------------------------------------------------------

// Multi-head self-attention (ops/attention.hpp), per sequence: images [Bi, N, D], texts [Bt, T, D] (masked).
struct MultiHeadAttention {};

// The dense MLP: Linear(D -> M), GELU, Linear(M -> D).
struct DenseMlp {
  static constexpr bool is_moe = false;
};

// The stock LIMoE router for K choices: top-K of softmax(logits + Gaussian noise), Batch Priority Routing.
template <int K>
using StockRouter = moe::TopKRouter<moe::StaticTopK<K>, moe::GaussianNoise, moe::BatchPriorityOrder>;
// The same in token order (no BPR), for ablations.
template <int K>
using VanillaRouter = moe::TopKRouter<moe::StaticTopK<K>, moe::GaussianNoise, moe::VanillaOrder>;

namespace detail {
template <class R>
struct router_traits {
  static constexpr bool bpr = true;  // a custom router decides its own order; the config's flag is not read
  static constexpr bool stock = false;
};
template <class KP, class Order>
struct router_traits<moe::TopKRouter<KP, moe::GaussianNoise, Order>> {
  static constexpr bool bpr = std::is_same_v<Order, moe::BatchPriorityOrder>;
  static constexpr bool stock = true;
};
}  // namespace detail

// A sparse MoE MLP of E experts, K choices per token, over a router policy and an auxiliary-loss set
// (moe/router.hpp, moe/losses.hpp). The stock routers take their noise scale from the config's router.noise_std.
template <int E, int K, class Router = StockRouter<K>, class Losses = moe::DefaultAuxLosses>
struct MoeMlp {
  static_assert(E >= 1 && E <= moe::kMaxExperts, "MoeMlp: E must be in [1, kMaxExperts]");
  static_assert(K >= 1 && K <= E, "MoeMlp: K must be in [1, E]");
  static constexpr bool is_moe = true;
  static constexpr int experts = E;
  static constexpr int top_k = K;
  using router_type = Router;
  using losses_type = Losses;

  static Router make_router(const ModelConfig& cfg) {
    if constexpr (detail::router_traits<Router>::stock) {
      Router r{};
      r.noise = moe::GaussianNoise{cfg.router.noise_std};
      return r;
    } else {
      return Router{};
    }
  }
};

// A pre-LayerNorm transformer block: x += Attention(LN1(x)); x += Mlp(LN2(x)).
template <class Attention, class Mlp>
struct PreLnBlock {
  using attention_type = Attention;
  using mlp_type = Mlp;
};

// ---- heads --------------------------------------------------------------------------------------------------

// A pooling head (ops/pooling.hpp): tokens [B, N, D] -> [B, D], then the projection and L2 normalisation.
template <Pooling P>
struct PoolingHead {
  static constexpr Pooling kind = P;
};
using GapHead = PoolingHead<Pooling::Gap>;           // mean over (unmasked) tokens
using MapHead = PoolingHead<Pooling::Map>;           // attention pooling with a learned probe (+ LN, MLP)
using FirstTokenHead = PoolingHead<Pooling::First>;  // token 0
using LastTokenHead = PoolingHead<Pooling::Last>;    // the last unmasked token (the EOS)

// ---- where the MoE blocks go --------------------------------------------------------------------------------

// (The block lists are the presets' own, model/presets.hpp.)
struct AllBlocks {
  static std::vector<int> blocks(int depth) { return detail::every(depth); }
};
// Blocks First, First + 2, ... (LIMoE-B/32: from 1; H/14: from 9, the last 24 blocks every other).
template <int First>
struct EveryOther {
  static std::vector<int> blocks(int depth) { return detail::every_other(First, depth); }
};
struct NoBlocks {
  static std::vector<int> blocks(int) { return {}; }
};

// ---- the tower ----------------------------------------------------------------------------------------------

// One tower shared by images and text: dense blocks, MoE blocks at Placement, a head per modality.
template <class DenseBlock, class MoeBlock, class Placement, class ImageHead, class TextHead,
          const char* Preset = nullptr>
struct TowerLayout {
  using dense_block = DenseBlock;
  using moe_block = MoeBlock;
  using placement = Placement;
  using image_head = ImageHead;
  using text_head = TextHead;
  using mlp = typename MoeBlock::mlp_type;
  static_assert(!DenseBlock::mlp_type::is_moe, "TowerLayout: DenseBlock must have a DenseMlp");
  static_assert(mlp::is_moe, "TowerLayout: MoeBlock must have a MoeMlp");
  static_assert(std::is_same_v<typename DenseBlock::attention_type, MultiHeadAttention> &&
                    std::is_same_v<typename MoeBlock::attention_type, MultiHeadAttention>,
                "TowerLayout: the blocks' attention is MultiHeadAttention");
  static constexpr const char* preset = Preset;

  // Writes what the layout fixes into a config of any sizes.
  static ModelConfig apply(ModelConfig c) {
    c.experts = mlp::experts;
    c.top_k = mlp::top_k;
    c.moe_blocks = Placement::blocks(c.depth);
    c.towers = 1;
    c.pool_img = ImageHead::kind;
    c.pool_txt = TextHead::kind;
    if constexpr (detail::router_traits<typename mlp::router_type>::stock)
      c.router.bpr = detail::router_traits<typename mlp::router_type>::bpr;
    return c;
  }
  // Throws, naming the field, when `c` contradicts the layout.
  static void check(const ModelConfig& c, const char* who) {
    const ModelConfig want = apply(c);
    auto field = [&](bool ok, const char* name, auto got, auto expect) {
      LIMOE_CHECK(ok, who, ": the config's ", name, " = ", got, " contradicts the layout, which fixes ", name, " = ",
                  expect, " (use ", who, "::config(sizes) to write the layout into a config)");
    };
    field(c.experts == want.experts, "experts", c.experts, want.experts);
    field(c.top_k == want.top_k, "top_k", c.top_k, want.top_k);
    auto list = [](const std::vector<int>& v) {
      std::string s = "[";
      for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
      return s + "]";
    };
    field(c.towers == 1, "towers", c.towers, 1);
    field(c.moe_blocks == want.moe_blocks, "moe_blocks", list(c.moe_blocks), list(want.moe_blocks));
    field(c.pool_img == want.pool_img, "pool_img", pooling_name(c.pool_img), pooling_name(want.pool_img));
    field(c.pool_txt == want.pool_txt, "pool_txt", pooling_name(c.pool_txt), pooling_name(want.pool_txt));
    field(c.router.bpr == want.router.bpr, "router.bpr", c.router.bpr, want.router.bpr);
  }
};

// The model of a layout on backend B with scalar T and precision policy Prec (core/precision.hpp): Limoe with the
// layout's router and loss set.
template <class Layout, Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
class Model : public Limoe<T, typename Layout::mlp::router_type, typename Layout::mlp::losses_type, B, Prec> {
  using Base = Limoe<T, typename Layout::mlp::router_type, typename Layout::mlp::losses_type, B, Prec>;

 public:
  using layout = Layout;

  // The layout written into `sizes` (every other field kept).
  static ModelConfig config(const ModelConfig& sizes) { return Layout::apply(sizes); }
  // The layout at its preset's sizes.
  static ModelConfig config()
    requires(Layout::preset != nullptr)
  {
    return Layout::apply(preset(Layout::preset));
  }

  Model()
    requires(Layout::preset != nullptr)
      : Model(config()) {}
  explicit Model(const ModelConfig& cfg) : Base(checked(cfg), Layout::mlp::make_router(cfg)) {}

 private:
  static ModelConfig checked(const ModelConfig& cfg) {
    Layout::check(cfg, "limoe::Model");
    return cfg;
  }
};

// ---- the variants -------------------------------------------------------------------------------------------

namespace variants {
namespace names {
inline constexpr char S32[] = "S/32", B32[] = "B/32", B16[] = "B/16", L16[] = "L/16", H14[] = "H/14";
}  // namespace names

using DenseBlock = PreLnBlock<MultiHeadAttention, DenseMlp>;
template <int E, int K>
using MoeBlock = PreLnBlock<MultiHeadAttention, MoeMlp<E, K>>;

// semantics §2: S/32, B/32 every other block from 1 with 8 experts; B/16, L/16 every block with 8 experts;
// H/14 32 experts in every other block of the last 24; top-1; MAP heads on both modalities.
namespace layouts {
using S32 = TowerLayout<DenseBlock, MoeBlock<8, 1>, EveryOther<1>, MapHead, MapHead, names::S32>;
using B32 = TowerLayout<DenseBlock, MoeBlock<8, 1>, EveryOther<1>, MapHead, MapHead, names::B32>;
using B16 = TowerLayout<DenseBlock, MoeBlock<8, 1>, AllBlocks, MapHead, MapHead, names::B16>;
using L16 = TowerLayout<DenseBlock, MoeBlock<8, 1>, AllBlocks, MapHead, MapHead, names::L16>;
using H14 = TowerLayout<DenseBlock, MoeBlock<32, 1>, EveryOther<9>, MapHead, MapHead, names::H14>;
}  // namespace layouts

template <Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
using S32 = Model<layouts::S32, B, T, Prec>;
template <Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
using B32 = Model<layouts::B32, B, T, Prec>;
template <Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
using B16 = Model<layouts::B16, B, T, Prec>;
template <Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
using L16 = Model<layouts::L16, B, T, Prec>;
template <Backend B = Cpu, class T = float, PrecisionPolicy Prec = Fp32>
using H14 = Model<layouts::H14, B, T, Prec>;

}  // namespace variants
}  // namespace limoe
