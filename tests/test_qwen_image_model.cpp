// The whole Qwen-Image transformer against ComfyUI's own QwenImageTransformer2DModel.
//
// tests/data/qwen_image_golden_ckpt.safetensors (bf16 weights, ComfyUI key names with the
// "model.diffusion_model." prefix) and tests/data/qwen_image_golden.safetensors (inputs and fp32
// outputs of ComfyUI's forward on the CPU) were made by scripts/golden_comfyui.py (`make
// golden-comfyui COMFYUI_DIR=...`): 2 blocks, hidden 64 = 2 heads × 32, RoPE axes (4, 14, 14),
// joint width 48. Cases: plain (batch 2, odd H and W, two timesteps), refmask (two reference
// latents + an int64 text mask), tzero (the same on an index_timestep_zero checkpoint with
// addition_t_embedding), fmask (a float additive mask).
//
// Tolerance (fp32 on both sides, same bf16-exact weights; the sinusoid arguments are formed with
// ComfyUI's fp32 steps, exp(−ln(1e4)·i/128)·t·1000, so they agree): the two sides differ only by
// rounding order. Each stage (a dot product of K ≤ 256 terms, a norm, the polynomial exp with
// relative error < 2e-7) adds ≲ √K·u ≈ 1e-6 of its operands' scale (u = 2⁻²⁴); the path from input
// to output runs ~20 such stages (embeddings, 2 blocks × modulate/qkv/attention/out/MLP, norm_out,
// proj_out), so ≲ 2e-5 relative to activations of scale ~1-4: we allow max |Δ| ≤ 5e-5 and
// RMS ≤ 1e-5. Every effect tested (a reference dropped, the mask or the zero-timestep modulation
// changed) moves outputs by > 1e-2, far above (checked below). Measured here: max |Δ| ~2e-6.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "nibble/convert.h"
#include "nibble/latent.h"
#include "nibble/sample.h"
#include "nibble/synth.h"
#include "nibble/qwen_image.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"
#include "cli_util.h"

using namespace nibble;
using namespace nibble::nn;
namespace fs = std::filesystem;

namespace {

// NIBBLE_SOURCE_DIR (absolute), not __FILE__: ccache with CCACHE_BASEDIR makes __FILE__ relative.
const fs::path kData = fs::path(NIBBLE_SOURCE_DIR) / "tests" / "data";
const std::string kCkpt = (kData / "qwen_image_golden_ckpt.safetensors").string();
const std::string kGolden = (kData / "qwen_image_golden.safetensors").string();
constexpr double kMaxAbs = 5e-5, kMaxRms = 1e-5;

struct Diff {
  double max_abs = 0, rms = 0;
};
Diff diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  const Tensor x = a.to(DType::F32), y = b.to(DType::F32);
  Diff d;
  double ss = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double e = std::abs(double(x.data<float>()[i]) - y.data<float>()[i]);
    if (!(e <= d.max_abs)) d.max_abs = std::isnan(e) ? INFINITY : e;
    ss += e * e;
  }
  d.rms = std::sqrt(ss / double(std::max<int64_t>(1, x.numel())));
  return d;
}

std::shared_ptr<SafetensorsFile> golden() {
  static auto g = SafetensorsFile::open(kGolden);
  return g;
}

QwenImageInputs inputs(const std::string& c, bool with_mask = true, bool with_refs = true) {
  auto g = golden();
  QwenImageInputs in;
  in.latent = g->get(c + ".latent");
  in.context = g->get(c + ".context");
  in.timestep = g->get(c + ".timestep");
  if (with_mask && g->contains(c + ".mask")) in.attention_mask = g->get(c + ".mask");
  for (int i = 0; with_refs && g->contains(c + ".ref" + std::to_string(i)); ++i)
    in.ref_latents.push_back(g->get(c + ".ref" + std::to_string(i)));
  return in;
}

// The golden checkpoint + `__index_timestep_zero__` + addition_t_embedding (the "tzero" model).
std::string tzero_checkpoint(const fs::path& dir) {
  const auto src = SafetensorsFile::open(kCkpt);
  std::vector<std::pair<std::string, Tensor>> t;
  for (const auto& info : src->tensors()) t.emplace_back(info.name, src->get(info.name));
  t.emplace_back("model.diffusion_model.time_text_embed.addition_t_embedding.weight",
                 golden()->get("tzero.addition_t_embedding"));
  t.emplace_back("model.diffusion_model.__index_timestep_zero__", Tensor::empty(DType::F32, {0}));
  const std::string p = (dir / "tzero.safetensors").string();
  save_safetensors(p, t);
  return p;
}

