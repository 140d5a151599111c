// tools/bench_registry.h — `nibble bench --op NAME` entries. Each tools/bench_<op>.cpp registers one.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace nibble::cli {

struct BenchOptions {
  bool json = false;     // --json: one JSON array of records on stdout
  int repeats = 5;       // -r
  std::string shapes;    // --shapes "M,K,N;..." (op specific; empty = the default set)
  bool quick = false;    // --quick: fewer/smaller shapes (smoke run)
};
struct BenchOp {
  std::string name, help;
  std::function<int(const BenchOptions&)> run;
};
std::vector<BenchOp>& bench_registry();
struct BenchRegistration {
  BenchRegistration(std::string name, std::string help, std::function<int(const BenchOptions&)> run) {
    bench_registry().push_back({std::move(name), std::move(help), std::move(run)});
  }
};

}  // namespace nibble::cli
