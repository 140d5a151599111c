// tools/command.h — how a subcommand plugs into the `nibble` CLI.
//
// Each tools/cmd_<name>.cpp defines one static CommandRegistration; main() builds the CLI11 app
// from all of them. A command's `setup` adds its options to its subcommand and returns the
// function that runs it (returning the process exit code).
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace nibble::cli {

struct GlobalOptions {
  int threads = 0;          // -t/--threads (0 = default)
  std::string isa = "auto"; // --isa
  bool verbose = false, quiet = false, no_progress = false;
};
GlobalOptions& globals();

using RunFn = std::function<int()>;
struct Command {
  std::string name, help;
  int order;  // position in --help
  std::function<RunFn(CLI::App&)> setup;
};
std::vector<Command>& command_registry();

struct CommandRegistration {
  CommandRegistration(std::string name, std::string help, int order, std::function<RunFn(CLI::App&)> setup) {
    command_registry().push_back({std::move(name), std::move(help), order, std::move(setup)});
  }
};

}  // namespace nibble::cli
