// The seed's end-to-end check, shared by test_sampler_e2e.cpp (reduced width, `make test`) and
// test_slow_sampler_e2e.cpp (true width 3072 / joint 3584, 4 blocks, `make test-slow`):
// a synthetic bf16 Qwen-Image model → the converter with --preset qwen-image → sample ≥ 8 steps
// with CFG (negative conditioning) → compare the final latent with the same run on the
// dequantized baseline (every quantized layer replaced by its dequantized float layer).
// PSNR is nn::compare_outputs': 10·log10((max(ref) − min(ref))² / MSE) on the final latent in the
// .latent space (what VAE Decode receives).
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/synth.h"
#include "devtools/qwen_image_synth.h"
#include "devtools/scratch_dir.h"

namespace e2e {
using namespace nibble;
namespace fs = std::filesystem;

struct Setup {
  int64_t hidden = 256, mlp_hidden = 0, joint_dim = 64, blocks = 2, rank = 16;
  int64_t latent_h = 8, latent_w = 8, txt_tokens = 8, neg_tokens = 5;
  int steps = 8;
  double cfg = 2.5;
  uint64_t seed = 20261130;
};

struct Result {
  Tensor nib, deq;
  nn::Fidelity fid;
  double sec_per_step_nib = 0, sec_per_step_deq = 0;
  nn::QwenImageConfig config;
};

inline Tensor context(int64_t L, int64_t J, uint64_t seed) {
  SynthActOptions a;
  a.n_outlier_channels = 4;
  a.outlier_min = 5.0f;
  a.outlier_max = 20.0f;
  return synth_activations(L, J, seed, a).reshape({1, L, J});
}

inline Result run(const Setup& s) {
  const bench::ScratchDir scratch("e2e_" + std::to_string(s.hidden));
  const fs::path dir = scratch.path;
  nn::SynthBlockOptions so;
  so.whole_model = true;
  so.hidden = s.hidden;
  so.mlp_hidden = s.mlp_hidden;
  so.joint_dim = s.joint_dim;
  so.blocks = s.blocks;
  so.rank = s.rank;
  so.seed = s.seed;
  const nn::SynthBlockFiles files = nn::make_synth_block_files(dir.string(), so);

  Result r;
  const Conditioning pos{context(s.txt_tokens, s.joint_dim, s.seed + 1), {}, {}};
  const Conditioning neg{context(s.neg_tokens, s.joint_dim, s.seed + 2), {}, {}};
  const Tensor latent = Tensor::zeros(DType::F32, {1, 16, 1, s.latent_h, s.latent_w});
  const Tensor noise = nn::flow_noise(latent.shape(), s.seed + 3);
  nn::SamplerOptions opt;
  opt.steps = s.steps;
  opt.cfg = s.cfg;
  auto sample = [&](bool baseline, double* sec_per_step) {
    nn::QwenImageLoadOptions lo;
    lo.dequantized_baseline = baseline;
    const nn::QwenImageTransformer model = nn::QwenImageTransformer::load(files.quant_path, lo);
    r.config = model.config();
    const nn::DenoiseFn fn = nn::qwen_image_denoiser(model, pos, neg);
    double total = 0;
    int n = 0;
    const Tensor y = nn::sample_flow(fn, latent, noise, opt, true, [&](int, int, double sec) {
      total += sec;
      ++n;
    });
    *sec_per_step = n ? total / n : 0;
    return y;
  };
  r.nib = sample(false, &r.sec_per_step_nib);
  r.deq = sample(true, &r.sec_per_step_deq);
  r.fid = nn::compare_outputs(r.nib, r.deq);
  return r;
}

inline void check(const Setup& s, const Result& r) {
  EXPECT_EQ(r.config.blocks, s.blocks);
  EXPECT_EQ(r.config.hidden, s.hidden);
  EXPECT_EQ(r.config.joint_dim, s.joint_dim);
  ASSERT_EQ(r.nib.shape(), (Shape{1, 16, 1, s.latent_h, s.latent_w}));
  ASSERT_EQ(r.deq.shape(), r.nib.shape());
  double var = 0, mean = 0;
  for (int64_t i = 0; i < r.nib.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(r.nib.data<float>()[i])) << i;
    ASSERT_TRUE(std::isfinite(r.deq.data<float>()[i])) << i;
    mean += r.deq.data<float>()[i];
  }
  mean /= double(r.deq.numel());
  for (int64_t i = 0; i < r.deq.numel(); ++i) var += std::pow(r.deq.data<float>()[i] - mean, 2);
  EXPECT_GT(var, 0.0) << "the baseline latent is constant: the check would be vacuous";
  std::printf("e2e: hidden %lld, %lld blocks, %d steps, cfg %.1f: PSNR %.2f dB (SNR %.2f dB, max |diff| %.4g, range "
              "%.4g); %.3f s/step nibble, %.3f s/step dequantized\n",
              (long long)s.hidden, (long long)s.blocks, s.steps, s.cfg, r.fid.psnr_db, r.fid.snr_db, r.fid.max_abs,
              r.fid.range, r.sec_per_step_nib, r.sec_per_step_deq);
  EXPECT_GE(r.fid.psnr_db, 33.0) << "nibble vs the dequantized baseline, final latent";
}

}  // namespace e2e
