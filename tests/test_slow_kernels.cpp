// test_slow_kernels.cpp — the kernels at full Qwen-Image widths against the scalar references
// (`make test-slow`; label "slow", kept out of `make test`).
//
// The fast tests sweep many small shapes; the paths that only engage at real widths — long K
// streams (K = 3072 and 12288), many column blocks and thread tasks (N up to 18432), GEMM tiers
// with M in the hundreds, the prepared tiled GEMV over a 113 MB modulation weight — are checked
// here on fresh random inputs:
//   * awq_w4a16, every supported ISA, stored and prepared weights, against the scalar oracle with
//     the bound of tests/tolerance.h (the same bound test_awq_w4a16.cpp uses);
//   * svdquant_w4a4, every supported ISA, the fused layer and the two kitchen ops, bit for bit
//     against the scalar reference (every variant performs the same fp32 operations in the same
//     order: docs/w4a4.md);
//   * linear_f32 against a double evaluation within γ_K·Σ|x·w|.
// Every result is also checked to be fully written (no NaN: the inputs are finite).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "kernels/awq_w4a16_kernels.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "tolerance.h"
#include "isa_guard.h"

using namespace nibble;

namespace {

constexpr int64_t kD = 3072, kMlp = 12288, kMod = 6 * 3072;  // Qwen-Image widths

uint32_t test_seed() {
  const uint32_t seed = uint32_t(::testing::UnitTest::GetInstance()->random_seed());
  return seed == 0 ? 20261130u : seed;
}

Tensor random_float(std::mt19937& rng, DType dt, Shape shape, float lo, float hi) {
  Tensor f = Tensor::empty(DType::F32, shape);
  std::uniform_real_distribution<float> d(lo, hi);
  float* p = f.mutable_data<float>();
  for (int64_t i = 0; i < f.numel(); ++i) p[i] = d(rng);
  return dt == DType::F32 ? f : f.to(dt);
}

Tensor random_bytes(std::mt19937& rng, Shape shape) {
  Tensor t = Tensor::empty(DType::I8, shape);
  uint8_t* p = t.mutable_data<uint8_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = uint8_t(rng());
  return t;
}

void expect_finite(const Tensor& y, const std::string& what) {
  const Tensor f = y.to_f32();
  for (int64_t i = 0; i < f.numel(); ++i) ASSERT_TRUE(std::isfinite(f.data<float>()[i])) << what << " at " << i;
}


// ------------------------------------------------------------------------------ awq_w4a16
TEST(SlowKernels, AwqFullWidthEveryIsaAgainstOracle) {
  IsaGuard guard;
  std::mt19937 rng(test_seed());
  struct S { int64_t M, N, K, G; DType xdt; };
  const S shapes[] = {
      {1, kMod, kD, 64, DType::BF16},    // the modulation GEMV (img_mod / txt_mod)
      {2, kMod, kD, 128, DType::F32},
      {8, kD, kMlp, 64, DType::BF16},    // K = 12288: fc2 width, longest group stream
      {48, kD, kD, 64, DType::F32},      // the prepared tiled GEMV's largest M
      {130, kD, kD, 64, DType::BF16},    // GEMM tiers, ragged M
      {64, kMlp, kD, 64, DType::F16},    // fc1 shape
  };
  for (const S& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K << " G=" << s.G
                                      << " x=" << dtype_name(s.xdt));
    const Tensor x = random_float(rng, s.xdt, {s.M, s.K}, -2.0f, 2.0f);
    const Tensor q = random_bytes(rng, {s.N, s.K / 2});
    const Tensor sc = random_float(rng, DType::BF16, {s.K / s.G, s.N}, 0.002f, 0.03f);
    const Tensor z = random_float(rng, DType::BF16, {s.K / s.G, s.N}, -0.2f, 0.2f);
    const Tensor b = random_float(rng, DType::BF16, {s.N}, -1.0f, 1.0f);
    AwqW4A16Params prm;
    prm.qweight = q, prm.wscales = sc, prm.wzeros = z, prm.bias = b;
    prm.N = s.N, prm.K = s.K, prm.group_size = s.G;
    const auto prep = prepare_awq_w4a16(prm);
    set_isa(Isa::Scalar);
    const Tensor ref = gemv_awq_w4a16(x, q, sc, z, b, s.G, DType::F32);
    expect_finite(ref, "oracle");
    // A[m,n] = Σ_k |x|·(|(q−8)·s| + |z|)
    const Tensor xf = x.to_f32(), sf = sc.to_f32(), zf = z.to_f32();
    std::vector<double> A(size_t(s.M * s.N));
    for (int64_t n = 0; n < s.N; ++n) {
      std::vector<double> w(size_t(s.K));
      for (int64_t k = 0; k < s.K; ++k) {
        const uint8_t byte = q.data<uint8_t>()[n * (s.K / 2) + k / 2];
        const int code = k % 2 ? byte >> 4 : byte & 15;
        const int64_t gi = (k / s.G) * s.N + n;
        w[size_t(k)] = std::fabs((code - 8) * double(sf.data<float>()[gi])) + std::fabs(double(zf.data<float>()[gi]));
      }
      for (int64_t m = 0; m < s.M; ++m) {
        double a = 0;
        const float* xr = xf.data<float>() + m * s.K;
        for (int64_t k = 0; k < s.K; ++k) a += std::fabs(double(xr[k])) * w[size_t(k)];
        A[size_t(m * s.N + n)] = a;
      }
    }
    for (Isa isa : supported_isas())
      for (bool prepared : {false, true}) {
        set_isa(isa);
        const Tensor y = prepared ? gemv_awq_w4a16(x, *prep, DType::F32) : gemv_awq_w4a16(x, q, sc, z, b, s.G, DType::F32);
        const std::string what = std::string(isa_name(isa)) + (prepared ? " prepared" : "");
        expect_finite(y, what);
        // the avx512bf16 GEMM tier rounds the dequantized weight (and fp32/fp16 x) to bf16: read from the plan
        namespace awq = kernels::awq;
        const awq::Plan pl = awq::plan(isa, s.M, s.G, s.xdt, DType::BF16, prepared && awq::prepared_has_tiled(s.G));
        const double coeff = test::awq_vs_oracle(s.K, s.G, pl.bf16_weights, pl.bf16_x && s.xdt != DType::BF16);
        int bad = 0;
        for (int64_t i = 0; i < s.M * s.N; ++i) {
          const double v = y.data<float>()[i], r = ref.data<float>()[i];
          const double tol = coeff * A[size_t(i)] + 2 * test::kUnitRoundoffF32 * std::fabs(r);
          if (!(std::fabs(v - r) <= tol) && bad++ < 5)
            ADD_FAILURE() << what << " elem " << i << ": " << v << " vs oracle " << r << " (tol " << tol << ")";
        }
        ASSERT_EQ(bad, 0) << what;
      }
  }
}

