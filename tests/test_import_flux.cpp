// test_import_flux.cpp — `nibble import nunchaku` on a FLUX.1 checkpoint packed by the REAL packer
// (tests/data/import_nunchaku_flux.safetensors: one double and one single block, D = 128, made by
// scripts/fixtures_import.py with nunchaku's NunchakuWeightPacker and AutoAWQ's pack_intweight).
// Every code, scale, factor, smoothing value and bias against the known logical values
// (*_truth.safetensors); each layer's output (nibble's runtime) against the spec's semantics; the
// single blocks' linear1 (rows joined: exact) and linear2 (K joined: svdquant with a measured and
// bounded deviation from nunchaku's act_unsigned mlp part, or dense bf16); v2 (diffusers) module
// names; every output layer loads; bad input gives a clear error and leaves no output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>

#include "nibble/formats.h"
#include "nibble/import.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"

#include "import_test_util.h"
#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

const fs::path kData = fs::path(NIBBLE_SOURCE_DIR) / "tests" / "data";  // not __FILE__: ccache may make it relative
const std::string kIn = (kData / "import_nunchaku_flux.safetensors").string();
const std::string kTruth = (kData / "import_nunchaku_flux_truth.safetensors").string();
constexpr int64_t D = 128, F = 512;

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("import_flux") {}
};

using import_test::bound;
using import_test::same_bytes;
constexpr auto fv = import_test::value_at;
ImportOptions nk(const std::string& linear2 = "svdquant") {
  ImportOptions o;
  o.format = "nunchaku";
  o.flux_linear2 = linear2;
  return o;
}
int code_at(const Tensor& codes, int64_t n, int64_t k, int64_t K) {
  const uint8_t b = uint8_t(codes.data<int8_t>()[n * (K / 2) + k / 2]);
  return k % 2 ? unpack_hi_signed(b) : unpack_lo_signed(b);
}
// Values j/64 in [lo, hi]: exact in every float dtype the kernels may cast to.
Tensor grid_input(int64_t M, int64_t K, uint32_t seed, int lo = -128, int hi = 128) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t i = 0; i < M * K; ++i) x.mutable_data<float>()[i] = float(d(rng)) / 64.0f;
  return x;
}

// One nunchaku SVDQuant layer's logical values (truth file, kitchen orientation).
struct Truth {
  Tensor codes, ws, sm, down, up, bias;  // (N,K/2) I8, (K/64,N), (K), (K,R), (N,R), (N)
  int64_t N, K, R;
};
Truth truth_of(const Checkpoint& t, const std::string& P) {
  Truth r{t.get(P + ".codes"), t.get(P + ".wscales"), t.get(P + ".smooth"), t.get(P + ".proj_down"),
          t.get(P + ".proj_up"), t.get(P + ".bias"), 0, 0, 0};
  r.N = r.up.size(0);
  r.K = r.sm.numel();
  r.R = r.up.size(1);
  return r;
}