// The golden comparison runs the fp32 attention (the bf16 one rounds q, k, v and P to bf16).
QwenImageLoadOptions fp32() {
  QwenImageLoadOptions o;
  o.attention = "fp32";
  return o;
}

fs::path tmpdir() {
  const fs::path d = fs::temp_directory_path() / ("nibble_qwen_model_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST(QwenImageModel, ConfigFromCheckpoint) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  const auto& c = m.config();
  EXPECT_EQ(c.blocks, 2);
  EXPECT_EQ(c.hidden, 64);
  EXPECT_EQ(c.heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.mlp_hidden, 256);
  EXPECT_EQ(c.joint_dim, 48);
  EXPECT_EQ(c.in_channels, 64);
  EXPECT_EQ(c.out_channels, 16);
  EXPECT_EQ(c.axes_dim, (std::vector<int64_t>{4, 14, 14}));
  EXPECT_FALSE(c.index_timestep_zero);
  EXPECT_FALSE(c.addition_t_embedding);
  EXPECT_GT(m.stored_bytes(), 600000u);
}

TEST(QwenImageModel, MatchesComfyUI) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  for (const char* c : {"plain", "refmask", "fmask"}) {
    const Tensor y = m.forward(inputs(c));
    const Diff d = diff(y, golden()->get(std::string(c) + ".out"));
    std::printf("%-8s max|Δ| %.3g  rms %.3g\n", c, d.max_abs, d.rms);
    EXPECT_LE(d.max_abs, kMaxAbs) << c;
    EXPECT_LE(d.rms, kMaxRms) << c;
  }
}

TEST(QwenImageModel, IndexTimestepZeroMatchesComfyUI) {
  const fs::path dir = tmpdir();
  const auto m = QwenImageTransformer::load(tzero_checkpoint(dir), fp32());
  EXPECT_TRUE(m.config().index_timestep_zero);
  EXPECT_TRUE(m.config().addition_t_embedding);
  const Tensor y = m.forward(inputs("refmask"));
  const Diff d = diff(y, golden()->get("tzero.out"));
  std::printf("tzero    max|Δ| %.3g  rms %.3g\n", d.max_abs, d.rms);
  EXPECT_LE(d.max_abs, kMaxAbs);
  EXPECT_LE(d.rms, kMaxRms);
  // the golden cases are far apart compared with the tolerance: the test discriminates
  EXPECT_GT(diff(golden()->get("tzero.out"), golden()->get("refmask.out")).max_abs, 1e-2);
  fs::remove_all(dir);
}

TEST(QwenImageModel, EffectsAreLargerThanTolerance) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  const Tensor ref = golden()->get("refmask.out");
  EXPECT_GT(diff(m.forward(inputs("refmask", /*mask=*/false)), ref).max_abs, 1e-2);
  EXPECT_GT(diff(m.forward(inputs("refmask", true, /*refs=*/false)), ref).max_abs, 1e-2);
  EXPECT_GT(diff(m.forward(inputs("fmask", false)), golden()->get("fmask.out")).max_abs, 1e-2);
}

TEST(QwenImageModel, FourDimLatentAndThreadInvariance) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  QwenImageInputs in = inputs("plain");
  const Tensor y5 = m.forward(in);
  const Tensor lat = in.latent;
  in.latent = lat.reshape({lat.size(0), lat.size(1), lat.size(3), lat.size(4)});
  const Tensor y4 = m.forward(in);
  EXPECT_EQ(y4.dim(), 4);
  EXPECT_EQ(diff(y4.reshape(y5.shape()), y5).max_abs, 0.0);
  const int saved = num_threads();
  set_num_threads(1);
  const Tensor y1 = m.forward(in);
  set_num_threads(saved);
  EXPECT_EQ(diff(y1, y4).max_abs, 0.0);
}

