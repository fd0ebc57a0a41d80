// limoe/data/dataset.hpp: what a data set yields (image-text pairs), the Dataset concept and a type-erased
// AnyDataset so a program can pick its data at run time.
//
// Images are float in [-1, 1], row-major [H, W, C] (spec section 1: "image [H, W, C] in [-1, 1]"). Captions are
// plain strings; the tokenizer (limoe/data/tokenizer.hpp) turns them into ids later, in the loader.
#pragma once

#include <concepts>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe::data {

// Image size of a data set or of the model's input.
struct ImageShape {
  index_t height = 28;
  index_t width = 28;
  index_t channels = 1;
  index_t numel() const { return height * width * channels; }
  friend bool operator==(const ImageShape&, const ImageShape&) = default;
  std::string str() const {
    return std::to_string(height) + "x" + std::to_string(width) + "x" + std::to_string(channels);
  }
};

enum class Split { train, test };

// Which caption templates a data set draws from. Training captions never use the evaluation templates, so
// zero-shot prompts are text the model has not seen in this form.
enum class Templates { train, eval };

// One image-text pair.
struct Example {
  std::vector<float> image;  // [H * W * C] row-major [H, W, C], values in [-1, 1]
  std::string caption;
  int label = -1;            // class id, or -1 when the data set has no labels
};

// What the loader hands to training: a batch of images, their tokenized captions and labels.
struct ImageTextBatch {
  Tensor<float> images;              // [B, H, W, C] in [-1, 1]
  Tensor<std::int32_t> texts;        // [B, T] token ids (limoe/data/tokenizer.hpp: 0 PAD, 1 UNK, 2 EOS)
  std::vector<int> labels;           // [B], -1 where unknown
  std::vector<std::string> captions; // [B] the untokenized captions
  std::vector<index_t> indices;      // [B] the data set index of each example
  index_t epoch = 0;                 // the epoch this batch belongs to
  index_t batch = 0;                 // its position within the epoch
  index_t size() const { return static_cast<index_t>(labels.size()); }
};

// A data set of image-text pairs.
//  - get(i, rng): example i; its caption is drawn from the TRAINING templates with the counter-based rng
//    (counter stream = i), so the same (rng, i) always gives the same caption. get(i, rng, Templates::eval)
//    draws from the evaluation templates instead (for retrieval evaluation).
//  - class_prompts(c): the evaluation templates filled with class c's canonical name (spec section 5: zero-shot
//    classification averages the embeddings of these). Throws when the data set has no labels.
//  - corpus(): sentences that contain every word the data set's captions and prompts can use (to build a
//    tokenizer's vocabulary).
template <class D>
concept Dataset = requires(const D& d, index_t i, const Rng& rng, int c) {
  { d.size() } -> std::convertible_to<index_t>;
  { d.image_shape() } -> std::same_as<ImageShape>;
  { d.get(i, rng) } -> std::same_as<Example>;
  { d.get(i, rng, Templates::eval) } -> std::same_as<Example>;
  { d.has_labels() } -> std::convertible_to<bool>;
  { d.class_names() } -> std::convertible_to<std::vector<std::string>>;
  { d.class_prompts(c) } -> std::same_as<std::vector<std::string>>;
  { d.corpus() } -> std::same_as<std::vector<std::string>>;
  { d.name() } -> std::convertible_to<std::string>;
};

// A Dataset whose type is chosen at run time. Copies share the underlying data set (read-only, thread-safe
// as long as the wrapped type's const members are).
class AnyDataset {
 public:
  AnyDataset() = default;
  template <Dataset D>
    requires(!std::same_as<std::remove_cvref_t<D>, AnyDataset>)
  explicit AnyDataset(D d) : impl_(std::make_shared<Model<D>>(std::move(d))) {}

  bool valid() const { return impl_ != nullptr; }
  index_t size() const { return self().size(); }
  ImageShape image_shape() const { return self().image_shape(); }
  Example get(index_t i, const Rng& rng, Templates t = Templates::train) const { return self().get(i, rng, t); }
  bool has_labels() const { return self().has_labels(); }
  std::vector<std::string> class_names() const { return self().class_names(); }
  std::vector<std::string> class_prompts(int c) const { return self().class_prompts(c); }
  std::vector<std::string> corpus() const { return self().corpus(); }
  std::string name() const { return self().name(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual index_t size() const = 0;
    virtual ImageShape image_shape() const = 0;
    virtual Example get(index_t, const Rng&, Templates) const = 0;
    virtual bool has_labels() const = 0;
    virtual std::vector<std::string> class_names() const = 0;
    virtual std::vector<std::string> class_prompts(int) const = 0;
    virtual std::vector<std::string> corpus() const = 0;
    virtual std::string name() const = 0;
  };
  template <class D>
  struct Model final : Concept {
    explicit Model(D d) : d(std::move(d)) {}
    index_t size() const override { return static_cast<index_t>(d.size()); }
    ImageShape image_shape() const override { return d.image_shape(); }
    Example get(index_t i, const Rng& r, Templates t) const override { return d.get(i, r, t); }
    bool has_labels() const override { return d.has_labels(); }
    std::vector<std::string> class_names() const override { return d.class_names(); }
    std::vector<std::string> class_prompts(int c) const override { return d.class_prompts(c); }
    std::vector<std::string> corpus() const override { return d.corpus(); }
    std::string name() const override { return d.name(); }
    D d;
  };
  const Concept& self() const {
    LIMOE_CHECK(impl_ != nullptr, "AnyDataset: empty (default-constructed) data set");
    return *impl_;
  }
  std::shared_ptr<const Concept> impl_;
};

static_assert(Dataset<AnyDataset>);

namespace detail {
// Uniform integer in [0, n) from counter (stream, index) of rng; n > 0. The modulo bias is below 2^-32 for the
// small n used here (template and synonym counts, shuffles of at most millions).
inline std::uint64_t uniform_int(const Rng& rng, std::uint64_t stream, std::uint64_t index, std::uint64_t n) {
  const auto b = rng.bits(stream, index);
  const std::uint64_t u = (std::uint64_t{b[0]} << 32) | b[1];
  return u % n;
}
// Pixel byte 0..255 to [-1, 1].
// Exact at 0 (-1) and 255 (+1).
inline float pixel_to_unit(std::uint8_t v) { return (static_cast<float>(v) - 127.5f) / 127.5f; }
}  // namespace detail

}  // namespace limoe::data
