// svdquant_w4a4 (spec §3): typed parameters, validation, natural ↔ tile-packed permutations, the
// bind hook and the fp32 dequantize (W_eff of §3.5).
//
// Layout is detected by tensor rank, like the kitchen (§3.2): a 4-D weight is tile-packed
// (N/128, K/64, 32, 128) and then weight_scale must be 3-D (N/128, K/64, 128); proj_up is tile-packed
// independently when it is 3-D (N/128, R, 128) (mixing is allowed by the spec). Tile conversions are
// pure permutations of whole bytes / elements, so they are lossless in both directions.
// bind() validates every shape and dtype once against the weight; errors name the layer, the key,
// what was expected and what was found. A `post_smoothing` low-rank basis is folded at bind time
// (proj_down rows ÷ smooth into a new owned F32 tensor) so the runtime only knows the raw basis.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstring>

#include "formats/format_impls.h"
#include "core/shape_math.h"
#include "nibble/thread_pool.h"

namespace nibble {

namespace {
constexpr int64_t kGroup = 64;
constexpr int64_t kBlockN = 128;

const Tensor& param_of(const QuantizedLayer& layer, const char* key) {
  auto it = layer.params.find(key);
  if (it == layer.params.end())
    throw Error(fmt::format("layer '{}' (svdquant_w4a4): missing parameter '{}'", layer.name, key));
  return it->second;
}

float elem_f32(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return t.data<float>()[i];
    case DType::BF16: return bf16_to_f32(t.data<uint16_t>()[i]);
    case DType::F16: return f16_to_f32(t.data<uint16_t>()[i]);
    default: throw Error(fmt::format("svdquant_w4a4: unsupported float dtype {}", dtype_name(t.dtype())));
  }
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void need_float(const Tensor& t, const std::string& what) {
  check_dtype(t, {DType::F32, DType::BF16, DType::F16}, what);
}

// Generic element permutation helper for byte-sized dtypes.
size_t elem_bytes(const Tensor& t, const char* what) {
  const size_t b = dtype_size(t.dtype());
  if (b == 0) throw Error(fmt::format("{}: sub-byte dtype {} is not supported", what, dtype_name(t.dtype())));
  return b;
}
}  // namespace

// ---------------------------------------------------------------- tile permutations (spec §3.2)
Tensor tile_pack_weight(const Tensor& nat) {
  if (nat.dim() != 2 || nat.size(0) % kBlockN != 0 || nat.size(1) % 32 != 0 || dtype_size(nat.dtype()) != 1)
    throw Error(fmt::format("tile_pack_weight: expected 1-byte (N, K/2) with N % 128 == 0 and K % 64 == 0, got {} {}",
                            dtype_name(nat.dtype()), shape_str(nat.shape())));
  const int64_t N = nat.size(0), KB = nat.size(1), T = N / kBlockN, G = KB / 32;
  Tensor out = Tensor::empty(nat.dtype(), {T, G, 32, kBlockN});
  const uint8_t* s = static_cast<const uint8_t*>(nat.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  // Each (t, g) tile: 128 rows × 32 bytes, rows in natural order.
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < kBlockN; ++r)
        std::memcpy(d + ((t * G + g) * kBlockN + r) * 32, s + (t * kBlockN + r) * KB + g * 32, 32);
  return out;
}

Tensor tile_unpack_weight(const Tensor& tile) {
  if (tile.dim() != 4 || tile.size(2) != 32 || tile.size(3) != kBlockN || dtype_size(tile.dtype()) != 1)
    throw Error(fmt::format("tile_unpack_weight: expected 1-byte (N/128, K/64, 32, 128), got {} {}",
                            dtype_name(tile.dtype()), shape_str(tile.shape())));
  const int64_t T = tile.size(0), G = tile.size(1), N = T * kBlockN, KB = G * 32;
  Tensor out = Tensor::empty(tile.dtype(), {N, KB});
  const uint8_t* s = static_cast<const uint8_t*>(tile.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < kBlockN; ++r)
        std::memcpy(d + (t * kBlockN + r) * KB + g * 32, s + ((t * G + g) * kBlockN + r) * 32, 32);
  return out;
}

Tensor tile_pack_wscales(const Tensor& nat) {
  if (nat.dim() != 2 || nat.size(1) % kBlockN != 0)
    throw Error(fmt::format("tile_pack_wscales: expected (K/64, N) with N % 128 == 0, got {}", shape_str(nat.shape())));
  const size_t eb = elem_bytes(nat, "tile_pack_wscales");
  const int64_t G = nat.size(0), N = nat.size(1), T = N / kBlockN;
  Tensor out = Tensor::empty(nat.dtype(), {T, G, kBlockN});
  const uint8_t* s = static_cast<const uint8_t*>(nat.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)  // TS[t, g, j] = S[g, t·128 + j]
      std::memcpy(d + ((t * G + g) * kBlockN) * eb, s + (g * N + t * kBlockN) * eb, kBlockN * eb);
  return out;
}

Tensor tile_unpack_wscales(const Tensor& tile) {
  if (tile.dim() != 3 || tile.size(2) != kBlockN)
    throw Error(fmt::format("tile_unpack_wscales: expected (N/128, K/64, 128), got {}", shape_str(tile.shape())));
  const size_t eb = elem_bytes(tile, "tile_unpack_wscales");
  const int64_t T = tile.size(0), G = tile.size(1), N = T * kBlockN;
  Tensor out = Tensor::empty(tile.dtype(), {G, N});
  const uint8_t* s = static_cast<const uint8_t*>(tile.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      std::memcpy(d + (g * N + t * kBlockN) * eb, s + ((t * G + g) * kBlockN) * eb, kBlockN * eb);
  return out;
}

Tensor tile_pack_proj_up(const Tensor& nat) {
  if (nat.dim() != 2 || nat.size(0) % kBlockN != 0)
    throw Error(fmt::format("tile_pack_proj_up: expected (N, R) with N % 128 == 0, got {}", shape_str(nat.shape())));
  const size_t eb = elem_bytes(nat, "tile_pack_proj_up");
  const int64_t N = nat.size(0), R = nat.size(1), T = N / kBlockN;
  Tensor out = Tensor::empty(nat.dtype(), {T, R, kBlockN});
  const uint8_t* s = static_cast<const uint8_t*>(nat.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < kBlockN; ++j)  // TU[t, r, j] = U[t·128 + j, r]
        std::memcpy(d + ((t * R + r) * kBlockN + j) * eb, s + ((t * kBlockN + j) * R + r) * eb, eb);
  return out;
}

Tensor tile_unpack_proj_up(const Tensor& tile) {
  if (tile.dim() != 3 || tile.size(2) != kBlockN)
    throw Error(fmt::format("tile_unpack_proj_up: expected (N/128, R, 128), got {}", shape_str(tile.shape())));
  const size_t eb = elem_bytes(tile, "tile_unpack_proj_up");
  const int64_t T = tile.size(0), R = tile.size(1), N = T * kBlockN;
  Tensor out = Tensor::empty(tile.dtype(), {N, R});
  const uint8_t* s = static_cast<const uint8_t*>(tile.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < kBlockN; ++j)
        std::memcpy(d + ((t * kBlockN + j) * R + r) * eb, s + ((t * R + r) * kBlockN + j) * eb, eb);
  return out;
}

SvdquantW4A4Params svdquant_to_natural(const SvdquantW4A4Params& p) {
  SvdquantW4A4Params q = p;
  if (p.tile_packed) {
    q.qweight = tile_unpack_weight(p.qweight);
    q.wscales = tile_unpack_wscales(p.wscales);
    q.tile_packed = false;
  }
  if (p.proj_up_tile) {
    q.proj_up = tile_unpack_proj_up(p.proj_up);
    q.proj_up_tile = false;
  }
  return q;
}

SvdquantW4A4Params svdquant_to_tile(const SvdquantW4A4Params& p) {
  SvdquantW4A4Params q = p;
  if (!p.tile_packed) {
    q.qweight = tile_pack_weight(p.qweight);
    q.wscales = tile_pack_wscales(p.wscales);
    q.tile_packed = true;
  }
  if (!p.proj_up_tile) {
    q.proj_up = tile_pack_proj_up(p.proj_up);
    q.proj_up_tile = true;
  }
  return q;
}

// ---------------------------------------------------------------- typed params and validation
SvdquantW4A4Params svdquant_params(const QuantizedLayer& layer) {
  if (!layer.format || layer.format->fused != FusedKernel::SvdquantW4A4)
    throw Error(fmt::format("layer '{}': expected format svdquant_w4a4, got {}", layer.name,
                            layer.format ? layer.format->name : std::string("none (float layer)")));
  SvdquantW4A4Params p;
  p.qweight = param_of(layer, "weight");
  p.wscales = param_of(layer, "weight_scale");
  p.smooth = param_of(layer, "smooth_factor");
  p.proj_down = param_of(layer, "proj_down");
  p.proj_up = param_of(layer, "proj_up");
  p.bias = layer.bias;
  p.N = layer.N;
  p.K = layer.K;
  p.R = layer.rank;
  p.act_unsigned = layer.act_unsigned;
  p.tile_packed = p.qweight.dim() == 4;
  p.proj_up_tile = p.proj_up.dim() == 3;
  return p;
}

void validate(const SvdquantW4A4Params& p, const std::string& what) {
  if (!p.qweight.defined()) throw Error(fmt::format("{}: 'weight' (qweight) is missing", what));
  if (!p.wscales.defined()) throw Error(fmt::format("{}: 'weight_scale' (wscales) is missing", what));
  if (!p.smooth.defined()) throw Error(fmt::format("{}: 'smooth_factor' is missing", what));
  if (!p.proj_down.defined()) throw Error(fmt::format("{}: 'proj_down' is missing", what));
  if (!p.proj_up.defined()) throw Error(fmt::format("{}: 'proj_up' is missing", what));
  check_dtype(p.qweight, {DType::I8}, what + ": weight (qweight)");
  const int64_t N = p.N, K = p.K, R = p.R;
  if (N <= 0 || K <= 0 || K % kGroup != 0)
    throw Error(fmt::format("{}: expected N > 0 and K a positive multiple of 64, got N={}, K={}", what, N, K));
  if (R < 0) throw Error(fmt::format("{}: rank R must be >= 0, got {}", what, R));
  const bool tile = p.qweight.dim() == 4;
  if (tile != p.tile_packed)
    throw Error(fmt::format("{}: weight (qweight) is {}-D but the params say tile_packed={}", what, p.qweight.dim(),
                            p.tile_packed));
  if (tile) {
    if (N % kBlockN != 0)
      throw Error(fmt::format("{}: tile-packed weight needs N % 128 == 0, got N={}", what, N));
    check_shape(p.qweight, {N / kBlockN, K / kGroup, 32, kBlockN}, what + ": weight (tile-packed (N/128, K/64, 32, 128))");
    if (p.wscales.dim() != 3)
      throw Error(fmt::format("{}: weight_scale: a tile-packed weight needs a tile-packed (N/128, K/64, 128) scale, got {}",
                              what, shape_str(p.wscales.shape())));
    check_shape(p.wscales, {N / kBlockN, K / kGroup, kBlockN}, what + ": weight_scale (tile-packed (N/128, K/64, 128))");
  } else {
    check_shape(p.qweight, {N, K / 2}, what + ": weight (qweight) (N, K/2)");
    check_shape(p.wscales, {K / kGroup, N}, what + ": weight_scale (K/64, N)");
  }
  need_float(p.wscales, what + ": weight_scale");
  need_float(p.smooth, what + ": smooth_factor");
  check_shape(p.smooth, {K}, what + ": smooth_factor (K)");
  need_float(p.proj_down, what + ": proj_down");
  check_shape(p.proj_down, {K, R}, what + ": proj_down (K, R)");
  need_float(p.proj_up, what + ": proj_up");
  const bool up_tile = p.proj_up.dim() == 3;
  if (up_tile != p.proj_up_tile)
    throw Error(fmt::format("{}: proj_up is {}-D but the params say proj_up_tile={}", what, p.proj_up.dim(),
                            p.proj_up_tile));
  if (up_tile) {
    if (N % kBlockN != 0)
      throw Error(fmt::format("{}: tile-packed proj_up needs N % 128 == 0, got N={}", what, N));
    check_shape(p.proj_up, {N / kBlockN, R, kBlockN}, what + ": proj_up (tile-packed (N/128, R, 128))");
  } else {
    check_shape(p.proj_up, {N, R}, what + ": proj_up (N, R)");
  }
  if (p.bias.defined()) {
    need_float(p.bias, what + ": bias");
    check_shape(p.bias, {N}, what + ": bias (N)");
  }
}

namespace formats {

void bind_svdquant_w4a4(QuantizedLayer& layer) {
  const std::string what = fmt::format("layer '{}' (svdquant_w4a4)", layer.name);
  const Tensor& w = param_of(layer, "weight");
  if (w.dtype() != DType::I8)
    throw Error(fmt::format("{}: key 'weight': expected I8, got {} {}", what, dtype_name(w.dtype()), shape_str(w.shape())));
  if (w.dim() == 2) {
    layer.N = w.size(0);
    layer.K = checked_mul(2, w.size(1), what + ": key 'weight': K = 2·shape[1]");
    layer.tile_packed = false;
  } else if (w.dim() == 4) {
    if (w.size(2) != 32 || w.size(3) != kBlockN)
      throw Error(fmt::format("{}: key 'weight': expected tile-packed (N/128, K/64, 32, 128), got {}", what,
                              shape_str(w.shape())));
    layer.N = checked_mul(w.size(0), kBlockN, what + ": key 'weight': N = 128·shape[0]");
    layer.K = checked_mul(w.size(1), kGroup, what + ": key 'weight': K = 64·shape[1]");
    layer.tile_packed = true;
  } else {
    throw Error(fmt::format("{}: key 'weight': expected natural (N, K/2) or tile-packed (N/128, K/64, 32, 128), got {}",
                            what, shape_str(w.shape())));
  }
  if (layer.K <= 0 || layer.K % kGroup != 0)
    throw Error(fmt::format("{}: key 'weight': in_features K={} is not a positive multiple of 64 (shape {})", what,
                            layer.K, shape_str(w.shape())));
  const Tensor& down = param_of(layer, "proj_down");
  if (down.dim() != 2)
    throw Error(fmt::format("{}: key 'proj_down': expected (K, R) = ({}, R), got {}", what, layer.K,
                            shape_str(down.shape())));
  layer.rank = down.size(1);

  // act_unsigned: the config wins; only when the key is absent, infer it for post-GELU fc2 layers.
  if (layer.config.act_unsigned.has_value()) {
    layer.act_unsigned = *layer.config.act_unsigned;
  } else {
    layer.act_unsigned = false;
    for (const char* suffix : {".img_mlp.net.2", ".txt_mlp.net.2", ".ff.net.2"}) {
      if (ends_with(layer.name, suffix) || layer.name == std::string(suffix + 1)) {
        layer.act_unsigned = true;
        layer.warnings.push_back(fmt::format(
            "{}: config has no 'act_unsigned'; inferred act_unsigned=true from the layer name (post-GELU '{}')", what,
            suffix + 1));
        break;
      }
    }
  }

  validate(svdquant_params(layer), what);

  const std::string& basis = layer.config.lowrank_branch_input_basis;
  if (basis == "post_smoothing") {
    // proj_down_raw[k, r] = proj_down[k, r] / smooth[k] (spec §3.6); a zero smooth entry makes the
    // quantizer's 1/s zero, and the folded row 0 likewise.
    const Tensor& smooth = param_of(layer, "smooth_factor");
    const int64_t K = layer.K, R = layer.rank;
    Tensor folded = Tensor::empty(DType::F32, {K, R});
    float* f = folded.mutable_data<float>();
    for (int64_t k = 0; k < K; ++k) {
      const float s = elem_f32(smooth, k);
      for (int64_t r = 0; r < R; ++r) f[k * R + r] = std::fabs(s) > 1e-10f ? elem_f32(down, k * R + r) / s : 0.0f;
    }
    layer.params["proj_down"] = folded;
    layer.config.lowrank_branch_input_basis = "raw";
    layer.config.proj_down_smooth_folded = true;
    layer.warnings.push_back(fmt::format(
        "{}: lowrank_branch_input_basis 'post_smoothing' folded at load: proj_down rows divided by smooth_factor "
        "(now an F32 tensor in the raw basis)",
        what));
  } else if (!basis.empty() && basis != "raw") {
    throw Error(fmt::format("{}: config 'lowrank_branch_input_basis': expected \"raw\" or \"post_smoothing\", got \"{}\"",
                            what, basis));
  }
}

Tensor dequantize_svdquant_w4a4(const QuantizedLayer& layer) {
  SvdquantW4A4Params p = svdquant_params(layer);
  validate(p, fmt::format("layer '{}' (svdquant_w4a4)", layer.name));
  p = svdquant_to_natural(p);
  const int64_t N = p.N, K = p.K, R = p.R;
  const Tensor down = p.proj_down.to_f32(), up = p.proj_up.to_f32();
  const float* dn = down.data<float>();
  const float* u = up.data<float>();
  std::vector<float> smooth(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) smooth[size_t(k)] = elem_f32(p.smooth, k);
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* y = out.mutable_data<float>();
  const uint8_t* q = p.qweight.data<uint8_t>();
  // proj_down transposed to (R, K): the low-rank sum of every element runs over r in ascending
  // order as before, but as R contiguous axpys per row (vectorisable). Rows on the pool: every
  // element is computed the same way whatever the thread count.
  std::vector<float> dnt(static_cast<size_t>(R * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) dnt[size_t(r * K + k)] = dn[k * R + r];
  parallel_for_range(N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> low(static_cast<size_t>(K)), ws(static_cast<size_t>(K / kGroup + 1));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g * kGroup < K; ++g) ws[size_t(g)] = elem_f32(p.wscales, g * N + n);
      std::fill(low.begin(), low.end(), 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        const float un = u[n * R + r];
        const float* d = dnt.data() + r * K;
        for (int64_t k = 0; k < K; ++k) low[size_t(k)] += un * d[k];
      }
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = q[n * (K / 2) + k / 2];
        const int code = (k % 2 == 0) ? unpack_lo_signed(byte) : unpack_hi_signed(byte);
        const float s = smooth[size_t(k)];
        // The quantizer multiplies by 1/s and uses 0 for |s| <= 1e-10 (spec §3.3): such columns
        // contribute nothing on the main path.
        const float main = std::fabs(s) > 1e-10f ? float(code) * ws[size_t(k / kGroup)] / s : 0.0f;
        y[n * K + k] = main + low[size_t(k)];
      }
    }
  });
  return out;
}

}  // namespace formats
}  // namespace nibble
