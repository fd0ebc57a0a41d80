// Loader: deterministic batches for any number of worker threads, shuffling, epochs, errors, AnyDataset.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <set>

#include "limoe/data/dataset.hpp"
#include "limoe/data/loader.hpp"
#include "limoe/data/synthetic.hpp"
#include "limoe/data/tokenizer.hpp"

using namespace limoe::data;
using limoe::index_t;

namespace {
SyntheticShapes small_set(index_t n = 100) {
  SyntheticOptions o;
  o.size = n;
  o.seed = 2;
  return SyntheticShapes(o);
}
std::vector<ImageTextBatch> drain(const SyntheticShapes& d, const WordTokenizer& tok, LoaderOptions o, int count) {
  Loader<SyntheticShapes, WordTokenizer> loader(d, tok, o);
  std::vector<ImageTextBatch> out;
  for (int k = 0; k < count; ++k) {
    auto b = loader.next();
    if (!b) break;
    out.push_back(std::move(*b));
  }
  return out;
}
bool same(const ImageTextBatch& a, const ImageTextBatch& b) {
  return a.images.shape() == b.images.shape() && std::equal(a.images.data(), a.images.data() + a.images.numel(), b.images.data()) &&
         std::equal(a.texts.data(), a.texts.data() + a.texts.numel(), b.texts.data()) && a.labels == b.labels &&
         a.captions == b.captions && a.indices == b.indices && a.epoch == b.epoch && a.batch == b.batch;
}
}  // namespace

TEST_CASE("same batches with 0, 1, 2 and 3 workers") {
  const auto d = small_set();
  const auto tok = WordTokenizer::build(d.corpus(), 16);
  LoaderOptions o;
  o.batch_size = 16;
  o.seed = 7;
  o.workers = 1;
  const auto ref = drain(d, tok, o, 14);  // 6 batches an epoch: crosses two epoch boundaries
  REQUIRE(ref.size() == 14);
  for (int w : {0, 2, 3}) {
    o.workers = w;
    o.prefetch = w == 3 ? 1 : 2;
    const auto got = drain(d, tok, o, 14);
    REQUIRE(got.size() == 14);
    for (std::size_t k = 0; k < got.size(); ++k) CHECK(same(ref[k], got[k]));
  }
  CHECK(ref[0].images.shape() == limoe::Shape{16, 28, 28, 1});
  CHECK(ref[0].texts.shape() == limoe::Shape{16, 16});
  CHECK(ref[6].epoch == 1);
  CHECK(ref[6].batch == 0);
}

TEST_CASE("an epoch visits each example at most once; epochs shuffle differently; captions change") {
  const auto d = small_set();
  const auto tok = WordTokenizer::build(d.corpus(), 16);
  LoaderOptions o;
  o.batch_size = 16;
  o.repeat = false;
  Loader<SyntheticShapes, WordTokenizer> loader(d, tok, o);
  CHECK(loader.batches_per_epoch() == 6);  // drop_last: 100 / 16
  std::set<index_t> seen;
  int batches = 0;
  while (auto b = loader.next()) {
    ++batches;
    for (index_t i : b->indices) CHECK(seen.insert(i).second);
    for (index_t k = 0; k < b->size(); ++k) {
      // Texts are the tokenized captions; labels are the data set's.
      const std::vector<std::int32_t> row(b->texts.data() + k * 16, b->texts.data() + (k + 1) * 16);
      CHECK(row == tok.encode(b->captions[k]));
      CHECK(b->labels[k] == d.attributes(b->indices[k]).shape);
    }
  }
  CHECK(batches == 6);
  CHECK(seen.size() == 96);
  CHECK(loader.permutation(0) != loader.permutation(1));
  const auto p = loader.permutation(3);
  CHECK(std::set<index_t>(p.begin(), p.end()).size() == 100);
  // The same picture gets another caption in another epoch (most of the time).
  std::map<index_t, std::string> cap0;
  for (index_t b = 0; b < 6; ++b) {
    const auto x = loader.batch(0, b);
    for (index_t k = 0; k < x.size(); ++k) cap0[x.indices[k]] = x.captions[k];
  }
  int changed = 0, common = 0;
  for (index_t b = 0; b < 6; ++b) {
    const auto x = loader.batch(1, b);
    for (index_t k = 0; k < x.size(); ++k)
      if (cap0.count(x.indices[k])) ++common, changed += cap0[x.indices[k]] != x.captions[k];
  }
  CHECK(common > 80);
  CHECK(changed > common / 2);
  // seek restarts anywhere; batch(e, b) equals what the stream yields.
  loader.seek(1, 2);
  auto b = loader.next();
  REQUIRE(b);
  CHECK(same(*b, loader.batch(1, 2)));
}

