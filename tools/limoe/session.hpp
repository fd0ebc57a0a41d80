// tools/limoe/session.hpp: what several sub-commands share: the data source from the command line, the
// tokenizer stored in a checkpoint, and a model loaded from a checkpoint.
#pragma once

#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>

#include <limoe/data/data.hpp>
#include <limoe/model/checkpoint.hpp>
#include <limoe/core/gemm_mixed.hpp>
#include <limoe/model/model.hpp>

#include "cli.hpp"

#if defined(LIMOE_CLI_CUDA)
#include <limoe/backend/cuda.hpp>
#include <limoe/cuda.hpp>
// Compiled once, in limoe_instances_cuda (src/instances/limoe_float_cuda.cpp).
extern template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cuda>;
extern template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cuda,
                                   limoe::Bf16Mixed>;
#endif

namespace limoe::cli {

inline const std::set<std::string> kDataOptions = {"data", "data-path", "test-path"};
inline const char* kDataHelp =
    "  --data KIND          auto (Fashion-MNIST when installed, else synthetic shapes), fashion-mnist,\n"
    "                       fashion-scenes (56x56x3 scenes of Fashion-MNIST objects, captions with colours,\n"
    "                       sizes and relations; preset small-56), synthetic or tsv (default auto)\n"
    "  --data-path PATH     the Fashion-MNIST IDX folder, or the training TSV (image_path<TAB>caption)\n"
    "  --test-path PATH     the test TSV (tsv data only)\n";

// The data a checkpoint was trained on, as `limoe train` records it in train_state: the kind ("fashion-mnist",
// "fashion-scenes", "synthetic", "tsv") and the --data-path / --test-path it was given (absolute), if any.
struct TrainedData {
  std::string kind, path, test_path;
  bool unreadable = false;  // a train_state that is not a JSON object: what it recorded is unknown
};
// A checkpoint's train_state (what `limoe train` records of its run) as a JSON object; an empty object where
// there is none. One that is not a JSON object, or holds a NUL (the JSON reader stops there as at the end of its
// input, so `{...}` NUL `anything` would read as the part before the NUL), is an empty object too where it only
// supplies defaults (eval, routing), and an error naming the checkpoint `resuming` (train --resume, which would
// otherwise go on with settings the run never had).
// `unreadable` (when given) is set where there is a train_state that is no JSON object.
inline nlohmann::json train_state_of(const std::map<std::string, std::string>& metadata,
                                     const std::string& resuming = {}, bool* unreadable = nullptr) {
  auto it = metadata.find("train_state");
  if (it == metadata.end()) return nlohmann::json::object();
  const bool nul = it->second.find('\0') != std::string::npos;
  nlohmann::json j = nul ? nlohmann::json() : nlohmann::json::parse(it->second, nullptr, false);
  if (j.is_object()) return j;
  if (unreadable) *unreadable = true;
  LIMOE_CHECK(resuming.empty(), "checkpoint '", resuming, "': its train_state ",
              nul ? "holds a NUL byte" : "is not a JSON object", ", so the run's settings cannot be read back");
  return nlohmann::json::object();
}

// From a checkpoint's metadata (empty fields where train_state records none).
inline TrainedData trained_data(const std::map<std::string, std::string>& metadata) {
  TrainedData t;
  const nlohmann::json j = train_state_of(metadata, {}, &t.unreadable);
  auto field = [&](const char* key) {
    if (!j.contains(key)) return std::string();
    // A recorded value of another type is the file's error, not a missing record (which would quietly pick
    // other data: `auto` finds Fashion-MNIST where it is installed).
    LIMOE_CHECK(j[key].is_string(), "the checkpoint's train_state \"", key, "\" must be a string (",
                std::string_view(key) == "data" ? "the data kind" : "a path", "), got ", detail::json_excerpt(j[key]));
    return j[key].get<std::string>();
  };
  t.kind = field("data"), t.path = field("data_path"), t.test_path = field("test_path");
  return t;
}

// The data source named on the command line. What is not named there defaults to the data the checkpoint was
// trained on (`trained`), so eval and routing see the same data as training: its kind, and its paths when the
// kind is the same. --test-path names a TSV, so it implies --data tsv.
// `test_split`: the command reads the test split (eval, routing), so a TSV source needs its test file.
inline data::DataSource data_source(const Args& args, const ModelConfig& cfg, const TrainedData& trained = {},
                                    bool test_split = false) {
  data::DataSource src;
  // A train_state that cannot be read says nothing of the data: the default would quietly be another data set
  // (auto: Fashion-MNIST where it is installed).
  LIMOE_CHECK(!trained.unreadable || args.has("data") || args.has("test-path"), "the checkpoint's train_state is "
              "not a JSON object, so the data it was trained on is unknown: name it with --data (and --data-path)");
  src.kind = args.str("data", args.has("test-path") ? "tsv" : trained.kind.empty() ? "auto" : trained.kind);
  const bool same = src.kind == trained.kind;
  src.path = args.str("data-path", same ? trained.path : "");
  src.test_path = args.str("test-path", same ? trained.test_path : "");
  src.image = {cfg.image_size[0], cfg.image_size[1], cfg.channels};
  // The paths go into JSON (a checkpoint's train_state, eval's and routing's output), which holds UTF-8 only.
  LIMOE_CHECK(data::valid_utf8(src.path), "--data-path must be a UTF-8 file name (limoe's JSON output records it)");
  LIMOE_CHECK(data::valid_utf8(src.test_path), "--test-path must be a UTF-8 file name (limoe's JSON output records it)");
  const std::string kind = data::resolve_kind(src);
  if (args.has("data-path") && kind == "synthetic") {
    LIMOE_CHECK(src.kind != "synthetic", "--data-path names the Fashion-MNIST folder or the training TSV; ",
                args.has("data") ? "--data synthetic" : "the checkpoint's data (synthetic shapes; give --data to read "
                "other data)", " reads no files");
    fail("--data-path '", src.path, "' holds no Fashion-MNIST files (its four IDX files, gzipped or not), so --data "
         "auto would train on synthetic shapes instead");
  }
  LIMOE_CHECK(!args.has("test-path") || kind == "tsv", "--test-path names the test TSV of --data tsv; --data is \"",
              src.kind, "\"");
  LIMOE_CHECK(!test_split || kind != "tsv" || !src.test_path.empty(), "--data tsv: pass the test TSV with --test-path",
              trained.kind == "tsv" ? " (the checkpoint records none)" : "");
  if (kind == "fashion-mnist")
    LIMOE_CHECK(cfg.image_size[0] == 28 && cfg.image_size[1] == 28 && cfg.channels == 1,
                "Fashion-MNIST images are 28x28x1; the model takes ", cfg.image_size[0], "x", cfg.image_size[1], "x",
                cfg.channels, " (use the small-28 or tiny preset, or --data synthetic)");
  if (kind == "fashion-scenes")
    LIMOE_CHECK(cfg.image_size[0] == 56 && cfg.image_size[1] == 56 && cfg.channels == 3,
                "fashion-scenes images are 56x56x3; the model takes ", cfg.image_size[0], "x", cfg.image_size[1], "x",
                cfg.channels, " (use the small-56 preset)");
  return src;
}

// The data set of one split of `src`, whose images must be the model's (src.image, set by data_source): checked
// here, where the message can name the data, rather than at the first batch.
inline data::AnyDataset open_data(const data::DataSource& src, data::Split split) {
  data::AnyDataset ds = data::open_dataset(src, split);
  LIMOE_CHECK(ds.size() == 0 || ds.image_shape() == src.image, "the data set ", ds.name(), " holds ",
              ds.image_shape().str(), " images; the model takes ", src.image.str());
  return ds;
}

// The checkpoint's tokenizer, which must fit its model: the config's text_len, and ids below its vocab_size.
// `resuming`: train --resume asks (a checkpoint without one cannot go on training on captions).
inline data::WordTokenizer tokenizer_from(const io::SafetensorsReader& r, const ModelConfig& cfg,
                                          bool resuming = false) {
  const auto& md = r.metadata();
  auto it = md.find("tokenizer");
  LIMOE_CHECK(it != md.end(), "checkpoint '", r.label(), "' has no \"tokenizer\" in its metadata",
              resuming ? ", so training cannot go on from it: the captions must be tokenized as they were when it was "
                         "trained (a checkpoint written by limoe train records its tokenizer; start a new run instead "
                         "of --resume)"
                       : "; texts must be given as token ids (limoe embed)");
  data::WordTokenizer tok = data::WordTokenizer::from_json(it->second);
  LIMOE_CHECK(tok.text_len() == cfg.text_len, "checkpoint '", r.label(), "': its tokenizer's text_len ",
              tok.text_len(), " differs from its config's text_len ", cfg.text_len);
  LIMOE_CHECK(tok.vocab_size() <= cfg.vocab_size, "checkpoint '", r.label(), "': its tokenizer has ",
              tok.vocab_size(), " words, more than its config's vocab_size ", cfg.vocab_size);
  LIMOE_CHECK(cfg.pad_id == data::WordTokenizer::kPad, "checkpoint '", r.label(), "': its config's pad_id ",
              cfg.pad_id, " is not the id its tokenizer pads captions with (", data::WordTokenizer::kPad, ")");
  return tok;
}

// The model types a command runs, by --device and --precision (core/precision.hpp): the same parameters and
// checkpoint, the matrix products in fp32 or in bf16 with fp32 accumulation, on the CPU or on the GPU.
using ModelFp32 = Limoe<float>;
using ModelBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cpu, Bf16Mixed>;
#if defined(LIMOE_CLI_CUDA)
using ModelCuda = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda>;
using ModelCudaBf16 = Limoe<float, ConfigRouter, moe::DefaultAuxLosses, Cuda, Bf16Mixed>;
#endif

// Calls fn.template operator()<Model>() with the model type of precision p (a command's body written once).
// Under bf16 without a bf16 matrix kernel (oneDNN absent, or no AVX-512 BF16 / AMX) one line says that the
// products are widened to fp32: the same results, no speed-up.
template <class Fn>
decltype(auto) with_precision(PrecisionKind p, Fn&& fn) {
  if (p == PrecisionKind::Bf16) {
    if (detail::bf16_kernel_name() == "widened")
      std::cerr << "limoe: --precision bf16: no bf16 matrix kernel on this machine (oneDNN with AVX-512 BF16 or AMX); "
                   "bf16 operands are widened to fp32: the same results, no speed-up\n";
    return fn.template operator()<ModelBf16>();
  }
  return fn.template operator()<ModelFp32>();
}

// Calls fn.template operator()<Model>() with the model type of the chosen backend and precision: ModelCuda or
// ModelCudaBf16 for --device cuda (after checking that a GPU is there), else with_precision's.
template <class Fn>
decltype(auto) with_model(const BackendChoice& b, Fn&& fn) {
#if defined(LIMOE_CLI_CUDA)
  if (b.cuda) {
    const int n = cuda::device_count();
    LIMOE_CHECK(n > 0, "--device cuda: no usable CUDA device (", cuda::unavailable_reason(), "); use --device cpu");
    // Under mpirun, one GPU per process on each machine: the launcher's local rank picks it.
    int local = 0;
    for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
      if (const char* e = std::getenv(v)) {
        local = std::atoi(e);
        break;
      }
    cuda::set_device(local % n);
    if (b.precision == PrecisionKind::Bf16) return fn.template operator()<ModelCudaBf16>();
    return fn.template operator()<ModelCuda>();
  }
#endif
  return with_precision(b.precision, std::forward<Fn>(fn));
}

template <class Model = ModelFp32>
struct Loaded {
  std::unique_ptr<Model> model;
  data::WordTokenizer tokenizer;
  std::map<std::string, std::string> metadata;
  // The data recorded by `limoe train` (empty fields where it recorded none).
  TrainedData trained_on() const { return trained_data(metadata); }
};

// A checkpoint's config, with its tensors' names and shapes checked against it from the header: what every
// command that builds the model calls before allocating it, so that a config that does not match its tensors is
// an error naming the tensor, not an allocation of the config's size.
inline ModelConfig checkpoint_config(const io::SafetensorsReader& r) {
  ModelConfig cfg = read_checkpoint_config(r);
  check_weights(Limoe<float>::parameter_entries(cfg), r, /*values=*/false);
  return cfg;
}

template <class Model = ModelFp32>
Loaded<Model> load_model(const std::string& path) {
  const auto r = io::SafetensorsReader::open(path);
  const ModelConfig cfg = checkpoint_config(r);
  data::WordTokenizer tok = tokenizer_from(r, cfg);
  Loaded<Model> l{std::make_unique<Model>(cfg), std::move(tok), r.metadata()};
  load_weights(*l.model, r);
  return l;
}

}  // namespace limoe::cli
