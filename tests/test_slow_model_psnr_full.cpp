// Full-depth PSNR (`make psnr-full`; skipped unless NIBBLE_PSNR_FULL=1): the seed's end-to-end
// check on a 60-block, true-width kitchen-native Qwen-Image model.
//
// The checkpoint: NIBBLE_PSNR_DISTINCT (default 4) distinct synthetic bf16 blocks (hidden 3072,
// MLP 12288, joint 3584, every top-level layer) converted with --preset qwen-image (awq_w4a16 for
// the modulations, svdquant_w4a4 rank 32 elsewhere, top level kept bf16), written as
// NIBBLE_PSNR_BLOCKS (default 60) blocks: block b is converted block b mod DISTINCT (converting 60
// true-width blocks takes hours on 2 cores; the depth, the quantization of every block and the
// trajectory through all of them are real). Sampling: 256 image tokens (a 32×32 latent, 256×256
// pixels) + 32 text tokens (positive and negative), 8 Euler steps, CFG 2.5, shift 3.1, nibble's
// noise seed 20261130; the two conditionings run as one batch of 2 per step. The baseline is the
// same checkpoint with --baseline dequantized (each block dequantized to fp32 just before it runs:
// the whole fp32 model would need ~80 GB). PSNR is nn::compare_outputs' (docs/sampling.md):
// 10·log10(range(ref)² / MSE) over the final latent in the .latent space, ref = the baseline.
// Files are kept in NIBBLE_PSNR_DIR (default $TMPDIR/nibble_psnr_full) for reruns (~12 GiB).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "devtools/qwen_image_synth.h"
#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
int64_t env_int(const char* name, int64_t def) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : def;
}
Tensor context(int64_t L, uint64_t seed) {
  SynthActOptions a;  // the e2e tests' text-like activations (a few outlier channels)
  a.n_outlier_channels = 4;
  a.outlier_min = 5.0f;
  a.outlier_max = 20.0f;
  return synth_activations(L, 3584, seed, a).reshape({1, L, 3584});
}
Tensor cat_batch(const Tensor& a, const Tensor& b) {
  Shape s = a.shape();
  s[0] = a.size(0) + b.size(0);
  Tensor out = Tensor::empty(DType::F32, s);
  const Tensor af = a.to(DType::F32), bf = b.to(DType::F32);
  std::memcpy(out.mutable_raw(), af.raw(), af.nbytes());
  std::memcpy(static_cast<uint8_t*>(out.mutable_raw()) + af.nbytes(), bf.raw(), bf.nbytes());
  return out;
}
Tensor batch_row(const Tensor& t, int64_t b) {
  Shape s = t.shape();
  s[0] = 1;
  Tensor out = Tensor::empty(DType::F32, s);
  std::memcpy(out.mutable_raw(), static_cast<const uint8_t*>(t.raw()) + size_t(b) * out.nbytes(), out.nbytes());
  return out;
}

}  // namespace

