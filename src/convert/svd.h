// svd.h — truncated SVD for the converter (internal).
//
// W (N, K) ≈ U·Vᵀ with V (K, R) orthonormal columns and U (N, R) = W·V (left vectors times singular
// values). Randomized (Halko–Martinsson–Tropp: Gaussian test matrix with oversampling, power
// iterations, re-orthonormalized every pass) or exact (Eigen BDCSVD, for checking). The big
// products go through linear_f32 (ISA-dispatched, fixed work split → deterministic); the small
// factorizations run in double on Eigen, single-threaded. The test matrix is a pure function of
// (seed, K, l), so the result is deterministic.
#pragma once
#include <cstdint>
#include <vector>

#include "nibble/convert.h"

namespace nibble::convert_detail {

struct LowRank {
  int64_t N = 0, K = 0, R = 0;
  std::vector<float> U;      // (N, R) row-major
  std::vector<float> V;      // (K, R) row-major, orthonormal columns
  std::vector<float> sigma;  // (R) singular values, descending
};

// W is a row-major F32 (N, K) buffer. R ≤ min(N, K) (clamped).
LowRank truncated_svd(const float* W, int64_t N, int64_t K, int64_t R, SvdMethod method, uint64_t seed,
                      int oversample = 8, int power_iterations = 2);

// out (N, K) = A (N, R) · B (K, R)ᵀ; `out` is overwritten (or accumulated into with sign when
// `accumulate` is ±1: out += sign·A·Bᵀ).
void matmul_nt(const float* A, const float* B, int64_t N, int64_t K, int64_t R, float* out, int accumulate = 0);
// out (N, R) = W (N, K) · V (K, R).
void matmul_nn(const float* W, const float* V, int64_t N, int64_t K, int64_t R, float* out);

}  // namespace nibble::convert_detail
