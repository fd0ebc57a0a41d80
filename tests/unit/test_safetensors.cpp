// safetensors I/O (spec docs/cli.md): half / bfloat16 conversions against bit patterns and an independent
// reference, round trips of every dtype, a file written by the reference Python package, every malformed header
// rejected with a message that names the problem, and the atomic file writer.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <limoe/io/file.hpp>
#include <limoe/io/safetensors.hpp>
#include <stdexcept>
#include <string>
#include <vector>

using namespace limoe;
using namespace limoe::io;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::uint8_t>;

// A safetensors file from a header string (used verbatim) and a data section.
Bytes make_file(const std::string& header, const Bytes& data = {}) {
  Bytes out;
  out.reserve(8 + header.size() + data.size());
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  for (char c : header) out.push_back(static_cast<std::uint8_t>(c));
  for (std::uint8_t c : data) out.push_back(c);
  return out;
}

std::string error_of(const Bytes& b, const std::string& label = "bad.safetensors") {
  try {
    auto r = SafetensorsReader::from_bytes(b, label);
    // Reading every tensor must not crash either.
    for (const auto& name : r.names()) {
      if (dtype_is_float(r.info(name).dtype)) (void)r.read_f32_flat(name);
      else (void)r.read_i32_flat(name);
    }
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Checks that the file is rejected with a message naming the file and containing `word`.
void check_rejected(const Bytes& b, const std::string& word) {
  const std::string msg = error_of(b);
  INFO("message: " << msg);
  CHECK(msg.find("bad.safetensors") != std::string::npos);
  CHECK(msg.find(word) != std::string::npos);
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("limoe_test_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(std::rand()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    return out;
  }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::uint32_t bits(float f) { return std::bit_cast<std::uint32_t>(f); }

// Independent reference: the value of a binary16 bit pattern, from the definition.
double half_value(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return s ? -v : v;
}

}  // namespace

TEST_CASE("half: known bit patterns") {
  CHECK(float_to_half(1.0f) == 0x3C00);
  CHECK(float_to_half(-2.5f) == 0xC100);
  CHECK(float_to_half(65504.0f) == 0x7BFF);
  CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);   // smallest subnormal
  CHECK(float_to_half(std::ldexp(1023.0f, -24)) == 0x03FF);  // largest subnormal
  CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);   // smallest normal
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(float_to_half(INFINITY) == 0x7C00);
  CHECK(float_to_half(-INFINITY) == 0xFC00);
  const std::uint16_t qn = float_to_half(NAN);
  CHECK((qn & 0x7C00) == 0x7C00);
  CHECK((qn & 0x03FF) != 0);

  CHECK(half_to_float(0x3C00) == 1.0f);
  CHECK(half_to_float(0xC100) == -2.5f);
  CHECK(half_to_float(0x7BFF) == 65504.0f);
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x03FF) == std::ldexp(1023.0f, -24));
  CHECK(half_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(bits(half_to_float(0x8000)) == 0x80000000u);
  CHECK(half_to_float(0x7C00) == INFINITY);
  CHECK(half_to_float(0xFC00) == -INFINITY);
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0x7C01)));  // signalling NaN stays NaN
}

TEST_CASE("half: round to nearest even, overflow and underflow") {
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);      // tie -> even (down)
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);  // tie -> even (up)
  CHECK(float_to_half(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3C01);
  CHECK(float_to_half(65519.0f) == 0x7BFF);
  CHECK(float_to_half(65520.0f) == 0x7C00);  // tie between 65504 (odd) and 65536 (inf)
  CHECK(float_to_half(1e10f) == 0x7C00);
  CHECK(float_to_half(-1e10f) == 0xFC00);
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);  // half the smallest subnormal: tie -> 0
  CHECK(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // 1.5 units: tie -> 2
  CHECK(float_to_half(5 * std::ldexp(1.0f, -25)) == 0x0002);  // 2.5 units: tie -> 2
  CHECK(float_to_half(-std::ldexp(1.0f, -30)) == 0x8000);
  CHECK(float_to_half(std::ldexp(2047.0f, -25)) == 0x0400);  // rounds up out of the subnormals
}

