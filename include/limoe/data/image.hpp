// limoe/data/image.hpp: reading image files and fitting them to the model's input.
//
// Formats: binary PGM/PPM (P5/P6, always available, no dependency) and, when Debian's libstb-dev is installed
// (<stb/stb_image.h>), PNG, JPEG, BMP, GIF (first frame) and TGA through stb_image.
//
// stb_image in a header-only library: by default this header compiles stb_image's implementation with
// STB_IMAGE_STATIC, so every translation unit that includes it gets private (static) copies of the decoder and
// nothing clashes at link time. Two switches, defined before the first include of any limoe header:
//   LIMOE_NO_STB                 never use stb_image (PGM/PPM only);
//   LIMOE_STB_EXTERNAL           use stb_image's declarations only; the program compiles the implementation
//                                itself (one TU with `#define STB_IMAGE_IMPLEMENTATION` + `#include <stb/stb_image.h>`).
// If <stb/stb_image.h> was already included before this header, its declarations are used as they are (the
// program then owns the implementation), as with LIMOE_STB_EXTERNAL.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/io/file.hpp"
#include "limoe/data/dataset.hpp"

#if !defined(LIMOE_NO_STB) && __has_include(<stb/stb_image.h>)
#define LIMOE_HAS_STB 1
#if defined(STBI_INCLUDE_STB_IMAGE_H) || defined(LIMOE_STB_EXTERNAL)
#include <stb/stb_image.h>
#elif !defined(LIMOE_DETAIL_STB_INCLUDED)
#define LIMOE_DETAIL_STB_INCLUDED
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wcast-qual"
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO  // limoe reads files itself, so errors name the file
#define STBI_NO_HDR
#define STBI_NO_LINEAR
#define STBI_NO_PSD
#define STBI_NO_PIC
#define STBI_NO_PNM  // PGM/PPM are read below without stb
#include <stb/stb_image.h>
#undef STB_IMAGE_STATIC
#undef STB_IMAGE_IMPLEMENTATION
#pragma GCC diagnostic pop
#endif
#else
#define LIMOE_HAS_STB 0
#endif

