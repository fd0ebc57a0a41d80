// PNG images in TSV pairs through stb_image. Needs the optional stb_image: without it the program reports itself
// skipped (exit 77), not passed.
#include <doctest/doctest.h>

#include <string>

#include "limoe/data/image.hpp"
#include "limoe/data/tsv.hpp"
#include "support/skip.hpp"

using namespace limoe::data;

namespace {
const std::string kDir = std::string(LIMOE_TEST_DATA_DIR) + "/tsv/";
}  // namespace

TEST_CASE("PNG through stb_image") {
  if (!kHaveStbImage) LIMOE_SKIP("built without stb_image (Debian: libstb-dev)");
  const TsvPairs d(kDir + "png.tsv", TsvOptions{{4, 4, 1}, true});
  const Example e = d.get(0, limoe::Rng(0));
  // The 8x8 image has a white 4x4 square in the middle: fitted to 4x4, the centre is white, corners black.
  CHECK(e.image[0] == doctest::Approx(-1.0f));
  CHECK(e.image[5] > 0.5f);
  CHECK(e.image[15] == doctest::Approx(-1.0f));
}
