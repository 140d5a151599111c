// linear_f32: every ISA path against an fp64 oracle with a derived bound, thread-count invariance,
// input validation.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/linear_f32_kernels.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "isa_guard.h"

using namespace nibble;

namespace {

Tensor random_tensor(DType dt, Shape shape, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor f = Tensor::empty(DType::F32, shape);
  float* p = f.mutable_data<float>();
  for (int64_t i = 0; i < f.numel(); ++i) p[i] = nd(rng);
  return dt == DType::F32 ? f : f.to(dt);
}


// |fl(Σ x·w) − Σ x·w| ≤ γ_K Σ|x·w| with γ_K = K·u/(1 − K·u), u = 2^-24 (any summation order, with or
// without FMA), plus one rounding of the bias add.
void check_against_fp64(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) {
  const Tensor xf = x.to_f32(), wf = w.to_f32();
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  const double u = std::ldexp(1.0, -24), gamma = K * u / (1 - K * u);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double exact = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(xf.data<float>()[m * K + k]) * double(wf.data<float>()[n * K + k]);
        exact += p;
        mag += std::fabs(p);
      }
      double bias = b.defined() ? double(b.to_f32().data<float>()[n]) : 0.0;
      const double tol = gamma * mag + u * (std::fabs(exact) + gamma * mag + std::fabs(bias)) + 1e-30;
      const float got = y.data<float>()[m * N + n];
      ASSERT_FALSE(std::isnan(got)) << "m=" << m << " n=" << n;
      ASSERT_LE(std::fabs(double(got) - (exact + bias)), tol) << "m=" << m << " n=" << n << " K=" << K;
    }
}

}  // namespace

TEST(LinearF32, AllIsasMatchFp64Oracle) {
  IsaGuard guard;
  std::mt19937 rng(1234);
  const int64_t shapes[][3] = {{1, 1, 1},   {1, 17, 33},  {3, 64, 31},   {7, 100, 65},  {8, 32, 32},
                               {9, 257, 33}, {16, 300, 129}, {33, 513, 70}, {64, 64, 200}, {5, 4, 3},
                               {12, 1025, 33}, {9, 2100, 40}};  // K across two and three k chunks (kKc)
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (auto& s : shapes)
      for (DType wdt : {DType::F32, DType::BF16, DType::F16}) {
        const Tensor x = random_tensor(DType::F32, {s[0], s[1]}, rng);
        const Tensor w = random_tensor(wdt, {s[2], s[1]}, rng);
        const Tensor b = random_tensor(DType::F32, {s[2]}, rng);
        SCOPED_TRACE(std::string(isa_name(isa)) + " " + std::string(dtype_name(wdt)));
        check_against_fp64(x, w, b, linear_f32(x, w, b));
        check_against_fp64(x, w, {}, linear_f32(x, w));
      }
  }
}

TEST(LinearF32, LeadingShapeKept) {
  std::mt19937 rng(7);
  const Tensor x = random_tensor(DType::BF16, {2, 3, 5, 64}, rng);
  const Tensor w = random_tensor(DType::BF16, {40, 64}, rng);
  const Tensor y = linear_f32(x, w);
  EXPECT_EQ(y.shape(), (Shape{2, 3, 5, 40}));
  EXPECT_EQ(y.dtype(), DType::F32);
  check_against_fp64(x, w, {}, y);
}

TEST(LinearF32, BitIdenticalForAnyThreadCount) {
  std::mt19937 rng(99);
  const int saved = num_threads();
  for (int64_t M : {1, 5, 40}) {
    const Tensor x = random_tensor(DType::F32, {M, 700}, rng);
    const Tensor w = random_tensor(DType::F32, {300, 700}, rng);
    set_num_threads(1);
    const Tensor y1 = linear_f32(x, w);
    set_num_threads(3);
    const Tensor y3 = linear_f32(x, w);
    ASSERT_EQ(0, std::memcmp(y1.raw(), y3.raw(), y1.nbytes())) << "M=" << M;
  }
  set_num_threads(saved);
}

TEST(LinearF32, RejectsBadInputs) {
  const Tensor x = Tensor::zeros(DType::F32, {2, 8});
  EXPECT_THROW(linear_f32(x, Tensor::zeros(DType::F32, {4, 7})), Error);
  EXPECT_THROW(linear_f32(x, Tensor::zeros(DType::I8, {4, 8})), Error);
  EXPECT_THROW(linear_f32(x, Tensor::zeros(DType::F32, {4, 8}), Tensor::zeros(DType::F32, {5})), Error);
  EXPECT_THROW(linear_f32(x, Tensor::zeros(DType::F32, {8})), Error);
}

// The internal drivers write every output element: outputs poisoned with NaN before each call.
TEST(LinearF32, DriversOverwriteNaNPoisonedOutputs) {
  using namespace nibble::kernels::linear;
  IsaGuard guard;
  std::mt19937 rng(21);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (auto [M, N, K] : {std::tuple{1, 33, 17}, std::tuple{9, 65, 300}, std::tuple{20, 32, 64}, std::tuple{7, 129, 5}}) {
      const Tensor x = random_tensor(DType::F32, {M, K}, rng), w = random_tensor(DType::BF16, {N, K}, rng);
      const Tensor b = random_tensor(DType::F32, {N}, rng);
      std::vector<float> y(size_t(M * N), std::nanf(""));
      run_rows(x.data<float>(), M, K, w.raw(), w.dtype(), N, b.data<float>(), y.data());
      Tensor yt = Tensor::from_bytes(DType::F32, {M, N}, y.data(), y.size() * 4);
      check_against_fp64(x, w, b, yt);
      const PackedF32Weight p = pack_weight(w.raw(), w.dtype(), N, K);
      std::fill(y.begin(), y.end(), std::nanf(""));
      run_packed(x.data<float>(), M, p, b.data<float>(), y.data());
      yt = Tensor::from_bytes(DType::F32, {M, N}, y.data(), y.size() * 4);
      check_against_fp64(x, w, b, yt);
    }
  }
}
