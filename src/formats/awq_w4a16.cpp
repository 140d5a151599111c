// awq_w4a16 (spec §2): typed parameters, validation, bind hook and fp32 dequantize.
//
// A layer holds qweight (N, K/2) I8 (unsigned codes, low nibble = even column), wscales and wzeros
// (K/G, N) in one 16-bit float dtype, an optional bias (N), and `group_size` G from its JSON config
// (default 64). Validation is done once here, against the weight's own shape, so that the kernels
// can trust every extent; each error names the layer, the key, what was expected and what was found.
// Dequantize is the spec formula in fp32: W[n,k] = (q[n,k] − 8)·s[k/G,n] + z[k/G,n].
#include <fmt/format.h>

#include "formats/format_impls.h"
#include "core/shape_math.h"

namespace nibble {

namespace {
constexpr int64_t kDefaultGroupSize = 64;

// layer.params lookup (the registry stored canonical names) with an error naming layer and key.
const Tensor& param_of(const QuantizedLayer& layer, const char* key) {
  auto it = layer.params.find(key);
  if (it == layer.params.end())
    throw Error(fmt::format("layer '{}' (awq_w4a16): missing parameter '{}'", layer.name, key));
  return it->second;
}

float load_half(const uint16_t* p, DType dt, int64_t i) {
  return dt == DType::BF16 ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
}
}  // namespace

void validate(const AwqW4A16Params& p, const std::string& what) {
  if (!p.qweight.defined()) throw Error(fmt::format("{}: 'weight' (qweight) is missing", what));
  if (!p.wscales.defined()) throw Error(fmt::format("{}: 'weight_scale' (wscales) is missing", what));
  if (!p.wzeros.defined()) throw Error(fmt::format("{}: 'weight_zeros' (wzeros) is missing", what));
  check_dtype(p.qweight, {DType::I8}, what + ": weight (qweight)");
  if (p.qweight.dim() != 2)
    throw Error(fmt::format("{}: weight (qweight): expected 2-D (N, K/2), got shape {}", what,
                            shape_str(p.qweight.shape())));
  const int64_t N = p.qweight.size(0), K = checked_mul(2, p.qweight.size(1), what + ": weight (qweight): K = 2·shape[1]");
  if (p.N != N || p.K != K)
    throw Error(fmt::format("{}: weight (qweight) shape {} implies N={}, K={}, but the params say N={}, K={}", what,
                            shape_str(p.qweight.shape()), N, K, p.N, p.K));
  const int64_t G = p.group_size;
  if (G <= 0 || G % 2 != 0)
    throw Error(fmt::format("{}: group_size: expected a positive even integer, got {}", what, G));
  if (K == 0 || K % G != 0)
    throw Error(fmt::format("{}: in_features K={} (2 x weight.shape[1]) is not a positive multiple of group_size {}",
                            what, K, G));
  check_dtype(p.wscales, {DType::BF16, DType::F16}, what + ": weight_scale (wscales)");
  check_shape(p.wscales, {K / G, N}, what + ": weight_scale (wscales) (K/G, N)");
  check_dtype(p.wzeros, {p.wscales.dtype()}, what + ": weight_zeros (wzeros) (same dtype as weight_scale)");
  check_shape(p.wzeros, {K / G, N}, what + ": weight_zeros (wzeros) (K/G, N)");
  if (p.bias.defined()) {
    check_dtype(p.bias, {DType::F32, DType::BF16, DType::F16}, what + ": bias");
    check_shape(p.bias, {N}, what + ": bias (N)");
  }
}

AwqW4A16Params awq_params(const QuantizedLayer& layer) {
  if (!layer.format || layer.format->fused != FusedKernel::AwqW4A16)
    throw Error(fmt::format("layer '{}': expected format awq_w4a16, got {}", layer.name,
                            layer.format ? layer.format->name : std::string("none (float layer)")));
  AwqW4A16Params p;
  p.qweight = param_of(layer, "weight");
  p.wscales = param_of(layer, "weight_scale");
  p.wzeros = param_of(layer, "weight_zeros");
  p.bias = layer.bias;
  p.N = layer.N;
  p.K = layer.K;
  p.group_size = layer.group_size;
  return p;
}

namespace formats {

void bind_awq_w4a16(QuantizedLayer& layer) {
  const std::string what = fmt::format("layer '{}' (awq_w4a16)", layer.name);
  const Tensor& w = param_of(layer, "weight");
  if (w.dtype() != DType::I8 || w.dim() != 2)
    throw Error(fmt::format("{}: key 'weight': expected I8 (N, K/2), got {} {}", what, dtype_name(w.dtype()),
                            shape_str(w.shape())));
  layer.N = w.size(0);
  layer.K = checked_mul(2, w.size(1), what + ": key 'weight': K = 2·shape[1]");
  layer.group_size = layer.config.group_size.value_or(kDefaultGroupSize);
  if (layer.group_size <= 0 || layer.group_size % 2 != 0)
    throw Error(fmt::format("{}: config 'group_size': expected a positive even integer, got {}", what,
                            layer.group_size));
  validate(awq_params(layer), what);
}

Tensor dequantize_awq_w4a16(const QuantizedLayer& layer) {
  const AwqW4A16Params p = awq_params(layer);
  validate(p, fmt::format("layer '{}' (awq_w4a16)", layer.name));
  const int64_t N = p.N, K = p.K, G = p.group_size;
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  const uint8_t* q = p.qweight.data<uint8_t>();
  const uint16_t* s = p.wscales.data<uint16_t>();
  const uint16_t* z = p.wzeros.data<uint16_t>();
  const DType dt = p.wscales.dtype();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = q[n * (K / 2) + k / 2];
      const int code = (k % 2 == 0) ? unpack_lo_unsigned(byte) : unpack_hi_unsigned(byte);
      const int64_t gi = (k / G) * N + n;
      const float prod = float(code - 8) * load_half(s, dt, gi);  // rounded product, then add (no FMA)
      y[n * K + k] = prod + load_half(z, dt, gi);
    }
  }
  return out;
}

}  // namespace formats
}  // namespace nibble
