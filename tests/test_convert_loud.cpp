// test_convert_loud.cpp — every mistake the converter used to let through silently is now an error
// or a warning naming it (issue 12): rules / presets / excludes matching nothing, calibration
// statistics matching no layer, layers left uncalibrated, act_unsigned on signed inputs; lookup
// tables, norms, convolutions and the pooler are never quantized by a catch-all rule; layers that
// share their input are grouped beyond the Qwen names; the summary says what each count counts;
// the calibration sample is uniform and as large as asked.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("loud") {}
};

Tensor randn(Shape s, uint64_t seed) {
  const int64_t n = shape_numel(s);
  Tensor t = synth_activations(1, n, seed, SynthActOptions{1.0f, 0});
  return Tensor::from_bytes(DType::F32, s, t.data<float>(), size_t(n) * 4).to(DType::BF16);
}

// A small BERT-style encoder (names as Hugging Face writes them), hidden H, intermediate 4H.
std::string write_bert(const TmpDir& d, int64_t H = 128, int layers = 1) {
  std::vector<std::pair<std::string, Tensor>> t;
  uint64_t seed = 1;
  t.emplace_back("embeddings.word_embeddings.weight", randn({512, H}, seed++));
  t.emplace_back("embeddings.position_embeddings.weight", randn({64, H}, seed++));
  t.emplace_back("embeddings.token_type_embeddings.weight", randn({2, H}, seed++));
  t.emplace_back("embeddings.LayerNorm.weight", randn({H}, seed++));
  t.emplace_back("embeddings.LayerNorm.bias", randn({H}, seed++));
  for (int l = 0; l < layers; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    auto lin = [&](const std::string& n, int64_t N, int64_t K) {
      t.emplace_back(p + n + ".weight", synth_weight(N, K, seed++).to(DType::BF16));
      t.emplace_back(p + n + ".bias", synth_bias(N, seed++).to(DType::BF16));
    };
    lin("attention.self.query", H, H);
    lin("attention.self.key", H, H);
    lin("attention.self.value", H, H);
    lin("attention.output.dense", H, H);
    t.emplace_back(p + "attention.output.LayerNorm.weight", randn({H}, seed++));
    lin("intermediate.dense", 4 * H, H);
    lin("output.dense", H, 4 * H);
    t.emplace_back(p + "output.LayerNorm.weight", randn({H}, seed++));
  }
  t.emplace_back("pooler.dense.weight", synth_weight(H, H, seed++).to(DType::BF16));
  t.emplace_back("pooler.dense.bias", synth_bias(H, seed++).to(DType::BF16));
  const std::string path = d / "bert.safetensors";
  save_safetensors(path, t);
  return path;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }
bool any_contains(const std::vector<std::string>& v, const std::string& sub) {
  for (const auto& s : v) if (contains(s, sub)) return true;
  return false;
}

}  // namespace

TEST(ConvertLoud, RuleMatchingNothingIsAnError) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(attn\.to_q$=svdquant_w4a4)")};
  const std::string e = error_of([&] { convert_checkpoint(in, d / "out.safetensors", o); });
  EXPECT_TRUE(contains(e, "--tensor-type 'attn\\.to_q$=svdquant_w4a4' matches no linear layer")) << e;
  EXPECT_TRUE(contains(e, "named like")) << e;
  EXPECT_FALSE(fs::exists(d / "out.safetensors"));
  // A rule that only matches a lookup table says so.
  o.rules = {parse_convert_rule(R"(word_embeddings=awq_w4a16)")};
  const std::string e2 = error_of([&] { plan_conversion(in, o); });
  EXPECT_TRUE(contains(e2, "embedding table")) << e2;
  // A rule shadowed by an earlier one.
  o.rules = {parse_convert_rule(R"(dense$=keep)"), parse_convert_rule(R"(output\.dense$=svdquant_w4a4)")};
  const std::string e3 = error_of([&] { plan_conversion(in, o); });
  EXPECT_TRUE(contains(e3, "taken by an earlier rule")) << e3;
}

TEST(ConvertLoud, PresetOnAnotherModelIsAnError) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.preset = "qwen-image";
  const std::string e = error_of([&] { convert_checkpoint(in, d / "out.safetensors", o); });
  EXPECT_TRUE(contains(e, "preset 'qwen-image' matches no linear layer")) << e;
  EXPECT_FALSE(fs::exists(d / "out.safetensors"));
}

