// `limoe train`: trains a model from a preset or config on a data set; writes a checkpoint and a JSON-lines
// metrics log; resumes exactly from a checkpoint (weights, AdamW moments, data position, router noise).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>

#include <limoe/core/parallel.hpp>
#include <limoe/model/presets.hpp>
#include <limoe/train/trainer.hpp>

#include "session.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_train {
namespace {
using namespace limoe;

// SIGINT or SIGTERM during the training loop: the signal's number, 0 while none came. Any thread may run the
// handler (the data loader's and oneTBB's workers too), so a lock-free atomic, not a volatile.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig, std::memory_order_relaxed); }

// While it lives, SIGINT and SIGTERM ask the training loop to stop after its current step, which finishes any
// checkpoint it is writing (so no temporary file is left behind; the steps since the last checkpoint stay in
// metrics.jsonl.partial, where a resumed run finds them); the command then ends by the same signal
// (cli::pending_signal: main raises it once everything is closed), so a script running limoe stops too. A second
// signal ends the process at once: the handler resets itself (SA_RESETHAND). A signal the process was started
// ignoring (a script's background job) stays ignored. One process only: a rank that stopped alone would leave the
// others waiting in a collective, and a launcher's signal reaches every rank anyway.
class StopOnSignal {
 public:
  explicit StopOnSignal(bool active) {
    if (!active) return;
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;  // a write to stderr in progress goes on
    for (std::size_t i = 0; i < 2; ++i) {
      struct sigaction old {};
      if (::sigaction(kSignals[i], nullptr, &old) != 0 || old.sa_handler == SIG_IGN) continue;
      if (::sigaction(kSignals[i], &sa, &old_[i]) == 0) installed_[i] = true;
    }
  }
  StopOnSignal(const StopOnSignal&) = delete;
  StopOnSignal& operator=(const StopOnSignal&) = delete;
  ~StopOnSignal() {
    for (std::size_t i = 0; i < 2; ++i)
      if (installed_[i]) ::sigaction(kSignals[i], &old_[i], nullptr);
  }
  int signal() const { return installed_[0] || installed_[1] ? g_stop_signal.load(std::memory_order_relaxed) : 0; }

 private:
  static constexpr int kSignals[2] = {SIGINT, SIGTERM};
  bool installed_[2] = {false, false};
  struct sigaction old_[2] {};
};

// The temporary files an earlier run in folder `out` left when it was killed (SIGKILL, or a second signal) while
// writing: checkpoint.safetensors.tmp.<pid>.<n> (io::write_file_atomic's names) and metrics.jsonl.tmp, removed as
// a run starts there. Only regular files untouched for kStaleMinutes, and a checkpoint's only when its process
// is not running here: a file being written is written to all along, and one in a folder shared with another
// machine (whose process ids this one cannot see) is not a stale one while that run lives.
constexpr int kStaleMinutes = 10;
void remove_stale_temps(const std::string& out) {
  const auto old = std::filesystem::file_time_type::clock::now() - std::chrono::minutes(kStaleMinutes);
  auto stale = [&](const std::filesystem::path& p) {
    std::error_code ec;
    const auto st = std::filesystem::symlink_status(p, ec);
    if (ec || !std::filesystem::is_regular_file(st)) return false;
    const auto t = std::filesystem::last_write_time(p, ec);
    return !ec && t < old;
  };
  std::error_code ec;
  if (stale(out + "/metrics.jsonl.tmp")) std::filesystem::remove(out + "/metrics.jsonl.tmp", ec);
  const std::string head = "checkpoint.safetensors.tmp.";
  for (std::filesystem::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(head, 0) != 0) continue;
    const std::string rest = name.substr(head.size());  // <pid>.<n>
    const auto dot = rest.find('.');
    if (dot == 0 || dot == std::string::npos || dot > 10 || rest.find_first_not_of("0123456789.") != std::string::npos)
      continue;
    const long long pid = std::strtoll(rest.substr(0, dot).c_str(), nullptr, 10);
    const bool gone = pid <= 0 || pid > std::numeric_limits<pid_t>::max() ||
                      (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH);
    if (gone && stale(it->path())) {
      std::error_code ignored;
      std::filesystem::remove(it->path(), ignored);
    }
  }
}

