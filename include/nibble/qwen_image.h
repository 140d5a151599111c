// nibble/qwen_image.h — the whole Qwen-Image(-Edit) transformer and its flow-matching sampler.
//
// CONTRACT between the model (src/nn/qwen_image_model.cpp) and the sampler / CLI / latent I/O
// (src/nn/sampler.cpp, src/io/latent.cpp, tools/cmd_forward.cpp, tools/cmd_run.cpp). The
// declarations below are the agreed interface; implementations may add members but must not change
// these signatures without updating every caller.
//
// Semantics follow ComfyUI's QwenImageTransformer2DModel (comfy/ldm/qwen_image/model.py):
//   latent (B, C=16, T, H, W) or (B, 16, H, W)  → patchify 2×2 (padding H, W to even) → img_in
//   context (B, L, joint_dim=3584) → txt_norm (RMSNorm) → txt_in
//   timestep (B): the value ComfyUI passes to the diffusion model (for Qwen-Image: sigma, in [0, 1];
//   the model scales it by 1000 inside its sinusoidal embedding)
//   → N dual-stream blocks (nn::QwenImageBlock, one implementation) → norm_out + proj_out → unpatchify
//   output: the model's prediction (flow velocity), same shape as `latent`, fp32.
//
// Thread safety: A loaded QwenImageTransformer is immutable after load (its layers are
// nn::Linear), so forward() may run concurrently from several threads; the parallel regions of
// concurrent calls take turns on the library pool.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "nibble/latent.h"
#include "nibble/nn.h"
#include "nibble/tensor.h"

namespace nibble::nn {

struct QwenImageConfig {
  int64_t in_channels = 64;    // img_in input width (latent channels · patch²)
  int64_t out_channels = 16;   // latent channels of the prediction
  int64_t patch = 2;
  int64_t hidden = 3072;       // heads · head_dim
  int64_t heads = 24;
  int64_t head_dim = 128;
  int64_t mlp_hidden = 12288;
  int64_t joint_dim = 3584;    // context width
  int64_t blocks = 60;
  std::vector<int64_t> axes_dim{16, 56, 56};  // RoPE axes (sum = head_dim)
  double theta = 10000.0;
  bool addition_t_embedding = false;  // checkpoint carries time_text_embed.addition_t_embedding
  bool index_timestep_zero = false;   // checkpoint carries __index_timestep_zero__
};

struct QwenImageInputs {
  Tensor latent;                    // (B, 16, T, H, W) or (B, 16, H, W), any float dtype
  Tensor context;                   // (B, L, joint_dim)
  // optional (B, L) or (L): integer/bool: nonzero = keep, 0 = masked (ComfyUI: (m − 1)·FLT_MAX);
  // floating point: added to the attention scores of those text keys as is (ComfyUI's float masks).
  Tensor attention_mask;
  Tensor timestep;                  // (B) or scalar, fp32
  std::vector<Tensor> ref_latents;  // edit models: each (B, 16, [T,] H', W')
};

struct QwenImageTimings {  // seconds accumulated by forward()
  double linear = 0, attention = 0, other = 0, total = 0;
  double dequantize = 0;  // the dequantized baseline decoding its blocks per call (not in `other`)
};

struct QwenImageLoadOptions {
  bool dequantized_baseline = false;  // every quantized linear replaced by its dequantized float layer
  // With dequantized_baseline: when the blocks are dequantized to fp32. 0 = all at load (fast, 4 bytes
  // per weight plus fp32 panels), 1 = each block just before it runs, dropped after it (one block's
  // fp32 weights resident: a 60-block model fits in RAM; costs a decode per block and call),
  // -1 = per block when the at-load copies would exceed half the physical memory.
  int dequantize_per_block = -1;
  int64_t head_dim = 128;  // used when the checkpoint has no attn.norm_q.weight to read it from
  // RoPE axes (sum = head_dim). Empty: (16, 56, 56) for head_dim 128, else scaled the same way
  // (head_dim/8, 7·head_dim/16, 7·head_dim/16), which needs head_dim % 32 == 0.
  std::vector<int64_t> axes_dim;
  // Float (bf16/f16/f32) linears: packed fp32 panels at the first forward (fast, 2x a bf16 model's
  // bytes) or streamed from the mmap in blocks of rows (Linear::streamed(): a model larger than RAM
  // runs, slowly). -1 = stream when the packed panels would exceed half the physical memory.
  int stream_float_weights = -1;
  // Joint attention: "auto" (bf16 vdpbf16ps flash kernel on AVX-512 BF16, else fp32), "fp32", "bf16".
  std::string attention = "auto";
};

class QwenImageTransformer {
 public:
  // Opens a file / index / shard dir (prefix "model.diffusion_model." or none); the configuration
  // is read from the checkpoint itself. Errors name the file and what is missing or mis-shaped.
  static QwenImageTransformer load(const std::string& path, const QwenImageLoadOptions& opt = {});
  static QwenImageTransformer from_model(const Model& model, const QwenImageLoadOptions& opt = {});

