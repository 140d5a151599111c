// svd.cpp — randomized / exact truncated SVD (see svd.h).
#include "svd.h"

#include <algorithm>
#include <cmath>

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <fmt/format.h>

#include "gemm_skinny.h"

namespace nibble::convert_detail {
namespace {

using MatRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatD = Eigen::MatrixXd;

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int64_t pad16(int64_t v) { return (v + 15) / 16 * 16; }

// In place: the first `l` columns of A (rows × Lp, row-major) become an orthonormal basis of their
// span (Householder QR in double); padding columns stay zero.
void orthonormalize(MatRF& A, int64_t l) {
  MatD Ad = A.leftCols(l).cast<double>();
  Eigen::HouseholderQR<MatD> qr(Ad);
  MatD Q = qr.householderQ() * MatD::Identity(Ad.rows(), l);
  A.leftCols(l) = Q.cast<float>();
}

}  // namespace

void matmul_nn(const float* W, const float* V, int64_t N, int64_t K, int64_t R, float* out) {
  const int64_t Rp = pad16(R);
  MatRF Vp = MatRF::Zero(K, Rp), Y(N, Rp);
  Vp.leftCols(R) = Eigen::Map<const MatRF>(V, K, R);
  skinny_nn(W, N, K, Vp.data(), Rp, Y.data());
  Eigen::Map<MatRF>(out, N, R) = Y.leftCols(R);
}

void matmul_nt(const float* A, const float* B, int64_t N, int64_t K, int64_t R, float* out, int accumulate) {
  MatRF Bt = Eigen::Map<const MatRF>(B, K, R).transpose();
  expand_lowrank(A, Bt.data(), N, K, R, out, accumulate != 0, accumulate < 0 ? -1.0f : 1.0f);
}

LowRank truncated_svd(const float* W, int64_t N, int64_t K, int64_t R, SvdMethod method, uint64_t seed,
                      int oversample, int power_iterations) {
  LowRank out;
  out.N = N; out.K = K;
  R = std::max<int64_t>(0, std::min({R, N, K}));
  out.R = R;
  out.U.assign(size_t(N * R), 0.f);
  out.V.assign(size_t(K * R), 0.f);
  out.sigma.assign(size_t(R), 0.f);
  if (R == 0) return out;
  Eigen::Map<const MatRF> Wm(W, N, K);

  MatD Vd;      // (K, R) right singular vectors
  Eigen::VectorXd sd;
  if (method == SvdMethod::Exact) {
    MatD Wd = Wm.cast<double>();
    Eigen::BDCSVD<MatD> svd(Wd, Eigen::ComputeThinV);
    Vd = svd.matrixV().leftCols(R);
    sd = svd.singularValues().head(R);
  } else {
    const int64_t l = std::min<int64_t>(std::min(N, K), R + std::max(0, oversample));
    const int64_t Lp = pad16(l);
    // Gaussian test matrix Ω (K, l), zero-padded to Lp columns.
    MatRF Omega = MatRF::Zero(K, Lp);
    uint64_t s = seed ^ 0x6a09e667f3bcc909ull;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < l; j += 2) {
        const double u1 = (double(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
        const double u2 = (double(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
        const double r = std::sqrt(-2.0 * std::log(u1)), t = 6.283185307179586 * u2;
        Omega(k, j) = float(r * std::cos(t));
        if (j + 1 < l) Omega(k, j + 1) = float(r * std::sin(t));
      }
    MatRF Q = MatRF::Zero(N, Lp), Z = MatRF::Zero(K, Lp);
    skinny_nn(W, N, K, Omega.data(), Lp, Q.data());       // Y = W Ω
    orthonormalize(Q, l);
    for (int it = 0; it < power_iterations; ++it) {
      skinny_tn(W, N, K, Q.data(), Lp, Z.data());         // Z = Wᵀ Q
      orthonormalize(Z, l);
      skinny_nn(W, N, K, Z.data(), Lp, Q.data());         // Y = W Z
      orthonormalize(Q, l);
    }
    // Bᵀ = Wᵀ Q (K, l); B = Qᵀ W = Ub Σ Vbᵀ, so W ≈ (Q Ub) Σ Vbᵀ and Vb = left vectors of Bᵀ.
    skinny_tn(W, N, K, Q.data(), Lp, Z.data());
    // Left vectors of the tall Bᵀ via QR: Bᵀ = Qz Rz, Rz = Ur Σ Vrᵀ (small SVD) → Bᵀ's U = Qz Ur.
    MatD Btd = Z.leftCols(l).cast<double>();
    Eigen::HouseholderQR<MatD> qr(Btd);
    MatD Qz = qr.householderQ() * MatD::Identity(K, l);
    MatD Rz = qr.matrixQR().topRows(l).triangularView<Eigen::Upper>();
    Eigen::JacobiSVD<MatD> svd(Rz, Eigen::ComputeFullU);
    Vd = Qz * svd.matrixU().leftCols(R);
    sd = svd.singularValues().head(R);
  }
  // Fix the sign of each vector (largest |component| positive) so results are canonical.
  for (int64_t r = 0; r < R; ++r) {
    Eigen::Index idx;
    Vd.col(r).cwiseAbs().maxCoeff(&idx);
    if (Vd(idx, r) < 0) Vd.col(r) = -Vd.col(r);
  }
  MatRF Vf = Vd.cast<float>();
  std::copy(Vf.data(), Vf.data() + K * R, out.V.data());
  for (int64_t r = 0; r < R; ++r) out.sigma[size_t(r)] = float(sd(r));
  matmul_nn(W, out.V.data(), N, K, R, out.U.data());      // U = W·V (includes Σ)
  return out;
}

}  // namespace nibble::convert_detail
