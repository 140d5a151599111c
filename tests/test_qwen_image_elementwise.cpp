// The element-wise ops of the model (nn/elementwise.h) against fp64 references, on every ISA the
// machine runs (AVX-512 bodies and the portable ones), over odd widths (masked tails), with every
// output poisoned (NaN) before the call.
//
// Bounds from the arithmetic (u = 2^-24, γ_n = n·u/(1 − n·u), tests/tolerance.h):
//  * a reduction of n terms in 16 partial sums and a 4-level tree has ≤ n/16 + 4 roundings per term:
//    relative to Σ|terms| it errs ≤ γ_(n/16+5) (one more for the product forming a term);
//  * LayerNorm: mean and variance so; the normalised value n = (x − μ)/σ then errs ≤
//    |Δμ|/σ + |n|·(½|Δvar|/var + 3u) and the modulation adds ≤ 3u relative: per element
//    |Δ| ≤ (|Δμ|/σ + |n|·(½·γ·Σd²/var + 4u))·|1 + scale| + 2u·|out|, with |Δμ| ≤ γ·Σ|x|/D;
//  * RMSNorm per head: inv errs ≤ ½γ + 3u relative, y = v·inv·w ≤ 2u more; RoPE adds ≤ 3u of
//    |y0 c| + |y1 s| per output;
//  * GELU: the argument 2u of exp errs ≤ 4u·|2u|, fast_exp ≤ 2e-7 relative, e/(e + 1) and ·x ≤ 4u:
//    |Δ| ≤ |out|·(2e-7 + 4u·|2u| + 6u), plus |x|·e^−87 where fast_exp clamps its input at −87;
//  * gated residual: one FMA, ≤ u·(|x| + |g y|) (no FMA: 2u).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "nibble/isa.h"
#include "nn/elementwise.h"
#include "tolerance.h"

using namespace nibble;


namespace {

constexpr double kU = 0x1p-24;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> randv(size_t n, std::mt19937_64& rng, float sd, float mean = 0.0f) {
  std::normal_distribution<float> nd(mean, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

struct IsaSweep {
  Isa saved = active_isa();
  ~IsaSweep() { set_isa(saved); }
};

}  // namespace

TEST(QwenImageElementwise, LayerNormModulateMatchesFp64) {
  IsaSweep keep;
  std::mt19937_64 rng(11);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (int64_t D : {1, 7, 16, 61, 256, 3072 + 5}) {
      const int64_t rows = 37;
      // a large common offset per row makes the two-pass variance matter
      const auto x = randv(size_t(rows * D), rng, 2.0f, 30.0f), sh = randv(size_t(D), rng, 1.0f),
                 sc = randv(size_t(D), rng, 0.5f);
      std::vector<float> out(size_t(rows * D), kNaN);
      nn::ew::layernorm_modulate(x.data(), rows, D, 1e-6f, sh.data(), sc.data(), out.data());
      const double g = nibble::test::gamma(double(D) / 16 + 6);
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x.data() + r * D;
        double mu = 0, var = 0, sabs = 0;
        for (int64_t i = 0; i < D; ++i) mu += xr[i], sabs += std::fabs(xr[i]);
        mu /= double(D);
        for (int64_t i = 0; i < D; ++i) var += (xr[i] - mu) * (xr[i] - mu);
        var /= double(D);
        const double sd = std::sqrt(var + 1e-6), dmu = g * sabs / double(D) + 4 * kU * std::fabs(mu);
        for (int64_t i = 0; i < D; ++i) {
          const double n = (xr[i] - mu) / sd, ref = n * (1.0 + sc[size_t(i)]) + sh[size_t(i)];
          const double tol = (dmu / sd + std::fabs(n) * (0.5 * g + 6 * kU)) *
                                 std::fabs(1.0 + sc[size_t(i)]) +
                             4 * kU * (std::fabs(ref) + std::fabs(sh[size_t(i)]));
          const float o = out[size_t(r * D + i)];
          ASSERT_FALSE(std::isnan(o)) << isa_name(isa) << " D=" << D;
          ASSERT_LE(std::fabs(o - ref), tol) << isa_name(isa) << " D=" << D << " r=" << r << " i=" << i;
        }
      }
    }
  }
}

TEST(QwenImageElementwise, RmsNormRopeMatchesFp64) {
  IsaSweep keep;
  std::mt19937_64 rng(12);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (int64_t hd : {2, 6, 16, 32, 128})
      for (bool rope : {false, true}) {
        const int64_t H = 3, D = H * hd, S = 5;
        const auto v0 = randv(size_t(S * D), rng, 3.0f), w = randv(size_t(hd), rng, 1.0f);
        std::vector<float> cs(size_t(S * hd / 2)), sn(cs.size()), c2(size_t(S * hd), kNaN), s2(c2.size(), kNaN);
        for (size_t i = 0; i < cs.size(); ++i) {
          const double a = 0.37 * double(i) + 0.1;
          cs[i] = float(std::cos(a));
          sn[i] = float(std::sin(a));
        }
        nn::ew::rope_expand(cs.data(), sn.data(), S, hd, c2.data(), s2.data());
        std::vector<float> v = v0;
        for (int64_t p = 0; p < S; ++p)
          nn::ew::rmsnorm_rope_row(v.data() + p * D, D, hd, 1e-6f, w.data(), rope ? c2.data() + p * hd : nullptr,
                                   rope ? s2.data() + p * hd : nullptr);
        const double g = nibble::test::gamma(double(hd) / 16 + 6);
        for (int64_t p = 0; p < S; ++p)
          for (int64_t h = 0; h < H; ++h) {
            const float* x = v0.data() + p * D + h * hd;
            double ss = 0;
            for (int64_t i = 0; i < hd; ++i) ss += double(x[i]) * x[i];
            const double inv = 1.0 / std::sqrt(ss / double(hd) + 1e-6);
            for (int64_t i = 0; i < hd; i += 2) {
              const double y0 = x[i] * inv * w[size_t(i)], y1 = x[i + 1] * inv * w[size_t(i + 1)];
              const double c = rope ? cs[size_t(p * hd / 2 + i / 2)] : 1.0, s = rope ? sn[size_t(p * hd / 2 + i / 2)] : 0.0;
              const double r0 = y0 * c - y1 * s, r1 = y1 * c + y0 * s;
              const double mag = std::fabs(y0) + std::fabs(y1);
              const double tol = mag * (0.5 * g + 8 * kU);
              const float o0 = v[size_t(p * D + h * hd + i)], o1 = v[size_t(p * D + h * hd + i + 1)];
              ASSERT_LE(std::fabs(o0 - r0), tol) << isa_name(isa) << " hd=" << hd << " rope=" << rope;
              ASSERT_LE(std::fabs(o1 - r1), tol) << isa_name(isa) << " hd=" << hd << " rope=" << rope;
            }
          }
      }
  }
}

