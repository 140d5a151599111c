// test_convert_gptq.cpp — GPTQ on the int4 weights (SvdquantQuantOptions::gptq, AwqQuantOptions::gptq):
// on a synthetic layer whose inputs are strongly correlated across channels, the error GPTQ
// minimises — ‖X·(W_eff − W)ᵀ‖ on the calibration rows — is strictly lower than without it, for
// both formats; the result is deterministic (same bytes for any thread count and on a rerun); the
// stored grid stays valid (codes in range, scales as the runtime reads them).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "nibble/convert.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

using namespace nibble;

namespace {

// Rows x with an AR(1) correlation along the channels (ρ = 0.9) and per-channel magnitudes spread
// over [0.3, 3]: H = XᵀX is far from diagonal, which is what GPTQ exploits.
Tensor correlated_inputs(int64_t M, int64_t K, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.3f, 3.f);
  std::vector<float> mag(static_cast<size_t>(K));
  for (auto& m : mag) m = ud(rng);
  Tensor X = Tensor::empty(DType::F32, {M, K});
  float* x = X.mutable_data<float>();
  const float rho = 0.9f, c = std::sqrt(1 - rho * rho);
  for (int64_t m = 0; m < M; ++m) {
    float prev = nd(rng);
    for (int64_t k = 0; k < K; ++k) {
      prev = rho * prev + c * nd(rng);
      x[m * K + k] = prev * mag[size_t(k)];
    }
  }
  return X;
}

Tensor random_weight(int64_t N, int64_t K, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.05f);
  Tensor W = Tensor::empty(DType::F32, {N, K});
  for (int64_t i = 0; i < N * K; ++i) W.mutable_data<float>()[i] = nd(rng);
  return W;
}

// ‖X·(A − B)ᵀ‖_F² in double.
double act_error(const Tensor& X, const Tensor& A, const Tensor& B) {
  const int64_t M = X.size(0), K = X.size(1), N = A.size(0);
  std::vector<double> d(size_t(N * K));
  for (int64_t i = 0; i < N * K; ++i) d[size_t(i)] = double(A.data<float>()[i]) - B.data<float>()[i];
  double e = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += X.data<float>()[m * K + k] * d[size_t(n * K + k)];
      e += s * s;
    }
  return e;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.defined() == b.defined() && a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct Layer {
  Tensor W, X;
  std::map<std::string, ActStats> stats;
};
Layer make_layer(int64_t N, int64_t K, int64_t M, uint64_t seed) {
  Layer l;
  l.W = random_weight(N, K, seed);
  l.X = correlated_inputs(M, K, seed + 1);
  CalibAccumulator acc(M);
  acc.add("l", l.X);
  l.stats = acc.finish();
  return l;
}

}  // namespace

TEST(ConvertGptq, SvdquantLowerErrorOnCalibrationInputs) {
  const Layer l = make_layer(96, 256, 512, 7);
  SvdquantQuantOptions o;
  o.rank = 16;
  o.calib = &l.stats.at("l");
  o.refit_lowrank = false;  // compare the residual quantizers alone (the refit sees act quantization)
  SvdquantQuantOptions g = o;
  g.gptq = true;
  const auto p0 = quantize_weight_svdquant_w4a4(l.W, Tensor(), o);
  const auto p1 = quantize_weight_svdquant_w4a4(l.W, Tensor(), g);
  // Same smoothing and low-rank branch; only the int4 residual differs.
  EXPECT_TRUE(same_bytes(p0.smooth, p1.smooth));
  EXPECT_TRUE(same_bytes(p0.proj_down, p1.proj_down));
  const double e0 = act_error(l.X, effective_weight(p0), l.W), e1 = act_error(l.X, effective_weight(p1), l.W);
  std::printf("svdquant ‖X(W_eff − W)ᵀ‖² on the calibration rows: RTN %.4g, GPTQ %.4g (%.2f dB)\n", e0, e1,
              10 * std::log10(e0 / e1));
  EXPECT_LT(e1, e0);
  // Codes stay in [−7, 7] (the runtime's symmetric grid never uses −8).
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p1.qweight.data<int8_t>());
  for (int64_t i = 0; i < p1.qweight.numel(); ++i) {
    EXPECT_GE(unpack_lo_signed(q[i]), -7);
    EXPECT_GE(unpack_hi_signed(q[i]), -7);
  }
}

