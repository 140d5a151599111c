// test_convert_quant.cpp — the in-memory quantizers: error bounds derived from the formats'
// arithmetic, code ranges, q/k/v sharing, tile ↔ natural, the act_unsigned bias correction, and the
// quality ordering RTN int4 > weight-only SVDQuant > calibrated SVDQuant (output error).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "nibble/convert.h"
#include "nibble/ops.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

using namespace nibble;

namespace {
double rel_fro(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = double(a.data<float>()[i]) - b.data<float>()[i];
    num += d * d;
    den += double(b.data<float>()[i]) * b.data<float>()[i];
  }
  return std::sqrt(num / den);
}
bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.defined() == b.defined() && a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}
// y = x·Wᵀ in fp64 → fp32 tensor
Tensor matmul_ref(const Tensor& X, const Tensor& W) {
  const int64_t M = X.size(0), K = X.size(1), N = W.size(0);
  Tensor y = Tensor::empty(DType::F32, {M, N});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(X.data<float>()[m * K + k]) * W.data<float>()[n * K + k];
      y.mutable_data<float>()[m * N + n] = float(s);
    }
  return y;
}
// Simulated W4A4 layer forward (spec §3.3/3.4 arithmetic in fp32/fp64), natural layout.
Tensor w4a4_forward(const Tensor& X, const SvdquantW4A4Params& p) {
  const int64_t M = X.size(0), K = p.K, N = p.N, R = p.R;
  Tensor sm = p.smooth.to_f32(), ws = p.wscales.to_f32(), pd = p.proj_down.to_f32(), pu = p.proj_up.to_f32();
  Tensor b = p.bias.defined() ? p.bias.to_f32() : Tensor::zeros(DType::F32, {N});
  const float shift = p.act_unsigned ? kSvdquantUnsignedShift : 0.f, qmax = p.act_unsigned ? 15.f : 7.f;
  std::vector<float> xq(size_t(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / 64; ++g) {
      float y[64], amax = 0;
      for (int j = 0; j < 64; ++j) {
        const int64_t k = g * 64 + j;
        y[j] = (X.data<float>()[m * K + k] + shift) * (1.0f / sm.data<float>()[k]);
        amax = std::max(amax, std::fabs(y[j]));
      }
      const float sc = std::max(amax / qmax, 1e-10f);
      for (int j = 0; j < 64; ++j) {
        float q = std::nearbyint(y[j] * (1.0f / sc));
        q = p.act_unsigned ? std::clamp(q, 0.f, 15.f) : std::clamp(q, -7.f, 7.f);
        xq[size_t(m * K + g * 64 + j)] = q * sc;
      }
    }
  Tensor out = Tensor::empty(DType::F32, {M, N});
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.data<int8_t>());
  for (int64_t m = 0; m < M; ++m) {
    std::vector<double> la(size_t(R), 0.0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) la[size_t(r)] += double(X.data<float>()[m * K + k]) * pd.data<float>()[k * R + r];
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; k += 2) {
        const uint8_t byte = q[n * (K / 2) + k / 2];
        const double s = ws.data<float>()[(k / 64) * N + n];
        acc += xq[size_t(m * K + k)] * unpack_lo_signed(byte) * s + xq[size_t(m * K + k + 1)] * unpack_hi_signed(byte) * s;
      }
      for (int64_t r = 0; r < R; ++r) acc += la[size_t(r)] * pu.data<float>()[n * R + r];
      out.mutable_data<float>()[m * N + n] = float(acc + b.data<float>()[n]);
    }
  }
  return out;
}
Tensor add_bias(Tensor y, const Tensor& b) {
  const int64_t N = y.size(1);
  Tensor bf = b.to_f32();
  for (int64_t i = 0; i < y.numel(); ++i) y.mutable_data<float>()[i] += bf.data<float>()[i % N];
  return y;
}
}  // namespace