TEST(ConvertLoud, ExcludeMatchingNothingIsAnError) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(.*=svdquant_w4a4)")};
  o.exclude = {"to_out"};
  const std::string e = error_of([&] { plan_conversion(in, o); });
  EXPECT_TRUE(contains(e, "--exclude 'to_out' matches no linear layer")) << e;
}

TEST(ConvertLoud, CatchAllSkipsTablesNormsAndPooler) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(.*=svdquant_w4a4:rank=8)")};
  const ConvertPlan p = plan_conversion(in, o);
  std::set<std::string> q;
  for (const auto& l : p.layers) q.insert(l.name);
  EXPECT_EQ(q.size(), 6u);
  for (const auto& n : q) {
    EXPECT_FALSE(contains(n, "embeddings")) << n;
    EXPECT_FALSE(contains(n, "pooler")) << n;
  }
  EXPECT_EQ(p.linear_layers, 7u);  // the 6 encoder linears + pooler.dense
  EXPECT_EQ(p.kept_layers, 1u);
  std::map<std::string, std::string> why;
  for (const auto& s : p.skipped) why[s.name] = s.reason;
  EXPECT_TRUE(contains(why["embeddings.word_embeddings.weight"], "embedding table"));
  EXPECT_TRUE(contains(why["embeddings.position_embeddings.weight"], "embedding table"));
  EXPECT_TRUE(contains(why["embeddings.token_type_embeddings.weight"], "embedding table"));
  EXPECT_TRUE(contains(why["embeddings.LayerNorm.weight"], "1-D"));
  // Named explicitly, the pooler is converted.
  o.rules.insert(o.rules.begin(), parse_convert_rule(R"(pooler\.dense$=awq_w4a16)"));
  const ConvertPlan p2 = plan_conversion(in, o);
  EXPECT_EQ(p2.layers.size(), 7u);
}

TEST(ConvertLoud, SharedInputGroupsBeyondQwenNames) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(encoder.*=svdquant_w4a4:rank=8)")};
  const ConvertPlan p = plan_conversion(in, o);
  for (const auto& l : p.layers) {
    if (contains(l.name, "attention.self.")) {
      ASSERT_EQ(l.group.size(), 3u) << l.name;
      EXPECT_TRUE(contains(l.group[0], "query"));
      EXPECT_TRUE(contains(l.group[1], "key"));
      EXPECT_TRUE(contains(l.group[2], "value"));
    } else {
      EXPECT_TRUE(l.group.empty()) << l.name;
    }
  }
  // --share: attention.output.dense and intermediate.dense do not share an input, but the user says so.
  o.share = {R"((attention\.output|intermediate)\.dense$)"};
  const ConvertPlan p2 = plan_conversion(in, o);
  for (const auto& l : p2.layers)
    if (contains(l.name, "intermediate.dense")) {
      EXPECT_EQ(l.group.size(), 2u);
    }
}

TEST(ConvertLoud, StatisticsStoredOnceCalibrateTheWholeGroup) {
  TmpDir d;
  const std::string in = write_bert(d);
  CalibAccumulator acc(32);
  acc.add("encoder.layer.0.attention.self.query", synth_activations(64, 128, 3));
  acc.save(d / "calib.safetensors");
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(attention\.self=svdquant_w4a4:rank=8)")};
  o.calib_path = d / "calib.safetensors";
  const ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  ASSERT_EQ(r.layers.size(), 3u);
  for (const auto& l : r.layers) EXPECT_TRUE(l.info.calibrated) << l.name;
  EXPECT_TRUE(r.plan.warnings.empty());
}

TEST(ConvertLoud, StatisticsMatchingNoLayerAreAnError) {
  TmpDir d;
  const std::string in = write_bert(d);
  CalibAccumulator acc;
  acc.add("bert.encoder.layer.0.attention.self.qeury", synth_activations(8, 128, 1));
  acc.add("transformer_blocks.0.attn.to_q", synth_activations(8, 128, 2));
  acc.save(d / "calib.safetensors");
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(encoder.*=svdquant_w4a4:rank=8)")};
  o.calib_path = d / "calib.safetensors";
  const std::string e = error_of([&] { convert_checkpoint(in, d / "out.safetensors", o); });
  EXPECT_TRUE(contains(e, "2 of 2 calibration entries match no linear layer")) << e;
  EXPECT_TRUE(contains(e, "nearest layers: encoder.layer.0.attention.self.query")) << e;
  EXPECT_FALSE(fs::exists(d / "out.safetensors"));
  // Some matching, some not: a warning (an error with strict).
  CalibAccumulator acc2;
  acc2.add("encoder.layer.0.attention.self.query", synth_activations(8, 128, 1));
  acc2.add("encoder.layer.0.attention.self.qeury", synth_activations(8, 128, 1));
  acc2.save(d / "calib2.safetensors");
  o.calib_path = d / "calib2.safetensors";
  const ConvertPlan p = plan_conversion(in, o);
  EXPECT_TRUE(any_contains(p.warnings, "1 of 2 calibration entries match no linear layer")) << p.warnings.size();
  o.strict = true;
  EXPECT_TRUE(contains(error_of([&] { plan_conversion(in, o); }), "match no linear layer"));
}

