// limoe/io/safetensors.hpp: reading and writing the safetensors format (spec docs/cli.md).
//
// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (possibly padded with trailing spaces)
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}}
// then the data section; offsets are relative to its first byte, data is little-endian and row-major.
//
// Reading:
//   auto r = limoe::io::SafetensorsReader::open("model.safetensors");   // mmap by default; Load::Read reads it all
//   Tensor<float> w = r.read_f32("img.patch.weight");                   // converts F16 / BF16 / F64 to float
//   Tensor<std::int32_t> ids = r.read_i32("texts");                     // converts I64 / I16 / I8 / U* / BOOL, range-checked
//   r.read_into("norm.weight", params.view());                          // checks the shape, then converts in place
//   r.metadata().at("config");
// The header is validated completely when the file is opened: every problem (a short file, a header length past the
// end, JSON that does not parse or is not an object from its first byte, an entry that is not an object or lacks
// dtype / shape / data_offsets, negative or non-integer dims, offsets out of range, begin > end, overlapping tensors,
// data bytes no tensor covers (gaps, trailing bytes: the reference implementation's rule), a byte count
// that does not match dtype x shape, an unknown dtype, a `__metadata__` that is not a string -> string object,
// duplicate names) throws limoe::Error whose message starts with "safetensors '<file>': ". Nothing is allocated in
// proportion to what the header claims: every size is checked against the bytes actually present (the header is
// parsed with a streaming parser into only what it needs; headers over 100 MB are refused, as the reference
// implementation does). Shapes of any rank are accepted (TensorInfo keeps them as std::vector<int64_t>); converting
// one of rank > 4 to a limoe::Shape (read_f32 / read_i32 / read_into / shape) throws; read_f32_flat /
// read_i32_flat return the values of any rank.
//
// Writing:
//   limoe::io::SafetensorsWriter w;
//   w.add("img.pos", pos.cview());                      // F32 (the default); DType::F16 / BF16 / F64 on request,
//   w.add("texts", ids.cview());                        // I32 (or DType::I64)
//   w.add_scalar("logit_scale", 2.3f);                  // shape []
//   w.add("x5", {2, 1, 1, 1, 3}, values_span);          // any rank, from a flat span
//   w.set_metadata("format", "limoe");
//   w.write("out.safetensors");                         // atomic (limoe/io/file.hpp)
// Output is deterministic: `__metadata__` first (when there is any), then the tensors sorted by name, data laid out
// in that order with no gaps (readable by the reference `safetensors` package), and the header padded with spaces
// so that the data section starts at a multiple of 8 bytes. Float -> F16 / BF16 rounds to nearest, ties to even;
// values too large for F16 become +-inf; NaN stays NaN (quiet).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/io/file.hpp"

namespace limoe::io {

// ---------------------------------------------------------------------------------------------------------------
// Element types

enum class DType { F32, F16, BF16, F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I8: return "I8";
    case DType::I16: return "I16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::U16: return "U16";
    case DType::U32: return "U32";
    case DType::U64: return "U64";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
    case DType::I64:
    case DType::U64: return 8;
    case DType::F32:
    case DType::I32:
    case DType::U32: return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
    case DType::U16: return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL: return 1;
  }
  return 0;
}

inline bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

inline std::optional<DType> dtype_from_name(std::string_view s) {
  static constexpr DType all[] = {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I8,  DType::I16, DType::I32,
                                  DType::I64, DType::U8,  DType::U16,  DType::U32, DType::U64, DType::BOOL};
  for (DType t : all)
    if (s == dtype_name(t)) return t;
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------------------------
// Exact half / bfloat16 conversions (by hand: no compiler _Float16 needed).

// IEEE binary16 bits -> float, exact for every value: subnormals are normalised, inf stays inf, NaN payloads are kept.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t mant = h & 0x3FFu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;  // +-0
    } else {      // subnormal: mant * 2^-24; shift the leading one up to the implicit position
      std::uint32_t e = 113;  // float exponent field of 2^-14
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf, or NaN with its payload
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  }
  return std::bit_cast<float>(bits);
}

