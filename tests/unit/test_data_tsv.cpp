// TSV image-text pairs and image fitting: PGM/PPM without stb, errors carry file:line (PNG: test_data_png.cpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

#include "limoe/data/image.hpp"
#include "limoe/data/tokenizer.hpp"
#include "limoe/data/tsv.hpp"

using namespace limoe::data;

namespace {
const std::string kDir = std::string(LIMOE_TEST_DATA_DIR) + "/tsv/";
std::string error_of(const std::string& tsv, bool preload = true) {
  try {
    TsvPairs d(kDir + tsv, TsvOptions{{4, 4, 1}, preload});
    for (limoe::index_t i = 0; i < d.size(); ++i) d.get(i, limoe::Rng(0));
  } catch (const limoe::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("fit_image: resize, centre crop, channels, range") {
  // 2x4 gray image: left half 0, right half 255; fitted to 2x2 the crop keeps the middle columns.
  ImageU8 img{2, 4, 1, {0, 0, 255, 255, 0, 0, 255, 255}};
  auto out = fit_image(img, {2, 2, 1});
  CHECK(out == std::vector<float>{-1, 1, -1, 1});
  // Identity size keeps pixels exactly; gray -> RGB copies.
  out = fit_image(img, {2, 4, 3});
  CHECK(out.size() == 24u);
  CHECK(out[0] == -1.0f);
  CHECK(out[3 * 3 + 2] == 1.0f);
  // RGB -> gray by luma; upscaling a constant image keeps it constant.
  ImageU8 red{1, 1, 3, {255, 0, 0}};
  out = fit_image(red, {3, 3, 1});
  for (float v : out) CHECK(v == doctest::Approx(0.299f * 2 - 1).epsilon(1e-5));
  // RGBA: alpha dropped.
  ImageU8 rgba{1, 1, 4, {0, 255, 0, 7}};
  CHECK(fit_image(rgba, {1, 1, 3}) == std::vector<float>{-1, 1, -1});
}

TEST_CASE("PGM/PPM decoding") {
  const ImageU8 g = load_image(kDir + "gray.pgm");
  CHECK((g.height == 4 && g.width == 6 && g.channels == 1));
  CHECK(g.pixels[1] == 40);
  CHECK(g.pixels[6] == 10);
  const ImageU8 c = load_image(kDir + "colour.ppm");
  CHECK((c.height == 5 && c.width == 5 && c.channels == 3));
  CHECK(c.pixels[0] == 255);
  CHECK(c.pixels[4 * 3 + 2] == 255);
  CHECK_THROWS_WITH_AS(load_image(kDir + "nope.pgm"), doctest::Contains("nope.pgm"), limoe::Error);
  // A header number of more digits than any size: read whole (it once stopped after six digits and read the
  // rest as the next number: "bad size 1000000x0")
  const std::string header = "P5\n100000000 100000000\n255\n";
  const std::vector<std::uint8_t> big(header.begin(), header.end());
  CHECK_THROWS_WITH_AS(limoe::data::detail::decode_pnm(big, "big.pgm"), doctest::Contains("bad size 100000000x100000000"),
                       limoe::Error);
}

TEST_CASE("TSV pairs: relative paths, comments, blank lines, CRLF") {
  for (bool preload : {true, false}) {
    const TsvPairs d(kDir + "pairs.tsv", TsvOptions{{4, 4, 3}, preload});
    REQUIRE(d.size() == 2);
    CHECK(d.rows()[0].line == 3);
    CHECK(d.rows()[1].line == 4);
    CHECK_FALSE(d.has_labels());
    const Example a = d.get(0, limoe::Rng(0)), b = d.get(1, limoe::Rng(0));
    CHECK(a.caption == "a gray gradient");
    CHECK(b.caption == "red green and blue stripes");
    CHECK(a.label == -1);
    CHECK(a.image.size() == 48u);
    CHECK(*std::min_element(b.image.begin(), b.image.end()) >= -1.0f);
    CHECK(b.image[0] > 0.5f);   // red on the left
    CHECK(b.image[1] < -0.5f);
    CHECK(d.corpus() == std::vector<std::string>{"a gray gradient", "red green and blue stripes"});
    CHECK_THROWS_AS(d.class_prompts(0), limoe::Error);
  }
}

TEST_CASE("TSV errors name the file and line") {
  std::string m = error_of("bad_row.tsv");
  CHECK_MESSAGE(m.find("bad_row.tsv:3") != std::string::npos, m);
  for (bool preload : {true, false}) {
    m = error_of("missing_image.tsv", preload);
    CHECK_MESSAGE(m.find("missing_image.tsv:2") != std::string::npos, m);
    CHECK_MESSAGE(m.find("missing.pgm") != std::string::npos, m);
    m = error_of("corrupt_image.tsv", preload);
    CHECK_MESSAGE(m.find("corrupt_image.tsv:2") != std::string::npos, m);
    // a folder where the image should be: limoe::Error naming the line and saying so (a stream's own exception
    // before, which the command reported as an internal error, exit 1)
    m = error_of("folder_image.tsv", preload);
    CHECK_MESSAGE(m.find("folder_image.tsv:2") != std::string::npos, m);
    CHECK_MESSAGE(m.find("it is a directory") != std::string::npos, m);
  }
  CHECK(error_of("no_such.tsv").find("no_such.tsv") != std::string::npos);
  // A caption in Latin-1, not UTF-8: refused when the file is read (a vocabulary is stored as JSON).
  m = error_of("latin1_caption.tsv");
  CHECK_MESSAGE(m.find("latin1_caption.tsv:2") != std::string::npos, m);
  CHECK_MESSAGE(m.find("UTF-8") != std::string::npos, m);
}

TEST_CASE("valid_utf8: RFC 3629 forms only") {
  for (const char* ok : {"", "plain ascii", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xed\x9f\xbf",
                         "\xf4\x8f\xbf\xbf"})
    CHECK_MESSAGE(valid_utf8(ok), ok);
  for (const char* bad : {"caf\xe9", "\xc3", "\xe2\x82", "\xc0\xaf" /* overlong '/' */, "\xe0\x80\xaf" /* overlong */,
                          "\xed\xa0\x80" /* surrogate */, "\xf4\x90\x80\x80" /* > U+10FFFF */, "\xf5\x80\x80\x80",
                          "\x80", "a\xbf"})
    CHECK_FALSE_MESSAGE(valid_utf8(bad), bad);
}
