// limoe/data/tsv.hpp: a user's own image-text pairs listed in a TSV file.
//
// One pair per line: `image_path<TAB>caption`. Relative paths are resolved against the TSV file's folder. Empty
// (or all-blank) lines and lines whose first non-blank character is '#' are skipped; a trailing '\r' is dropped.
// Anything else that is not exactly two non-empty tab-separated fields is an error naming `file:line`; so is an
// image that cannot be read or decoded (never silently skipped). Images (PGM/PPM always, PNG/JPEG with
// stb_image, see limoe/data/image.hpp) are resized and centre-cropped to the model's input (fit_image).
// The pairs carry no class labels (label -1).
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <tbb/parallel_for.h>

#include "limoe/core/error.hpp"
#include "limoe/data/dataset.hpp"
#include "limoe/data/image.hpp"
#include "limoe/data/tokenizer.hpp"
#include "limoe/io/file.hpp"

namespace limoe::data {

struct TsvOptions {
  ImageShape image{28, 28, 1};  // the model's input; every image is fitted to it
  bool preload = true;  // decode every image in the constructor (in parallel): errors surface at once, and
                        // training never decodes twice. false: decode in get() (on the loader's workers).
};

class TsvPairs {
 public:
  struct Row {
    std::string image_path;  // resolved
    std::string caption;
    index_t line = 0;        // 1-based line number in the TSV
  };

  explicit TsvPairs(const std::string& tsv_path, const TsvOptions& opt = {}) : path_(tsv_path), opt_(opt) {
    LIMOE_CHECK(opt.image.height > 0 && opt.image.width > 0 && (opt.image.channels == 1 || opt.image.channels == 3),
                "TsvPairs: bad image shape ", opt.image.str(), " (channels must be 1 or 3)");
    // Read whole through io::read_file: a folder, a device or a pipe without a writer is an error naming it.
    std::istringstream f([&] {  // the bytes moved into the stream (one copy alive once it is made)
      const std::vector<std::uint8_t> bytes = io::read_file(tsv_path);
      return std::string(bytes.begin(), bytes.end());
    }());
    const std::filesystem::path base = std::filesystem::path(tsv_path).parent_path();
    std::string line;
    index_t n = 0;
    while (std::getline(f, line)) {
      ++n;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      const auto first = line.find_first_not_of(" \t");
      if (first == std::string::npos || line[first] == '#') continue;
      const auto tab = line.find('\t');
      LIMOE_CHECK(tab != std::string::npos, tsv_path, ":", n,
                  ": expected `image_path<TAB>caption`, found no tab in \"", line, "\"");
      LIMOE_CHECK(line.find('\t', tab + 1) == std::string::npos, tsv_path, ":", n,
                  ": expected 2 tab-separated fields (image_path, caption), found more");
      Row r;
      r.image_path = trim(line.substr(0, tab));
      r.caption = trim(line.substr(tab + 1));
      r.line = n;
      LIMOE_CHECK(!r.image_path.empty(), tsv_path, ":", n, ": empty image path");
      LIMOE_CHECK(!r.caption.empty(), tsv_path, ":", n, ": empty caption");
      LIMOE_CHECK(valid_utf8(r.caption), tsv_path, ":", n, ": the caption is not valid UTF-8 (save the file as UTF-8)");
      std::filesystem::path p(r.image_path);
      if (p.is_relative()) r.image_path = (base / p).string();
      rows_.push_back(std::move(r));
    }
    LIMOE_CHECK(!f.bad(), "cannot read TSV file \"", tsv_path, "\"");
    LIMOE_CHECK(!rows_.empty(), "TSV file \"", tsv_path, "\" lists no image-text pairs");
    if (opt.preload) preload();
  }

  index_t size() const { return static_cast<index_t>(rows_.size()); }
  ImageShape image_shape() const { return opt_.image; }
  bool has_labels() const { return false; }
  std::string name() const { return "tsv:" + path_; }
  const std::vector<Row>& rows() const { return rows_; }
  std::vector<std::string> class_names() const { return {}; }
  std::vector<std::string> class_prompts(int) const {
    fail("TsvPairs (\"", path_, "\"): the pairs have no class labels, so there are no class prompts");
  }
  std::vector<std::string> corpus() const {
    std::vector<std::string> out;
    for (const auto& r : rows_) out.push_back(r.caption);
    return out;
  }

  // The caption is the row's own; rng and the template choice do not apply.
  Example get(index_t i, const Rng& /*rng*/, Templates /*which*/ = Templates::train) const {
    LIMOE_CHECK(i >= 0 && i < size(), "TsvPairs: index ", i, " out of range 0..", size() - 1);
    const Row& r = rows_[static_cast<std::size_t>(i)];
    Example e;
    e.image = images_.empty() ? decode(r) : images_[static_cast<std::size_t>(i)];
    e.caption = r.caption;
    e.label = -1;
    return e;
  }

 private:
  static std::string trim(const std::string& s) {
    const auto b = s.find_first_not_of(" \t");
    if (b == std::string::npos) return {};
    return s.substr(b, s.find_last_not_of(" \t") - b + 1);
  }

  std::vector<float> decode(const Row& r) const {
    try {
      return fit_image(load_image(r.image_path), opt_.image);
    } catch (const Error& e) {
      fail(path_, ":", r.line, ": ", e.what());
    }
  }

  void preload() {
    images_.resize(rows_.size());
    std::vector<std::string> errors(rows_.size());
    tbb::parallel_for(std::size_t{0}, rows_.size(), [&](std::size_t i) {
      try {
        images_[i] = decode(rows_[i]);
      } catch (const Error& e) {
        errors[i] = e.what();
      }
    });
    // Report the first bad line (in file order) and how many more there are.
    std::size_t bad = 0, first = rows_.size();
    for (std::size_t i = 0; i < rows_.size(); ++i)
      if (!errors[i].empty()) {
        ++bad;
        if (first == rows_.size()) first = i;
      }
    if (bad) fail(errors[first], bad > 1 ? " (and " + std::to_string(bad - 1) + " more unreadable images)" : "");
  }

  std::string path_;
  TsvOptions opt_;
  std::vector<Row> rows_;
  std::vector<std::vector<float>> images_;  // [n][H * W * C] when preloaded
};

static_assert(Dataset<TsvPairs>);

}  // namespace limoe::data