// float -> IEEE binary16 bits, rounding to nearest, ties to even. Overflow gives +-inf, NaN gives a quiet NaN.
inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {  // inf or NaN
    if (a == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // quiet NaN, top payload bits kept
  }
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: rounds to inf
  if (a >= 0x38800000u) {                                                   // >= 2^-14: a normal half
    std::uint32_t h = ((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu));
    const std::uint32_t rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
    return static_cast<std::uint16_t>(sign | h);
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 (half the smallest subnormal): rounds to +-0 (tie goes to even 0)
  // Subnormal half: value / 2^-24 = mant24 * 2^(e - 150 + 24).
  const std::uint32_t e = a >> 23;  // 102..112
  const std::uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const std::uint32_t shift = 126u - e;  // 14..24
  std::uint32_t h = mant >> shift;
  const std::uint32_t rem = mant & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // may become 0x400, the smallest normal: also correct
  return static_cast<std::uint16_t>(sign | h);
}

// bfloat16 bits -> float: exact (bfloat16 is the top half of a float).
inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

// float -> bfloat16 bits, rounding to nearest, ties to even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  const std::uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);  // overflow past the largest finite gives inf
  return static_cast<std::uint16_t>(rounded >> 16);
}

// double -> float rounding to nearest, without the undefined behaviour of an out-of-range cast.
inline float double_to_float(double d) {
  if (std::isnan(d)) return std::signbit(d) ? -std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::quiet_NaN();
  const double a = std::fabs(d);
  if (a <= static_cast<double>(std::numeric_limits<float>::max())) return static_cast<float>(d);
  // Past FLT_MAX = 2^128 - 2^104: below the midpoint to 2^128 it rounds down to FLT_MAX, from it (ties to even) to inf.
  const float r = a < 0x1.ffffffp127 ? std::numeric_limits<float>::max() : std::numeric_limits<float>::infinity();
  return d < 0 ? -r : r;
}

// ---------------------------------------------------------------------------------------------------------------

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  // any rank; [] is a scalar
  std::size_t begin = 0, end = 0;   // byte range in the data section (relative to its first byte)

  // Number of elements (the product of the dims; 1 for a scalar). Validated not to overflow when the file was opened.
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::size_t nbytes() const { return end - begin; }
};

inline std::string shape_str(std::span<const std::int64_t> dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

namespace detail {

template <class U>
U load_le(const std::uint8_t* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big) {
    U r = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i) r = static_cast<U>((r << 8) | ((v >> (8 * i)) & 0xFF));
    v = r;
  }
  return v;
}

template <class U>
void store_le(std::uint8_t* p, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::uint8_t>((v >> (8 * i)) & 0xFF);
}

// Up to `max` bytes of s with control bytes (and, unless keep_utf8, all non-ASCII bytes) escaped as \xNN,
// "..." when cut.
inline std::string escape_bytes(const std::string& s, std::size_t max, bool keep_utf8) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  const std::size_t n = std::min(s.size(), max);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F || (!keep_utf8 && c > 0x7F)) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > n) out += "...";
  return out;
}

// A length-limited message with control and non-ASCII bytes escaped (parser messages quote raw input bytes).
inline std::string truncate_message(const std::string& s, std::size_t max = 300) { return escape_bytes(s, max, false); }

// A printable, length-limited form of a name from a file (names may be long or hold control characters).
inline std::string printable(const std::string& s) {
  std::string out(1, '\'');
  out += escape_bytes(s, 200, true);
  out += '\'';
  return out;
}

// One tensor entry as it appears in the JSON header, before validation.
struct RawEntry {
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint64_t> offsets;
};

// Streaming (SAX) reader of the header: keeps only what it needs, checks the structure as it goes, and stops at the
// first problem, so a hostile header cannot make it build a large or deeply nested document.
class HeaderSax {
 public:
  using json = nlohmann::json;
  static constexpr int kMaxSkipDepth = 64;

  std::string error;
  std::map<std::string, RawEntry> entries;
  std::map<std::string, std::string> metadata;

  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(json::number_integer_t v) {
    if (skip_ > 0) return true;
    if (in_array()) {
      if (v < 0) return bad("negative value " + std::to_string(v) + " in " + array_what());
      return push(static_cast<std::uint64_t>(v));
    }
    return scalar("a number");
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (skip_ > 0) return true;
    if (in_array()) return push(v);
    return scalar("a number");
  }
  bool number_float(json::number_float_t, const std::string& text) {
    if (skip_ > 0) return true;
    if (in_array()) return bad("value " + truncate_message(text, 40) + " in " + array_what() + " is not an integer");
    return scalar("a number");
  }
  bool string(std::string& s) {
    if (skip_ > 0) return true;
    if (depth_ == 2 && in_metadata_) {
      metadata[field_] = std::move(s);
      return true;
    }
    if (depth_ == 2 && field_ == "dtype") {
      entry().dtype = std::move(s);
      return true;
    }
    return scalar("a string");
  }
  bool binary(json::binary_t&) { return scalar("binary data"); }

