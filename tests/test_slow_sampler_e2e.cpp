// The seed's end-to-end check at true width (`make test-slow`): a 4-block synthetic Qwen-Image
// model (hidden 3072, MLP 12288, joint 3584, bf16) converted with --preset qwen-image, sampled 8
// steps with CFG 2.5 on a 32×32 latent (256 image tokens) with 32 / 16 text tokens; the final latent
// against the dequantized baseline: PSNR ≥ 33 dB. Needs ~3 GiB of disk in $TMPDIR and ~7 GiB RAM.
#include "test_sampler_e2e_common.h"

TEST(SlowSamplerE2E, TrueWidthPsnrVsDequantizedBaseline) {
  e2e::Setup s;
  s.hidden = 3072;
  s.joint_dim = 3584;
  s.blocks = 4;
  s.rank = 32;
  s.latent_h = s.latent_w = 32;
  s.txt_tokens = 32;
  s.neg_tokens = 16;
  const e2e::Result r = e2e::run(s);
  e2e::check(s, r);
}