// Spec §3.3/§3.4 semantics of one svdquant layer (fp32 activations), output n of row m, on the input
// columns [x0, x0 + K) of x. Also returns the fp32-accumulation tolerance and, when `act_err` is
// given, the bound Σ_g Σ_k ½·ascale_g·|q·s| of the activation quantization error of the main path.
struct RefOut {
  double y, tol, act_err;
};
RefOut svdquant_ref(const Tensor& x, int64_t x0, const Truth& t, bool act_unsigned, int64_t m, int64_t n,
                    bool with_bias = true) {
  const int64_t K = t.K, N = t.N, R = t.R, ld = x.size(1);
  double acc = 0, mag = 0, aerr = 0, branch = 0;
  for (int64_t g = 0; g < K / 64; ++g) {
    float ys[64], amax = 0;
    for (int k = 0; k < 64; ++k) {
      float xv = x.data<float>()[m * ld + x0 + g * 64 + k];
      if (act_unsigned) xv += kSvdquantUnsignedShift;
      const float sv = fv(t.sm, g * 64 + k);
      const float inv = std::fabs(sv) > 1e-10f ? 1.0f / sv : 0.0f;
      ys[k] = xv * inv;
      amax = std::max(amax, std::fabs(ys[k]));
    }
    const float qmax = act_unsigned ? 15.0f : 7.0f;
    const float scale = std::max(amax / qmax, 1e-10f), rs = 1.0f / scale;
    long dot = 0, wabs = 0;
    for (int k = 0; k < 64; ++k) {
      int qa = int(std::nearbyint(ys[k] * rs));
      qa = act_unsigned ? std::clamp(qa, 0, 15) : std::clamp(qa, -7, 7);
      const int w = code_at(t.codes, n, g * 64 + k, K);
      dot += long(qa) * w;
      wabs += std::labs(w);
    }
    const double ws = fv(t.ws, g * N + n);
    const double term = double(dot) * scale * ws;
    acc += term;
    mag += std::fabs(term);
    aerr += 0.5 * double(scale) * std::fabs(ws) * double(wabs);
  }
  for (int64_t r = 0; r < R; ++r) {
    double la = 0, lm = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double xd = x.data<float>()[m * ld + x0 + k], dv = fv(t.down, k * R + r);
      la += xd * dv;
      lm += std::fabs(xd * dv);
    }
    const double uv = fv(t.up, n * R + r);
    acc += la * uv;
    mag += lm * std::fabs(uv) + std::fabs(la * uv);
    branch += lm * std::fabs(uv) + std::fabs(la * uv);
  }
  if (with_bias) acc += fv(t.bias, n);
  // + the bf16 low-rank branch of fp32 x with bf16 proj_down/up (docs/w4a4.md): x and the rank-R
  // intermediate each rounded to bf16 once: ≤ 2^-8·(1 + 2^-8)·Σ_r (Σ_k|x·d| + |lora|)·|u|.
  const double lowrank = t.down.dtype() == DType::BF16 ? 0x1p-8 * (1 + 0x1p-8) * branch : 0.0;
  return {acc, double(K) * 0x1p-23 * (mag + 1) + 1e-6 + lowrank, aerr};
}
// The same layer without activation quantization: x·W_effᵀ (+ bias), W_eff = q·s/smooth + up·downᵀ.
double dense_ref(const Tensor& x, int64_t x0, const Truth& t, int64_t m, int64_t n, bool with_bias = true) {
  const int64_t ld = x.size(1);
  double acc = with_bias ? fv(t.bias, n) : 0.0;
  for (int64_t k = 0; k < t.K; ++k) {
    const float sv = fv(t.sm, k);
    double w = double(code_at(t.codes, n, k, t.K)) * fv(t.ws, (k / 64) * t.N + n) * (std::fabs(sv) > 1e-10f ? 1.0 / sv : 0.0);
    for (int64_t r = 0; r < t.R; ++r) w += double(fv(t.up, n * t.R + r)) * fv(t.down, k * t.R + r);
    acc += double(x.data<float>()[m * ld + x0 + k]) * w;
  }
  return acc;
}
double shift_term(const Truth& t, int64_t n) {
  double acc = 0;
  for (int64_t k = 0; k < t.K; ++k) {
    const float sv = fv(t.sm, k);
    acc += double(code_at(t.codes, n, k, t.K)) * fv(t.ws, (k / 64) * t.N + n) * (std::fabs(sv) > 1e-10f ? 1.0 / sv : 0.0);
  }
  return double(kSvdquantUnsignedShift) * acc;
}
double half_ulp_bf16(double v) {
  const double a = std::fabs(v);
  if (a < 0x1p-126) return 0x1p-134;
  return std::ldexp(1.0, std::ilogb(a) - 8);  // bf16: 8 significant bits → ulp = 2^(e−7), half = 2^(e−8)
}

// Checks a layer imported 1:1 (double blocks) against its truth: values and outputs.
void check_layer(const Checkpoint& out, const Checkpoint& truth, const std::string& src, const std::string& name,
                 bool act_unsigned) {
  SCOPED_TRACE(name + " ← " + src);
  const Truth t = truth_of(truth, src);
  QuantizedLayer L = bound(out, name);
  EXPECT_EQ(L.act_unsigned, act_unsigned);
  EXPECT_EQ(L.config.act_unsigned.has_value(), act_unsigned);  // written explicitly, not inferred from the name
  SvdquantW4A4Params p = svdquant_params(L);
  ASSERT_EQ(p.N, t.N);
  ASSERT_EQ(p.K, t.K);
  ASSERT_EQ(p.R, t.R);  // zero pad rank columns trimmed
  EXPECT_TRUE(same_bytes(p.qweight, t.codes));
  EXPECT_TRUE(same_bytes(p.wscales, t.ws));
  EXPECT_TRUE(same_bytes(p.smooth, t.sm));
  EXPECT_TRUE(same_bytes(p.proj_down, t.down));
  EXPECT_TRUE(same_bytes(p.proj_up, t.up));
  EXPECT_TRUE(same_bytes(p.bias, t.bias));
  nn::Linear lin = nn::Linear::from_layer(L);
  const int64_t M = 3;
  Tensor x = act_unsigned ? grid_input(M, t.K, 5, -11, 128) : grid_input(M, t.K, 5);  // fc2 inputs ≥ −0.171875 (GELU)
  Tensor y = lin.forward(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < t.N; n += 7) {
      const RefOut r = svdquant_ref(x, 0, t, act_unsigned, m, n);
      ASSERT_NEAR(y.data<float>()[m * t.N + n], r.y, r.tol) << "m=" << m << " n=" << n;
    }
}