TEST_CASE("half: exhaustive against the definition") {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto hb = static_cast<std::uint16_t>(h);
    const int e = (h >> 10) & 31;
    const float f = half_to_float(hb);
    if (e == 31) {
      if ((h & 1023) == 0) CHECK(std::isinf(f));
      else CHECK(std::isnan(f));
      continue;
    }
    REQUIRE(static_cast<double>(f) == half_value(hb));
    REQUIRE(std::signbit(f) == ((h >> 15) != 0));
    REQUIRE(float_to_half(f) == hb);
    // The midpoint to the next half up (in magnitude) is a float; it rounds to whichever of the two is even.
    if ((h & 0x7FFF) < 0x7BFF) {
      const auto next = static_cast<std::uint16_t>(h + 1);
      const float mid = static_cast<float>((half_value(hb) + half_value(next)) / 2);
      REQUIRE(static_cast<double>(mid) == (half_value(hb) + half_value(next)) / 2);
      REQUIRE(float_to_half(mid) == ((h & 1) ? next : hb));
      REQUIRE(float_to_half(std::nextafter(mid, 0.0f)) == hb);
      REQUIRE(float_to_half(std::nextafter(mid, mid * 2)) == next);
    }
  }
}

TEST_CASE("bfloat16: bit patterns, rounding, exhaustive round trip") {
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(-2.5f) == 0xC020);
  CHECK(float_to_bf16(INFINITY) == 0x7F80);
  CHECK(float_to_bf16(-INFINITY) == 0xFF80);
  CHECK(float_to_bf16(std::bit_cast<float>(0x00010000u)) == 0x0001);  // smallest subnormal bf16
  CHECK(float_to_bf16(std::bit_cast<float>(0x00008000u)) == 0x0000);  // tie -> even 0
  CHECK(float_to_bf16(std::bit_cast<float>(0x00018000u)) == 0x0002);  // tie -> even up
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);         // tie -> even (down)
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);     // tie -> even (up)
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);   // rounds past the largest bf16: inf
  const std::uint16_t qn = float_to_bf16(std::bit_cast<float>(0x7F800001u));  // a NaN whose payload is in the low bits
  CHECK((qn & 0x7F80) == 0x7F80);
  CHECK((qn & 0x007F) != 0);
  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC020) == -2.5f);
  CHECK(bf16_to_float(0x0001) == std::ldexp(1.0f, -133));
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto bb = static_cast<std::uint16_t>(b);
    const float f = bf16_to_float(bb);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(bf16_to_float(float_to_bf16(f))));
      continue;
    }
    REQUIRE(float_to_bf16(f) == bb);
  }
}

TEST_CASE("double to float: rounding without undefined behaviour") {
  CHECK(double_to_float(1.5) == 1.5f);
  CHECK(double_to_float(1e300) == INFINITY);
  CHECK(double_to_float(-1e300) == -INFINITY);
  const double fmax = std::numeric_limits<float>::max();
  CHECK(double_to_float(fmax * (1 + 1e-9)) == std::numeric_limits<float>::max());
  CHECK(double_to_float(0x1.ffffffp127) == INFINITY);
  CHECK(std::isnan(double_to_float(std::nan(""))));
}

