// gptq.h — GPTQ (Frantar et al. 2022) for the converter's int4 weights (internal).
//
// Minimises ‖X·(Ŵ − W)ᵀ‖² over the stored int4 grid column by column: each column is rounded, its
// error (scaled by the inverse-Hessian factor) is fed back into the columns not yet quantized, so
// later columns compensate for earlier ones along the correlations of the calibration inputs
// (H = XᵀX). Per-group parameters (scale, zero) are chosen when the group's first column is reached,
// from the already-updated values of the group, as GPTQ does. Lazy batch updates: inside a block of
// columns the feedback is applied column by column, to the rest of the row once per block.
//
// Rows are independent (the feedback runs along K), so rows are split over the pool in fixed chunks:
// the result does not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

#include <Eigen/Dense>

#include "nibble/thread_pool.h"

namespace nibble::convert_detail {

// Gram matrix XᵀX (K, K) in double of a row-major (M, K) buffer.
Eigen::MatrixXd gram(const float* X, int64_t M, int64_t K);

// Upper-triangular U with Uᵀ·U = (H + damp·mean(diag H)·I)⁻¹ — GPTQ's factor. Channels with no
// energy (H_kk = 0) get H_kk = 1 first. Throws nibble::Error if H is not positive definite even
// after dampening (damp > 0 makes that impossible for a Gram matrix).
using GptqFactor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
GptqFactor gptq_factor(Eigen::MatrixXd H, double damp);

// The GPTQ sweep over rows [0, N) of the row-major (N, K) buffer W, modified in place into the
// dequantized values Ŵ. `choose(n, g, v)` picks the parameters of row n, group g (G columns) from
// the current values v[0..G); `quant(n, g, x)` returns the grid value of x (and records the code).
// K % G == 0. Rows are processed in fixed chunks on the pool (callbacks must be thread-safe per row).
template <class Choose, class Quant>
void gptq_sweep(float* W, int64_t N, int64_t K, int64_t G, const GptqFactor& U, Choose choose, Quant quant) {
  const int64_t B = G * std::max<int64_t>(1, 128 / G);  // block of columns (whole groups)
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  parallel_for_range(N, 16, [&](int64_t n0, int64_t n1) {
    const int64_t rows = n1 - n0;
    RowMat Err(rows, B);
    for (int64_t b0 = 0; b0 < K; b0 += B) {
      const int64_t b1 = std::min(b0 + B, K), bw = b1 - b0;
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t g = i / G;
        const float d = U(i, i);
        for (int64_t r = 0; r < rows; ++r) {
          float* w = W + (n0 + r) * K;
          if (i % G == 0) choose(n0 + r, g, w + i);
          const float q = quant(n0 + r, g, w[i]);
          const float e = (w[i] - q) / d;
          w[i] = q;
          Err(r, i - b0) = e;
          for (int64_t j = i + 1; j < b1; ++j) w[j] -= e * U(i, j);
        }
      }
      if (b1 < K) {
        Eigen::Map<RowMat, 0, Eigen::OuterStride<>> rest(W + n0 * K + b1, rows, K - b1, Eigen::OuterStride<>(K));
        rest.noalias() -= Err.leftCols(bw) * U.block(b0, b1, bw, K - b1);
      }
    }
  });
}

}  // namespace nibble::convert_detail