// AWQ modulation: codes, scales, zeros, [D, S] → [S, D], −1 on the scale chunks' bias.
void check_mod(const Checkpoint& out, const Checkpoint& truth, const std::string& src, const std::string& name, int S) {
  SCOPED_TRACE(name + " ← " + src);
  AwqW4A16Params p = awq_params(bound(out, name));
  const Tensor codes = truth.get(src + ".codes"), z = truth.get(src + ".zero_points"), s = truth.get(src + ".scales"),
               tb = truth.get(src + ".bias"), sb = truth.get(src + ".stored_bias");
  const int64_t N = p.N, K = p.K;
  ASSERT_EQ(N, S * D);
  ASSERT_EQ(K, D);
  EXPECT_TRUE(same_bytes(p.qweight, codes));
  EXPECT_TRUE(same_bytes(p.wscales, s));
  for (int64_t g = 0; g < K / 64; ++g)
    for (int64_t n = 0; n < N; ++n) {
      const double sv = fv(s, g * N + n);
      const double wz = bf16_to_f32(f32_to_bf16(float(sv * z.data<uint8_t>()[g * N + n])));
      ASSERT_EQ(fv(p.wzeros, g * N + n), bf16_to_f32(f32_to_bf16(float(8 * sv - wz))));
    }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t c = n / D, d = n % D;
    const bool scale_chunk = c == 1 || c == S - 2;
    const double stored = fv(sb, S * d + c);
    ASSERT_EQ(fv(p.bias, n), bf16_to_f32(f32_to_bf16(float(scale_chunk ? stored - 1 : stored))));
    ASSERT_NEAR(fv(p.bias, n), fv(tb, n), scale_chunk ? 0x1p-8 : 0.0);
  }
}

const char* kDoubleMap[][3] = {  // source (nunchaku C++ names), output (ComfyUI), act_unsigned
    {"qkv_proj", "img_attn.qkv", ""},       {"qkv_proj_context", "txt_attn.qkv", ""},
    {"out_proj", "img_attn.proj", ""},      {"out_proj_context", "txt_attn.proj", ""},
    {"mlp_fc1", "img_mlp.0", ""},           {"mlp_fc2", "img_mlp.2", "u"},
    {"mlp_context_fc1", "txt_mlp.0", ""},   {"mlp_context_fc2", "txt_mlp.2", "u"},
};
const char* kTopMap[][2] = {
    {"x_embedder", "img_in"},
    {"context_embedder", "txt_in"},
    {"time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"},
    {"time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"},
    {"time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"},
    {"time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"},
    {"time_text_embed.text_embedder.linear_1", "vector_in.in_layer"},
    {"time_text_embed.text_embedder.linear_2", "vector_in.out_layer"},
    {"proj_out", "final_layer.linear"},
};

// ---------------------------------------------------------------------------- the whole checkpoint
TEST(ImportFlux, EveryValueAndOutput) {
  TmpDir d;
  ImportReport r = import_checkpoint(kIn, d / "out.safetensors", nk());
  EXPECT_EQ(r.arch, "flux");
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint in = Checkpoint::open(kIn);
  Checkpoint truth = Checkpoint::open(kTruth);
  // Float rest: renamed byte for byte; norm_out's (scale, shift) halves swapped to BFL's (shift, scale).
  for (const auto& m : kTopMap)
    for (const char* sfx : {".weight", ".bias"}) {
      SCOPED_TRACE(std::string(m[0]) + sfx);
      EXPECT_TRUE(same_bytes(out.get(std::string(m[1]) + sfx), in.get(std::string(m[0]) + sfx)));
    }
  for (const char* sfx : {".weight", ".bias"}) {
    const Tensor a = in.get(std::string("norm_out.linear") + sfx), b = out.get(std::string("final_layer.adaLN_modulation.1") + sfx);
    ASSERT_EQ(a.shape(), b.shape());
    const size_t h = a.nbytes() / 2;
    EXPECT_EQ(std::memcmp(b.raw(), static_cast<const uint8_t*>(a.raw()) + h, h), 0);
    EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(b.raw()) + h, a.raw(), h), 0);
  }
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"transformer_blocks.0.norm_q.weight", "double_blocks.0.img_attn.norm.query_norm.scale"},
           {"transformer_blocks.0.norm_k.weight", "double_blocks.0.img_attn.norm.key_norm.scale"},
           {"transformer_blocks.0.norm_added_q.weight", "double_blocks.0.txt_attn.norm.query_norm.scale"},
           {"transformer_blocks.0.norm_added_k.weight", "double_blocks.0.txt_attn.norm.key_norm.scale"},
           {"single_transformer_blocks.0.norm_q.weight", "single_blocks.0.norm.query_norm.scale"},
           {"single_transformer_blocks.0.norm_k.weight", "single_blocks.0.norm.key_norm.scale"}})
    EXPECT_TRUE(same_bytes(out.get(to), in.get(from))) << to;
  // Nothing of nunchaku's names is left.
  for (const auto& n : out.names()) {
    EXPECT_EQ(n.find("transformer_blocks"), std::string::npos) << n;
    EXPECT_EQ(n.find("smooth_orig"), std::string::npos) << n;
    EXPECT_EQ(n.find("embedder"), std::string::npos) << n;
  }
  EXPECT_TRUE(r.notes.empty() || r.notes[0].find("not part of FLUX") == std::string::npos);
  // Double block: 1:1.
  for (const auto& m : kDoubleMap)
    check_layer(out, truth, std::string("transformer_blocks.0.") + m[0], std::string("double_blocks.0.") + m[1], m[2][0] == 'u');
  check_mod(out, truth, "transformer_blocks.0.norm1.linear", "double_blocks.0.img_mod.lin", 6);
  check_mod(out, truth, "transformer_blocks.0.norm1_context.linear", "double_blocks.0.txt_mod.lin", 6);
  check_mod(out, truth, "single_transformer_blocks.0.norm.linear", "single_blocks.0.modulation.lin", 3);
}