  bool start_object(std::size_t) {
    if (skip_ > 0) return deeper();
    switch (depth_) {
      case 0: depth_ = 1; return true;
      case 1:
        in_metadata_ = (top_ == "__metadata__");
        if (!in_metadata_) entries[top_];  // creates the entry
        depth_ = 2;
        return true;
      case 2:
        if (in_metadata_ || is_known_field()) return scalar("an object");
        skip_ = 1;  // an unknown field of a tensor entry: ignored
        return true;
      default: return scalar("an object");
    }
  }
  bool start_array(std::size_t) {
    if (skip_ > 0) return deeper();
    switch (depth_) {
      case 0:
      case 1: return scalar("an array");
      case 2:
        if (!in_metadata_ && (field_ == "shape" || field_ == "data_offsets")) {
          depth_ = 3;
          return true;
        }
        if (in_metadata_ || is_known_field()) return scalar("an array");
        skip_ = 1;
        return true;
      default: return scalar("an array");
    }
  }
  bool key(std::string& k) {
    if (skip_ > 0) return true;
    if (depth_ == 1) {
      if (k == "__metadata__" ? seen_metadata_ : entries.count(k) != 0)
        return bad("duplicate entry " + printable(k) + " in the header");
      if (k == "__metadata__") seen_metadata_ = true;
      top_ = std::move(k);
      return true;
    }
    // depth 2
    if (in_metadata_) {
      if (metadata.count(k)) return bad("duplicate key " + printable(k) + " in __metadata__");
      field_ = std::move(k);
      return true;
    }
    RawEntry& e = entry();
    bool* flag = k == "dtype" ? &e.has_dtype : k == "shape" ? &e.has_shape : k == "data_offsets" ? &e.has_offsets
                                                                                                  : nullptr;
    if (flag) {
      if (*flag) return bad("tensor " + printable(top_) + " has \"" + k + "\" twice");
      *flag = true;
    }
    field_ = std::move(k);
    return true;
  }
  bool end_object() {
    if (skip_ > 0) {
      --skip_;
      return true;
    }
    --depth_;
    if (depth_ == 1) in_metadata_ = false;
    return true;
  }
  bool end_array() {
    if (skip_ > 0) {
      --skip_;
      return true;
    }
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    if (error.empty()) error = "the header is not valid JSON: " + truncate_message(ex.what());
    return false;
  }

 private:
  bool bad(std::string msg) {
    if (error.empty()) error = std::move(msg);
    return false;
  }
  bool deeper() {
    if (++skip_ > kMaxSkipDepth) return bad("the header is nested too deeply");
    return true;
  }
  bool in_array() const { return depth_ == 3; }
  bool is_known_field() const { return field_ == "dtype" || field_ == "shape" || field_ == "data_offsets"; }
  RawEntry& entry() { return entries[top_]; }
  std::string array_what() const { return "\"" + field_ + "\" of tensor " + printable(top_); }
  bool push(std::uint64_t v) {
    RawEntry& e = entry();
    if (field_ == "shape") {
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        return bad("dimension " + std::to_string(v) + " in " + array_what() + " is too large");
      e.shape.push_back(static_cast<std::int64_t>(v));
    } else {
      if (e.offsets.size() >= 2) return bad(array_what() + " holds more than 2 integers");
      e.offsets.push_back(v);
    }
    return true;
  }
  // A value of the wrong kind (`what`) at the current position.
  bool scalar(const char* what) {
    if (skip_ > 0) return true;
    switch (depth_) {
      case 0: return bad(std::string("the header is not a JSON object (it is ") + what + ")");
      case 1:
        if (top_ == "__metadata__") return bad(std::string("__metadata__ is not an object (it is ") + what + ")");
        return bad("entry " + printable(top_) + " is not an object (it is " + what + ")");
      case 2:
        if (in_metadata_)
          return bad("__metadata__ value for " + printable(field_) + " is not a string (it is " + what +
                     "); __metadata__ must map strings to strings");
        if (field_ == "dtype") return bad("\"dtype\" of tensor " + printable(top_) + " is not a string");
        if (field_ == "shape" || field_ == "data_offsets")
          return bad(array_what() + " is not an array (it is " + what + ")");
        return true;  // an unknown scalar field: ignored
      default:
        return bad("value in " + array_what() + " is not an integer (it is " + what + ")");
    }
  }