TEST(ConvertAwq, PerElementErrorBoundAndLayout) {
  for (int64_t G : {64, 128, 32}) {
    const int64_t N = 48, K = 256;
    Tensor W = synth_weight(N, K, 100 + uint64_t(G));
    Tensor b = synth_bias(N, 3);
    AwqQuantOptions o;
    o.group_size = G;
    AwqW4A16Params p = quantize_awq_w4a16(W, b, o);
    ASSERT_EQ(p.qweight.shape(), (Shape{N, K / 2}));
    ASSERT_EQ(p.wscales.shape(), (Shape{K / G, N}));
    ASSERT_EQ(p.wzeros.dtype(), DType::BF16);
    ASSERT_EQ(p.bias.dtype(), DType::BF16);
    validate(p, "test");  // the formats-area validator accepts it
    Tensor Weff = effective_weight(p);
    Tensor s = p.wscales.to_f32(), z = p.wzeros.to_f32();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        // Round-to-nearest on the stored grid: |err| ≤ s/2, plus the clamp overshoot at the range
        // ends caused by rounding z (≤ 2^-9·|z|) and s (≤ 7.5·2^-9·s) to bf16.
        const float sc = s.data<float>()[(k / G) * N + n], ze = z.data<float>()[(k / G) * N + n];
        const float bound = 0.5f * sc + std::ldexp(std::fabs(ze), -9) + 7.5f * std::ldexp(sc, -9) + 1e-7f;
        ASSERT_LE(std::fabs(Weff.data<float>()[n * K + k] - W.data<float>()[n * K + k]), bound) << n << "," << k << " G=" << G;
      }
    // The registry's AWQ kernel computes the same layer.
    Tensor x = synth_activations(3, K, 9);
    Tensor y = gemv_awq_w4a16(x, p.qweight, p.wscales, p.wzeros, p.bias, G, DType::F32);
    Tensor yref = add_bias(matmul_ref(x, Weff), p.bias);
    EXPECT_LT(rel_fro(y, yref), 5e-6);  // measured ≤ 1.6e-6 (fp32 sums), margin ×3
  }
}

TEST(ConvertAwq, CalibratedClippingNeverWorseOnWeightedError) {
  const int64_t N = 64, K = 512;
  Tensor W = synth_weight(N, K, 5);
  SynthActOptions ao;
  Tensor X = synth_activations(128, K, 6, ao);
  CalibAccumulator acc;
  acc.add("l", X);
  auto stats = acc.finish();
  AwqQuantOptions plain, cal;
  cal.calib = &stats["l"];
  Tensor e0 = effective_weight(quantize_awq_w4a16(W, {}, plain));
  Tensor e1 = effective_weight(quantize_awq_w4a16(W, {}, cal));
  // Clipping ratio 1 is in the grid, so the importance-weighted error can only go down.
  double w0 = 0, w1 = 0;
  const float* ma = stats["l"].mean_abs.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const double a = double(ma[k]) * ma[k], d0 = e0.data<float>()[n * K + k] - W.data<float>()[n * K + k],
                   d1 = e1.data<float>()[n * K + k] - W.data<float>()[n * K + k];
      w0 += a * d0 * d0;
      w1 += a * d1 * d1;
    }
  EXPECT_LE(w1, w0 * (1 + 1e-9));
  EXPECT_LT(w1, 0.45 * w0);  // and it does go down: measured ratio 0.343
}

TEST(ConvertSvdquant, WeightOnlyInvariants) {
  const int64_t N = 256, K = 384;
  Tensor W = synth_weight(N, K, 21), b = synth_bias(N, 2);
  SvdquantQuantOptions o;
  o.rank = 16;
  SvdquantW4A4Params p = quantize_weight_svdquant_w4a4(W, b, o);
  ASSERT_EQ(p.qweight.shape(), (Shape{N, K / 2}));
  ASSERT_EQ(p.wscales.shape(), (Shape{K / 64, N}));
  ASSERT_EQ(p.proj_down.shape(), (Shape{K, 16}));
  ASSERT_EQ(p.proj_up.shape(), (Shape{N, 16}));
  for (const Tensor* t : {&p.wscales, &p.smooth, &p.proj_down, &p.proj_up, &p.bias}) EXPECT_EQ(t->dtype(), DType::BF16);
  validate(p, "test");
  // smooth = 1 without calibration; codes never −8.
  for (int64_t k = 0; k < K; ++k) EXPECT_EQ(bf16_to_f32(p.smooth.data<uint16_t>()[k]), 1.0f);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.data<int8_t>());
  for (int64_t i = 0; i < p.qweight.numel(); ++i) {
    ASSERT_NE(unpack_lo_signed(q[i]), -8);
    ASSERT_NE(unpack_hi_signed(q[i]), -8);
  }
  // Bias unchanged (bf16 of the input) for a signed layer.
  for (int64_t n = 0; n < N; ++n) EXPECT_EQ(p.bias.data<uint16_t>()[n], f32_to_bf16(b.data<float>()[n]));
  // Residual bound: W_eff − W = (Q(R) − R) + rounding of the projections; Q error ≤ s/2 per element.
  Tensor Weff = effective_weight(p);
  const double e = rel_fro(Weff, W);
  // Naive per-group RTN int4 (symmetric absmax/7) for comparison.
  SvdquantQuantOptions rtn = o;
  rtn.rank = 0;
  rtn.refine_iterations = 0;
  const double e_rtn = rel_fro(effective_weight(quantize_weight_svdquant_w4a4(W, b, rtn)), W);
  // measured 0.0157 vs RTN 0.1409 (ratio 0.111), margin ~35%
  EXPECT_LT(e, 0.15 * e_rtn) << "svdquant " << e << " vs rtn " << e_rtn;
  EXPECT_LT(e, 0.02);
  // Refinement helps: measured 0.01570 vs 0.01727 without (−9%); asserted ≥ 5% better.
  SvdquantQuantOptions no_ref = o;
  no_ref.refine_iterations = 0;
  EXPECT_LE(e, rel_fro(effective_weight(quantize_weight_svdquant_w4a4(W, b, no_ref)), W) * 0.95);
}