namespace limoe::data {

// Whether PNG/JPEG decoding (stb_image) is compiled in.
inline constexpr bool kHaveStbImage = LIMOE_HAS_STB != 0;

// 8-bit pixels, row-major [height, width, channels].
struct ImageU8 {
  int height = 0, width = 0, channels = 0;
  std::vector<std::uint8_t> pixels;
};

namespace detail {
// The image file's bytes; a missing file, a folder or an unreadable one is limoe::Error naming it (io::read_file;
// a stream reading a folder threw std::ios_base::failure instead, which the command reported as an internal error).
inline std::vector<std::uint8_t> read_binary_file(const std::string& path) {
  try {
    return io::read_file(path);
  } catch (const Error& e) {
    fail("image: ", e.what());
  }
}

// Binary PGM (P5) / PPM (P6), maxval up to 65535 (16-bit samples are scaled to 8 bits).
inline ImageU8 decode_pnm(const std::vector<std::uint8_t>& b, const std::string& path) {
  std::size_t pos = 2;
  auto next_int = [&](const char* what) -> long {
    for (;;) {  // skip white space and # comments
      while (pos < b.size() && std::isspace(b[pos])) ++pos;
      if (pos < b.size() && b[pos] == '#') {
        while (pos < b.size() && b[pos] != '\n') ++pos;
        continue;
      }
      break;
    }
    LIMOE_CHECK(pos < b.size() && std::isdigit(b[pos]), "image \"", path, "\": bad PNM header (no ", what, ")");
    long v = 0;  // every digit consumed; the value held at 10^9 (past any size or maxval taken)
    for (; pos < b.size() && std::isdigit(b[pos]); ++pos) v = std::min(v * 10 + (b[pos] - '0'), 1000000000L);
    return v;
  };
  const int channels = b[1] == '5' ? 1 : 3;
  const long w = next_int("width"), h = next_int("height"), maxval = next_int("maxval");
  LIMOE_CHECK(w > 0 && h > 0 && w <= 65536 && h <= 65536, "image \"", path, "\": bad size ", w, "x", h);
  LIMOE_CHECK(maxval > 0 && maxval <= 65535, "image \"", path, "\": bad maxval ", maxval);
  ++pos;  // the single white-space byte before the samples
  const std::size_t bytes_per = maxval > 255 ? 2 : 1;
  const std::size_t n = static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * static_cast<std::size_t>(channels);
  LIMOE_CHECK(pos <= b.size() && b.size() - pos >= n * bytes_per, "image \"", path, "\": truncated (",
              b.size() - std::min(pos, b.size()), " bytes of samples, need ", n * bytes_per, ")");
  ImageU8 img{static_cast<int>(h), static_cast<int>(w), channels, std::vector<std::uint8_t>(n)};
  for (std::size_t k = 0; k < n; ++k) {
    const long v = bytes_per == 1 ? b[pos + k] : (long{b[pos + 2 * k]} << 8 | b[pos + 2 * k + 1]);
    img.pixels[k] = static_cast<std::uint8_t>(std::lround(255.0 * static_cast<double>(std::min(v, maxval)) /
                                                          static_cast<double>(maxval)));
  }
  return img;
}
}  // namespace detail

// Decodes an image file (the format is detected from its bytes, not its name). Throws limoe::Error naming the file.
inline ImageU8 load_image(const std::string& path) {
  const std::vector<std::uint8_t> b = detail::read_binary_file(path);
  LIMOE_CHECK(b.size() >= 2, "image \"", path, "\": empty or too short (", b.size(), " bytes)");
  if (b[0] == 'P' && (b[1] == '5' || b[1] == '6')) return detail::decode_pnm(b, path);
#if LIMOE_HAS_STB
  int w = 0, h = 0, c = 0;
  LIMOE_CHECK(b.size() <= 0x7fffffff, "image \"", path, "\": too large");
  stbi_uc* px = stbi_load_from_memory(b.data(), static_cast<int>(b.size()), &w, &h, &c, 0);
  LIMOE_CHECK(px != nullptr, "cannot decode image \"", path, "\": ", stbi_failure_reason());
  ImageU8 img{h, w, c, std::vector<std::uint8_t>(px, px + static_cast<std::size_t>(w) * h * c)};
  stbi_image_free(px);
  return img;
#else
  fail("cannot decode image \"", path, "\": only binary PGM/PPM (P5/P6) can be read without stb_image; install ",
       "Debian's libstb-dev (PNG, JPEG) or convert the image");
#endif
}

// Fits an image to `out`: bilinear resize so the shorter side matches (aspect ratio kept), centre crop, channel
// conversion (gray -> RGB by copying, RGB -> gray by ITU-R BT.601 luma, alpha dropped), bytes to [-1, 1].
// Returns [out.height * out.width * out.channels], row-major [H, W, C].
inline std::vector<float> fit_image(const ImageU8& img, const ImageShape& out) {
  LIMOE_CHECK(img.height > 0 && img.width > 0 && img.channels >= 1 && img.channels <= 4,
              "fit_image: bad input image ", img.height, "x", img.width, "x", img.channels);
  LIMOE_CHECK(out.channels == 1 || out.channels == 3, "fit_image: output channels must be 1 or 3, got ",
              out.channels);
  // Colour channels of the input without alpha: 1 (gray, gray+alpha) or 3 (RGB, RGBA).
  const int in_c = img.channels <= 2 ? 1 : 3;
  auto sample = [&](int y, int x, int c) -> float {  // input channel c in 0..in_c-1, as 0..255
    return static_cast<float>(img.pixels[(static_cast<std::size_t>(y) * img.width + x) * img.channels + c]);
  };
  // Scale so the shorter side becomes the target's matching side exactly, then crop the longer one.
  const double scale = std::max(static_cast<double>(out.height) / img.height, static_cast<double>(out.width) / img.width);
  const double rh = img.height * scale, rw = img.width * scale;  // resized size (before the crop)
  const double oy = (rh - static_cast<double>(out.height)) / 2, ox = (rw - static_cast<double>(out.width)) / 2;
  std::vector<float> res(static_cast<std::size_t>(out.numel()));
  std::vector<float> px(static_cast<std::size_t>(in_c));
  for (index_t y = 0; y < out.height; ++y)
    for (index_t x = 0; x < out.width; ++x) {
      // Pixel centres: output (x + 0.5) maps to input ((x + 0.5 + ox) / scale - 0.5).
      const double sy = std::clamp((static_cast<double>(y) + 0.5 + oy) / scale - 0.5, 0.0, img.height - 1.0);
      const double sx = std::clamp((static_cast<double>(x) + 0.5 + ox) / scale - 0.5, 0.0, img.width - 1.0);
      const int y0 = static_cast<int>(sy), x0 = static_cast<int>(sx);
      const int y1 = std::min(y0 + 1, img.height - 1), x1 = std::min(x0 + 1, img.width - 1);
      const float fy = static_cast<float>(sy - y0), fx = static_cast<float>(sx - x0);
      for (int c = 0; c < in_c; ++c)
        px[static_cast<std::size_t>(c)] = (1 - fy) * ((1 - fx) * sample(y0, x0, c) + fx * sample(y0, x1, c)) +
                                          fy * ((1 - fx) * sample(y1, x0, c) + fx * sample(y1, x1, c));
      float* o = res.data() + (y * out.width + x) * out.channels;
      if (out.channels == in_c) {
        for (int c = 0; c < in_c; ++c) o[c] = px[static_cast<std::size_t>(c)];
      } else if (out.channels == 3) {  // gray -> RGB
        o[0] = o[1] = o[2] = px[0];
      } else {  // RGB -> gray
        o[0] = 0.299f * px[0] + 0.587f * px[1] + 0.114f * px[2];
      }
    }
  for (float& v : res) v = std::clamp((v - 127.5f) / 127.5f, -1.0f, 1.0f);
  return res;
}

// Writes a binary PGM (1 channel) or PPM (3 channels); for tests and for looking at data.
inline void write_pnm(const std::string& path, const ImageU8& img) {
  LIMOE_CHECK(img.channels == 1 || img.channels == 3, "write_pnm(\"", path, "\"): channels must be 1 or 3");
  LIMOE_CHECK(img.pixels.size() == static_cast<std::size_t>(img.height) * img.width * img.channels,
              "write_pnm(\"", path, "\"): pixel count does not match the size");
  std::ofstream f(path, std::ios::binary);
  LIMOE_CHECK(f.good(), "cannot open \"", path, "\" for writing");
  f << (img.channels == 1 ? "P5" : "P6") << "\n" << img.width << " " << img.height << "\n255\n";
  f.write(reinterpret_cast<const char*>(img.pixels.data()), static_cast<std::streamsize>(img.pixels.size()));
  LIMOE_CHECK(f.good(), "cannot write \"", path, "\"");
}

}  // namespace limoe::data