  int depth_ = 0;  // open containers that we track: 1 the root, 2 an entry or __metadata__, 3 a shape/offsets array
  int skip_ = 0;   // nesting inside an ignored unknown field
  bool in_metadata_ = false;
  bool seen_metadata_ = false;
  std::string top_;    // the current top-level key
  std::string field_;  // the current key inside an entry or __metadata__
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------

class SafetensorsReader {
 public:
  enum class Load { Map, Read };  // memory-map the file (default) or read it into memory

  // Opens and validates a file. Throws limoe::Error naming the file and the problem.
  static SafetensorsReader open(const std::string& path, Load load = Load::Map) {
    SafetensorsReader r;
    r.label_ = path;
    r.bytes_ = load == Load::Map ? map_file(path) : FileBytes(read_file(path));
    r.parse();
    return r;
  }
  // Validates bytes held in memory; `label` stands for the file name in messages.
  static SafetensorsReader from_bytes(std::vector<std::uint8_t> bytes, std::string label = "<memory>") {
    SafetensorsReader r;
    r.label_ = std::move(label);
    r.bytes_ = FileBytes(std::move(bytes));
    r.parse();
    return r;
  }

  const std::string& label() const { return label_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  std::size_t size() const { return tensors_.size(); }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  // Throws, naming the missing tensor, the file, and the nearest names in sorted order.
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it != tensors_.end()) return it->second;
    std::string near;
    auto lb = tensors_.lower_bound(name);
    if (lb != tensors_.begin()) near += detail::printable(std::prev(lb)->first);
    if (lb != tensors_.end()) near += (near.empty() ? "" : ", ") + detail::printable(lb->first);
    fail(context(), "tensor ", detail::printable(name), " is missing (the file holds ", tensors_.size(), " tensors",
         near.empty() ? std::string() : "; nearest names: " + near, ")");
  }

  // The dims as a limoe::Shape; throws for rank > 4.
  Shape shape(const std::string& name) const { return to_shape(info(name)); }

  // The raw little-endian bytes of a tensor.
  std::span<const std::uint8_t> raw(const std::string& name) const {
    const TensorInfo& ti = info(name);
    return {bytes_.data() + data_start_ + ti.begin, ti.nbytes()};
  }

  // Floating tensors (F32, F16, BF16, F64) as float.
  Tensor<float> read_f32(const std::string& name) const {
    const TensorInfo& ti = info(name);
    Tensor<float> t(to_shape(ti));
    convert_float(ti, t.data());
    return t;
  }
  std::vector<float> read_f32_flat(const std::string& name) const {
    const TensorInfo& ti = info(name);
    std::vector<float> v(static_cast<std::size_t>(ti.numel()));
    convert_float(ti, v.data());
    return v;
  }
  // Integer tensors (I32; I64, I16, I8, U64, U32, U16, U8 and BOOL are converted with a range check) as int32.
  Tensor<std::int32_t> read_i32(const std::string& name) const {
    const TensorInfo& ti = info(name);
    Tensor<std::int32_t> t(to_shape(ti));
    convert_int(ti, t.data());
    return t;
  }
  std::vector<std::int32_t> read_i32_flat(const std::string& name) const {
    const TensorInfo& ti = info(name);
    std::vector<std::int32_t> v(static_cast<std::size_t>(ti.numel()));
    convert_int(ti, v.data());
    return v;
  }

  // Checks that the tensor has exactly `out`'s shape, then converts into it. The message names the tensor, the
  // expected shape (out's) and the one in the file.
  void read_into(const std::string& name, View<float> out) const {
    const TensorInfo& ti = check_into(name, out.shape(), out.empty());
    convert_float(ti, out.data());
  }
  void read_into(const std::string& name, View<std::int32_t> out) const {
    const TensorInfo& ti = check_into(name, out.shape(), out.empty());
    convert_int(ti, out.data());
  }

 private:
  SafetensorsReader() = default;

  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  std::string context() const { return "safetensors '" + label_ + "': "; }

