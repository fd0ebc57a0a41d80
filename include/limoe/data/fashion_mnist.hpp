// limoe/data/fashion_mnist.hpp: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) as an image-text data set.
//
// Debian's `dataset-fashion-mnist` installs the four gzipped IDX files under /usr/share/datasets/fashion-mnist/;
// any directory holding them (gzipped or not) works. Images are 28x28x1 bytes, scaled to [-1, 1]; captions come
// from fashion_mnist_captions() (limoe/data/captions.hpp).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/data/captions.hpp"
#include "limoe/data/dataset.hpp"
#include "limoe/data/idx.hpp"

namespace limoe::data {

inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

namespace detail {
// "<dir>/<stem>.gz" when present, else "<dir>/<stem>"; empty when neither exists.
inline std::string find_idx_file(const std::string& dir, const std::string& stem) {
  namespace fs = std::filesystem;
  for (const std::string& name : {stem + ".gz", stem}) {
    const fs::path p = fs::path(dir) / name;
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) return p.string();
  }
  return {};
}
inline const char* fashion_stem(Split s, bool images) {
  if (s == Split::train) return images ? "train-images-idx3-ubyte" : "train-labels-idx1-ubyte";
  return images ? "t10k-images-idx3-ubyte" : "t10k-labels-idx1-ubyte";
}
}  // namespace detail

// True when `dir` holds all four Fashion-MNIST files (gzipped or plain).
inline bool fashion_mnist_available(const std::string& dir = kFashionMnistDir) {
  for (Split s : {Split::train, Split::test})
    for (bool images : {true, false})
      if (detail::find_idx_file(dir, detail::fashion_stem(s, images)).empty()) return false;
  return true;
}

class FashionMnist {
 public:
  // Loads one split from `dir` (default: Debian's install location). Throws limoe::Error naming the missing or
  // malformed file.
  explicit FashionMnist(Split split = Split::train, const std::string& dir = kFashionMnistDir) : split_(split) {
    const std::string img_path = detail::find_idx_file(dir, detail::fashion_stem(split, true));
    const std::string lbl_path = detail::find_idx_file(dir, detail::fashion_stem(split, false));
    LIMOE_CHECK(!img_path.empty() && !lbl_path.empty(), "Fashion-MNIST: \"", dir, "\" lacks ",
                detail::fashion_stem(split, img_path.empty()),
                "(.gz); install Debian's dataset-fashion-mnist or pass the folder that holds the IDX files");
    IdxArray img = read_idx(img_path);
    IdxArray lbl = read_idx(lbl_path);
    LIMOE_CHECK(img.dims.size() == 3, "Fashion-MNIST: \"", img_path, "\" has rank ", img.dims.size(),
                ", expected 3 (count, rows, cols)");
    LIMOE_CHECK(lbl.dims.size() == 1, "Fashion-MNIST: \"", lbl_path, "\" has rank ", lbl.dims.size(),
                ", expected 1");
    LIMOE_CHECK(img.dims[0] == lbl.dims[0], "Fashion-MNIST: \"", img_path, "\" holds ", img.dims[0],
                " images but \"", lbl_path, "\" holds ", lbl.dims[0], " labels");
    for (std::size_t i = 0; i < lbl.data.size(); ++i)
      LIMOE_CHECK(lbl.data[i] < 10, "Fashion-MNIST: \"", lbl_path, "\": label ", int(lbl.data[i]), " at index ",
                  i, " out of range 0..9");
    shape_ = {static_cast<index_t>(img.dims[1]), static_cast<index_t>(img.dims[2]), 1};
    pixels_ = std::move(img.data);
    labels_ = std::move(lbl.data);
  }

  index_t size() const { return static_cast<index_t>(labels_.size()); }
  ImageShape image_shape() const { return shape_; }
  Split split() const { return split_; }
  bool has_labels() const { return true; }
  std::string name() const { return split_ == Split::train ? "fashion-mnist/train" : "fashion-mnist/test"; }
  const CaptionSet& captions() const { return fashion_mnist_captions(); }
  std::vector<std::string> class_names() const { return captions().class_names; }
  std::vector<std::string> class_prompts(int c) const { return captions().class_prompts(c); }
  std::vector<std::string> corpus() const { return captions().corpus(); }

  int label(index_t i) const {
    check(i);
    return labels_[static_cast<std::size_t>(i)];
  }
  // The raw bytes of image i, [H * W].
  const std::uint8_t* raw_image(index_t i) const {
    check(i);
    return pixels_.data() + i * shape_.numel();
  }

  Example get(index_t i, const Rng& rng, Templates which = Templates::train) const {
    Example e;
    const std::uint8_t* p = raw_image(i);
    e.image.resize(static_cast<std::size_t>(shape_.numel()));
    for (index_t k = 0; k < shape_.numel(); ++k) e.image[static_cast<std::size_t>(k)] = detail::pixel_to_unit(p[k]);
    e.label = label(i);
    e.caption = captions().caption(e.label, rng, static_cast<std::uint64_t>(i), which);
    return e;
  }

 private:
  void check(index_t i) const {
    LIMOE_CHECK(i >= 0 && i < size(), "Fashion-MNIST: index ", i, " out of range 0..", size() - 1);
  }
  Split split_;
  ImageShape shape_;
  std::vector<std::uint8_t> pixels_;  // [n, H, W]
  std::vector<std::uint8_t> labels_;  // [n]
};

static_assert(Dataset<FashionMnist>);

}  // namespace limoe::data
