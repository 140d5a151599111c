// nibble/formats.h — per-layer quantization configs and the format registry.
//
// A ComfyUI "kitchen-native" layer `P` is a set of tensors `P.<suffix>` plus a config: the uint8
// JSON tensor `P.comfy_quant`, an entry of the header metadata `_quantization_metadata`, or the
// legacy `scaled_fp8` convention (spec §4.1). The registry has one FormatInfo per QUANT_ALGOS
// entry (spec §4.2). bind_layer() validates a layer once (keys with either accepted spelling,
// shapes, dtypes, group divisibility) and returns a QuantizedLayer with canonical parameter names;
// dequantize() turns any bound layer into its effective fp32 weight (N, K).
//
// Thread safety: The registry is built once (thread-safe static initialization) and read-only
// afterwards. QuantConfig::parse, collect_layers, bind_layer, dequantize and the tile conversions
// are functions of their arguments only and may run concurrently. A QuantizedLayer is a value
// whose tensors share storage with the checkpoint.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/safetensors.h"
#include "nibble/tensor.h"

namespace nibble {

// ---- the per-layer JSON config
struct QuantConfig {
  std::string format;                              // required
  std::optional<int64_t> group_size;               // awq_w4a16, asym_w4a8_int8
  std::optional<bool> act_unsigned;                // svdquant_w4a4 (absent ≠ false)
  std::string layout;                              // informational (svdquant)
  std::string lowrank_branch_input_basis;          // "raw" | "post_smoothing" | ""
  std::optional<bool> proj_down_smooth_folded;
  bool full_precision_matrix_mult = false;
  bool convrot = false;
  int64_t convrot_groupsize = 256;
  std::optional<bool> per_row;
  std::string linear_dtype;                        // convrot_w4a4: "int4" | "int8"
  std::optional<int64_t> num_experts;
  std::string json;                                // the original JSON text

  // Parses a JSON object; `layer` names the layer in errors. Unknown fields are kept in `json`.
  static QuantConfig parse(std::string_view json_text, const std::string& layer);
  // Canonical JSON (fixed key order; only set fields), as nibble writes it.
  std::string to_json() const;
};

// ---- the registry
struct ParamSpec {
  std::string canonical;                 // name used in QuantizedLayer::params, e.g. "weight_zeros"
  std::vector<std::string> spellings;    // accepted checkpoint suffixes, e.g. {"weight_zeros","weight_zero"}
  bool required = true;
};

// The fused kernel a format runs on (FusedKernel::None: dequantize + dense fp32 matmul).
enum class FusedKernel { None, AwqW4A16, SvdquantW4A4 };

// One registry entry. Code decides what a format can do from these traits, never from its name.
struct FormatInfo {
  std::string name;                      // "awq_w4a16"
  DType storage_dtype;                   // dtype of P.weight
  std::vector<ParamSpec> params;         // besides "weight" and "bias"
  bool has_fused_kernel = false;         // fused != FusedKernel::None (awq_w4a16, svdquant_w4a4)
  std::string description;
  // ---- traits
  FusedKernel fused = FusedKernel::None;
  int weight_bits = 8;                   // bits per stored weight element (4: two per byte)
  bool is_int4 = false;                  // 4-bit integer codes, two per byte (low nibble = even column)
  bool act_quantized = false;            // activations are quantized at run time (W4A4, W4A8)
  bool has_lowrank = false;              // a low-rank branch (proj_down / proj_up)
  bool has_smoothing = false;            // per-input-channel smoothing factor
  bool has_act_unsigned = false;         // the config's act_unsigned applies (post-GELU shift)
  bool supports_tile_layout = false;     // the weight may be stored tile-packed (spec §3.2)
  bool has_group_size = false;           // the config's group_size applies
  int64_t fixed_group_size = 0;          // group size fixed by the format (0 = none / configurable)
  int64_t row_padding = 0;               // weight rows padded to a multiple of this (bias: logical N)
  bool row_separable = false;            // dequantized row n depends only on stored row n (+ scalars):
                                         // can be decoded row-block by row-block (streamed)
};

const FormatInfo* find_format(std::string_view name);      // nullptr if unknown
const std::vector<FormatInfo>& all_formats();
std::string supported_format_names();                       // "awq_w4a16, svdquant_w4a4, ..."

// ---- a layer as found in a checkpoint (before validation)
struct LayerSource {
  std::string name;                      // prefix P (without trailing '.')
  std::optional<QuantConfig> config;     // none → a float layer
  std::map<std::string, Tensor> tensors; // suffix → tensor, e.g. "weight", "weight_scale", "bias"
};

// Every linear-like layer of a checkpoint: prefixes with a 2-D (or packed) `.weight` or a
// `.comfy_quant`. Applies the `_quantization_metadata` and legacy `scaled_fp8` conventions.
// `configs_only`: skip layers without a config.
std::vector<LayerSource> collect_layers(const Checkpoint& ckpt, bool configs_only = false);
// True if any key ends with ".comfy_quant" or the metadata holds `_quantization_metadata`
// (ComfyUI's "mixed_ops" detection).
bool has_quant_configs(const Checkpoint& ckpt);

// ---- a validated layer
struct QuantizedLayer {
  std::string name;
  const FormatInfo* format = nullptr;    // nullptr → float layer (weight is F32/F16/BF16)
  QuantConfig config;
  int64_t N = 0, K = 0;                  // out_features, in_features
  std::map<std::string, Tensor> params;  // canonical names, includes "weight"
  Tensor bias;                           // undefined when absent
  // Resolved, format specific:
  int64_t group_size = 0;                // awq / asym_w4a8 / nvfp4 / mxfp8 ...
  int64_t rank = 0;                      // svdquant R
  bool act_unsigned = false;             // svdquant
  bool tile_packed = false;              // svdquant tile layout
  std::vector<std::string> warnings;     // e.g. act_unsigned inferred from the name

