// collect_layers(): group a checkpoint's tensors into layers and attach their configs (spec §4.1).
//
// A tensor `P.S` (split at the last '.') belongs to layer P under suffix S. Configs come from, in
// order of precedence: the `P.comfy_quant` tensor (U8 1-D UTF-8 JSON), the header metadata
// `_quantization_metadata` = {"format_version", "layers": {P: {...}}}, or — only when there is no
// such metadata — the legacy `scaled_fp8` convention (`X.scale_weight` → `X.weight_scale` with
// {"format": "float8_e4m3fn"}, `X.scale_input` → `X.input_scale` unless it is exactly 1.0).
// Prefixes such as `model.diffusion_model.` stay part of the layer name. Layers are returned in
// natural order (block 2 before block 10). Tensors are zero-copy views of the mapped files.
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <map>

#include <nlohmann/json.hpp>

#include "formats/kitchen_formats.h"
#include "io/json_strict.h"

namespace nibble {

namespace {

constexpr const char* kMetadataKey = "_quantization_metadata";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// "a.b.10.x" after "a.b.2.x": digit runs compare by value.
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit((unsigned char)a[i]) && std::isdigit((unsigned char)b[j])) {
      size_t i2 = i, j2 = j;
      while (i2 < a.size() && a[i2] == '0') ++i2;
      while (j2 < b.size() && b[j2] == '0') ++j2;
      size_t ie = i2, je = j2;
      while (ie < a.size() && std::isdigit((unsigned char)a[ie])) ++ie;
      while (je < b.size() && std::isdigit((unsigned char)b[je])) ++je;
      if (ie - i2 != je - j2) return ie - i2 < je - j2;
      const int c = a.compare(i2, ie - i2, b, j2, je - j2);
      if (c != 0) return c < 0;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return (unsigned char)a[i] < (unsigned char)b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::map<std::string, QuantConfig> metadata_configs(const Checkpoint& ckpt) {
  std::map<std::string, QuantConfig> out;
  auto it = ckpt.metadata().find(kMetadataKey);
  if (it == ckpt.metadata().end()) return out;
  const std::string what = fmt::format("{}: __metadata__[\"{}\"]", ckpt.path(), kMetadataKey);
  if (!io::is_valid_utf8(it->second)) throw Error(what + ": not valid UTF-8");
  nlohmann::json j = io::parse_json_strict(it->second, what, 16);
  if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object, got {}", what, j.type_name()));
  auto layers = j.find("layers");
  if (layers == j.end() || !layers->is_object())
    throw Error(fmt::format("{}: expected an object field \"layers\" mapping layer names to configs", what));
  for (auto& [name, cfg] : layers->items()) {
    if (!cfg.is_object())
      throw Error(fmt::format("{}: layer '{}': expected a JSON object, got {}", what, name, cfg.type_name()));
    out.emplace(name, QuantConfig::parse(cfg.dump(), name));
  }
  return out;
}

QuantConfig tensor_config(const Checkpoint& ckpt, const std::string& key, const std::string& layer) {
  const TensorInfo& info = ckpt.info(key);
  if (info.dtype != DType::U8 || info.shape.size() != 1)
    throw Error(fmt::format("{}: tensor '{}': expected a U8 1-D tensor holding UTF-8 JSON, got {} {}", ckpt.path(),
                            key, dtype_name(info.dtype), shape_str(info.shape)));
  const Tensor t = ckpt.get(key);
  return QuantConfig::parse(std::string_view(static_cast<const char*>(t.raw()), t.nbytes()), layer);
}

}  // namespace

bool has_quant_configs(const Checkpoint& ckpt) {
  if (ckpt.metadata().count(kMetadataKey)) return true;
  for (const auto& n : ckpt.names())
    if (ends_with(n, ".comfy_quant") || ends_with(n, "scaled_fp8")) return true;
  return false;
}

std::vector<LayerSource> collect_layers(const Checkpoint& ckpt, bool configs_only) {
  std::map<std::string, QuantConfig> configs = metadata_configs(ckpt);
  const bool has_metadata = ckpt.metadata().count(kMetadataKey) != 0;

  // Legacy scaled_fp8: the marker key (e.g. "model.diffusion_model.scaled_fp8" or "scaled_fp8").
  std::vector<std::string> legacy_markers;
  if (!has_metadata)
    for (const auto& n : ckpt.names())
      if (ends_with(n, "scaled_fp8") && (n.size() == 10 || n[n.size() - 11] == '.')) legacy_markers.push_back(n);
  bool legacy_full_precision = false;
  for (const auto& m : legacy_markers)
    if (shape_numel(ckpt.info(m).shape) == 2) legacy_full_precision = true;

  std::map<std::string, LayerSource> layers;
  auto layer_of = [&](const std::string& prefix) -> LayerSource& {
    auto& l = layers[prefix];
    l.name = prefix;
    return l;
  };

  for (const auto& key : ckpt.names()) {
    if (std::find(legacy_markers.begin(), legacy_markers.end(), key) != legacy_markers.end()) continue;
    const size_t dot = key.rfind('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == key.size()) continue;  // not "P.S"
    const std::string prefix = key.substr(0, dot);
    std::string suffix = key.substr(dot + 1);
    if (suffix == "comfy_quant") {
      layer_of(prefix).config = tensor_config(ckpt, key, prefix);
      continue;
    }
    if (!legacy_markers.empty()) {
      if (suffix == "scale_weight") {
        suffix = "weight_scale";
        if (!configs.count(prefix)) {
          QuantConfig c;
          // The spec writes float8_e4m3fn; an e5m2 weight keeps its own format so that it binds.
          const std::string wkey = prefix + ".weight";
          c.format = ckpt.contains(wkey) && ckpt.info(wkey).dtype == DType::F8_E5M2 ? "float8_e5m2" : "float8_e4m3fn";
          c.full_precision_matrix_mult = legacy_full_precision;
          c.json = c.to_json();
          configs.emplace(prefix, c);
        }
      } else if (suffix == "scale_input") {
        const Tensor s = ckpt.get(key);
        if (s.numel() == 1 &&
            (s.dtype() == DType::F32 || s.dtype() == DType::BF16 || s.dtype() == DType::F16) &&
            formats::load_f32(s, 0) == 1.0f)
          continue;  // an input scale of exactly 1.0 is dropped
        suffix = "input_scale";
      }
    }
    layer_of(prefix).tensors[suffix] = ckpt.get(key);
  }

  std::vector<LayerSource> out;
  for (auto& [prefix, l] : layers) {
    if (!l.config) {
      auto c = configs.find(prefix);
      if (c != configs.end()) l.config = c->second;
    }
    if (!l.config) {
      if (configs_only) continue;
      auto w = l.tensors.find("weight");
      if (w == l.tensors.end() || w->second.dim() != 2) continue;  // norms, embeddings tables of rank ≠ 2, ...
    }
    out.push_back(std::move(l));
  }
  // Metadata entries whose layer has no tensor at all are still reported (bind_layer names the
  // missing weight).
  for (const auto& [prefix, c] : configs)
    if (!layers.count(prefix)) out.push_back(LayerSource{prefix, c, {}});
  std::sort(out.begin(), out.end(), [](const LayerSource& a, const LayerSource& b) { return natural_less(a.name, b.name); });
  return out;
}

}  // namespace nibble