TEST(ConvertQuant, ReportedErrorsMatchEffectiveWeights) {
  // The quantizers report ‖W_eff − W‖/‖W‖ from their internals (no extra dequantization); it must
  // agree with the dequantized weight up to fp32 rounding of the products (≪ 1e-3 relative).
  const int64_t N = 128, K = 256;
  Tensor W = synth_weight(N, K, 77);
  double e_awq = -1;
  AwqQuantOptions ao;
  ao.weight_rel_error = &e_awq;
  auto pa = quantize_awq_w4a16(W, Tensor(), ao);
  EXPECT_NEAR(e_awq, rel_fro(effective_weight(pa), W), 1e-3 * e_awq);
  std::vector<Tensor> Ws = {W, synth_weight(N, K, 78)};
  std::vector<double> errs;
  SvdquantQuantOptions so;
  so.rank = 8;
  so.act_unsigned = true;
  so.weight_rel_errors = &errs;
  auto ps = quantize_weight_svdquant_w4a4_group(Ws, {}, so);
  ASSERT_EQ(errs.size(), 2u);
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(errs[i], rel_fro(effective_weight(ps[i]), Ws[i]), 1e-3 * errs[i]) << i;
}

TEST(ConvertSvdquant, DeterministicAcrossThreadCounts) {
  Tensor W = synth_weight(128, 256, 4);
  set_num_threads(1);
  auto a = quantize_weight_svdquant_w4a4(W, Tensor(), SvdquantQuantOptions{});
  set_num_threads(2);
  auto b = quantize_weight_svdquant_w4a4(W, Tensor(), SvdquantQuantOptions{});
  set_num_threads(0);
  EXPECT_TRUE(same_bytes(a.qweight, b.qweight));
  EXPECT_TRUE(same_bytes(a.wscales, b.wscales));
  EXPECT_TRUE(same_bytes(a.proj_down, b.proj_down));
  EXPECT_TRUE(same_bytes(a.proj_up, b.proj_up));
}

TEST(ConvertSvdquant, GroupSharesSmoothAndProjDown) {
  const int64_t D = 128;
  std::vector<Tensor> Ws = {synth_weight(D, D, 1), synth_weight(D, D, 2), synth_weight(D, D, 3)};
  std::vector<Tensor> bs = {synth_bias(D, 1), synth_bias(D, 2), synth_bias(D, 3)};
  Tensor X = synth_activations(64, D, 7);
  CalibAccumulator acc;
  acc.add("q", X);
  auto st = acc.finish();
  SvdquantQuantOptions o;
  o.rank = 8;
  o.calib = &st["q"];
  auto ps = quantize_weight_svdquant_w4a4_group(Ws, bs, o);
  ASSERT_EQ(ps.size(), 3u);
  for (int i = 1; i < 3; ++i) {
    EXPECT_TRUE(same_bytes(ps[i].smooth, ps[0].smooth));
    EXPECT_TRUE(same_bytes(ps[i].proj_down, ps[0].proj_down));
  }
  // measured 0.061, 0.041, 0.038 (the shared smooth/proj_down fit the first best), margin ~30%
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_fro(effective_weight(ps[i]), Ws[i]), 0.08);
}

TEST(ConvertSvdquant, TileLayoutSameEffectiveWeight) {
  Tensor W = synth_weight(256, 128, 8);
  SvdquantQuantOptions o;
  o.rank = 8;
  auto nat = quantize_weight_svdquant_w4a4(W, {}, o);
  o.tile_layout = true;
  auto tile = quantize_weight_svdquant_w4a4(W, {}, o);
  EXPECT_EQ(tile.qweight.shape(), (Shape{2, 2, 32, 128}));
  EXPECT_EQ(tile.wscales.shape(), (Shape{2, 2, 128}));
  EXPECT_EQ(tile.proj_up.shape(), (Shape{2, 8, 128}));
  EXPECT_TRUE(same_bytes(effective_weight(nat), effective_weight(tile)));
  // Spec §3.2 index mapping, spot-checked on bytes.
  const auto* tn = reinterpret_cast<const uint8_t*>(nat.qweight.data<int8_t>());
  const auto* tt = reinterpret_cast<const uint8_t*>(tile.qweight.data<int8_t>());
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t qq = 0; qq < 32; ++qq)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t b = 0; b < 32; ++b)
            ASSERT_EQ(tt[((t * 2 + g) * 32 + qq) * 128 + i * 32 + b], tn[(t * 128 + 4 * qq + i) * 64 + g * 32 + b]);
}

