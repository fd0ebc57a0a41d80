// limoe/data/synthetic.hpp: a caption data set generated in code, needing no file.
//
// Each example is one shape (circle, square, triangle, cross, diamond, ring: the label) of a size (small, medium,
// large) at a position (left, right, top, bottom, centre) in a colour (grayscale images: white or grey; colour
// images: eight colours) on a dark, slightly noisy background. The caption describes all four attributes
// ("a small red circle on the left"). Example i is a pure function of (seed, split, i): rendering on demand is
// deterministic, needs no storage and takes microseconds. Used by the tests, and as the fallback when
// Fashion-MNIST is not installed.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/data/captions.hpp"
#include "limoe/data/dataset.hpp"

namespace limoe::data {

struct SyntheticOptions {
  ImageShape image{28, 28, 1};  // channels 1 (grayscale) or 3 (colour)
  index_t size = 10000;         // examples per split
  std::uint64_t seed = 0;       // train and test draw different examples from the same seed
  float noise = 0.03f;          // standard deviation of the background noise, in [-1, 1] units
};

class SyntheticShapes {
 public:
  static constexpr int kNumShapes = 6;

  // What example i shows.
  struct Attributes {
    int shape = 0;     // label: index into shape_names()
    int size = 0;      // 0 small, 1 medium, 2 large
    int position = 0;  // 0 left, 1 right, 2 top, 3 bottom, 4 centre
    int colour = 0;    // index into colour_names(channels)
  };

  explicit SyntheticShapes(const SyntheticOptions& opt = {}, Split split = Split::train)
      : opt_(opt), split_(split), rng_(Rng(opt.seed).derive(split == Split::train ? 0x5A1E : 0x7E57)) {
    LIMOE_CHECK(opt.image.channels == 1 || opt.image.channels == 3, "SyntheticShapes: channels must be 1 or 3, got ",
                opt.image.channels);
    LIMOE_CHECK(opt.image.height >= 8 && opt.image.width >= 8, "SyntheticShapes: image must be at least 8x8, got ",
                opt.image.str());
    LIMOE_CHECK(opt.size > 0, "SyntheticShapes: size must be positive, got ", opt.size);
    LIMOE_CHECK(opt.noise >= 0.0f, "SyntheticShapes: noise must be >= 0, got ", opt.noise);
  }

  static const std::vector<std::string>& shape_names() {
    static const std::vector<std::string> v = {"circle", "square", "triangle", "cross", "diamond", "ring"};
    return v;
  }
  static const std::vector<std::vector<std::string>>& shape_synonyms() {
    static const std::vector<std::vector<std::string>> v = {{"circle", "disc"},       {"square", "box"},
                                                            {"triangle"},             {"cross", "plus sign"},
                                                            {"diamond", "rhombus"},   {"ring", "donut"}};
    return v;
  }
  static const std::vector<std::vector<std::string>>& size_words() {
    static const std::vector<std::vector<std::string>> v = {{"small", "tiny"}, {"medium", "medium-sized"},
                                                            {"large", "big"}};
    return v;
  }
  static const std::vector<std::vector<std::string>>& position_phrases() {
    static const std::vector<std::vector<std::string>> v = {{"on the left", "at the left side"},
                                                            {"on the right", "at the right side"},
                                                            {"at the top", "near the top"},
                                                            {"at the bottom", "near the bottom"},
                                                            {"in the centre", "in the middle"}};
    return v;
  }
  static std::vector<std::string> colour_names(index_t channels) {
    if (channels == 1) return {"white", "grey"};
    return {"red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"};
  }
  // Training templates: "{}" is the object ("small red circle"), "{p}" the position phrase.
  static const std::vector<std::string>& train_templates() {
    static const std::vector<std::string> v = {
        "a {} {p}", "a picture of a {} {p}", "there is a {} {p}", "a {} placed {p}", "an image of a {} {p}",
        "a photo with a {} {p}", "one {} {p}", "a {} drawn {p}", "a {} {p} on a dark background",
        "the picture shows a {} {p}"};
    return v;
  }
  // Held-out full-description templates (Templates::eval captions, for retrieval evaluation).
  static const std::vector<std::string>& eval_caption_templates() {
    static const std::vector<std::string> v = {"a rendering of a {} {p}.", "a drawing of a {} {p}.",
                                               "a sketch showing a {} {p}."};
    return v;
  }
  // Zero-shot prompt templates over the shape kinds.
  static const std::vector<std::string>& prompt_templates() {
    static const std::vector<std::string> v = {"a photo of a {}.",    "a rendering of a {}.",
                                               "a drawing of a {}.",  "a {} shape.",
                                               "a sketch of a {}.",   "a simple {} on a black background."};
    return v;
  }

