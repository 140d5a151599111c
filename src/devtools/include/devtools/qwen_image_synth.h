// src/devtools/include/devtools/qwen_image_synth.h — what `nibble demo` and `nibble bench --op block` share: a synthetic
// Qwen-Image block checkpoint (synth.h), quantized with the kitchen Qwen-Image-Edit rules by the
// converter (convert.h preset "qwen-image": awq_w4a16 for *_mod.1, svdquant_w4a4 elsewhere,
// act_unsigned on net.2), block inputs, and the fidelity measures.
//
// PSNR is defined over the reference output's peak-to-peak range:
//   PSNR = 10·log10((max(ref) − min(ref))² / mean((out − ref)²)),
// SNR over its energy: SNR = 10·log10(Σ ref² / Σ (out − ref)²).
#pragma once
#include <functional>
#include <string>

#include "nn/qwen_image_block.h"

namespace nibble::nn {

struct SynthBlockOptions {
  int64_t hidden = 3072, mlp_hidden = 0, head_dim = 128;  // mlp_hidden 0 → 4·hidden
  int64_t rank = 32;
  uint64_t seed = 20261123;
  // A whole model (img_in, txt_norm, txt_in, time_text_embed, blocks, norm_out, proj_out) instead
  // of one bare block: the input of `nibble run`, the sampler's end-to-end test and `nibble demo`.
  bool whole_model = false;
  int64_t blocks = 1;       // blocks of the whole model
  int64_t joint_dim = 3584; // context width of the whole model
};
struct SynthBlockFiles {
  std::string float_path, quant_path;
  uint64_t float_file_bytes = 0, quant_file_bytes = 0;
  double synth_seconds = 0, convert_seconds = 0;
};
// Writes `dir`/qwen_block_bf16.safetensors (one block, bf16) and `dir`/qwen_block_nibble.safetensors;
// with whole_model: `dir`/qwen_model_bf16.safetensors and `dir`/qwen_model_nibble.safetensors (the
// converter quantizes the block linears; the top-level layers stay bf16, as in kitchen checkpoints).
SynthBlockFiles make_synth_block_files(const std::string& dir, const SynthBlockOptions& options,
                                       const std::function<void(const std::string&)>& log = {});

// Quantization quality of one synthetic layer (N, K) on M synthetic activation rows (outlier
// channels in weights and activations): output SNR vs the float layer of naive per-group int4
// W4A4 (no smoothing, rank 0), SVDQuant rank R (low-rank only), and SVDQuant rank R with smoothing
// calibrated on M other rows of the same activation stream (out of sample; convert.h quantizers;
// forward through nn::Linear's fused path).
struct QualityVsNaive {
  double naive_snr_db = 0, svdquant_snr_db = 0, svdquant_smooth_snr_db = 0;
};
QualityVsNaive svdquant_quality_vs_naive(int64_t N, int64_t K, int64_t M, int64_t rank, uint64_t seed);

// Seeded inputs: img (S_img, D), txt (S_txt, D) with outlier channels (synth_activations), temb (1, D),
// RoPE cos/sin for the joint positions (txt first; θ = 10000, pairs).
QwenBlockInputs synth_block_inputs(int64_t hidden, int64_t head_dim, int64_t img_tokens, int64_t txt_tokens,
                                   uint64_t seed, bool rope = true);

struct Fidelity {
  double psnr_db = 0, snr_db = 0, max_abs = 0, range = 0;
};
Fidelity compare_outputs(const Tensor& out, const Tensor& ref);
// The same on the block's update: (out − base) vs (ref − base), base = the block input. Stricter
// than the output PSNR, whose range is set by the residual stream's outlier channels.
Fidelity compare_updates(const Tensor& out, const Tensor& ref, const Tensor& base);

}  // namespace nibble::nn
