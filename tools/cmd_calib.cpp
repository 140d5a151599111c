// `nibble calib DUMP.safetensors... -o STATS.safetensors [--sample-rows 256] [--seed S]`:
// per-input-channel activation statistics for `nibble convert --calib`. Each tensor of a dump is
// named after the layer whose input it holds ((..., K) float rows); the same layer may appear in
// several dumps (statistics accumulate). The sample is a uniform random choice of N rows among all
// rows of all dumps (reservoir sampling), exactly N when there are that many. Layout: docs/convert.md.
#include <fmt/format.h>

#include "command.h"
#include "nibble/convert.h"
#include "nibble/safetensors.h"

namespace nibble::cli {
namespace {

const CommandRegistration kCalib{
    "calib", "compute activation statistics (--calib input of convert) from activation dumps", 21,
    [](CLI::App& app) -> RunFn {
      auto dumps = std::make_shared<std::vector<std::string>>();
      auto out = std::make_shared<std::string>();
      auto rows = std::make_shared<int64_t>(256);
      auto seed = std::make_shared<uint64_t>(0x5eed);
      app.add_option("dumps", *dumps, "safetensors files: tensor name = layer, value = its input activations (..., K)")->required();
      app.add_option("-o,--output", *out, "statistics file to write")->required();
      app.add_option("--sample-rows", *rows, "activation rows kept per layer (uniform sample of all rows) for the smoothing search")
          ->capture_default_str()->check(CLI::NonNegativeNumber);
      app.add_option("--seed", *seed, "seed of the row sample")->capture_default_str();
      return [dumps, out, rows, seed]() {
        CalibAccumulator acc(*rows, *seed);
        size_t n = 0;
        for (const auto& d : *dumps) {
          auto f = SafetensorsFile::open(d);
          for (const auto& t : f->tensors()) {
            acc.add(t.name, f->get(t.name));
            ++n;
          }
        }
        acc.save(*out);
        if (!globals().quiet) {
          const auto st = acc.finish();
          fmt::print("wrote {} ({} activation tensors, {} layers)\n", *out, n, st.size());
          for (const auto& [layer, s] : st) {
            const int64_t kept = s.sample.defined() ? s.sample.size(0) : 0;
            fmt::print("  {:<60} {:>8} rows seen, {:>5} sampled{}\n", layer, acc.rows_seen(layer), kept,
                       kept < *rows ? " (all rows there were)" : "");
          }
        }
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