TEST_CASE("round trip of every dtype through bytes and files") {
  Tensor<float> a = Tensor<float>::from(Shape{2, 3}, {1.0f, -2.5f, 65504.0f, std::ldexp(1.0f, -24), 0.1f, -0.0f});
  Tensor<std::int32_t> ids = Tensor<std::int32_t>::from(Shape{2, 2}, {0, -1, 2147483647, -2147483647 - 1});
  const std::vector<float> five = {1, 2, 3, 4, 5, 6};

  SafetensorsWriter w;
  w.add("a.f32", a.cview());
  w.add("a.f16", a.cview(), DType::F16);
  w.add("a.bf16", a.cview(), DType::BF16);
  w.add("a.f64", a.cview(), DType::F64);
  w.add("ids.i32", ids.cview());
  w.add("ids.i64", ids.cview(), DType::I64);
  w.add_scalar("logit_scale", 2.302585f);
  w.add("rank5", {1, 2, 1, 3, 1}, std::span<const float>(five));
  w.add("empty", CView<float>(nullptr, Shape{0, 4}));
  w.set_metadata("format", "limoe");
  w.set_metadata("config", R"({"width": 8})");
  CHECK_THROWS_WITH_AS(w.add("a.f32", a.cview()), doctest::Contains("already added"), Error);
  CHECK_THROWS_WITH_AS(w.add("__metadata__", a.cview()), doctest::Contains("reserved"), Error);
  CHECK_THROWS_WITH_AS(w.add("x", {4}, std::span<const float>(five)), doctest::Contains("does not match"), Error);
  CHECK_THROWS_WITH_AS(w.add("x", a.cview(), DType::I32), doctest::Contains("F32, F16, BF16 or F64"), Error);
  CHECK_THROWS_WITH_AS(w.add("x", ids.cview(), DType::F32), doctest::Contains("I32 or I64"), Error);

  const Bytes bytes = w.to_bytes();
  // Layout: the data section starts at a multiple of 8; the header is padded with spaces.
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]) << (8 * i);
  CHECK((8 + n) % 8 == 0);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  CHECK(header.rfind("{\"__metadata__\"", 0) == 0);
  CHECK(header.find("\"a.bf16\"") < header.find("\"a.f16\""));  // sorted by name

  TempDir dir;
  const std::string path = dir.file("rt.safetensors");
  w.write(path);
  CHECK(slurp(path) == std::string(bytes.begin(), bytes.end()));
  CHECK(dir.listing() == std::vector<std::string>{"rt.safetensors"});

  for (int mode = 0; mode < 3; ++mode) {
    const SafetensorsReader r = mode == 0   ? SafetensorsReader::from_bytes(bytes)
                                : mode == 1 ? SafetensorsReader::open(path)
                                            : SafetensorsReader::open(path, SafetensorsReader::Load::Read);
    CHECK(r.metadata().at("format") == "limoe");
    CHECK(r.metadata().at("config") == R"({"width": 8})");
    CHECK(r.names().size() == 9);
    CHECK(r.info("a.f16").dtype == DType::F16);
    CHECK(r.info("ids.i64").dtype == DType::I64);
    const auto f32 = r.read_f32("a.f32");
    CHECK(f32.shape() == Shape{2, 3});
    for (index_t i = 0; i < 6; ++i) CHECK(bits(f32[i]) == bits(a[i]));
    const auto f64 = r.read_f32("a.f64");
    for (index_t i = 0; i < 6; ++i) CHECK(bits(f64[i]) == bits(a[i]));
    const auto f16 = r.read_f32("a.f16");
    for (index_t i = 0; i < 6; ++i) CHECK(bits(f16[i]) == bits(half_to_float(float_to_half(a[i]))));
    CHECK(f16[0] == 1.0f);
    CHECK(f16[2] == 65504.0f);
    CHECK(f16[3] == std::ldexp(1.0f, -24));
    const auto bf16 = r.read_f32("a.bf16");
    for (index_t i = 0; i < 6; ++i) CHECK(bits(bf16[i]) == bits(bf16_to_float(float_to_bf16(a[i]))));
    CHECK(bf16[1] == -2.5f);
    for (const char* name : {"ids.i32", "ids.i64"}) {
      const auto t = r.read_i32(name);
      CHECK(t.shape() == Shape{2, 2});
      for (index_t i = 0; i < 4; ++i) CHECK(t[i] == ids[i]);
    }
    const auto s = r.read_f32("logit_scale");
    CHECK(s.rank() == 0);
    CHECK(s.numel() == 1);
    CHECK(s[0] == 2.302585f);
    CHECK(r.info("logit_scale").shape.empty());
    CHECK_THROWS_WITH_AS(r.read_f32("rank5"), doctest::Contains("rank 5"), Error);
    CHECK(r.info("rank5").shape == std::vector<std::int64_t>{1, 2, 1, 3, 1});
    CHECK(r.read_f32_flat("rank5") == five);
    CHECK(r.read_f32("empty").numel() == 0);
    CHECK(r.read_f32("empty").shape() == Shape{0, 4});
  }
}

