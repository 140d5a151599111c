// test_lora.cpp — LoRA on int4 models (nibble/lora.h): the LoRA's own contribution reproduced to
// float rounding on svdquant_w4a4 (natural and tile-packed; the int4 main path untouched), awq_w4a16
// within its requantization bound, float layers merged; file formats (PEFT, kohya + alpha,
// ComfyUI-saved, prefixes), fused-qkv split, baking into a file == applying at load; bad input.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "nibble/convert.h"
#include "nibble/lora.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("lora") {}
};

using TL = std::vector<std::pair<std::string, Tensor>>;

Tensor json_tensor(const std::string& j) { return Tensor::from_bytes(DType::U8, {int64_t(j.size())}, j.data(), j.size()); }
Tensor randn(Shape s, uint32_t seed, float sd, DType dt = DType::F32) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sd);
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = d(rng);
  return dt == DType::F32 ? t : t.to(dt);
}
float val(const Tensor& t, int64_t i) {
  if (t.dtype() == DType::F32) return t.data<float>()[i];
  return t.dtype() == DType::F16 ? f16_to_f32(t.data<uint16_t>()[i]) : bf16_to_f32(t.data<uint16_t>()[i]);
}

constexpr int64_t D = 256, K = 192;
const std::string B = "transformer_blocks.0.";

// A small kitchen checkpoint: q/k/v (svdquant, shared smoothing), to_out.0 (svdquant tile-packed),
// img_mod.1 (awq), proj_out (float F32), with the ComfyUI prefix when `prefix`.
std::string make_model(const TmpDir& d, bool prefix = false) {
  TL t;
  const std::string P = prefix ? "model.diffusion_model." : "";
  SvdquantQuantOptions so;
  so.rank = 16;
  std::vector<Tensor> Ws = {synth_weight(D, K, 1), synth_weight(D, K, 2), synth_weight(D, K, 3)};
  std::vector<Tensor> bs = {synth_bias(D, 1), synth_bias(D, 2), synth_bias(D, 3)};
  auto qkv = quantize_weight_svdquant_w4a4_group(Ws, bs, so);
  const char* names[] = {"attn.to_q", "attn.to_k", "attn.to_v"};
  for (int i = 0; i < 3; ++i) {
    for (auto& [s, v] : layer_tensors(qkv[size_t(i)])) t.emplace_back(P + B + names[i] + "." + s, v);
    t.emplace_back(P + B + names[i] + ".comfy_quant", json_tensor(svdquant_quant_config(so).to_json()));
  }
  SvdquantQuantOptions st = so;
  st.tile_layout = true;
  auto out = quantize_weight_svdquant_w4a4(synth_weight(D, D, 4), synth_bias(D, 4), st);
  for (auto& [s, v] : layer_tensors(out)) t.emplace_back(P + B + "attn.to_out.0." + s, v);
  t.emplace_back(P + B + "attn.to_out.0.comfy_quant", json_tensor(svdquant_quant_config(st).to_json()));
  AwqQuantOptions ao;
  auto mod = quantize_awq_w4a16(synth_weight(2 * D, K, 5), synth_bias(2 * D, 5), ao);
  for (auto& [s, v] : layer_tensors(mod)) t.emplace_back(P + B + "img_mod.1." + s, v);
  t.emplace_back(P + B + "img_mod.1.comfy_quant", json_tensor(awq_quant_config(ao).to_json()));
  t.emplace_back(P + "proj_out.weight", randn({64, D}, 6, 0.05f));
  t.emplace_back(P + "proj_out.bias", randn({64}, 7, 0.1f));
  const std::string path = d / (prefix ? "model_prefixed.safetensors" : "model.safetensors");
  save_safetensors(path, t);
  return path;
}

