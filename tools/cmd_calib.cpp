// `nibble calib DUMP.safetensors... -o STATS.safetensors [--sample-rows 16]`: per-input-channel
// activation statistics for `nibble convert --calib`. Each tensor of a dump is named after the
// layer whose input it holds ((..., K) float rows); the same layer may appear in several dumps
// (statistics accumulate). Output layout: docs/convert.md.
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
      auto rows = std::make_shared<int64_t>(16);
      app.add_option("dumps", *dumps, "safetensors files: tensor name = layer, value = its input activations (..., K)")->required();
      app.add_option("-o,--output", *out, "statistics file to write")->required();
      app.add_option("--sample-rows", *rows, "activation rows kept per layer for the smoothing search")->capture_default_str();
      return [dumps, out, rows]() {
        CalibAccumulator acc;
        size_t n = 0;
        for (const auto& d : *dumps) {
          auto f = SafetensorsFile::open(d);
          for (const auto& t : f->tensors()) {
            acc.add(t.name, f->get(t.name));
            ++n;
          }
        }
        acc.save(*out, *rows);
        if (!globals().quiet) fmt::print("wrote {} ({} activation tensors)\n", *out, n);
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
