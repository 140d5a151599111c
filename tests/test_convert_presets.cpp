// test_convert_presets.cpp — the flux and wan presets against checkpoints whose key lists are
// generated here from the architectures' shapes (names as ComfyUI's comfy/ldm/flux/model.py +
// layers.py and comfy/ldm/wan/model.py create them; small widths), and `detect_preset`.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <map>
#include <set>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("presets") {}
};

struct Builder {
  std::vector<std::pair<std::string, Tensor>> t;
  uint64_t seed = 1;
  void lin(const std::string& p, int64_t N, int64_t K, bool bias = true) {
    t.emplace_back(p + ".weight", synth_weight(N, K, seed++).to(DType::BF16));
    if (bias) t.emplace_back(p + ".bias", synth_bias(N, seed++).to(DType::BF16));
  }
  void param(const std::string& n, Shape s) { t.emplace_back(n, Tensor::zeros(DType::BF16, s)); }
};

// FLUX.1 (dev: guidance_embed) with hidden D, mlp_ratio 4, `depth` double and `single` single blocks.
std::string write_flux(const TmpDir& d, int64_t D = 128, int depth = 2, int single = 2) {
  Builder b;
  const int64_t head = 64, mlp = 4 * D, in_ch = 64, ctx = 256, vec = 128;
  b.lin("img_in", D, in_ch);
  b.lin("time_in.in_layer", D, 256);
  b.lin("time_in.out_layer", D, D);
  b.lin("vector_in.in_layer", D, vec);
  b.lin("vector_in.out_layer", D, D);
  b.lin("guidance_in.in_layer", D, 256);
  b.lin("guidance_in.out_layer", D, D);
  b.lin("txt_in", D, ctx);
  for (int i = 0; i < depth; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    for (const char* s : {"img", "txt"}) {
      const std::string q = p + s;
      b.lin(q + "_mod.lin", 6 * D, D);
      b.lin(q + "_attn.qkv", 3 * D, D);
      b.param(q + "_attn.norm.query_norm.scale", {head});
      b.param(q + "_attn.norm.key_norm.scale", {head});
      b.lin(q + "_attn.proj", D, D);
      b.lin(q + "_mlp.0", mlp, D);
      b.lin(q + "_mlp.2", D, mlp);
    }
  }
  for (int i = 0; i < single; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    b.lin(p + "linear1", 3 * D + mlp, D);
    b.lin(p + "linear2", D, D + mlp);
    b.param(p + "norm.query_norm.scale", {head});
    b.param(p + "norm.key_norm.scale", {head});
    b.lin(p + "modulation.lin", 3 * D, D);
  }
  b.lin("final_layer.linear", in_ch, D);
  b.lin("final_layer.adaLN_modulation.1", 2 * D, D);
  const std::string path = d / "flux.safetensors";
  save_safetensors(path, b.t);
  return path;
}

// Wan 2.x (i2v: cross attention with k_img / v_img) with dim D, ffn F, `layers` blocks.
std::string write_wan(const TmpDir& d, int64_t D = 128, int64_t F = 384, int layers = 2, bool i2v = true) {
  Builder b;
  const int64_t text_dim = 256, freq = 256, out = 16;
  b.param("patch_embedding.weight", {D, 16, 1, 2, 2});
  b.param("patch_embedding.bias", {D});
  b.lin("text_embedding.0", D, text_dim);
  b.lin("text_embedding.2", D, D);
  b.lin("time_embedding.0", D, freq);
  b.lin("time_embedding.2", D, D);
  b.lin("time_projection.1", 6 * D, D);
  for (int i = 0; i < layers; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    for (const char* s : {"q", "k", "v", "o"}) b.lin(p + "self_attn." + s, D, D);
    b.param(p + "self_attn.norm_q.weight", {D});
    b.param(p + "self_attn.norm_k.weight", {D});
    for (const char* s : {"q", "k", "v", "o"}) b.lin(p + "cross_attn." + s, D, D);
    b.param(p + "cross_attn.norm_q.weight", {D});
    b.param(p + "cross_attn.norm_k.weight", {D});
    if (i2v) {
      b.lin(p + "cross_attn.k_img", D, D);
      b.lin(p + "cross_attn.v_img", D, D);
      b.param(p + "cross_attn.norm_k_img.weight", {D});
    }
    b.param(p + "norm3.weight", {D});
    b.param(p + "norm3.bias", {D});
    b.lin(p + "ffn.0", F, D);
    b.lin(p + "ffn.2", D, F);
    b.param(p + "modulation", {1, 6, D});
  }
  b.lin("head.head", out * 4, D);
  b.param("head.modulation", {1, 2, D});
  if (i2v) {
    b.param("img_emb.proj.0.weight", {1280});
    b.lin("img_emb.proj.1", 1280, 1280);
    b.lin("img_emb.proj.3", D, 1280);
    b.param("img_emb.proj.4.weight", {D});
  }
  const std::string path = d / "wan.safetensors";
  save_safetensors(path, b.t);
  return path;
}

std::map<std::string, const LayerPlan*> by_name(const ConvertPlan& p) {
  std::map<std::string, const LayerPlan*> m;
  for (const auto& l : p.layers) m[l.name] = &l;
  return m;
}

}  // namespace

