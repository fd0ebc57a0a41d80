// tools/limoe/main.cpp: `limoe <sub-command> [options]`. Every failure is one line on stderr and exit status
// 2 (bad input) or 1 (anything else); no sub-command leaves a half-written output file.
#include <algorithm>
#include <csignal>
#include <array>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "cli.hpp"

#include <limoe/dist/launcher.hpp>

#if defined(LIMOE_HAVE_MPI)
#include <memory>
#include <optional>
#include <set>
#include <span>

#include <unistd.h>

#include <limoe/dist/mpi.hpp>
#endif

namespace limoe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}

#if defined(LIMOE_HAVE_MPI)
// MPI is initialised only when an MPI launcher started the program: a plain run never touches it.
std::unique_ptr<dist::MpiSession>& mpi_session() {
  static std::unique_ptr<dist::MpiSession> session;
  return session;
}
dist::AnyComm world() {
  if (mpi_session()) return dist::AnyComm(mpi_session()->world());
  return dist::AnyComm{};
}
#else
dist::AnyComm world() { return dist::AnyComm{}; }
#endif
#if defined(LIMOE_CLI_NCCL)
std::optional<dist::NcclComm> nccl_world() {
  LIMOE_CHECK(mpi_session() != nullptr, "NCCL needs the ranks of an MPI launcher (mpirun)");
  int device = 0;
  LIMOE_CHECK(cudaGetDevice(&device) == cudaSuccess, "NCCL: no current CUDA device");
  dist::MpiComm w = mpi_session()->world();
  // NCCL takes one rank per GPU: where two ranks share one (more ranks than GPUs on a machine), every rank
  // learns it from the same gathered table and the trainer keeps the staged sum.
  std::array<char, 160> me{};  // host name, then the GPU's PCI bus id
  gethostname(me.data(), 127);
  if (cudaDeviceGetPCIBusId(me.data() + 128, 32, device) != cudaSuccess) std::snprintf(me.data() + 128, 32, "device %d", device);
  std::vector<char> all(me.size() * static_cast<std::size_t>(w.size()));
  dist::all_gather(w, std::span<const char>(me), std::span<char>(all));
  std::set<std::string> gpus;
  for (int r = 0; r < w.size(); ++r) {
    const char* p = all.data() + static_cast<std::size_t>(r) * me.size();
    gpus.insert(std::string(p, strnlen(p, 128)) + "/" + std::string(p + 128, strnlen(p + 128, 32)));
  }
  if (gpus.size() != static_cast<std::size_t>(w.size())) {
    if (w.rank() == 0)
      std::cerr << "limoe: " << w.size() << " ranks share " << gpus.size() << " GPU(s); NCCL needs one rank per GPU: "
                << "the gradient is summed through host memory\n";
    return std::nullopt;
  }
  return dist::NcclComm(w, device);
}
#endif
}  // namespace limoe::cli

namespace {
// A failure is reported on one line: control characters a message carries (a path or an argument holding a
// newline, quoted into it) are written as escapes, and a backslash as two, so that an escape and a name that
// holds a backslash cannot be told apart.
std::string one_line(const std::string& s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) out += std::string("\\x") + hex[c >> 4] + hex[c & 15];
    else out += ch;
  }
  return out;
}

void usage(std::ostream& os) {
  auto commands = limoe::cli::registry();
  std::sort(commands.begin(), commands.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  os << "usage: limoe <command> [options]   (limoe <command> --help for its options)\n\ncommands:\n";
  for (const auto& c : commands) os << "  " << c.name << std::string(10 - std::min<std::size_t>(9, c.name.size()), ' ') << c.summary << "\n";
}
}  // namespace

// A failure on one rank of several ends every rank (MPI_Abort) with its message and exit status: none waits
// in a collective.
[[noreturn]] void fail_all_ranks(const std::string& message, int code) {
#if defined(LIMOE_HAVE_MPI)
  limoe::dist::MpiSession::abort(message, code);
#else
  std::cerr << message << "\n";
  std::exit(code);
#endif
}


int main(int argc, char** argv) {
#if defined(LIMOE_HAVE_MPI)
  if (limoe::dist::MpiSession::launched()) limoe::cli::mpi_session() = std::make_unique<limoe::dist::MpiSession>(&argc, &argv);
#endif
  const bool many = limoe::cli::world().size() > 1;
  if (!many && limoe::dist::launcher_processes() > 1) {  // e.g. mpirun with a limoe built without MPI: every process alone
    std::cerr << "limoe: an MPI launcher started " << limoe::dist::launcher_processes() << " processes, but this limoe "
#if defined(LIMOE_HAVE_MPI)
              << "sees one (its MPI differs from the launcher's)"
#else
              << "was built without MPI (install libopenmpi-dev and rebuild)"
#endif
              << "; each would train alone and overwrite the others' files\n";
    return 2;
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    usage(args.empty() ? std::cerr : std::cout);
    return args.empty() ? 2 : 0;
  }
  const auto& commands = limoe::cli::registry();
  auto it = std::find_if(commands.begin(), commands.end(), [&](const auto& c) { return c.name == args[0]; });
  if (it == commands.end()) {
    std::cerr << "limoe: unknown command \"" << one_line(args[0]) << "\" (limoe --help lists the commands)\n";
    return 2;
  }
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (std::find(rest.begin(), rest.end(), "--help") != rest.end() || std::find(rest.begin(), rest.end(), "-h") != rest.end()) {
    std::cout << it->help;
    return 0;
  }
  try {
    const int rc = it->run(rest);
#if defined(LIMOE_HAVE_MPI)
    limoe::cli::mpi_session().reset();  // MPI_Finalize before static destructors
#endif
    if (const int sig = limoe::cli::pending_signal(); sig != 0) {  // end as the signal would have (exit 128 + sig)
      std::cerr.flush();
      std::cout.flush();
      std::signal(sig, SIG_DFL);
      std::raise(sig);
    }
    return rc;
  } catch (const limoe::Error& e) {
    if (many) fail_all_ranks("limoe " + it->name + ": " + one_line(e.what()), 2);
    std::cerr << "limoe " << it->name << ": " << one_line(e.what()) << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    if (many) fail_all_ranks("limoe " + it->name + ": out of memory", 1);
    std::cerr << "limoe " << it->name << ": out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    if (many) fail_all_ranks("limoe " + it->name + ": " + one_line(e.what()), 1);
    std::cerr << "limoe " << it->name << ": " << one_line(e.what()) << "\n";
    return 1;
  }
}
