// float8_e4m3fn / float8_e5m2 (spec §4.2): fp8 weight (N, K) × per-tensor fp32 `weight_scale`.
// The weight dtype must match the format name (ComfyUI casts with `.to(storage_t)`, so the file
// must hold the exact container dtype). `input_scale` (optional) is a scalar for the activation
// path and does not enter the dequantized weight.
#include <fmt/format.h>

#include "formats/kitchen_formats.h"

namespace nibble::formats {

void bind_float8(QuantizedLayer& layer) {
  const bool e4m3 = layer.format->storage_dtype == DType::F8_E4M3;
  expect_dtype(layer, "weight", {e4m3 ? DType::F8_E4M3 : DType::F8_E5M2});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D (N, K) tensor, got {}", layer_what(layer),
                            shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = w.size(1);
  read_scalar_f32(layer, "weight_scale");
  if (layer.has_param("input_scale")) read_scalar_f32(layer, "input_scale");
}

Tensor dequantize_float8(const QuantizedLayer& layer) {
  const Tensor& w = layer.param("weight");
  const float scale = read_scalar_f32(layer, "weight_scale");
  const bool e4m3 = w.dtype() == DType::F8_E4M3;
  Tensor out = Tensor::empty(DType::F32, {layer.N, layer.K});
  float* y = out.mutable_data<float>();
  const uint8_t* q = w.data<uint8_t>();
  const int64_t n = layer.N * layer.K;
  for (int64_t i = 0; i < n; ++i) y[i] = (e4m3 ? fp8_e4m3_to_f32(q[i]) : fp8_e5m2_to_f32(q[i])) * scale;
  return out;
}

}  // namespace nibble::formats
