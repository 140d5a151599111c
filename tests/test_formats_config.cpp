// QuantConfig::parse / to_json (spec §4.1): every field, nested "params", type errors naming the
// field, bad JSON, missing format, canonical output order.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nibble/formats.h"

using namespace nibble;
using ::testing::HasSubstr;

namespace {
std::string parse_error(const std::string& text, const std::string& layer = "blk.0.attn.to_q") {
  try {
    QuantConfig::parse(text, layer);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(FormatsConfig, ParsesEveryField) {
  const std::string text = R"({"format":"svdquant_w4a4","group_size":64,"act_unsigned":true,
    "layout":"kitchen_tile_packed_w4a4","lowrank_branch_input_basis":"raw","proj_down_smooth_folded":true,
    "full_precision_matrix_mult":true,"convrot":true,"convrot_groupsize":64,"per_row":false,
    "linear_dtype":"int4","num_experts":8,"extra_key":{"x":1}})";
  const QuantConfig c = QuantConfig::parse(text, "L");
  EXPECT_EQ(c.format, "svdquant_w4a4");
  EXPECT_EQ(c.group_size, 64);
  EXPECT_EQ(c.act_unsigned, true);
  EXPECT_EQ(c.layout, "kitchen_tile_packed_w4a4");
  EXPECT_EQ(c.lowrank_branch_input_basis, "raw");
  EXPECT_EQ(c.proj_down_smooth_folded, true);
  EXPECT_TRUE(c.full_precision_matrix_mult);
  EXPECT_TRUE(c.convrot);
  EXPECT_EQ(c.convrot_groupsize, 64);
  EXPECT_EQ(c.per_row, false);
  EXPECT_EQ(c.linear_dtype, "int4");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.json, text);  // the original text, unknown fields included
}

TEST(FormatsConfig, DefaultsAndAbsentOptionals) {
  const QuantConfig c = QuantConfig::parse(R"({"format":"awq_w4a16"})", "L");
  EXPECT_EQ(c.format, "awq_w4a16");
  EXPECT_FALSE(c.group_size.has_value());
  EXPECT_FALSE(c.act_unsigned.has_value());  // absent is not false (act_unsigned heuristic)
  EXPECT_FALSE(c.proj_down_smooth_folded.has_value());
  EXPECT_FALSE(c.per_row.has_value());
  EXPECT_FALSE(c.num_experts.has_value());
  EXPECT_FALSE(c.full_precision_matrix_mult);
  EXPECT_FALSE(c.convrot);
  EXPECT_EQ(c.convrot_groupsize, 256);
  EXPECT_TRUE(c.layout.empty());
  // null counts as absent
  const QuantConfig n = QuantConfig::parse(R"({"format":"awq_w4a16","act_unsigned":null,"group_size":null})", "L");
  EXPECT_FALSE(n.act_unsigned.has_value());
  EXPECT_FALSE(n.group_size.has_value());
}

TEST(FormatsConfig, NestedParamsFallback) {
  const QuantConfig c = QuantConfig::parse(
      R"({"format":"int8_tensorwise","params":{"convrot":true,"convrot_groupsize":16,"group_size":32,"per_row":true}})",
      "L");
  EXPECT_TRUE(c.convrot);
  EXPECT_EQ(c.convrot_groupsize, 16);
  EXPECT_EQ(c.group_size, 32);
  EXPECT_EQ(c.per_row, true);
  // top level wins over params
  const QuantConfig t =
      QuantConfig::parse(R"({"format":"int8_tensorwise","convrot_groupsize":64,"params":{"convrot_groupsize":16}})", "L");
  EXPECT_EQ(t.convrot_groupsize, 64);
  EXPECT_THAT(parse_error(R"({"format":"int8_tensorwise","params":{"convrot":"yes"}})"),
              HasSubstr("'params.convrot': expected a boolean"));
  EXPECT_THAT(parse_error(R"({"format":"int8_tensorwise","params":[1]})"), HasSubstr("'params': expected an object"));
}

TEST(FormatsConfig, LenientNumbersAndBooleans) {
  // Python writers: 64.0 for an integer, 0/1 for a boolean.
  const QuantConfig c = QuantConfig::parse(R"({"format":"awq_w4a16","group_size":64.0,"act_unsigned":1})", "L");
  EXPECT_EQ(c.group_size, 64);
  EXPECT_EQ(c.act_unsigned, true);
  EXPECT_THAT(parse_error(R"({"format":"awq_w4a16","group_size":64.5})"),
              HasSubstr("field 'group_size': expected an integer"));
  EXPECT_THAT(parse_error(R"({"format":"svdquant_w4a4","act_unsigned":2})"),
              HasSubstr("field 'act_unsigned': expected a boolean"));
}

