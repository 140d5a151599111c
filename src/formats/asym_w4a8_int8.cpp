// asym_w4a8_int8 (spec §4.2): unsigned 4-bit codes (N, K/2) I8, low nibble = even column;
// `weight_s_rel` (N, K/G) fp8 e4m3 (or its U8 bytes), G = `group_size` (default 16);
// `weight_s_channel` (N) fp32; optional `weight_codebook` (16) fp32.
// Dequantize: v = codebook[c] (or c − 8); i8 = clamp(round_half_even(v · s_rel), −127, 127);
// W = Had(i8 · s_channel[n]) per `convrot_groupsize` (default 256) group of K.
#include <fmt/format.h>

#include <cmath>

#include "core/shape_math.h"
#include "formats/hadamard.h"
#include "formats/kitchen_formats.h"

namespace nibble::formats {

namespace {
constexpr int64_t kDefaultGroup = 16;
}

void bind_asym_w4a8_int8(QuantizedLayer& layer) {
  const std::string what = layer_what(layer);
  expect_dtype(layer, "weight", {DType::I8});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D (N, K/2) tensor, got {}", what, shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = checked_mul(2, w.size(1), what + ": key 'weight': K = 2·shape[1]");
  layer.group_size = layer.config.group_size.value_or(kDefaultGroup);
  expect_group_divides(layer, layer.K, layer.group_size, "group_size");
  expect_dtype(layer, "weight_s_rel", {DType::F8_E4M3, DType::U8});
  expect_shape(layer, "weight_s_rel", {layer.N, layer.K / layer.group_size}, "(N, K/group_size)");
  expect_dtype(layer, "weight_s_channel", {DType::F32, DType::BF16, DType::F16});
  const Tensor& sc = layer.param("weight_s_channel");
  if (!((sc.dim() == 1 && sc.size(0) == layer.N) || (sc.dim() == 2 && sc.size(0) == layer.N && sc.size(1) == 1)))
    throw Error(fmt::format("{}: key 'weight_s_channel': expected shape {} per-channel, got {}", what, shape_str({layer.N}),
                            shape_str(sc.shape())));
  if (layer.has_param("weight_codebook")) {
    expect_dtype(layer, "weight_codebook", {DType::F32, DType::BF16, DType::F16});
    expect_shape(layer, "weight_codebook", {16}, "(one value per 4-bit code)");
  }
  const int64_t g = layer.config.convrot_groupsize;
  if (!is_power_of_4(g))
    throw Error(fmt::format("{}: config 'convrot_groupsize': expected a power of 4 (e.g. 256), got {}", what, g));
  expect_group_divides(layer, layer.K, g, "convrot_groupsize");
}

Tensor dequantize_asym_w4a8_int8(const QuantizedLayer& layer) {
  const int64_t N = layer.N, K = layer.K, G = layer.group_size;
  const uint8_t* q = layer.param("weight").data<uint8_t>();
  const uint8_t* srel = layer.param("weight_s_rel").data<uint8_t>();
  const Tensor& sch = layer.param("weight_s_channel");
  float codebook[16];
  for (int c = 0; c < 16; ++c)
    codebook[c] = layer.has_param("weight_codebook") ? load_f32(layer.param("weight_codebook"), c) : float(c - 8);
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float channel = load_f32(sch, n);
    float* row = y + n * K;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = q[n * (K / 2) + k / 2];
      const int code = (k % 2 == 0) ? unpack_lo_unsigned(byte) : unpack_hi_unsigned(byte);
      const float rel = fp8_e4m3_to_f32(srel[n * (K / G) + k / G]);
      float i8 = std::nearbyint(codebook[code] * rel);  // default rounding mode: half to even
      i8 = i8 < -127.0f ? -127.0f : (i8 > 127.0f ? 127.0f : i8);
      row[k] = i8 * channel;
    }
    hadamard_rotate_groups(row, K, layer.config.convrot_groupsize);
  }
  return out;
}

}  // namespace nibble::formats
