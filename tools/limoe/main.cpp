// tools/limoe/main.cpp: `limoe <sub-command> [options]`. Every failure is one line on stderr and exit status
// 2 (bad input) or 1 (anything else); no sub-command leaves a half-written output file.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "cli.hpp"

namespace limoe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}
}  // namespace limoe::cli

namespace {
void usage(std::ostream& os) {
  auto commands = limoe::cli::registry();
  std::sort(commands.begin(), commands.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  os << "usage: limoe <command> [options]   (limoe <command> --help for its options)\n\ncommands:\n";
  for (const auto& c : commands) os << "  " << c.name << std::string(10 - std::min<std::size_t>(9, c.name.size()), ' ') << c.summary << "\n";
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    usage(args.empty() ? std::cerr : std::cout);
    return args.empty() ? 2 : 0;
  }
  const auto& commands = limoe::cli::registry();
  auto it = std::find_if(commands.begin(), commands.end(), [&](const auto& c) { return c.name == args[0]; });
  if (it == commands.end()) {
    std::cerr << "limoe: unknown command \"" << args[0] << "\" (limoe --help lists the commands)\n";
    return 2;
  }
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (std::find(rest.begin(), rest.end(), "--help") != rest.end() || std::find(rest.begin(), rest.end(), "-h") != rest.end()) {
    std::cout << it->help;
    return 0;
  }
  try {
    return it->run(rest);
  } catch (const limoe::Error& e) {
    std::cerr << "limoe " << it->name << ": " << e.what() << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "limoe " << it->name << ": out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "limoe " << it->name << ": " << e.what() << "\n";
    return 1;
  }
}
