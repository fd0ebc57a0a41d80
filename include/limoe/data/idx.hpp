// limoe/data/idx.hpp: the IDX file format (MNIST, Fashion-MNIST), plain or gzipped.
//
// An IDX file is: two zero bytes, a type byte (0x08 = unsigned byte, the only type read here), a rank byte,
// `rank` big-endian uint32 dimensions, then the row-major data. zlib's gzread reads gzip files and passes plain
// files through unchanged, so one reader serves both `.gz` and uncompressed files.
#pragma once

#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"

namespace limoe::data {

struct IdxArray {
  std::vector<std::uint32_t> dims;  // e.g. [60000, 28, 28] for images, [60000] for labels
  std::vector<std::uint8_t> data;   // row-major, product(dims) bytes
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
};

// Reads a whole file, gunzipping it when it is gzip (zlib detects the header; plain files pass through).
inline std::vector<std::uint8_t> read_file_maybe_gzip(const std::string& path) {
  LIMOE_CHECK(std::filesystem::exists(path), "cannot open \"", path, "\": no such file");
  gzFile f = gzopen(path.c_str(), "rb");
  LIMOE_CHECK(f != nullptr, "cannot open \"", path, "\"");
  gzbuffer(f, 1 << 17);
  std::vector<std::uint8_t> out;
  std::vector<std::uint8_t> chunk(1 << 20);
  for (;;) {
    const int n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int code = 0;
      const char* msg = gzerror(f, &code);
      const std::string m = msg ? msg : "unknown zlib error";
      gzclose(f);
      fail("cannot read \"", path, "\": ", m, " (a truncated or corrupt gzip file?)");
    }
    if (n == 0) break;
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
  }
  // gzread returns 0 at the end of a complete stream, but also for a gzip stream cut short; gzerror tells them
  // apart (Z_BUF_ERROR: "unexpected end of file").
  int code = Z_OK;
  const char* msg = gzerror(f, &code);
  const std::string m = msg ? msg : "";
  gzclose(f);
  LIMOE_CHECK(code == Z_OK || code == Z_STREAM_END, "cannot read \"", path, "\": ", m,
              " (a truncated or corrupt gzip file?)");
  return out;
}

// Parses an IDX image from bytes; `name` appears in error messages (the file name).
inline IdxArray parse_idx(const std::vector<std::uint8_t>& b, const std::string& name) {
  LIMOE_CHECK(b.size() >= 4, "IDX file \"", name, "\": too short for a header (", b.size(), " bytes)");
  LIMOE_CHECK(b[0] == 0 && b[1] == 0, "IDX file \"", name, "\": bad magic (first two bytes must be 0, got ",
              int(b[0]), ", ", int(b[1]), "); not an IDX file?");
  LIMOE_CHECK(b[2] == 0x08, "IDX file \"", name, "\": data type 0x", std::hex, int(b[2]),
              " is not supported (only 0x08, unsigned byte)");
  const int rank = b[3];
  LIMOE_CHECK(rank >= 1 && rank <= 4, "IDX file \"", name, "\": rank ", rank, " out of range 1..4");
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(rank);
  LIMOE_CHECK(b.size() >= header, "IDX file \"", name, "\": truncated header (", b.size(), " bytes, need ",
              header, ")");
  IdxArray a;
  for (int i = 0; i < rank; ++i) {
    const std::uint8_t* p = b.data() + 4 + 4 * i;
    a.dims.push_back(std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 | std::uint32_t{p[2]} << 8 | p[3]);
  }
  const std::uint64_t n = a.numel();
  LIMOE_CHECK(b.size() - header >= n, "IDX file \"", name, "\": truncated: header promises ", n,
              " bytes of data, file has ", b.size() - header);
  LIMOE_CHECK(b.size() - header == n, "IDX file \"", name, "\": ", b.size() - header - n,
              " unexpected bytes after the data");
  a.data.assign(b.begin() + static_cast<std::ptrdiff_t>(header), b.end());
  return a;
}

// Reads an IDX file (plain or gzipped).
inline IdxArray read_idx(const std::string& path) { return parse_idx(read_file_maybe_gzip(path), path); }

// Writes an unsigned-byte IDX file; gzipped when `gzip` (for tests and for exporting data).
inline void write_idx(const std::string& path, const std::vector<std::uint32_t>& dims,
                      const std::vector<std::uint8_t>& data, bool gzip) {
  LIMOE_CHECK(!dims.empty() && dims.size() <= 4, "write_idx(\"", path, "\"): rank ", dims.size(),
              " out of range 1..4");
  std::uint64_t n = 1;
  for (auto d : dims) n *= d;
  LIMOE_CHECK(n == data.size(), "write_idx(\"", path, "\"): dims hold ", n, " values, data has ", data.size());
  std::vector<std::uint8_t> bytes = {0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
  for (auto d : dims)
    for (int s = 24; s >= 0; s -= 8) bytes.push_back(static_cast<std::uint8_t>(d >> s));
  bytes.insert(bytes.end(), data.begin(), data.end());
  gzFile f = gzopen(path.c_str(), gzip ? "wb6" : "wbT");  // "T": write plain, uncompressed
  LIMOE_CHECK(f != nullptr, "cannot open \"", path, "\" for writing");
  const int w = bytes.empty() ? 0 : gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  const int c = gzclose(f);
  LIMOE_CHECK(w == static_cast<int>(bytes.size()) && c == Z_OK, "cannot write \"", path, "\"");
}

}  // namespace limoe::data
