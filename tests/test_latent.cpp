// ComfyUI `.latent` files, conditioning files and the Wan 2.1 latent normalisation (latent.h).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "nibble/latent.h"
#include "nibble/safetensors.h"

#include "tmp_dir.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

struct TmpDir : testing_tmp::TmpDir {
  TmpDir() : testing_tmp::TmpDir("latent") {}
};

Tensor seq(const Shape& s, DType dt = DType::F32) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = 0.25f * float(i % 13) - 1.0f;
  return dt == DType::F32 ? t : t.to(dt);
}

template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}
bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

}  // namespace

TEST(Latent, RoundTripWithMarker) {
  TmpDir d;
  const Tensor x = seq({1, 16, 1, 6, 8});
  save_latent(d / "a.latent", x);
  // What ComfyUI's LoadLatent looks for: latent_tensor + the empty version marker.
  const auto f = SafetensorsFile::open(d / "a.latent");
  ASSERT_TRUE(f->contains("latent_tensor"));
  ASSERT_TRUE(f->contains("latent_format_version_0"));
  EXPECT_EQ(f->find("latent_format_version_0")->shape, (Shape{0}));
  EXPECT_EQ(f->find("latent_tensor")->dtype, DType::F32);
  const Tensor y = load_latent(d / "a.latent");
  ASSERT_EQ(y.shape(), x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(y.data<float>()[i], x.data<float>()[i]);
  // 4-D (EmptySD3LatentImage before ComfyUI adds the frame axis) and bf16 files are read too.
  save_safetensors(d / "b.latent", {{"latent_tensor", seq({2, 16, 4, 4}, DType::BF16)},
                                    {"latent_format_version_0", Tensor::empty(DType::F32, {0})}});
  const Tensor z = load_latent(d / "b.latent");
  EXPECT_EQ(z.shape(), (Shape{2, 16, 4, 4}));
  EXPECT_EQ(z.dtype(), DType::F32);
}

TEST(Latent, BadFilesNameTheFileAndWhatWasExpected) {
  TmpDir d;
  save_safetensors(d / "old.latent", {{"latent_tensor", seq({1, 4, 8, 8})}});
  std::string e = error_of([&] { load_latent(d / "old.latent"); });
  EXPECT_TRUE(has(e, "old.latent") && has(e, "latent_format_version_0") && has(e, "0.18215")) << e;

  save_safetensors(d / "four.latent", {{"latent_tensor", seq({1, 4, 8, 8})},
                                       {"latent_format_version_0", Tensor::empty(DType::F32, {0})}});
  e = error_of([&] { load_latent(d / "four.latent"); });
  EXPECT_TRUE(has(e, "four.latent") && has(e, "expected 16 latent channels") && has(e, "got 4")) << e;

  save_safetensors(d / "x.safetensors", {{"samples", seq({1, 16, 8, 8})}});
  e = error_of([&] { load_latent(d / "x.safetensors"); });
  EXPECT_TRUE(has(e, "x.safetensors") && has(e, "latent_tensor") && has(e, "samples")) << e;

  save_safetensors(d / "rank.latent", {{"latent_tensor", seq({16, 8, 8})},
                                       {"latent_format_version_0", Tensor::empty(DType::F32, {0})}});
  e = error_of([&] { load_latent(d / "rank.latent"); });
  EXPECT_TRUE(has(e, "rank.latent") && has(e, "(B, C, H, W)")) << e;

  e = error_of([&] { load_latent(d / "missing.latent"); });
  EXPECT_TRUE(has(e, "missing.latent")) << e;
}

TEST(Latent, Wan21Normalisation) {
  Tensor x = Tensor::zeros(DType::F32, {1, 16, 1, 1, 2});
  const Tensor y = latent_process_in(x);
  // ComfyUI Wan21: (0 − mean[0]) / std[0] = 0.7571 / 2.8184; channel 15: 0.2921 / 1.9160.
  EXPECT_FLOAT_EQ(y.data<float>()[0], 0.7571f / 2.8184f);
  EXPECT_FLOAT_EQ(y.data<float>()[31], 0.2921f / 1.9160f);
  const Tensor r = seq({2, 16, 3, 5});
  const Tensor back = latent_process_out(latent_process_in(r));
  for (int64_t i = 0; i < r.numel(); ++i) ASSERT_NEAR(back.data<float>()[i], r.data<float>()[i], 1e-6);
}

TEST(Conditioning, RoundTripAndShapes) {
  TmpDir d;
  Conditioning c;
  c.context = seq({1, 5, 64}, DType::BF16);
  Tensor m = Tensor::empty(DType::I64, {1, 5});
  for (int i = 0; i < 5; ++i) m.mutable_data<int64_t>()[i] = i < 3 ? 1 : 0;
  c.attention_mask = m;
  c.reference_latents = {seq({1, 16, 1, 4, 4}), seq({1, 16, 2, 2})};
  save_conditioning(d / "c.safetensors", c);
  const Conditioning r = load_conditioning(d / "c.safetensors", 64);
  EXPECT_EQ(r.context.shape(), (Shape{1, 5, 64}));
  EXPECT_EQ(r.context.dtype(), DType::F32);
  ASSERT_TRUE(r.attention_mask.defined());
  EXPECT_EQ(r.attention_mask.shape(), (Shape{1, 5}));
  ASSERT_EQ(r.attention_mask.dtype(), DType::I64);  // integer masks keep their dtype (nonzero = keep)
  for (int i = 0; i < 5; ++i) EXPECT_EQ(r.attention_mask.data<int64_t>()[i], i < 3 ? 1 : 0);
  // A float mask is additive (ComfyUI): read as fp32, values kept.
  save_safetensors(d / "f.safetensors", {{"context", seq({1, 5, 64})}, {"attention_mask", seq({5}, DType::BF16)}});
  const Conditioning fm = load_conditioning(d / "f.safetensors", 64);
  ASSERT_EQ(fm.attention_mask.dtype(), DType::F32);
  EXPECT_EQ(fm.attention_mask.shape(), (Shape{1, 5}));
  EXPECT_EQ(fm.attention_mask.data<float>()[1], -0.75f);
  ASSERT_EQ(r.reference_latents.size(), 2u);
  EXPECT_EQ(r.reference_latents[1].shape(), (Shape{1, 16, 2, 2}));
  // 2-D context is (L, D) of one batch.
  save_safetensors(d / "l.safetensors", {{"context", seq({7, 64})}});
  EXPECT_EQ(load_conditioning(d / "l.safetensors", 64).context.shape(), (Shape{1, 7, 64}));
}

TEST(Conditioning, BadFiles) {
  TmpDir d;
  save_safetensors(d / "w.safetensors", {{"context", seq({1, 5, 4096})}});
  std::string e = error_of([&] { load_conditioning(d / "w.safetensors", 3584); });
  EXPECT_TRUE(has(e, "w.safetensors") && has(e, "expected width 3584") && has(e, "got 4096")) << e;
  save_safetensors(d / "n.safetensors", {{"cond", seq({1, 5, 64})}});
  e = error_of([&] { load_conditioning(d / "n.safetensors", 64); });
  EXPECT_TRUE(has(e, "n.safetensors") && has(e, "'context'")) << e;
  save_safetensors(d / "m.safetensors", {{"context", seq({1, 5, 64})}, {"attention_mask", seq({1, 4})}});
  e = error_of([&] { load_conditioning(d / "m.safetensors", 64); });
  EXPECT_TRUE(has(e, "m.safetensors") && has(e, "attention_mask") && has(e, "(1, 5)")) << e;
  save_safetensors(d / "r.safetensors", {{"context", seq({1, 5, 64})}, {"reference_latents.1", seq({1, 16, 2, 2})}});
  e = error_of([&] { load_conditioning(d / "r.safetensors", 64); });
  EXPECT_TRUE(has(e, "r.safetensors") && has(e, "reference_latents.0")) << e;
  save_safetensors(d / "i.safetensors", {{"context", Tensor::zeros(DType::I32, {1, 5, 64})}});
  e = error_of([&] { load_conditioning(d / "i.safetensors", 64); });
  EXPECT_TRUE(has(e, "i.safetensors") && has(e, "float")) << e;
}
