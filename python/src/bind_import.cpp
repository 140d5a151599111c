// nibble.import_checkpoint / nibble.apply_loras: the importers (nibble/import.h) and LoRA baking
// (nibble/lora.h), mirroring `nibble import` and `nibble lora`. Both run with the GIL released and
// write atomically; the report comes back as JSON text (parsed by nibble/__init__.py).
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <nlohmann/json.hpp>

#include "bindings.h"
#include "nibble/import.h"
#include "nibble/lora.h"

namespace nibble_py {

void bind_import(nb::module_& m) {
  m.def(
      "import_checkpoint",
      [](const std::string& format, const std::string& in, const std::string& out, int64_t group_size,
         int64_t out_group_size, const std::string& scale_dtype, const std::string& arch, int64_t hidden,
         bool mod_scale_shift, const std::string& flux_linear2) {
        nibble::ImportOptions o;
        o.format = format;
        o.group_size = group_size;
        o.out_group_size = out_group_size;
        o.scale_dtype = scale_dtype;
        o.arch = arch;
        o.hidden = hidden;
        o.mod_scale_shift = mod_scale_shift;
        o.flux_linear2 = flux_linear2;
        nb::gil_scoped_release unlocked;
        return nibble::import_report_json(nibble::import_checkpoint(in, out, o));
      },
      nb::arg("format"), nb::arg("input"), nb::arg("output"), nb::arg("group_size") = 0, nb::arg("out_group_size") = 0,
      nb::arg("scale_dtype") = "", nb::arg("arch") = "", nb::arg("hidden") = 0, nb::arg("mod_scale_shift") = true,
      nb::arg("flux_linear2") = "svdquant");
  m.def(
      "apply_loras",
      [](const std::string& ckpt, const std::vector<std::pair<std::string, float>>& loras, const std::string& out,
         bool partial) {
        std::vector<nibble::LoraSpec> specs;
        for (const auto& [f, s] : loras) specs.push_back({f, s});
        std::vector<std::string> unmatched;
        nibble::LoraApplyStats st;
        {
          nb::gil_scoped_release unlocked;
          st = nibble::apply_loras_to_checkpoint(ckpt, specs, out, partial, &unmatched);
        }
        nlohmann::ordered_json j;
        j["layers"] = st.layers;
        j["svdquant_layers"] = st.svdquant_layers;
        j["awq_layers"] = st.awq_layers;
        j["float_layers"] = st.float_layers;
        j["max_rank_before"] = st.max_rank_before;
        j["max_rank_after"] = st.max_rank_after;
        j["awq_max_rel_error"] = st.awq_max_rel_error;
        j["awq_max_rel_delta"] = st.awq_max_rel_delta;
        j["unmatched"] = unmatched;
        return j.dump();
      },
      nb::arg("ckpt"), nb::arg("loras"), nb::arg("output"), nb::arg("partial") = false);
}

}  // namespace nibble_py
