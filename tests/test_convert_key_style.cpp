// test_convert_key_style.cpp — `nibble convert --key-style`: the svdquant side tensors spelled for
// ComfyUI's loaders (default: smooth_factor / proj_down / proj_up) or comfy-kitchen's serializer
// (weight_smooth_factor / weight_proj_down / weight_proj_up), same bytes, both read back by nibble.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "nibble/convert.h"
#include "nibble/formats.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {
struct Dir {
  fs::path p = fs::temp_directory_path() / ("nibble_test_key_style_" + std::to_string(::getpid()));
  Dir() { fs::remove_all(p), fs::create_directories(p); }
  ~Dir() { std::error_code ec; fs::remove_all(p, ec); }
  std::string operator/(const std::string& n) const { return (p / n).string(); }
};
bool same(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}
}  // namespace

TEST(ConvertKeyStyle, KitchenSpellingSameBytesAndReadable) {
  Dir d;
  SynthCheckpointOptions so;
  so.blocks = 1, so.hidden = 128, so.head_dim = 64;
  const std::string in = d / "in.safetensors";
  write_synth_qwen_image_checkpoint(in, so);
  ConvertOptions o;
  o.preset = "qwen-image";
  o.rank = 16;
  convert_checkpoint(in, d / "comfy.safetensors", o);
  o.key_style = "kitchen";
  ConvertReport rep = convert_checkpoint(in, d / "kitchen.safetensors", o);
  EXPECT_EQ(plan_conversion(in, o).file_size, rep.plan.file_size);
  auto a = SafetensorsFile::open(d / "comfy.safetensors");
  auto b = SafetensorsFile::open(d / "kitchen.safetensors");
  const std::string P = "transformer_blocks.0.attn.to_q";
  for (const char* k : {"smooth_factor", "proj_down", "proj_up"}) {
    ASSERT_TRUE(a->contains(P + "." + k)) << k;
    EXPECT_FALSE(a->contains(P + ".weight_" + k)) << k;
    ASSERT_TRUE(b->contains(P + ".weight_" + k)) << k;
    EXPECT_FALSE(b->contains(P + "." + k)) << k;
    EXPECT_TRUE(same(a->get(P + "." + k), b->get(P + ".weight_" + k))) << k;
  }
  for (const char* k : {".weight", ".weight_scale", ".bias", ".comfy_quant"})
    EXPECT_TRUE(same(a->get(P + k), b->get(P + k))) << k;
  // awq keeps weight_zeros in both spellings
  EXPECT_TRUE(b->contains("transformer_blocks.0.img_mod.1.weight_zeros"));
  // nibble binds every layer of the kitchen spelling to the same effective weights
  const auto la = collect_layers(Checkpoint::open(d / "comfy.safetensors"));
  const auto lb = collect_layers(Checkpoint::open(d / "kitchen.safetensors"));
  ASSERT_EQ(la.size(), lb.size());
  int svd = 0;
  for (size_t i = 0; i < la.size(); ++i) {
    const QuantizedLayer qa = bind_layer(la[i]), qb = bind_layer(lb[i]);
    EXPECT_EQ(qa.format, qb.format);
    svd += qa.format && std::string(qa.format->name) == "svdquant_w4a4";
    EXPECT_TRUE(same(dequantize(qa), dequantize(qb))) << la[i].name;
  }
  EXPECT_EQ(svd, 12);
  o.key_style = "diffusers";
  EXPECT_THROW(convert_checkpoint(in, d / "bad.safetensors", o), Error);
  EXPECT_FALSE(fs::exists(d / "bad.safetensors"));
}
