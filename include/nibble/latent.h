// nibble/latent.h — the files a ComfyUI user has: `.latent` files and conditioning files.
//
// `.latent` (ComfyUI's SaveLatent / LoadLatent, nodes.py): a safetensors file with
//   "latent_tensor"            the samples, (B, C, H, W) or (B, C, T, H, W) (a Qwen-Image KSampler
//                              output is (B, 16, 1, H, W) float32),
//   "latent_format_version_0"  an empty tensor: the version marker. LoadLatent multiplies files
//                              without it by 1/0.18215 (pre-2023 SD1.x files); nibble refuses them.
// The samples are in the VAE's raw latent space (what VAE Encode gives and VAE Decode takes). The
// model works on normalised latents: Qwen-Image uses the Wan 2.1 latent format,
//   process_in(x) = (x − mean[c]) / std[c],  process_out(x) = x · std[c] + mean[c]
// with ComfyUI's 16 per-channel constants (comfy/latent_formats.py, Wan21).
//
// Conditioning (nibble's own file, written by python/nibble/conditioning.py from a ComfyUI
// CONDITIONING): a safetensors file with
//   "context"                  (B, L, joint_dim) or (L, joint_dim) float (Qwen-Image: joint_dim 3584)
//   "attention_mask"           optional (B, L) or (L): integer/bool, nonzero = keep; or float, added
//                              to the attention scores (ComfyUI's two kinds of masks)
//   "reference_latents.<i>"    optional, i = 0, 1, ...: edit models' reference latents (raw space,
//                              like a .latent's samples; ComfyUI's TextEncodeQwenImageEdit output)
// Every reader error names the file and what was expected. Writers are atomic (temp + rename).
//
// Thread safety: Readers and writers are functions of their arguments only; concurrent calls on
// different files are safe (writers are atomic per file: two writers of one path leave one of the
// two complete files).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "nibble/tensor.h"

namespace nibble {

// Reads a `.latent`: fp32 (B, C, [T,] H, W). channels > 0: the expected channel count (dim 1).
Tensor load_latent(const std::string& path, int64_t channels = 16);
// Writes a `.latent` ComfyUI's LoadLatent reads: latent_tensor (fp32, shape kept) + the marker.
void save_latent(const std::string& path, const Tensor& latent);

// Wan 2.1 latent normalisation (dim 1 = 16 channels; any rank ≥ 3); fp32 results.
Tensor latent_process_in(const Tensor& latent);
Tensor latent_process_out(const Tensor& latent);

struct Conditioning {
  Tensor context;                          // fp32 (B, L, joint_dim)
  Tensor attention_mask;                   // (B, L): integer/bool as stored, float as fp32; or undefined
  std::vector<Tensor> reference_latents;   // fp32, raw latent space
};
// joint_dim > 0: the expected context width.
Conditioning load_conditioning(const std::string& path, int64_t joint_dim = 3584);
void save_conditioning(const std::string& path, const Conditioning& cond);

}  // namespace nibble
