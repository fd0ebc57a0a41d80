// Caption templates (train/eval disjoint, prompts), and the synthetic shapes data set.
#include <doctest/doctest.h>

#include <algorithm>
#include <set>
#include <string>

#include "limoe/data/captions.hpp"
#include "limoe/data/synthetic.hpp"
#include "limoe/data/tokenizer.hpp"

using namespace limoe::data;

TEST_CASE("fill_template fixes the article") {
  CHECK(fill_template("a photo of a {}.", "sneaker") == "a photo of a sneaker.");
  CHECK(fill_template("a photo of a {}.", "ankle boot") == "a photo of an ankle boot.");
  CHECK(fill_template("a {} on a plain background", "ankle boot") == "an ankle boot on a plain background");
  CHECK(fill_template("itap of a {}.", "bag") == "itap of a bag.");
  CHECK_THROWS_AS(fill_template("no placeholder", "bag"), limoe::Error);
}

TEST_CASE("Fashion-MNIST captions: train and eval templates are disjoint") {
  const CaptionSet& c = fashion_mnist_captions();
  CHECK(c.num_classes() == 10);
  CHECK(c.train_templates.size() >= 20);
  CHECK(c.eval_templates.size() >= 6);
  const std::set<std::string> train(c.train_templates.begin(), c.train_templates.end());
  for (const auto& t : c.eval_templates) CHECK(train.count(t) == 0);
  // No training caption equals an evaluation prompt, for any class and synonym.
  std::set<std::string> prompts;
  for (int k = 0; k < 10; ++k)
    for (const auto& p : c.class_prompts(k)) prompts.insert(p);
  for (const auto& s : c.corpus())
    if (!prompts.count(s)) CHECK(s.find("{}") == std::string::npos);
  const limoe::Rng rng(3);
  for (int k = 0; k < 10; ++k)
    for (std::uint64_t i = 0; i < 50; ++i) CHECK(prompts.count(c.caption(k, rng, i)) == 0);
  CHECK(c.class_prompts(9).front() == "a photo of an ankle boot.");
  CHECK(c.class_prompts(0).size() == c.eval_templates.size());
  CHECK_THROWS_AS(c.class_prompts(10), limoe::Error);
  // Captions are reproducible and vary with the counter.
  CHECK(c.caption(7, rng, 11) == c.caption(7, rng, 11));
  std::set<std::string> seen;
  for (std::uint64_t i = 0; i < 100; ++i) seen.insert(c.caption(7, rng, i));
  CHECK(seen.size() > 20);
  // A tokenizer built from the corpus knows every word of every caption and prompt.
  const auto tok = WordTokenizer::build(c.corpus(), 16);
  for (int k = 0; k < 10; ++k)
    for (const auto& p : c.class_prompts(k)) {
      const auto ids = tok.encode(p);
      CHECK(std::find(ids.begin(), ids.end(), WordTokenizer::kUnk) == ids.end());
    }
}

TEST_CASE("synthetic shapes: deterministic, captions match the attributes") {
  SyntheticOptions o;
  o.size = 200;
  o.seed = 5;
  const SyntheticShapes a(o), b(o), test(o, Split::test);
  const limoe::Rng rng(9);
  int differ = 0;
  for (limoe::index_t i = 0; i < a.size(); ++i) {
    const Example x = a.get(i, rng), y = b.get(i, rng);
    CHECK(x.image == y.image);
    CHECK(x.caption == y.caption);
    CHECK(x.label == y.label);
    CHECK(x.image.size() == 28u * 28u);
    CHECK(*std::min_element(x.image.begin(), x.image.end()) >= -1.0f);
    CHECK(*std::max_element(x.image.begin(), x.image.end()) <= 1.0f);
    differ += test.get(i, rng).image != x.image;
    // The caption names the shape (a synonym), the size and the position.
    const auto at = a.attributes(i);
    CHECK(x.label == at.shape);
    const auto has_any = [&](const std::vector<std::string>& words) {
      return std::any_of(words.begin(), words.end(),
                         [&](const std::string& w) { return x.caption.find(w) != std::string::npos; });
    };
    CHECK_MESSAGE(has_any(SyntheticShapes::shape_synonyms()[at.shape]), x.caption);
    CHECK_MESSAGE(has_any(SyntheticShapes::size_words()[at.size]), x.caption);
    CHECK_MESSAGE(has_any(SyntheticShapes::position_phrases()[at.position]), x.caption);
    CHECK_MESSAGE(x.caption.find(SyntheticShapes::colour_names(1)[at.colour]) != std::string::npos, x.caption);
    // The shape is drawn: some pixels are much brighter than the background.
    CHECK(*std::max_element(x.image.begin(), x.image.end()) > -0.5f);  // grey is -0.1, background -0.9
  }
  CHECK(differ > 150);  // the test split holds other examples
  std::set<int> labels;
  for (limoe::index_t i = 0; i < a.size(); ++i) labels.insert(a.get(i, rng).label);
  CHECK(labels.size() == SyntheticShapes::kNumShapes);
}

TEST_CASE("synthetic shapes: colour images, position, prompts and vocabulary") {
  SyntheticOptions o;
  o.image = {32, 32, 3};
  o.size = 64;
  o.noise = 0.0f;
  const SyntheticShapes d(o);
  const limoe::Rng rng(1);
  for (limoe::index_t i = 0; i < d.size(); ++i) {
    const auto at = d.attributes(i);
    const Example e = d.get(i, rng);
    CHECK(e.image.size() == 32u * 32u * 3u);
    CHECK(e.caption.find(SyntheticShapes::colour_names(3)[at.colour]) != std::string::npos);
    // The centre of mass of the bright pixels lies on the named side.
    double sx = 0, sy = 0, w = 0;
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) {
        double v = 0;
        for (int c = 0; c < 3; ++c) v += e.image[(y * 32 + x) * 3 + c] + 0.9;  // background is -0.9
        sx += v * x;
        sy += v * y;
        w += v;
      }
    sx = sx / w / 32, sy = sy / w / 32;
    switch (at.position) {
      case 0: CHECK(sx < 0.4); break;
      case 1: CHECK(sx > 0.6); break;
      case 2: CHECK(sy < 0.4); break;
      case 3: CHECK(sy > 0.6); break;
      default: CHECK((std::abs(sx - 0.5) < 0.1 && std::abs(sy - 0.5) < 0.1));
    }
  }
  CHECK(d.class_prompts(2).front() == "a photo of a triangle.");
  const auto tok = WordTokenizer::build(d.corpus(), 16);
  for (limoe::index_t i = 0; i < d.size(); ++i)
    for (auto which : {Templates::train, Templates::eval}) {
      const auto ids = tok.encode(d.get(i, rng, which).caption);
      CHECK(std::find(ids.begin(), ids.end(), WordTokenizer::kUnk) == ids.end());
      CHECK(WordTokenizer::eos_position(ids) < 15);  // captions fit in 16 tokens
    }
}
