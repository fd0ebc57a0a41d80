// limoe/model/checkpoint.hpp: models to and from safetensors checkpoints (docs/cli.md).
//
// A checkpoint is the model's parameters under their docs/cli.md names, F32 (readers accept F16/BF16/F64), with
// `__metadata__` {"format": "limoe", "format_version": "1", "config": <JSON>}. Training adds the AdamW moments
// as flat `opt.m` / `opt.v` tensors (in the order the `opt_order` metadata lists: the model's parameter store) and `train_state` metadata;
// a model loader ignores both. Any tool that writes these names and this config produces a loadable model.
#pragma once

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "limoe/core/tensor.hpp"
#include "limoe/io/safetensors.hpp"
#include "limoe/model/config.hpp"

namespace limoe {

template <class T, class S>
class AdamW;  // train/optimizer.hpp: it writes and reads its own state (save_state / load_state)

inline constexpr const char* kCheckpointFormat = "limoe";
inline constexpr const char* kCheckpointVersion = "1";

// The model config stored in an open checkpoint; errors name the file and what is missing.
inline ModelConfig read_checkpoint_config(const io::SafetensorsReader& r) {
  const auto& md = r.metadata();
  auto fmt = md.find("format");
  LIMOE_CHECK(fmt == md.end() || fmt->second == kCheckpointFormat, "checkpoint '", r.label(), "': format is \"",
              fmt->second, "\", expected \"", kCheckpointFormat, "\"");
  auto ver = md.find("format_version");
  LIMOE_CHECK(ver == md.end() || ver->second == kCheckpointVersion, "checkpoint '", r.label(),
              "': format_version \"", ver->second, "\" is not supported (this build reads version ",
              kCheckpointVersion, ")");
  auto cfg = md.find("config");
  LIMOE_CHECK(cfg != md.end(), "checkpoint '", r.label(),
              "': no \"config\" in __metadata__; a limoe checkpoint stores its hyper-parameters there (docs/cli.md)");
  try {
    return config_from_json_string(cfg->second);
  } catch (const Error& e) {
    fail("checkpoint '", r.label(), "': ", e.what());
  }
}

inline ModelConfig read_checkpoint_config(const std::string& path) {
  return read_checkpoint_config(io::SafetensorsReader::open(path));
}

// One parameter (an entry of a ParamStore) as the checkpoint holds it. check_parameter_shape: present and of the
// entry's whole shape (a scalar may be stored as [] or [1]), from the header alone. read_parameter: that, and
// finite; returns the entry's part of it (a shard's, for experts sharded over ranks; the file holds whole
// tensors). Errors name the file and the tensor.
template <class Entry>
void check_parameter_shape(const io::SafetensorsReader& r, const Entry& e) {
  LIMOE_CHECK(r.has(e.name), "checkpoint '", r.label(), "': missing tensor \"", e.name, "\" (shape ", e.shape.str(),
              ") required by its config");
  const auto& dims = r.info(e.name).shape;
  const Shape found = dims.size() <= 4 ? r.shape(e.name) : Shape{};
  const Shape whole = e.global_shape();
  const bool scalar_ok = e.shape.rank() == 0 && found.numel() == 1 && dims.size() <= 1;
  LIMOE_CHECK(dims.size() <= 4 && (found == whole || scalar_ok), "checkpoint '", r.label(), "': tensor \"", e.name,
              "\" has ", dims.size() <= 4 ? "shape " + found.str() : "rank " + std::to_string(dims.size()),
              ", the config requires ", whole.str());
}
template <class Entry>
std::vector<float> read_parameter(const io::SafetensorsReader& r, const Entry& e) {
  check_parameter_shape(r, e);
  std::vector<float> t = r.read_f32_flat(e.name);
  const std::size_t first = static_cast<std::size_t>(e.shard * e.shape.numel()), n = static_cast<std::size_t>(e.shape.numel());
  for (std::size_t i = first; i < first + n; ++i)
    LIMOE_CHECK(std::isfinite(t[i]), "checkpoint '", r.label(), "': tensor \"", e.name, "\" holds a non-finite value at ", i);
  if (first > 0 || n < t.size()) t = std::vector<float>(t.begin() + static_cast<std::ptrdiff_t>(first), t.begin() + static_cast<std::ptrdiff_t>(first + n));
  return t;
}

// Copies every parameter of `model` from the checkpoint, checking names, shapes and finiteness.
template <class Model>
void load_weights(Model& model, const io::SafetensorsReader& r) {
  auto& ps = model.params();
  for (const auto& e : ps.entries()) {
    const std::vector<float> t = read_parameter(r, e);
    using U = typename Model::scalar_type;
    Tensor<U> host(e.shape);  // checked on the host, then copied into the model's memory (a device backend's)
    for (std::size_t i = 0; i < t.size(); ++i) host[static_cast<index_t>(i)] = static_cast<U>(t[i]);
    copy_from_host<U, typename Model::memory_space>(host.cview(), ps.value(ps.get(e.name)));
  }
}

// The checks of load_weights without a model: `entries` is a config's parameter list (Limoe::parameter_entries),
// and the tensors are read one at a time, so this needs the memory of the largest tensor, not of the model
// (`limoe inspect` on a checkpoint). With `values` false only names and shapes, from the header: what a loader
// checks before it allocates the model (limoe embed, eval, routing).
template <class Entries>
void check_weights(const Entries& entries, const io::SafetensorsReader& r, bool values = true) {
  for (const auto& e : entries) {
    if (values) (void)read_parameter(r, e);
    else check_parameter_shape(r, e);
  }
}

// Optional training state saved beside the weights so a run resumes exactly.
template <class T, class S = HostSpace>
struct TrainState {
  const AdamW<T, S>* optimizer = nullptr;
  std::string json;  // free-form "train_state" metadata (step, data position, schedule)
};

// Writes the model (and optionally the optimizer) atomically: a crash never leaves a half-written file.
template <class Model, class T = typename Model::scalar_type>
void save_checkpoint(const Model& model, const std::string& path,
                     const TrainState<T, typename Model::memory_space>& state = {},
                     const std::map<std::string, std::string>& extra_metadata = {}) {
  io::SafetensorsWriter w;
  const auto& ps = model.params();
  std::vector<float> buf;
  for (const auto& e : ps.entries()) {
    LIMOE_CHECK(e.shards == 1, "save_checkpoint: \"", e.name, "\" is part ", e.shard, " of ", e.shards,
                " of its tensor (expert parallel); a checkpoint holds the whole model: gather the parts first "
                "(Trainer::gather_whole_state) into a whole model");
    const auto v = to_host(ps.value(ps.get(e.name)));  // a host copy (of device memory on a device backend)
    buf.assign(v.data(), v.data() + v.numel());
    w.add(e.name, std::vector<std::int64_t>(e.shape.begin(), e.shape.end()), std::span<const float>(buf));
  }
  if (state.optimizer) state.optimizer->save_state(w);
  if (!state.json.empty()) w.set_metadata("train_state", state.json);
  w.set_metadata("format", kCheckpointFormat);
  w.set_metadata("format_version", kCheckpointVersion);
  w.set_metadata("config", to_json(model.config()).dump());
  for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
  w.write(path);
}

// Restores the AdamW moments and step written by save_checkpoint (AdamW::load_state); false when the checkpoint
// has none.
template <class T, class S>
bool load_optimizer(AdamW<T, S>& opt, const io::SafetensorsReader& r) {
  return opt.load_state(r);
}

}  // namespace limoe