TEST(ConvertPresets, Flux) {
  TmpDir d;
  const std::string in = write_flux(d);
  ConvertOptions o;
  o.preset = "flux";
  o.rank = 16;
  const ConvertPlan p = plan_conversion(in, o);
  const auto m = by_name(p);
  EXPECT_EQ(p.layers.size(), 2u * 10 + 2u * 3);
  for (int i = 0; i < 2; ++i) {
    const std::string b = "double_blocks." + std::to_string(i) + ".";
    for (const char* s : {"img", "txt"}) {
      const std::string q = b + s;
      ASSERT_TRUE(m.count(q + "_mod.lin")) << q;
      EXPECT_EQ(m.at(q + "_mod.lin")->format, "awq_w4a16");
      for (const char* l : {"_attn.qkv", "_attn.proj", "_mlp.0", "_mlp.2"}) {
        ASSERT_TRUE(m.count(q + l)) << q + l;
        EXPECT_EQ(m.at(q + l)->format, "svdquant_w4a4");
        EXPECT_EQ(m.at(q + l)->act_unsigned, std::string(l) == "_mlp.2") << q + l;  // post-GELU input
        EXPECT_TRUE(m.at(q + l)->group.empty());  // fused qkv: nothing to share
      }
    }
  }
  for (int i = 0; i < 2; ++i) {
    const std::string b = "single_blocks." + std::to_string(i) + ".";
    EXPECT_EQ(m.at(b + "modulation.lin")->format, "awq_w4a16");
    EXPECT_EQ(m.at(b + "linear1")->format, "svdquant_w4a4");
    EXPECT_EQ(m.at(b + "linear2")->format, "svdquant_w4a4");
    EXPECT_FALSE(m.at(b + "linear2")->act_unsigned);  // attention output ⊕ GELU(mlp): signed
  }
  for (const char* n : {"img_in", "txt_in", "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"})
    EXPECT_FALSE(m.count(n)) << n;
  int64_t n = 0;
  Checkpoint ck = Checkpoint::open(in);
  EXPECT_EQ(detect_preset(ck, &n), "flux");
  EXPECT_EQ(n, int64_t(p.layers.size()));
  // The act_unsigned of the preset is reported (no calibration to check it against).
  bool noted = false;
  for (const auto& s : p.notes) noted |= s.find("img_mlp.2: act_unsigned from preset flux") != std::string::npos;
  EXPECT_TRUE(noted);
  // And it converts (shapes are consistent with the formats).
  EXPECT_NO_THROW(convert_checkpoint(in, d / "out.safetensors", o));
}

TEST(ConvertPresets, Wan) {
  TmpDir d;
  const std::string in = write_wan(d);
  ConvertOptions o;
  o.preset = "wan";
  o.rank = 16;
  const ConvertPlan p = plan_conversion(in, o);
  const auto m = by_name(p);
  EXPECT_EQ(p.layers.size(), 2u * 12);
  for (int i = 0; i < 2; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    for (const char* l : {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                          "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}) {
      ASSERT_TRUE(m.count(b + l)) << b + l;
      EXPECT_EQ(m.at(b + l)->format, "svdquant_w4a4");
      EXPECT_EQ(m.at(b + l)->act_unsigned, std::string(l) == "ffn.2") << l;
    }
    // Shared inputs: self q/k/v read x; cross k/v read the text context; k_img/v_img the image
    // context; cross q reads x alone.
    EXPECT_EQ(m.at(b + "self_attn.k")->group, (std::vector<std::string>{b + "self_attn.q", b + "self_attn.k", b + "self_attn.v"}));
    EXPECT_EQ(m.at(b + "cross_attn.v")->group, (std::vector<std::string>{b + "cross_attn.k", b + "cross_attn.v"}));
    EXPECT_EQ(m.at(b + "cross_attn.v_img")->group, (std::vector<std::string>{b + "cross_attn.k_img", b + "cross_attn.v_img"}));
    EXPECT_TRUE(m.at(b + "cross_attn.q")->group.empty());
    EXPECT_TRUE(m.at(b + "self_attn.o")->group.empty());
  }
  for (const char* n : {"text_embedding.0", "time_projection.1", "head.head", "img_emb.proj.1"}) EXPECT_FALSE(m.count(n)) << n;
  std::map<std::string, std::string> why;
  for (const auto& s : p.skipped) why[s.name] = s.reason;
  EXPECT_NE(why["patch_embedding.weight"].find("convolution"), std::string::npos) << why["patch_embedding.weight"];
  EXPECT_NE(why["blocks.0.modulation"].find("parameter"), std::string::npos) << why["blocks.0.modulation"];
  EXPECT_NE(why["blocks.0.norm3.weight"].find("1-D"), std::string::npos);
  Checkpoint ck = Checkpoint::open(in);
  EXPECT_EQ(detect_preset(ck), "wan");
  // Wrong preset on it: an error that points to the right one.
  ConvertOptions wrong;
  wrong.preset = "flux";
  try {
    plan_conversion(in, wrong);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--preset wan would quantize 24 layers"), std::string::npos) << e.what();
  }
}

TEST(ConvertPresets, UnknownPresetNamesTheSupportedOnes) {
  try {
    preset_rules("sdxl");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("qwen-image, flux, wan"), std::string::npos);
  }
}
