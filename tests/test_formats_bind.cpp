// bind_layer() on layers built in memory: the registry, spelling resolution and conflicts, unknown
// formats, missing and mis-shaped parameters, group divisibility, and a few dequantize rules that the
// random sample cannot pin down (round-half-even ties of asym_w4a8_int8).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nibble/formats.h"

using namespace nibble;
using ::testing::AllOf;
using ::testing::HasSubstr;

namespace {

// Float dtypes are filled with `v`; byte dtypes with 0x11 (codes 1 and 1, fp8 values small and finite).
Tensor filled(DType dt, Shape s, float v = 0.01f) {
  Tensor t = Tensor::empty(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (dt) {
      case DType::F32: t.mutable_data<float>()[i] = v; break;
      case DType::BF16: t.mutable_data<uint16_t>()[i] = f32_to_bf16(v); break;
      case DType::F16: t.mutable_data<uint16_t>()[i] = f32_to_f16(v); break;
      default: t.mutable_data<uint8_t>()[i] = 0x11; break;  // 1-byte dtypes only
    }
  }
  return t;
}

LayerSource layer(const std::string& json, std::map<std::string, Tensor> tensors, const std::string& name = "blk.3.lin") {
  LayerSource s;
  s.name = name;
  if (!json.empty()) s.config = QuantConfig::parse(json, name);
  s.tensors = std::move(tensors);
  return s;
}

// A valid awq layer N×K with group G; `zeros_key` picks the spelling.
LayerSource awq(int64_t N, int64_t K, int64_t G, const std::string& zeros_key = "weight_zeros") {
  return layer(R"({"format":"awq_w4a16","group_size":)" + std::to_string(G) + "}",
               {{"weight", filled(DType::I8, {N, K / 2})},
                {"weight_scale", filled(DType::BF16, {K / G, N})},
                {zeros_key, filled(DType::BF16, {K / G, N})},
                {"bias", filled(DType::BF16, {N})}});
}

std::string bind_error(const LayerSource& s) {
  try {
    bind_layer(s);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(FormatsBind, RegistryListsEveryKitchenFormat) {
  std::vector<std::string> names;
  for (const auto& f : all_formats()) names.push_back(f.name);
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8",
                                                     "int8_tensorwise", "int4_tensorwise", "convrot_w4a4",
                                                     "asym_w4a8_int8", "awq_w4a16", "svdquant_w4a4"));
  for (const auto& n : names) {
    ASSERT_NE(find_format(n), nullptr);
    EXPECT_THAT(supported_format_names(), HasSubstr(n));
  }
  EXPECT_EQ(find_format("svdquant_w4a8"), nullptr);
  EXPECT_TRUE(find_format("awq_w4a16")->has_fused_kernel);
  EXPECT_TRUE(find_format("svdquant_w4a4")->has_fused_kernel);
  EXPECT_FALSE(find_format("nvfp4")->has_fused_kernel);
  // canonical names agreed with the kernel engineers
  auto canon = [](const char* f) {
    std::map<std::string, std::vector<std::string>> m;
    for (const auto& p : find_format(f)->params) m[p.canonical] = p.spellings;
    return m;
  };
  const auto a = canon("awq_w4a16");
  EXPECT_THAT(a.at("weight_zeros"), ::testing::ElementsAre("weight_zeros", "weight_zero"));
  EXPECT_TRUE(a.count("weight_scale"));
  const auto s = canon("svdquant_w4a4");
  EXPECT_THAT(s.at("smooth_factor"), ::testing::ElementsAre("smooth_factor", "weight_smooth_factor"));
  EXPECT_THAT(s.at("proj_down"), ::testing::ElementsAre("proj_down", "weight_proj_down"));
  EXPECT_THAT(s.at("proj_up"), ::testing::ElementsAre("proj_up", "weight_proj_up"));
  EXPECT_TRUE(s.count("weight_scale"));
}

TEST(FormatsBind, UnknownFormatListsAllFormats) {
  const std::string err = bind_error(layer(R"({"format":"svdquant_w4a8"})", {{"weight", filled(DType::I8, {4, 4})}}));
  EXPECT_THAT(err, AllOf(HasSubstr("'svdquant_w4a8'"), HasSubstr("'blk.3.lin'")));
  for (const auto& f : all_formats()) EXPECT_THAT(err, HasSubstr(f.name));
}

TEST(FormatsBind, AwqBothSpellingsAccepted) {
  for (const char* key : {"weight_zeros", "weight_zero"}) {
    const QuantizedLayer l = bind_layer(awq(8, 128, 64, key));
    EXPECT_EQ(l.N, 8);
    EXPECT_EQ(l.K, 128);
    EXPECT_EQ(l.group_size, 64);
    EXPECT_TRUE(l.has_param("weight_zeros"));
    EXPECT_FALSE(l.has_param("weight_zero"));
    EXPECT_TRUE(l.bias.defined());
    EXPECT_EQ(l.storage_bytes(), uint64_t(8 * 64 + 2 * 2 * 8 * 2 + 8 * 2));
    EXPECT_THAT([&] { l.param("proj_up"); }, ::testing::ThrowsMessage<Error>(
                                                 AllOf(HasSubstr("blk.3.lin"), HasSubstr("'proj_up'"))));
  }
}

TEST(FormatsBind, SpellingConflictNamesBothKeys) {
  LayerSource s = awq(8, 128, 64);
  s.tensors["weight_zero"] = s.tensors["weight_zeros"];
  EXPECT_THAT(bind_error(s), AllOf(HasSubstr("'blk.3.lin.weight_zeros'"), HasSubstr("'blk.3.lin.weight_zero'")));
  // svdquant conflicts are found before the format's own checks
  const Tensor any = filled(DType::BF16, {4});
  for (const char* base : {"smooth_factor", "proj_down", "proj_up"}) {
    std::map<std::string, Tensor> t = {{"weight", filled(DType::I8, {128, 32})}, {"weight_scale", any},
                                       {"smooth_factor", any},                  {"proj_down", any},
                                       {"proj_up", any}};
    t[std::string("weight_") + base] = any;
    EXPECT_THAT(bind_error(layer(R"({"format":"svdquant_w4a4"})", t)),
                AllOf(HasSubstr(std::string("'blk.3.lin.") + base + "'"),
                      HasSubstr(std::string("'blk.3.lin.weight_") + base + "'")));
  }
}

TEST(FormatsBind, MissingParametersNameKeyAndSpellings) {
  LayerSource s = awq(8, 128, 64);
  s.tensors.erase("weight_zeros");
  EXPECT_THAT(bind_error(s), AllOf(HasSubstr("blk.3.lin"), HasSubstr("'weight_zeros'"),
                                   HasSubstr("'blk.3.lin.weight_zeros' | 'blk.3.lin.weight_zero'")));
  LayerSource w = awq(8, 128, 64);
  w.tensors.erase("weight");
  EXPECT_THAT(bind_error(w), AllOf(HasSubstr("blk.3.lin"), HasSubstr("'weight'"), HasSubstr("blk.3.lin.weight")));
  const Tensor any = filled(DType::BF16, {4});
  EXPECT_THAT(bind_error(layer(R"({"format":"svdquant_w4a4"})", {{"weight", filled(DType::I8, {128, 32})},
                                                                  {"weight_scale", any},
                                                                  {"weight_smooth_factor", any},
                                                                  {"weight_proj_down", any}})),
              AllOf(HasSubstr("'proj_up'"), HasSubstr("'blk.3.lin.proj_up' | 'blk.3.lin.weight_proj_up'")));
  EXPECT_THAT(bind_error(layer(R"({"format":"nvfp4"})", {{"weight", filled(DType::U8, {16, 8})},
                                                         {"weight_scale", filled(DType::F8_E4M3, {128, 4})}})),
              HasSubstr("'weight_scale_2'"));
  EXPECT_THAT(bind_error(layer(R"({"format":"asym_w4a8_int8"})", {{"weight", filled(DType::I8, {4, 128})},
                                                                  {"weight_s_rel", filled(DType::F8_E4M3, {4, 16})}})),
              HasSubstr("'weight_s_channel'"));
}

TEST(FormatsBind, MisShapedParametersNameExpectedAndActual) {
  LayerSource s = awq(8, 128, 64);
  s.tensors["weight_scale"] = filled(DType::BF16, {8, 2});
  EXPECT_THAT(bind_error(s), AllOf(HasSubstr("blk.3.lin"), HasSubstr("weight_scale"), HasSubstr("(2, 8)"),
                                   HasSubstr("(8, 2)")));
  LayerSource b = awq(8, 128, 64);
  b.tensors["bias"] = filled(DType::BF16, {9});
  EXPECT_THAT(bind_error(b), AllOf(HasSubstr("blk.3.lin"), HasSubstr("bias"), HasSubstr("(8,)"), HasSubstr("(9,)")));

  // nvfp4 block scales: (roundup(N,128), roundup(K/16,4))
  EXPECT_THAT(bind_error(layer(R"({"format":"nvfp4"})", {{"weight", filled(DType::U8, {16, 40})},
                                                         {"weight_scale", filled(DType::F8_E4M3, {16, 5})},
                                                         {"weight_scale_2", filled(DType::F32, {})}})),
              AllOf(HasSubstr("key 'weight_scale'"), HasSubstr("expected shape (128, 8)"), HasSubstr("got (16, 5)")));
  EXPECT_THAT(bind_error(layer(R"({"format":"mxfp8"})", {{"weight", filled(DType::F8_E4M3, {32, 64})},
                                                         {"weight_scale", filled(DType::U8, {32, 2})}})),
              AllOf(HasSubstr("key 'weight_scale'"), HasSubstr("expected shape (128, 4)"), HasSubstr("got (32, 2)")));
  EXPECT_THAT(bind_error(layer(R"({"format":"float8_e4m3fn"})", {{"weight", filled(DType::F8_E4M3, {4, 4})},
                                                                 {"weight_scale", filled(DType::F32, {2})}})),
              AllOf(HasSubstr("key 'weight_scale'"), HasSubstr("scalar"), HasSubstr("(2,)")));
  EXPECT_THAT(bind_error(layer(R"({"format":"float8_e4m3fn"})", {{"weight", filled(DType::BF16, {4, 4})},
                                                                 {"weight_scale", filled(DType::F32, {})}})),
              AllOf(HasSubstr("key 'weight'"), HasSubstr("F8_E4M3"), HasSubstr("BF16")));
  EXPECT_THAT(bind_error(layer(R"({"format":"int8_tensorwise"})", {{"weight", filled(DType::I8, {4, 4})},
                                                                   {"weight_scale", filled(DType::F32, {3, 1})}})),
              AllOf(HasSubstr("key 'weight_scale'"), HasSubstr("(4, 1)"), HasSubstr("(3, 1)")));
  EXPECT_THAT(bind_error(layer(R"({"format":"convrot_w4a4"})", {{"weight", filled(DType::I8, {4, 128})},
                                                                {"weight_scale", filled(DType::F32, {5})}})),
              AllOf(HasSubstr("key 'weight_scale'"), HasSubstr("(4,)"), HasSubstr("(5,)")));
  EXPECT_THAT(bind_error(layer(R"({"format":"asym_w4a8_int8"})", {{"weight", filled(DType::I8, {4, 128})},
                                                                  {"weight_s_rel", filled(DType::F8_E4M3, {4, 8})},
                                                                  {"weight_s_channel", filled(DType::F32, {4})}})),
              AllOf(HasSubstr("key 'weight_s_rel'"), HasSubstr("(4, 16)"), HasSubstr("(4, 8)")));
  // float layers: F32/F16/BF16, 2-D
  EXPECT_THAT(bind_error(layer("", {{"weight", filled(DType::I8, {4, 4})}})),
              AllOf(HasSubstr("blk.3.lin"), HasSubstr("no comfy_quant"), HasSubstr("I8")));
  EXPECT_THAT(bind_error(layer("", {{"weight", filled(DType::F32, {4, 4, 1})}})), HasSubstr("(4, 4, 1)"));
}

TEST(FormatsBind, KNotMultipleOfGroup) {
  EXPECT_THAT(bind_error(awq(8, 96, 64)), AllOf(HasSubstr("blk.3.lin"), HasSubstr("96"), HasSubstr("64")));
  // asym: K = 24 with group 16
  EXPECT_THAT(bind_error(layer(R"({"format":"asym_w4a8_int8","convrot_groupsize":4})",
                               {{"weight", filled(DType::I8, {4, 12})},
                                {"weight_s_rel", filled(DType::F8_E4M3, {4, 1})},
                                {"weight_s_channel", filled(DType::F32, {4})}})),
              AllOf(HasSubstr("K=24"), HasSubstr("group_size 16")));
  // convrot group larger than K, or not a power of 4
  EXPECT_THAT(bind_error(layer(R"({"format":"convrot_w4a4"})", {{"weight", filled(DType::I8, {4, 64})},
                                                                {"weight_scale", filled(DType::F32, {4})}})),
              AllOf(HasSubstr("K=128"), HasSubstr("convrot_groupsize 256")));
  EXPECT_THAT(bind_error(layer(R"({"format":"int8_tensorwise","convrot":true,"convrot_groupsize":128})",
                               {{"weight", filled(DType::I8, {4, 256})}, {"weight_scale", filled(DType::F32, {})}})),
              AllOf(HasSubstr("power of 4"), HasSubstr("128")));
  // nvfp4: K = 8 is not a multiple of the 16-element block
  EXPECT_THAT(bind_error(layer(R"({"format":"nvfp4"})", {{"weight", filled(DType::U8, {16, 4})},
                                                         {"weight_scale", filled(DType::F8_E4M3, {128, 4})},
                                                         {"weight_scale_2", filled(DType::F32, {})}})),
              AllOf(HasSubstr("K=8"), HasSubstr("16")));
}

TEST(FormatsBind, AsymRoundsHalfToEvenAndClamps) {
  // codes c − 8 (no codebook) × s_rel 2.5 = ties at ±x.5; then clamp to ±127 with s_rel 20.
  const int64_t N = 2, K = 16;
  Tensor w = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K / 2; ++c)
      w.mutable_data<uint8_t>()[n * K / 2 + c] = pack_nibbles(int(2 * c), int(2 * c + 1));  // codes 0..15
  Tensor rel = Tensor::empty(DType::F8_E4M3, {N, 1});
  rel.mutable_data<uint8_t>()[0] = f32_to_fp8_e4m3(2.5f);
  rel.mutable_data<uint8_t>()[1] = f32_to_fp8_e4m3(20.0f);
  const QuantizedLayer l = bind_layer(layer(R"({"format":"asym_w4a8_int8","convrot_groupsize":1})",
                                            {{"weight", w}, {"weight_s_rel", rel},
                                             {"weight_s_channel", filled(DType::F32, {N}, 1.0f)}}));
  EXPECT_EQ(l.group_size, 16);
  const Tensor W = dequantize(l);  // convrot group 1 = identity rotation
  for (int c = 0; c < 16; ++c) {
    const double v = (c - 8) * 2.5;
    const double even = 2 * std::nearbyint(v / 2) == v ? v : std::nearbyint(v);  // exact: ties to even
    EXPECT_EQ(W.data<float>()[c], float(even)) << "code " << c;
    EXPECT_EQ(W.data<float>()[K + c], float(std::max(-127, std::min(127, (c - 8) * 20)))) << "code " << c;
  }
  EXPECT_EQ(W.data<float>()[1], -18.0f);  // −7 × 2.5 = −17.5 → −18 (even)
  EXPECT_EQ(W.data<float>()[3], -12.0f);  // −5 × 2.5 = −12.5 → −12 (even)
}

