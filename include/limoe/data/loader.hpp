// limoe/data/loader.hpp: shuffling, batching, tokenizing and image preparation on worker threads.
//
// Batch b of epoch e is a pure function of (seed, e, b): the epoch's permutation comes from counter stream e of
// a shuffle generator, captions from a caption generator derived per epoch (so a picture gets a new caption
// every epoch, reproducibly). Worker threads only decide WHEN a batch is made, never what is in it, so the
// stream of batches is identical for any number of workers (0 = made in next() on the calling thread).
// Workers run up to `prefetch` batches ahead of the consumer, so training does not wait on data.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/data/dataset.hpp"
#include "limoe/data/tokenizer.hpp"

namespace limoe::data {

struct LoaderOptions {
  index_t batch_size = 64;
  std::uint64_t seed = 0;
  bool shuffle = true;
  bool drop_last = true;   // drop an epoch's final partial batch (training); false keeps it (evaluation)
  bool repeat = true;      // next() continues into the following epochs; false: stops at the epoch's end
  int workers = 1;         // background threads assembling batches; 0 = assemble in next() (no threads)
  int prefetch = 2;        // batches made ahead of the consumer (at least `workers`)
  Templates templates = Templates::train;  // which caption templates examples draw from
  // Data parallel: this loader yields part `shard` of `shards` equal parts of every batch (batch_size pairs in
  // all, a multiple of shards): the same pairs, captions and order on any number of ranks for one seed.
  int shard = 0, shards = 1;

  // In order, every example once, held-out caption templates: for evaluation passes.
  static LoaderOptions evaluation(index_t batch_size, int workers = 1) {
    LoaderOptions o;
    o.batch_size = batch_size;
    o.shuffle = false;
    o.drop_last = false;
    o.repeat = false;
    o.workers = workers;
    o.templates = Templates::eval;
    return o;
  }
};

// Tokenizes `texts` into [n, T] (for zero-shot prompts and retrieval queries).
template <Tokenizer Tok>
Tensor<std::int32_t> encode_texts(const Tok& tok, const std::vector<std::string>& texts) {
  const index_t T = tok.text_len();
  Tensor<std::int32_t> out(Shape{static_cast<index_t>(texts.size()), T});  // [n, T]
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const auto ids = tok.encode(texts[i]);
    LIMOE_CHECK(static_cast<index_t>(ids.size()) == T, "encode_texts: tokenizer returned ", ids.size(),
                " ids, text_len is ", T);
    std::copy(ids.begin(), ids.end(), out.data() + static_cast<index_t>(i) * T);
  }
  return out;
}

template <Dataset D, Tokenizer Tok>
class Loader {
 public:
  // `data` must outlive the loader (it is read, never copied); the tokenizer is copied.
  Loader(const D& data, Tok tok, LoaderOptions opt) : data_(data), tok_(std::move(tok)), opt_(opt) {
    LIMOE_CHECK(opt.batch_size >= 1, "Loader: batch_size must be >= 1, got ", opt.batch_size);
    LIMOE_CHECK(opt.workers >= 0, "Loader: workers must be >= 0, got ", opt.workers);
    LIMOE_CHECK(opt.prefetch >= 1, "Loader: prefetch must be >= 1, got ", opt.prefetch);
    LIMOE_CHECK(opt.shards >= 1 && opt.shard >= 0 && opt.shard < opt.shards, "Loader: shard ", opt.shard,
                " of ", opt.shards, " does not exist");
    LIMOE_CHECK(opt.shards == 1 || (opt.batch_size % opt.shards == 0 && opt.drop_last), "Loader: a batch of ",
                opt.batch_size, " cannot be split into ", opt.shards, " equal shards (needs a multiple of ",
                opt.shards, " and drop_last)");
    n_ = static_cast<index_t>(data_.size());
    nb_ = opt.drop_last ? n_ / opt.batch_size : (n_ + opt.batch_size - 1) / opt.batch_size;
    LIMOE_CHECK(nb_ > 0, "Loader: data set \"", data_.name(), "\" has ", n_, " examples, fewer than one batch of ",
                opt.batch_size, (opt.drop_last ? " (drop_last is on)" : ""));
    shape_ = data_.image_shape();
    seek(0, 0);
  }
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;
  ~Loader() { stop_workers(); }

  index_t batches_per_epoch() const { return nb_; }
  index_t dataset_size() const { return n_; }
  const LoaderOptions& options() const { return opt_; }
  const Tok& tokenizer() const { return tok_; }

  // The order in which epoch e visits the data set (identity without shuffle): Fisher-Yates on counter stream e.
  std::vector<index_t> permutation(index_t epoch) const {
    std::vector<index_t> p(static_cast<std::size_t>(n_));
    for (index_t i = 0; i < n_; ++i) p[static_cast<std::size_t>(i)] = i;
    if (!opt_.shuffle) return p;
    const Rng rng = Rng(opt_.seed).derive(kShuffleTag);
    for (index_t i = n_ - 1; i > 0; --i) {
      const auto j = detail::uniform_int(rng, static_cast<std::uint64_t>(epoch), static_cast<std::uint64_t>(i),
                                         static_cast<std::uint64_t>(i + 1));
      std::swap(p[static_cast<std::size_t>(i)], p[static_cast<std::size_t>(j)]);
    }
    return p;
  }

