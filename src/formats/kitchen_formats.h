// src/formats/kitchen_formats.h — bind/dequantize hooks of the dequantize-only kitchen formats
// (internal; the two fused formats have theirs in format_impls.h).
//
// Every hook follows the same contract as the fused ones: bind_<fmt>() receives a layer whose
// `params` already hold the canonical names (spellings resolved, required keys present), checks
// dtypes and shapes against the weight (errors name the layer, the key, expected and actual), and
// sets N, K, group_size; dequantize_<fmt>() returns the fp32 (N, K) weight of spec §4.2.
// The shared helpers below keep the error messages uniform across formats.
#pragma once
#include <string>

#include "nibble/formats.h"

namespace nibble::formats {

// float8_e4m3fn / float8_e5m2 (src/formats/float8.cpp)
void bind_float8(QuantizedLayer& layer);
Tensor dequantize_float8(const QuantizedLayer& layer);
// nvfp4 (src/formats/nvfp4.cpp)
void bind_nvfp4(QuantizedLayer& layer);
Tensor dequantize_nvfp4(const QuantizedLayer& layer);
// mxfp8 (src/formats/mxfp8.cpp)
void bind_mxfp8(QuantizedLayer& layer);
Tensor dequantize_mxfp8(const QuantizedLayer& layer);
// int8_tensorwise and int4_tensorwise (src/formats/int8_tensorwise.cpp)
void bind_int8_tensorwise(QuantizedLayer& layer);
Tensor dequantize_int8_tensorwise(const QuantizedLayer& layer);
void bind_int4_tensorwise(QuantizedLayer& layer);
Tensor dequantize_int4_tensorwise(const QuantizedLayer& layer);
// convrot_w4a4 (src/formats/convrot_w4a4.cpp)
void bind_convrot_w4a4(QuantizedLayer& layer);
Tensor dequantize_convrot_w4a4(const QuantizedLayer& layer);
// asym_w4a8_int8 (src/formats/asym_w4a8_int8.cpp)
void bind_asym_w4a8_int8(QuantizedLayer& layer);
Tensor dequantize_asym_w4a8_int8(const QuantizedLayer& layer);

// ---- helpers shared by the hooks (registry.cpp)
// "layer 'P' (fmt)"
std::string layer_what(const QuantizedLayer& layer);
// Throws "<layer>: key '<key>': expected dtype A|B, got C".
void expect_dtype(const QuantizedLayer& layer, const std::string& key, std::initializer_list<DType> allowed);
// Throws "<layer>: key '<key>': expected shape (..) <meaning>, got (..)".
void expect_shape(const QuantizedLayer& layer, const std::string& key, const Shape& expected,
                  const std::string& meaning);
// A scalar (numel 1, any rank ≤ 1 or all-ones shape) float tensor, read as fp32.
float read_scalar_f32(const QuantizedLayer& layer, const std::string& key);
// Element i of a float tensor (F32/F16/BF16/F8_*) as fp32.
float load_f32(const Tensor& t, int64_t i);
// Throws unless K is a positive multiple of `group` ("K not a multiple of the group").
void expect_group_divides(const QuantizedLayer& layer, int64_t K, int64_t group, const std::string& group_name);
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace nibble::formats