struct LoraMod {
  std::string stem;
  Tensor down, up;  // (r, K), (N, r) F32 (stored as BF16 in the file)
  float alpha = 0;  // 0: no alpha key
};
enum class Style { Peft, Kohya, Comfy };
std::string write_lora(const TmpDir& d, const std::string& name, const std::vector<LoraMod>& mods, Style style) {
  TL t;
  for (const auto& m : mods) {
    std::string stem = m.stem;
    if (style == Style::Peft) {
      t.emplace_back("transformer." + stem + ".lora_A.weight", m.down.to(DType::BF16));
      t.emplace_back("transformer." + stem + ".lora_B.weight", m.up.to(DType::BF16));
    } else if (style == Style::Kohya) {
      std::replace(stem.begin(), stem.end(), '.', '_');
      t.emplace_back("lora_unet_" + stem + ".lora_down.weight", m.down.to(DType::BF16));
      t.emplace_back("lora_unet_" + stem + ".lora_up.weight", m.up.to(DType::BF16));
      if (m.alpha) t.emplace_back("lora_unet_" + stem + ".alpha", Tensor::from_bytes(DType::F32, {}, &m.alpha, 4));
    } else {
      t.emplace_back("diffusion_model." + stem + ".lora_down.weight", m.down.to(DType::BF16));
      t.emplace_back("diffusion_model." + stem + ".lora_up.weight", m.up.to(DType::BF16));
      if (m.alpha) t.emplace_back("diffusion_model." + stem + ".alpha", Tensor::from_bytes(DType::F32, {}, &m.alpha, 4));
    }
  }
  const std::string path = d / name;
  save_safetensors(path, t);
  return path;
}
LoraMod mod(const std::string& stem, int64_t r, int64_t N, int64_t Kin, uint32_t seed, float alpha = 0) {
  // bf16-exact factors (the file stores bf16), so the reference uses the same values.
  return {stem, randn({r, Kin}, seed, 0.05f, DType::BF16).to_f32().clone(), randn({N, r}, seed + 100, 0.05f, DType::BF16).to_f32().clone(),
          alpha};
}

// x·(scale·up·down)ᵀ in double, with the factors rounded as the svdquant branch stores them.
double lora_ref(const Tensor& x, int64_t m, int64_t n, const LoraMod& l, float scale, bool round_bf16, double* mag) {
  const int64_t r = l.down.size(0), Kin = l.down.size(1);
  double y = 0;
  for (int64_t j = 0; j < r; ++j) {
    double a = 0, am = 0;
    for (int64_t k = 0; k < Kin; ++k) {
      float dv = scale * l.down.data<float>()[j * Kin + k];
      if (round_bf16) dv = bf16_to_f32(f32_to_bf16(dv));
      a += double(x.data<float>()[m * Kin + k]) * dv;
      am += std::fabs(double(x.data<float>()[m * Kin + k]) * dv);
    }
    const double u = l.up.data<float>()[n * r + j];
    y += a * u;
    *mag += am * std::fabs(u);
  }
  return y;
}