  // Batch b of epoch e, made now on the calling thread.
  ImageTextBatch batch(index_t epoch, index_t b) const {
    LIMOE_CHECK(epoch >= 0 && b >= 0 && b < nb_, "Loader::batch: (epoch ", epoch, ", batch ", b,
                ") out of range; an epoch has ", nb_, " batches");
    const auto perm = cached_permutation(epoch);
    const index_t part = opt_.batch_size / opt_.shards;
    const index_t begin = b * opt_.batch_size + (opt_.shards > 1 ? opt_.shard * part : 0);
    const index_t end = opt_.shards > 1 ? begin + part : std::min(begin + opt_.batch_size, n_);
    const index_t B = end - begin, T = tok_.text_len(), P = shape_.numel();
    const Rng caption_rng = Rng(opt_.seed).derive(kCaptionTag).derive(static_cast<std::uint64_t>(epoch));
    ImageTextBatch out;
    out.images.resize(Shape{B, shape_.height, shape_.width, shape_.channels});  // [B, H, W, C]
    out.texts.resize(Shape{B, T});                                               // [B, T]
    out.epoch = epoch;
    out.batch = b;
    for (index_t k = 0; k < B; ++k) {
      const index_t i = (*perm)[static_cast<std::size_t>(begin + k)];
      Example e = data_.get(i, caption_rng, opt_.templates);
      LIMOE_CHECK(static_cast<index_t>(e.image.size()) == P, "Loader: example ", i, " of \"", data_.name(),
                  "\" has ", e.image.size(), " pixels, the data set's shape ", shape_.str(), " needs ", P);
      std::copy(e.image.begin(), e.image.end(), out.images.data() + k * P);
      const auto ids = tok_.encode(e.caption);
      LIMOE_CHECK(static_cast<index_t>(ids.size()) == T, "Loader: tokenizer returned ", ids.size(),
                  " ids, text_len is ", T);
      std::copy(ids.begin(), ids.end(), out.texts.data() + k * T);
      out.labels.push_back(e.label);
      out.captions.push_back(std::move(e.caption));
      out.indices.push_back(i);
    }
    return out;
  }

  // Restarts the stream at batch b of epoch e (e.g. when resuming from a checkpoint).
  void seek(index_t epoch, index_t b = 0) {
    LIMOE_CHECK(epoch >= 0 && b >= 0 && b < nb_, "Loader::seek: (epoch ", epoch, ", batch ", b,
                ") out of range; an epoch has ", nb_, " batches");
    stop_workers();
    consumed_ = claimed_ = epoch * nb_ + b;
    end_ = opt_.repeat ? std::numeric_limits<index_t>::max() : (epoch + 1) * nb_;
    ready_.clear();
    stop_ = false;
  }

  // The next batch of the stream; nullopt at the end of the epoch when `repeat` is off. An exception thrown
  // while making a batch (an unreadable image) is rethrown here.
  std::optional<ImageTextBatch> next() {
    if (opt_.workers == 0) {
      if (consumed_ >= end_) return std::nullopt;
      const index_t g = consumed_++;
      return batch(g / nb_, g % nb_);
    }
    if (threads_.empty()) start_workers();
    std::unique_lock<std::mutex> lock(mu_);
    if (consumed_ >= end_) return std::nullopt;
    ready_cv_.wait(lock, [&] { return ready_.count(consumed_) > 0; });
    auto node = ready_.extract(consumed_);
    ++consumed_;
    lock.unlock();
    space_cv_.notify_all();
    if (node.mapped().error) std::rethrow_exception(node.mapped().error);
    return std::move(*node.mapped().batch);
  }

  // Epoch and batch of the batch next() returns next.
  index_t epoch() const { return consumed_ / nb_; }
  index_t position() const { return consumed_ % nb_; }

 private:
  static constexpr std::uint64_t kShuffleTag = 0x5348554646ull;  // "SHUFF"
  static constexpr std::uint64_t kCaptionTag = 0x43415054ull;    // "CAPT"

  struct Made {
    std::optional<ImageTextBatch> batch;
    std::exception_ptr error;
  };

  std::shared_ptr<const std::vector<index_t>> cached_permutation(index_t epoch) const {
    {
      std::lock_guard<std::mutex> lock(perm_mu_);
      for (const auto& [e, p] : perms_)
        if (e == epoch) return p;
    }
    auto p = std::make_shared<const std::vector<index_t>>(permutation(epoch));
    std::lock_guard<std::mutex> lock(perm_mu_);
    perms_.emplace_back(epoch, p);
    if (perms_.size() > 3) perms_.erase(perms_.begin());  // the current epoch and its neighbours
    return p;
  }

  void start_workers() {
    const int w = opt_.workers;
    for (int k = 0; k < w; ++k) threads_.emplace_back([this] { work(); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    space_cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  void work() {
    const index_t ahead = std::max<index_t>(opt_.prefetch, opt_.workers);
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      space_cv_.wait(lock, [&] { return stop_ || (claimed_ < end_ && claimed_ < consumed_ + ahead); });
      if (stop_) return;
      const index_t g = claimed_++;
      lock.unlock();
      Made m;
      try {
        m.batch = batch(g / nb_, g % nb_);
      } catch (...) {
        m.error = std::current_exception();
      }
      lock.lock();
      ready_.emplace(g, std::move(m));
      ready_cv_.notify_all();
    }
  }

  const D& data_;
  Tok tok_;
  LoaderOptions opt_;
  index_t n_ = 0, nb_ = 0;
  ImageShape shape_;

  // Stream state: batches [consumed_, claimed_) are being made or wait in ready_; global index g = e * nb_ + b.
  std::mutex mu_;
  std::condition_variable ready_cv_, space_cv_;
  index_t consumed_ = 0, claimed_ = 0, end_ = 0;
  bool stop_ = false;
  std::map<index_t, Made> ready_;
  std::vector<std::thread> threads_;

  mutable std::mutex perm_mu_;
  mutable std::vector<std::pair<index_t, std::shared_ptr<const std::vector<index_t>>>> perms_;
};

}  // namespace limoe::data
