// nn::Model / nn::Linear: loading a mixed checkpoint (float, awq_w4a16, an eager-fallback format),
// prefixes, error messages naming the layer, AWQ fidelity vs the dequantized baseline.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>

#include "kernels/awq_w4a16_kernels.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"
#include "nibble/sample.h"

using namespace nibble;
using namespace nibble::nn;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path p;
  TempDir() {
    p = fs::temp_directory_path() / ("nibble_test_nn_model_" + std::to_string(::getpid()) + "_" +
                                     std::to_string(std::random_device{}()));
    fs::create_directories(p);
  }
  ~TempDir() { fs::remove_all(p); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

Tensor json_tensor(const std::string& s) { return Tensor::from_bytes(DType::U8, {int64_t(s.size())}, s.data(), s.size()); }

Tensor randn(Shape s, std::mt19937& rng, float sd, DType dt = DType::F32) {
  std::normal_distribution<float> nd(0.0f, sd);
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = nd(rng);
  return dt == DType::F32 ? t : t.to(dt);
}

// A random but valid awq_w4a16 layer (codes and scales drawn directly; no quantizer involved).
void add_awq(std::vector<std::pair<std::string, Tensor>>& t, const std::string& p, int64_t N, int64_t K, int64_t G,
             std::mt19937& rng, const char* zero_key = "weight_zero") {
  Tensor q = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t i = 0; i < q.numel(); ++i) q.mutable_data<int8_t>()[i] = int8_t(rng() & 0xFF);
  Tensor s = Tensor::empty(DType::F32, {K / G, N}), z = Tensor::empty(DType::F32, {K / G, N});
  std::uniform_real_distribution<float> us(0.002f, 0.02f), uz(-0.02f, 0.02f);
  for (int64_t i = 0; i < s.numel(); ++i) {
    s.mutable_data<float>()[i] = us(rng);
    z.mutable_data<float>()[i] = uz(rng);
  }
  t.emplace_back(p + ".weight", q);
  t.emplace_back(p + ".weight_scale", s.to(DType::BF16));
  t.emplace_back(std::string(p) + "." + zero_key, z.to(DType::BF16));
  t.emplace_back(p + ".bias", randn({N}, rng, 0.1f, DType::BF16));
  t.emplace_back(p + ".comfy_quant", json_tensor("{\"format\":\"awq_w4a16\",\"group_size\":" + std::to_string(G) + "}"));
}

double psnr_over_range(const Tensor& got, const Tensor& ref) {
  double lo = 1e300, hi = -1e300, se = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = ref.data<float>()[i], g = got.data<float>()[i];
    lo = std::min(lo, r), hi = std::max(hi, r), se += (g - r) * (g - r);
  }
  return 10 * std::log10((hi - lo) * (hi - lo) / std::max(se / double(ref.numel()), 1e-300));
}

}  // namespace

