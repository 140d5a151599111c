// The seed's end-to-end check at reduced width (fast, `make test`): a 2-block hidden-256 synthetic
// Qwen-Image model, converted with --preset qwen-image, sampled 8 steps with CFG 2.5; the final
// latent against the dequantized baseline: PSNR ≥ 33 dB. The true-width version (hidden 3072,
// joint 3584, 4 blocks) is test_slow_sampler_e2e.cpp.
#include "test_sampler_e2e_common.h"

TEST(SamplerE2E, ReducedWidthPsnrVsDequantizedBaseline) {
  e2e::Setup s;
  const e2e::Result r = e2e::run(s);
  e2e::check(s, r);
}

TEST(SamplerE2E, Deterministic) {
  e2e::Setup s;
  s.blocks = 1;
  s.steps = 3;
  const e2e::Result a = e2e::run(s), b = e2e::run(s);
  for (int64_t i = 0; i < a.nib.numel(); ++i) ASSERT_EQ(a.nib.data<float>()[i], b.nib.data<float>()[i]) << i;
}