TEST(FormatsBind, FloatLayer) {
  const QuantizedLayer l = bind_layer(layer("", {{"weight", filled(DType::BF16, {3, 5}, 0.5f)},
                                                 {"bias", filled(DType::F32, {3})}}));
  EXPECT_EQ(l.format, nullptr);
  EXPECT_EQ(l.N, 3);
  EXPECT_EQ(l.K, 5);
  const Tensor W = dequantize(l);
  EXPECT_EQ(W.dtype(), DType::F32);
  for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(W.data<float>()[i], 0.5f);
}

TEST(FormatsBind, DequantizeRevalidatesAModifiedLayer) {
  Tensor w = Tensor::zeros(DType::I8, {4, 64});
  QuantizedLayer l = bind_layer(layer(R"({"format":"convrot_w4a4","convrot_groupsize":16})",
                                      {{"weight", w}, {"weight_scale", filled(DType::F32, {4}, 1.0f)}}));
  EXPECT_EQ(dequantize(l).numel(), 4 * 128);
  l.K = 4096;  // would read past the weight
  EXPECT_THAT([&] { dequantize(l); }, ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("blk.3.lin"), HasSubstr("K=4096"))));
  l.K = 128;
  l.params["weight_scale"] = filled(DType::F32, {3}, 1.0f);
  EXPECT_THAT([&] { dequantize(l); }, ::testing::ThrowsMessage<Error>(HasSubstr("weight_scale")));
}
