// key_style.cpp — the spelling of the svdquant side tensors in a converted checkpoint (spec §2.2, §3.7).
//
// "comfyui" (default): the names ComfyUI's loaders read — awq `weight_zeros` (upstream ComfyUI), svdquant
// `smooth_factor` / `proj_down` / `proj_up` (the ComfyUI PR #13580 loader, comfy-quants' converter).
// "kitchen": comfy-kitchen's serializer spelling (`state_dict_tensors`, what a ComfyUI save writes) —
// svdquant `weight_smooth_factor` / `weight_proj_down` / `weight_proj_up`; awq keeps `weight_zeros` (the
// serializer's spelling too). nibble and the nibble ComfyUI node pack read both.
#include <fmt/format.h>

#include "convert/convert_internal.h"

namespace nibble::convert_detail {

void apply_key_style(FullPlan& fp, const std::string& style) {
  if (style.empty() || style == "comfyui") return;
  if (style != "kitchen")
    throw Error(fmt::format("convert: key style '{}': expected comfyui (smooth_factor, proj_down, proj_up) or "
                            "kitchen (weight_smooth_factor, weight_proj_down, weight_proj_up)", style));
  for (auto& ot : fp.outputs) {
    if (ot.job < 0 || fp.jobs[size_t(ot.job)].format != "svdquant_w4a4") continue;
    if (ot.key != "smooth_factor" && ot.key != "proj_down" && ot.key != "proj_up") continue;
    const std::string suffix = "." + ot.key;
    if (ot.name.size() < suffix.size() || ot.name.compare(ot.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      throw Error(fmt::format("convert: internal error: output {} does not end in {}", ot.name, suffix));
    ot.name = ot.name.substr(0, ot.name.size() - suffix.size()) + ".weight_" + ot.key;
  }
}

}  // namespace nibble::convert_detail