std::string hms(double s) {
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

// A metrics line as a step's record: its "step" (-1 where the line is not a whole JSON object with one: a line
// cut short by a killed run) and its "loss" (absent where it has none). One parse for both.
struct LineRecord {
  std::int64_t step = -1;
  std::optional<double> loss;
};
LineRecord line_record(const std::string& line) {
  const auto j = nlohmann::json::parse(line, nullptr, false);
  LineRecord r;
  if (j.is_discarded() || !j.is_object()) return r;
  if (j.contains("step") && j["step"].is_number_integer()) r.step = j["step"].get<std::int64_t>();
  if (j.contains("loss") && j["loss"].is_number()) r.loss = j["loss"].get<double>();
  return r;
}
std::int64_t line_step(const std::string& line) { return line_record(line).step; }

// Copies the lines of the log at `path` that record steps 1 to `last` to `out` (a line that is no step's record
// left out), line by line.
void copy_steps_up_to(const std::string& path, std::int64_t last, std::ostream& out) {
  std::ifstream f(path, std::ios::binary);
  for (std::string line; std::getline(f, line);)
    if (const std::int64_t s = line_step(line); s >= 1 && s <= last) out << line << '\n';
}

// The step of a metrics log's last step record (0 for no log, an empty one or none in its last MiB); lines after
// it that are no step's record (a note added by hand) are passed over. Reads the log's tail only.
std::int64_t last_logged_step(const std::filesystem::path& log) {
  std::ifstream f(log, std::ios::binary | std::ios::ate);
  if (!f) return 0;
  const std::streamoff size = f.tellg(), tail = std::min<std::streamoff>(size, 1 << 20);
  if (size <= 0) return 0;  // empty, or not a file one can seek in
  std::string text(static_cast<std::size_t>(tail), '\0');
  f.seekg(size - tail);
  f.read(text.data(), tail);
  while (!text.empty()) {
    while (!text.empty() && text.back() == '\n') text.pop_back();
    const std::size_t nl = text.rfind('\n');
    const std::string last = text.substr(nl == std::string::npos ? 0 : nl + 1);
    if (const std::int64_t s = line_step(last); s >= 1) return s;
    text.resize(nl == std::string::npos ? 0 : nl);
  }
  return 0;
}

// --set KEY=VALUE (repeatable): a config key, dotted for a nested one (router.bpr=false, aux_loss.load=0), and
// a JSON value (a bare word is a string: pool_img=gap); then the config is read back and checked as a file is.
ModelConfig with_overrides(const ModelConfig& cfg, const std::vector<std::string>& sets) {
  if (sets.empty()) return cfg;
  nlohmann::json j = to_json(cfg);
  for (const auto& s : sets) {
    const auto eq = s.find('=');
    LIMOE_CHECK(eq != std::string::npos && eq > 0, "--set expects KEY=VALUE (a config key, dotted when nested: "
                "router.bpr=false), got \"", s, "\"");
    const std::string key = s.substr(0, eq), text = s.substr(eq + 1);
    nlohmann::json* node = &j;
    std::size_t from = 0;
    for (std::size_t dot; (dot = key.find('.', from)) != std::string::npos; from = dot + 1) {
      const std::string part = key.substr(from, dot - from);
      LIMOE_CHECK(node->contains(part) && (*node)[part].is_object(), "--set ", key, ": \"", part,
                  "\" is not an object of the config (docs/cli.md lists its keys)");
      node = &(*node)[part];
    }
    nlohmann::json value = nlohmann::json::parse(text, nullptr, false);
    if (value.is_discarded()) value = text;  // a bare word: a string
    else if (value.is_object()) value = detail::parse_json_unique_keys(text, "--set " + key);  // no key twice
    (*node)[key.substr(from)] = value;
  }
  return config_from_json(j);
}

int run(const std::vector<std::string>& argv) {
  auto opts = cli::kDataOptions;
  opts.insert({"preset", "config", "steps", "batch", "lr", "warmup", "weight-decay", "clip", "seed", "threads", "out",
               "resume", "log-every", "checkpoint-every", "workers", "stop-at", "data-parallel", "expert-parallel", "set"});
  opts.insert(cli::kBackendOptions.begin(), cli::kBackendOptions.end());
  cli::Args args(argv, opts, {"dense", "two-tower", "quiet", "no-grad-overlap"}, "train");
  args.no_positional();
  const cli::BackendChoice backend = cli::check_backend(args);
  cli::set_threads(args);
  // The ranks of this run (mpirun) and their layout: data parallel over all of them.
  dist::AnyComm comm = cli::world();
  const int ranks = comm.size(), rank = comm.rank();
  const bool lead = rank == 0;  // progress, metrics and the checkpoint come from rank 0 only
  const long long ep = args.integer("expert-parallel", 1, 1, 1 << 20);
  const long long dp = args.integer("data-parallel", ranks % ep == 0 ? ranks / ep : ranks, 1, 1 << 20);
  LIMOE_CHECK(dp * ep == ranks, "--data-parallel ", dp, " x --expert-parallel ", ep, " = ", dp * ep, " ranks, but ",
              ranks, (ranks == 1 ? " process is running (start the ranks with mpirun -np N; this limoe was built "
                                   "with" : " ranks were started by mpirun (this limoe was built with"),
#if defined(LIMOE_HAVE_MPI)
              " MPI)"
#else
              "out MPI: rebuild with libopenmpi-dev installed)"
#endif
  );

  // Model config and tokenizer: from the checkpoint when resuming, else from the preset / config file.
  std::unique_ptr<io::SafetensorsReader> resume;
  ModelConfig cfg;
  // One source of the model: a resumed run keeps its checkpoint's config, and a preset and a config file are
  // alternatives (the usage line), so a second one would be silently ignored.
  for (const char* other : {"preset", "config"})
    LIMOE_CHECK(!args.has("resume") || !args.has(other), "--resume continues its checkpoint's model; --", other,
                " would be ignored (start a new run without --resume to use it)");
  for (const char* other : {"dense", "two-tower"})
    LIMOE_CHECK(!args.has("resume") || !args.flag(other), "--resume continues its checkpoint's model; --", other,
                " would change it (start a new run without --resume to use it)");
  LIMOE_CHECK(!args.has("preset") || !args.has("config"), "give --preset or --config, not both");
  if (args.has("resume")) {
    resume = std::make_unique<io::SafetensorsReader>(io::SafetensorsReader::open(args.str("resume")));
    cfg = cli::checkpoint_config(*resume);  // its tensors checked before the model is allocated
  } else if (args.has("config")) {
    const std::vector<std::uint8_t> bytes = io::read_file(args.str("config"));  // a folder or a device: named
    cfg = config_from_json_string(std::string(bytes.begin(), bytes.end()));
  } else {
    // The default preset fits the data: small-56 for the 56x56x3 scenes, else small-28.
    cfg = preset(args.str("preset", args.str("data") == "fashion-scenes" ? "small-56" : "small-28"));
  }
  if (args.flag("dense")) cfg = dense_variant(cfg);
  if (args.flag("two-tower")) cfg = two_tower_variant(cfg);
  LIMOE_CHECK(!resume || args.all("set").empty(), "--set changes the model; a resumed run keeps its checkpoint's "
              "config (start a new run with --config or --preset and --set)");
  cfg = with_overrides(cfg, args.all("set"));
  // A resumed run continues with the settings it was started with unless told otherwise.
  const nlohmann::json prior =
      resume ? cli::train_state_of(resume->metadata(), args.str("resume")) : nlohmann::json::object();
  // A recorded setting, typed as the default is: an integer for an integer, a finite number for a double; the
  // checkpoint's metadata is the file's, so a wrong type is an error naming the key (and the flag's range checks
  // apply to it as to the flag).
  auto prior_or = [&](const char* key, auto def) {
    using V = decltype(def);
    if (!prior.contains(key)) return def;
    const nlohmann::json& v = prior[key];
    if constexpr (std::is_integral_v<V>) {
      LIMOE_CHECK(v.is_number_integer() && (!v.is_number_unsigned() ||
                                            v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<V>::max())),
                  "checkpoint '", resume->label(), "': train_state \"", key, "\" must be an integer, got ",
                  detail::json_excerpt(v));
      return static_cast<V>(v.get<std::int64_t>());
    } else {
      LIMOE_CHECK(v.is_number() && std::isfinite(v.get<double>()), "checkpoint '", resume->label(), "': train_state \"",
                  key, "\" must be a finite number, got ", detail::json_excerpt(v));
      return static_cast<V>(v.get<double>());
    }
  };
  const double prior_seconds = prior_or("train_seconds", 0.0);  // training time of the run before a resume
  // The progress line's smoothed loss (stdout's final_loss) goes on across a resume: the checkpoint records it
  // (loss_ema), so a run split into legs reports what the uninterrupted run does. A checkpoint without it (made
  // before 2026-12-06, or elsewhere) starts the average afresh at the first step. Read here, with the other
  // settings, before anything in --out is touched.
  const bool ema_recorded = prior.contains("loss_ema");
  double ema_loss = prior_or("loss_ema", 0.0);
  // ... and on the same data, as eval and routing default to it (cli::data_source).
  const auto src = cli::data_source(args, cfg, resume ? cli::trained_data(resume->metadata()) : cli::TrainedData{});
  // The paths are recorded in the checkpoint's JSON metadata, which holds UTF-8 only.
  LIMOE_CHECK(data::valid_utf8(src.path) && data::valid_utf8(src.test_path),
              "--data-path and --test-path must be UTF-8 file names (they are recorded in the checkpoint)");
  const data::AnyDataset train_ds = cli::open_data(src, data::Split::train);
  data::WordTokenizer tok = resume ? cli::tokenizer_from(*resume, cfg, /*resuming=*/true) : data::WordTokenizer::build(train_ds.corpus(), cfg.text_len);
  // A preset's vocab_size follows the tokenizer built from the data, unless --set gave one.
  const std::vector<std::string> sets = args.all("set");
  const bool vocab_set = std::any_of(sets.begin(), sets.end(), [](const std::string& s) { return s.rfind("vocab_size=", 0) == 0; });
  if (!resume && !args.has("config") && !vocab_set) cfg.vocab_size = static_cast<int>(std::max<index_t>(tok.vocab_size(), 8));
  LIMOE_CHECK(tok.vocab_size() <= cfg.vocab_size, "the tokenizer has ", tok.vocab_size(),
              " words but the model's vocab_size is ", cfg.vocab_size);
  LIMOE_CHECK(tok.text_len() == cfg.text_len, "the tokenizer's text length ", tok.text_len(), " differs from the model's ", cfg.text_len);
  LIMOE_CHECK(cfg.pad_id == data::WordTokenizer::kPad, "the model's pad_id ", cfg.pad_id, " is not the id the "
              "tokenizer pads captions with (", data::WordTokenizer::kPad, ", <pad>): the model would take the word "
              "of id ", cfg.pad_id, " for padding and the padding for a word (leave pad_id at ",
              data::WordTokenizer::kPad, ")");
  cfg.validate();

  LIMOE_CHECK(ep == 1 || (!cfg.moe_blocks.empty() && cfg.experts % ep == 0), "--expert-parallel ", ep,
              ": the model's ", cfg.experts, " experts", (cfg.moe_blocks.empty() ? " (it has no MoE block)" : ""),
              " do not split into ", ep, " equal parts");

  TrainConfig tc;
  tc.steps = args.integer("steps", prior_or("steps", 1000LL), 1, 1LL << 40);
  tc.adam.lr = args.number("lr", prior_or("lr", 1e-3), 0.0);
  tc.adam.weight_decay = args.number("weight-decay", prior_or("weight_decay", 0.1), 0.0);
  tc.adam.clip_norm = args.number("clip", prior_or("clip", 1.0), 0.0);  // 0: no clipping
  tc.overlap_grad_sum = !args.flag("no-grad-overlap");
  tc.warmup_steps = args.integer("warmup", prior_or("warmup", static_cast<long long>(std::min<std::int64_t>(100, tc.steps / 10))));
  LIMOE_CHECK(tc.warmup_steps >= 0 && tc.warmup_steps <= tc.steps, "--warmup must be in [0, steps], got ", tc.warmup_steps);
  // --stop-at N ends this invocation after step N of the schedule (which still spans --steps): a run can be
  // split into legs, each resumed from the previous one's checkpoint.
  const std::int64_t stop = args.integer("stop-at", tc.steps, 1, tc.steps);
  const index_t batch = args.integer("batch", prior_or("batch", 128LL));
  LIMOE_CHECK(batch >= 2, "--batch must be at least 2 (the contrastive loss needs negatives), got ", batch);
  LIMOE_CHECK(batch <= train_ds.size(), "--batch ", batch, " exceeds the data set's ", train_ds.size(), " examples");
  LIMOE_CHECK(batch % ranks == 0, "--batch ", batch, " is the whole batch of a step; it must split evenly over the ",
              ranks, " ranks");
  const index_t shard = batch / ranks;
  // Routing groups never span ranks. Groups of consecutive tokens cannot be kept across the split; one group per
  // call becomes one group per rank's shard, recorded in the model (and its checkpoint) as groups of pairs.
  LIMOE_CHECK(ranks == 1 || cfg.router.group_size == 0, "router.group_size ", cfg.router.group_size, " (routing groups "
              "of consecutive tokens) cannot be kept over ", ranks, " ranks; use group_pairs (groups of pairs) instead");
  if (ranks > 1 && cfg.group_pairs == 0) cfg.group_pairs = static_cast<int>(shard);
  // On one process the last group of a call may be shorter; over several ranks the groups must tile each rank's
  // shard, so that the ranks route the same groups as one process would over the whole batch.
  LIMOE_CHECK(ranks == 1 || cfg.group_pairs == 0 || shard % cfg.group_pairs == 0, "routing groups of ",
              cfg.group_pairs, " pairs (group_pairs) must tile each rank's ", shard, " pairs (--batch ", batch,
              " over ", ranks, " ranks): a group never spans ranks");
  cfg.validate();

  return cli::with_model(backend, [&]<class Model>() -> int {
  // Rank r holds expert part r % E; ranks r - r % E ... form its expert-parallel group (Trainer).
  Model model(cfg, ConfigRouter{}, ExpertShard{static_cast<int>(rank % ep), static_cast<int>(ep)});
  // A resumed run's data order and router noise follow its seed: a train_state without one is refused unless
  // --seed gives it (a checkpoint without train_state, made elsewhere, starts from seed 0 like a new run).
  LIMOE_CHECK(!resume || args.has("seed") || prior.empty() || prior.contains("seed"), "checkpoint '", args.str("resume"),
              "': its train_state records no \"seed\"; give the run's --seed");
  const std::uint64_t seed = static_cast<std::uint64_t>(args.integer("seed", prior_or("seed", 0LL), 0));
  if (resume) load_weights(model, *resume); else model.init(seed);
  model.set_keep_packed_weights(backend.packed_weights);  // the held-out passes are evaluation forwards
  model.set_noise_seed(Rng(seed).derive(0x4e015e).seed());
  Trainer<Model, dist::AnyComm> trainer(model, tc, std::move(comm));
#if defined(LIMOE_CLI_NCCL)
  // Several GPUs: the gradient summed on the devices over NCCL (the same order as the staged sum), and under
  // expert parallelism the expert blocks exchanged device to device.
  if constexpr (!std::is_same_v<typename Model::memory_space, HostSpace>)
    if (ranks > 1)
      if (auto nccl = cli::nccl_world()) trainer.sum_gradients_with(std::move(*nccl));
#endif
  std::int64_t start = 0;
  if (resume) {
    LIMOE_CHECK(load_optimizer(trainer.optimizer(), *resume), "checkpoint '", args.str("resume"),
                "' has no optimizer state (opt.m / opt.v); it cannot be resumed, only fine-tuned");
    start = trainer.step_count();
    // The checkpoint's record of its step must be its optimizer's (a file edited by hand, or parts of two runs).
    LIMOE_CHECK(!prior.contains("step") || prior_or("step", std::int64_t{0}) == start, "checkpoint '",
                args.str("resume"), "': train_state \"step\" ", detail::json_excerpt(prior["step"]),
                " differs from its optimizer's step ", start);
    LIMOE_CHECK(start < tc.steps, "the checkpoint is at step ", start, ", --steps ", tc.steps, " leaves nothing to do");
  }
  LIMOE_CHECK(stop > start, "--stop-at ", stop, " is not after the current step ", start);

  data::LoaderOptions lo;
  lo.batch_size = batch;
  lo.seed = seed;
  lo.workers = static_cast<int>(args.integer("workers", 1, 0, 256));
  lo.shard = rank, lo.shards = ranks;  // this rank's part of every batch: the same data order on any rank count
  data::Loader<data::AnyDataset, data::WordTokenizer> loader(train_ds, tok, lo);
  loader.seek(start / loader.batches_per_epoch(), start % loader.batches_per_epoch());

  const std::string out = args.str("out", "runs/" + std::string(args.flag("two-tower") ? "two-tower"
                                                                 : args.flag("dense")   ? "dense"
                                                                                        : "limoe"));
  LIMOE_CHECK(!out.empty(), "--out needs a folder name");
  LIMOE_CHECK(data::valid_utf8(out), "--out must be a UTF-8 folder name (the run's JSON output names it)");
  const std::string ckpt = out + "/checkpoint.safetensors";
  // metrics.jsonl always matches the checkpoint beside it: the lines of the steps since the last checkpoint go
  // to metrics.jsonl.partial as they come (to follow a run), and join the earlier steps' lines in a new
  // metrics.jsonl (written beside it, then renamed over it) once the checkpoint that holds those steps is
  // written. A run that fails leaves the folder's checkpoint and metrics.jsonl as they were, and its own lines in
  // metrics.jsonl.partial. The earlier steps are none for a new run (its first checkpoint replaces the folder's
  // log), and for a resumed run those of the log beside the checkpoint it resumed (this folder's or another's),
  // with the lines a run killed between its checkpoint and its log left in the .partial beside that log.
  const std::string metrics = out + "/metrics.jsonl", partial = metrics + ".partial";
  std::ofstream log;
  std::string history, recovered;
  // The resumed log's lines after the checkpoint's step are dropped as it joins the new log (at the first commit,
  // while history is still that log): a log copied from a later point holds steps this run does again. So are
  // lines that are no step's record (not JSON, or without an integer "step" >= 1: a corrupt or hand-edited log).
  bool trim_history = resume != nullptr;
  std::filesystem::path from;  // the resumed checkpoint's log
  if (resume) {
    from = std::filesystem::path(args.str("resume")).parent_path() / "metrics.jsonl";
    if (std::filesystem::exists(from)) history = from.string();
    // A run killed between writing its checkpoint and renaming its log over the old one left that log behind the
    // checkpoint, and the missing steps' lines in the .partial beside it: they join this run's log (read now,
    // before this run's own .partial, which may be that file, is started). Two cases:
    // - the .partial holds every step from 1 to the checkpoint's by itself (a new run's first checkpoint, or a run
    //   resumed from another folder, whose .partial starts with that folder's steps), and those lines give the
    //   smoothed loss the checkpoint records (train_state's loss_ema, recomputed as the run computed it): then it
    //   is the checkpoint's log, and the file beside it an older run's, however far that one went;
    // - else the lines that continue the log beside it step by step, up to the checkpoint's step.
    // Anything else (a line missing or cut short, another run's lines) is left out rather than mixed in.
    const std::int64_t logged = last_logged_step(from);
    std::ifstream old_partial(from.string() + ".partial", std::ios::binary);
    std::string whole;
    std::int64_t next = logged + 1, whole_next = 1;
    bool continues = logged < start, from_one = true;
    double ema = 0;  // the whole-log candidate's smoothed loss, as the progress line computes it
    for (std::string line; (continues || from_one) && std::getline(old_partial, line);) {
      const auto [s, loss] = line_record(line);
      if (s > start || s < 1) break;  // after the checkpoint (the run went on), or a line cut short
      if (continues && s == next) recovered += line + "\n", ++next;
      else continues = false;
      if (from_one && s == whole_next && loss) {
        whole += line + "\n", ++whole_next;
        ema = s == 1 ? *loss : 0.9 * ema + 0.1 * *loss;
      } else {
        from_one = false;
      }
    }
    const auto recorded = prior.contains("loss_ema") && prior["loss_ema"].is_number()
                              ? std::optional<double>(prior["loss_ema"].get<double>()) : std::nullopt;
    if (whole_next == start + 1 && recorded && std::abs(ema - *recorded) <= 1e-9 * std::max(1.0, std::abs(*recorded))) {
      history.clear();
      recovered = std::move(whole);
    }
  }
  if (lead) {
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    LIMOE_CHECK(!ec && std::filesystem::is_directory(out), "cannot create the output folder '", out, "'",
                ec ? ": " + ec.message() : std::string());
    remove_stale_temps(out);
    // What the run will write must be regular files (or nothing yet): found at the first checkpoint, a folder in
    // the way would end the run after its training, and a pipe would hold it at its first line.
    for (const std::string& f : {ckpt, metrics, partial, metrics + ".tmp"}) io::detail::check_replaceable(f);
    log.open(partial, std::ios::trunc);
    // Resumed into another folder: the earlier steps go first into this folder's .partial, so that a run killed
    // before its first log rename still has them beside its checkpoint (the rule above finds them there).
    if (!history.empty() && !std::filesystem::equivalent(from.parent_path().empty() ? "." : from.parent_path(), out, ec)) {
      copy_steps_up_to(history, start, log);
      history.clear();
      trim_history = false;
    }
    log << recovered << std::flush;
    LIMOE_CHECK(log.good(), "cannot write '", partial, "'");
  }
  // The new log is written beside the old one (metrics.jsonl.tmp) before the checkpoint, and renamed over it
  // after: a failure before the checkpoint's rename leaves both files as they were, and no .tmp behind.
  const std::string staged = metrics + ".tmp";
  auto stage_metrics = [&] {
    log.close();
    std::ofstream m(staged, std::ios::trunc | std::ios::binary);
    for (const std::string& part : {history, partial}) {
      if (part.empty()) continue;
      if (part == history && trim_history) {
        copy_steps_up_to(history, start, m);
        continue;
      }
      std::ifstream f(part, std::ios::binary);
      if (f.peek() != std::ifstream::traits_type::eof()) m << f.rdbuf();
    }
    m.flush();
    if (!m.good()) {
      std::error_code ec;
      std::filesystem::remove(staged, ec);
      fail("cannot write '", staged, "'");
    }
  };
  auto commit_metrics = [&] {
    std::error_code ec;
    std::filesystem::rename(staged, metrics, ec);
    if (ec) {
      std::error_code ignored;
      std::filesystem::remove(staged, ignored);
      fail("cannot replace '", metrics, "': ", ec.message(), " (the checkpoint beside it is written; this run's "
           "steps are in '", partial, "', where a resumed run finds them)");
    }
    history = metrics;
    trim_history = false;
    log.open(partial, std::ios::trunc);
  };
  // Writes the checkpoint between staging the log and renaming it.
  auto with_metrics = [&](auto write_checkpoint) {
    stage_metrics();
    try {
      write_checkpoint();
    } catch (...) {
      std::error_code ec;
      std::filesystem::remove(staged, ec);  // the staged log goes with the failed checkpoint
      log.open(partial, std::ios::app);
      throw;
    }
    commit_metrics();
  };

  const bool quiet = args.flag("quiet") || !lead, tty = isatty(STDERR_FILENO);
  const std::int64_t log_every = std::max<long long>(1, args.integer("log-every", 10, 0));
  const std::int64_t ckpt_every = args.integer("checkpoint-every", 0, 0);  // 0: at the end only
  const auto t0 = std::chrono::steady_clock::now();
  // Every rank holds the same parameters (expert parallel: the same parts of them in every data-parallel
  // replica); rank 0 writes the whole model, atomically. With experts sharded, the parts are gathered first
  // (collective: every rank calls save).
  std::vector<float> whole_values, whole_m, whole_v;
  double saved_seconds = prior_seconds;  // the training time the last checkpoint records (stdout reports it)
  auto save = [&](std::int64_t step) {
    if (ep > 1) trainer.gather_whole_state(whole_values, whole_m, whole_v);
    if (!lead) return;
    const double secs = prior_seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    saved_seconds = secs;
    nlohmann::json st = {{"step", step}, {"steps", tc.steps}, {"seed", seed}, {"batch", batch}, {"lr", tc.adam.lr},
                         {"warmup", tc.warmup_steps}, {"weight_decay", tc.adam.weight_decay}, {"clip", tc.adam.clip_norm},
                         {"data", data::resolve_kind(src)}, {"train_seconds", secs}, {"loss_ema", ema_loss},
                         {"precision", Model::precision_type::name}};
    // The data's paths, absolute, so that eval, routing and a resumed run find them from any folder.
    if (!src.path.empty()) st["data_path"] = std::filesystem::absolute(src.path).string();
    if (!src.test_path.empty()) st["test_path"] = std::filesystem::absolute(src.test_path).string();
    if (ep == 1) {
      with_metrics([&] {
        save_checkpoint(model, ckpt, TrainState<float, typename Model::memory_space>{&trainer.optimizer(), st.dump()},
                        {{"tokenizer", tok.to_json()}});
      });
      return;
    }
    Limoe<float> whole(cfg);
    std::copy(whole_values.begin(), whole_values.end(), whole.params().values().data());
    AdamW<float> opt(tc.adam, whole.params());
    std::copy(whole_m.begin(), whole_m.end(), opt.m().data());
    std::copy(whole_v.begin(), whole_v.end(), opt.v().data());
    opt.set_step(trainer.optimizer().step());
    with_metrics([&] { save_checkpoint(whole, ckpt, TrainState<float>{&opt, st.dump()}, {{"tokenizer", tok.to_json()}}); });
  };
  if (lead)
  std::cerr << "limoe train: " << cfg.depth << " blocks (" << cfg.moe_blocks.size() << " MoE, " << cfg.experts
            << " experts, top-" << cfg.top_k << "), width " << cfg.width << ", " << count_params(cfg).total
            << " parameters; data " << train_ds.name() << " (" << train_ds.size() << " pairs), batch " << batch
            << ", steps " << start << " -> " << tc.steps << ", threads " << num_threads() << ", "
            << Model::precision_type::name
            << (ranks > 1 ? ", " + std::to_string(ranks) + " ranks (data parallel " + std::to_string(dp) +
                                " x expert parallel " + std::to_string(ep) + "), routing groups of " +
                                std::to_string(cfg.group_pairs) + " pairs" : std::string()) << "\n";
  const StopOnSignal stop_signal(ranks == 1);
  for (std::int64_t s = start; s < stop; ++s) {
    const auto b = loader.next();
    LIMOE_CHECK(b.has_value(), "the data loader ran dry at step ", s);
    const StepReport r = trainer.step(b->images.cview(), b->texts.cview());
    ema_loss = s == start && !ema_recorded ? r.loss.total : 0.9 * ema_loss + 0.1 * r.loss.total;
    nlohmann::json j = to_json(r);
    j["elapsed"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (lead) log << j.dump() << "\n" << std::flush;
    const bool last = s + 1 == stop;
    if (!quiet && ((s + 1) % log_every == 0 || last)) {
      const double el = j["elapsed"].get<double>();
      const double rate = static_cast<double>((s + 1 - start) * batch) / el;
      const double left = el / static_cast<double>(s + 1 - start) * static_cast<double>(tc.steps - s - 1);
      char line[256];
      std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f (contrastive %.4f, aux %.4f)  lr %.2e  %.0f pairs/s  left %s",
                    static_cast<long long>(s + 1), static_cast<long long>(tc.steps), ema_loss, r.loss.contrastive,
                    r.loss.aux, r.lr, rate, hms(left).c_str());
      std::cerr << (tty ? "\r" : "") << line << (tty && !last ? "\033[K" : "\n") << std::flush;
    }
    if (ckpt_every > 0 && (s + 1) % ckpt_every == 0 && !last) save(s + 1);
    if (const int sig = stop_signal.signal(); sig != 0 && !last) {
      log.close();
      cli::pending_signal() = sig;  // main ends the process by it, once everything here is closed
      std::cerr << (tty && !quiet ? "\n" : "") << "limoe train: stopped by signal " << sig << " after step " << s + 1
                << " of " << tc.steps << "; the folder's checkpoint and metrics.jsonl are as the last checkpoint "
                << "written left them, and the steps since are in '" << partial << "'\n";
      return 128 + sig;
    }
  }
  save(stop);
  if (!lead) return 0;
  log.close();
  std::error_code ec;
  std::filesystem::remove(partial, ec);
  std::cout << nlohmann::json{{"checkpoint", ckpt}, {"metrics", out + "/metrics.jsonl"}, {"steps", stop},
                              {"train_seconds", saved_seconds}, {"final_loss", ema_loss}}.dump() << "\n";
  return 0;
  });
}