  index_t size() const { return opt_.size; }
  ImageShape image_shape() const { return opt_.image; }
  Split split() const { return split_; }
  const SyntheticOptions& options() const { return opt_; }
  bool has_labels() const { return true; }
  std::string name() const {
    return std::string("synthetic-shapes/") + (split_ == Split::train ? "train" : "test");
  }
  std::vector<std::string> class_names() const { return shape_names(); }
  std::vector<std::string> class_prompts(int c) const {
    LIMOE_CHECK(c >= 0 && c < kNumShapes, "SyntheticShapes: class id ", c, " out of range 0..", kNumShapes - 1);
    std::vector<std::string> out;
    for (const auto& t : prompt_templates()) out.push_back(fill_template(t, shape_names()[static_cast<std::size_t>(c)]));
    return out;
  }

  Attributes attributes(index_t i) const {
    check(i);
    const auto b = rng_.bits(static_cast<std::uint64_t>(i), 0);
    Attributes a;
    a.shape = static_cast<int>(b[0] % kNumShapes);
    a.size = static_cast<int>(b[1] % 3);
    a.position = static_cast<int>(b[2] % 5);
    a.colour = static_cast<int>(b[3] % colour_names(opt_.image.channels).size());
    return a;
  }

  // Caption of attributes `a`: template, synonyms chosen by counters (stream, 0..3) of rng.
  std::string describe(const Attributes& a, const Rng& rng, std::uint64_t stream,
                       Templates which = Templates::train) const {
    const auto& tmpls = which == Templates::train ? train_templates() : eval_caption_templates();
    const bool canonical = which == Templates::eval;
    auto pick = [&](const std::vector<std::string>& v, std::uint64_t k) -> const std::string& {
      return canonical ? v.front() : v[detail::uniform_int(rng, stream, k, v.size())];
    };
    const std::string& t = tmpls[detail::uniform_int(rng, stream, 0, tmpls.size())];
    const std::string object = pick(size_words()[static_cast<std::size_t>(a.size)], 1) + " " +
                               colour_names(opt_.image.channels)[static_cast<std::size_t>(a.colour)] + " " +
                               pick(shape_synonyms()[static_cast<std::size_t>(a.shape)], 2);
    return fill(t, object, pick(position_phrases()[static_cast<std::size_t>(a.position)], 3));
  }

  Example get(index_t i, const Rng& rng, Templates which = Templates::train) const {
    const Attributes a = attributes(i);
    Example e;
    e.image = render(i, a);
    e.label = a.shape;
    e.caption = describe(a, rng, static_cast<std::uint64_t>(i), which);
    return e;
  }

  std::vector<std::string> corpus() const {
    std::vector<std::string> out;
    const auto colours = colour_names(opt_.image.channels);
    for (const auto* tmpls : {&train_templates(), &eval_caption_templates()})
      for (const auto& t : *tmpls) {
        for (const auto& syn : shape_synonyms())
          for (const auto& s : syn) out.push_back(fill(t, "small " + colours[0] + " " + s, "on the left"));
        for (const auto& syn : size_words())
          for (const auto& s : syn) out.push_back(fill(t, s + " " + colours[0] + " circle", "on the left"));
        for (const auto& c : colours) out.push_back(fill(t, "small " + c + " circle", "on the left"));
        for (const auto& syn : position_phrases())
          for (const auto& p : syn) out.push_back(fill(t, "small " + colours[0] + " circle", p));
      }
    for (int c = 0; c < kNumShapes; ++c)
      for (auto& p : class_prompts(c)) out.push_back(std::move(p));
    return out;
  }

 private:
  static std::string fill(const std::string& t, const std::string& object, const std::string& pos) {
    std::string s = t;
    const auto at = s.find("{p}");
    if (at != std::string::npos) s.replace(at, 3, pos);
    return fill_template(s, object);
  }