TEST_CASE("writer output is deterministic") {
  Tensor<float> x(Shape{3}, 1.0f), y(Shape{2, 2}, 2.0f);
  SafetensorsWriter w1, w2;
  w1.add("x", x.cview());
  w1.add("y", y.cview());
  w1.set_metadata("k", "v");
  w2.set_metadata("k", "v");
  w2.add("y", y.cview());
  w2.add("x", x.cview());
  CHECK(w1.to_bytes() == w2.to_bytes());
  SafetensorsWriter empty;
  const auto r = SafetensorsReader::from_bytes(empty.to_bytes());
  CHECK(r.names().empty());
}

TEST_CASE("a file written by the reference Python package loads") {
  const std::string path = std::string(LIMOE_TEST_DATA_DIR) + "/safetensors/python_layout.safetensors";
  const auto r = SafetensorsReader::open(path);
  CHECK(r.metadata().at("format") == "limoe");
  CHECK(r.metadata().at("format_version") == "1");
  CHECK(r.metadata().at("note") == "written by safetensors");

  const auto f32 = r.read_f32("f32");
  CHECK(f32.shape() == Shape{2, 3});
  for (index_t i = 0; i < 6; ++i) CHECK(f32[i] == static_cast<float>(i) * 0.5f - 1.0f);

  const auto f16 = r.read_f32("f16");
  CHECK(f16.shape() == Shape{6});
  CHECK(f16[0] == 1.0f);
  CHECK(f16[1] == -2.5f);
  CHECK(f16[2] == 65504.0f);
  CHECK(f16[3] == std::ldexp(1.0f, -24));
  CHECK(f16[4] == INFINITY);
  CHECK(std::isnan(f16[5]));

  const auto bf16 = r.read_f32("bf16");
  CHECK(bf16.shape() == Shape{2, 2});
  CHECK(bf16[0] == 1.0f);
  CHECK(bf16[1] == -2.5f);
  CHECK(bf16[2] == 3.140625f);
  CHECK(bits(bf16[3]) == 0x80000000u);

  const auto f64 = r.read_f32("f64");
  CHECK(f64.shape() == Shape{1, 2});
  CHECK(f64[0] == 1.5f);
  CHECK(f64[1] == -0.25f);

  const auto i32 = r.read_i32("i32");
  CHECK(i32.shape() == Shape{2, 2});
  CHECK(i32[0] == -3);
  CHECK(i32[1] == 7);
  CHECK(i32[2] == 2147483647);
  CHECK(i32[3] == -2147483647 - 1);

  const auto i64 = r.read_i32("i64");
  CHECK(i64[0] == 5);
  CHECK(i64[1] == -6);
  CHECK(i64[2] == 123456789);
  CHECK_THROWS_WITH_AS(r.read_i32("i64_big"), doctest::Contains("out of range for int32"), Error);

  const auto u8 = r.read_i32("u8");
  CHECK(u8[1] == 255);
  CHECK(u8[2] == 7);
  const auto b = r.read_i32("bool");
  CHECK((b[0] == 1 && b[1] == 0 && b[2] == 1));

  const auto s = r.read_f32("logit_scale");
  CHECK(s.rank() == 0);
  CHECK(s[0] == 2.5f);

  CHECK(r.info("rank5").shape.size() == 5);
  CHECK(r.read_f32_flat("rank5") == std::vector<float>{0, 1, 2, 3});
  CHECK(r.read_f32("empty").shape() == Shape{0, 3});

  // Wrong kind of read: a clear message.
  CHECK_THROWS_WITH_AS(r.read_f32("i32"), doctest::Contains("not a floating type"), Error);
  CHECK_THROWS_WITH_AS(r.read_i32("f32"), doctest::Contains("not an integer type"), Error);
}

