// QuantConfig: the per-layer JSON of spec §4.1 (`<layer>.comfy_quant`, `_quantization_metadata`).
//
// Parsing is strict about types (a field of the wrong JSON type is an error naming the layer and
// the field, never a silent default) and lenient about unknown fields (kept in `json`, since
// converters add informational keys). JSON `null` counts as absent. The convrot/group keys may also
// sit in a nested "params" object (spec §4.1); a top-level key wins over the nested one.
// Duplicate keys are rejected (nlohmann's plain parse would silently keep the last one).
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "io/json_strict.h"
#include "nibble/formats.h"

namespace nibble {

namespace {

using nlohmann::json;

struct FieldReader {
  const json& top;
  const json* params;  // nested "params" object or nullptr
  const std::string& layer;

  // The value of `key` (top level first, then params); nullptr when absent or null.
  // `*where` receives the spelled path for error messages.
  const json* find(const char* key, bool allow_params, std::string* where) const {
    auto it = top.find(key);
    if (it != top.end() && !it->is_null()) {
      *where = key;
      return &*it;
    }
    if (allow_params && params) {
      auto jt = params->find(key);
      if (jt != params->end() && !jt->is_null()) {
        *where = std::string("params.") + key;
        return &*jt;
      }
    }
    return nullptr;
  }
  [[noreturn]] void type_error(const std::string& where, const char* expected, const json& v) const {
    throw Error(fmt::format("layer '{}': comfy_quant field '{}': expected {}, got {} ({})", layer, where, expected,
                            v.type_name(), v.dump()));
  }
  std::optional<std::string> str(const char* key, bool allow_params = false) const {
    std::string where;
    const json* v = find(key, allow_params, &where);
    if (!v) return std::nullopt;
    if (!v->is_string()) type_error(where, "a string", *v);
    return v->get<std::string>();
  }
  // Booleans: true/false, or the integers 0/1 (Python writers sometimes emit those; Python reads them
  // as truthy/falsy).
  std::optional<bool> boolean(const char* key, bool allow_params = false) const {
    std::string where;
    const json* v = find(key, allow_params, &where);
    if (!v) return std::nullopt;
    if (v->is_boolean()) return v->get<bool>();
    if (v->is_number_integer() && (v->get<int64_t>() == 0 || v->get<int64_t>() == 1)) return v->get<int64_t>() == 1;
    type_error(where, "a boolean", *v);
  }
  // Integers: JSON integers, or floats with an integral value (e.g. 64.0).
  std::optional<int64_t> integer(const char* key, bool allow_params = false) const {
    std::string where;
    const json* v = find(key, allow_params, &where);
    if (!v) return std::nullopt;
    // An unsigned JSON integer above INT64_MAX must not wrap to a negative value.
    if (v->is_number_unsigned()) {
      if (v->get<uint64_t>() <= uint64_t(INT64_MAX)) return int64_t(v->get<uint64_t>());
    } else if (v->is_number_integer()) {
      return v->get<int64_t>();
    }
    if (v->is_number_float()) {
      const double d = v->get<double>();
      // Range first: converting an out-of-range double to int64 is undefined behaviour.
      if (d >= -9.0e15 && d <= 9.0e15 && d == double(int64_t(d))) return int64_t(d);
    }
    type_error(where, "an integer", *v);
  }
};

}  // namespace

QuantConfig QuantConfig::parse(std::string_view json_text, const std::string& layer) {
  const std::string what = fmt::format("layer '{}': comfy_quant", layer);
  if (!io::is_valid_utf8(json_text))
    throw Error(fmt::format("{}: not valid UTF-8 (byte {})", what, io::find_invalid_utf8(json_text)));
  nlohmann::json j = io::parse_json_strict(json_text, what, 8);
  if (!j.is_object())
    throw Error(fmt::format("{}: expected a JSON object, got {}", what, j.type_name()));

  const nlohmann::json* params = nullptr;
  if (auto it = j.find("params"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      throw Error(fmt::format("{} field 'params': expected an object, got {}", what, it->type_name()));
    params = &*it;
  }
  FieldReader r{j, params, layer};

  QuantConfig c;
  auto fmt_name = r.str("format");
  if (!fmt_name)
    throw Error(fmt::format("{}: the required field 'format' is missing (JSON: {}); supported formats: {}", what,
                            std::string(json_text.substr(0, 200)), supported_format_names()));
  c.format = *fmt_name;
  c.group_size = r.integer("group_size", true);
  c.act_unsigned = r.boolean("act_unsigned");
  c.layout = r.str("layout").value_or("");
  c.lowrank_branch_input_basis = r.str("lowrank_branch_input_basis").value_or("");
  c.proj_down_smooth_folded = r.boolean("proj_down_smooth_folded");
  c.full_precision_matrix_mult = r.boolean("full_precision_matrix_mult").value_or(false);
  c.convrot = r.boolean("convrot", true).value_or(false);
  c.convrot_groupsize = r.integer("convrot_groupsize", true).value_or(256);
  c.per_row = r.boolean("per_row", true);
  c.linear_dtype = r.str("linear_dtype", true).value_or("");
  c.num_experts = r.integer("num_experts");
  if (c.group_size && *c.group_size <= 0)
    throw Error(fmt::format("{} field 'group_size': expected a positive integer, got {}", what, *c.group_size));
  if (c.convrot_groupsize <= 0)
    throw Error(fmt::format("{} field 'convrot_groupsize': expected a positive integer, got {}", what,
                            c.convrot_groupsize));
  if (c.num_experts && *c.num_experts <= 0)
    throw Error(fmt::format("{} field 'num_experts': expected a positive integer, got {}", what, *c.num_experts));
  c.json = std::string(json_text);
  return c;
}

std::string QuantConfig::to_json() const {
  // ordered_json keeps insertion order: "format" first, then a fixed order of the set fields.
  nlohmann::ordered_json j;
  j["format"] = format;
  if (group_size) j["group_size"] = *group_size;
  if (act_unsigned) j["act_unsigned"] = *act_unsigned;
  if (!layout.empty()) j["layout"] = layout;
  if (!lowrank_branch_input_basis.empty()) j["lowrank_branch_input_basis"] = lowrank_branch_input_basis;
  if (proj_down_smooth_folded) j["proj_down_smooth_folded"] = *proj_down_smooth_folded;
  if (full_precision_matrix_mult) j["full_precision_matrix_mult"] = true;
  if (convrot) j["convrot"] = true;
  if (convrot || convrot_groupsize != 256) j["convrot_groupsize"] = convrot_groupsize;
  if (per_row) j["per_row"] = *per_row;
  if (!linear_dtype.empty()) j["linear_dtype"] = linear_dtype;
  if (num_experts) j["num_experts"] = *num_experts;
  return j.dump();
}

}  // namespace nibble
