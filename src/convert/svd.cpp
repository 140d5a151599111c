// svd.cpp — randomized / exact truncated SVD (see svd.h).
#include "svd.h"

#include <algorithm>
#include <cmath>

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <fmt/format.h>

#include "nibble/ops.h"

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

// Orthonormal basis of the columns of A (rows × l), thin, in double; returned as float row-major.
MatRF orthonormalize(const MatRF& A) {
  MatD Ad = A.cast<double>();
  Eigen::HouseholderQR<MatD> qr(Ad);
  MatD Q = qr.householderQ() * MatD::Identity(Ad.rows(), Ad.cols());
  return Q.cast<float>();
}

// y (M, R) = x (M, K) · w (R, K)ᵀ through linear_f32 (fp32, ISA dispatched, deterministic split).
MatRF gemm_nt(const float* x, int64_t M, int64_t K, const MatRF& w) {
  Tensor xt = Tensor::view(DType::F32, {M, K}, x, nullptr);
  Tensor wt = Tensor::view(DType::F32, {int64_t(w.rows()), K}, w.data(), nullptr);
  Tensor y = linear_f32(xt, wt);
  MatRF out(M, w.rows());
  std::copy(y.data<float>(), y.data<float>() + y.numel(), out.data());
  return out;
}

}  // namespace

void matmul_nn(const float* W, const float* V, int64_t N, int64_t K, int64_t R, float* out) {
  Eigen::Map<const MatRF> Vm(V, K, R);
  MatRF Vt = Vm.transpose();
  MatRF y = gemm_nt(W, N, K, Vt);
  std::copy(y.data(), y.data() + N * R, out);
}

void matmul_nt(const float* A, const float* B, int64_t N, int64_t K, int64_t R, float* out, int accumulate) {
  Tensor at = Tensor::view(DType::F32, {N, R}, A, nullptr);
  Tensor bt = Tensor::view(DType::F32, {K, R}, B, nullptr);
  if (accumulate == 0) {
    Tensor y = linear_f32(at, bt);
    std::copy(y.data<float>(), y.data<float>() + N * K, out);
    return;
  }
  // Row blocks keep the temporary small.
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(K, 1));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    Tensor y = linear_f32(at.slice_rows(n0, n1), bt);
    const float* yp = y.data<float>();
    float* o = out + n0 * K;
    const int64_t cnt = (n1 - n0) * K;
    if (accumulate > 0) for (int64_t i = 0; i < cnt; ++i) o[i] += yp[i];
    else for (int64_t i = 0; i < cnt; ++i) o[i] -= yp[i];
  }
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
    // Gaussian test matrix Ω (K, l), stored transposed (l, K) for gemm_nt.
    MatRF OmegaT(l, K);
    uint64_t s = seed ^ 0x6a09e667f3bcc909ull;
    for (int64_t i = 0; i < l * K; i += 2) {
      const double u1 = (double(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
      const double u2 = (double(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
      const double r = std::sqrt(-2.0 * std::log(u1)), t = 6.283185307179586 * u2;
      OmegaT.data()[i] = float(r * std::cos(t));
      if (i + 1 < l * K) OmegaT.data()[i + 1] = float(r * std::sin(t));
    }
    MatRF Q = orthonormalize(gemm_nt(W, N, K, OmegaT));  // (N, l)
    for (int it = 0; it < power_iterations; ++it) {
      MatRF Z = orthonormalize(Wm.transpose() * Q);      // (K, l)
      MatRF Zt = Z.transpose();
      Q = orthonormalize(gemm_nt(W, N, K, Zt));          // (N, l)
    }
    // B = Qᵀ W (l, K); its SVD B = Ub Σ Vbᵀ gives W ≈ (Q Ub) Σ Vbᵀ.
    MatRF Bt = Wm.transpose() * Q;                        // (K, l) = Bᵀ
    MatD Btd = Bt.cast<double>();
    Eigen::JacobiSVD<MatD> svd(Btd, Eigen::ComputeThinU);
    Vd = svd.matrixU().leftCols(R);                       // right singular vectors of W
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
