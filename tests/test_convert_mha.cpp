// test_convert_mha.cpp — torch.nn.MultiheadAttention's fused q/k/v (`P.in_proj_weight` (3E, E) with
// `P.in_proj_bias`) is found structurally and skipped with its reason (no ComfyUI loader reads it
// quantized); its `out_proj` is an ordinary linear; a rule naming `in_proj` says why it matches nothing.
#include <gtest/gtest.h>

#include <functional>
#include <map>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

#include "tmp_dir.h"

using namespace nibble;

namespace {
std::string write_mha(const testing_tmp::TmpDir& d, int64_t E = 128) {
  std::vector<std::pair<std::string, Tensor>> t;
  t.emplace_back("blocks.0.attn.in_proj_weight", synth_weight(3 * E, E, 1).to(DType::BF16));
  t.emplace_back("blocks.0.attn.in_proj_bias", synth_bias(3 * E, 2).to(DType::BF16));
  t.emplace_back("blocks.0.attn.out_proj.weight", synth_weight(E, E, 3).to(DType::BF16));
  t.emplace_back("blocks.0.attn.out_proj.bias", synth_bias(E, 4).to(DType::BF16));
  t.emplace_back("blocks.0.mlp.0.weight", synth_weight(4 * E, E, 5).to(DType::BF16));
  const std::string path = d / "mha.safetensors";
  save_safetensors(path, t);
  return path;
}
}  // namespace

TEST(ConvertMha, InProjSkippedWithReason) {
  testing_tmp::TmpDir d("mha");
  const std::string in = write_mha(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(".*=awq_w4a16")};
  const ConvertPlan p = plan_conversion(in, o);
  std::map<std::string, std::string> why;
  for (const auto& s : p.skipped) why[s.name] = s.reason;
  ASSERT_TRUE(why.count("blocks.0.attn.in_proj_weight"));
  EXPECT_NE(why["blocks.0.attn.in_proj_weight"].find("MultiheadAttention"), std::string::npos);
  std::vector<std::string> q;
  for (const auto& l : p.layers) q.push_back(l.name);
  EXPECT_EQ(q, (std::vector<std::string>{"blocks.0.attn.out_proj", "blocks.0.mlp.0"}));
  // A rule aimed at the fused projection is an error that says what it matched and why.
  o.rules = {parse_convert_rule(R"(attn\.in_proj=svdquant_w4a4)")};
  std::string e;
  try {
    plan_conversion(in, o);
  } catch (const Error& err) {
    e = err.what();
  }
  EXPECT_NE(e.find("matches no linear layer"), std::string::npos) << e;
  EXPECT_NE(e.find("MultiheadAttention"), std::string::npos) << e;
}
