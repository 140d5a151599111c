// `nibble import FORMAT IN -o OUT`: AutoAWQ (GEMM) and nunchaku SVDQuant INT4 checkpoints →
// kitchen-native awq_w4a16 / svdquant_w4a4, without requantizing (nibble/import.h, docs/import.md).
#include <fstream>

#include <fmt/format.h>

#include "command.h"
#include "nibble/import.h"

namespace nibble::cli {
namespace {

const CommandRegistration kImport{
    "import", "import AutoAWQ / nunchaku int4 checkpoints into kitchen-native formats (codes copied, not requantized)", 22,
    [](CLI::App& app) -> RunFn {
      struct Args {
        std::string in, out, json;
        ImportOptions o;
        bool keep_shift = false;
      };
      auto a = std::make_shared<Args>();
      app.add_option("format", a->o.format, "autoawq | nunchaku")->required();
      app.add_option("in", a->in, "input .safetensors file (or shard directory / index)")->required();
      app.add_option("-o,--output", a->out, "output .safetensors file")->required();
      app.add_option("--group-size", a->o.group_size, "autoawq: source group size (default: config.json next to IN, else shapes)");
      app.add_option("--out-group-size", a->o.out_group_size,
                     "autoawq: output group size (default 64 when the source group is a multiple of 64: exact)");
      app.add_option("--scale-dtype", a->o.scale_dtype, "autoawq: bf16|f16 for weight_scale/weight_zeros (default: the source's)");
      app.add_option("--arch", a->o.arch, "nunchaku: qwen-image | flux (default: detected from the names)");
      app.add_option("--hidden", a->o.hidden, "nunchaku: model width D (default: metadata config, else img_in rows)");
      app.add_flag("--keep-mod-scale-shift", a->keep_shift,
                   "nunchaku: keep the +1 folded into the modulation scale chunks' bias (default: subtract it, ComfyUI adds it)");
      app.add_option("--flux-linear2", a->o.flux_linear2,
                     "nunchaku FLUX: single blocks' linear2 = [out_proj | mlp_fc2] as svdquant (default: int4, the mlp part's "
                     "activations requantized signed) or bf16 (dense effective weight, ~2.5 GB larger for FLUX.1)");
      app.add_option("--json", a->json, "write a JSON report");
      return [a]() {
        ImportOptions o = a->o;
        o.mod_scale_shift = !a->keep_shift;
        ImportReport r = import_checkpoint(a->in, a->out, o);
        if (!globals().quiet) {
          for (const auto& l : r.layers)
            fmt::print("{:<60} {:<14} {:>6}x{:<6} {}{}\n", l.name, l.format, l.N, l.K,
                       l.R ? fmt::format("R={} ", l.R) : fmt::format("G={} ", l.group_size), l.note);
          fmt::print("imported {} layers ({} {}), {} tensors copied, {} tensors written → {} ({} bytes)\n", r.layers.size(),
                     r.format, r.arch, r.tensors_copied, r.tensors_written, a->out, r.file_size);
          for (const auto& n : r.notes) fmt::print("note: {}\n", n);
          if (r.zeros.total)
            fmt::print("awq zeros z′: {} of {} rounded when stored (max |Δ| {:.3g} = {:.3g} of the group's scale); exact in fp32\n",
                       r.zeros.rounded, r.zeros.total, r.zeros.max_abs, r.zeros.max_rel_scale);
        }
        if (!a->json.empty()) std::ofstream(a->json) << import_report_json(r) << "\n";
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
