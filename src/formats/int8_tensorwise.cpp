// int8_tensorwise and int4_tensorwise (spec §4.2): W = q · scale, scale a per-tensor scalar or a
// per-row (N, 1) column, optionally followed by the convrot rotation (JSON `convrot`, group
// `convrot_groupsize`, default 256): each K-group of a row is multiplied by H_nᵀ/√n.
// int8: weight I8 (N, K). int4 (HK fork only): signed nibbles (N, K/2), low nibble = even column.
#include <fmt/format.h>

#include "core/shape_math.h"
#include "formats/hadamard.h"
#include "formats/kitchen_formats.h"

namespace nibble::formats {

namespace {

// Accepts a scalar or a per-row (N, 1) / (N) scale; returns true when per-row.
bool check_row_scale(QuantizedLayer& layer) {
  expect_dtype(layer, "weight_scale", {DType::F32, DType::BF16, DType::F16});
  const Tensor& s = layer.param("weight_scale");
  if (s.numel() == 1 && s.dim() <= 2 && layer.N != 1) return false;
  const bool per_row = (s.dim() == 2 && s.size(0) == layer.N && s.size(1) == 1) || (s.dim() == 1 && s.size(0) == layer.N);
  if (!per_row)
    throw Error(fmt::format("{}: key 'weight_scale': expected a scalar or per-row shape ({}, 1), got {}",
                            layer_what(layer), layer.N, shape_str(s.shape())));
  return true;
}

void check_convrot(QuantizedLayer& layer) {
  if (!layer.config.convrot) return;
  const int64_t g = layer.config.convrot_groupsize;
  if (!is_power_of_4(g))
    throw Error(fmt::format("{}: config 'convrot_groupsize': expected a power of 4 (e.g. 256), got {}",
                            layer_what(layer), g));
  expect_group_divides(layer, layer.K, g, "convrot_groupsize");
  layer.group_size = g;
}

void bind_common(QuantizedLayer& layer, bool packed) {
  expect_dtype(layer, "weight", {DType::I8});
  const Tensor& w = layer.param("weight");
  if (w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected a 2-D {} tensor, got {}", layer_what(layer),
                            packed ? "(N, K/2)" : "(N, K)", shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = packed ? checked_mul(2, w.size(1), layer_what(layer) + ": key 'weight': K = 2·shape[1]") : w.size(1);
  check_row_scale(layer);
  check_convrot(layer);
  if (layer.has_param("input_scale")) read_scalar_f32(layer, "input_scale");
}

Tensor dequant_common(const QuantizedLayer& layer, bool packed) {
  const int64_t N = layer.N, K = layer.K;
  const Tensor& s = layer.param("weight_scale");
  const bool per_row = !(s.numel() == 1 && N != 1);
  const int8_t* q = layer.param("weight").data<int8_t>();
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float scale = load_f32(s, per_row ? n : 0);
    float* row = y + n * K;
    for (int64_t k = 0; k < K; ++k) {
      int v;
      if (packed) {
        const uint8_t byte = uint8_t(q[n * (K / 2) + k / 2]);
        v = (k % 2 == 0) ? unpack_lo_signed(byte) : unpack_hi_signed(byte);
      } else {
        v = q[n * K + k];
      }
      row[k] = float(v) * scale;
    }
    if (layer.config.convrot) hadamard_rotate_groups(row, K, layer.config.convrot_groupsize);
  }
  return out;
}

}  // namespace

void bind_int8_tensorwise(QuantizedLayer& layer) { bind_common(layer, false); }
Tensor dequantize_int8_tensorwise(const QuantizedLayer& layer) { return dequant_common(layer, false); }
void bind_int4_tensorwise(QuantizedLayer& layer) { bind_common(layer, true); }
Tensor dequantize_int4_tensorwise(const QuantizedLayer& layer) { return dequant_common(layer, true); }

}  // namespace nibble::formats
