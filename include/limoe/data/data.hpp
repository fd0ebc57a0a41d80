// limoe/data/data.hpp: the data umbrella header, and choosing a data set at run time.
//
// Sources: Fashion-MNIST (the default when installed), the synthetic shapes (no file; the fallback), and a
// user's TSV of image-text pairs. open_dataset() returns any of them as an AnyDataset.
#pragma once

#include <string>

#include "limoe/core/error.hpp"
#include "limoe/data/captions.hpp"
#include "limoe/data/dataset.hpp"
#include "limoe/data/fashion_mnist.hpp"
#include "limoe/data/fashion_scenes.hpp"
#include "limoe/data/idx.hpp"
#include "limoe/data/image.hpp"
#include "limoe/data/loader.hpp"
#include "limoe/data/synthetic.hpp"
#include "limoe/data/tokenizer.hpp"
#include "limoe/data/tsv.hpp"

namespace limoe::data {

struct DataSource {
  // "auto": Fashion-MNIST when installed at `path` (default: Debian's folder), else the synthetic shapes.
  // "fashion-mnist", "synthetic", "tsv".
  std::string kind = "auto";
  std::string path;       // fashion-mnist: the IDX folder (empty: kFashionMnistDir); tsv: the training TSV
  std::string test_path;  // tsv: the TSV of the test split (required to open Split::test)
  ImageShape image{28, 28, 1};  // synthetic: the image size; tsv: the model input every image is fitted to
  SyntheticOptions synthetic;   // synthetic: everything but the image size (taken from `image`)
  bool tsv_preload = true;
};

// The kind "auto" resolves to on this machine.
inline std::string resolve_kind(const DataSource& src) {
  if (src.kind != "auto") return src.kind;
  return fashion_mnist_available(src.path.empty() ? kFashionMnistDir : src.path) ? "fashion-mnist" : "synthetic";
}

inline AnyDataset open_dataset(const DataSource& src, Split split) {
  const std::string kind = resolve_kind(src);
  if (kind == "fashion-mnist") return AnyDataset(FashionMnist(split, src.path.empty() ? kFashionMnistDir : src.path));
  if (kind == "fashion-scenes") return AnyDataset(FashionScenes(split, src.path.empty() ? kFashionMnistDir : src.path));
  if (kind == "synthetic") {
    SyntheticOptions o = src.synthetic;
    o.image = src.image;
    return AnyDataset(SyntheticShapes(o, split));
  }
  if (kind == "tsv") {
    const std::string& p = split == Split::train ? src.path : src.test_path;
    LIMOE_CHECK(!p.empty(), "open_dataset: the tsv source needs ", split == Split::train ? "path" : "test_path",
                " for the ", split == Split::train ? "train" : "test", " split");
    return AnyDataset(TsvPairs(p, TsvOptions{src.image, src.tsv_preload}));
  }
  fail("open_dataset: unknown data kind \"", src.kind, "\" (auto, fashion-mnist, fashion-scenes, synthetic or tsv)");
}

}  // namespace limoe::data
