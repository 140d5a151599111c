// test_convert_checkpoint.cpp — end to end: a small synthetic Qwen-Image checkpoint converted with
// the preset (natural and tile), re-read, validated by the registry (bind_layer), effective weights
// within the expected error of the input, keys and comfy_quant JSON as the spec says, passthrough
// bytes identical, determinism across thread counts and memory budgets, and failures (bad rule,
// refused requantize, unwritable target) that leave no file.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "nibble/convert.h"
#include "nibble/formats.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("convert") {}
};

std::string make_input(const TmpDir& d, const std::string& prefix = "") {
  SynthCheckpointOptions o;
  o.blocks = 1;
  o.hidden = 128;
  o.head_dim = 64;
  o.prefix = prefix;
  const std::string path = d / "in.safetensors";
  write_synth_qwen_image_checkpoint(path, o);
  return path;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

std::string file_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

ConvertOptions preset() {
  ConvertOptions o;
  o.preset = "qwen-image";
  o.rank = 16;
  return o;
}

}  // namespace

TEST(ConvertCheckpoint, PresetNaturalKeysJsonAndErrors) {
  TmpDir d;
  const std::string in = make_input(d, "model.diffusion_model.");
  const std::string out = d / "out.safetensors";
  ConvertReport rep = convert_checkpoint(in, out, preset());
  ASSERT_EQ(rep.plan.layers.size(), 14u);
  auto src = SafetensorsFile::open(in);
  auto dst = SafetensorsFile::open(out);
  EXPECT_EQ(dst->file_size(), rep.plan.file_size);
  const std::string bp = "model.diffusion_model.transformer_blocks.0.";
  // AWQ modulation layers.
  for (const char* m : {"img_mod.1", "txt_mod.1"}) {
    const std::string P = bp + m;
    for (const char* k : {".weight", ".weight_scale", ".weight_zeros", ".bias", ".comfy_quant"})
      ASSERT_TRUE(dst->contains(P + k)) << P << k;
    EXPECT_FALSE(dst->contains(P + ".weight_zero"));
    Tensor cq = dst->get(P + ".comfy_quant");
    EXPECT_EQ(cq.dtype(), DType::U8);
    EXPECT_EQ(std::string(cq.data<char>(), cq.nbytes()), R"({"format":"awq_w4a16","group_size":64})");
    EXPECT_EQ(dst->find(P + ".weight")->shape, (Shape{768, 64}));
    EXPECT_EQ(dst->find(P + ".weight_scale")->shape, (Shape{2, 768}));
  }
  // SVDQuant layers.
  const std::vector<std::string> svd = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                        "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                                        "txt_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.2"};
  for (const auto& m : svd) {
    const std::string P = bp + m;
    for (const char* k : {".weight", ".weight_scale", ".smooth_factor", ".proj_down", ".proj_up", ".bias", ".comfy_quant"})
      ASSERT_TRUE(dst->contains(P + k)) << P << k;
    for (const char* k : {".weight_scale", ".smooth_factor", ".proj_down", ".proj_up", ".bias"})
      EXPECT_EQ(dst->find(P + k)->dtype, DType::BF16) << P << k;
    Tensor cq = dst->get(P + ".comfy_quant");
    auto j = nlohmann::json::parse(std::string(cq.data<char>(), cq.nbytes()));
    EXPECT_EQ(j["format"], "svdquant_w4a4");
    EXPECT_EQ(j["lowrank_branch_input_basis"], "raw");
    EXPECT_EQ(j["proj_down_smooth_folded"], true);
    const bool unsig = m.find("net.2") != std::string::npos;
    EXPECT_EQ(j.contains("act_unsigned"), unsig) << m;
    if (unsig) {
      EXPECT_EQ(j["act_unsigned"], true);
    }
    EXPECT_FALSE(j.contains("layout"));
  }
  // q/k/v share smooth_factor and proj_down (spec §3.8).
  for (const auto& tri : {std::vector<std::string>{"attn.to_q", "attn.to_k", "attn.to_v"},
                          std::vector<std::string>{"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}})
    for (int i = 1; i < 3; ++i) {
      EXPECT_TRUE(same_bytes(dst->get(bp + tri[0] + ".smooth_factor"), dst->get(bp + tri[i] + ".smooth_factor")));
      EXPECT_TRUE(same_bytes(dst->get(bp + tri[0] + ".proj_down"), dst->get(bp + tri[i] + ".proj_down")));
    }
  // Passthrough tensors byte-identical; every input tensor not in a converted layer is present.
  int passthrough = 0;
  for (const auto& t : src->tensors()) {
    bool converted = false;
    for (const auto& l : rep.plan.layers)
      if (t.name == l.name + ".weight" || t.name == l.name + ".bias") converted = true;
    if (converted) continue;
    ASSERT_TRUE(dst->contains(t.name)) << t.name;
    EXPECT_TRUE(same_bytes(src->get(t.name), dst->get(t.name))) << t.name;
    ++passthrough;
  }
  EXPECT_EQ(uint64_t(passthrough), rep.plan.passthrough_tensors);
  // The registry binds every converted layer; its dequantize agrees with ours and with the input.
  Checkpoint ck = Checkpoint::open(out);
  int bound = 0;
  for (const auto& ls : collect_layers(ck, true)) {
    QuantizedLayer ql = bind_layer(ls);
    Tensor W = src->get(ls.name + ".weight").to_f32();
    Tensor Weff = dequantize(ql);
    double num = 0, den = 0;
    for (int64_t i = 0; i < W.numel(); ++i) {
      const double e = double(Weff.data<float>()[i]) - W.data<float>()[i];
      num += e * e;
      den += double(W.data<float>()[i]) * W.data<float>()[i];
    }
    // int4 with group 64 on weights whose outlier columns (×10–50) share groups with ordinary
    // ones: plain AWQ RTN lands near 0.15–0.2 here (no low-rank branch to absorb the outliers);
    // SVDQuant r16 removes the outlier columns into the low-rank part and stays far lower.
    const double rel = std::sqrt(num / den);
    EXPECT_LT(rel, ql.config.format == "awq_w4a16" ? 0.25 : 0.08) << ls.name;
    if (ql.config.format == "svdquant_w4a4") {
      EXPECT_EQ(ql.act_unsigned, ls.name.find("net.2") != std::string::npos);
      SvdquantW4A4Params p = svdquant_params(ql);
      Tensor mine = effective_weight(p);
      for (int64_t i = 0; i < W.numel(); ++i)
        ASSERT_NEAR(mine.data<float>()[i], Weff.data<float>()[i], 1e-5 * (1 + std::fabs(mine.data<float>()[i]))) << ls.name;
    }
    ++bound;
  }
  EXPECT_EQ(bound, 14);
  for (const auto& l : rep.layers) EXPECT_LT(l.weight_rel_error, l.format == "awq_w4a16" ? 0.25 : 0.08) << l.name;
}

TEST(ConvertCheckpoint, DeterministicAcrossThreadsAndBudgets) {
  TmpDir d;
  const std::string in = make_input(d);
  ConvertOptions o = preset();
  o.threads = 1;
  convert_checkpoint(in, d / "a.safetensors", o);
  o.threads = 2;
  convert_checkpoint(in, d / "b.safetensors", o);
  o.mem_budget = 1;  // one job at a time
  convert_checkpoint(in, d / "c.safetensors", o);
  set_num_threads(0);
  const std::string a = file_bytes(d / "a.safetensors");
  EXPECT_EQ(a, file_bytes(d / "b.safetensors"));
  EXPECT_EQ(a, file_bytes(d / "c.safetensors"));
}

TEST(ConvertCheckpoint, TileLayoutRulesExcludeAndDryRun) {
  TmpDir d;
  const std::string in = make_input(d);
  ConvertOptions o = preset();
  o.tile_layout = true;
  o.exclude = {R"(txt_mlp)"};
  o.rules = {parse_convert_rule(R"(img_in$=awq_w4a16:group_size=32)"), parse_convert_rule(R"(to_out\.0$=keep)")};
  ConvertPlan plan = plan_conversion(in, o);
  std::set<std::string> names;
  for (const auto& l : plan.layers) names.insert(l.name);
  EXPECT_TRUE(names.count("img_in"));
  EXPECT_FALSE(names.count("transformer_blocks.0.attn.to_out.0"));
  EXPECT_FALSE(names.count("transformer_blocks.0.txt_mlp.net.2"));
  EXPECT_TRUE(names.count("transformer_blocks.0.img_mlp.net.2"));
  EXPECT_FALSE(fs::exists(d / "out.safetensors"));  // planning writes nothing
  const ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  EXPECT_EQ(r.plan.file_size, plan.file_size);
  auto f = SafetensorsFile::open(d / "out.safetensors");
  EXPECT_EQ(f->find("transformer_blocks.0.img_mlp.net.0.proj.weight")->shape, (Shape{4, 2, 32, 128}));
  EXPECT_EQ(f->find("transformer_blocks.0.img_mlp.net.0.proj.proj_up")->shape, (Shape{4, 16, 128}));
  Tensor cq = f->get("transformer_blocks.0.img_mlp.net.0.proj.comfy_quant");
  EXPECT_NE(std::string(cq.data<char>(), cq.nbytes()).find(R"("layout":"kitchen_tile_packed_w4a4")"), std::string::npos);
  Tensor cq2 = f->get("img_in.comfy_quant");
  EXPECT_EQ(std::string(cq2.data<char>(), cq2.nbytes()), R"({"format":"awq_w4a16","group_size":32})");
  EXPECT_EQ(f->find("transformer_blocks.0.txt_mlp.net.2.weight")->dtype, DType::BF16);  // excluded → unchanged
  Checkpoint ck = Checkpoint::open(d / "out.safetensors");
  for (const auto& ls : collect_layers(ck, true)) EXPECT_NO_THROW(bind_layer(ls)) << ls.name;
}

TEST(ConvertCheckpoint, FailuresLeaveNoFile) {
  TmpDir d;
  const std::string in = make_input(d);
  const std::string out = d / "out.safetensors";
  EXPECT_THROW(parse_convert_rule("to_q=int3"), Error);
  EXPECT_THROW(parse_convert_rule("(unclosed=awq_w4a16"), Error);
  EXPECT_THROW(parse_convert_rule("x=awq_w4a16:bogus=1"), Error);
  ConvertOptions bad = preset();
  bad.rules = {parse_convert_rule("img_in$=svdquant_w4a4:rank=x")};
  EXPECT_THROW(convert_checkpoint(in, out, bad), Error);
  EXPECT_FALSE(fs::exists(out));
  // Requantizing a converted file is refused.
  convert_checkpoint(in, out, preset());
  const std::string out2 = d / "out2.safetensors";
  try {
    convert_checkpoint(out, out2, preset());
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already quantized"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out2));
  // Unwritable target directory (simulates a full / read-only disk): nothing appears, input untouched.
  const std::string before = file_bytes(in);
  fs::create_directories(d / "ro");
  fs::permissions(d / "ro", fs::perms::owner_read | fs::perms::owner_exec);
  if (::access((d / "ro").c_str(), W_OK) != 0) {  // (root ignores permissions)
    EXPECT_THROW(convert_checkpoint(in, d / "ro/out.safetensors", preset()), Error);
    EXPECT_TRUE(fs::is_empty(d / "ro"));
  }
  // A target whose parent is a regular file (fails for root too).
  std::ofstream(d / "not_a_dir") << "x";
  EXPECT_THROW(convert_checkpoint(in, d / "not_a_dir/out.safetensors", preset()), Error);
  // A failure in the middle of the stream (statistics of the wrong width for a late layer): some
  // tensors were already written to the temporary file, yet nothing appears at the target.
  CalibAccumulator acc;
  acc.add("transformer_blocks.0.txt_mlp.net.2", synth_activations(4, 64, 1));  // K should be 512
  acc.save(d / "bad_calib.safetensors");
  ConvertOptions mid = preset();
  mid.calib_path = d / "bad_calib.safetensors";
  const std::string out3 = d / "out3.safetensors";
  try {
    convert_checkpoint(in, out3, mid);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("512"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("txt_mlp.net.2"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out3));
  for (const auto& entry : fs::directory_iterator(d.p))  // no temporary left behind either
    EXPECT_EQ(entry.path().filename().string().find("out3"), std::string::npos) << entry.path();
  EXPECT_EQ(before, file_bytes(in));
}

TEST(ConvertCheckpoint, AllowRequantize) {
  TmpDir d;
  const std::string in = make_input(d);
  const std::string q1 = d / "q1.safetensors", q2 = d / "q2.safetensors";
  convert_checkpoint(in, q1, preset());
  ConvertOptions o = preset();
  o.allow_requantize = true;
  o.tile_layout = true;  // e.g. natural → tile re-export
  ConvertReport r = convert_checkpoint(q1, q2, o);
  EXPECT_EQ(r.plan.layers.size(), 14u);
  auto src = SafetensorsFile::open(in);
  Checkpoint ck = Checkpoint::open(q2);
  Checkpoint ck1 = Checkpoint::open(q1);
  for (const auto& ls : collect_layers(ck, true)) {
    QuantizedLayer ql = bind_layer(ls);
    if (ql.config.format != "svdquant_w4a4") continue;
    EXPECT_TRUE(ql.tile_packed) << ls.name;
    // Requantizing an already-int4 weight: within the first conversion's error of the original.
    Tensor W = src->get(ls.name + ".weight").to_f32(), Weff = dequantize(ql);
    double num = 0, den = 0;
    for (int64_t i = 0; i < W.numel(); ++i) {
      const double e = double(Weff.data<float>()[i]) - W.data<float>()[i];
      num += e * e;
      den += double(W.data<float>()[i]) * W.data<float>()[i];
    }
    EXPECT_LT(std::sqrt(num / den), 0.1) << ls.name;
    // act_unsigned: the bias correction is applied once (recovered b, then corrected again) —
    // the requantized bias stays close to the first conversion's.
    if (ql.act_unsigned) {
      Tensor b1 = ck1.get(ls.name + ".bias").to_f32(), b2 = ql.bias.to_f32();
      double dn = 0, dd = 0;
      for (int64_t n = 0; n < b1.numel(); ++n) {
        dn += std::pow(double(b2.data<float>()[n]) - b1.data<float>()[n], 2);
        dd += std::pow(double(b1.data<float>()[n]), 2);
      }
      EXPECT_LT(std::sqrt(dn / dd), 0.1) << ls.name;
    }
  }
}

TEST(ConvertCheckpoint, MetadataConfigsOfPassthroughLayersKept) {
  // Input whose configs live in __metadata__["_quantization_metadata"] (spec §4.1): a float layer is
  // converted, a quantized one passes through and must keep its config entry.
  TmpDir d;
  Tensor W = synth_weight(128, 128, 1);
  AwqW4A16Params p = quantize_awq_w4a16(W, Tensor(), AwqQuantOptions{});
  std::vector<std::pair<std::string, Tensor>> t = {{"a.weight", W.to(DType::BF16)},
                                                   {"q.weight", p.qweight},
                                                   {"q.weight_scale", p.wscales},
                                                   {"q.weight_zeros", p.wzeros}};
  save_safetensors(d / "in.safetensors", t,
                   {{"_quantization_metadata", R"({"format_version":"1.0","layers":{"q":{"format":"awq_w4a16","group_size":64}}})"}});
  ConvertOptions o;
  o.rules = {parse_convert_rule("^a$=svdquant_w4a4:rank=8")};
  convert_checkpoint(d / "in.safetensors", d / "out.safetensors", o);
  Checkpoint ck = Checkpoint::open(d / "out.safetensors");
  auto layers = collect_layers(ck, true);
  ASSERT_EQ(layers.size(), 2u);
  for (const auto& l : layers) EXPECT_NO_THROW(bind_layer(l)) << l.name;
  EXPECT_NE(ck.metadata().at("_quantization_metadata").find("\"q\""), std::string::npos);
}

TEST(ConvertCheckpoint, CalibratedConversion) {
  TmpDir d;
  const std::string in = make_input(d);
  // Statistics for two layers (others convert weight-only).
  CalibAccumulator acc;
  acc.add("transformer_blocks.0.attn.to_q", synth_activations(64, 128, 1));
  acc.add("transformer_blocks.0.img_mod.1", synth_activations(8, 128, 2));
  acc.save(d / "calib.safetensors");
  auto stats = load_calib_stats(d / "calib.safetensors");
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats["transformer_blocks.0.attn.to_q"].max_abs.shape(), (Shape{128}));
  ConvertOptions o = preset();
  o.calib_path = d / "calib.safetensors";
  ConvertReport r = convert_checkpoint(in, d / "out.safetensors", o);
  auto f = SafetensorsFile::open(d / "out.safetensors");
  Tensor s = f->get("transformer_blocks.0.attn.to_k.smooth_factor");
  EXPECT_TRUE(same_bytes(s, f->get("transformer_blocks.0.attn.to_q.smooth_factor")));
  EXPECT_TRUE(same_bytes(f->get("transformer_blocks.0.attn.to_k.proj_down"), f->get("transformer_blocks.0.attn.to_v.proj_down")));
  for (const auto& l : r.layers) std::printf("%-45s %s err %.4f\n", l.name.c_str(), l.format.c_str(), l.weight_rel_error);
  // Calibrated AWQ trades plain weight error for activation-weighted error (clipping), so only a
  // loose plain-error ceiling applies to it.
  for (const auto& l : r.layers) EXPECT_LT(l.weight_rel_error, l.format == "awq_w4a16" ? 0.5 : 0.1) << l.name;
  auto j = nlohmann::json::parse(convert_report_json(r));
  EXPECT_EQ(j["layers"].size(), 14u);
  EXPECT_TRUE(j["layers"][0].contains("weight_rel_error"));
}

TEST(ConvertCheckpoint, ShardedOutputHoldsTheSameTensorsAsOneFile) {
  TmpDir d;
  const std::string in = make_input(d);
  const std::string one = d / "one.safetensors";
  convert_checkpoint(in, one, preset());
  ConvertOptions o = preset();
  o.shard_size = 256 * 1024;  // small: several shards
  const std::string sharded = d / "sharded.safetensors";
  convert_checkpoint(in, sharded, o);
  EXPECT_FALSE(fs::exists(sharded));  // shards + index instead of one file
  const std::string index = d / "sharded.safetensors.index.json";
  ASSERT_TRUE(fs::exists(index));
  int shards = 0;
  for (const auto& e : fs::directory_iterator(d.p))
    if (e.path().filename().string().rfind("sharded-", 0) == 0) {
      ++shards;
      EXPECT_LE(fs::file_size(e.path()), 2u * 256 * 1024 + 64 * 1024) << e.path();  // one tensor may exceed the limit alone
    }
  EXPECT_GT(shards, 1);
  Checkpoint a = Checkpoint::open(one), b = Checkpoint::open(index);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& n : a.names()) EXPECT_TRUE(same_bytes(a.get(n), b.get(n))) << n;
}