TEST(NnModel, LoadsMixedCheckpointWithPrefix) {
  TempDir dir;
  std::mt19937 rng(11);
  std::vector<std::pair<std::string, Tensor>> t;
  const std::string P = "model.diffusion_model.";
  add_awq(t, P + "blocks.0.img_mod.1", 384, 256, 64, rng);
  t.emplace_back(P + "blocks.0.attn.to_q.weight", randn({256, 256}, rng, 0.05f, DType::BF16));
  t.emplace_back(P + "blocks.0.attn.to_q.bias", randn({256}, rng, 0.05f, DType::BF16));
  t.emplace_back(P + "blocks.0.attn.norm_q.weight", randn({128}, rng, 0.05f, DType::BF16));
  // float8 layer: no fused kernel → eager fallback
  const Tensor w8 = randn({64, 256}, rng, 1.0f).to(DType::F8_E4M3);
  t.emplace_back(P + "extra.fp8.weight", w8);
  const float scale = 0.01f;
  t.emplace_back(P + "extra.fp8.weight_scale", Tensor::from_bytes(DType::F32, {}, &scale, 4));
  t.emplace_back(P + "extra.fp8.comfy_quant", json_tensor("{\"format\":\"float8_e4m3fn\"}"));
  save_safetensors(dir.file("m.safetensors"), t);

  std::vector<std::string> notices;
  set_notice_handler([&](const std::string& m) { notices.push_back(m); });
  const Model m = load_checkpoint(dir.file("m.safetensors"));
  EXPECT_TRUE(m.mixed());
  EXPECT_EQ(m.prefix(), P);
  EXPECT_EQ(m.size(), 3u);
  EXPECT_TRUE(m.contains("blocks.0.img_mod.1"));
  EXPECT_TRUE(m.contains(P + "blocks.0.img_mod.1"));
  EXPECT_EQ(m.linear("blocks.0.img_mod.1").path(), LinearPath::AwqW4A16);
  EXPECT_EQ(m.linear("blocks.0.attn.to_q").path(), LinearPath::Float);
  EXPECT_EQ(m.linear("blocks.0.attn.to_q").format_name(), "bf16");
  EXPECT_EQ(m.linear("extra.fp8").path(), LinearPath::Dequantized);
  EXPECT_TRUE(m.has_tensor("blocks.0.attn.norm_q.weight"));
  EXPECT_TRUE(notices.empty());  // the fallback notice comes with the first forward, once

  // Eager fallback = x · (fp8 · scale)ᵀ
  const Tensor x = randn({3, 256}, rng, 1.0f);
  const Tensor y = m.linear("extra.fp8").forward(x);
  m.linear("extra.fp8").forward(x);
  set_notice_handler(nullptr);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_NE(notices[0].find("float8_e4m3fn"), std::string::npos);
  EXPECT_NE(notices[0].find("extra.fp8"), std::string::npos);
  const Tensor wf = w8.to_f32();
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t n = 0; n < 64; ++n) {
      double s = 0, mag = 0;
      for (int64_t k = 0; k < 256; ++k) {
        const double p = double(x.data<float>()[r * 256 + k]) * wf.data<float>()[n * 256 + k] * scale;
        s += p, mag += std::fabs(p);
      }
      EXPECT_NEAR(y.data<float>()[r * 64 + n], s, 300 * std::ldexp(1.0, -24) * mag);
    }
  // Unknown layer: the error names it and suggests near matches.
  try {
    m.linear("blocks.0.attn.to_k");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blocks.0.attn.to_k"), std::string::npos);
  }
}

// Whether nn::Linear's AWQ path rounds its fp32 x to bf16 on this host (docs/awq.md): the avx512bf16
// tiled GEMV ("gemv-tiled-bf16dot-xbf16", like the kitchen, which multiplies x in the model dtype);
// elsewhere the products are fp32-exact. Rounding x (|δ| ≤ 2^-8 relative, rms ≈ 2^-9/√3) leaves an
// output error of rms ≈ 2^-9/√3 of y's scale, ~59 dB below it, more over the peak-to-peak range:
// measured 72.4–76.0 dB (M = 1..37) against 149–155.5 dB exact.
double awq_layer_min_psnr(int64_t M) {
  const bool rounds = kernels::awq::plan(active_isa(), M, 64, DType::F32, DType::BF16, true).bf16_x;
  return rounds ? 66.0 : 140.0;  // margins 6 / 9 dB under the measured minima; spec criterion 60 dB
}

TEST(NnModel, AwqLayerMatchesDequantizedBaseline) {
  // Spec criterion: ≥ 60 dB PSNR (over the output's peak-to-peak range) for an AWQ-only layer. The
  // layer (prepared weights: fp32-exact products for M ≤ 48) measures 149.0–155.5 dB; asserted
  // ≥ 140 dB (margin 9 dB); with x rounded to bf16 (avx512bf16) 72.4–76.0 dB, asserted ≥ 66 dB.
  TempDir dir;
  std::mt19937 rng(12);
  std::vector<std::pair<std::string, Tensor>> t;
  add_awq(t, "img_mod.1", 6 * 256, 256, 64, rng, "weight_zeros");
  save_safetensors(dir.file("a.safetensors"), t);
  const Model m = load_checkpoint(dir.file("a.safetensors"));
  const Linear& l = m.linear("img_mod.1");
  const Linear base = l.dequantized();
  EXPECT_EQ(base.path(), LinearPath::Dequantized);
  for (int64_t M : {1, 2, 8, 37}) {
    const Tensor x = randn({M, 256}, rng, 1.0f);
    const double p = psnr_over_range(l.forward(x), base.forward(x));
    EXPECT_GE(p, awq_layer_min_psnr(M)) << "M=" << M;
    std::printf("awq_w4a16 vs dequantized baseline, M=%lld: PSNR %.1f dB\n", (long long)M, p);
  }
}