// linear1 = [qkv; mlp_fc1]: rows stacked, one smooth, proj_down side by side, proj_up block-diagonal.
// Exact: every value is a copy and the output equals both parts' outputs (spec semantics).
TEST(ImportFlux, Linear1IsExact) {
  TmpDir d;
  import_checkpoint(kIn, d / "out.safetensors", nk());
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint truth = Checkpoint::open(kTruth);
  const Truth q = truth_of(truth, "single_transformer_blocks.0.qkv_proj"), f = truth_of(truth, "single_transformer_blocks.0.mlp_fc1");
  ASSERT_TRUE(same_bytes(q.sm, f.sm));  // the fixture, as DC, smooths both parts with one vector
  QuantizedLayer L = bound(out, "single_blocks.0.linear1");
  EXPECT_FALSE(L.act_unsigned);
  SvdquantW4A4Params p = svdquant_params(L);
  ASSERT_EQ(p.N, 3 * D + F);
  ASSERT_EQ(p.K, D);
  ASSERT_EQ(p.R, q.R + f.R);
  EXPECT_EQ(std::memcmp(p.qweight.raw(), q.codes.raw(), q.codes.nbytes()), 0);
  EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(p.qweight.raw()) + q.codes.nbytes(), f.codes.raw(), f.codes.nbytes()), 0);
  EXPECT_TRUE(same_bytes(p.smooth, q.sm));
  for (int64_t g = 0; g < D / 64; ++g)
    for (int64_t n = 0; n < p.N; ++n)
      ASSERT_EQ(p.wscales.data<uint16_t>()[g * p.N + n],
                n < q.N ? q.ws.data<uint16_t>()[g * q.N + n] : f.ws.data<uint16_t>()[g * f.N + n - q.N]);
  const int64_t R = p.R;
  for (int64_t k = 0; k < D; ++k)
    for (int64_t r = 0; r < R; ++r)
      ASSERT_EQ(p.proj_down.data<uint16_t>()[k * R + r],
                r < q.R ? q.down.data<uint16_t>()[k * q.R + r] : f.down.data<uint16_t>()[k * f.R + r - q.R]);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t r = 0; r < R; ++r) {
      const bool top = n < q.N, left = r < q.R;
      const uint16_t want = top == left ? (top ? q.up.data<uint16_t>()[n * q.R + r] : f.up.data<uint16_t>()[(n - q.N) * f.R + r - q.R])
                                        : uint16_t(0);
      ASSERT_EQ(p.proj_up.data<uint16_t>()[n * R + r], want) << n << "," << r;
    }
  for (int64_t n = 0; n < p.N; ++n)
    ASSERT_EQ(p.bias.data<uint16_t>()[n], n < q.N ? q.bias.data<uint16_t>()[n] : f.bias.data<uint16_t>()[n - q.N]);
  nn::Linear lin = nn::Linear::from_layer(L);
  const int64_t M = 4;
  Tensor x = grid_input(M, D, 17);
  Tensor y = lin.forward(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < p.N; n += 5) {
      const RefOut r = n < q.N ? svdquant_ref(x, 0, q, false, m, n) : svdquant_ref(x, 0, f, false, m, n - q.N);
      ASSERT_NEAR(y.data<float>()[m * p.N + n], r.y, r.tol) << "m=" << m << " n=" << n;
    }
}

