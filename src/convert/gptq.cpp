// gptq.cpp — the GPTQ factor and Gram matrix (gptq.h); the sweep itself is a template there.
#include "gptq.h"

#include <fmt/format.h>

#include "nibble/tensor.h"

namespace nibble::convert_detail {

Eigen::MatrixXd gram(const float* X, int64_t M, int64_t K) {
  using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMatF> x(X, M, K);
  const Eigen::MatrixXd xd = x.cast<double>();
  Eigen::MatrixXd H = Eigen::MatrixXd::Zero(K, K);
  H.selfadjointView<Eigen::Lower>().rankUpdate(xd.transpose());
  return H.selfadjointView<Eigen::Lower>();
}

GptqFactor gptq_factor(Eigen::MatrixXd H, double damp) {
  const int64_t K = H.rows();
  double mean_diag = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (!(H(k, k) > 0)) H(k, k) = 1;
    mean_diag += H(k, k);
  }
  mean_diag /= double(std::max<int64_t>(K, 1));
  H.diagonal().array() += damp * mean_diag;
  Eigen::LLT<Eigen::MatrixXd> llt(H);
  if (llt.info() != Eigen::Success)
    throw Error(fmt::format("gptq: the calibration Hessian ({}×{}) is not positive definite after dampening {}", K, K, damp));
  const Eigen::MatrixXd Hinv = llt.solve(Eigen::MatrixXd::Identity(K, K));
  Eigen::LLT<Eigen::MatrixXd> l2(Hinv);
  if (l2.info() != Eigen::Success)
    throw Error(fmt::format("gptq: the inverse Hessian ({}×{}) is not positive definite", K, K));
  return Eigen::MatrixXd(l2.matrixU()).cast<float>();
}

}  // namespace nibble::convert_detail