TEST(NnModel, ErrorsNameTheLayer) {
  TempDir dir;
  std::mt19937 rng(13);
  {
    std::vector<std::pair<std::string, Tensor>> t;
    add_awq(t, "blocks.3.img_mod.1", 128, 256, 64, rng);
    t.erase(t.begin() + 1);  // drop weight_scale
    save_safetensors(dir.file("bad.safetensors"), t);
    try {
      load_checkpoint(dir.file("bad.safetensors"));
      FAIL();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("blocks.3.img_mod.1"), std::string::npos) << e.what();
    }
  }
  {
    std::vector<std::pair<std::string, Tensor>> t;
    t.emplace_back("blocks.1.foo.weight", randn({8, 64}, rng, 1.0f));
    t.emplace_back("blocks.1.foo.comfy_quant", json_tensor("{\"format\":\"no_such_format\"}"));
    save_safetensors(dir.file("unk.safetensors"), t);
    try {
      load_checkpoint(dir.file("unk.safetensors"));
      FAIL();
    } catch (const Error& e) {
      const std::string w = e.what();
      EXPECT_NE(w.find("blocks.1.foo"), std::string::npos) << w;
      EXPECT_NE(w.find("no_such_format"), std::string::npos) << w;
    }
  }
  {
    std::vector<std::pair<std::string, Tensor>> t;
    t.emplace_back("lin.weight", randn({8, 64}, rng, 1.0f));
    save_safetensors(dir.file("f.safetensors"), t);
    const Model m = load_checkpoint(dir.file("f.safetensors"));
    EXPECT_FALSE(m.mixed());
    try {
      m.linear("lin").forward(Tensor::zeros(DType::F32, {2, 63}));
      FAIL();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("lin"), std::string::npos);
    }
  }
}

TEST(NnModel, SampleCheckpointEveryLayerRuns) {
  // The formats module's sample: awq, svdquant (natural, tile-packed, act_unsigned, both key
  // spellings), float layers and one layer of every other kitchen format (eager fallback).
  for (bool in_metadata : {false, true}) {
    TempDir dir;
    SampleOptions so;
    so.prefix = "model.diffusion_model.";
    so.configs_in_metadata = in_metadata;
    write_sample_checkpoint(dir.file("s.safetensors"), so);
    set_notice_handler(nullptr);
    const Model m = load_checkpoint(dir.file("s.safetensors"));
    set_notice_handler([](const std::string& s) { std::fprintf(stderr, "nibble: note: %s\n", s.c_str()); });
    EXPECT_TRUE(m.mixed());
    EXPECT_EQ(m.linear("transformer_blocks.0.img_mod.1").path(), LinearPath::AwqW4A16);
    EXPECT_EQ(m.linear("transformer_blocks.0.attn.to_q").path(), LinearPath::SvdquantW4A4);
    EXPECT_EQ(m.linear("transformer_blocks.0.img_mlp.net.0.proj").path(), LinearPath::SvdquantW4A4);
    EXPECT_TRUE(m.linear("transformer_blocks.0.img_mlp.net.2").act_unsigned());
    EXPECT_EQ(m.linear("transformer_blocks.0.txt_mod.1").path(), LinearPath::Float);
    std::mt19937 rng(3);
    for (const auto& name : m.names()) {
      const Linear& l = m.linear(name);
      const Tensor x = randn({5, l.in_features()}, rng, 1.0f);
      const Tensor y = l.forward(x);
      ASSERT_EQ(y.shape(), (Shape{5, l.out_features()})) << name;
      for (int64_t i = 0; i < y.numel(); ++i) ASSERT_TRUE(std::isfinite(y.data<float>()[i])) << name;
      // measured 155.6 dB (spec criterion 60 dB), margin 15 dB; 74.3 dB with x rounded to bf16
      if (l.path() == LinearPath::AwqW4A16) {
        EXPECT_GE(psnr_over_range(y, l.dequantized().forward(x)), awq_layer_min_psnr(5)) << name;
      }
    }
  }
}

TEST(NnModel, ShardedDirectoryAndIndex) {
  TempDir dir;
  std::mt19937 rng(14);
  std::vector<std::pair<std::string, Tensor>> a, b;
  add_awq(a, "blocks.0.img_mod.1", 384, 256, 64, rng);
  b.emplace_back("blocks.0.attn.to_q.weight", randn({256, 256}, rng, 0.05f, DType::BF16));
  fs::create_directories(dir.p / "shards");
  save_safetensors((dir.p / "shards" / "part-00001.safetensors").string(), a);
  save_safetensors((dir.p / "shards" / "part-00002.safetensors").string(), b);
  const Model m = load_checkpoint((dir.p / "shards").string());
  EXPECT_TRUE(m.mixed());
  EXPECT_EQ(m.size(), 2u);
  EXPECT_EQ(m.linear("blocks.0.img_mod.1").path(), LinearPath::AwqW4A16);
  EXPECT_EQ(m.linear("blocks.0.attn.to_q").path(), LinearPath::Float);
}
