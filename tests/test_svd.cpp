// test_svd.cpp — randomized truncated SVD vs exact (Eigen BDCSVD): singular values, captured
// energy, orthonormality, determinism. The speed at true Qwen-Image shapes is a benchmark
// (bench/bench_svd.cpp), not a test.
#include <gtest/gtest.h>

#include <cmath>

#include "convert/svd.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

using namespace nibble;
using namespace nibble::convert_detail;

namespace {
// ‖W − U·Vᵀ‖_F² / ‖W‖_F²
double residual_energy(const Tensor& W, const LowRank& lr) {
  const int64_t N = W.size(0), K = W.size(1);
  std::vector<float> L(size_t(N * K));
  matmul_nt(lr.U.data(), lr.V.data(), N, K, lr.R, L.data(), 0);
  double num = 0, den = 0;
  for (int64_t i = 0; i < N * K; ++i) {
    const double w = W.data<float>()[i];
    num += (w - L[size_t(i)]) * (w - L[size_t(i)]);
    den += w * w;
  }
  return num / den;
}
}  // namespace

TEST(Svd, RandomizedMatchesExact) {
  for (auto [N, K] : {std::pair<int64_t, int64_t>{96, 256}, {256, 128}, {200, 320}}) {
    Tensor W = synth_weight(N, K, uint64_t(N * 1000 + K));
    const int64_t R = 16;
    LowRank ex = truncated_svd(W.data<float>(), N, K, R, SvdMethod::Exact, 1);
    LowRank rs = truncated_svd(W.data<float>(), N, K, R, SvdMethod::Randomized, 1);
    ASSERT_EQ(rs.R, R);
    // Leading singular values agree closely (dominant directions are well separated).
    for (int r = 0; r < 4; ++r) EXPECT_NEAR(rs.sigma[r], ex.sigma[r], 1e-3 * ex.sigma[0]) << N << "x" << K << " r=" << r;
    // Residual energy within 1% (relative) of the optimum: measured +0.58 to +0.63%.
    const double e_ex = residual_energy(W, ex), e_rs = residual_energy(W, rs);
    EXPECT_LE(e_rs, e_ex * 1.01 + 1e-6) << N << "x" << K;
    // V orthonormal: VᵀV = I within fp32 rounding of a K-long dot (K·2^-24 ≪ 1e-4).
    for (int64_t a = 0; a < R; ++a)
      for (int64_t b = 0; b < R; ++b) {
        double d = 0;
        for (int64_t k = 0; k < K; ++k) d += double(rs.V[size_t(k * R + a)]) * rs.V[size_t(k * R + b)];
        EXPECT_NEAR(d, a == b ? 1.0 : 0.0, 1e-4);
      }
  }
}

TEST(Svd, DeterministicAcrossThreads) {
  Tensor W = synth_weight(128, 192, 5);
  set_num_threads(1);
  LowRank a = truncated_svd(W.data<float>(), 128, 192, 8, SvdMethod::Randomized, 3);
  set_num_threads(2);
  LowRank b = truncated_svd(W.data<float>(), 128, 192, 8, SvdMethod::Randomized, 3);
  set_num_threads(0);
  EXPECT_EQ(a.U, b.U);
  EXPECT_EQ(a.V, b.V);
}

TEST(Svd, RankClampedAndZeroRank) {
  Tensor W = synth_weight(8, 64, 5);
  LowRank a = truncated_svd(W.data<float>(), 8, 64, 32, SvdMethod::Randomized, 3);
  EXPECT_EQ(a.R, 8);
  EXPECT_LT(residual_energy(W, a), 1e-8);
  LowRank z = truncated_svd(W.data<float>(), 8, 64, 0, SvdMethod::Randomized, 3);
  EXPECT_EQ(z.R, 0);
}