// linear2 = [out_proj | mlp_fc2] along K as one svdquant_w4a4 layer (the default).
TEST(ImportFlux, Linear2SvdquantValuesAndBoundedDeviation) {
  TmpDir d;
  import_checkpoint(kIn, d / "out.safetensors", nk("svdquant"));
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint truth = Checkpoint::open(kTruth);
  const Truth a = truth_of(truth, "single_transformer_blocks.0.out_proj"), b = truth_of(truth, "single_transformer_blocks.0.mlp_fc2");
  QuantizedLayer L = bound(out, "single_blocks.0.linear2");
  EXPECT_FALSE(L.act_unsigned);
  EXPECT_FALSE(L.config.act_unsigned.has_value());
  SvdquantW4A4Params p = svdquant_params(L);
  const int64_t K = a.K + b.K, R = a.R + b.R;
  ASSERT_EQ(p.N, D);
  ASSERT_EQ(p.K, K);
  ASSERT_EQ(p.R, R);
  for (int64_t n = 0; n < D; ++n) {  // codes copied along K
    const auto* row = static_cast<const uint8_t*>(p.qweight.raw()) + n * (K / 2);
    ASSERT_EQ(std::memcmp(row, a.codes.data<int8_t>() + n * (a.K / 2), size_t(a.K / 2)), 0) << n;
    ASSERT_EQ(std::memcmp(row + a.K / 2, b.codes.data<int8_t>() + n * (b.K / 2), size_t(b.K / 2)), 0) << n;
  }
  EXPECT_EQ(std::memcmp(p.wscales.raw(), a.ws.raw(), a.ws.nbytes()), 0);
  EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(p.wscales.raw()) + a.ws.nbytes(), b.ws.raw(), b.ws.nbytes()), 0);
  EXPECT_EQ(std::memcmp(p.smooth.raw(), a.sm.raw(), a.sm.nbytes()), 0);
  EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(p.smooth.raw()) + a.sm.nbytes(), b.sm.raw(), b.sm.nbytes()), 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) {
      const bool top = k < a.K, left = r < a.R;
      const uint16_t want = top == left ? (top ? a.down.data<uint16_t>()[k * a.R + r] : b.down.data<uint16_t>()[(k - a.K) * b.R + r - a.R])
                                        : uint16_t(0);
      ASSERT_EQ(p.proj_down.data<uint16_t>()[k * R + r], want) << k << "," << r;
    }
  for (int64_t n = 0; n < D; ++n)
    for (int64_t r = 0; r < R; ++r)
      ASSERT_EQ(p.proj_up.data<uint16_t>()[n * R + r], r < a.R ? a.up.data<uint16_t>()[n * a.R + r] : b.up.data<uint16_t>()[n * b.R + r - a.R]);
  // Bias: b_attn + b_mlp + the shift term of the (formerly act_unsigned) mlp part, one bf16 rounding.
  for (int64_t n = 0; n < D; ++n) {
    const double exact = double(fv(a.bias, n)) + fv(b.bias, n) + shift_term(b, n);
    ASSERT_NEAR(fv(p.bias, n), exact, half_ulp_bf16(exact) * 1.0001 + 1e-12) << n;
  }
  // Outputs, for two input kinds: (0) grid values, attention part in [−2, 2], mlp part in
  // [−0.171875, 2] (≥ the unsigned grid's floor); (1) bf16-rounded N(0, 1) for the attention part
  // and GELU(N(0, 1)) for the mlp part (what fc2 sees in FLUX). Both exact in fp32 and bf16.
  nn::Linear lin = nn::Linear::from_layer(L);
  const int64_t M = 16;
  for (int kind = 0; kind < 2; ++kind) {
    SCOPED_TRACE(kind ? "gelu(gauss)" : "grid");
    Tensor x = Tensor::empty(DType::F32, {M, K});
    if (kind == 0) {
      Tensor xa = grid_input(M, a.K, 23), xb = grid_input(M, b.K, 29, -11, 128);
      for (int64_t m = 0; m < M; ++m) {
        std::memcpy(x.mutable_data<float>() + m * K, xa.data<float>() + m * a.K, size_t(a.K) * 4);
        std::memcpy(x.mutable_data<float>() + m * K + a.K, xb.data<float>() + m * b.K, size_t(b.K) * 4);
      }
    } else {
      std::mt19937 rng(41);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          float v = nd(rng);
          if (k >= a.K) v = 0.5f * v * (1.0f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));  // GELU (tanh)
          x.mutable_data<float>()[m * K + k] = bf16_to_f32(f32_to_bf16(v));
        }
    }
    Tensor y = lin.forward(x);
    double se_nk = 0, se_nk_exact = 0, se_imp_exact = 0, ss = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < D; ++n) {
        const double yv = y.data<float>()[m * D + n];
        // (1) The spec semantics of the imported layer itself (signed grid everywhere, folded bias).
        const RefOut ra = svdquant_ref(x, 0, a, false, m, n, false), rb = svdquant_ref(x, a.K, b, false, m, n, false);
        const double self = ra.y + rb.y + fv(p.bias, n);
        ASSERT_NEAR(yv, self, ra.tol + rb.tol) << "m=" << m << " n=" << n;
        // (2) nunchaku's semantics: attention part signed, mlp part act_unsigned (+shift), stored biases.
        const RefOut na = svdquant_ref(x, 0, a, false, m, n), nb = svdquant_ref(x, a.K, b, true, m, n);
        const double nunchaku = na.y + nb.y;
        // Bound: both grids' rounding (½ step each) on the mlp part, the bias rounding, fp32 sums.
        const double bound = nb.act_err + rb.act_err + half_ulp_bf16(fv(p.bias, n)) + na.tol + nb.tol + ra.tol + rb.tol;
        ASSERT_NEAR(yv, nunchaku, bound) << "m=" << m << " n=" << n;
        const double exact = dense_ref(x, 0, a, m, n) + dense_ref(x, a.K, b, m, n);
        se_nk += (yv - nunchaku) * (yv - nunchaku);
        se_nk_exact += (nunchaku - exact) * (nunchaku - exact);
        se_imp_exact += (yv - exact) * (yv - exact);
        ss += exact * exact;
      }
    // Reported in docs/import.md (synthetic weights; real checkpoints differ).
    std::printf("[ flux linear2 svdquant, %s inputs ] rms / rms(y): imported − nunchaku %.4f; nunchaku − no activation "
                "quantization %.4f; imported − no activation quantization %.4f\n",
                kind ? "gelu(gauss)" : "grid", std::sqrt(se_nk / ss), std::sqrt(se_nk_exact / ss), std::sqrt(se_imp_exact / ss));
    EXPECT_LT(std::sqrt(se_nk / ss), 0.5);  // sanity only: the per-output bound above is the test
  }
}