TEST(Lora, SvdquantContributionExactAwqAndFloatMerged) {
  TmpDir d;
  const std::string model = make_model(d);
  const int64_t r = 64;
  LoraMod lq = mod(B + "attn.to_q", r, D, K, 11), lo = mod(B + "attn.to_out.0", r, D, D, 12),
          lm = mod(B + "img_mod.1", 8, 2 * D, K, 13), lp = mod("proj_out", 4, 64, D, 14);
  const float strength = 0.75f;
  const std::string peft = write_lora(d, "peft.safetensors", {lq, lo}, Style::Peft);
  lm.alpha = 4;  // scale = strength·alpha/r = 0.75·4/8
  const std::string kohya = write_lora(d, "kohya.safetensors", {lm}, Style::Kohya);
  const std::string comfy = write_lora(d, "comfy.safetensors", {lp}, Style::Comfy);
  nn::Model base = nn::Model::load(model);
  LoraApplyStats st;
  nn::Model lora = nn::Model::load(model, {{peft, strength}, {kohya, strength}, {comfy, 1.0f}}, false, &st);
  EXPECT_EQ(st.svdquant_layers, 2);
  EXPECT_EQ(st.awq_layers, 1);
  EXPECT_EQ(st.float_layers, 1);
  EXPECT_EQ(st.max_rank_after, 16 + 64);
  const int64_t M = 5;
  // svdquant layers: y_lora − y_base == x·ΔWᵀ to float rounding (the int4 main path is unchanged).
  for (auto [name, l] : {std::pair{B + "attn.to_q", &lq}, {B + "attn.to_out.0", &lo}}) {
    SCOPED_TRACE(name);
    const int64_t Kin = l->down.size(1);
    Tensor x = synth_activations(M, Kin, 21);
    Tensor yb = base.linear(name).forward(x), yl = lora.linear(name).forward(x);
    EXPECT_EQ(lora.linear(name).layer().rank, 16 + 64);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < D; ++n) {
        double mag = 0;
        const double ref = lora_ref(x, m, n, *l, strength, true, &mag);
        const double got = double(yl.data<float>()[m * D + n]) - yb.data<float>()[m * D + n];
        // fp32 accumulation over K·r products, plus re-association with the main path (|y| ulps), plus
        // the bf16 low-rank branch's rounding of fp32 x to bf16 (|x̂ − x| ≤ 2^-8·|x|, kernels/
        // svdquant_w4a4_kernels.h): ≤ 2^-8·Σ|x·d·u| = 2^-8·mag.
        const double tol = double(Kin + 80) * 0x1p-23 * (mag + 1) + 0x1p-8 * mag +
                           4 * 0x1p-23 * (std::fabs(yb.data<float>()[m * D + n]) + std::fabs(yl.data<float>()[m * D + n]));
        ASSERT_NEAR(got, ref, tol) << m << "," << n;
      }
  }
  // The other q/k/v members are untouched (LoRA only on to_q).
  EXPECT_EQ(lora.linear(B + "attn.to_k").layer().rank, 16);
  // awq: requantized; output within the requantization bound of W_eff + ΔW.
  {
    const std::string name = B + "img_mod.1";
    Tensor x = synth_activations(M, K, 22);
    AwqW4A16Params pb = awq_params(base.linear(name).layer()), pl = awq_params(lora.linear(name).layer());
    Tensor Wb = effective_weight(pb);
    Tensor yl = lora.linear(name).forward(x);
    const float scale = strength * 4.0f / 8.0f;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < 2 * D; ++n) {
        double ref = pb.bias.defined() ? val(pb.bias, n) : 0, tol = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          double w = Wb.data<float>()[n * K + k];
          for (int64_t j = 0; j < 8; ++j) w += double(scale) * lm.up.data<float>()[n * 8 + j] * lm.down.data<float>()[j * K + k];
          const double xv = x.data<float>()[m * K + k];
          ref += xv * w;
          // |W_new − W| ≤ s/2 (rounding to the grid) + the zero's rounding (bf16 half ulp of |z|).
          const double s = val(pl.wscales, (k / 64) * 2 * D + n), z = val(pl.wzeros, (k / 64) * 2 * D + n);
          tol += std::fabs(xv) * (0.5 * s + std::fabs(z) * 0x1p-8 + std::fabs(w) * 0x1p-8);
          mag += std::fabs(xv * w);
        }
        tol += double(K) * 0x1p-22 * (mag + 1) + std::fabs(ref) * 0x1p-8;  // accumulation, output in bf16
        ASSERT_NEAR(yl.data<float>()[m * 2 * D + n], ref, tol) << m << "," << n;
      }
    EXPECT_GT(st.awq_max_rel_error, 0.0);
    EXPECT_LT(st.awq_max_rel_error, 0.1);  // the int4 grid's own error (≈ the converter's weight error)
    EXPECT_GT(st.awq_max_rel_delta, 0.0);
  }
  // float layer: merged exactly (F32 storage) up to fp32 rounding.
  {
    Tensor x = synth_activations(M, D, 23);
    Tensor yb = base.linear("proj_out").forward(x), yl = lora.linear("proj_out").forward(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < 64; ++n) {
        double mag = 0;
        const double ref = lora_ref(x, m, n, lp, 1.0f, false, &mag);
        ASSERT_NEAR(double(yl.data<float>()[m * 64 + n]) - yb.data<float>()[m * 64 + n], ref,
                    double(D) * 0x1p-22 * (mag + std::fabs(yb.data<float>()[m * 64 + n]) + 1));
      }
  }
}

