// src/formats/format_impls.h — per-format hooks the registry calls (internal).
//
// bind_layer() (registry.cpp) resolves the accepted key spellings into canonical `layer.params`,
// sets N/K from the weight, then calls the format's bind hook, which validates shapes and dtypes
// (errors name the layer, the key, expected and actual) and fills the resolved fields
// (group_size, rank, act_unsigned, tile_packed, warnings). dequantize() calls the format's
// dequantize hook, which returns the effective fp32 weight (N, K).
// One source file per format implements its pair: src/formats/<format>.cpp.
#pragma once
#include "nibble/formats.h"

namespace nibble::formats {

void bind_awq_w4a16(QuantizedLayer& layer);
Tensor dequantize_awq_w4a16(const QuantizedLayer& layer);

void bind_svdquant_w4a4(QuantizedLayer& layer);
Tensor dequantize_svdquant_w4a4(const QuantizedLayer& layer);

}  // namespace nibble::formats
