// nibble/synth.h — seeded synthetic weights, activations and checkpoints that look like real ones.
//
// Real diffusion-transformer linears are not white noise: a few dominant singular directions carry a
// large part of the energy (what SVDQuant's low-rank branch captures), and a handful of input
// channels are outliers 10–50× larger than the rest (what smoothing and the low-rank branch are
// for). Activations have outlier channels too. The generators below reproduce those features so
// the converter's quality tests and the runtime's demo see realistic inputs without real weights.
//
// Everything is a pure function of (shape, seed, options): rows are generated from per-row seeds,
// so results are bit-identical for any thread count and across runs.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "nibble/dtype.h"
#include "nibble/tensor.h"

namespace nibble {

struct SynthOptions {
  float std = 0.0f;                 // noise std; 0 → 1/sqrt(K) (keeps y = x·Wᵀ of order |x|)
  int64_t n_dominant = 8;           // dominant singular directions (0 = none)
  float dominant_gain = 12.0f;      // largest dominant singular value, in units of the noise's
                                    // typical singular value std·sqrt(max(N,K)); decays geometrically
  int64_t n_outlier_channels = 6;   // input channels (columns) scaled up
  float outlier_min = 10.0f, outlier_max = 50.0f;  // scale range of those channels
};

// W (N, K) F32.
Tensor synth_weight(int64_t N, int64_t K, uint64_t seed, const SynthOptions& options = {});
// bias (N) F32, small values (std 0.02).
Tensor synth_bias(int64_t N, uint64_t seed);

struct SynthActOptions {
  float std = 1.0f;                 // std of ordinary channels
  int64_t n_outlier_channels = 6;   // channels with a large scale
  float outlier_min = 10.0f, outlier_max = 50.0f;
  bool post_gelu = false;           // apply GELU(tanh) (fc2 inputs: mostly ≥ −0.17, act_unsigned)
};
// x (M, K) F32. The outlier channels are chosen from `seed` (pass the same seed for the same
// "layer input" across calls with different M).
Tensor synth_activations(int64_t M, int64_t K, uint64_t seed, const SynthActOptions& options = {});
// The outlier channel indices synth_activations uses for (K, seed, options), sorted.
std::vector<int64_t> synth_activation_outliers(int64_t K, uint64_t seed, const SynthActOptions& options = {});

// ---- a synthetic Qwen-Image transformer checkpoint (names of spec §7, all bf16 by default)
struct SynthCheckpointOptions {
  int64_t blocks = 1;               // transformer_blocks.{0..blocks-1}
  int64_t hidden = 3072;            // D (multiple of head_dim and of 64)
  int64_t mlp_hidden = 0;           // 0 → 4·D
  int64_t head_dim = 128;           // RMSNorm width of attn.norm_q/k…
  int64_t joint_dim = 0;            // txt_in input width; 0 → D (real model: 3584)
  int64_t in_channels = 64;         // img_in input / proj_out output
  bool top_level = true;            // also write img_in, txt_norm, txt_in, time_text_embed, norm_out, proj_out
  DType dtype = DType::BF16;        // BF16 | F16 | F32
  uint64_t seed = 20261123;
  std::string prefix;               // prepended to every name (e.g. "model.diffusion_model.")
  SynthOptions weight;              // shape of every linear's weight
};

// The 14 linears of one Qwen-Image block: (name relative to "transformer_blocks.i.", N, K).
std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> qwen_image_block_linears(
    int64_t hidden, int64_t mlp_hidden);

// Writes the checkpoint to `path` atomically, one tensor at a time (memory ~ the largest tensor).
// Every linear has a bias. Returns the file size in bytes.
uint64_t write_synth_qwen_image_checkpoint(const std::string& path, const SynthCheckpointOptions& options = {});

}  // namespace nibble