TEST(Lora, BakedFileEqualsLoadTimeAndFusedQkvSplits) {
  TmpDir d;
  const std::string model = make_model(d, /*prefix=*/true);
  LoraMod fused = mod(B + "attn.to_qkv", 8, 3 * D, K, 31, 16.0f);  // ComfyUI-saved, fused qkv, alpha 16 (scale 2)
  const std::string lf = write_lora(d, "fused.safetensors", {fused}, Style::Comfy);
  nn::Model a = nn::Model::load(model, {{lf, 0.5f}});
  std::vector<std::string> unmatched;
  apply_loras_to_checkpoint(model, {{lf, 0.5f}}, d / "baked.safetensors", false, &unmatched);
  EXPECT_TRUE(unmatched.empty());
  nn::Model b = nn::Model::load(d / "baked.safetensors");
  nn::Model base = nn::Model::load(model);
  Tensor x = synth_activations(3, K, 41);
  const char* names[] = {"attn.to_q", "attn.to_k", "attn.to_v"};
  for (int i = 0; i < 3; ++i) {
    const std::string n = B + names[i];
    EXPECT_EQ(a.linear(n).layer().rank, 32);  // 16 + 8 padded to 16
    Tensor ya = a.linear(n).forward(x), yb = b.linear(n).forward(x), y0 = base.linear(n).forward(x);
    ASSERT_EQ(std::memcmp(ya.raw(), yb.raw(), ya.nbytes()), 0) << n;
    // Member i received rows [i·D, (i+1)·D) of the fused up.
    LoraMod part{n, fused.down, fused.up.slice_rows(i * D, (i + 1) * D).clone(), 0};
    for (int64_t nn_ = 0; nn_ < D; nn_ += 17) {
      double mag = 0;
      const double ref = lora_ref(x, 1, nn_, part, 0.5f * 16.0f / 8.0f, true, &mag);
      // (+ 2^-8·mag: the low-rank branch rounds fp32 x to bf16, as in the test above)
      EXPECT_NEAR(double(ya.data<float>()[D + nn_]) - y0.data<float>()[D + nn_], ref,
                  double(K + 40) * 0x1p-23 * (mag + 1) + 0x1p-8 * mag + 8 * 0x1p-23 * std::fabs(ya.data<float>()[D + nn_]));
    }
  }
  // The baked file keeps every other tensor byte-identical.
  Checkpoint ci = Checkpoint::open(model), co = Checkpoint::open(d / "baked.safetensors");
  ASSERT_EQ(ci.names(), co.names());
  const std::string w = "model.diffusion_model." + B + "attn.to_q.weight";
  EXPECT_EQ(std::memcmp(ci.get(w).raw(), co.get(w).raw(), ci.get(w).nbytes()), 0);
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    FAIL() << "no error";
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << " / " << n;
  }
}

TEST(Lora, BadInput) {
  TmpDir d;
  const std::string model = make_model(d);
  // Shape mismatch: names the layer and both shapes.
  const std::string bad = write_lora(d, "bad.safetensors", {mod(B + "attn.to_q", 8, D, K + 64, 51)}, Style::Peft);
  expect_error([&] { apply_loras_to_checkpoint(model, {{bad, 1}}, d / "o.safetensors"); },
               {"attn.to_q", "(8, 256)", "(r, 192)"});
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));
  // Unsupported type.
  {
    TL t = {{"lora_unet_transformer_blocks_0_attn_to_q.lokr_w1", randn({4, 4}, 1, 1.0f)}};
    save_safetensors(d / "lokr.safetensors", t);
    expect_error([&] { nn::Model::load(model, {{d / "lokr.safetensors", 1}}); }, {"LoKr", "supported"});
  }
  // Unmatched modules: listed; --partial skips them.
  const std::string part = write_lora(d, "part.safetensors",
                                      {mod(B + "attn.to_q", 4, D, K, 52), mod(B + "attn.nonexistent", 4, D, K, 53)}, Style::Peft);
  expect_error([&] { apply_loras_to_checkpoint(model, {{part, 1}}, d / "o.safetensors"); }, {"attn.nonexistent", "--partial"});
  EXPECT_FALSE(fs::exists(d / "o.safetensors"));
  std::vector<std::string> um;
  apply_loras_to_checkpoint(model, {{part, 1}}, d / "o.safetensors", true, &um);
  ASSERT_EQ(um.size(), 1u);
  EXPECT_NE(um[0].find("nonexistent"), std::string::npos);
  // Another architecture: nothing matches.
  const std::string flux = write_lora(d, "flux.safetensors", {mod("double_blocks.0.img_attn.qkv", 4, 3 * D, K, 54)}, Style::Comfy);
  expect_error([&] { nn::Model::load(model, {{flux, 1}}); }, {"another architecture", "double_blocks"});
  EXPECT_THROW(parse_lora_spec(d / "missing.safetensors:0.5"), Error);
  EXPECT_EQ(parse_lora_spec(flux + ":0.25").strength, 0.25f);
  EXPECT_EQ(parse_lora_spec(flux).strength, 1.0f);
}

}  // namespace
