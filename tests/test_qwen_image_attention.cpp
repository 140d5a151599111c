// The joint attention (nn/attention.h): fp32 and bf16 flash paths against the fp64 reference over
// odd lengths, head widths, batches and text-key masks; outputs poisoned with NaN before each run.
//
// Tolerances from the arithmetic:
//  * fp32: scores and P·V accumulate in fp32 over ≤ hd resp. S terms, exp has relative error
//    < 2e-7: |Δo| ≤ ~(√S + √hd)·2⁻²⁴·max|v|·8 → we allow 2e-5·max|v|.
//  * bf16: q, k, v and P are rounded to bf16 (relative 2⁻⁹ each). A score q·k·scale changes by
//    ≤ 2·2⁻⁹·Σ|q_t k_t|·scale, which moves each weight by that factor; P's rounding moves each
//    weight by ≤ 2⁻⁹ relative and V's rounding each value by 2⁻⁹. So
//    |Δo| ≤ max|v|·(2·2⁻⁹·max_score_l1 + 2·2⁻⁹) with max_score_l1 = max Σ_t |q_t k_t|·scale.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "nibble/isa.h"
#include "nn/attention.h"

using namespace nibble;
using namespace nibble::nn;

namespace {

struct Case {
  int64_t B, S, H, hd, n_bias;
  bool mask;
};

void run_case(const Case& c, AttentionPrecision p, uint64_t seed) {
  const int64_t D = c.H * c.hd, n = c.B * c.S * D;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const size_t nn_ = static_cast<size_t>(n);
  std::vector<float> q(nn_), k(nn_), v(nn_), o(nn_), r(nn_);
  for (auto& x : q) x = nd(rng);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> bias;
  if (c.mask) {
    bias.resize(size_t(c.B * c.n_bias));
    for (size_t i = 0; i < bias.size(); ++i)
      bias[i] = (i % 3 == 1) ? -3.4028234663852886e38f : (i % 5 == 2 ? -1.25f : 0.0f);
  }
  const float* bp = c.mask ? bias.data() : nullptr;
  for (auto& x : o) x = NAN;  // poisoned: an unwritten element fails
  joint_attention(q.data(), k.data(), v.data(), c.B, c.S, D, c.hd, bp, c.n_bias, o.data(), p);
  joint_attention_ref(q.data(), k.data(), v.data(), c.B, c.S, D, c.hd, bp, c.n_bias, r.data());
  double vmax = 0, l1max = 0;
  for (float x : v) vmax = std::max(vmax, double(std::abs(x)));
  const double scale = 1.0 / std::sqrt(double(c.hd));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.S; ++i)
        for (int64_t j = 0; j < c.S; ++j) {
          double l1 = 0;
          for (int64_t t = 0; t < c.hd; ++t)
            l1 += std::abs(double(q[size_t((b * c.S + i) * D + h * c.hd + t)]) * k[size_t((b * c.S + j) * D + h * c.hd + t)]);
          l1max = std::max(l1max, l1 * scale);
        }
  const double u = std::ldexp(1.0, -9);
  const double tol = p == AttentionPrecision::Bf16 ? vmax * (2 * u * l1max + 2 * u) : 2e-5 * vmax;
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::abs(double(o[size_t(i)]) - r[size_t(i)]);
    ASSERT_FALSE(std::isnan(o[size_t(i)])) << "unwritten/NaN at " << i;
    worst = std::max(worst, e);
  }
  EXPECT_LE(worst, tol) << "B " << c.B << " S " << c.S << " H " << c.H << " hd " << c.hd << " mask " << c.mask
                        << " path " << attention_name(p);
}

const std::vector<Case> kCases = {
    {1, 1, 1, 32, 0, false},  {1, 7, 2, 32, 3, true},    {2, 33, 3, 32, 5, true},  {1, 65, 2, 128, 17, true},
    {2, 100, 1, 64, 40, true}, {1, 129, 2, 128, 0, false}, {1, 31, 1, 16, 31, true}, {3, 9, 2, 48, 9, true},
};

}  // namespace

TEST(QwenImageAttention, Fp32MatchesReference) {
  uint64_t seed = 1;
  for (const auto& c : kCases) run_case(c, AttentionPrecision::Fp32, seed++);
}

TEST(QwenImageAttention, Bf16FlashMatchesReference) {
  if (resolve_attention(AttentionPrecision::Auto, 128) != AttentionPrecision::Bf16)
    GTEST_SKIP() << "hardware without AVX-512 BF16 (the bf16 flash path cannot run; the fp32 path is tested above); active ISA " << isa_name(active_isa()) << ")";
  uint64_t seed = 100;
  for (const auto& c : kCases) run_case(c, AttentionPrecision::Bf16, seed++);
}

TEST(QwenImageAttention, AutoFallsBackOnOddHeadDim) {
  EXPECT_EQ(resolve_attention(AttentionPrecision::Auto, 40), AttentionPrecision::Fp32);
  EXPECT_EQ(resolve_attention(AttentionPrecision::Fp32, 128), AttentionPrecision::Fp32);
}
