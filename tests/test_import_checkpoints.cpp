// test_import_checkpoints.cpp — the importers against fixtures packed by the REAL packers
// (tests/data/import_*.safetensors, made by scripts/fixtures_import.py: AutoAWQ 0.2.9 and nunchaku's
// NunchakuWeightPacker). Every code, scale, zero, factor, smoothing and bias is compared with the
// known logical values (*_truth.safetensors), and each imported layer's output (nibble's runtime)
// with a reference written here from the spec's semantics. Bad input: clear errors, no output.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
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

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("import") {}
};

using import_test::bound;
using import_test::same_bytes;
constexpr auto f16v = import_test::value_at;
ImportOptions io(const std::string& f) {
  ImportOptions o;
  o.format = f;
  return o;
}
// x: values k/64 in [-2, 2] — exact in every float dtype the kernels may cast to.
Tensor exact_input(int64_t M, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-128, 128);
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t i = 0; i < M * K; ++i) x.mutable_data<float>()[i] = float(d(rng)) / 64.0f;
  return x;
}

// ---------------------------------------------------------------------------- AutoAWQ
TEST(ImportAutoAwq, EveryValueAndOutput) {
  TmpDir d;
  ImportReport r = import_checkpoint((kData / "import_autoawq.safetensors").string(), d / "out.safetensors",
                                     io("autoawq"));
  ASSERT_EQ(r.layers.size(), 2u);
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint in = Checkpoint::open((kData / "import_autoawq.safetensors").string());
  Checkpoint truth = Checkpoint::open((kData / "import_autoawq_truth.safetensors").string());
  EXPECT_TRUE(same_bytes(out.get("model.embed_tokens.weight"), in.get("model.embed_tokens.weight")));
  int64_t rounded = 0;
  for (const std::string P : {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}) {
    SCOPED_TRACE(P);
    QuantizedLayer L = bound(out, P);
    AwqW4A16Params p = awq_params(L);
    EXPECT_EQ(p.group_size, 64);  // G = 128 re-expressed as two exact 64-groups
    const Tensor codes = truth.get(P + ".codes"), z = truth.get(P + ".zero_points"), s = truth.get(P + ".scales");
    const int64_t N = p.N, K = p.K, G = K / s.size(0);
    EXPECT_TRUE(same_bytes(p.qweight, codes));
    ASSERT_EQ(p.wscales.dtype(), DType::F16);
    for (int64_t g = 0; g < K / 64; ++g)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t gs = g * 64 / G;
        const float sv = f16v(s, gs * N + n);
        ASSERT_EQ(f16v(p.wscales, g * N + n), sv);
        const double exact = double(8 - int(z.data<uint8_t>()[gs * N + n])) * sv;
        const float stored = f16v(p.wzeros, g * N + n);
        ASSERT_EQ(stored, f16_to_f32(f32_to_f16(float(exact))));  // one rounding, RNE
        if (double(stored) != exact && (g * 64) % G == 0) ++rounded;  // the report counts source zeros
      }
    if (truth.contains(P + ".bias")) {
      ASSERT_TRUE(p.bias.defined());
      EXPECT_TRUE(same_bytes(p.bias, truth.get(P + ".bias")));
    }
    // Output vs the AutoAWQ semantics W = (q − z)·s (exact), y = x·Wᵀ + b.
    nn::Linear lin = nn::Linear::from_layer(L);
    const int64_t M = 3;
    Tensor x = exact_input(M, K, 7);
    Tensor y = lin.forward(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double ref = 0, tol = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const uint8_t b = uint8_t(codes.data<int8_t>()[n * (K / 2) + k / 2]);
          const int q = k % 2 ? unpack_hi_unsigned(b) : unpack_lo_unsigned(b);
          const int64_t gs = k / G;
          const double sv = f16v(s, gs * N + n), zv = z.data<uint8_t>()[gs * N + n];
          const double w = (q - zv) * sv, xv = x.data<float>()[m * K + k];
          ref += xv * w;
          mag += std::fabs(xv * w);
          const double zex = (8 - zv) * sv;
          tol += std::fabs(xv) * std::fabs(double(f16_to_f32(f32_to_f16(float(zex)))) - zex);  // z′ rounding
        }
        if (p.bias.defined()) ref += f16v(p.bias, n);
        // + fp32 accumulation (K terms) + one rounding of y to the scale dtype (fp16).
        tol += double(K) * 0x1p-24 * (mag + 1) + std::fabs(ref) * 0x1p-11 + 1e-6;
        ASSERT_NEAR(y.data<float>()[m * N + n], ref, tol) << "m=" << m << " n=" << n;
      }
  }
  EXPECT_EQ(r.zeros.rounded, rounded);
  EXPECT_EQ(r.zeros.total, 192 * 2 + 64 * 2);
}