TEST(SlowModelPsnrFull, SixtyBlocksVsDequantizedBaseline) {
  if (!std::getenv("NIBBLE_PSNR_FULL")) GTEST_SKIP() << "opt-in: make psnr-full (NIBBLE_PSNR_FULL=1)";
  const int64_t blocks = env_int("NIBBLE_PSNR_BLOCKS", 60), distinct = env_int("NIBBLE_PSNR_DISTINCT", 4);
  const int steps = int(env_int("NIBBLE_PSNR_STEPS", 8));
  const fs::path dir = std::getenv("NIBBLE_PSNR_DIR") ? fs::path(std::getenv("NIBBLE_PSNR_DIR"))
                                                      : fs::temp_directory_path() / "nibble_psnr_full";
  fs::create_directories(dir);
  const double t_start = now_s();
  // ---- the checkpoint
  const std::string full = (dir / ("full_" + std::to_string(blocks) + "_of_" + std::to_string(distinct) +
                                   ".safetensors")).string();
  if (!fs::exists(full)) {
    nn::SynthBlockOptions so;
    so.whole_model = true;
    so.hidden = 3072;
    so.joint_dim = 3584;
    so.blocks = distinct;
    so.rank = 32;
    so.seed = 20261130;
    fs::create_directories(dir / "distinct");
    const nn::SynthBlockFiles files = nn::make_synth_block_files(
        (dir / "distinct").string(), so, [](const std::string& s) { std::printf("psnr-full: %s\n", s.c_str()); });
    std::printf("psnr-full: %lld distinct blocks synthesised in %.0f s, converted in %.0f s\n", (long long)distinct,
                files.synth_seconds, files.convert_seconds);
    const auto src = SafetensorsFile::open(files.quant_path);
    SafetensorsWriter w(full, src->metadata());
    const std::string tb = "transformer_blocks.";
    std::vector<std::pair<std::string, std::string>> items;  // (out name, src name)
    for (const auto& t : src->tensors()) {
      if (t.name.rfind(tb, 0) != 0) {
        items.emplace_back(t.name, t.name);
        continue;
      }
      const size_t dot = t.name.find('.', tb.size());
      const int64_t b = std::atoll(t.name.substr(tb.size(), dot - tb.size()).c_str());
      for (int64_t o = b; o < blocks; o += distinct)
        items.emplace_back(tb + std::to_string(o) + t.name.substr(dot), t.name);
    }
    for (const auto& [o, s] : items) {
      const TensorInfo* ti = src->find(s);
      w.add(o, ti->dtype, ti->shape);
    }
    for (const auto& [o, s] : items) w.write_tensor(o, src->get(s));
    w.commit();
    fs::remove_all(dir / "distinct");
  }
  std::printf("psnr-full: %s (%.1f GiB)\n", full.c_str(), double(fs::file_size(full)) / double(1ull << 30));

  // ---- sampling: both conditionings as one batch of 2 per step
  const Tensor pos = context(32, 20261131), neg = context(32, 20261132);
  const Tensor ctx2 = cat_batch(pos, neg);
  const Tensor latent = Tensor::zeros(DType::F32, {1, 16, 1, 32, 32});
  const Tensor noise = nn::flow_noise(latent.shape(), 20261133);
  nn::SamplerOptions opt;
  opt.steps = steps;
  opt.cfg = 2.5;
  auto sample = [&](bool baseline, double* sec_per_step) {
    nn::QwenImageLoadOptions lo;
    lo.dequantized_baseline = baseline;
    const nn::QwenImageTransformer model = nn::QwenImageTransformer::load(full, lo);
    EXPECT_EQ(model.config().blocks, blocks);
    Tensor cached_neg;
    double cached_sigma = -1;
    nn::QwenImageTimings tm;
    nn::DenoiseFn fn = [&](const Tensor& x, double sigma, bool negative) {
      if (negative && sigma == cached_sigma && cached_neg.defined()) return cached_neg;
      nn::QwenImageInputs in;
      in.latent = cat_batch(x, x);
      in.context = ctx2;
      in.timestep = Tensor::empty(DType::F32, {2});
      in.timestep.mutable_data<float>()[0] = in.timestep.mutable_data<float>()[1] = float(sigma);
      const Tensor y = model.forward(in, &tm);
      cached_neg = batch_row(y, 1);
      cached_sigma = sigma;
      return negative ? cached_neg : batch_row(y, 0);
    };
    double total = 0;
    int n = 0;
    const Tensor y = nn::sample_flow(fn, latent, noise, opt, true, [&](int i, int k, double sec) {
      total += sec;
      ++n;
      std::printf("psnr-full: %s step %d/%d %.1f s\n", baseline ? "baseline" : "nibble", i + 1, k, sec);
      std::fflush(stdout);
    });
    std::printf("psnr-full: %s: linear %.0f s, attention %.0f s, dequantize %.0f s, other %.0f s\n",
                baseline ? "baseline" : "nibble", tm.linear, tm.attention, tm.dequantize, tm.other);
    *sec_per_step = n ? total / n : 0;
    return y;
  };
  double s_nib = 0, s_deq = 0;
  const Tensor y_nib = sample(false, &s_nib);
  const Tensor y_deq = sample(true, &s_deq);
  for (int64_t i = 0; i < y_nib.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(y_nib.data<float>()[i])) << i;
    ASSERT_TRUE(std::isfinite(y_deq.data<float>()[i])) << i;
  }
  const nn::Fidelity f = nn::compare_outputs(y_nib, y_deq);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("psnr-full: %lld blocks (%lld distinct), hidden 3072, 256 image + 32 text tokens, %d steps, cfg 2.5: "
              "PSNR %.2f dB (SNR %.2f dB, max |diff| %.4g); %.1f s/step nibble, %.1f s/step dequantized baseline; "
              "peak RSS %.0f MiB; wall %.0f s\n",
              (long long)blocks, (long long)distinct, steps, f.psnr_db, f.snr_db, f.max_abs, s_nib, s_deq,
              double(ru.ru_maxrss) / 1024.0, now_s() - t_start);
  EXPECT_GE(f.psnr_db, 33.0);
}