TEST(QwenImageModel, BadInputsNameWhatIsWrong) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  auto expect_err = [&](QwenImageInputs in, const char* needle) {
    try {
      m.forward(in);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  QwenImageInputs in = inputs("plain");
  in.latent = Tensor::zeros(DType::F32, {2, 4, 1, 4, 4});
  expect_err(in, "16 latent channels");
  in = inputs("plain");
  in.context = Tensor::zeros(DType::F32, {2, 7, 64});
  expect_err(in, "(B, L, 48)");
  in = inputs("refmask");
  in.attention_mask = Tensor::zeros(DType::I64, {1, 3});
  expect_err(in, "attention_mask");
}

TEST(QwenImageModel, BadCheckpointsNameWhatIsMissing) {
  const fs::path dir = tmpdir();
  const auto src = SafetensorsFile::open(kCkpt);
  auto write_without = [&](const std::string& drop_prefix, const std::string& name) {
    std::vector<std::pair<std::string, Tensor>> t;
    for (const auto& info : src->tensors())
      if (info.name.rfind(drop_prefix, 0) != 0) t.emplace_back(info.name, src->get(info.name));
    const std::string p = (dir / name).string();
    save_safetensors(p, t);
    return p;
  };
  auto expect_err = [&](const std::string& path, const char* needle) {
    try {
      QwenImageTransformer::load(path);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      const std::string w = e.what();
      EXPECT_NE(w.find(needle), std::string::npos) << w;
      EXPECT_NE(w.find(path), std::string::npos) << w;
    }
  };
  expect_err(write_without("model.diffusion_model.transformer_blocks.0.", "no_block0.safetensors"), "block 0 absent");
  // (a missing middle block: drop 0 of 2 — the highest present index sets the count)
  expect_err(write_without("model.diffusion_model.img_in.", "no_img_in.safetensors"), "img_in");
  expect_err(write_without("model.diffusion_model.transformer_blocks.1.attn.to_k.", "no_to_k.safetensors"),
             "transformer_blocks.1.attn.to_k");
  {
    const std::string p = (dir / "other.safetensors").string();
    save_safetensors(p, {{"foo.weight", Tensor::zeros(DType::F32, {4, 4})}});
    expect_err(p, "not a Qwen-Image transformer");
  }
  fs::remove_all(dir);
}

// ---- the CLI (build/nibble next to build/tests)
namespace {
using testing_cli::cli;
using testing_cli::run;
}  // namespace

TEST(QwenImageModelCli, ForwardMatchesComfyUIAndRejectsBadInput) {
  const std::string bin = cli();
  if (bin.empty()) FAIL() << "the nibble CLI is missing beside the tests (the same build makes both)";
  const fs::path dir = tmpdir();
  auto g = golden();
  const std::string lat = (dir / "lat.safetensors").string(), ctx = (dir / "ctx.safetensors").string();
  const std::string r0 = (dir / "r0.latent").string(), r1 = (dir / "r1.safetensors").string();
  const std::string out = (dir / "out.safetensors").string();
  save_safetensors(lat, {{"latent", g->get("refmask.latent")}});
  save_safetensors(ctx, {{"context", g->get("refmask.context")}, {"attention_mask", g->get("refmask.mask")}});
  // a ComfyUI .latent (raw VAE space): forward normalises it as ComfyUI's process_latent_in
  save_latent(r0, latent_process_out(g->get("refmask.ref0")));
  save_safetensors(r1, {{"latent", g->get("refmask.ref1")}});
  const std::string base = bin + " forward " + kCkpt + " --attention fp32 --latent " + lat + " --context " + ctx;
  ASSERT_EQ(run(base + " --ref " + r0 + " --ref " + r1 + " --timestep 0.6 -o " + out), 0);
  const Diff d = diff(SafetensorsFile::open(out)->get("prediction"), g->get("refmask.out"));
  EXPECT_LE(d.max_abs, kMaxAbs);
  EXPECT_LE(d.rms, kMaxRms);

  // bad input: exit 1, nothing written
  const std::string bad_out = (dir / "bad.safetensors").string();
  const std::string wide = (dir / "wide.safetensors").string(), chans = (dir / "chans.safetensors").string();
  save_safetensors(wide, {{"context", Tensor::zeros(DType::F32, {1, 9, 64})}});
  save_safetensors(chans, {{"latent", Tensor::zeros(DType::F32, {1, 4, 6, 8})}});
  EXPECT_EQ(run(bin + " forward " + kCkpt + " --latent " + lat + " --context " + wide + " --timestep 0.5 -o " + bad_out), 1);
  EXPECT_EQ(run(bin + " forward " + kCkpt + " --latent " + chans + " --context " + ctx + " --timestep 0.5 -o " + bad_out), 1);
  EXPECT_EQ(run(bin + " forward " + lat + " --latent " + lat + " --context " + ctx + " --timestep 0.5 -o " + bad_out), 1);
  const std::string nomarker = (dir / "nomarker.latent").string();
  save_safetensors(nomarker, {{"latent_tensor", g->get("refmask.latent")}});
  EXPECT_EQ(run(base + " --ref " + nomarker + " --timestep 0.5 -o " + bad_out), 1);  // .latent without its marker
  EXPECT_FALSE(fs::exists(bad_out));
  fs::remove_all(dir);
}

// ---- the streamed dense path (fp8 kept stored, decoded in blocks of rows inside the GEMM)
namespace {
// Σ_k |x_k w_k| per output: the scale of fp32 rounding in a dot product.
void check_linear(const Linear& l, int64_t M, uint64_t seed) {
  const int64_t N = l.out_features(), K = l.in_features();
  Tensor x = Tensor::empty(DType::F32, {M, K});
  uint64_t s = seed;
  for (int64_t i = 0; i < M * K; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x.mutable_data<float>()[i] = float(int64_t(s >> 40) % 2001 - 1000) / 500.0f;
  }
  Tensor y = Tensor::empty(DType::F32, {M, N});
  for (int64_t i = 0; i < M * N; ++i) y.mutable_data<float>()[i] = NAN;
  l.forward_rows(x.data<float>(), M, y.mutable_data<float>());
  const Tensor w = l.effective_weight(), b = l.effective_bias();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = b.defined() ? b.data<float>()[n] : 0.0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x.data<float>()[m * K + k]) * w.data<float>()[n * K + k];
        ref += p;
        mag += std::abs(p);
      }
      // fp32 dot product of K terms: |Δ| ≤ K·2⁻²⁴·Σ|x·w| (+ the bias add)
      const double tol = double(K + 2) * std::ldexp(1.0, -24) * (mag + 1.0);
      ASSERT_NEAR(y.data<float>()[m * N + n], ref, tol) << l.name() << " m " << m << " n " << n;
    }
}
}  // namespace

