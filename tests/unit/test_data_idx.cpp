// IDX reader: round trips (plain and gzipped), bad files rejected with the file's name.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "limoe/data/fashion_mnist.hpp"
#include "limoe/data/idx.hpp"

namespace fs = std::filesystem;
using limoe::data::IdxArray;

namespace {
const fs::path& tmp_dir() {
  static const struct Dir {
    fs::path path = fs::temp_directory_path() / ("limoe_test_data_idx_" + std::to_string(::getpid()));
    Dir() { fs::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } dir;
  return dir.path;
}
std::string tmp_path(const std::string& name) { return (tmp_dir() / name).string(); }
void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
std::string error_of(const std::string& path) {
  try {
    limoe::data::read_idx(path);
  } catch (const limoe::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("IDX round trip, plain and gzipped") {
  std::vector<std::uint8_t> data(3 * 4 * 5);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 7 + 3);
  for (bool gz : {false, true}) {
    const std::string p = tmp_path(gz ? "a.idx3.gz" : "a.idx3");
    limoe::data::write_idx(p, {3, 4, 5}, data, gz);
    // The gzip file really is gzip (magic 1f 8b), the plain one starts with the IDX magic.
    std::ifstream f(p, std::ios::binary);
    const int b0 = f.get(), b1 = f.get();
    if (gz) CHECK((b0 == 0x1f && b1 == 0x8b));
    else CHECK((b0 == 0 && b1 == 0));
    const IdxArray a = limoe::data::read_idx(p);
    CHECK(a.dims == std::vector<std::uint32_t>{3, 4, 5});
    CHECK(a.data == data);
  }
  const std::string p1 = tmp_path("labels.idx1.gz");
  limoe::data::write_idx(p1, {4}, {9, 0, 3, 255}, true);
  CHECK(limoe::data::read_idx(p1).data == std::vector<std::uint8_t>{9, 0, 3, 255});
}

TEST_CASE("IDX: bad magic, truncated and missing files name the file") {
  const std::string bad = tmp_path("bad_magic.idx");
  write_bytes(bad, {1, 2, 8, 1, 0, 0, 0, 1, 7});
  std::string m = error_of(bad);
  CHECK(m.find("bad_magic.idx") != std::string::npos);
  CHECK(m.find("magic") != std::string::npos);

  const std::string type = tmp_path("bad_type.idx");
  write_bytes(type, {0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0});
  CHECK(error_of(type).find("not supported") != std::string::npos);

  // Header promises 2x3 = 6 bytes, file has 4.
  const std::string trunc = tmp_path("truncated.idx");
  write_bytes(trunc, {0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4});
  m = error_of(trunc);
  CHECK(m.find("truncated.idx") != std::string::npos);
  CHECK(m.find("truncated") != std::string::npos);

  const std::string header = tmp_path("short_header.idx");
  write_bytes(header, {0, 0, 8, 3, 0, 0});
  CHECK(error_of(header).find("truncated header") != std::string::npos);

  // A gzip stream cut in the middle.
  std::vector<std::uint8_t> big(20000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::uint8_t>((i * 2654435761u) >> 13);
  const std::string gz = tmp_path("cut.idx.gz");
  limoe::data::write_idx(gz, {100, 200}, big, true);
  const auto size = fs::file_size(gz);
  fs::resize_file(gz, size / 2);
  m = error_of(gz);
  CHECK(m.find("cut.idx.gz") != std::string::npos);

  CHECK(error_of(tmp_path("does_not_exist.idx")).find("does_not_exist.idx") != std::string::npos);
}

TEST_CASE("Fashion-MNIST: a missing folder is an error naming it") {
  CHECK_FALSE(limoe::data::fashion_mnist_available("/nonexistent/limoe"));
  CHECK_THROWS_WITH_AS(limoe::data::FashionMnist(limoe::data::Split::train, "/nonexistent/limoe"), doctest::Contains("/nonexistent/limoe"),
                       limoe::Error);
}
