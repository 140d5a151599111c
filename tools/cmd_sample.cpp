// `nibble sample OUT.safetensors [--hidden 256] [--rank 16] [--seed N] [--prefix P] [--metadata]`:
// writes the small seeded kitchen-style checkpoint of nibble/sample.h (every format, both key
// spellings, a tile-packed layer, float candidates) for demos and the Python tests.
#include <fmt/format.h>

#include "command.h"
#include "nibble/sample.h"

namespace nibble::cli {
namespace {

const CommandRegistration kSample{
    "sample", "write a small seeded kitchen-style checkpoint holding every format", 90,
    [](CLI::App& app) -> RunFn {
      auto path = std::make_shared<std::string>();
      auto opt = std::make_shared<SampleOptions>();
      app.add_option("out", *path, "output .safetensors path")->required();
      app.add_option("--hidden", opt->hidden, "hidden size D (multiple of 128)")->capture_default_str();
      app.add_option("--rank", opt->rank, "svdquant low-rank R")->capture_default_str();
      app.add_option("--seed", opt->seed, "random seed")->capture_default_str();
      app.add_option("--prefix", opt->prefix, "prefix of every tensor name, e.g. model.diffusion_model.");
      app.add_flag("--metadata", opt->configs_in_metadata,
                   "store configs in __metadata__[\"_quantization_metadata\"] instead of .comfy_quant tensors");
      return [path, opt]() {
        write_sample_checkpoint(*path, *opt);
        if (!globals().quiet) fmt::print("wrote {}\n", *path);
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