TEST(QwenImageModel, Fp8LayersStayStoredAndStream) {
  const int64_t N = 100, K = 72;
  LayerSource src;
  src.name = "blk.fp8";
  QuantConfig qc;
  qc.format = "float8_e4m3fn";
  src.config = qc;
  Tensor w = Tensor::empty(DType::F8_E4M3, {N, K});
  for (int64_t i = 0; i < N * K; ++i) {
    uint8_t c = uint8_t((i * 37 + 11) % 256);
    if ((c & 0x7F) == 0x7F) c = 0x3C;  // not NaN
    w.mutable_data<uint8_t>()[i] = c;
  }
  Tensor sc = Tensor::empty(DType::F32, {});
  sc.mutable_data<float>()[0] = 0.0125f;
  Tensor bias = Tensor::empty(DType::F32, {N});
  for (int64_t i = 0; i < N; ++i) bias.mutable_data<float>()[i] = 0.01f * float(i % 7);
  src.tensors = {{"weight", w}, {"weight_scale", sc}, {"bias", bias}};
  const Linear l = Linear::from_layer(bind_layer(src));
  EXPECT_TRUE(l.is_streamed());
  EXPECT_EQ(l.path(), LinearPath::Dequantized);
  for (int64_t M : {1, 3, 9, 70}) check_linear(l, M, uint64_t(M));
}

TEST(QwenImageModel, StreamedFloatLayersMatch) {
  const auto m = QwenImageTransformer::load(kCkpt, fp32());
  QwenImageLoadOptions o = fp32();
  o.stream_float_weights = 1;
  const auto ms = QwenImageTransformer::load(kCkpt, o);
  const Tensor ref = golden()->get("refmask.out");
  const Diff d = diff(ms.forward(inputs("refmask")), ref);
  EXPECT_LE(d.max_abs, kMaxAbs);
  EXPECT_LE(d.rms, kMaxRms);
  const Model model = Model::load(kCkpt);
  const Linear l = model.linear("transformer_blocks.1.img_mlp.net.0.proj").streamed();
  EXPECT_TRUE(l.is_streamed());
  for (int64_t M : {2, 17}) check_linear(l, M, 40 + uint64_t(M));
}