TEST(ImportAutoAwq, KeepGroupSize) {
  TmpDir d;
  ImportOptions o = io("autoawq");
  o.out_group_size = 128;
  EXPECT_THROW(import_checkpoint((kData / "import_autoawq.safetensors").string(), d / "o.safetensors", o), Error);
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));  // up_proj has G = 64: 128 does not divide it
}

TEST(ImportAutoAwq, WrongFormatNamesKeysAndLeavesNothing) {
  TmpDir d;
  try {
    import_checkpoint((kData / "import_nunchaku_qwen.safetensors").string(), d / "o.safetensors", io("autoawq"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("qzeros"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));
  try {
    import_checkpoint((kData / "import_autoawq.safetensors").string(), d / "o.safetensors", io("nunchaku"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("smooth"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));
  EXPECT_THROW(import_checkpoint((kData / "import_autoawq.safetensors").string(), d / "o.safetensors", io("gguf")),
               Error);
}

// ---------------------------------------------------------------------------- nunchaku
// Spec §3.3/§3.4 layer semantics (CUDA path, fp32 activations): per row and 64-group, y = x_main/smooth,
// scale = max(amax/qmax, 1e-10), q = rint(y·(1/scale)) clamped, int dot with the codes, × ascale × wscale;
// + x_raw·proj_down·proj_upᵀ + bias. Returns the reference and a per-output tolerance.
void svdquant_reference(const Tensor& x, const Tensor& codes, const Tensor& wscales, const Tensor& smooth,
                        const Tensor& down, const Tensor& up, const Tensor& bias, bool act_unsigned, int64_t m, int64_t n,
                        double* ref_out, double* tol_out) {
  const int64_t K = x.size(1), N = up.size(0), R = up.size(1);
  double acc = 0, mag = 0;
  for (int64_t g = 0; g < K / 64; ++g) {
    float ys[64], amax = 0;
    for (int k = 0; k < 64; ++k) {
      float xv = x.data<float>()[m * K + g * 64 + k];
      if (act_unsigned) xv += 0.171875f;
      const float sv = f16v(smooth, g * 64 + k);
      const float inv = std::fabs(sv) > 1e-10f ? 1.0f / sv : 0.0f;
      ys[k] = xv * inv;
      amax = std::max(amax, std::fabs(ys[k]));
    }
    const float qmax = act_unsigned ? 15.0f : 7.0f;
    const float scale = std::max(amax / qmax, 1e-10f), rs = 1.0f / scale;
    long dot = 0;
    for (int k = 0; k < 64; ++k) {
      int qa = int(std::nearbyint(ys[k] * rs));
      qa = act_unsigned ? std::clamp(qa, 0, 15) : std::clamp(qa, -7, 7);
      const int64_t kk = g * 64 + k;
      const uint8_t b = uint8_t(codes.data<int8_t>()[n * (K / 2) + kk / 2]);
      dot += long(qa) * (kk % 2 ? unpack_hi_signed(b) : unpack_lo_signed(b));
    }
    const double t = double(dot) * scale * f16v(wscales, g * N + n);
    acc += t;
    mag += std::fabs(t);
  }
  double branch = 0;  // Σ_r (Σ_k |x·d| + |lora|)·|u|
  for (int64_t r = 0; r < R; ++r) {
    double la = 0, lm = 0;
    for (int64_t k = 0; k < K; ++k) {
      la += double(x.data<float>()[m * K + k]) * f16v(down, k * R + r);
      lm += std::fabs(double(x.data<float>()[m * K + k]) * f16v(down, k * R + r));
    }
    acc += la * f16v(up, n * R + r);
    mag += lm * std::fabs(f16v(up, n * R + r)) + std::fabs(la * f16v(up, n * R + r));
    branch += lm * std::fabs(f16v(up, n * R + r)) + std::fabs(la * f16v(up, n * R + r));
  }
  if (bias.defined()) acc += f16v(bias, n);
  *ref_out = acc;
  // fp32 accumulation of the group terms and the branch, plus the bf16 low-rank branch of fp32 x with bf16
  // proj_down/up (docs/w4a4.md): x and the rank-R intermediate each rounded to bf16 once, ≤ 2^-8 relative:
  // ≤ 2^-8·(1 + 2^-8)·Σ_r (Σ_k|x·d| + |lora|)·|u|.
  *tol_out = double(K) * 0x1p-23 * (mag + 1) + 1e-6 + (down.dtype() == DType::BF16 ? 0x1p-8 * (1 + 0x1p-8) * branch : 0.0);
}

struct NkLayerCase {
  std::string source;
  std::vector<std::string> outs;
  bool act_unsigned;
};

TEST(ImportNunchaku, QwenImageEveryValueAndOutput) {
  TmpDir d;
  const std::string in = (kData / "import_nunchaku_qwen.safetensors").string();
  ImportReport r = import_checkpoint(in, d / "out.safetensors", io("nunchaku"));
  EXPECT_EQ(r.arch, "qwen-image");
  Checkpoint out = Checkpoint::open(d / "out.safetensors");
  Checkpoint src = Checkpoint::open(in);
  Checkpoint truth = Checkpoint::open((kData / "import_nunchaku_qwen_truth.safetensors").string());
  EXPECT_TRUE(same_bytes(out.get("img_in.weight"), src.get("img_in.weight")));
  EXPECT_TRUE(same_bytes(out.get("transformer_blocks.0.attn.norm_q.weight"), src.get("transformer_blocks.0.attn.norm_q.weight")));
  for (const auto& n : out.names()) {
    EXPECT_EQ(n.find("qkv"), std::string::npos) << n;  // fused layers are split
    EXPECT_EQ(n.find("smooth_factor_orig"), std::string::npos) << n;
  }
  const std::string b = "transformer_blocks.0.";
  const std::vector<NkLayerCase> cases = {
      {b + "attn.to_qkv", {b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"}, false},
      {b + "attn.add_qkv_proj", {b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"}, false},
      {b + "attn.to_out.0", {b + "attn.to_out.0"}, false},
      {b + "img_mlp.net.0.proj", {b + "img_mlp.net.0.proj"}, false},
      {b + "img_mlp.net.2", {b + "img_mlp.net.2"}, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.source);
    const Tensor codes = truth.get(c.source + ".codes"), ws = truth.get(c.source + ".wscales"),
                 sm = truth.get(c.source + ".smooth"), down = truth.get(c.source + ".proj_down"),
                 up = truth.get(c.source + ".proj_up"), bias = truth.get(c.source + ".bias");
    const int64_t Ntot = up.size(0), K = sm.numel(), R = up.size(1), Nm = Ntot / int64_t(c.outs.size());
    for (size_t i = 0; i < c.outs.size(); ++i) {
      SCOPED_TRACE(c.outs[i]);
      QuantizedLayer L = bound(out, c.outs[i]);
      EXPECT_EQ(L.act_unsigned, c.act_unsigned);
      EXPECT_TRUE(L.config.act_unsigned.has_value() == c.act_unsigned);  // written, not inferred
      SvdquantW4A4Params p = svdquant_params(L);
      ASSERT_EQ(p.N, Nm);
      ASSERT_EQ(p.K, K);
      ASSERT_EQ(p.R, R);  // zero pad rank columns trimmed
      const int64_t n0 = int64_t(i) * Nm;
      EXPECT_EQ(std::memcmp(p.qweight.raw(), codes.data<int8_t>() + n0 * (K / 2), size_t(Nm * K / 2)), 0);
      EXPECT_TRUE(same_bytes(p.smooth, sm));
      EXPECT_TRUE(same_bytes(p.proj_down, down));
      for (int64_t g = 0; g < K / 64; ++g)
        for (int64_t n = 0; n < Nm; ++n)
          ASSERT_EQ(p.wscales.data<uint16_t>()[g * Nm + n], ws.data<uint16_t>()[g * Ntot + n0 + n]);
      EXPECT_EQ(std::memcmp(p.proj_up.raw(), up.data<uint16_t>() + n0 * R, size_t(Nm * R * 2)), 0);
      EXPECT_EQ(std::memcmp(p.bias.raw(), bias.data<uint16_t>() + n0, size_t(Nm * 2)), 0);
      // The layer output of nibble's runtime vs the spec's semantics on the truth values.
      nn::Linear lin = nn::Linear::from_layer(L);
      const int64_t M = 3;
      Tensor x = exact_input(M, K, 11);
      Tensor y = lin.forward(x);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < Nm; ++n) {
          double ref, tol;
          // A member is the fused layer restricted to its rows: slice via offsets into the truth.
          Tensor cm = Tensor::from_bytes(DType::I8, {Nm, K / 2}, codes.data<int8_t>() + n0 * (K / 2), size_t(Nm * K / 2));
          Tensor um = Tensor::from_bytes(DType::BF16, {Nm, R}, up.data<uint16_t>() + n0 * R, size_t(Nm * R * 2));
          Tensor bm = Tensor::from_bytes(DType::BF16, {Nm}, bias.data<uint16_t>() + n0, size_t(Nm * 2));
          Tensor wm = Tensor::empty(DType::BF16, {K / 64, Nm});
          for (int64_t g = 0; g < K / 64; ++g)
            for (int64_t j = 0; j < Nm; ++j) wm.mutable_data<uint16_t>()[g * Nm + j] = ws.data<uint16_t>()[g * Ntot + n0 + j];
          svdquant_reference(x, cm, wm, sm, down, um, bm, c.act_unsigned, m, n, &ref, &tol);
          ASSERT_NEAR(y.data<float>()[m * Nm + n], ref, tol) << "m=" << m << " n=" << n;
          if (n > 8) break;  // a few outputs per row keep the test fast; codes were compared in full
        }
    }
  }
  // AWQ modulation: [D, 6] → [6, D], zeros re-expressed, +1 of the scale chunks out of the bias.
  const std::string P = b + "img_mod.1";
  QuantizedLayer L = bound(out, P);
  AwqW4A16Params p = awq_params(L);
  const Tensor codes = truth.get(P + ".codes"), z = truth.get(P + ".zero_points"), s = truth.get(P + ".scales"),
               tb = truth.get(P + ".bias"), sb = truth.get(P + ".stored_bias");
  const int64_t N = p.N, K = p.K, D = N / 6;
  EXPECT_TRUE(same_bytes(p.qweight, codes));
  EXPECT_TRUE(same_bytes(p.wscales, s));
  for (int64_t g = 0; g < K / 64; ++g)
    for (int64_t n = 0; n < N; ++n) {
      const double sv = f16v(s, g * N + n);
      const double wz = bf16_to_f32(f32_to_bf16(float(sv * z.data<uint8_t>()[g * N + n])));  // DC: −bf16(z·s)
      ASSERT_EQ(f16v(p.wzeros, g * N + n), bf16_to_f32(f32_to_bf16(float(8 * sv - wz))));
    }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t c = n / D, dd = n % D;
    const double stored = f16v(sb, 6 * dd + c);
    const double want = (c == 1 || c == 4) ? stored - 1 : stored;
    ASSERT_EQ(f16v(p.bias, n), bf16_to_f32(f32_to_bf16(float(want))));
    // vs the original bias: the bf16 b + 1 of the conversion lost ≤ half an ulp of b + 1 (≤ 2^-8 here, |b+1| < 2).
    ASSERT_NEAR(f16v(p.bias, n), f16v(tb, n), (c == 1 || c == 4) ? 0x1p-8 : 0.0);
  }
}

TEST(ImportNunchaku, WrongLogicalSizeIsAnError) {
  TmpDir d;
  ImportOptions o = io("nunchaku");
  o.hidden = 160;  // the padding codes of a D = 192 layer are not zero
  EXPECT_THROW(import_checkpoint((kData / "import_nunchaku_qwen.safetensors").string(), d / "o.safetensors", o), Error);
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));
}

}  // namespace