TEST(QwenImageElementwise, GeluTanhMatchesFp64) {
  IsaSweep keep;
  std::mt19937_64 rng(13);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (int64_t n : {1, 15, 17, 1000, 40000 + 3}) {
      auto x = randv(size_t(n), rng, 4.0f);
      x[0] = -40.0f;  // deep in the negative tail (exp underflows to ~0)
      if (n > 1) x[1] = 40.0f;
      std::vector<float> y = x;
      nn::ew::gelu_tanh_inplace(y.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double xi = x[size_t(i)], u = 0.7978845608028654 * (xi + 0.044715 * xi * xi * xi);
        const double ref = xi / (1.0 + std::exp(-2 * u));  // = 0.5·x·(1 + tanh u), without cancellation
        const double tol = std::fabs(ref) * (2e-7 + 4 * kU * std::fabs(2 * u) + 6 * kU) + std::fabs(xi) * 1.7e-38;  // exp's input is clamped at −87
        ASSERT_FALSE(std::isnan(y[size_t(i)])) << isa_name(isa);
        ASSERT_LE(std::fabs(y[size_t(i)] - ref), tol) << isa_name(isa) << " x=" << xi;
      }
    }
  }
}

TEST(QwenImageElementwise, GatedResidualAndRmsRows) {
  IsaSweep keep;
  std::mt19937_64 rng(14);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (int64_t D : {5, 16, 333}) {
      const int64_t B = 2, per = 6, rows = B * per, zf = 4;
      const auto x0 = randv(size_t(rows * D), rng, 1.0f), y = randv(size_t(rows * D), rng, 1.0f),
                 mod = randv(size_t(2 * B * 3 * D), rng, 1.0f);
      std::vector<float> x = x0;
      nn::ew::gated_residual(x.data(), y.data(), rows, per, D, mod.data(), 3 * D, D, zf);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / per, mrow = r % per < zf ? b : B + b;
        for (int64_t i = 0; i < D; ++i) {
          const double g = mod[size_t(mrow * 3 * D + D + i)], yi = y[size_t(r * D + i)], xi = x0[size_t(r * D + i)];
          const double ref = xi + g * yi;
          ASSERT_LE(std::fabs(x[size_t(r * D + i)] - ref), 2 * kU * (std::fabs(xi) + std::fabs(g * yi)) + 1e-38)
              << isa_name(isa);
        }
      }
      const auto w = randv(size_t(D), rng, 1.0f);
      std::vector<float> o(size_t(rows * D), kNaN);
      nn::ew::rmsnorm_rows(x0.data(), rows, D, 1e-6f, w.data(), o.data());
      const double g = nibble::test::gamma(double(D) / 16 + 6);
      for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < D; ++i) ss += double(x0[size_t(r * D + i)]) * x0[size_t(r * D + i)];
        const double inv = 1.0 / std::sqrt(ss / double(D) + 1e-6);
        for (int64_t i = 0; i < D; ++i) {
          const double ref = x0[size_t(r * D + i)] * inv * w[size_t(i)];
          ASSERT_LE(std::fabs(o[size_t(r * D + i)] - ref), std::fabs(ref) * (0.5 * g + 6 * kU)) << isa_name(isa);
        }
      }
    }
  }
}

// The AVX-512 and portable bodies compute the same arithmetic: they agree far inside the bounds.
TEST(QwenImageElementwise, IsasAgree) {
  IsaSweep keep;
  const auto isas = supported_isas();
  if (isas.size() < 2) GTEST_SKIP() << "one ISA only";
  std::mt19937_64 rng(15);
  const int64_t D = 3072, rows = 9;
  const auto x = randv(size_t(rows * D), rng, 1.0f), sh = randv(size_t(D), rng, 0.1f), sc = randv(size_t(D), rng, 0.1f);
  std::vector<std::vector<float>> outs;
  for (Isa isa : {isas.front(), isas.back()}) {
    set_isa(isa);
    std::vector<float> o(size_t(rows * D), kNaN);
    nn::ew::layernorm_modulate(x.data(), rows, D, 1e-6f, sh.data(), sc.data(), o.data());
    outs.push_back(o);
  }
  for (size_t i = 0; i < outs[0].size(); ++i)
    ASSERT_NEAR(outs[0][i], outs[1][i], 8 * kU * (1 + std::fabs(outs[0][i])));
}