  Shape to_shape(const TensorInfo& ti) const {
    if (ti.shape.size() > static_cast<std::size_t>(Shape::kMaxRank))
      fail(context(), "tensor ", detail::printable(ti.name), " has rank ", ti.shape.size(), " (shape ",
           shape_str(ti.shape), "); limoe tensors hold at most ", Shape::kMaxRank,
           " dimensions (read_f32_flat / read_i32_flat read it flat)");
    return Shape(ti.shape.begin(), ti.shape.end());
  }

  const TensorInfo& check_into(const std::string& name, const Shape& expected, bool empty_view) const {
    const TensorInfo& ti = info(name);
    const bool same = ti.shape.size() == static_cast<std::size_t>(expected.rank()) &&
                      std::equal(ti.shape.begin(), ti.shape.end(), expected.begin());
    if (!same)
      fail(context(), "tensor ", detail::printable(name), " has shape ", shape_str(ti.shape),
           " in the file, expected ", expected.str());
    if (empty_view && expected.numel() > 0)
      fail(context(), "read_into ", detail::printable(name), ": the destination view is empty (no data)");
    return ti;
  }

  const std::uint8_t* src(const TensorInfo& ti) const { return bytes_.data() + data_start_ + ti.begin; }

  void convert_float(const TensorInfo& ti, float* out) const {
    const std::uint8_t* p = src(ti);
    const auto n = static_cast<std::size_t>(ti.numel());
    switch (ti.dtype) {
      case DType::F32:
        if constexpr (std::endian::native == std::endian::little) {
          if (n) std::memcpy(out, p, n * 4);
        } else {
          for (std::size_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(detail::load_le<std::uint32_t>(p + 4 * i));
        }
        return;
      case DType::F16:
        for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(detail::load_le<std::uint16_t>(p + 2 * i));
        return;
      case DType::BF16:
        for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(detail::load_le<std::uint16_t>(p + 2 * i));
        return;
      case DType::F64:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = double_to_float(std::bit_cast<double>(detail::load_le<std::uint64_t>(p + 8 * i)));
        return;
      default:
        fail(context(), "tensor ", detail::printable(ti.name), " has dtype ", dtype_name(ti.dtype),
             ", not a floating type (F32, F16, BF16 or F64); read it with read_i32");
    }
  }

  template <class S>
  void convert_int_as(const TensorInfo& ti, std::int32_t* out) const {
    using U = std::make_unsigned_t<S>;
    const std::uint8_t* p = src(ti);
    const auto n = static_cast<std::size_t>(ti.numel());
    for (std::size_t i = 0; i < n; ++i) {
      const S v = static_cast<S>(detail::load_le<U>(p + sizeof(S) * i));
      if (std::cmp_less(v, std::numeric_limits<std::int32_t>::min()) ||
          std::cmp_greater(v, std::numeric_limits<std::int32_t>::max()))
        fail(context(), "tensor ", detail::printable(ti.name), " (", dtype_name(ti.dtype), "): value ", std::to_string(v),
             " at index ", i, " is out of range for int32");
      out[i] = static_cast<std::int32_t>(v);
    }
  }

  void convert_int(const TensorInfo& ti, std::int32_t* out) const {
    switch (ti.dtype) {
      case DType::I32:
        if constexpr (std::endian::native == std::endian::little) {
          if (ti.numel()) std::memcpy(out, src(ti), ti.nbytes());
        } else {
          convert_int_as<std::int32_t>(ti, out);
        }
        return;
      case DType::I64: return convert_int_as<std::int64_t>(ti, out);
      case DType::I16: return convert_int_as<std::int16_t>(ti, out);
      case DType::I8: return convert_int_as<std::int8_t>(ti, out);
      case DType::U64: return convert_int_as<std::uint64_t>(ti, out);
      case DType::U32: return convert_int_as<std::uint32_t>(ti, out);
      case DType::U16: return convert_int_as<std::uint16_t>(ti, out);
      case DType::U8: return convert_int_as<std::uint8_t>(ti, out);
      case DType::BOOL: {
        const std::uint8_t* p = src(ti);
        const auto n = static_cast<std::size_t>(ti.numel());
        for (std::size_t i = 0; i < n; ++i) {
          if (p[i] > 1)
            fail(context(), "tensor ", detail::printable(ti.name), " (BOOL): byte ", static_cast<int>(p[i]),
                 " at index ", i, " is neither 0 nor 1");
          out[i] = p[i];
        }
        return;
      }
      default:
        fail(context(), "tensor ", detail::printable(ti.name), " has dtype ", dtype_name(ti.dtype),
             ", not an integer type; read it with read_f32");
    }
  }

  void parse() {
    const std::size_t size = bytes_.size();
    const std::uint8_t* data = bytes_.data();
    if (size < 8)
      fail(context(), "the file is ", size, " bytes, shorter than the 8-byte header length: not a safetensors file");
    const std::uint64_t n = detail::load_le<std::uint64_t>(data);
    if (n > size - 8)
      fail(context(), "the header length ", n, " runs past the end of the file (only ", size - 8,
           " bytes follow the length field): truncated or not a safetensors file");
    if (n > kMaxHeaderBytes)
      fail(context(), "the header length ", n, " exceeds the limit of ", kMaxHeaderBytes, " bytes");
    const std::uint8_t* hb = data + 8;
    const std::uint8_t* he = hb + n;
    // The header is a JSON object from its first byte, as the reference implementation requires: no byte-order mark,
    // no leading space (only trailing spaces pad it).
    if (n == 0) fail(context(), "the header is empty (length 0): not valid JSON");
    if (hb[0] != '{') {
      const bool bom = n >= 3 && hb[0] == 0xEF && hb[1] == 0xBB && hb[2] == 0xBF;
      fail(context(), "the header is not a JSON object from its first byte (it starts with '",
           detail::escape_bytes(std::string(1, static_cast<char>(hb[0])), 1, false), "'",
           bom ? ", a UTF-8 byte-order mark" : "", "; only trailing spaces may pad it)");
    }

    // The JSON reader stops at a NUL byte as at the end of its input, which would leave whatever follows
    // unread: a NUL is not JSON (the format pads its header with spaces), so it is refused here.
    if (const void* z = std::memchr(hb, 0, static_cast<std::size_t>(n)))
      fail(context(), "the header holds a NUL byte at offset ", 8 + (static_cast<const std::uint8_t*>(z) - hb),
           ": it is not valid JSON");
    detail::HeaderSax sax;
    const bool ok = nlohmann::json::sax_parse(hb, he, &sax, nlohmann::json::input_format_t::json, /*strict=*/true);
    if (!ok || !sax.error.empty())
      fail(context(), sax.error.empty() ? std::string("the header is not valid JSON") : sax.error);

    data_start_ = static_cast<std::size_t>(8 + n);
    const std::size_t data_size = size - data_start_;
    metadata_ = std::move(sax.metadata);

    struct Range {
      std::size_t begin, end;
      const std::string* name;
    };
    std::vector<Range> ranges;
    ranges.reserve(sax.entries.size());
    for (auto& [name, raw] : sax.entries) {
      const std::string q = detail::printable(name);
      const char* missing = !raw.has_dtype ? "dtype" : !raw.has_shape ? "shape" : !raw.has_offsets ? "data_offsets"
                                                                                                   : nullptr;
      if (missing) fail(context(), "tensor ", q, " is missing \"", missing, "\"");
      const auto dt = dtype_from_name(raw.dtype);
      if (!dt)
        fail(context(), "tensor ", q, " has an unknown dtype ", detail::printable(raw.dtype),
             " (supported: F32, F16, BF16, F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL)");
      if (raw.offsets.size() != 2)
        fail(context(), "tensor ", q, ": \"data_offsets\" must hold 2 integers [begin, end], it holds ",
             raw.offsets.size());
      const std::uint64_t b = raw.offsets[0], e = raw.offsets[1];
      if (b > e) fail(context(), "tensor ", q, ": data_offsets begin ", b, " > end ", e);
      if (e > data_size)
        fail(context(), "tensor ", q, ": data_offsets [", b, ", ", e, "] out of range: the data section holds ",
             data_size, " bytes");
      // Overflow-safe byte count: the product of the non-zero dims times the element size must fit in int64 (this
      // also keeps Shape::numel and TensorInfo::numel free of overflow).
      const std::uint64_t item = dtype_size(*dt);
      std::uint64_t prod = item;
      bool zero = false;
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      for (std::int64_t d : raw.shape) {
        if (d == 0) {
          zero = true;
          continue;
        }
        const auto ud = static_cast<std::uint64_t>(d);
        if (prod > kMax / ud)
          fail(context(), "tensor ", q, ": shape ", shape_str(raw.shape), " of ", dtype_name(*dt),
               " overflows the byte count");
        prod *= ud;
      }
      const std::uint64_t want = zero ? 0 : prod;
      if (e - b != want)
        fail(context(), "tensor ", q, ": data_offsets [", b, ", ", e, "] cover ", e - b, " bytes, but dtype ",
             dtype_name(*dt), " x shape ", shape_str(raw.shape), " needs ", want, " bytes");
      TensorInfo ti;
      ti.name = name;
      ti.dtype = *dt;
      ti.shape = std::move(raw.shape);
      ti.begin = static_cast<std::size_t>(b);
      ti.end = static_cast<std::size_t>(e);
      auto it = tensors_.emplace(name, std::move(ti)).first;
      if (e > b) ranges.push_back({it->second.begin, it->second.end, &it->first});
    }
    std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) {
      return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
    });
    for (std::size_t i = 1; i < ranges.size(); ++i) {
      const Range& a = ranges[i - 1];
      const Range& c = ranges[i];
      if (c.begin < a.end)
        fail(context(), "tensors ", detail::printable(*a.name), " [", a.begin, ", ", a.end, ") and ",
             detail::printable(*c.name), " [", c.begin, ", ", c.end, ") overlap");
    }
    // The tensors cover the data section exactly, as the reference implementation requires (no bytes that no
    // tensor owns, so a file cannot carry hidden content): a hole between two tensors, before the first or after
    // the last is refused.
    std::size_t covered = 0;
    for (const Range& r : ranges) {
      if (r.begin != covered)
        fail(context(), "bytes [", covered, ", ", r.begin, ") of the data section belong to no tensor (a hole before ",
             detail::printable(*r.name), "): the tensors must cover the data section without gaps");
      covered = r.end;
    }
    if (covered != data_size)
      fail(context(), "the data section holds ", data_size, " bytes but the tensors cover only ", covered,
           ": bytes [", covered, ", ", data_size, ") belong to no tensor (trailing data after the last tensor)");
  }

  std::string label_;
  FileBytes bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// ---------------------------------------------------------------------------------------------------------------

