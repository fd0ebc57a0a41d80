// Fashion-MNIST from Debian's dataset-fashion-mnist. Every case here needs the data set: without it the program
// reports itself skipped (exit 77), not passed. The missing-folder error is tested in test_data_idx.cpp.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>

#include "limoe/data/fashion_mnist.hpp"
#include "support/skip.hpp"

using namespace limoe::data;

TEST_CASE("Fashion-MNIST loads both splits") {
  if (!fashion_mnist_available())
    LIMOE_SKIP("Fashion-MNIST is not installed at ", kFashionMnistDir, " (Debian: dataset-fashion-mnist)");
  for (Split split : {Split::train, Split::test}) {
    const FashionMnist d(split);
    CHECK(d.size() == (split == Split::train ? 60000 : 10000));
    CHECK(d.image_shape() == ImageShape{28, 28, 1});
    std::array<int, 10> count{};
    for (limoe::index_t i = 0; i < d.size(); ++i) {
      const int l = d.label(i);
      REQUIRE((l >= 0 && l < 10));
      ++count[l];
    }
    for (int c : count) CHECK(c == d.size() / 10);  // the set is balanced
    const limoe::Rng rng(0);
    float lo = 1, hi = -1;
    for (limoe::index_t i = 0; i < 100; ++i) {
      const Example e = d.get(i, rng);
      CHECK(e.image.size() == 784u);
      lo = std::min(lo, *std::min_element(e.image.begin(), e.image.end()));
      hi = std::max(hi, *std::max_element(e.image.begin(), e.image.end()));
      CHECK(e.label == d.label(i));
      CHECK(!e.caption.empty());
    }
    CHECK(lo == -1.0f);  // black background
    CHECK(hi == 1.0f);   // some saturated pixels
  }
  // Known first labels of the training set: ankle boot, t-shirt, t-shirt, dress.
  const FashionMnist train(Split::train);
  CHECK(train.label(0) == 9);
  CHECK(train.label(1) == 0);
  CHECK(train.label(3) == 3);
}