TEST_CASE("hand-built file: odd header length, trailing spaces, unaligned data, nested unknown fields") {
  // 3 F32 values in little-endian byte order, after a header of odd length (so at an odd address).
  const float vals[3] = {1.0f, -2.0f, 0.5f};
  Bytes data;
  for (float v : vals) {
    const std::uint32_t u = bits(v);
    for (int i = 0; i < 4; ++i) data.push_back(static_cast<std::uint8_t>(u >> (8 * i)));
  }
  const std::string header =
      R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12],"extra":{"a":[1,{"b":null}]}},"__metadata__":{}})"
      "     ";
  REQUIRE(header.size() % 2 == 1);
  const auto r = SafetensorsReader::from_bytes(make_file(header, data));
  const auto t = r.read_f32("w");
  CHECK(t[0] == 1.0f);
  CHECK(t[1] == -2.0f);
  CHECK(t[2] == 0.5f);
  CHECK(r.metadata().empty());
  CHECK(r.raw("w").size() == 12);
}

TEST_CASE("read_into checks the shape; a missing tensor is named") {
  Tensor<float> x = Tensor<float>::from(Shape{2, 3}, {1, 2, 3, 4, 5, 6});
  SafetensorsWriter w;
  w.add("blocks.0.ln1.weight", x.cview());
  w.add("blocks.0.ln1.bias", x.cview());
  const auto r = SafetensorsReader::from_bytes(w.to_bytes(), "ckpt.safetensors");

  Tensor<float> out(Shape{2, 3});
  r.read_into("blocks.0.ln1.weight", out.view());
  CHECK(out[5] == 6.0f);
  Tensor<float> wrong(Shape{3, 2});
  try {
    r.read_into("blocks.0.ln1.weight", wrong.view());
    FAIL("expected an error");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("blocks.0.ln1.weight") != std::string::npos);
    CHECK(msg.find("ckpt.safetensors") != std::string::npos);
    CHECK(msg.find("[2, 3]") != std::string::npos);
    CHECK(msg.find("expected [3, 2]") != std::string::npos);
  }
  Tensor<std::int32_t> iout(Shape{2, 3});
  CHECK_THROWS_WITH_AS(r.read_into("blocks.0.ln1.weight", iout.view()), doctest::Contains("not an integer type"),
                       Error);
  try {
    (void)r.info("blocks.0.ln2.weight");
    FAIL("expected an error");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'blocks.0.ln2.weight' is missing") != std::string::npos);
    CHECK(msg.find("ckpt.safetensors") != std::string::npos);
    CHECK(msg.find("blocks.0.ln1.weight") != std::string::npos);  // nearest names
  }
  CHECK_FALSE(r.has("nope"));
  CHECK_THROWS_WITH_AS(r.read_f32("nope"), doctest::Contains("missing"), Error);
}

