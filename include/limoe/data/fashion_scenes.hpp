// limoe/data/fashion_scenes.hpp: compositional scenes built from Fashion-MNIST (`--data fashion-scenes`).
//
// Scene i of a split is a 56x56x3 canvas (black, -1) holding one or two Fashion-MNIST objects of that split, each
// tinted with one of six colours and drawn small (14x14, a 2x2 average) or large (28x28). Two objects stand in a
// relation: the first left of the second (the canvas's left and right halves) or above it (top and bottom
// halves). The caption says what is where: "a small red sandal left of a large blue shirt". Every choice is a
// pure function of (split, i): the scene is fixed, only the caption's template changes with the epoch's rng.
//
// Compositional zero-shot: some colour-noun combinations never appear in the training split (one colour per
// class, held_out()); the test split draws them like any other, so a model is tested on combinations it never
// saw. The label of a scene is the class of its first object (the left or top one).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/data/captions.hpp"
#include "limoe/data/dataset.hpp"
#include "limoe/data/fashion_mnist.hpp"

namespace limoe::data {

struct SceneObject {
  int cls = 0;          // Fashion-MNIST class
  int colour = 0;       // index into FashionScenes::colours()
  bool large = false;   // 28x28, else 14x14
  index_t x = 0, y = 0; // top-left corner on the canvas
  index_t source = 0;   // the Fashion-MNIST image drawn
};
struct Scene {
  std::vector<SceneObject> objects;  // 1 or 2
  int relation = 0;                  // two objects: 0 "left of", 1 "above"
};

class FashionScenes {
 public:
  static constexpr index_t kSide = 56;
  static constexpr int kColours = 6;

  // Loads the Fashion-MNIST split the scenes draw their objects from (limoe/data/fashion_mnist.hpp).
  explicit FashionScenes(Split split = Split::train, const std::string& dir = kFashionMnistDir)
      : split_(split), objects_(split, dir) {}

  static const std::array<const char*, kColours>& colours() {
    static const std::array<const char*, kColours> c{"red", "green", "blue", "yellow", "white", "purple"};
    return c;
  }
  static const std::array<const char*, 2>& relations() {
    static const std::array<const char*, 2> r{"left of", "above"};
    return r;
  }
  // The colour of class c that the training split never shows (one per class: 10 of the 60 combinations).
  static int held_out_colour(int cls) { return (3 * cls + 1) % kColours; }
  static bool held_out(int colour, int cls) { return colour == held_out_colour(cls); }

  index_t size() const { return objects_.size(); }
  ImageShape image_shape() const { return {kSide, kSide, 3}; }
  Split split() const { return split_; }
  bool has_labels() const { return true; }
  std::string name() const { return split_ == Split::train ? "fashion-scenes/train" : "fashion-scenes/test"; }
  std::vector<std::string> class_names() const { return fashion_mnist_captions().class_names; }
  // Zero-shot prompts name the class alone ("a photo of a sandal."), in the evaluation templates.
  std::vector<std::string> class_prompts(int c) const {
    fashion_mnist_captions().check_class(c);
    std::vector<std::string> out;
    for (const auto& t : eval_templates()) out.push_back(fill_template(t, "a " + class_name(c)));
    return out;
  }
  // Every word a caption or prompt can use: each template with every description, each relation.
  std::vector<std::string> corpus() const {
    std::vector<std::string> out;
    for (const auto* set : {&train_templates(), &eval_templates()})
      for (const auto& t : *set)
        for (int c = 0; c < 10; ++c)
          for (int col = 0; col < kColours; ++col)
            for (bool large : {false, true}) out.push_back(fill_template(t, describe_object(c, col, large)));
    for (const char* r : relations()) out.emplace_back(r);
    for (int c = 0; c < 10; ++c)
      for (auto& p : class_prompts(c)) out.push_back(std::move(p));
    return out;
  }

