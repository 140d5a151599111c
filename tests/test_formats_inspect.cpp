// `nibble inspect` data and renderings (src/formats/inspect.h) on the sample checkpoint and on
// broken files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "nibble/inspect.h"
#include "nibble/sample.h"
#include "test_io_common.h"

using namespace nibble;
using nibble::testing_io::ScratchDir;
using ::testing::HasSubstr;

TEST(FormatsInspect, SampleReport) {
  ScratchDir dir;
  const std::string path = dir.file("sample.safetensors");
  write_sample_checkpoint(path, {});
  const Checkpoint ck = Checkpoint::open(path);
  const InspectReport r = inspect_checkpoint(ck, "");

  EXPECT_EQ(r.tensor_count, ck.names().size());
  EXPECT_EQ(r.tensor_bytes, ck.total_bytes());
  uint64_t sum = 0;
  int layers = 0;
  for (const auto& [f, nb] : r.by_format) {
    sum += nb.second;
    layers += nb.first;
  }
  EXPECT_EQ(sum, r.quantized_bytes);
  EXPECT_EQ(size_t(layers), r.quantized.size());
  for (const auto& row : r.quantized) EXPECT_DOUBLE_EQ(row.bits_per_weight, row.bytes * 8.0 / double(row.N * row.K));

  // the awq layer: qweight + scales + zeros + bias, all of (6D × D), G = 64, D = 256
  const uint64_t awq_bytes = 1536 * 128 + 2 * (4 * 1536 * 2) + 1536 * 2;
  ASSERT_TRUE(r.by_format.count("awq_w4a16"));
  EXPECT_EQ(r.by_format.at("awq_w4a16").second, awq_bytes);

  // float candidates: txt_mod.1 (same shape as img_mod.1, so the same estimate) and add_q_proj
  std::map<std::string, const InspectRow*> fl;
  for (const auto& row : r.float_layers) fl[row.name] = &row;
  ASSERT_TRUE(fl.count("transformer_blocks.0.txt_mod.1"));
  EXPECT_EQ(fl["transformer_blocks.0.txt_mod.1"]->candidate, "awq_w4a16");
  EXPECT_EQ(fl["transformer_blocks.0.txt_mod.1"]->candidate_bytes, awq_bytes);
  EXPECT_EQ(fl["transformer_blocks.0.txt_mod.1"]->bytes, uint64_t(1536 * 256 * 2 + 1536 * 2));
  EXPECT_EQ(fl["transformer_blocks.0.txt_mod.1"]->format, "BF16");
  ASSERT_TRUE(fl.count("transformer_blocks.0.attn.add_q_proj"));
  EXPECT_EQ(fl["transformer_blocks.0.attn.add_q_proj"]->candidate, "svdquant_w4a4");
  const uint64_t D = 256, R = kInspectCandidateRank;
  EXPECT_EQ(fl["transformer_blocks.0.attn.add_q_proj"]->candidate_bytes,
            D * D / 2 + (D / 64) * D * 2 + D * 2 + D * R * 2 + D * R * 2 + D * 2);
  ASSERT_TRUE(fl.count("img_in"));
  EXPECT_EQ(fl["img_in"]->candidate, "");  // kept float by the int4 bundles
  uint64_t saving = 0;
  for (const auto& row : r.float_layers)
    if (!row.candidate.empty()) saving += row.bytes - row.candidate_bytes;
  EXPECT_EQ(saving, r.candidate_saving);

  const std::string text = inspect_text(r);
  for (const auto& row : r.quantized) EXPECT_THAT(text, HasSubstr(row.name));
  EXPECT_THAT(text, ::testing::ContainsRegex(R"(transformer_blocks\.0\.img_mod\.1 +awq_w4a16 +1536x256 +64 )"));
  EXPECT_THAT(text, HasSubstr("1536x256"));
  EXPECT_THAT(text, HasSubstr("extra.nvfp4"));
  EXPECT_THAT(text, HasSubstr("144x272"));
  EXPECT_THAT(text, HasSubstr("summary:"));
  EXPECT_THAT(text, HasSubstr("quantized total"));
  EXPECT_THAT(text, HasSubstr("float layers a kitchen format could hold: 2"));
  EXPECT_THAT(text, ::testing::ContainsRegex(R"(transformer_blocks\.0\.txt_mod\.1 +BF16 1536x256 -> awq_w4a16)"));
  EXPECT_THAT(text, HasSubstr("tile"));
  EXPECT_THAT(text, ::testing::ContainsRegex(R"(img_mlp\.net\.2 +svdquant_w4a4 +256x1024 +64 +16 +yes natural)"));
  EXPECT_THAT(text, ::testing::ContainsRegex(R"(img_mlp\.net\.0\.proj +svdquant_w4a4 +1024x256 +64 +16 +no tile)"));

  const nlohmann::json j = nlohmann::json::parse(inspect_json(r));
  ASSERT_EQ(j["layers"].size(), r.quantized.size());
  EXPECT_EQ(j["float_layers"].size(), r.float_layers.size());
  EXPECT_EQ(j["summary"]["quantized_bytes"].get<uint64_t>(), r.quantized_bytes);
  EXPECT_EQ(j["summary"]["bytes_by_format"]["awq_w4a16"]["bytes"].get<uint64_t>(), awq_bytes);
  EXPECT_EQ(j["summary"]["candidate_saving_bytes"].get<uint64_t>(), r.candidate_saving);
  bool found = false;
  for (const auto& l : j["layers"])
    if (l["name"] == "extra.mxfp8") {
      found = true;
      EXPECT_EQ(l["format"], "mxfp8");
      EXPECT_EQ(l["N"], 160);
      EXPECT_EQ(l["K"], 288);
      EXPECT_EQ(l["group_size"], 32);
    }
  EXPECT_TRUE(found);
}