const cli::Register reg({"train", "train a model on image-text pairs and write a checkpoint",
                         std::string("usage: limoe train [--preset NAME | --config FILE.json | --resume CKPT] [options]\n\n"
                         "  --preset NAME        a preset (default small-28); see limoe inspect\n"
                         "  --config FILE        a JSON config object (docs/cli.md)\n"
                         "  --resume CKPT        continue a run from its checkpoint (steps, batch, lr, seed and data default to the run's)\n"
                         "  --dense              every MoE block becomes a dense MLP (the dense model of equal per-token compute)\n"
                         "  --two-tower          the dense model with separate image and text towers (CLIP-style, equal per-token compute)\n"
                         "  --set KEY=VALUE      change a config key (repeatable; dotted when nested: --set router.bpr=false\n"
                         "                       --set aux_loss.load=0 --set pool_img=gap); applied after --dense / --two-tower\n") +
                         cli::kDataHelp +
                         "  --steps N            total optimizer steps (default 1000)\n"
                         "  --batch B            pairs per step (default 128)\n"
                         "  --lr LR              peak learning rate (default 1e-3); --warmup N steps (default min(100, steps/10))\n"
                         "  --weight-decay W     decoupled weight decay on matrices (default 0.1); --clip C global norm (default 1)\n"
                         "  --seed S             initialisation and data order (default 0)\n"
                         "  --threads N          worker threads (default all cores); --workers N data threads (default 1)\n"
                         "  --data-parallel D    under mpirun -np N: copies of each expert part (default N / E); --batch\n"
                         "                       stays the whole batch, and a seed gives the same data order on any N\n"
                         "  --expert-parallel E  ranks that share out each block's experts (default 1): rank r holds part\n"
                         "                       r % E of them; D x E = N, and the batch is split over all N ranks\n"
                         "  --no-grad-overlap    data parallel: sum the gradient over the ranks after the backward pass\n"
                         "                       (default: during it, on a thread of its own; the same result)\n"
                         LIMOE_CLI_BACKEND_HELP
                         "  --out DIR            output folder (default runs/limoe): checkpoint.safetensors, metrics.jsonl\n"
                         "  --log-every N        progress line every N steps (default 10); --quiet for none\n"
                         "  --checkpoint-every N also write the checkpoint every N steps\n"
                         "  --stop-at N          stop after step N (the schedule still spans --steps); --resume continues\n",
                         run});
}  // namespace
}  // namespace limoe_cmd_train
