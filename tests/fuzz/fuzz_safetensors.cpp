// libFuzzer target for the safetensors reader (limoe/io/safetensors.hpp).
//
// Any input must either be rejected with limoe::Error or open cleanly; every tensor of a file that opens must then
// read (or be refused with limoe::Error, e.g. an I64 value out of int32 range or a rank > 4 Shape). Anything else (a
// crash, a sanitizer report, another exception type) is a bug. Files that open are also written back with
// SafetensorsWriter and reread: names, metadata, shapes and F32 bits must survive the round trip.
// Seeds: tests/data/safetensors/*.safetensors, and header texts like
//   {"t":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}<NUL><4 data bytes>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limoe/io/safetensors.hpp>
#include <vector>

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace limoe;
  using namespace limoe::io;
  // Two input forms, so that mutations reach the header checks more often than the length field would allow:
  // raw file bytes, or (first byte '{') a header text, a NUL, then the data section; the length is filled in.
  std::vector<std::uint8_t> bytes;
  if (size > 0 && data[0] == '{') {
    const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
    const std::size_t n = nul ? static_cast<std::size_t>(nul - data) : size;
    bytes.resize(8);
    for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(std::uint64_t{n} >> (8 * i));
    bytes.insert(bytes.end(), data, data + n);
    if (nul) bytes.insert(bytes.end(), nul + 1, data + size);
  } else {
    bytes.assign(data, data + size);
  }
  std::optional<SafetensorsReader> r;
  try {
    r.emplace(SafetensorsReader::from_bytes(std::move(bytes), "fuzz"));
  } catch (const Error&) {
    return 0;
  }

  SafetensorsWriter w;
  for (const auto& [k, v] : r->metadata()) w.set_metadata(k, v);
  for (const auto& name : r->names()) {
    const TensorInfo& ti = r->info(name);
    check(ti.begin <= ti.end);
    check(ti.numel() >= 0);
    check(r->raw(name).size() == ti.nbytes());
    try {
      if (dtype_is_float(ti.dtype)) {
        const std::vector<float> flat = r->read_f32_flat(name);
        check(flat.size() == static_cast<std::size_t>(ti.numel()));
        w.add(name, ti.shape, std::span<const float>(flat));
        if (ti.shape.size() <= 4) {
          const Tensor<float> t = r->read_f32(name);
          check(t.numel() == ti.numel());
          check(t.numel() == 0 || std::memcmp(t.data(), flat.data(), flat.size() * sizeof(float)) == 0);
        }
      } else {
        const std::vector<std::int32_t> flat = r->read_i32_flat(name);
        check(flat.size() == static_cast<std::size_t>(ti.numel()));
        w.add(name, ti.shape, std::span<const std::int32_t>(flat));
        if (ti.shape.size() <= 4) check(r->read_i32(name).numel() == ti.numel());
      }
    } catch (const Error&) {
      // refused conversion (an int out of int32 range, a BOOL byte > 1, rank > 4): fine
    }
  }

  // Round trip through the writer: must reopen and hold the same content.
  const SafetensorsReader r2 = SafetensorsReader::from_bytes(w.to_bytes(), "fuzz-roundtrip");
  check(r2.metadata() == r->metadata());
  check(r2.size() == w.size());
  for (const auto& name : r2.names()) {
    const TensorInfo& a = r->info(name);
    const TensorInfo& b = r2.info(name);
    check(a.shape == b.shape);
    check(b.dtype == (dtype_is_float(a.dtype) ? DType::F32 : DType::I32));
    if (dtype_is_float(a.dtype)) {
      const auto x = r->read_f32_flat(name), y = r2.read_f32_flat(name);
      check(x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0));
    } else {
      check(r->read_i32_flat(name) == r2.read_i32_flat(name));
    }
  }
  return 0;
}
