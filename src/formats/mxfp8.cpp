// mxfp8 (spec §4.2): fp8 e4m3 weight (roundup(N,32), roundup(K,32)), one E8M0 scale per 32
// elements along K stored in the cuBLAS swizzled layout padded to (roundup(N,128), roundup(K/32,4))
// (U8 or F8_E8M0). Dequantize: W = fp8 · 2^(e−127), with e = 0 read as a zero scale (spec).
// N and K are the stored (padded) extents.
#include <fmt/format.h>

#include "formats/kitchen_formats.h"

namespace nibble::formats {

int64_t swizzled_scale_offset(int64_t r, int64_t c, int64_t padded_cols);  // nvfp4.cpp

namespace {
constexpr int64_t kBlock = 32;
float e8m0_scale(uint8_t e) { return e == 0 ? 0.0f : e8m0_to_f32(e); }
}  // namespace

void bind_mxfp8(QuantizedLayer& layer) {
  const std::string what = layer_what(layer);
  expect_dtype(layer, "weight", {DType::F8_E4M3});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D (roundup(N,32), roundup(K,32)) tensor, got {}", what,
                            shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = w.size(1);
  layer.group_size = kBlock;
  expect_group_divides(layer, layer.K, kBlock, "the mxfp8 block size");
  if (layer.N % 32 != 0)
    throw Error(fmt::format("{}: key 'weight': rows {} are not padded to a multiple of 32", what, layer.N));
  expect_dtype(layer, "weight_scale", {DType::U8, DType::F8_E8M0});
  expect_shape(layer, "weight_scale", {round_up(layer.N, 128), round_up(layer.K / kBlock, 4)},
               "(roundup(N,128), roundup(K/32,4)) swizzled E8M0 scales");
  if (layer.has_param("input_scale")) read_scalar_f32(layer, "input_scale");
}

Tensor dequantize_mxfp8(const QuantizedLayer& layer) {
  const int64_t N = layer.N, K = layer.K;
  const uint8_t* q = layer.param("weight").data<uint8_t>();
  const uint8_t* sc = layer.param("weight_scale").data<uint8_t>();
  const int64_t padded_cols = round_up(K / kBlock, 4);
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      y[n * K + k] = fp8_e4m3_to_f32(q[n * K + k]) * e8m0_scale(sc[swizzled_scale_offset(n, k / kBlock, padded_cols)]);
  return out;
}

}  // namespace nibble::formats
