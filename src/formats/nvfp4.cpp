// nvfp4 (spec §4.2): E2M1 codes, two per byte with the EVEN element in the HIGH nibble (kitchen
// `hi_first=True`, the opposite of the int4 formats), weight U8 (roundup(N,16), roundup(K,16)/2);
// e4m3 block scales, one per 16 elements along K, stored in the cuBLAS swizzled layout padded to
// (roundup(N,128), roundup(K/16,4)); `weight_scale_2` a per-tensor fp32 scalar.
// N and K are the stored (padded) extents: the checkpoint does not record the logical ones.
// Dequantize: W = (E2M1(code) · block) · weight_scale_2 — the first product is exact in fp32
// (2 + 4 significant bits), so the result is rounded once.
#include <fmt/format.h>

#include "core/shape_math.h"
#include "formats/kitchen_formats.h"

namespace nibble::formats {

namespace {
constexpr int64_t kBlock = 16;
constexpr float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
}  // namespace

// Offset of scale (r, c) in the swizzled layout of spec §4.2 (shared with mxfp8).
int64_t swizzled_scale_offset(int64_t r, int64_t c, int64_t padded_cols) {
  const int64_t blk = (r / 128) * (padded_cols / 4) + c / 4;
  return blk * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4;
}

void bind_nvfp4(QuantizedLayer& layer) {
  const std::string what = layer_what(layer);
  expect_dtype(layer, "weight", {DType::U8});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D (roundup(N,16), roundup(K,16)/2) tensor, got {}", what,
                            shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = checked_mul(2, w.size(1), what + ": key 'weight': K = 2·shape[1]");
  layer.group_size = kBlock;
  expect_group_divides(layer, layer.K, kBlock, "the nvfp4 block size");
  if (layer.N % 16 != 0)
    throw Error(fmt::format("{}: key 'weight': rows {} are not padded to a multiple of 16", what, layer.N));
  expect_dtype(layer, "weight_scale", {DType::F8_E4M3, DType::U8});
  expect_shape(layer, "weight_scale", {round_up(layer.N, 128), round_up(layer.K / kBlock, 4)},
               "(roundup(N,128), roundup(K/16,4)) swizzled block scales");
  read_scalar_f32(layer, "weight_scale_2");
  if (layer.has_param("input_scale")) read_scalar_f32(layer, "input_scale");
  if (layer.has_param("pre_quant_scale")) {
    expect_dtype(layer, "pre_quant_scale", {DType::F32, DType::F16, DType::BF16});
    expect_shape(layer, "pre_quant_scale", {layer.K}, "(K)");
  }
}

Tensor dequantize_nvfp4(const QuantizedLayer& layer) {
  const int64_t N = layer.N, K = layer.K;
  const uint8_t* q = layer.param("weight").data<uint8_t>();
  const uint8_t* sc = layer.param("weight_scale").data<uint8_t>();
  const float scale2 = read_scalar_f32(layer, "weight_scale_2");
  const int64_t padded_cols = round_up(K / kBlock, 4);
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = q[n * (K / 2) + k / 2];
      const int code = (k % 2 == 0) ? (byte >> 4) : (byte & 0xF);
      const float block = fp8_e4m3_to_f32(sc[swizzled_scale_offset(n, k / kBlock, padded_cols)]);
      y[n * K + k] = (kE2M1[code] * block) * scale2;
    }
  }
  return out;
}

}  // namespace nibble::formats