class SafetensorsWriter {
 public:
  // A float tensor, stored as F32 (default), F16, BF16 (round to nearest even) or F64. The data are copied now.
  void add(const std::string& name, CView<float> t, DType as = DType::F32) {
    check_view(name, t.data(), t.numel());
    add(name, dims_of(t.shape()), std::span<const float>(t.data(), static_cast<std::size_t>(t.numel())), as);
  }
  // An int32 tensor, stored as I32 (default) or I64.
  void add(const std::string& name, CView<std::int32_t> t, DType as = DType::I32) {
    check_view(name, t.data(), t.numel());
    add(name, dims_of(t.shape()), std::span<const std::int32_t>(t.data(), static_cast<std::size_t>(t.numel())), as);
  }
  // Any rank (including 0 and > 4) from a flat row-major span.
  void add(const std::string& name, const std::vector<std::int64_t>& shape, std::span<const float> values,
           DType as = DType::F32) {
    check_new(name, shape, values.size());
    LIMOE_CHECK(as == DType::F32 || as == DType::F16 || as == DType::BF16 || as == DType::F64,
                "SafetensorsWriter: tensor ", detail::printable(name), ": a float tensor is written as F32, F16, BF16 or F64, not ",
                dtype_name(as));
    Entry e{as, shape, std::vector<std::uint8_t>(values.size() * dtype_size(as))};
    std::uint8_t* p = e.bytes.data();
    for (std::size_t i = 0; i < values.size(); ++i) {
      switch (as) {
        case DType::F32: detail::store_le(p + 4 * i, std::bit_cast<std::uint32_t>(values[i])); break;
        case DType::F16: detail::store_le(p + 2 * i, float_to_half(values[i])); break;
        case DType::BF16: detail::store_le(p + 2 * i, float_to_bf16(values[i])); break;
        default: detail::store_le(p + 8 * i, std::bit_cast<std::uint64_t>(static_cast<double>(values[i]))); break;
      }
    }
    tensors_.emplace(name, std::move(e));
  }
  void add(const std::string& name, const std::vector<std::int64_t>& shape, std::span<const std::int32_t> values,
           DType as = DType::I32) {
    check_new(name, shape, values.size());
    LIMOE_CHECK(as == DType::I32 || as == DType::I64, "SafetensorsWriter: tensor ", detail::printable(name),
                ": an int32 tensor is written as I32 or I64, not ", dtype_name(as));
    Entry e{as, shape, std::vector<std::uint8_t>(values.size() * dtype_size(as))};
    std::uint8_t* p = e.bytes.data();
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (as == DType::I32)
        detail::store_le(p + 4 * i, static_cast<std::uint32_t>(values[i]));
      else
        detail::store_le(p + 8 * i, static_cast<std::uint64_t>(static_cast<std::int64_t>(values[i])));
    }
    tensors_.emplace(name, std::move(e));
  }
  // A scalar (shape []), e.g. `logit_scale`.
  void add_scalar(const std::string& name, float value, DType as = DType::F32) {
    add(name, std::vector<std::int64_t>{}, std::span<const float>(&value, 1), as);
  }

  void set_metadata(const std::string& key, const std::string& value) {
    check_utf8(key, "metadata key");
    check_utf8(value, "metadata value");
    metadata_[key] = value;
  }

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  std::size_t size() const { return tensors_.size(); }

  // The header JSON (unpadded) and the total file size, then the whole file.
  void write(std::ostream& os) const {
    const std::string header = padded_header();
    std::uint8_t len[8];
    detail::store_le(len, static_cast<std::uint64_t>(header.size()));
    os.write(reinterpret_cast<const char*>(len), 8);
    os.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& kv : tensors_)
      os.write(reinterpret_cast<const char*>(kv.second.bytes.data()),
               static_cast<std::streamsize>(kv.second.bytes.size()));
  }
  std::vector<std::uint8_t> to_bytes() const {
    const std::string header = padded_header();
    std::vector<std::uint8_t> out(8 + header.size());
    detail::store_le(out.data(), static_cast<std::uint64_t>(header.size()));
    std::memcpy(out.data() + 8, header.data(), header.size());
    for (const auto& kv : tensors_) out.insert(out.end(), kv.second.bytes.begin(), kv.second.bytes.end());
    return out;
  }
  // Atomic: a temporary file next to `path`, renamed over it when complete (limoe/io/file.hpp).
  void write(const std::string& path) const {
    write_file_atomic(path, [&](std::ostream& os) { write(os); });
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  static std::vector<std::int64_t> dims_of(const Shape& s) { return {s.begin(), s.end()}; }

  static void check_view(const std::string& name, const void* data, index_t numel) {
    LIMOE_CHECK(data != nullptr || numel == 0, "SafetensorsWriter: tensor ", detail::printable(name),
                ": the view is empty (no data)");
  }

  static void check_utf8(const std::string& s, const char* what) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      fail("SafetensorsWriter: ", what, " ", detail::printable(s), " is not valid UTF-8");
    }
  }

  void check_new(const std::string& name, const std::vector<std::int64_t>& shape, std::size_t count) const {
    LIMOE_CHECK(name != "__metadata__", "SafetensorsWriter: '__metadata__' is reserved, not a tensor name");
    LIMOE_CHECK(!has(name), "SafetensorsWriter: tensor ", detail::printable(name), " was already added");
    check_utf8(name, "tensor name");
    std::uint64_t n = 1;
    bool overflow = false;
    for (auto d : shape) {
      LIMOE_CHECK(d >= 0, "SafetensorsWriter: tensor ", detail::printable(name), ": negative dimension in shape ",
                  shape_str(shape));
      const auto ud = static_cast<std::uint64_t>(d);
      if (ud != 0 && n > std::numeric_limits<std::uint64_t>::max() / ud) overflow = true;
      n *= ud;
    }
    if (std::find(shape.begin(), shape.end(), 0) != shape.end()) overflow = false, n = 0;
    LIMOE_CHECK(!overflow && n == count, "SafetensorsWriter: tensor ", detail::printable(name), ": shape ", shape_str(shape),
                " does not match the ", count, " values given");
  }

  std::string padded_header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& kv : metadata_) m[kv.first] = kv.second;
      h["__metadata__"] = std::move(m);
    }
    std::uint64_t offset = 0;
    for (const auto& [name, e] : tensors_) {
      nlohmann::ordered_json t = nlohmann::ordered_json::object();
      t["dtype"] = dtype_name(e.dtype);
      t["shape"] = e.shape;
      t["data_offsets"] = {offset, offset + e.bytes.size()};
      offset += e.bytes.size();
      h[name] = std::move(t);
    }
    std::string s = h.dump();
    s.append((8 - s.size() % 8) % 8, ' ');  // 8 + N is a multiple of 8: the data section starts aligned
    return s;
  }

  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace limoe::io
