// `nibble lora CKPT LORA[:STRENGTH]... -o OUT [--partial]`: bake LoRAs into an int4 (or float)
// checkpoint — svdquant_w4a4 layers grow their low-rank branch exactly, awq_w4a16 layers are
// requantized, float layers merged (nibble/lora.h, docs/lora.md).
#include <fmt/format.h>

#include "command.h"
#include "nibble/lora.h"

namespace nibble::cli {
namespace {

const CommandRegistration kLora{
    "lora", "apply LoRAs to a kitchen-native int4 checkpoint (svdquant: exact, in the low-rank branch)", 23,
    [](CLI::App& app) -> RunFn {
      struct Args {
        std::string ckpt, out;
        std::vector<std::string> loras;
        bool partial = false;
      };
      auto a = std::make_shared<Args>();
      app.add_option("ckpt", a->ckpt, "kitchen-native checkpoint (.safetensors, index or shard directory)")->required();
      app.add_option("loras", a->loras, "LoRA files, each FILE[:STRENGTH] (default strength 1)")->required();
      app.add_option("-o,--output", a->out, "output .safetensors file")->required();
      app.add_flag("--partial", a->partial, "skip LoRA modules that match no layer (warn) instead of failing");
      return [a]() {
        std::vector<LoraSpec> specs;
        for (const auto& s : a->loras) specs.push_back(parse_lora_spec(s));
        std::vector<std::string> unmatched;
        LoraApplyStats st = apply_loras_to_checkpoint(a->ckpt, specs, a->out, a->partial, &unmatched);
        for (const auto& u : unmatched) fmt::print(stderr, "warning: LoRA module matches no layer, skipped: {}\n", u);
        if (!globals().quiet) {
          fmt::print("applied {} LoRA(s) to {} layers: {} svdquant_w4a4 (rank {} → {}, no requantization), {} awq_w4a16 "
                     "(requantized; max weight error {:.4f} of ‖W‖ = {:.2f} of ‖ΔW‖), {} float → {}\n",
                     specs.size(), st.layers, st.svdquant_layers, st.max_rank_before, st.max_rank_after, st.awq_layers,
                     st.awq_max_rel_error, st.awq_max_rel_delta, st.float_layers, a->out);
        }
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