TEST(ConvertGptq, SvdquantActUnsignedLowerError) {
  // Post-GELU-like inputs (≥ −0.17): the main path sees x + 0.171875, the bias carries the shift.
  Layer l = make_layer(64, 128, 384, 51);
  float* x = l.X.mutable_data<float>();
  for (int64_t i = 0; i < l.X.numel(); ++i) x[i] = x[i] > 0 ? x[i] : -0.17f * (1 - std::exp(x[i]));
  CalibAccumulator acc(l.X.size(0));
  acc.add("l", l.X);
  const auto st = acc.finish();
  SvdquantQuantOptions o;
  o.rank = 8;
  o.act_unsigned = true;
  o.calib = &st.at("l");
  SvdquantQuantOptions g = o;
  g.gptq = true;
  const auto p0 = quantize_weight_svdquant_w4a4(l.W, Tensor(), o), p1 = quantize_weight_svdquant_w4a4(l.W, Tensor(), g);
  const double e0 = act_error(l.X, effective_weight(p0), l.W), e1 = act_error(l.X, effective_weight(p1), l.W);
  std::printf("svdquant act_unsigned: without %.4g, GPTQ %.4g\n", e0, e1);
  EXPECT_LT(e1, e0);
}

TEST(ConvertGptq, SvdquantWithRefitAndGroupLowerError) {
  // The full calibrated path (α search, proj_up refit) and a q/k/v-style group sharing the input.
  const Layer l = make_layer(64, 128, 384, 11);
  const Tensor W2 = random_weight(64, 128, 12);
  SvdquantQuantOptions o;
  o.rank = 8;
  o.calib = &l.stats.at("l");
  SvdquantQuantOptions g = o;
  g.gptq = true;
  const auto a = quantize_weight_svdquant_w4a4_group({l.W, W2}, {}, o);
  const auto b = quantize_weight_svdquant_w4a4_group({l.W, W2}, {}, g);
  const Tensor* Ws[2] = {&l.W, &W2};
  double e0 = 0, e1 = 0;
  for (int i = 0; i < 2; ++i) {
    e0 += act_error(l.X, effective_weight(a[size_t(i)]), *Ws[i]);
    e1 += act_error(l.X, effective_weight(b[size_t(i)]), *Ws[i]);
  }
  std::printf("svdquant group (refit on): RTN %.4g, GPTQ %.4g\n", e0, e1);
  EXPECT_LT(e1, e0);
}

TEST(ConvertGptq, AwqLowerErrorOnCalibrationInputs) {
  const Layer l = make_layer(96, 256, 512, 21);
  for (bool improved : {false, true}) {
    AwqQuantOptions o;
    o.group_size = 64;
    o.calib = &l.stats.at("l");
    o.improved_search = improved;
    AwqQuantOptions g = o;
    g.gptq = true;
    const auto p0 = quantize_awq_w4a16(l.W, Tensor(), o);
    const auto p1 = quantize_awq_w4a16(l.W, Tensor(), g);
    const double e0 = act_error(l.X, effective_weight(p0), l.W), e1 = act_error(l.X, effective_weight(p1), l.W);
    std::printf("awq (improved %d) ‖X(W_eff − W)ᵀ‖²: without %.4g, GPTQ %.4g (%.2f dB)\n", int(improved), e0, e1,
                10 * std::log10(e0 / e1));
    EXPECT_LT(e1, e0) << improved;
  }
}

