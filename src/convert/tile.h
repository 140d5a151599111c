// tile.h — the converter's own natural ↔ kitchen_tile_packed_w4a4 permutations (spec §3.2), kept
// internal (the runtime's formats.h versions belong to the formats area); pure byte/element moves.
#pragma once
#include "nibble/tensor.h"

namespace nibble::convert_detail {
Tensor tile_weight(const Tensor& natural);    // (N, K/2) I8 → (N/128, K/64, 32, 128)
Tensor untile_weight(const Tensor& tile);
Tensor tile_wscales(const Tensor& natural);   // (K/64, N) → (N/128, K/64, 128)
Tensor untile_wscales(const Tensor& tile);
Tensor tile_proj_up(const Tensor& natural);   // (N, R) → (N/128, R, 128)
Tensor untile_proj_up(const Tensor& tile);
}  // namespace nibble::convert_detail