TEST(ConvertLoud, UncalibratedLayersAreListed) {
  TmpDir d;
  const std::string in = write_bert(d);
  CalibAccumulator acc;
  acc.add("encoder.layer.0.attention.self.query", synth_activations(8, 128, 1));
  acc.save(d / "calib.safetensors");
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(encoder.*=svdquant_w4a4:rank=8)")};
  o.calib_path = d / "calib.safetensors";
  const ConvertPlan p = plan_conversion(in, o);
  ASSERT_TRUE(any_contains(p.warnings, "3 of 6 quantized layers have no calibration statistics"));
  EXPECT_TRUE(any_contains(p.warnings, "encoder.layer.0.intermediate.dense"));
  o.strict = true;
  const std::string e = error_of([&] { plan_conversion(in, o); });
  EXPECT_TRUE(contains(e, "have no calibration statistics")) << e;
  EXPECT_TRUE(contains(e, "--strict")) << e;
}

TEST(ConvertLoud, ActUnsignedOnSignedInputsIsAnError) {
  TmpDir d;
  const std::string in = write_bert(d);
  // The regex meant for the MLP's output.dense also matches attention.output.dense, whose inputs
  // are signed.
  CalibAccumulator acc;
  acc.add("encoder.layer.0.attention.output.dense", synth_activations(64, 128, 1));
  SynthActOptions gelu;
  gelu.post_gelu = true;
  acc.add("encoder.layer.0.output.dense", synth_activations(64, 512, 2, gelu));
  acc.save(d / "calib.safetensors");
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(output\.dense$=svdquant_w4a4:rank=8,act_unsigned=1)")};
  o.calib_path = d / "calib.safetensors";
  const std::string e = error_of([&] { plan_conversion(in, o); });
  EXPECT_TRUE(contains(e, "encoder.layer.0.attention.output.dense: act_unsigned")) << e;
  EXPECT_TRUE(contains(e, "−0.171875")) << e;
  EXPECT_TRUE(contains(e, "% of the sampled inputs are below")) << e;
  EXPECT_FALSE(contains(e, "layer.0.output.dense:")) << e;  // the post-GELU layer passes
  o.force = true;
  const ConvertPlan p = plan_conversion(in, o);
  EXPECT_TRUE(any_contains(p.warnings, "(--force)"));
  EXPECT_TRUE(any_contains(p.notes, "encoder.layer.0.output.dense: act_unsigned from --tensor-type"));
  // Without calibration: taken from the rule and reported as unchecked.
  ConvertOptions nc;
  nc.rules = o.rules;
  const ConvertPlan p2 = plan_conversion(in, nc);
  EXPECT_TRUE(any_contains(p2.notes, "not checked (no calibration statistics)"));
}

TEST(ConvertLoud, SummarySaysWhatItCounts) {
  TmpDir d;
  const std::string in = write_bert(d);
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(encoder.*=svdquant_w4a4:rank=8)")};
  const ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  const std::string s = convert_summary_text(r);
  EXPECT_TRUE(contains(s, "linear layers: 7 found, 6 quantized (6 svdquant_w4a4; 3 of them in 1 groups sharing their input), 1 left as they are")) << s;
  EXPECT_TRUE(contains(s, "copied unchanged")) << s;
  EXPECT_TRUE(contains(s, "are not linear layers (skipped)")) << s;
  auto j = nlohmann::json::parse(convert_report_json(r));
  EXPECT_EQ(j["linear_layers_found"], 7);
  EXPECT_EQ(j["layers_quantized"], 6);
  EXPECT_TRUE(j["layers"][0].contains("rule"));
  EXPECT_TRUE(j["layers"][0].contains("rank"));
}

