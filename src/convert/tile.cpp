// tile.cpp — natural ↔ tile-packed permutations for svdquant_w4a4 (spec §3.2).
#include "tile.h"

#include <cstring>

#include <fmt/format.h>

namespace nibble::convert_detail {
namespace {
void need(bool ok, const std::string& what, const Tensor& t) {
  if (!ok) throw Error(fmt::format("svdquant tile packing: {} (got {} {})", what, dtype_name(t.dtype()), shape_str(t.shape())));
}
}  // namespace

// Each (t, g) tile is 128 rows × 32 bytes, rows in natural order: flat = ((t·G + g)·128 + r)·32 + b.
Tensor tile_weight(const Tensor& nat) {
  need(nat.dim() == 2 && nat.size(0) % 128 == 0 && nat.size(1) % 32 == 0 && dtype_size(nat.dtype()) == 1,
       "weight must be (N, K/2) bytes with N % 128 == 0, K % 64 == 0", nat);
  const int64_t N = nat.size(0), KB = nat.size(1), T = N / 128, G = KB / 32;
  Tensor out = Tensor::empty(nat.dtype(), {T, G, 32, 128});
  const uint8_t* s = static_cast<const uint8_t*>(nat.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < 128; ++r)
        std::memcpy(d + ((t * G + g) * 128 + r) * 32, s + (t * 128 + r) * KB + g * 32, 32);
  return out;
}
Tensor untile_weight(const Tensor& tile) {
  need(tile.dim() == 4 && tile.size(2) == 32 && tile.size(3) == 128 && dtype_size(tile.dtype()) == 1,
       "tile weight must be (N/128, K/64, 32, 128) bytes", tile);
  const int64_t T = tile.size(0), G = tile.size(1), N = T * 128, KB = G * 32;
  Tensor out = Tensor::empty(tile.dtype(), {N, KB});
  const uint8_t* s = static_cast<const uint8_t*>(tile.raw());
  uint8_t* d = static_cast<uint8_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < 128; ++r)
        std::memcpy(d + (t * 128 + r) * KB + g * 32, s + ((t * G + g) * 128 + r) * 32, 32);
  return out;
}
Tensor tile_wscales(const Tensor& nat) {  // TS[t, g, j] = S[g, t·128 + j]
  need(nat.dim() == 2 && nat.size(1) % 128 == 0 && dtype_size(nat.dtype()) == 2, "wscales must be (K/64, N) 16-bit, N % 128 == 0", nat);
  const int64_t G = nat.size(0), N = nat.size(1), T = N / 128;
  Tensor out = Tensor::empty(nat.dtype(), {T, G, 128});
  const uint16_t* s = static_cast<const uint16_t*>(nat.raw());
  uint16_t* d = static_cast<uint16_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) std::memcpy(d + (t * G + g) * 128, s + g * N + t * 128, 256);
  return out;
}
Tensor untile_wscales(const Tensor& tile) {
  need(tile.dim() == 3 && tile.size(2) == 128 && dtype_size(tile.dtype()) == 2, "tile wscales must be (N/128, K/64, 128) 16-bit", tile);
  const int64_t T = tile.size(0), G = tile.size(1), N = T * 128;
  Tensor out = Tensor::empty(tile.dtype(), {G, N});
  const uint16_t* s = static_cast<const uint16_t*>(tile.raw());
  uint16_t* d = static_cast<uint16_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) std::memcpy(d + g * N + t * 128, s + (t * G + g) * 128, 256);
  return out;
}
Tensor tile_proj_up(const Tensor& nat) {  // TU[t, r, j] = U[t·128 + j, r]
  need(nat.dim() == 2 && nat.size(0) % 128 == 0 && dtype_size(nat.dtype()) == 2, "proj_up must be (N, R) 16-bit, N % 128 == 0", nat);
  const int64_t N = nat.size(0), R = nat.size(1), T = N / 128;
  Tensor out = Tensor::empty(nat.dtype(), {T, R, 128});
  const uint16_t* s = static_cast<const uint16_t*>(nat.raw());
  uint16_t* d = static_cast<uint16_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < 128; ++j) d[(t * R + r) * 128 + j] = s[(t * 128 + j) * R + r];
  return out;
}
Tensor untile_proj_up(const Tensor& tile) {
  need(tile.dim() == 3 && tile.size(2) == 128 && dtype_size(tile.dtype()) == 2, "tile proj_up must be (N/128, R, 128) 16-bit", tile);
  const int64_t T = tile.size(0), R = tile.size(1), N = T * 128;
  Tensor out = Tensor::empty(tile.dtype(), {N, R});
  const uint16_t* s = static_cast<const uint16_t*>(tile.raw());
  uint16_t* d = static_cast<uint16_t*>(out.mutable_raw());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < 128; ++j) d[(t * 128 + j) * R + r] = s[(t * R + r) * 128 + j];
  return out;
}

}  // namespace nibble::convert_detail
