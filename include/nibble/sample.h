// nibble/sample.h — a small, seeded, kitchen-style checkpoint for tests, `make demo` and the Python
// tests.
//
// One Qwen-Image-shaped block scaled down to `hidden` (default 256), random but valid tensors (no
// quantizer is involved; codes and scales are drawn directly):
//   transformer_blocks.0.img_mod.1                       awq_w4a16 (6D × D, G=64, key `weight_zero`)
//   transformer_blocks.0.attn.to_q|to_k|to_v            svdquant_w4a4 natural, shared smooth_factor /
//                                                        proj_down (keys `smooth_factor`, `proj_*`)
//   transformer_blocks.0.attn.to_out.0                  svdquant_w4a4 natural (keys `weight_smooth_factor`,
//                                                        `weight_proj_*`)
//   transformer_blocks.0.img_mlp.net.0.proj             svdquant_w4a4 tile-packed (4D × D)
//   transformer_blocks.0.img_mlp.net.2                  svdquant_w4a4 natural, act_unsigned (D × 4D)
//   transformer_blocks.0.txt_mod.1                      bf16 (an awq_w4a16 candidate)
//   transformer_blocks.0.attn.add_q_proj                fp16 (an svdquant_w4a4 candidate)
//   img_in                                              fp32 linear (D × 64)
//   extra.<format>                                      one layer of every other kitchen format
//   transformer_blocks.0.attn.norm_q.weight, rope.freqs non-linear tensors
// Every linear has a bias. Names get `prefix` prepended (e.g. "model.diffusion_model.").
//
// Thread safety: write_sample_checkpoint() has no shared state; concurrent calls must write to
// different paths.
#pragma once
#include <cstdint>
#include <string>

namespace nibble {

struct SampleOptions {
  uint64_t seed = 20261123;
  int64_t hidden = 256;              // D; a positive multiple of 128
  int64_t rank = 16;                 // svdquant low-rank R
  std::string prefix;                // prepended to every tensor name
  bool configs_in_metadata = false;  // configs in __metadata__["_quantization_metadata"] instead of
                                     // `<layer>.comfy_quant` tensors
};

// Writes the checkpoint to `path` (atomically). Throws nibble::Error.
void write_sample_checkpoint(const std::string& path, const SampleOptions& options = {});

}  // namespace nibble