TEST(ConvertGptq, DeterministicAcrossThreadCounts) {
  const Layer l = make_layer(80, 192, 256, 31);
  SvdquantQuantOptions so;
  so.rank = 8;
  so.calib = &l.stats.at("l");
  so.gptq = true;
  AwqQuantOptions ao;
  ao.calib = &l.stats.at("l");
  ao.gptq = true;
  set_num_threads(1);
  const auto s1 = quantize_weight_svdquant_w4a4(l.W, Tensor(), so);
  const auto a1 = quantize_awq_w4a16(l.W, Tensor(), ao);
  set_num_threads(2);
  const auto s2 = quantize_weight_svdquant_w4a4(l.W, Tensor(), so);
  const auto a2 = quantize_awq_w4a16(l.W, Tensor(), ao);
  const auto s3 = quantize_weight_svdquant_w4a4(l.W, Tensor(), so);
  set_num_threads(0);
  for (const auto* s : {&s2, &s3}) {
    EXPECT_TRUE(same_bytes(s1.qweight, s->qweight));
    EXPECT_TRUE(same_bytes(s1.wscales, s->wscales));
    EXPECT_TRUE(same_bytes(s1.proj_up, s->proj_up));
    EXPECT_TRUE(same_bytes(s1.smooth, s->smooth));
  }
  EXPECT_TRUE(same_bytes(a1.qweight, a2.qweight));
  EXPECT_TRUE(same_bytes(a1.wscales, a2.wscales));
  EXPECT_TRUE(same_bytes(a1.wzeros, a2.wzeros));
}

TEST(ConvertGptq, WithoutSampleRowsIsPlainRounding) {
  // Statistics without sample rows give no Hessian: GPTQ is not applied (same bytes as without).
  const Layer l = make_layer(64, 128, 128, 41);
  ActStats st = l.stats.at("l");
  st.sample = Tensor();
  AwqQuantOptions o;
  o.calib = &st;
  AwqQuantOptions g = o;
  g.gptq = true;
  const auto a = quantize_awq_w4a16(l.W, Tensor(), o), b = quantize_awq_w4a16(l.W, Tensor(), g);
  EXPECT_TRUE(same_bytes(a.qweight, b.qweight));
  EXPECT_TRUE(same_bytes(a.wscales, b.wscales));
}

// The converter: --gptq without --calib is an error; statistics without sample rows are a warning
// (an error with --strict) naming the layers rounded without GPTQ.
#include <functional>

#include "nibble/safetensors.h"
#include "nibble/synth.h"
#include "tmp_dir.h"

TEST(ConvertGptq, ConverterSaysWhenItCannotApply) {
  testing_tmp::TmpDir d("gptq");
  const std::string in = d / "m.safetensors";
  save_safetensors(in, {{"blk.fc.weight", synth_weight(64, 128, 1).to(DType::BF16)}});
  ConvertOptions o;
  o.rules = {parse_convert_rule("fc=svdquant_w4a4:rank=8")};
  o.gptq = true;
  auto error_of = [](const std::function<void()>& f) {
    try { f(); } catch (const Error& e) { return std::string(e.what()); }
    return std::string();
  };
  EXPECT_NE(error_of([&] { plan_conversion(in, o); }).find("--gptq needs --calib"), std::string::npos);
  CalibAccumulator acc;
  acc.add("blk.fc", correlated_inputs(64, 128, 3));
  const std::string stats = d / "stats.safetensors";
  acc.save(stats, 0);  // no sample rows
  o.calib_path = stats;
  const ConvertPlan p = plan_conversion(in, o);
  bool warned = false;
  for (const auto& w : p.warnings) warned |= w.find("rounded without GPTQ: blk.fc") != std::string::npos;
  EXPECT_TRUE(warned);
  o.strict = true;
  EXPECT_NE(error_of([&] { plan_conversion(in, o); }).find("without GPTQ"), std::string::npos);
}
