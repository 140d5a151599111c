// `nibble bench --op awq|w4a4|block [--json] [-r N] [--quick]`
#include <fmt/format.h>

#include "bench_registry.h"
#include "command.h"
#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {

std::vector<BenchOp>& bench_registry() {
  static std::vector<BenchOp> r;
  return r;
}

namespace {
const CommandRegistration reg("bench", "benchmark the kernels against baselines, peers and the machine's limits", 50,
                              [](CLI::App& app) -> RunFn {
  struct Opts { std::vector<std::string> ops; BenchOptions b; };
  auto o = std::make_shared<Opts>();
  app.add_option("--op", o->ops, "what to measure (repeatable; default: all)");
  app.add_flag("--json", o->b.json, "print a JSON array of records");
  app.add_option("-r,--repeats", o->b.repeats, "timed repetitions per case (median reported)");
  app.add_option("--shapes", o->b.shapes, "override the shape list (op specific)");
  app.add_flag("--quick", o->b.quick, "small smoke run");
  return [o]() -> int {
    auto& reg = bench_registry();
    std::vector<std::string> names;
    for (auto& b : reg) names.push_back(b.name);
    std::vector<std::string> ops = o->ops.empty() ? names : o->ops;
    if (!o->b.json)
      fmt::print("# isa={} threads={} (compiled: {})\n", isa_name(active_isa()), num_threads(), compiled_isas_string());
    int rc = 0;
    for (auto& want : ops) {
      const BenchOp* op = nullptr;
      for (auto& b : reg)
        if (b.name == want) op = &b;
      if (!op) throw Error(fmt::format("unknown bench op '{}'; available: {}", want, fmt::join(names, ", ")));
      rc |= op->run(o->b);
    }
    return rc;
  };
});
}  // namespace
}  // namespace nibble::cli
