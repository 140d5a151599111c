// test_synth.cpp — synthetic weights/activations/checkpoints: determinism, shapes, the promised
// structure (dominant directions, outlier channels), and the checkpoint's names/dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include "nibble/safetensors.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

using namespace nibble;

namespace {
bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}
std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("nibble_test_synth_" + std::to_string(::getpid()) + "_" + name)).string();
}
}  // namespace

TEST(Synth, DeterministicAcrossThreadCounts) {
  set_num_threads(1);
  Tensor a = synth_weight(96, 256, 7), x1 = synth_activations(33, 256, 9);
  set_num_threads(2);
  Tensor b = synth_weight(96, 256, 7), x2 = synth_activations(33, 256, 9);
  set_num_threads(0);
  EXPECT_TRUE(same_bytes(a, b));
  EXPECT_TRUE(same_bytes(x1, x2));
  Tensor c = synth_weight(96, 256, 8);
  EXPECT_FALSE(same_bytes(a, c));
  EXPECT_EQ(a.shape(), (Shape{96, 256}));
  for (int64_t i = 0; i < a.numel(); ++i) ASSERT_TRUE(std::isfinite(a.data<float>()[i]));
}

TEST(Synth, OutlierChannelsAreLarge) {
  SynthActOptions ao;
  const int64_t M = 256, K = 512;
  Tensor x = synth_activations(M, K, 3, ao);
  auto idx = synth_activation_outliers(K, 3, ao);
  ASSERT_EQ(int64_t(idx.size()), ao.n_outlier_channels);
  std::vector<double> rms(K, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) rms[k] += double(x.data<float>()[m * K + k]) * x.data<float>()[m * K + k] / M;
  for (int64_t k : idx) EXPECT_GT(std::sqrt(rms[k]), 5.0 * ao.std) << "channel " << k;
  // Ordinary channels have unit scale (rms within a loose 4σ band of the estimate).
  int ordinary_ok = 0;
  for (int64_t k = 0; k < K; ++k)
    if (std::find(idx.begin(), idx.end(), k) == idx.end() && std::fabs(std::sqrt(rms[k]) - 1.0) < 0.35) ++ordinary_ok;
  EXPECT_EQ(ordinary_ok, K - int64_t(idx.size()));
}

TEST(Synth, WeightHasDominantDirectionsAndOutlierColumns) {
  SynthOptions o;
  o.n_outlier_channels = 0;
  const int64_t N = 128, K = 256;
  Tensor w = synth_weight(N, K, 11, o);
  SynthOptions plain = o;
  plain.n_dominant = 0;
  Tensor n = synth_weight(N, K, 11, plain);
  // The dominant part adds energy well above the noise: ‖W‖² ≫ ‖noise‖².
  double ew = 0, en = 0;
  for (int64_t i = 0; i < w.numel(); ++i) { ew += double(w.data<float>()[i]) * w.data<float>()[i]; en += double(n.data<float>()[i]) * n.data<float>()[i]; }
  EXPECT_GT(ew, 3.0 * en);
  SynthOptions out = plain;
  out.n_outlier_channels = 4;
  Tensor wo = synth_weight(N, K, 11, out);
  int big_cols = 0;
  for (int64_t k = 0; k < K; ++k) {
    double a = 0, b = 0;
    for (int64_t r = 0; r < N; ++r) { a += std::fabs(wo.data<float>()[r * K + k]); b += std::fabs(n.data<float>()[r * K + k]); }
    if (a > 9.0 * b) ++big_cols;
  }
  EXPECT_EQ(big_cols, 4);
}

TEST(Synth, QwenImageCheckpoint) {
  SynthCheckpointOptions o;
  o.blocks = 2;
  o.hidden = 128;
  o.head_dim = 64;
  o.prefix = "model.diffusion_model.";
  const std::string path = tmp_path("ckpt.safetensors");
  const uint64_t size = write_synth_qwen_image_checkpoint(path, o);
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->file_size(), size);
  const auto lin = qwen_image_block_linears(128, 0);
  ASSERT_EQ(lin.size(), 14u);
  for (int b = 0; b < 2; ++b)
    for (const auto& [rel, nk] : lin) {
      const std::string p = "model.diffusion_model.transformer_blocks." + std::to_string(b) + "." + rel;
      const TensorInfo* w = f->find(p + ".weight");
      ASSERT_NE(w, nullptr) << p;
      EXPECT_EQ(w->dtype, DType::BF16);
      EXPECT_EQ(w->shape, (Shape{nk.first, nk.second}));
      ASSERT_NE(f->find(p + ".bias"), nullptr);
    }
  EXPECT_NE(f->find("model.diffusion_model.transformer_blocks.1.attn.norm_added_k.weight"), nullptr);
  EXPECT_NE(f->find("model.diffusion_model.img_in.weight"), nullptr);
  EXPECT_NE(f->find("model.diffusion_model.proj_out.bias"), nullptr);
  // Same options → same bytes.
  const std::string path2 = tmp_path("ckpt2.safetensors");
  write_synth_qwen_image_checkpoint(path2, o);
  auto g = SafetensorsFile::open(path2);
  for (const auto& t : f->tensors()) EXPECT_TRUE(same_bytes(f->get(t.name), g->get(t.name))) << t.name;
  std::filesystem::remove(path);
  std::filesystem::remove(path2);
}