// linear2 as a dense bf16 layer (--flux-linear2 bf16): W_eff and the folded bias, one rounding each.
TEST(ImportFlux, Linear2Bf16IsTheEffectiveWeight) {
  TmpDir d;
  ImportReport r = import_checkpoint(kIn, d / "out.safetensors", nk("bf16"));
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint truth = Checkpoint::open(kTruth);
  const Truth a = truth_of(truth, "single_transformer_blocks.0.out_proj"), b = truth_of(truth, "single_transformer_blocks.0.mlp_fc2");
  EXPECT_FALSE(out.contains("single_blocks.0.linear2.comfy_quant"));
  const Tensor w = out.get("single_blocks.0.linear2.weight"), bias = out.get("single_blocks.0.linear2.bias");
  const int64_t K = a.K + b.K;
  ASSERT_EQ(w.dtype(), DType::BF16);
  ASSERT_EQ(w.shape(), (Shape{D, K}));
  // W_eff by the truth, per element.
  Tensor ex = Tensor::zeros(DType::F32, {1, K});
  for (int64_t n = 0; n < D; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const Truth& t = k < a.K ? a : b;
      const int64_t kk = k < a.K ? k : k - a.K;
      const float sv = fv(t.sm, kk);
      double v = double(code_at(t.codes, n, kk, t.K)) * fv(t.ws, (kk / 64) * t.N + n) * (std::fabs(sv) > 1e-10f ? 1.0 / sv : 0.0);
      for (int64_t rr = 0; rr < t.R; ++rr) v += double(fv(t.up, n * t.R + rr)) * fv(t.down, kk * t.R + rr);
      ASSERT_NEAR(fv(w, n * K + k), v, half_ulp_bf16(v) * 1.0001 + 1e-30) << n << "," << k;
    }
    const double eb = double(fv(a.bias, n)) + fv(b.bias, n) + shift_term(b, n);
    ASSERT_NEAR(fv(bias, n), eb, half_ulp_bf16(eb) * 1.0001) << n;
  }
  // It loads as a float layer, and its output is nunchaku's up to nunchaku's own activation
  // quantization (both parts) and the bf16 roundings of W and b.
  QuantizedLayer L = bound(out, "single_blocks.0.linear2");
  EXPECT_EQ(L.format, nullptr);
  nn::Linear lin = nn::Linear::from_layer(L);
  const int64_t M = 4;
  Tensor xa = grid_input(M, a.K, 31), xb = grid_input(M, b.K, 37, -11, 128);
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(x.mutable_data<float>() + m * K, xa.data<float>() + m * a.K, size_t(a.K) * 4);
    std::memcpy(x.mutable_data<float>() + m * K + a.K, xb.data<float>() + m * b.K, size_t(b.K) * 4);
  }
  Tensor y = lin.forward(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < D; ++n) {
      const RefOut na = svdquant_ref(x, 0, a, false, m, n), nb = svdquant_ref(x, a.K, b, true, m, n);
      double wsum = 0, yabs = 0;
      for (int64_t k = 0; k < K; ++k) {
        wsum += std::fabs(x.data<float>()[m * K + k]) * std::fabs(fv(w, n * K + k));
        yabs += std::fabs(x.data<float>()[m * K + k] * fv(w, n * K + k));
      }
      const double bound = na.act_err + nb.act_err + wsum * 0x1p-8 + half_ulp_bf16(fv(bias, n)) + na.tol + nb.tol +
                           double(K) * 0x1p-23 * (yabs + 1) + std::fabs(na.y + nb.y) * 0x1p-8;  // + a bf16 output
      ASSERT_NEAR(y.data<float>()[m * D + n], na.y + nb.y, bound) << "m=" << m << " n=" << n;
    }
  bool noted = false;
  for (const auto& s : r.notes) noted = noted || s.find("bf16") != std::string::npos;
  EXPECT_TRUE(noted);
}

