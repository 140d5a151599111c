// nibble — command-line entry point: global options, ISA/thread setup, subcommand dispatch.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fmt/format.h>

#include "command.h"
#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/tensor.h"
#include "nibble/thread_pool.h"
#include "nibble/version.h"

namespace nibble::cli {
GlobalOptions& globals() {
  static GlobalOptions g;
  return g;
}
std::vector<Command>& command_registry() {
  static std::vector<Command> r;
  return r;
}
}  // namespace nibble::cli

int main(int argc, char** argv) {
  using namespace nibble;
  CLI::App app{"nibble — 4-bit quantized linear layers of diffusion transformers (ComfyUI kitchen formats)"};
  app.require_subcommand(0, 1);
  auto& g = cli::globals();
  bool version = false;
  app.add_flag("--version", version, "print version, compiled ISAs and detected CPU features");
  app.add_option("-t,--threads", g.threads, "worker threads (default: all cores; env NIBBLE_NUM_THREADS)");
  app.add_option("--isa", g.isa, "kernel ISA: auto|scalar|avx2|avx512|avx512vnni|avx512bf16 (env NIBBLE_ISA)");
  app.add_flag("-v,--verbose", g.verbose, "more output");
  app.add_flag("-q,--quiet", g.quiet, "less output");
  app.add_flag("--no-progress", g.no_progress, "no progress bar");

  auto cmds = cli::command_registry();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return a.order < b.order; });
  std::vector<std::pair<CLI::App*, cli::RunFn>> runs;
  for (auto& c : cmds) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    runs.emplace_back(sub, c.setup(*sub));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (g.isa != "auto") {
      Isa isa;
      if (!parse_isa(g.isa, &isa)) throw Error(fmt::format("--isa {}: unknown; use auto|scalar|avx2|avx512|avx512vnni|avx512bf16", g.isa));
      set_isa(isa);
    }
    if (g.threads > 0) set_num_threads(g.threads);
    if (version) {
      fmt::print("nibble {}\ncompiled ISAs: {}\ncpu features: {}\nactive ISA: {}\nthreads: {}\nweight streams: {}\n",
                 NIBBLE_VERSION_STRING, compiled_isas_string(), cpu_features_string(), isa_name(active_isa()),
                 num_threads(), weights_hugepage_status());
      return 0;
    }
    for (auto& [sub, run] : runs)
      if (sub->parsed()) return run();
    fmt::print("{}", app.help());
    return 0;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "nibble: error: {}\n", e.what());
    return 1;
  }
}