TEST(FormatsConfig, TypeErrorsNameLayerAndField) {
  struct Case {
    const char* json;
    const char* field;
    const char* expected;
  } cases[] = {
      {R"({"format":42})", "'format'", "a string"},
      {R"({"format":"awq_w4a16","group_size":"64"})", "'group_size'", "an integer"},
      {R"({"format":"svdquant_w4a4","act_unsigned":"true"})", "'act_unsigned'", "a boolean"},
      {R"({"format":"svdquant_w4a4","layout":7})", "'layout'", "a string"},
      {R"({"format":"svdquant_w4a4","lowrank_branch_input_basis":false})", "'lowrank_branch_input_basis'", "a string"},
      {R"({"format":"svdquant_w4a4","proj_down_smooth_folded":"1"})", "'proj_down_smooth_folded'", "a boolean"},
      {R"({"format":"float8_e4m3fn","full_precision_matrix_mult":[]})", "'full_precision_matrix_mult'", "a boolean"},
      {R"({"format":"int8_tensorwise","convrot":{}})", "'convrot'", "a boolean"},
      {R"({"format":"int8_tensorwise","convrot_groupsize":true})", "'convrot_groupsize'", "an integer"},
      {R"({"format":"int8_tensorwise","per_row":"no"})", "'per_row'", "a boolean"},
      {R"({"format":"convrot_w4a4","linear_dtype":4})", "'linear_dtype'", "a string"},
      {R"({"format":"awq_w4a16","num_experts":1.5})", "'num_experts'", "an integer"},
  };
  for (const auto& c : cases) {
    const std::string err = parse_error(c.json);
    EXPECT_THAT(err, HasSubstr("blk.0.attn.to_q")) << c.json;
    EXPECT_THAT(err, HasSubstr(std::string("field ") + c.field + ": expected " + c.expected)) << c.json;
  }
}

TEST(FormatsConfig, BadJsonAndMissingFormat) {
  EXPECT_THAT(parse_error(R"({"format":"awq_w4a16",)"), HasSubstr("blk.0.attn.to_q"));
  EXPECT_THAT(parse_error(""), HasSubstr("comfy_quant"));
  EXPECT_THAT(parse_error(R"(["awq_w4a16"])"), HasSubstr("expected a JSON object, got array"));
  EXPECT_THAT(parse_error(R"("awq_w4a16")"), HasSubstr("expected a JSON object, got string"));
  const std::string missing = parse_error(R"({"group_size":64})");
  EXPECT_THAT(missing, HasSubstr("blk.0.attn.to_q"));
  EXPECT_THAT(missing, HasSubstr("'format' is missing"));
  EXPECT_THAT(missing, HasSubstr("svdquant_w4a4"));  // lists the supported formats
  EXPECT_THAT(parse_error(R"({"format":"awq_w4a16","format":"nvfp4"})"), HasSubstr("blk.0.attn.to_q"));  // duplicate
  EXPECT_THAT(parse_error(std::string("{\"format\":\"a\xff\"}")), HasSubstr("UTF-8"));
  EXPECT_THAT(parse_error(R"({"format":"awq_w4a16","group_size":0})"), HasSubstr("positive"));
  EXPECT_THAT(parse_error(R"({"format":"awq_w4a16","group_size":-64})"), HasSubstr("positive"));
  EXPECT_THAT(parse_error(R"({"format":"int8_tensorwise","convrot_groupsize":0})"), HasSubstr("positive"));
}

TEST(FormatsConfig, ToJsonCanonicalOrder) {
  QuantConfig c;
  c.format = "svdquant_w4a4";
  EXPECT_EQ(c.to_json(), R"({"format":"svdquant_w4a4"})");
  c.act_unsigned = true;
  c.layout = "kitchen_tile_packed_w4a4";
  c.lowrank_branch_input_basis = "raw";
  c.proj_down_smooth_folded = true;
  c.group_size = 64;
  EXPECT_EQ(c.to_json(),
            R"({"format":"svdquant_w4a4","group_size":64,"act_unsigned":true,"layout":"kitchen_tile_packed_w4a4",)"
            R"("lowrank_branch_input_basis":"raw","proj_down_smooth_folded":true})");
  QuantConfig i;
  i.format = "int8_tensorwise";
  i.convrot = true;
  i.per_row = true;
  i.full_precision_matrix_mult = true;
  EXPECT_EQ(i.to_json(),
            R"({"format":"int8_tensorwise","full_precision_matrix_mult":true,"convrot":true,"convrot_groupsize":256,"per_row":true})");
  QuantConfig a;
  a.format = "awq_w4a16";
  a.group_size = 64;
  EXPECT_EQ(a.to_json(), R"({"format":"awq_w4a16","group_size":64})");  // the spec's example, byte for byte
}

TEST(FormatsConfig, RoundTrip) {
  const char* texts[] = {
      R"({"format":"awq_w4a16","group_size":128})",
      R"({"format":"svdquant_w4a4","act_unsigned":false,"layout":"x","proj_down_smooth_folded":false})",
      R"({"format":"convrot_w4a4","convrot_groupsize":64,"linear_dtype":"int8","num_experts":4})",
  };
  for (const char* t : texts) {
    const QuantConfig c = QuantConfig::parse(t, "L");
    const QuantConfig d = QuantConfig::parse(c.to_json(), "L");
    EXPECT_EQ(c.to_json(), d.to_json());
    EXPECT_EQ(d.to_json(), t);
  }
}