TEST(FormatsInspect, FilterSelectsLayers) {
  ScratchDir dir;
  const std::string path = dir.file("sample.safetensors");
  write_sample_checkpoint(path, {});
  const Checkpoint ck = Checkpoint::open(path);
  const InspectReport r = inspect_checkpoint(ck, R"(^extra\.(nvfp4|mxfp8)$)");
  ASSERT_EQ(r.quantized.size(), 2u);
  EXPECT_TRUE(r.float_layers.empty());
  EXPECT_THAT([&] { inspect_checkpoint(ck, "(["); }, ::testing::ThrowsMessage<Error>(HasSubstr("--filter")));
}

TEST(FormatsInspect, InvalidLayerIsAnErrorNamingIt) {
  ScratchDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::string cfg = R"({"format":"awq_w4a16"})";
  save_safetensors(path, {{"m.lin.weight", Tensor::zeros(DType::I8, {8, 64})},
                          {"m.lin.weight_scale", Tensor::zeros(DType::BF16, {2, 8})},
                          {"m.lin.comfy_quant", Tensor::from_bytes(DType::U8, {int64_t(cfg.size())}, cfg.data(), cfg.size())}});
  const Checkpoint ck = Checkpoint::open(path);
  EXPECT_THAT([&] { inspect_checkpoint(ck); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("m.lin"), HasSubstr("weight_zeros"))));
  const std::string unknown = dir.file("unknown.safetensors");
  const std::string cfg2 = R"({"format":"int3_magic"})";
  save_safetensors(unknown, {{"m.lin.weight", Tensor::zeros(DType::I8, {8, 64})},
                             {"m.lin.comfy_quant",
                              Tensor::from_bytes(DType::U8, {int64_t(cfg2.size())}, cfg2.data(), cfg2.size())}});
  EXPECT_THAT([&] { inspect_checkpoint(Checkpoint::open(unknown)); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("int3_magic"), HasSubstr("awq_w4a16"))));
  EXPECT_THROW(Checkpoint::open(dir.file("missing.safetensors")), Error);
}

TEST(FormatsInspect, HumanBytes) {
  EXPECT_EQ(human_bytes(312), "312 B");
  EXPECT_EQ(human_bytes(1536), "1.5 KiB");
  EXPECT_EQ(human_bytes(3 * 1024 * 1024 / 2), "1.50 MiB");
  EXPECT_EQ(human_bytes(uint64_t(5) << 30), "5.00 GiB");
}