TEST(ConvertSvdquant, ActUnsignedBiasCorrection) {
  // With unquantized activations the shifted main path plus the corrected bias must equal
  // x·W_effᵀ + b: (x+shift)·R_rawᵀ + x·Lᵀ + b − shift·Σ_k R_raw = x·W_effᵀ + b.
  const int64_t N = 64, K = 256;
  Tensor W = synth_weight(N, K, 31), b = synth_bias(N, 3);
  SvdquantQuantOptions o;
  o.rank = 8;
  o.act_unsigned = true;
  auto p = quantize_weight_svdquant_w4a4(W, b, o);
  Tensor Weff = effective_weight(p);
  Tensor sm = p.smooth.to_f32(), ws = p.wscales.to_f32(), bias = p.bias.to_f32();
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.data<int8_t>());
  for (int64_t n = 0; n < N; ++n) {
    double rowsum = 0;
    for (int64_t k = 0; k < K; k += 2) {
      const double s = ws.data<float>()[(k / 64) * N + n];
      rowsum += unpack_lo_signed(q[n * K / 2 + k / 2]) * s / sm.data<float>()[k] +
                unpack_hi_signed(q[n * K / 2 + k / 2]) * s / sm.data<float>()[k + 1];
    }
    const double expect = double(b.data<float>()[n]) - kSvdquantUnsignedShift * rowsum;
    // bf16 storage of the corrected bias: half an ulp (2^-9 relative).
    EXPECT_NEAR(bias.data<float>()[n], expect, std::ldexp(std::fabs(expect), -8) + 1e-7) << n;
  }
  EXPECT_LT(rel_fro(Weff, W), 0.015);  // measured 0.0103
}

TEST(ConvertSvdquant, QualityOrderingOnOutliers) {
  // Synthetic layer: low-rank structure + outlier input channels in W; activations with outlier
  // channels. Errors of the W4A4 forward (activations quantized too) against x·Wᵀ + b.
  const int64_t N = 256, K = 512, M = 96;
  SynthOptions wo;
  Tensor W = synth_weight(N, K, 41, wo), b = synth_bias(N, 4);
  SynthActOptions ao;
  ao.n_outlier_channels = 8;
  // One stream of rows from one "layer input" (same seed: same outlier channels); calibration and
  // evaluation use disjoint rows — rows [0, 256) calibrate, rows [256, 256 + M) measure — so the
  // calibrated figure is out of sample.
  const Tensor Xall = synth_activations(256 + M, K, 42, ao);
  const Tensor Xcal = Xall.slice_rows(0, 256), Xtest = Xall.slice_rows(256, 256 + M);
  Tensor yref = add_bias(matmul_ref(Xtest, W), b);
  SvdquantQuantOptions rtn;
  rtn.rank = 0;
  rtn.refine_iterations = 0;
  SvdquantQuantOptions wonly;
  wonly.rank = 32;
  CalibAccumulator acc;
  acc.add("l", Xcal);
  auto st = acc.finish(32);
  SvdquantQuantOptions cal = wonly;
  cal.calib = &st["l"];
  auto pa = quantize_weight_svdquant_w4a4(W, b, rtn), pb = quantize_weight_svdquant_w4a4(W, b, wonly), pc = quantize_weight_svdquant_w4a4(W, b, cal);
  const double wa = rel_fro(effective_weight(pa), W), wb = rel_fro(effective_weight(pb), W), wc = rel_fro(effective_weight(pc), W);
  const double oa = rel_fro(w4a4_forward(Xtest, pa), yref), ob = rel_fro(w4a4_forward(Xtest, pb), yref),
               oc = rel_fro(w4a4_forward(Xtest, pc), yref);
  std::printf("weight rel error: RTN %.4f  SVDQuant-r32 %.4f  calibrated %.4f\n", wa, wb, wc);
  std::printf("output rel error: RTN %.4f  SVDQuant-r32 %.4f  calibrated %.4f\n", oa, ob, oc);
  // Measured (calibration rows disjoint from the evaluation rows): weight 0.1973 / 0.0184 / 0.0196,
  // output 0.774 / 0.0864 / 0.0199. The ordering, and each figure with a ~20–30% margin.
  EXPECT_LT(wb, wa);
  EXPECT_LT(ob, oa);
  EXPECT_LT(oc, ob);
  EXPECT_LT(wb, 0.025);
  EXPECT_LT(ob, 0.11);
  EXPECT_LT(oc, 0.025);
  EXPECT_LT(oc, 0.3 * ob);  // calibration removes most of the output error (measured ratio 0.23)
}