// --------------------------------------------------------------------------- svdquant_w4a4
TEST(SlowKernels, SvdquantFullWidthEveryIsaBitwise) {
  IsaGuard guard;
  std::mt19937 rng(test_seed() + 1);
  struct S { int64_t M, N, K, R; bool uns; };
  const S shapes[] = {
      {256, kD, kD, 32, false},    // attention projections at 256 tokens
      {64, kMlp, kD, 32, false},   // fc1
      {130, kD, kMlp, 32, true},   // fc2 (act_unsigned: GELU inputs), ragged M
      {1, kD, kMlp, 32, true},
  };
  for (const S& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K << " R=" << s.R
                                      << " unsigned=" << s.uns);
    SvdquantW4A4Params p;
    p.N = s.N, p.K = s.K, p.R = s.R, p.act_unsigned = s.uns;
    p.qweight = random_bytes(rng, {s.N, s.K / 2});
    p.wscales = random_float(rng, DType::BF16, {s.K / 64, s.N}, 0.001f, 0.05f);
    p.smooth = random_float(rng, DType::BF16, {s.K}, 0.3f, 3.0f);
    p.proj_down = random_float(rng, DType::BF16, {s.K, s.R}, -0.05f, 0.05f);
    p.proj_up = random_float(rng, DType::BF16, {s.N, s.R}, -0.05f, 0.05f);
    p.bias = random_float(rng, DType::BF16, {s.N}, -1.0f, 1.0f);
    const Tensor x = s.uns ? random_float(rng, DType::BF16, {s.M, s.K}, -0.17f, 4.0f)
                           : random_float(rng, DType::BF16, {s.M, s.K}, -3.0f, 3.0f);
    set_isa(Isa::Scalar);
    const Tensor ref = svdquant_linear(x, p, DType::F32);
    expect_finite(ref, "reference");
    const SvdquantW4A4Params tile = svdquant_to_tile(p);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      const Tensor y = svdquant_linear(x, *prepare_svdquant_w4a4(p), DType::F32);
      ASSERT_EQ(y.nbytes(), ref.nbytes());
      ASSERT_EQ(0, std::memcmp(y.raw(), ref.raw(), y.nbytes())) << isa_name(isa) << " fused (prepared)";
      const Tensor yt = svdquant_linear(x, tile, DType::F32);
      ASSERT_EQ(0, std::memcmp(yt.raw(), ref.raw(), yt.nbytes())) << isa_name(isa) << " tile-packed";
    }
  }
}

// ------------------------------------------------------------------------------ linear_f32
TEST(SlowKernels, LinearF32FullWidthAgainstDouble) {
  IsaGuard guard;
  std::mt19937 rng(test_seed() + 2);
  struct S { int64_t M, N, K; };
  for (const S s : {S{1, kD, kMlp}, S{37, kMlp, kD}, S{256, kD, kD}}) {
    SCOPED_TRACE(::testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K);
    const Tensor x = random_float(rng, DType::F32, {s.M, s.K}, -2.0f, 2.0f);
    const Tensor w = random_float(rng, DType::F32, {s.N, s.K}, -0.05f, 0.05f);
    const Tensor b = random_float(rng, DType::F32, {s.N}, -1.0f, 1.0f);
    const double g = test::gamma(double(s.K) + 2);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      const Tensor y = linear_f32(x, w, b);
      expect_finite(y, isa_name(isa));
      int bad = 0;
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < s.N; ++n) {
          double exact = b.data<float>()[n], mag = std::fabs(double(b.data<float>()[n]));
          const float* xr = x.data<float>() + m * s.K;
          const float* wr = w.data<float>() + n * s.K;
          for (int64_t k = 0; k < s.K; ++k) {
            exact += double(xr[k]) * wr[k];
            mag += std::fabs(double(xr[k]) * wr[k]);
          }
          const double v = y.data<float>()[m * s.N + n];
          if (!(std::fabs(v - exact) <= g * mag) && bad++ < 5)
            ADD_FAILURE() << isa_name(isa) << " (" << m << "," << n << "): " << v << " vs " << exact;
        }
      ASSERT_EQ(bad, 0) << isa_name(isa);
    }
  }
}

}  // namespace
