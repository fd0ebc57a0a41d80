// tools/limoe/cli.hpp: argument parsing shared by the sub-commands of the `limoe` program.
//
// Options are `--name value` or `--name=value`; flags are `--name`. Unknown options, missing values and
// malformed numbers are errors (limoe::Error, printed as one line by main, exit status 2).
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <limoe/core/error.hpp>
#include <limoe/core/parallel.hpp>
#include <limoe/core/precision.hpp>
#include <limoe/dist/comm.hpp>
#if defined(LIMOE_CLI_NCCL)
#include <limoe/dist/nccl.hpp>
#endif

namespace limoe::cli {

// A signal a command stopped for (train's SIGINT or SIGTERM): main ends the process by it after the command has
// returned and closed its files, so that the shell or script that ran limoe sees a command killed by the signal
// (and stops too) rather than one that handled it.
inline int& pending_signal() {
  static int sig = 0;
  return sig;
}

class Args {
 public:
  // `options` take a value, `flags` do not. Both are spelled without the leading dashes.
  Args(const std::vector<std::string>& argv, const std::set<std::string>& options, const std::set<std::string>& flags,
       const std::string& command)
      : command_(command) {
    for (std::size_t i = 0; i < argv.size(); ++i) {
      const std::string& a = argv[i];
      if (a.rfind("--", 0) == 0 && a.size() > 2) {
        std::string name = a.substr(2), value;
        const auto eq = name.find('=');
        const bool inline_value = eq != std::string::npos;
        if (inline_value) {
          value = name.substr(eq + 1);
          name = name.substr(0, eq);
        }
        if (flags.count(name)) {
          LIMOE_CHECK(!inline_value, "--", name, " takes no value");
          flags_.insert(name);
        } else if (options.count(name)) {
          if (!inline_value) {
            // `--pairs --out x`: the next word is another option, so this one was given no value.
            const bool next_is_option = i + 1 < argv.size() && argv[i + 1].rfind("--", 0) == 0 &&
                                        (options.count(argv[i + 1].substr(2, argv[i + 1].find('=') - 2)) ||
                                         flags.count(argv[i + 1].substr(2)));
            LIMOE_CHECK(i + 1 < argv.size() && !next_is_option, "--", name, " needs a value");
            value = argv[++i];
          }
          values_[name] = value;
          all_[name].push_back(value);
        } else {
          fail("unknown option --", name, " (see limoe ", command_, " --help)");
        }
      } else {
        positional_.push_back(a);
      }
    }
  }

  bool flag(const std::string& name) const { return flags_.count(name) > 0; }
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  // Every value of a repeatable option, in command-line order (str() gives the last).
  std::vector<std::string> all(const std::string& name) const {
    auto it = all_.find(name);
    return it == all_.end() ? std::vector<std::string>{} : it->second;
  }
  std::string str(const std::string& name, const std::string& def = "") const {
    auto it = values_.find(name);
    return it == values_.end() ? def : it->second;
  }
  std::string required(const std::string& name) const {
    LIMOE_CHECK(has(name), "--", name, " is required (see limoe ", command_, " --help)");
    return values_.at(name);
  }
  // An option's integer (decimal digits, an optional sign) within [lo, hi]; a value out of long long's range, a
  // fraction, a hex or an empty string is an error naming the option.
  long long integer(const std::string& name, long long def, long long lo = std::numeric_limits<long long>::min(),
                    long long hi = std::numeric_limits<long long>::max()) const {
    if (!has(name)) return check_range(name, def, lo, hi, " (the default, or the resumed checkpoint's setting)"), def;
    const std::string& s = values_.at(name);
    const bool digits = !s.empty() && s.find_first_not_of("+-0123456789") == std::string::npos;
    char* end = nullptr;
    errno = 0;
    const long long v = digits ? std::strtoll(s.c_str(), &end, 10) : 0;
    LIMOE_CHECK(digits && end && *end == '\0', "--", name, " expects an integer, got \"", s, "\"");
    if (errno == ERANGE) {  // past 64 bits, either way
      LIMOE_CHECK(lo == std::numeric_limits<long long>::min() && hi == std::numeric_limits<long long>::max(), "--",
                  name, " must be between ", lo, " and ", hi, ", got \"", s, "\"");
      fail("--", name, " got \"", s, "\", which does not fit in a 64-bit integer");
    }
    check_range(name, v, lo, hi);
    return v;
  }
  // An option's finite decimal number within [lo, hi] (no hex, inf or nan).
  double number(const std::string& name, double def, double lo = std::numeric_limits<double>::lowest(),
                double hi = std::numeric_limits<double>::max()) const {
    if (!has(name)) return check_range(name, def, lo, hi, " (the default, or the resumed checkpoint's setting)"), def;
    const std::string& s = values_.at(name);
    const bool decimal = !s.empty() && s.find_first_not_of("+-.0123456789eE") == std::string::npos;
    char* end = nullptr;
    const double v = decimal ? std::strtod(s.c_str(), &end) : 0;
    LIMOE_CHECK(decimal && end && *end == '\0' && std::isfinite(v), "--", name,
                " expects a finite decimal number, got \"", s, "\"");
    check_range(name, v, lo, hi);
    return v;
  }
  const std::vector<std::string>& positional() const { return positional_; }
  void no_positional() const {
    LIMOE_CHECK(positional_.empty(), "unexpected argument \"", positional_.empty() ? "" : positional_[0], "\" (see limoe ",
                command_, " --help)");
  }