TEST_CASE("evaluation options: in order, all examples, last partial batch kept") {
  const auto d = small_set(50);
  const auto tok = WordTokenizer::build(d.corpus(), 16);
  Loader<SyntheticShapes, WordTokenizer> loader(d, tok, LoaderOptions::evaluation(16, 2));
  std::vector<index_t> order;
  std::vector<index_t> sizes;
  while (auto b = loader.next()) {
    sizes.push_back(b->size());
    order.insert(order.end(), b->indices.begin(), b->indices.end());
  }
  CHECK(sizes == std::vector<index_t>{16, 16, 16, 2});
  for (index_t i = 0; i < 50; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
  CHECK(!loader.next());
  const auto prompts = encode_texts(tok, d.class_prompts(0));
  CHECK(prompts.shape() == limoe::Shape{static_cast<index_t>(d.class_prompts(0).size()), 16});
}

namespace {
// A data set whose example 5 cannot be made.
struct Broken {
  SyntheticShapes inner = small_set(20);
  index_t size() const { return inner.size(); }
  ImageShape image_shape() const { return inner.image_shape(); }
  Example get(index_t i, const limoe::Rng& r, Templates t = Templates::train) const {
    LIMOE_CHECK(i != 5, "example 5 is broken");
    return inner.get(i, r, t);
  }
  bool has_labels() const { return true; }
  std::vector<std::string> class_names() const { return inner.class_names(); }
  std::vector<std::string> class_prompts(int c) const { return inner.class_prompts(c); }
  std::vector<std::string> corpus() const { return inner.corpus(); }
  std::string name() const { return "broken"; }
};
}  // namespace

TEST_CASE("an error while making a batch reaches next(); AnyDataset; too small a data set") {
  const Broken br;
  const auto tok = WordTokenizer::build(br.corpus(), 16);
  for (int w : {0, 2}) {
    LoaderOptions o = LoaderOptions::evaluation(4, w);
    Loader<Broken, WordTokenizer> loader(br, tok, o);
    CHECK(loader.next());  // batch 0: examples 0..3
    CHECK_THROWS_WITH_AS(loader.next(), doctest::Contains("example 5 is broken"), limoe::Error);
  }
  const AnyDataset any(small_set(40));
  CHECK(any.size() == 40);
  CHECK(any.name() == "synthetic-shapes/train");
  LoaderOptions o;
  o.batch_size = 8;
  Loader<AnyDataset, WordTokenizer> loader(any, tok, o);
  const auto b = loader.next();
  REQUIRE(b);
  CHECK(b->size() == 8);
  o.batch_size = 64;
  CHECK_THROWS_AS((Loader<AnyDataset, WordTokenizer>(any, tok, o)), limoe::Error);
}

TEST_CASE("shards: rank r of N gets part r of every batch (pairs, captions, order), for N = 1, 2, 4") {
  const SyntheticShapes d = small_set(100);
  const WordTokenizer tok = WordTokenizer::build(d.corpus(), 12);
  LoaderOptions o;
  o.batch_size = 8;
  o.seed = 5;
  const auto whole = drain(d, tok, o, 30);  // 30 batches: into the fourth epoch (12 per epoch)
  REQUIRE(whole.size() == 30);
  for (int N : {1, 2, 4}) {
    const index_t n = 8 / N, T = 12, P = whole[0].images.numel() / 8;
    for (int r = 0; r < N; ++r) {
      LoaderOptions s = o;
      s.shard = r, s.shards = N;
      s.workers = r % 2;  // the split does not depend on the threads making it
      const auto part = drain(d, tok, s, 30);
      REQUIRE(part.size() == 30);
      bool ok = true;
      for (std::size_t b = 0; b < 30; ++b) {
        const auto& w = whole[b];
        const auto& p = part[b];
        ok &= p.images.dim(0) == n && p.epoch == w.epoch && p.batch == w.batch;
        ok &= std::equal(p.images.data(), p.images.data() + n * P, w.images.data() + r * n * P);
        ok &= std::equal(p.texts.data(), p.texts.data() + n * T, w.texts.data() + r * n * T);
        for (index_t k = 0; k < n; ++k)
          ok &= p.captions[k] == w.captions[r * n + k] && p.indices[k] == w.indices[r * n + k];
      }
      CHECK_MESSAGE(ok, "shard ", r, " of ", N);
    }
  }
  LoaderOptions bad = o;
  bad.shards = 3;  // 8 pairs do not split into 3
  CHECK_THROWS_WITH_AS((Loader<SyntheticShapes, WordTokenizer>(d, tok, bad)), doctest::Contains("equal shards"), limoe::Error);
  bad.shards = 2, bad.shard = 2;
  CHECK_THROWS_WITH_AS((Loader<SyntheticShapes, WordTokenizer>(d, tok, bad)), doctest::Contains("does not exist"), limoe::Error);
}