TEST_CASE("malformed files are rejected with a message naming the problem") {
  const Bytes f32x2(8, 0);  // two F32 values
  auto entry = [](const std::string& body) { return "{\"t\":" + body + "}"; };

  SUBCASE("too short") {
    check_rejected(Bytes{}, "shorter than the 8-byte header length");
    check_rejected(Bytes{1, 0, 0}, "shorter than the 8-byte header length");
  }
  SUBCASE("header length past the end") {
    Bytes b = make_file("{}");
    b[0] = 200;
    check_rejected(b, "past the end of the file");
    Bytes huge = make_file("{}");
    for (int i = 0; i < 8; ++i) huge[static_cast<std::size_t>(i)] = 0xFF;  // 2^64 - 1: no allocation attempted
    check_rejected(huge, "past the end of the file");
  }
  SUBCASE("bytes that no tensor owns, as the reference implementation refuses them") {
    const Bytes f32x3(12, 0);
    auto two = [](int b0, int e0, int b1, int e1) {
      return "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" + std::to_string(b0) + "," +
             std::to_string(e0) + "]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
             std::to_string(b1) + "," + std::to_string(e1) + "]}}";
    };
    CHECK(error_of(make_file(two(0, 4, 4, 8), Bytes(8, 0))).empty());
    CHECK(error_of(make_file(two(4, 8, 0, 4), Bytes(8, 0))).empty());  // the order of the entries does not matter
    check_rejected(make_file(two(0, 4, 8, 12), f32x3), "bytes [4, 8) of the data section belong to no tensor");
    check_rejected(make_file(two(4, 8, 8, 12), f32x3), "bytes [0, 4) of the data section belong to no tensor");
    check_rejected(make_file(two(0, 4, 4, 8), f32x3), "trailing data after the last tensor");
    check_rejected(make_file("{}", Bytes(1, 0)), "the data section holds 1 bytes but the tensors cover only 0");
    // An empty tensor owns no bytes and may sit anywhere inside the data section.
    CHECK(error_of(make_file(R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})")).empty());
  }
  SUBCASE("a header that does not start with '{'") {
    check_rejected(make_file(" {}"), "not a JSON object from its first byte (it starts with ' '");
    check_rejected(make_file("\xEF\xBB\xBF{}"), "a UTF-8 byte-order mark");
    check_rejected(make_file("\n{}"), "it starts with '\\x0a'");
  }
  SUBCASE("JSON that does not parse or is not an object") {
    check_rejected(make_file(""), "not valid JSON");
    check_rejected(make_file("{\"t\": "), "not valid JSON");
    check_rejected(make_file("{} trailing"), "not valid JSON");
    check_rejected(make_file("{\"a\":1e999}"), "not valid JSON");
    check_rejected(make_file("{\"\xff\":{}}"), "not valid JSON");  // invalid UTF-8
    check_rejected(make_file("[]"), "not a JSON object");
    check_rejected(make_file("42"), "not a JSON object");
    check_rejected(make_file("\"x\""), "not a JSON object");
    // A NUL ends the JSON reader's input: the garbage after it would go unread.
    check_rejected(make_file(std::string("{}") + '\0' + " garbage {{{"), "NUL byte at offset 10");
    check_rejected(make_file(std::string("{\"__metadata__\":{\"a\":\"b\"}}") + '\0'), "NUL byte");
  }
  SUBCASE("entries") {
    check_rejected(make_file(entry("[1,2]")), "entry 't' is not an object");
    check_rejected(make_file(entry("\"F32\"")), "entry 't' is not an object");
    check_rejected(make_file(entry(R"({"shape":[2],"data_offsets":[0,8]})"), f32x2), "missing \"dtype\"");
    check_rejected(make_file(entry(R"({"dtype":"F32","data_offsets":[0,8]})"), f32x2), "missing \"shape\"");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2]})"), f32x2), "missing \"data_offsets\"");
    check_rejected(make_file(entry(R"({"dtype":3,"shape":[2],"data_offsets":[0,8]})"), f32x2), "not a string");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"), f32x2), "not an array");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":{}})"), f32x2), "not an array");
    check_rejected(make_file(entry(R"({"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]})"), f32x2),
                   "twice");
    check_rejected(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"t":{}})", f32x2),
                   "duplicate entry 't'");
  }
  SUBCASE("dims") {
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), f32x2), "negative");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), f32x2),
                   "not an integer");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})"), f32x2),
                   "not an integer");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[[2]],"data_offsets":[0,8]})"), f32x2),
                   "not an integer");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]})"), f32x2),
                   "too large");
    check_rejected(
        make_file(entry(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]})"), f32x2),
        "overflows");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,-8]})"), f32x2), "negative");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8.5]})"), f32x2),
                   "not an integer");
  }
  SUBCASE("offsets") {
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,16]})"), f32x2), "out of range");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]})"), f32x2),
                   "out of range");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})"), f32x2), "begin 8 > end 0");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0]})"), f32x2), "2 integers");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,8]})"), f32x2), "2 integers");
    check_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                             f32x2),
                   "overlap");
    check_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                             f32x2),
                   "overlap");
  }
  SUBCASE("byte count") {
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), f32x2), "needs 12 bytes");
    check_rejected(make_file(entry(R"({"dtype":"F16","shape":[2],"data_offsets":[0,8]})"), f32x2), "needs 4 bytes");
    check_rejected(make_file(entry(R"({"dtype":"F32","shape":[],"data_offsets":[0,8]})"), f32x2), "needs 4 bytes");
  }
  SUBCASE("dtype") {
    check_rejected(make_file(entry(R"({"dtype":"F128","shape":[2],"data_offsets":[0,8]})"), f32x2), "unknown dtype");
    check_rejected(make_file(entry(R"({"dtype":"f32","shape":[2],"data_offsets":[0,8]})"), f32x2), "unknown dtype");
  }
  SUBCASE("metadata") {
    check_rejected(make_file(R"({"__metadata__":[]})"), "__metadata__ is not an object");
    check_rejected(make_file(R"({"__metadata__":"x"})"), "__metadata__ is not an object");
    check_rejected(make_file(R"({"__metadata__":{"a":1}})"), "__metadata__ value for 'a' is not a string");
    check_rejected(make_file(R"({"__metadata__":{"a":{"b":"c"}}})"), "__metadata__ value for 'a' is not a string");
    check_rejected(make_file(R"({"__metadata__":{"a":"1","a":"2"}})"), "duplicate key 'a'");
    check_rejected(make_file(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate entry");
  }
  SUBCASE("values that cannot be converted") {
    const Bytes two(2, 7);
    check_rejected(make_file(entry(R"({"dtype":"BOOL","shape":[2],"data_offsets":[0,2]})"), two), "neither 0 nor 1");
  }
  SUBCASE("deep nesting in an ignored field is refused, not recursed into") {
    std::string deep(10000, '[');
    check_rejected(make_file(entry("{\"x\":" + deep)), "nested too deeply");
  }
}

TEST_CASE("read_file and map_file say what is wrong") {
  TempDir dir;
  CHECK_THROWS_WITH_AS(read_file(dir.file("none")), doctest::Contains("no such file"), Error);
  CHECK_THROWS_WITH_AS(read_file(dir.path.string()), doctest::Contains("directory"), Error);
  CHECK_THROWS_WITH_AS(map_file(dir.file("none")), doctest::Contains("no such file"), Error);
  CHECK_THROWS_WITH_AS(SafetensorsReader::open(dir.file("none.safetensors")),
                       doctest::Contains("none.safetensors': no such file"), Error);
  write_file_atomic(dir.file("empty"), std::string_view());
  CHECK(read_file(dir.file("empty")).empty());
  CHECK(map_file(dir.file("empty")).size() == 0);
  CHECK_THROWS_WITH_AS(SafetensorsReader::open(dir.file("empty")), doctest::Contains("shorter than"), Error);
  write_file_atomic(dir.file("abc"), std::string_view("abc"));
  CHECK(read_file(dir.file("abc")) == Bytes{'a', 'b', 'c'});
  CHECK(map_file(dir.file("abc")).mapped());
}

TEST_CASE("atomic write: no temporary file left, the old file survives a failing writer") {
  TempDir dir;
  const std::string path = dir.file("out.bin");
  write_file_atomic(path, std::string_view("old content"));
  CHECK(slurp(path) == "old content");
  CHECK(dir.listing() == std::vector<std::string>{"out.bin"});

  CHECK_THROWS_WITH_AS(write_file_atomic(path,
                                         [](std::ostream& os) {
                                           os << "new content, half written";
                                           std::string big(200000, 'x');  // past the stream buffer: really on disk
                                           os << big;
                                           throw std::runtime_error("writer failed mid-way");
                                         }),
                       "writer failed mid-way", std::runtime_error);
  CHECK(slurp(path) == "old content");
  CHECK(dir.listing() == std::vector<std::string>{"out.bin"});

  // A limoe::Error from the writer propagates the same way.
  CHECK_THROWS_AS(write_file_atomic(path, [](std::ostream&) { fail("boom"); }), Error);
  CHECK(slurp(path) == "old content");
  CHECK(dir.listing() == std::vector<std::string>{"out.bin"});

  // Replacing works and leaves nothing else behind.
  write_file_atomic(path, [](std::ostream& os) { os << "new content"; });
  CHECK(slurp(path) == "new content");
  CHECK(dir.listing() == std::vector<std::string>{"out.bin"});

  // Errors name the path: a missing directory, a directory in the way.
  CHECK_THROWS_WITH_AS(write_file_atomic(dir.file("no/such/dir/x"), std::string_view("x")),
                       doctest::Contains("cannot write"), Error);
  fs::create_directory(dir.path / "sub");
  CHECK_THROWS_WITH_AS(write_file_atomic(dir.file("sub"), std::string_view("x")), doctest::Contains("directory"),
                       Error);
  CHECK(fs::is_directory(dir.path / "sub"));
  // A pipe, or a device through a symbolic link, is refused, not replaced by a regular file; a link to a regular
  // file is replaced itself (its target keeps its content).
  REQUIRE(::mkfifo(dir.file("pipe").c_str(), 0600) == 0);
  CHECK_THROWS_WITH_AS(write_file_atomic(dir.file("pipe"), std::string_view("x")),
                       doctest::Contains("not a regular file"), Error);
  CHECK(fs::is_fifo(dir.path / "pipe"));
  fs::create_symlink("/dev/null", dir.path / "null");
  CHECK_THROWS_WITH_AS(write_file_atomic(dir.file("null"), std::string_view("x")),
                       doctest::Contains("not a regular file"), Error);
  CHECK(fs::is_symlink(dir.path / "null"));
  CHECK_THROWS_WITH_AS(write_files_atomic({{dir.file("ok"), "fine"}, {dir.file("pipe"), "x"}}),
                       doctest::Contains("not a regular file"), Error);
  CHECK_FALSE(fs::exists(dir.path / "ok"));  // neither written
  fs::remove(dir.path / "pipe");
  fs::remove(dir.path / "null");
  fs::create_symlink(path, dir.path / "link");
  write_file_atomic(dir.file("link"), std::string_view("through the link"));
  CHECK(slurp(path) == "new content");
  CHECK(slurp(dir.file("link")) == "through the link");
  fs::remove(dir.path / "link");
  // Files that belong together: a folder in the way of the second leaves the first as it was, no temporary file.
  CHECK_THROWS_WITH_AS(write_files_atomic({{path, "first"}, {dir.file("sub"), "second"}}),
                       doctest::Contains("directory"), Error);
  CHECK(slurp(path) == "new content");
  // ... and one that cannot be staged (its folder missing) after the first was: the first's temporary file goes.
  CHECK_THROWS_WITH_AS(write_files_atomic({{path, "first"}, {dir.file("no/such/second"), "second"}}),
                       doctest::Contains("cannot create the temporary file"), Error);
  CHECK(slurp(path) == "new content");
  CHECK(dir.listing() == std::vector<std::string>{"out.bin", "sub"});
  write_files_atomic({{path, "first"}, {dir.file("second"), "second"}});
  CHECK(slurp(path) == "first");
  CHECK(slurp(dir.file("second")) == "second");
  fs::remove(dir.path / "second");
  write_file_atomic(path, std::string_view("new content"));
  CHECK(dir.listing() == std::vector<std::string>{"out.bin", "sub"});

  // A safetensors writer over an existing file.
  SafetensorsWriter w;
  w.add_scalar("logit_scale", 1.0f);
  w.write(path);
  CHECK(SafetensorsReader::open(path).read_f32("logit_scale")[0] == 1.0f);
  CHECK(dir.listing().size() == 2);  // out.bin and sub
}
