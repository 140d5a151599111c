// `nibble inspect FILE|DIR|INDEX [--json] [--filter REGEX]`: one line per quantized layer and a
// summary (bytes by format; float layers a kitchen format could hold). Binds every layer, so any
// invalid file or layer ends with a non-zero exit and a message naming it.
#include <fmt/format.h>

#include "command.h"
#include "nibble/convert.h"
#include "nibble/inspect.h"
#include "nibble/safetensors.h"

namespace nibble::cli {
namespace {

struct InspectOptions {
  std::string path, filter;
  bool json = false;
};

const CommandRegistration kInspect{
    "inspect", "list the quantized layers of a checkpoint (file, directory of shards, or index)", 10,
    [](CLI::App& app) -> RunFn {
      auto opt = std::make_shared<InspectOptions>();
      app.add_option("path", opt->path, "a .safetensors file, a *.safetensors.index.json, or a directory of shards")
          ->required();
      app.add_flag("--json", opt->json, "print one JSON document instead of the table");
      app.add_option("--filter", opt->filter, "only layers whose name matches this regular expression");
      return [opt]() {
        const Checkpoint ckpt = Checkpoint::open(opt->path);
        const InspectReport rep = inspect_checkpoint(ckpt, opt->filter);
        fmt::print("{}", opt->json ? inspect_json(rep) : inspect_text(rep));
        if (!opt->json) {  // which converter preset fits (names checked against ComfyUI's model code)
          int64_t n = 0;
          const std::string preset = detect_preset(ckpt, &n);
          if (!preset.empty())
            fmt::print("suggested: nibble convert {} -o OUT --preset {}   ({} linear layers would be quantized)\n",
                       opt->path, preset, n);
        }
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