  // One raw model call: the prediction, same shape as in.latent, fp32.
  Tensor forward(const QwenImageInputs& in, QwenImageTimings* timings = nullptr) const;

  const QwenImageConfig& config() const;
  uint64_t stored_bytes() const;  // bytes of the weights as stored in the checkpoint
  uint64_t block_stored_bytes() const;  // of the transformer blocks only (the repeated part)
  std::string attention_path() const;  // "fp32 (panel GEMM)" or "bf16 vdpbf16ps flash"

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

// ---- flow-matching sampling (ComfyUI's Qwen-Image model sampling: discrete flow, shift)
// What ComfyUI does for a Qwen-Image model (see docs/sampling.md for the sources):
//   sigma(t) = shift·t / (1 + (shift − 1)·t) on a table t = i/T, i = 1..T (ModelSamplingAuraFlow:
//   T = 1000, the node's shift; without a ModelSampling node the model's own ModelSamplingFlux:
//   T = 10000, exp(1.15)·t / (exp(1.15)·t + 1 − t), i.e. the same curve with shift e^1.15 ≈ 3.158);
//   the model is called with timestep = sigma; Euler: x ← x + v·(σ_{i+1} − σ_i) with
//   v = v_neg + cfg·(v_pos − v_neg) (ComfyUI applies cfg to x − σ·v, which is the same affine map).
struct SamplerOptions {
  int steps = 20;
  double cfg = 1.0;      // classifier-free guidance scale (used when a negative is given; 1 → one call)
  double shift = 3.1;    // ComfyUI's ModelSamplingAuraFlow default in its Qwen-Image workflow template
  double denoise = 1.0;  // < 1: the last steps of a schedule of int(steps/denoise) steps (img2img)
  std::string scheduler = "simple";  // "simple" (ComfyUI's default in Qwen workflows) | "normal"
  bool model_sampling_default = false;  // true: no ModelSampling node (ModelSamplingFlux, shift 1.15
                                        // as mu, 10000-entry table); `shift` is then ignored
};
// The model as the sampler sees it: prediction for latent x at sigma, for one conditioning.
using DenoiseFn = std::function<Tensor(const Tensor& x, double sigma, bool negative)>;
// The model as a DenoiseFn: pos (negative = false) or neg conditioning — context, attention mask,
// reference latents — and timestep = sigma for every batch row. model, pos, neg and timings are
// held by reference: they must outlive the returned function.
DenoiseFn qwen_image_denoiser(const QwenImageTransformer& model, const Conditioning& pos, const Conditioning& neg,
                              QwenImageTimings* timings = nullptr);
// Called after every step with (step index from 0, steps, seconds of that step).
using StepCallback = std::function<void(int, int, double)>;

// The sigma schedule ComfyUI's KSampler computes (float32 values, as torch computes them): steps+1
// values from sigma_max (1.0 at denoise 1) down to 0. Empty when denoise ≤ 0. Throws on bad
// options (steps < 1, unknown scheduler, shift ≤ 0, denoise > 1).
std::vector<float> flow_sigmas(const SamplerOptions& options);

// Standard normal noise of `shape` from nibble's own counter-based generator (splitmix64 +
// Box-Muller): a pure function of (seed, element index), identical for any thread count. ComfyUI
// draws its noise with torch.randn on a CPU torch.Generator; that stream is not reproduced, so the
// same seed gives a different (equally distributed) noise than ComfyUI.
Tensor flow_noise(const Shape& shape, uint64_t seed);

// Euler over `sigmas` in the model's latent space, starting from x (already noise-scaled).
// negative: also call the model with negative = true and combine with cfg (skipped when cfg == 1,
// as ComfyUI does). Returns fp32 of x's shape.
Tensor sample_euler(const DenoiseFn& model, const Tensor& x, const std::vector<float>& sigmas, double cfg,
                    bool negative, const StepCallback& on_step = {});

// ComfyUI's KSampler for a Qwen-Image model, in the space of `.latent` files: latent (B, 16, [T,]
// H, W) — zeros for an empty latent (not normalised, as ComfyUI skips an all-zero latent) — is
// normalised with the Wan 2.1 latent format (latent.h), noised as σ0·noise + (1 − σ0)·latent,
// sampled with sample_euler, and the result de-normalised. noise: the latent's shape.
Tensor sample_flow(const DenoiseFn& model, const Tensor& latent, const Tensor& noise, const SamplerOptions& options,
                   bool negative, const StepCallback& on_step = {});

}  // namespace nibble::nn