// Every output layer binds and constructs an nn::Linear (nibble's loader; there is no FLUX model).
TEST(ImportFlux, EveryLayerLoads) {
  TmpDir d;
  for (const char* l2 : {"svdquant", "bf16"}) {
    SCOPED_TRACE(l2);
    import_checkpoint(kIn, d / "out.safetensors", nk(l2));
    Checkpoint out = Checkpoint::open(d / "out.safetensors");
    int quantized = 0;
    for (const auto& src : collect_layers(out)) {
      SCOPED_TRACE(src.name);
      if (!src.tensors.count("weight") || src.tensors.at("weight").dim() != 2) continue;  // norms: not linears
      QuantizedLayer L = bind_layer(src);
      quantized += L.format != nullptr;
      nn::Linear lin = nn::Linear::from_layer(L);
      Tensor x = grid_input(2, lin.in_features(), 3, -11, 128);
      Tensor y = lin.forward(x);
      for (int64_t i = 0; i < y.numel(); ++i) ASSERT_TRUE(std::isfinite(y.data<float>()[i]));
    }
    // 8 + 2 in the double block; linear1, modulation.lin and (svdquant) linear2 in the single block.
    EXPECT_EQ(quantized, std::string(l2) == "svdquant" ? 13 : 12);
    // nibble's model loader builds every linear of the file.
    nn::Model m = nn::Model::load(d / "out.safetensors");
    EXPECT_EQ(m.linear("single_blocks.0.linear1").format_name(), "svdquant_w4a4");
    EXPECT_EQ(m.linear("single_blocks.0.linear2").format_name(), std::string(l2) == "svdquant" ? "svdquant_w4a4" : "bf16");
    EXPECT_EQ(m.linear("double_blocks.0.img_mod.lin").format_name(), "awq_w4a16");
    EXPECT_TRUE(m.contains("final_layer.adaLN_modulation.1"));
    EXPECT_TRUE(m.has_tensor("single_blocks.0.norm.key_norm.scale"));
    fs::remove(d / "out.safetensors");
  }
}

// ---------------------------------------------------------------------------- names and bad input
// Rewrites the fixture with `edit` (return "" to drop a key, or the new name).
std::string rewrite(const TmpDir& dir, const std::string& name, const std::function<std::string(const std::string&)>& edit,
                    const std::function<Tensor(const std::string&, const Tensor&)>& value = nullptr,
                    const std::vector<std::pair<std::string, Tensor>>& extra = {}) {
  Checkpoint in = Checkpoint::open(kIn);
  const std::string path = dir / name;
  SafetensorsWriter w(path, in.metadata());
  for (const auto& [n, t] : extra) w.add(n, t.dtype(), t.shape());
  std::vector<std::pair<std::string, std::string>> keep;
  for (const auto& n : in.names()) {
    const std::string to = edit(n);
    if (to.empty()) continue;
    keep.emplace_back(n, to);
    const TensorInfo& ti = in.info(n);
    w.add(to, ti.dtype, ti.shape);
  }
  for (const auto& [n, t] : extra) w.write_tensor(n, t);  // in declaration order
  for (const auto& [from, to] : keep) w.write_tensor(to, value ? value(from, in.get(from)) : in.get(from));
  w.commit();
  return path;
}

// nunchaku's v2 Python model names (diffusers' attn.to_qkv, ff.net.0.proj, …; smooth_factor,
// proj_down, proj_up) give the same output as the C++ runtime's names.
TEST(ImportFlux, DiffusersModuleNamesGiveTheSameFile) {
  TmpDir d;
  const std::vector<std::pair<std::string, std::string>> ren = {
      {"transformer_blocks.0.qkv_proj_context.", "transformer_blocks.0.attn.add_qkv_proj."},
      {"transformer_blocks.0.qkv_proj.", "transformer_blocks.0.attn.to_qkv."},
      {"transformer_blocks.0.out_proj_context.", "transformer_blocks.0.attn.to_add_out."},
      {"transformer_blocks.0.out_proj.", "transformer_blocks.0.attn.to_out.0."},
      {"transformer_blocks.0.mlp_context_fc1.", "transformer_blocks.0.ff_context.net.0.proj."},
      {"transformer_blocks.0.mlp_context_fc2.", "transformer_blocks.0.ff_context.net.2."},
      {"transformer_blocks.0.mlp_fc1.", "transformer_blocks.0.ff.net.0.proj."},
      {"transformer_blocks.0.mlp_fc2.", "transformer_blocks.0.ff.net.2."},
      {"transformer_blocks.0.norm_added_q.", "transformer_blocks.0.attn.norm_added_q."},
      {"transformer_blocks.0.norm_added_k.", "transformer_blocks.0.attn.norm_added_k."},
      {"transformer_blocks.0.norm_q.", "transformer_blocks.0.attn.norm_q."},
      {"transformer_blocks.0.norm_k.", "transformer_blocks.0.attn.norm_k."},
      {"single_transformer_blocks.0.qkv_proj.", "single_transformer_blocks.0.attn.to_qkv."},
      {"single_transformer_blocks.0.out_proj.", "single_transformer_blocks.0.attn.to_out."},
      {"single_transformer_blocks.0.norm_q.", "single_transformer_blocks.0.attn.norm_q."},
      {"single_transformer_blocks.0.norm_k.", "single_transformer_blocks.0.attn.norm_k."},
  };
  const std::string v2 = rewrite(d, "v2.safetensors", [&](const std::string& n) {
    std::string o = n;
    for (const auto& [a, b] : ren)
      if (o.compare(0, a.size(), a) == 0) {
        o = b + o.substr(a.size());
        break;
      }
    for (const auto& [a, b] : std::vector<std::pair<std::string, std::string>>{
             {".lora_down", ".proj_down"}, {".lora_up", ".proj_up"}, {".smooth_orig", ".smooth_factor_orig"}, {".smooth", ".smooth_factor"}})
      if (o.size() > a.size() && o.compare(o.size() - a.size(), a.size(), a) == 0) {
        o = o.substr(0, o.size() - a.size()) + b;
        break;
      }
    return o;
  });
  import_checkpoint(kIn, d / "a.safetensors", nk());
  ImportReport r = import_checkpoint(v2, d / "b.safetensors", nk());
  EXPECT_EQ(r.arch, "flux");  // not taken for Qwen-Image despite attn.to_qkv
  Checkpoint a = Checkpoint::open(d / "a.safetensors"), b = Checkpoint::open(d / "b.safetensors");
  ASSERT_EQ(a.names().size(), b.names().size());
  for (const auto& n : a.names()) {
    ASSERT_TRUE(b.contains(n)) << n;
    EXPECT_TRUE(same_bytes(a.get(n), b.get(n))) << n;
  }
}

