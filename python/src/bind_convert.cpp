// nibble.convert: the checkpoint converter (nibble/convert.h), mirroring `nibble convert`.
//
// Runs with the GIL released; an optional Python progress callback is called (with the GIL) from
// the writing thread in output order, and an exception it raises aborts the conversion (the
// atomic writer then leaves nothing at the target). Returns the report as the CLI's --json
// document text (parsed into a dict by nibble/__init__.py); with dry_run, the plan.
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "convert_arrays.h"
#include "nibble/convert.h"

namespace nibble_py {

namespace {

nibble::SvdMethod parse_svd(const std::string& s) {
  if (s == "randomized") return nibble::SvdMethod::Randomized;
  if (s == "exact") return nibble::SvdMethod::Exact;
  throw nibble::Error("convert: svd must be 'randomized' or 'exact', got '" + s + "'");
}

nb::dict plan_dict(const nibble::ConvertPlan& plan) {
  nb::dict d;
  nb::list layers;
  for (const auto& l : plan.layers) {
    nb::dict e;
    e["name"] = l.name;
    e["format"] = l.format;
    e["out_features"] = l.N;
    e["in_features"] = l.K;
    e["source_dtype"] = l.source_dtype;
    e["bytes_before"] = l.bytes_before;
    e["bytes_after"] = l.bytes_after;
    e["group"] = l.group;
    e["rule"] = l.rule;
    e["act_unsigned"] = l.act_unsigned;
    e["calib"] = l.calib_key;
    nb::dict o;
    for (const auto& [k, v] : l.opts) o[k.c_str()] = v;
    e["opts"] = o;
    layers.append(e);
  }
  d["layers"] = layers;
  d["linear_layers_found"] = plan.linear_layers;
  d["linear_layers_kept"] = plan.kept_layers;
  nb::list skipped;
  for (const auto& s : plan.skipped) {
    nb::dict e;
    e["name"] = s.name;
    e["reason"] = s.reason;
    skipped.append(e);
  }
  d["skipped"] = skipped;
  d["warnings"] = plan.warnings;
  d["notes"] = plan.notes;
  d["tensors_total"] = plan.tensors_total;
  d["passthrough_tensors"] = plan.passthrough_tensors;
  d["bytes_in"] = plan.bytes_in;
  d["bytes_out"] = plan.bytes_out;
  d["file_size"] = plan.file_size;
  return d;
}

nb::object convert(const std::string& in, const std::optional<std::string>& out,
                   const std::optional<std::string>& format, const std::string& preset,
                   const std::vector<std::string>& rules, const std::vector<std::string>& exclude,
                   int64_t rank, int64_t group_size, bool tile, const std::string& svd, int refine,
                   const std::optional<std::string>& calib, bool allow_requantize,
                   uint64_t mem_budget, uint64_t shard_size, int threads, bool dry_run,
                   nb::object progress, const std::vector<std::string>& share, bool strict, bool force,
                   bool gptq) {
  nibble::ConvertOptions o;
  o.preset = preset;
  for (const auto& r : rules) o.rules.push_back(nibble::parse_convert_rule(r));
  if (format) o.rules.push_back(nibble::parse_convert_rule(".*=" + *format));
  o.exclude = exclude;
  o.rank = rank;
  o.group_size = group_size;
  o.tile_layout = tile;
  o.svd = parse_svd(svd);
  o.refine_iterations = refine;
  if (calib) o.calib_path = *calib;
  o.allow_requantize = allow_requantize;
  if (mem_budget) o.mem_budget = mem_budget;
  o.shard_size = shard_size;
  o.threads = threads;
  o.share = share;
  o.strict = strict;
  o.force = force;
  o.gptq = gptq;
  if (dry_run) {
    nibble::ConvertPlan plan;
    {
      nb::gil_scoped_release unlocked;
      plan = nibble::plan_conversion(in, o);
    }
    return plan_dict(plan);
  }
  if (!out) throw nibble::Error("convert: an output path is required (or dry_run=True)");
  std::function<void(const nibble::ConvertProgress&)> cb;
  if (!progress.is_none()) {
    cb = [progress](const nibble::ConvertProgress& p) {
      nb::gil_scoped_acquire locked;
      nb::dict d;
      d["index"] = p.index;
      d["total"] = p.total;
      d["name"] = p.name;
      d["format"] = p.format;
      d["shape"] = std::vector<int64_t>(p.shape);
      d["bytes_before"] = p.bytes_before;
      d["bytes_after"] = p.bytes_after;
      d["bytes_done"] = p.bytes_done;
      d["bytes_total"] = p.bytes_total;
      d["rel_error"] = p.rel_error;
      d["elapsed_seconds"] = p.elapsed_seconds;
      progress(d);
    };
  }
  std::string json;
  {
    nb::gil_scoped_release unlocked;
    json = nibble::convert_report_json(nibble::convert_checkpoint(in, *out, o, cb));
  }
  return nb::str(json.c_str(), json.size());
}

}  // namespace

void bind_convert(nb::module_& m) {
  m.def("convert", &convert, nb::arg("input"), nb::arg("output").none() = nb::none(),
        nb::arg("format").none() = nb::none(), nb::arg("preset") = "",
        nb::arg("rules") = std::vector<std::string>{}, nb::arg("exclude") = std::vector<std::string>{},
        nb::arg("rank") = 32, nb::arg("group_size") = 64, nb::arg("tile") = false,
        nb::arg("svd") = "randomized", nb::arg("refine") = 2, nb::arg("calib").none() = nb::none(),
        nb::arg("allow_requantize") = false, nb::arg("mem_budget") = 0, nb::arg("shard_size") = 0,
        nb::arg("threads") = 0, nb::arg("dry_run") = false, nb::arg("progress").none() = nb::none(),
        nb::arg("share") = std::vector<std::string>{}, nb::arg("strict") = false, nb::arg("force") = false,
        nb::arg("gptq") = false);
}

}  // namespace nibble_py