  // The scene of index i: a pure function of (split, i).
  Scene scene(index_t i) const {
    LIMOE_CHECK(i >= 0 && i < size(), "fashion-scenes: index ", i, " out of range 0..", size() - 1);
    const Rng r = Rng(split_ == Split::train ? 0x5CE7E5A1u : 0x5CE7E5B2u);
    const auto u = [&](std::uint64_t k, std::uint64_t n) {
      return static_cast<index_t>(detail::uniform_int(r, static_cast<std::uint64_t>(i), k, n));
    };
    Scene s;
    const int n = 1 + static_cast<int>(u(0, 2));
    s.relation = static_cast<int>(u(1, 2));
    for (int k = 0; k < n; ++k) {
      SceneObject o;
      const std::uint64_t base = 16 * static_cast<std::uint64_t>(k + 1);
      o.source = u(base, static_cast<std::uint64_t>(objects_.size()));
      o.cls = objects_.label(o.source);
      o.large = u(base + 1, 2) == 1;
      // Training scenes never show a held-out combination: their colour is uniform over the class's other five.
      const bool avoid = split_ == Split::train;
      o.colour = static_cast<int>(u(base + 2, avoid ? kColours - 1 : kColours));
      if (avoid && o.colour >= held_out_colour(o.cls)) ++o.colour;
      const index_t side = o.large ? 28 : 14;
      // One object: anywhere. Two: the first in the left (top) half, the second in the right (bottom) half.
      index_t x0 = 0, x1 = kSide - side, y0 = 0, y1 = kSide - side;
      if (n == 2) {
        index_t& lo = s.relation == 0 ? x0 : y0;
        index_t& hi = s.relation == 0 ? x1 : y1;
        lo = k == 0 ? 0 : kSide / 2;
        hi = k == 0 ? kSide / 2 - side : kSide - side;
      }
      o.x = x0 + u(base + 10, static_cast<std::uint64_t>(x1 - x0 + 1));
      o.y = y0 + u(base + 11, static_cast<std::uint64_t>(y1 - y0 + 1));
      s.objects.push_back(o);
    }
    return s;
  }

  // "a small red sandal".
  static std::string describe_object(int cls, int colour, bool large) {
    return std::string("a ") + (large ? "large " : "small ") + colours()[static_cast<std::size_t>(colour)] + " " +
           class_name(cls);
  }
  // "a small red sandal" / "a small red sandal left of a large blue shirt".
  static std::string describe(const Scene& s) {
    std::string d = describe_object(s.objects[0].cls, s.objects[0].colour, s.objects[0].large);
    if (s.objects.size() == 2)
      d += std::string(" ") + relations()[static_cast<std::size_t>(s.relation)] + " " +
           describe_object(s.objects[1].cls, s.objects[1].colour, s.objects[1].large);
    return d;
  }

  Example get(index_t i, const Rng& rng, Templates which = Templates::train) const {
    const Scene s = scene(i);
    Example e;
    e.image.assign(static_cast<std::size_t>(kSide * kSide * 3), -1.0f);
    for (const auto& o : s.objects) draw(o, e.image);
    e.label = s.objects[0].cls;
    const auto& templates = which == Templates::eval ? eval_templates() : train_templates();
    const auto t = detail::uniform_int(rng, static_cast<std::uint64_t>(i), 0, templates.size());
    e.caption = fill_template(templates[t], describe(s));
    return e;
  }

  static const std::vector<std::string>& train_templates() {
    static const std::vector<std::string> t{"{}", "a picture of {}", "an image showing {}", "a photo with {}",
                                            "there is {}", "a scene with {}"};
    return t;
  }
  static const std::vector<std::string>& eval_templates() {
    static const std::vector<std::string> t{"a photo of {}.", "a rendering of {}.", "an illustration of {}."};
    return t;
  }

 private:
  static std::string class_name(int c) { return fashion_mnist_captions().class_names[static_cast<std::size_t>(c)]; }
  // Tint of each colour (R, G, B) in [0, 1].
  static const std::array<std::array<float, 3>, kColours>& tints() {
    static const std::array<std::array<float, 3>, kColours> t{{{1.0f, 0.15f, 0.15f},
                                                               {0.15f, 1.0f, 0.15f},
                                                               {0.2f, 0.35f, 1.0f},
                                                               {1.0f, 0.9f, 0.1f},
                                                               {1.0f, 1.0f, 1.0f},
                                                               {0.7f, 0.2f, 0.9f}}};
    return t;
  }
  // The object's Fashion-MNIST image, resized (28 -> 14 by 2x2 means) and tinted, over the canvas (max).
  void draw(const SceneObject& o, std::vector<float>& canvas) const {
    const std::uint8_t* src = objects_.raw_image(o.source);
    const index_t side = o.large ? 28 : 14, step = o.large ? 1 : 2;
    const auto& tint = tints()[static_cast<std::size_t>(o.colour)];
    for (index_t y = 0; y < side; ++y)
      for (index_t x = 0; x < side; ++x) {
        float v = 0;
        for (index_t dy = 0; dy < step; ++dy)
          for (index_t dx = 0; dx < step; ++dx) v += src[(y * step + dy) * 28 + x * step + dx];
        v /= 255.0f * static_cast<float>(step * step);
        float* px = canvas.data() + ((o.y + y) * kSide + (o.x + x)) * 3;
        for (int ch = 0; ch < 3; ++ch) px[ch] = std::max(px[ch], -1.0f + 2.0f * v * tint[static_cast<std::size_t>(ch)]);
      }
  }

  Split split_;
  FashionMnist objects_;
};

static_assert(Dataset<FashionScenes>);

}  // namespace limoe::data
