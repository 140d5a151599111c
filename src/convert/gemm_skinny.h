// gemm_skinny.h — the converter's three "one side is thin" fp32 products (internal).
//
// The randomized SVD multiplies a big weight W (N, K) by thin matrices (≤ ~48 columns) and expands
// the rank-R factor back to (N, K). Generic GEMMs pack the big operand for every call; these
// kernels stream it once instead. AVX-512 variants (function-level target attribute, chosen at run
// time from active_isa()) and a portable fallback. Work is split over output blocks with a fixed
// grain and each output's summation order is fixed, so results never depend on the thread count.
#pragma once
#include <cstdint>

namespace nibble::convert_detail {
// Y (N, L) = W (N, K) · B (K, L).
void skinny_nn(const float* W, int64_t N, int64_t K, const float* B, int64_t L, float* Y);
// Z (K, L) = W (N, K)ᵀ · Q (N, L).
void skinny_tn(const float* W, int64_t N, int64_t K, const float* Q, int64_t L, float* Z);
// Y (N, K) = sign·U (N, R) · Vt (R, K)  (accumulate: Y += …; else Y = …).
void expand_lowrank(const float* U, const float* Vt, int64_t N, int64_t K, int64_t R, float* Y, bool accumulate, float sign);
}  // namespace nibble::convert_detail
