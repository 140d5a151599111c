// The format registry (spec §4.2 QUANT_ALGOS) and the generic half of bind_layer()/dequantize().
//
// Design: one table lists every format with its parameters and their accepted checkpoint spellings.
// bind_layer() does the format-independent work here — unknown format, missing weight, spelling
// resolution (either spelling accepted, both present is an error since no source defines
// precedence), bias — and then calls the format's hook (kitchen_formats.h / format_impls.h), which
// checks shapes and dtypes against the weight. dequantize() dispatches to the format's hook.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/shape_math.h"
#include "formats/format_impls.h"
#include "formats/kitchen_formats.h"

namespace nibble {

namespace {

using BindFn = void (*)(QuantizedLayer&);
using DequantFn = Tensor (*)(const QuantizedLayer&);
struct FormatHooks {
  const char* name;
  BindFn bind;
  DequantFn dequant;
};

const FormatHooks kHooks[] = {
    {"float8_e4m3fn", formats::bind_float8, formats::dequantize_float8},
    {"float8_e5m2", formats::bind_float8, formats::dequantize_float8},
    {"nvfp4", formats::bind_nvfp4, formats::dequantize_nvfp4},
    {"mxfp8", formats::bind_mxfp8, formats::dequantize_mxfp8},
    {"int8_tensorwise", formats::bind_int8_tensorwise, formats::dequantize_int8_tensorwise},
    {"int4_tensorwise", formats::bind_int4_tensorwise, formats::dequantize_int4_tensorwise},
    {"convrot_w4a4", formats::bind_convrot_w4a4, formats::dequantize_convrot_w4a4},
    {"asym_w4a8_int8", formats::bind_asym_w4a8_int8, formats::dequantize_asym_w4a8_int8},
    {"awq_w4a16", formats::bind_awq_w4a16, formats::dequantize_awq_w4a16},
    {"svdquant_w4a4", formats::bind_svdquant_w4a4, formats::dequantize_svdquant_w4a4},
};

const FormatHooks& hooks_of(const FormatInfo& f) {
  for (const auto& h : kHooks)
    if (f.name == h.name) return h;
  throw Error(fmt::format("internal: format '{}' has no hooks", f.name));
}

ParamSpec req(std::string canonical, std::vector<std::string> spellings = {}) {
  if (spellings.empty()) spellings = {canonical};
  return ParamSpec{std::move(canonical), std::move(spellings), true};
}
ParamSpec opt(std::string canonical) {
  std::vector<std::string> s{canonical};
  return ParamSpec{std::move(canonical), std::move(s), false};
}

std::vector<FormatInfo> make_formats() {
  std::vector<FormatInfo> v;
  v.push_back({"awq_w4a16", DType::I8,
               {req("weight_scale"), req("weight_zeros", {"weight_zeros", "weight_zero"})},
               true,
               "AWQ W4A16: unsigned int4 codes (N,K/2), per-group scale and float zero (K/G,N), G=64 default"});
  {
    FormatInfo& f = v.back();
    f.fused = FusedKernel::AwqW4A16, f.weight_bits = 4, f.is_int4 = true, f.has_group_size = true;
  }
  v.push_back({"svdquant_w4a4", DType::I8,
               {req("weight_scale"), req("smooth_factor", {"smooth_factor", "weight_smooth_factor"}),
                req("proj_down", {"proj_down", "weight_proj_down"}), req("proj_up", {"proj_up", "weight_proj_up"})},
               true,
               "SVDQuant W4A4: signed int4 residual (N,K/2) or tile-packed, group-64 scales, smooth, low-rank"});
  {
    FormatInfo& f = v.back();
    f.fused = FusedKernel::SvdquantW4A4, f.weight_bits = 4, f.is_int4 = true, f.act_quantized = true;
    f.has_lowrank = true, f.has_smoothing = true, f.has_act_unsigned = true, f.supports_tile_layout = true;
    f.fixed_group_size = 64;
  }
  v.push_back({"float8_e4m3fn", DType::F8_E4M3, {req("weight_scale"), opt("input_scale")}, false,
               "fp8 e4m3fn weight (N,K) x per-tensor fp32 scale"});
  v.back().row_separable = true;
  v.push_back({"float8_e5m2", DType::F8_E5M2, {req("weight_scale"), opt("input_scale")}, false,
               "fp8 e5m2 weight (N,K) x per-tensor fp32 scale"});
  v.back().row_separable = true;
  v.push_back({"nvfp4", DType::U8,
               {req("weight_scale"), req("weight_scale_2"), opt("input_scale"), opt("pre_quant_scale")}, false,
               "NVFP4: E2M1 codes (even element high nibble), e4m3 block-16 scales (swizzled) x fp32 tensor scale"});
  v.back().weight_bits = 4, v.back().fixed_group_size = 16, v.back().row_padding = 16;
  v.push_back({"mxfp8", DType::F8_E4M3, {req("weight_scale"), opt("input_scale")}, false,
               "MXFP8: fp8 e4m3 weight, E8M0 block-32 scales (swizzled)"});
  v.back().fixed_group_size = 32, v.back().row_padding = 32;
  v.push_back({"int8_tensorwise", DType::I8, {req("weight_scale"), opt("input_scale")}, false,
               "int8 weight (N,K) x per-tensor or per-row scale, optional convrot Hadamard"});
  v.back().row_separable = true;
  v.push_back({"int4_tensorwise", DType::I8, {req("weight_scale"), opt("input_scale")}, false,
               "signed int4 (N,K/2) low nibble first x per-row scale, optional convrot Hadamard"});
  v.back().weight_bits = 4, v.back().is_int4 = true, v.back().row_separable = true;
  v.push_back({"convrot_w4a4", DType::I8, {req("weight_scale")}, false,
               "ConvRot W4A4: signed int4 (N,K/2) x per-row scale, per-group Hadamard"});
  v.back().weight_bits = 4, v.back().is_int4 = true, v.back().act_quantized = true;
  v.push_back({"asym_w4a8_int8", DType::I8,
               {req("weight_s_rel"), req("weight_s_channel"), opt("weight_codebook")}, false,
               "asym W4A8: uint4 codes (N,K/2), fp8 relative group scales, per-channel scale, Hadamard"});
  v.back().weight_bits = 4, v.back().is_int4 = true, v.back().act_quantized = true, v.back().has_group_size = true;
  return v;
}

}  // namespace

const std::vector<FormatInfo>& all_formats() {
  static const std::vector<FormatInfo> formats = make_formats();
  return formats;
}

const FormatInfo* find_format(std::string_view name) {
  for (const auto& f : all_formats())
    if (f.name == name) return &f;
  return nullptr;
}

std::string supported_format_names() {
  std::string s;
  for (const auto& f : all_formats()) s += (s.empty() ? "" : ", ") + f.name;
  return s;
}

const Tensor& QuantizedLayer::param(const std::string& canonical) const {
  auto it = params.find(canonical);
  if (it == params.end())
    throw Error(fmt::format("layer '{}' ({}): parameter '{}' is missing", name, format ? format->name : "float",
                            canonical));
  return it->second;
}

uint64_t QuantizedLayer::storage_bytes() const {
  uint64_t b = 0;
  for (const auto& [k, t] : params) b += t.nbytes();
  if (bias.defined()) b += bias.nbytes();
  return b;
}

namespace formats {

std::string layer_what(const QuantizedLayer& layer) {
  return fmt::format("layer '{}' ({})", layer.name, layer.format ? layer.format->name : "float");
}

void expect_dtype(const QuantizedLayer& layer, const std::string& key, std::initializer_list<DType> allowed) {
  check_dtype(layer.param(key), allowed, fmt::format("{}: key '{}'", layer_what(layer), key));
}

void expect_shape(const QuantizedLayer& layer, const std::string& key, const Shape& expected,
                  const std::string& meaning) {
  const Tensor& t = layer.param(key);
  if (t.shape() != expected)
    throw Error(fmt::format("{}: key '{}': expected shape {}{}, got {}", layer_what(layer), key, shape_str(expected),
                            meaning.empty() ? "" : " " + meaning, shape_str(t.shape())));
}

float load_f32(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return t.data<float>()[i];
    case DType::F16: return f16_to_f32(t.data<uint16_t>()[i]);
    case DType::BF16: return bf16_to_f32(t.data<uint16_t>()[i]);
    case DType::F8_E4M3: return fp8_e4m3_to_f32(t.data<uint8_t>()[i]);
    case DType::F8_E5M2: return fp8_e5m2_to_f32(t.data<uint8_t>()[i]);
    case DType::F64: return float(t.data<double>()[i]);
    default: throw Error(fmt::format("internal: load_f32 on dtype {}", dtype_name(t.dtype())));
  }
}

float read_scalar_f32(const QuantizedLayer& layer, const std::string& key) {
  const Tensor& t = layer.param(key);
  check_dtype(t, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: key '{}'", layer_what(layer), key));
  if (t.numel() != 1 || t.dim() > 2)
    throw Error(fmt::format("{}: key '{}': expected a scalar (shape () or (1,)), got {}", layer_what(layer), key,
                            shape_str(t.shape())));
  return load_f32(t, 0);
}

void expect_group_divides(const QuantizedLayer& layer, int64_t K, int64_t group, const std::string& group_name) {
  if (group <= 0)
    throw Error(fmt::format("{}: {} must be positive, got {}", layer_what(layer), group_name, group));
  if (K <= 0 || K % group != 0)
    throw Error(fmt::format("{}: in_features K={} is not a positive multiple of {} {}", layer_what(layer), K,
                            group_name, group));
}

}  // namespace formats

namespace {

void bind_float_layer(QuantizedLayer& layer, const LayerSource& src) {
  auto it = src.tensors.find("weight");
  if (it == src.tensors.end())
    throw Error(fmt::format("layer '{}' (float, no comfy_quant config): key '{}.weight' is missing", src.name,
                            src.name));
  const Tensor& w = it->second;
  check_dtype(w, {DType::F32, DType::F16, DType::BF16},
              fmt::format("layer '{}' (float, no comfy_quant config): key 'weight'", src.name));
  if (w.dim() != 2)
    throw Error(fmt::format("layer '{}' (float): key 'weight': expected a 2-D (N, K) tensor, got {}", src.name,
                            shape_str(w.shape())));
  layer.params["weight"] = w;
  layer.N = w.size(0);
  layer.K = w.size(1);
}

void check_bias(const QuantizedLayer& layer) {
  if (!layer.bias.defined()) return;
  const std::string what = fmt::format("{}: key 'bias'", formats::layer_what(layer));
  check_dtype(layer.bias, {DType::F32, DType::F16, DType::BF16}, what);
  // nvfp4/mxfp8 store the weight padded; their N is the padded row count, the bias the logical one.
  const int64_t pad = layer.format ? layer.format->row_padding : 0;
  const bool padded = pad > 0;
  const bool ok = layer.bias.dim() == 1 &&
                  (padded ? (layer.bias.size(0) <= layer.N && layer.bias.size(0) > layer.N - pad)
                          : layer.bias.size(0) == layer.N);
  if (!ok)
    throw Error(fmt::format("{}: expected shape {}{}, got {}", what, shape_str({layer.N}), padded ? " (up to row padding)" : "",
                            shape_str(layer.bias.shape())));
}

// N, K as read off the weight before the hook runs (the hooks re-derive and check them): packed
// 4-bit formats hold two columns per byte, the tile-packed svdquant weight is
// (N/128, K/64, 32, 128). Other ranks are left at 0 for the hook to reject.
void preset_extents(QuantizedLayer& layer) {
  // 4-bit weights hold two columns per byte
  const bool packed = layer.format->weight_bits == 4;
  const Tensor& w = layer.param("weight");
  if (w.dim() == 2) {
    layer.N = w.size(0);
    layer.K = packed ? checked_mul(2, w.size(1), layer.name + ": key 'weight': K = 2·shape[1]") : w.size(1);
  } else if (w.dim() == 4 && layer.format->supports_tile_layout) {
    layer.N = checked_mul(w.size(0), 128, layer.name + ": key 'weight': N = 128·shape[0]");
    layer.K = checked_mul(w.size(1), 64, layer.name + ": key 'weight': K = 64·shape[1]");
  }
}

}  // namespace

QuantizedLayer bind_layer(const LayerSource& src) {
  QuantizedLayer layer;
  layer.name = src.name;
  if (auto b = src.tensors.find("bias"); b != src.tensors.end()) layer.bias = b->second;

  if (!src.config) {
    bind_float_layer(layer, src);
    check_bias(layer);
    return layer;
  }
  layer.config = *src.config;
  const FormatInfo* f = find_format(src.config->format);
  if (!f)
    throw Error(fmt::format("layer '{}': unknown quantization format '{}'; supported formats: {}", src.name,
                            src.config->format, supported_format_names()));
  layer.format = f;
  const std::string what = formats::layer_what(layer);

  auto w = src.tensors.find("weight");
  if (w == src.tensors.end())
    throw Error(fmt::format("{}: missing parameter 'weight' (key '{}.weight')", what, src.name));
  layer.params["weight"] = w->second;

  for (const ParamSpec& p : f->params) {
    std::vector<std::string> present;
    for (const auto& s : p.spellings)
      if (src.tensors.count(s)) present.push_back(s);
    if (present.size() > 1) {
      std::string keys;
      for (const auto& s : present) keys += (keys.empty() ? "" : " and ") + fmt::format("'{}.{}'", src.name, s);
      throw Error(fmt::format("{}: parameter '{}' is given twice, as {}; keep exactly one spelling", what,
                              p.canonical, keys));
    }
    if (present.empty()) {
      if (!p.required) continue;
      std::string keys;
      for (const auto& s : p.spellings) keys += (keys.empty() ? "" : " | ") + fmt::format("'{}.{}'", src.name, s);
      throw Error(fmt::format("{}: missing parameter '{}' (accepted key{}: {})", what, p.canonical,
                              p.spellings.size() > 1 ? "s" : "", keys));
    }
    layer.params[p.canonical] = src.tensors.at(present[0]);
  }
  preset_extents(layer);
  hooks_of(*f).bind(layer);
  check_bias(layer);
  return layer;
}

Tensor dequantize(const QuantizedLayer& layer) {
  if (!layer.format) {
    const Tensor& w = layer.param("weight");
    check_dtype(w, {DType::F32, DType::F16, DType::BF16}, formats::layer_what(layer) + ": key 'weight'");
    return w.to(DType::F32);
  }
  const FormatHooks& h = hooks_of(*layer.format);
  if (!layer.format->has_fused_kernel) {
    // The dequantize hooks index raw bytes by N, K and the group: re-validate a copy so that a
    // hand-built or modified QuantizedLayer cannot make them read out of bounds.
    QuantizedLayer check = layer;
    check.N = check.K = check.group_size = 0;
    h.bind(check);
    if (check.N != layer.N || check.K != layer.K || check.group_size != layer.group_size)
      throw Error(fmt::format("{}: N={}, K={}, group_size={} do not match its tensors (N={}, K={}, group_size={})",
                              formats::layer_what(layer), layer.N, layer.K, layer.group_size, check.N, check.K,
                              check.group_size));
  }
  return h.dequant(layer);
}

}  // namespace nibble