// The other kitchen formats (nvfp4, mxfp8, convrot, asym_w4a8: not row-separable) are decoded to
// bf16 at load and run on the bf16 dense GEMM (or a bf16 weight on the fp32 kernels). Bound
// (kernels/dense_bf16.h): the activation and the weight each rounded to bf16 (u = 2⁻⁸ each) and an
// fp32 sum of K exact products: |Δ| ≤ (2·2⁻⁸ + γ_K)·Σ|x·w| + 2⁻²⁴·|bias|; effective_weight() is
// the format's exact fp32 decode (not the bf16 copy).
TEST(QwenImageModel, OtherFormatsDecodedToBf16) {
  const fs::path dir = fs::temp_directory_path() / ("nibble_test_bf16dec_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "s.safetensors").string();
  write_sample_checkpoint(path, SampleOptions{});
  set_notice_handler(nullptr);
  const Model model = load_checkpoint(path);
  set_notice_handler([](const std::string& s) { std::fprintf(stderr, "nibble: note: %s\n", s.c_str()); });
  int checked = 0;
  for (const auto& name : model.names()) {
    const Linear& l = model.linear(name);
    if (l.path() != LinearPath::Dequantized || l.is_streamed()) continue;
    ++checked;
    const int64_t N = l.out_features(), K = l.in_features();
    const Tensor w = l.effective_weight(), b = l.effective_bias();
    ASSERT_EQ(w.dtype(), DType::F32) << name;
    for (int64_t M : {1, 5, 9, 40}) {
      const Tensor x = synth_activations(M, K, 7 + uint64_t(M));
      const Tensor y = l.forward(x);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double ref = b.defined() ? b.data<float>()[n] : 0.0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double t = double(x.data<float>()[m * K + k]) * w.data<float>()[n * K + k];
            ref += t;
            mag += std::fabs(t);
          }
          const double tol = (2 * std::ldexp(1.0, -8) + double(K) * std::ldexp(1.0, -24)) * mag +
                             std::ldexp(1.0, -24) * std::fabs(ref) + 1e-30;
          ASSERT_NEAR(y.data<float>()[m * N + n], ref, tol) << name << " (" << l.format_name() << ") M " << M;
        }
    }
  }
  EXPECT_GE(checked, 3) << "the sample checkpoint should hold nvfp4 / mxfp8 / convrot / asym layers";
  std::error_code ec;
  fs::remove_all(dir, ec);
}

// The dequantized baseline dequantized block by block in forward() (what a 60-block model needs)
// gives the same bits as the blocks dequantized at load.
TEST(QwenImageModel, DequantizedBaselinePerBlockMatchesAtLoad) {
  const fs::path dir = fs::temp_directory_path() / ("nibble_test_deqblk_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string flt = (dir / "bf16.safetensors").string(), q = (dir / "q.safetensors").string();
  SynthCheckpointOptions so;
  so.blocks = 2;
  so.hidden = 256;
  so.joint_dim = 64;
  write_synth_qwen_image_checkpoint(flt, so);
  ConvertOptions co;
  co.preset = "qwen-image";
  co.rank = 16;
  convert_checkpoint(flt, q, co);
  QwenImageLoadOptions a, b;
  a.dequantized_baseline = b.dequantized_baseline = true;
  a.dequantize_per_block = 0;
  b.dequantize_per_block = 1;
  const auto ma = QwenImageTransformer::load(q, a), mb = QwenImageTransformer::load(q, b);
  const auto mq = QwenImageTransformer::load(q);
  QwenImageInputs in;
  in.latent = synth_activations(16, 6 * 10, 3).reshape({1, 16, 6, 10});
  in.context = synth_activations(5, 64, 4).reshape({1, 5, 64});
  in.timestep = Tensor::empty(DType::F32, {1});
  in.timestep.mutable_data<float>()[0] = 0.7f;
  QwenImageTimings tb;
  const Tensor ya = ma.forward(in), yb = mb.forward(in, &tb), yq = mq.forward(in);
  ASSERT_EQ(0, std::memcmp(ya.raw(), yb.raw(), ya.nbytes()));
  EXPECT_GT(tb.dequantize, 0.0);
  double d = 0;
  for (int64_t i = 0; i < ya.numel(); ++i) d = std::max(d, double(std::fabs(ya.data<float>()[i] - yq.data<float>()[i])));
  EXPECT_GT(d, 0.0) << "the baseline should differ from the quantized model";
  std::error_code ec;
  fs::remove_all(dir, ec);
}
