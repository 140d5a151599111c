// convrot_w4a4 (spec §4.2): signed int4 weight (N, K/2) I8, low nibble = even column; per-row
// `weight_scale` (N) fp32; the rotation is always on: W = Had(q · scale[n]) per `convrot_groupsize`
// (default 256) group of K. JSON `linear_dtype` ("int4" | "int8") selects the activation path of the
// kitchen kernel and does not change the stored weight.
#include <fmt/format.h>

#include "core/shape_math.h"
#include "formats/hadamard.h"
#include "formats/kitchen_formats.h"

namespace nibble::formats {

void bind_convrot_w4a4(QuantizedLayer& layer) {
  const std::string what = layer_what(layer);
  expect_dtype(layer, "weight", {DType::I8});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D (N, K/2) tensor, got {}", what, shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = checked_mul(2, w.size(1), what + ": key 'weight': K = 2·shape[1]");
  const std::string& ld = layer.config.linear_dtype;
  if (!ld.empty() && ld != "int4" && ld != "int8")
    throw Error(fmt::format("{}: config 'linear_dtype': expected \"int4\" or \"int8\", got \"{}\"", what, ld));
  expect_dtype(layer, "weight_scale", {DType::F32, DType::BF16, DType::F16});
  const Tensor& s = layer.param("weight_scale");
  if (!((s.dim() == 1 && s.size(0) == layer.N) || (s.dim() == 2 && s.size(0) == layer.N && s.size(1) == 1)))
    throw Error(fmt::format("{}: key 'weight_scale': expected shape {} per-row, got {}", what, shape_str({layer.N}),
                            shape_str(s.shape())));
  const int64_t g = layer.config.convrot_groupsize;
  if (!is_power_of_4(g))
    throw Error(fmt::format("{}: config 'convrot_groupsize': expected a power of 4 (e.g. 256), got {}", what, g));
  expect_group_divides(layer, layer.K, g, "convrot_groupsize");
  layer.group_size = g;
}

Tensor dequantize_convrot_w4a4(const QuantizedLayer& layer) {
  const int64_t N = layer.N, K = layer.K;
  const Tensor& s = layer.param("weight_scale");
  const uint8_t* q = layer.param("weight").data<uint8_t>();
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float scale = load_f32(s, n);
    float* row = y + n * K;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = q[n * (K / 2) + k / 2];
      row[k] = float((k % 2 == 0) ? unpack_lo_signed(byte) : unpack_hi_signed(byte)) * scale;
    }
    hadamard_rotate_groups(row, K, layer.config.convrot_groupsize);
  }
  return out;
}

}  // namespace nibble::formats
