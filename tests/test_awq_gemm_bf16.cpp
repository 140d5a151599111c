// The AWQ GEMM tier on bf16 weights (avx512bf16, kernels/awq_gemm_bf16.h) against an exact
// evaluation of its own documented rounding: ŵ = RNE_bf16(fma_f32(q − 8, s, z)), x̂ = RNE_bf16(x),
// y = Σ_k x̂·ŵ in double. The tier's products x̂·ŵ are exact in fp32 and only its K − 1 fp32 sums
// round, so |y_tier − y| ≤ awq_vs_exact(K, G)·Σ|x̂ŵ| (tests/tolerance.h). Shapes that reach the
// tier's edges: several 64-row passes and 256-row blocks (M > 256), a partial last pass (M % 64),
// rows padded to 16, several k chunks with a shorter last one, K/2 not a multiple of 16, N not a
// multiple of the 6-column panel or of the 96-column task, group sizes on the table decode
// (G % 32 == 0) and off it (G = 8, 24, 40). Outputs are poisoned first; results are bit-identical
// for any thread count. Skipped where the CPU has no AVX-512 BF16 (the tier does not run there).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "kernels/awq_w4a16_kernels.h"
#include "kernels/workspace.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "test_tensors.h"
#include "tolerance.h"

namespace nibble {
namespace {

using testing_tensors::random_bytes;
using testing_tensors::random_f32;
using testing_tensors::same_bits;

struct Shape4 {
  int64_t M, N, K, G;
};

bool tier_runs(int64_t M, int64_t G, DType xdt) {
  if (!isa_supported(Isa::Avx512Bf16)) return false;
  return kernels::awq::plan(active_isa(), M, G, xdt, DType::BF16, false).bf16_weights;
}

struct Operands {
  Tensor x, q, s, z;
};

Operands make(std::mt19937& rng, const Shape4& sh, DType xdt) {
  Operands o;
  o.x = random_f32(rng, {sh.M, sh.K}, -2.0f, 2.0f, xdt);
  o.q = random_bytes(rng, {sh.N, sh.K / 2});
  o.s = random_f32(rng, {sh.K / sh.G, sh.N}, 0.002f, 0.03f, DType::BF16);
  o.z = random_f32(rng, {sh.K / sh.G, sh.N}, -0.1f, 0.1f, DType::BF16);
  return o;
}

TEST(AwqGemmBf16, MatchesExactEvaluationOfItsRounding) {
  if (!tier_runs(64, 64, DType::F32)) GTEST_SKIP() << "no AVX-512 BF16: the bf16 GEMM tier does not run here";
  kernels::set_test_fill(std::nanf(""));
  std::mt19937 rng(20261130);
  const Shape4 shapes[] = {{300, 97, 384, 64}, {257, 13, 256, 32}, {65, 200, 1040, 16}, {130, 50, 96, 24},
                           {17, 6, 64, 64},    {40, 103, 1152, 128}, {9, 7, 80, 40},  {520, 20, 128, 128},
                           {64, 193, 3072, 64}};
  for (const Shape4& sh : shapes)
    for (DType xdt : {DType::F32, DType::BF16}) {
      ASSERT_TRUE(tier_runs(sh.M, sh.G, xdt));
      const Operands o = make(rng, sh, xdt);
      // bf16 x runs with a bias, added last in fp32: y = fl(a + b) with |a − Σ| ≤ coeff·A, so
      // |y − (Σ + b)| ≤ coeff·A + u·|a + b| ≤ coeff·A·(1 + u) + u·|Σ + b|
      const Tensor bias = xdt == DType::BF16 ? random_f32(rng, {sh.N}, -1.0f, 1.0f, DType::BF16) : Tensor();
      const Tensor y = gemv_awq_w4a16(o.x, o.q, o.s, o.z, bias, sh.G, DType::F32);
      const Tensor xf = o.x.to_f32(), sf = o.s.to_f32(), zf = o.z.to_f32();
      const double coeff = test::awq_vs_exact(sh.K, sh.G);
      int bad = 0;
      for (int64_t m = 0; m < sh.M; ++m)
        for (int64_t n = 0; n < sh.N; ++n) {
          double ref = 0.0, A = 0.0;
          for (int64_t k = 0; k < sh.K; ++k) {
            const uint8_t b = o.q.data<uint8_t>()[n * (sh.K / 2) + k / 2];
            const int code = k % 2 ? b >> 4 : b & 15;
            const int64_t g = k / sh.G;
            const float w = bf16_to_f32(
                f32_to_bf16(std::fmaf(float(code - 8), sf.data<float>()[g * sh.N + n], zf.data<float>()[g * sh.N + n])));
            const double t = double(bf16_to_f32(f32_to_bf16(xf.data<float>()[m * sh.K + k]))) * double(w);
            ref += t, A += std::fabs(t);
          }
          double tol = coeff * A;
          if (bias.defined()) {
            ref += double(bf16_to_f32(bias.data<uint16_t>()[n]));
            tol = coeff * A * (1 + test::kUnitRoundoffF32) + test::kUnitRoundoffF32 * std::fabs(ref);
          }
          const float v = y.data<float>()[m * sh.N + n];
          if (!(std::fabs(double(v) - ref) <= tol)) {
            if (bad++ < 5)
              ADD_FAILURE() << "M=" << sh.M << " N=" << sh.N << " K=" << sh.K << " G=" << sh.G << " x="
                            << dtype_name(xdt) << " (" << m << ", " << n << "): got " << v << ", exact " << ref
                            << ", bound " << tol;
          }
        }
      ASSERT_EQ(bad, 0);
    }
  kernels::set_test_fill(std::nullopt);
}

// bf16 / fp16 output (spec §2.3): the fp32 sums rounded to the output dtype, then the bias added in
// that dtype — bit for bit the scalar conversions of nibble/dtype.h applied to the fp32 result.
TEST(AwqGemmBf16, OutputDtypesRoundThenAddBias) {
  if (!tier_runs(64, 64, DType::F32)) GTEST_SKIP() << "no AVX-512 BF16: the bf16 GEMM tier does not run here";
  kernels::set_test_fill(std::nanf(""));
  std::mt19937 rng(11);
  for (const Shape4& sh : {Shape4{70, 101, 256, 64}, Shape4{33, 13, 128, 32}}) {
    const Operands o = make(rng, sh, DType::BF16);
    Tensor bias = random_f32(rng, {sh.N}, -1.0f, 1.0f, DType::BF16);
    const Tensor acc = gemv_awq_w4a16(o.x, o.q, o.s, o.z, Tensor(), sh.G, DType::F32);
    for (DType out : {DType::BF16, DType::F16})
      for (bool with_bias : {false, true}) {
        const Tensor y = gemv_awq_w4a16(o.x, o.q, o.s, o.z, with_bias ? bias : Tensor(), sh.G, out);
        int bad = 0;
        for (int64_t i = 0; i < sh.M * sh.N; ++i) {
          const float a = acc.data<float>()[i], b = bf16_to_f32(bias.data<uint16_t>()[i % sh.N]);
          uint16_t want;
          if (out == DType::BF16) {
            want = f32_to_bf16(a);
            if (with_bias) want = f32_to_bf16(bf16_to_f32(want) + b);
          } else {
            want = f32_to_f16(a);
            if (with_bias) want = f32_to_f16(f16_to_f32(want) + b);
          }
          if (y.data<uint16_t>()[i] != want && bad++ < 5)
            ADD_FAILURE() << "M=" << sh.M << " N=" << sh.N << " out=" << dtype_name(out) << " bias=" << with_bias
                          << " elem " << i << ": got 0x" << std::hex << y.data<uint16_t>()[i] << ", want 0x" << want
                          << std::dec;
        }
        EXPECT_EQ(bad, 0);
      }
  }
  kernels::set_test_fill(std::nullopt);
}

TEST(AwqGemmBf16, BitIdenticalForAnyThreadCount) {
  if (!tier_runs(64, 64, DType::F32)) GTEST_SKIP() << "no AVX-512 BF16: the bf16 GEMM tier does not run here";
  const int saved = num_threads();
  std::mt19937 rng(7);
  for (const Shape4& sh : {Shape4{300, 389, 512, 64}, Shape4{70, 101, 264, 8}}) {
    const Operands o = make(rng, sh, DType::BF16);
    set_num_threads(1);
    const Tensor y1 = gemv_awq_w4a16(o.x, o.q, o.s, o.z, Tensor(), sh.G, DType::F32);
    for (int t : {2, 3, 5}) {
      set_num_threads(t);
      EXPECT_TRUE(same_bits(y1, gemv_awq_w4a16(o.x, o.q, o.s, o.z, Tensor(), sh.G, DType::F32)))
          << "M=" << sh.M << " threads=" << t;
    }
  }
  set_num_threads(saved);
}

}  // namespace
}  // namespace nibble