TEST(ConvertLoud, CalibrationReportGivesAlphaAndSnr) {
  TmpDir d;
  const std::string in = write_bert(d);
  CalibAccumulator acc(128);
  acc.add("encoder.layer.0.attention.self.query", synth_activations(256, 128, 1));
  acc.add("encoder.layer.0.intermediate.dense", synth_activations(256, 128, 2));
  acc.save(d / "calib.safetensors");
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(attention\.self|intermediate=svdquant_w4a4:rank=8)")};
  o.calib_path = d / "calib.safetensors";
  const ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  ASSERT_EQ(r.layers.size(), 4u);
  for (const auto& l : r.layers) {
    EXPECT_TRUE(l.info.calibrated);
    EXPECT_EQ(l.info.sample_rows, 128);
    EXPECT_TRUE(std::isfinite(l.info.snr_before_db)) << l.name;
    EXPECT_TRUE(std::isfinite(l.info.snr_after_db)) << l.name;
    // s = 1 and rank 0 are candidates of the search: the output on the sample is not worse.
    EXPECT_GT(l.info.snr_after_db, l.info.snr_before_db) << l.name;
  }
  auto j = nlohmann::json::parse(convert_report_json(r));
  for (const auto& l : j["layers"]) {
    EXPECT_TRUE(l.contains("alpha"));
    EXPECT_TRUE(l.contains("alpha_on_grid_edge"));
    EXPECT_TRUE(l["snr_db_after"].is_number());
  }
  EXPECT_TRUE(contains(convert_summary_text(r), "calibration: 4 of 4 quantized layers calibrated")) << convert_summary_text(r);
}

TEST(ConvertLoud, CalibSampleIsUniformAndAsLargeAsAsked) {
  // 1000 rows in 10 calls; row i holds the value i. A sample of 256 must hold exactly 256 rows from
  // all over the range (not the first ones).
  CalibAccumulator acc(256, 7);
  for (int c = 0; c < 10; ++c) {
    Tensor x = Tensor::empty(DType::F32, {100, 64});
    for (int64_t r = 0; r < 100; ++r)
      for (int64_t k = 0; k < 64; ++k) x.mutable_data<float>()[r * 64 + k] = float(c * 100 + r);
    acc.add("l", x);
  }
  auto st = acc.finish();
  ASSERT_EQ(st["l"].sample.size(0), 256);
  double mean = 0;
  int late = 0;
  std::set<int> distinct;
  for (int64_t r = 0; r < 256; ++r) {
    const float v = st["l"].sample.data<float>()[r * 64];
    mean += v / 256.0;
    late += v >= 500;
    distinct.insert(int(v));
  }
  EXPECT_EQ(distinct.size(), 256u);            // without replacement
  EXPECT_NEAR(mean, 499.5, 3 * 289.0 / 16.0);  // 3σ of the mean of 256 uniform draws
  EXPECT_GT(late, 90);
  EXPECT_EQ(acc.rows_seen("l"), 1000);
  // finish(N) with fewer rows: still a uniform subset.
  auto st2 = acc.finish(64);
  ASSERT_EQ(st2["l"].sample.size(0), 64);
  EXPECT_EQ(st2["l"].min.data<float>()[0], 0.f);
  EXPECT_EQ(st2["l"].max.data<float>()[0], 999.f);
}

TEST(ConvertLoud, StaleTemporaryFilesOfDeadProcessesAreRemoved) {
  TmpDir d;
  const std::string in = write_bert(d);
  pid_t dead = fork();
  if (dead == 0) _exit(0);
  int status = 0;
  waitpid(dead, &status, 0);
  const std::string stale = d / fmt::format(".out.safetensors.tmp-{}-0-abc", dead);
  const std::string stale_shard = d / fmt::format(".out-00001-of-00002.safetensors.tmp-{}-0-abc", dead);
  const std::string alive = d / fmt::format(".out.safetensors.tmp-{}-0-abc", getppid());
  const std::string other = d / fmt::format(".other.safetensors.tmp-{}-0-abc", dead);
  for (const auto& f : {stale, stale_shard, alive, other}) std::ofstream(f) << "x";
  ConvertOptions o;
  o.rules = {parse_convert_rule(R"(encoder.*=svdquant_w4a4:rank=8)")};
  const ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(stale_shard));
  EXPECT_TRUE(fs::exists(alive));
  EXPECT_TRUE(fs::exists(other));
  EXPECT_TRUE(any_contains(r.plan.notes, "a temporary file left by an interrupted run"));
}