 private:
  std::string command_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> all_;
  std::set<std::string> flags_;
  std::vector<std::string> positional_;

  template <class V>
  static void check_range(const std::string& name, V v, V lo, V hi, const char* from = "") {
    if (v >= lo && v <= hi) return;
    if (hi == std::numeric_limits<V>::max()) fail("--", name, " must be at least ", lo, ", got ", v, from);
    if (lo == std::numeric_limits<V>::lowest())
      fail("--", name, " must be at most ", hi, ", got ", v, from);
    fail("--", name, " must be between ", lo, " and ", hi, ", got ", v, from);
  }
};

// --threads N (0 or absent: all cores, oneTBB's default), capped at 4,096, applied to the whole process.
inline void set_threads(const Args& args) {
  set_num_threads(static_cast<int>(args.integer("threads", 0, 0, 4096)));
}

// A sub-command: its one-line summary, its help text and its entry point (returns the exit status).
struct Command {
  std::string name, summary, help;
  std::function<int(const std::vector<std::string>&)> run;
};

// Each sub-command's translation unit registers itself here.
std::vector<Command>& registry();
struct Register {
  explicit Register(Command c) { registry().push_back(std::move(c)); }
};

// --device and --precision, accepted by every sub-command that runs a model (docs/cli.md). --device cuda runs
// the model on the CUDA backend (fp32) when the program was built with the CUDA part and a GPU is there; else
// it is refused with one line saying which, never silently ignored.
// --packed-weights on|off: whether evaluation forwards keep the large weights packed for the product kernels
// (Limoe::set_keep_packed_weights; on by default): faster, and up to the size of those weights again in memory.
inline const std::set<std::string> kBackendOptions = {"device", "precision", "packed-weights"};
#define LIMOE_CLI_BACKEND_HELP                                                                \
  "  --device cpu|cuda    the backend (default cpu); cuda: the whole model on the GPU\n" \
  "  --precision P        fp32 (default) or bf16: the matrix products (attention's included) read bf16\n" \
  "                       operands and accumulate in fp32; routing, softmax, losses and the checkpoint\n" \
  "                       stay fp32 (docs/precision.md)\n" \
  "  --packed-weights on|off  on (default): evaluation forwards keep the large weights packed for the\n" \
  "                       product kernels, faster, at up to their size again in memory (the CPU); off:\n" \
  "                       every product packs inside the call and no copy is kept\n"

// The processes of this run (main.cpp): MPI's world when the program was built with MPI and started by an MPI
// launcher (mpirun), else one process. Only `train` uses more than one rank; the other commands refuse to run
// on several (each rank would write the same outputs).
dist::AnyComm world();
#if defined(LIMOE_CLI_NCCL)
// NCCL over world()'s ranks, on this process's current GPU (cli::with_model picked it): a CUDA model trained on
// several ranks sums its gradient on the device through it (Trainer::sum_gradients_with). Collective; empty on
// every rank (one line on rank 0 says why) when ranks share a GPU, which NCCL refuses.
std::optional<dist::NcclComm> nccl_world();
#endif
inline void require_one_rank(const std::string& command) {
  LIMOE_CHECK(world().size() == 1, "limoe ", command, " runs on one process; mpirun started ", world().size(),
              " (only limoe train uses several)");
}

// What --device and --precision chose.
struct BackendChoice {
  bool cuda = false;
  PrecisionKind precision = PrecisionKind::Fp32;
  bool packed_weights = true;  // --packed-weights
};

// Checks --device and --precision (the GPU itself is checked when a model is made: cli::with_model).
inline BackendChoice check_backend(const Args& args) {
  const std::string device = args.str("device", "cpu"), precision = args.str("precision", "fp32");
  LIMOE_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got \"", device, "\"");
  LIMOE_CHECK(precision == "fp32" || precision == "bf16", "--precision must be fp32 or bf16, got \"", precision, "\"");
#if !defined(LIMOE_CLI_CUDA)
  LIMOE_CHECK(device == "cpu", "--device cuda: this limoe was built without the CUDA part (no CUDA toolkit at "
              "configure time, or LIMOE_CUDA=OFF); use --device cpu");
#endif
  const std::string packed = args.str("packed-weights", "on");
  LIMOE_CHECK(packed == "on" || packed == "off", "--packed-weights must be on or off, got \"", packed, "\"");
  return {device == "cuda", parse_precision(precision), packed == "on"};
}

}  // namespace limoe::cli