  // Is (dx, dy), in units of the shape's radius from its centre (y down), inside shape `k`?
  static bool inside(int k, float dx, float dy) {
    const float ax = std::abs(dx), ay = std::abs(dy), r2 = dx * dx + dy * dy;
    switch (k) {
      case 0: return r2 <= 1.0f;                                                      // circle
      case 1: return ax <= 0.8f && ay <= 0.8f;                                         // square
      case 2: return dy >= -0.85f && dy <= 0.75f && ax <= 0.95f * (dy + 0.85f) / 1.6f;  // triangle, apex up
      case 3: return (ax <= 0.3f && ay <= 1.0f) || (ay <= 0.3f && ax <= 1.0f);         // cross
      case 4: return ax + ay <= 1.0f;                                                  // diamond
      default: return r2 <= 1.0f && r2 >= 0.3f;                                       // ring
    }
  }

  std::vector<float> render(index_t i, const Attributes& a) const {
    const index_t H = opt_.image.height, W = opt_.image.width, C = opt_.image.channels;
    const auto j = rng_.bits(static_cast<std::uint64_t>(i), 1);  // position jitter
    const float side = static_cast<float>(std::min(H, W));
    const float radius = side * std::array<float, 3>{0.12f, 0.18f, 0.25f}[static_cast<std::size_t>(a.size)];
    static constexpr std::array<std::array<float, 2>, 5> kCentre = {
        {{0.28f, 0.5f}, {0.72f, 0.5f}, {0.5f, 0.28f}, {0.5f, 0.72f}, {0.5f, 0.5f}}};
    const float jx = (static_cast<float>(j[0] % 1001) / 1000.0f - 0.5f) * 0.06f * side;
    const float jy = (static_cast<float>(j[1] % 1001) / 1000.0f - 0.5f) * 0.06f * side;
    const float cx = kCentre[static_cast<std::size_t>(a.position)][0] * static_cast<float>(W) + jx;
    const float cy = kCentre[static_cast<std::size_t>(a.position)][1] * static_cast<float>(H) + jy;
    const std::array<float, 3> rgb = colour_value(a.colour);
    std::vector<float> img(static_cast<std::size_t>(opt_.image.numel()));
    std::uint64_t counter = 2;  // counters (i, 2...) give the background noise
    for (index_t y = 0; y < H; ++y)
      for (index_t x = 0; x < W; ++x) {
        int hits = 0;  // 2x2 supersampling: coverage in quarters, for smooth edges
        for (int sy = 0; sy < 2; ++sy)
          for (int sx = 0; sx < 2; ++sx) {
            const float px = static_cast<float>(x) + 0.25f + 0.5f * static_cast<float>(sx);
            const float py = static_cast<float>(y) + 0.25f + 0.5f * static_cast<float>(sy);
            hits += inside(a.shape, (px - cx) / radius, (py - cy) / radius);
          }
        const float cover = static_cast<float>(hits) * 0.25f;
        for (index_t c = 0; c < C; ++c) {
          const float noise =
              opt_.noise > 0.0f ? opt_.noise * static_cast<float>(rng_.normal(static_cast<std::uint64_t>(i), counter++))
                                : 0.0f;
          const float fg = 2.0f * (C == 1 ? rgb[0] : rgb[static_cast<std::size_t>(c)]) - 1.0f;
          const float v = (1.0f - cover) * (-0.9f + noise) + cover * fg;
          img[static_cast<std::size_t>((y * W + x) * C + c)] = std::clamp(v, -1.0f, 1.0f);
        }
      }
    return img;
  }

  std::array<float, 3> colour_value(int colour) const {
    if (opt_.image.channels == 1) return colour == 0 ? std::array<float, 3>{1.0f, 1.0f, 1.0f}
                                                     : std::array<float, 3>{0.45f, 0.45f, 0.45f};
    static constexpr std::array<std::array<float, 3>, 8> kRgb = {{{1.0f, 0.1f, 0.1f},
                                                                  {0.1f, 0.9f, 0.1f},
                                                                  {0.15f, 0.25f, 1.0f},
                                                                  {1.0f, 0.95f, 0.1f},
                                                                  {1.0f, 0.1f, 1.0f},
                                                                  {0.1f, 1.0f, 1.0f},
                                                                  {1.0f, 1.0f, 1.0f},
                                                                  {1.0f, 0.55f, 0.05f}}};
    return kRgb[static_cast<std::size_t>(colour)];
  }

  void check(index_t i) const {
    LIMOE_CHECK(i >= 0 && i < size(), "SyntheticShapes: index ", i, " out of range 0..", size() - 1);
  }

  SyntheticOptions opt_;
  Split split_;
  Rng rng_;
};

static_assert(Dataset<SyntheticShapes>);

}  // namespace limoe::data
