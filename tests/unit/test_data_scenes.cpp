// The Fashion-MNIST scenes (`--data fashion-scenes`): what is drawn is what the caption says, the training split
// never shows a held-out colour-noun combination while the test split does, scenes are fixed per index, and
// the corpus covers every caption and prompt.
#include <doctest/doctest.h>

#include <algorithm>
#include <set>
#include <sstream>

#include "limoe/data/fashion_scenes.hpp"
#include "limoe/data/tokenizer.hpp"
#include "support/skip.hpp"

using namespace limoe;
using namespace limoe::data;

namespace {
// The bounding box of the lit pixels (any channel above -1) inside [x0, x1) x [y0, y1).
struct Box {
  index_t x0 = 1 << 20, y0 = 1 << 20, x1 = -1, y1 = -1;
  bool empty() const { return x1 < 0; }
};
Box lit(const std::vector<float>& img, index_t x0, index_t x1, index_t y0, index_t y1) {
  Box b;
  for (index_t y = y0; y < y1; ++y)
    for (index_t x = x0; x < x1; ++x) {
      const float* p = img.data() + (y * 56 + x) * 3;
      if (p[0] > -1 || p[1] > -1 || p[2] > -1) b.x0 = std::min(b.x0, x), b.x1 = std::max(b.x1, x), b.y0 = std::min(b.y0, y), b.y1 = std::max(b.y1, y);
    }
  return b;
}
}  // namespace

TEST_CASE("fashion-scenes: drawings, captions, held-out combinations, determinism, corpus") {
  if (!fashion_mnist_available())
    LIMOE_SKIP("Fashion-MNIST is not installed at ", kFashionMnistDir, " (Debian: dataset-fashion-mnist)");
  const FashionScenes train(Split::train), test(Split::test);
  CHECK(train.size() == 60000);
  CHECK(test.size() == 10000);
  CHECK(train.image_shape() == ImageShape{56, 56, 3});
  CHECK(train.name() == "fashion-scenes/train");
  const Rng rng(3), other(4);

  int two = 0, left = 0, above = 0, seen_held_out_test = 0, large = 0;
  std::set<int> colours_seen;
  for (index_t i = 0; i < 3000; ++i) {
    const Scene s = train.scene(i);
    REQUIRE((s.objects.size() == 1 || s.objects.size() == 2));
    for (const auto& o : s.objects) {
      CHECK_FALSE(FashionScenes::held_out(o.colour, o.cls));  // never in training
      colours_seen.insert(o.colour);
      large += o.large;
    }
    const Example e = train.get(i, rng);
    CHECK(e.image.size() == 56u * 56u * 3u);
    CHECK(e.label == s.objects[0].cls);
    // The caption names every object with its size and colour, and the relation.
    CHECK(e.caption.find(FashionScenes::describe(s)) != std::string::npos);
    // Fixed per index: another rng changes at most the template, never the picture.
    const Example f = train.get(i, other, Templates::eval);
    CHECK(f.image == e.image);
    CHECK(f.caption.find(FashionScenes::describe(s)) != std::string::npos);
    if (s.objects.size() == 2) {
      ++two;
      const auto& a = s.objects[0];
      const auto& b = s.objects[1];
      // The first object stands in the left (top) half, the second in the right (bottom) half.
      if (s.relation == 0) {
        ++left;
        CHECK(a.x + (a.large ? 28 : 14) <= 28);
        CHECK(b.x >= 28);
        CHECK(e.caption.find(" left of ") != std::string::npos);
        const Box l = lit(e.image, 0, 28, 0, 56), r = lit(e.image, 28, 56, 0, 56);
        CHECK((l.empty() || (l.x0 >= a.x && l.x1 < a.x + (a.large ? 28 : 14))));
        CHECK((r.empty() || (r.x0 >= b.x && r.x1 < b.x + (b.large ? 28 : 14))));
      } else {
        ++above;
        CHECK(a.y + (a.large ? 28 : 14) <= 28);
        CHECK(b.y >= 28);
        CHECK(e.caption.find(" above ") != std::string::npos);
      }
    }
    CHECK(*std::min_element(e.image.begin(), e.image.end()) >= -1.0f);
    CHECK(*std::max_element(e.image.begin(), e.image.end()) <= 1.0f);
  }
  CHECK(two > 1200);
  CHECK(two < 1800);
  CHECK(left > 300);
  CHECK(above > 300);
  CHECK(large > 1500);
  CHECK(colours_seen.size() == 6);
  for (index_t i = 0; i < 3000; ++i)
    for (const auto& o : test.scene(i).objects) seen_held_out_test += FashionScenes::held_out(o.colour, o.cls);
  CHECK(seen_held_out_test > 300);  // about 1/6 of the test objects

  // The tint: a red object lights the red channel most; a white one all three alike.
  for (index_t i = 0; i < 400; ++i) {
    const Scene s = train.scene(i);
    if (s.objects.size() != 1) continue;
    const auto& o = s.objects[0];
    const Example e = train.get(i, rng);
    double sum[3] = {0, 0, 0};
    for (index_t k = 0; k < 56 * 56; ++k)
      for (int ch = 0; ch < 3; ++ch) sum[ch] += e.image[static_cast<std::size_t>(k * 3 + ch)] + 1.0;
    if (std::string(FashionScenes::colours()[static_cast<std::size_t>(o.colour)]) == "red") {
      CHECK(sum[0] > 3 * sum[1]);
      CHECK(sum[0] > 3 * sum[2]);
    } else if (std::string(FashionScenes::colours()[static_cast<std::size_t>(o.colour)]) == "white") {
      CHECK(std::abs(sum[0] - sum[2]) < 1e-3 * sum[0]);
    }
  }

  // Every caption and prompt tokenizes without an unknown word under a vocabulary built from the corpus.
  const WordTokenizer tok = WordTokenizer::build(train.corpus(), 20);
  int unknown = 0;
  for (index_t i = 0; i < 500; ++i)
    for (Templates t : {Templates::train, Templates::eval})
      for (auto id : tok.encode(test.get(i, Rng(static_cast<std::uint64_t>(i)), t).caption)) unknown += id == 1;
  for (int c = 0; c < 10; ++c)
    for (const auto& p : train.class_prompts(c)) {
      CHECK(p.find(train.class_names()[static_cast<std::size_t>(c)]) != std::string::npos);
      for (auto id : tok.encode(p)) unknown += id == 1;
    }
  CHECK(unknown == 0);
  CHECK_THROWS_WITH_AS(train.scene(60000), doctest::Contains("out of range"), Error);
}