  const Tensor& param(const std::string& canonical) const;  // throws naming layer + key
  bool has_param(const std::string& canonical) const { return params.count(canonical) != 0; }
  uint64_t storage_bytes() const;        // bytes of all params + bias
};

// Validates a layer; every error names the layer, the key, expected and actual.
// Unknown format → error naming the format and the layer and listing supported formats.
QuantizedLayer bind_layer(const LayerSource& src);
// Effective fp32 weight (N, K) (spec: dequantize of each format; svdquant = W_eff of §3.5).
Tensor dequantize(const QuantizedLayer& layer);

// ---- typed parameter views for the two fused formats
struct AwqW4A16Params {
  Tensor qweight;   // (N, K/2) I8, unsigned codes, low nibble = even column
  Tensor wscales;   // (K/G, N) BF16 | F16
  Tensor wzeros;    // (K/G, N) same dtype as wscales
  Tensor bias;      // (N) optional
  int64_t N = 0, K = 0, group_size = 64;
};
struct SvdquantW4A4Params {
  Tensor qweight;    // natural (N, K/2) I8 | tile (N/128, K/64, 32, 128)
  Tensor wscales;    // natural (K/64, N) | tile (N/128, K/64, 128)
  Tensor smooth;     // (K)
  Tensor proj_down;  // (K, R), raw-input basis
  Tensor proj_up;    // natural (N, R) | tile (N/128, R, 128)
  Tensor bias;       // (N) optional
  int64_t N = 0, K = 0, R = 0;
  bool act_unsigned = false;
  bool tile_packed = false;  // qweight/wscales tile-packed
  bool proj_up_tile = false; // proj_up tile-packed (may differ: spec §3.2 allows mixing)
};
AwqW4A16Params awq_params(const QuantizedLayer& layer);          // throws if not awq_w4a16
SvdquantW4A4Params svdquant_params(const QuantizedLayer& layer); // throws if not svdquant_w4a4
// Validates the typed params (shapes/dtypes); `what` names the layer/op in errors.
void validate(const AwqW4A16Params& p, const std::string& what);
void validate(const SvdquantW4A4Params& p, const std::string& what);

// Lossless tile-packed ↔ natural conversion (spec §3.2); requires N % 128 == 0, K % 64 == 0.
SvdquantW4A4Params svdquant_to_natural(const SvdquantW4A4Params& p);
SvdquantW4A4Params svdquant_to_tile(const SvdquantW4A4Params& p);
Tensor tile_pack_weight(const Tensor& natural);     // (N,K/2) → (N/128,K/64,32,128)
Tensor tile_unpack_weight(const Tensor& tile);
Tensor tile_pack_wscales(const Tensor& natural);    // (K/64,N) → (N/128,K/64,128)
Tensor tile_unpack_wscales(const Tensor& tile);
Tensor tile_pack_proj_up(const Tensor& natural);    // (N,R) → (N/128,R,128)
Tensor tile_unpack_proj_up(const Tensor& tile);

// ---- nibble packing helpers (spec §1: low nibble = even column)
inline uint8_t pack_nibbles(int v0, int v1) { return uint8_t((v0 & 0xF) | ((v1 & 0xF) << 4)); }
inline int unpack_lo_signed(uint8_t b) { int v = b & 0xF; return v < 8 ? v : v - 16; }
inline int unpack_hi_signed(uint8_t b) { int v = b >> 4; return v < 8 ? v : v - 16; }
inline int unpack_lo_unsigned(uint8_t b) { return b & 0xF; }
inline int unpack_hi_unsigned(uint8_t b) { return b >> 4; }

// The act_unsigned main-path shift (spec §3.4, nunchaku SHIFT_GELU = 11/64).
inline constexpr float kSvdquantUnsignedShift = 0.171875f;

}  // namespace nibble