void expect_error(const std::string& in, const fs::path& out, const ImportOptions& o, std::initializer_list<const char*> words) {
  try {
    import_checkpoint(in, out, o);
    ADD_FAILURE() << "no error for " << in;
  } catch (const Error& e) {
    for (const char* w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
}

TEST(ImportFlux, BadInputNamesTheKeyAndLeavesNothing) {
  TmpDir d;
  const fs::path out = d / "o.safetensors";
  // A missing quantized part of linear1.
  expect_error(rewrite(d, "no_fc1.safetensors",
                       [](const std::string& n) { return n.find("single_transformer_blocks.0.mlp_fc1.") == 0 ? "" : n; }),
               out, nk(), {"single_transformer_blocks.0.mlp_fc1.qweight", "linear1"});
  // A missing float tensor of a block.
  expect_error(rewrite(d, "no_norm.safetensors",
                       [](const std::string& n) { return n == "transformer_blocks.0.norm_added_k.weight" ? "" : n; }),
               out, nk(), {"transformer_blocks.0.norm_added_k.weight"});
  // A missing top-level tensor.
  expect_error(rewrite(d, "no_embed.safetensors", [](const std::string& n) { return n == "x_embedder.weight" ? "" : n; }), out,
               nk(), {"x_embedder.weight"});
  // A missing part of one layer.
  expect_error(rewrite(d, "no_up.safetensors",
                       [](const std::string& n) { return n == "transformer_blocks.0.mlp_fc2.lora_up" ? "" : n; }),
               out, nk(), {"transformer_blocks.0.mlp_fc2", "proj_up"});
  // qkv and mlp_fc1 smoothed differently: linear1 cannot hold them exactly.
  expect_error(rewrite(
                   d, "smooth.safetensors", [](const std::string& n) { return n; },
                   [](const std::string& n, const Tensor& t) {
                     if (n != "single_transformer_blocks.0.mlp_fc1.smooth") return t;
                     Tensor c = Tensor::from_bytes(t.dtype(), t.shape(), t.raw(), t.nbytes());
                     c.mutable_data<uint16_t>()[0] ^= 0x0100;
                     return c;
                   }),
               out, nk(), {"single_transformer_blocks.0.qkv_proj", "single_transformer_blocks.0.mlp_fc1", "smooth"});
  // A modulation layer with a non-zero low-rank branch (GEMV_AWQ's optional lora_down/lora_up):
  // awq_w4a16 has none. An all-zero one (what nunchaku's loader fills in) is fine.
  Tensor lora = Tensor::zeros(DType::BF16, {D, 16});
  const auto same = [](const std::string& n) { return n; };
  EXPECT_NO_THROW(import_checkpoint(rewrite(d, "zero_lora.safetensors", same, nullptr,
                                            {{"single_transformer_blocks.0.norm.linear.lora_down", lora}}),
                                    out, nk()));
  fs::remove(out);
  lora.mutable_data<uint16_t>()[5] = f32_to_bf16(0.25f);
  expect_error(rewrite(d, "mod_lora.safetensors", same, nullptr, {{"single_transformer_blocks.0.norm.linear.lora_down", lora}}),
               out, nk(), {"single_transformer_blocks.0.norm.linear.lora_down", "low-rank"});
  // Not a nunchaku checkpoint at all.
  ImportOptions flux = nk();
  flux.arch = "flux";
  expect_error((kData / "import_autoawq.safetensors").string(), out, flux, {"smooth"});
  // A Qwen-Image nunchaku checkpoint read as FLUX.
  expect_error((kData / "import_nunchaku_qwen.safetensors").string(), out, flux, {"FLUX"});
  // Unknown option value.
  expect_error(kIn, out, nk("fp8"), {"fp8", "svdquant", "bf16"});
}

}  // namespace
