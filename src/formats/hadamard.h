// src/formats/hadamard.h — the regular Hadamard rotation of the convrot formats (spec §4.2).
//
// H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]], H_n = H4 ⊗ … ⊗ H4 (n a power of 4),
// normalised by 1/√n (an exact power of two). Because every Kronecker factor is the same
// symmetric H4, H_n[i][j] = Π_t H4[i_t][j_t] over the base-4 digits of i and j, whatever the digit
// order, and the rotation factorises into log4(n) passes of 4-point butterflies (O(n log n)).
#pragma once
#include <cstdint>

namespace nibble::formats {

// True if n is 4^p for some p ≥ 0.
bool is_power_of_4(int64_t n);
// H_n[i][j] ∈ {+1, -1} (unnormalised).
int hadamard_sign(int64_t n, int64_t i, int64_t j);
// In place: row[g·n .. g·n+n) ← row_g · H_nᵀ / √n for every group g of a row of length `len`
// (len % n == 0, n a power of 4).
void hadamard_rotate_groups(float* row, int64_t len, int64_t n);

}  // namespace nibble::formats
