// nibble/lora.h — LoRA on int4 (and float) models, into a file or at load time.
//
// File formats read: diffusers/PEFT (`X.lora_A.weight` (r, K), `X.lora_B.weight` (N, r)), kohya
// (`X.lora_down.weight`, `X.lora_up.weight`, `X.alpha`, with `lora_unet_` underscore names), ComfyUI's
// saved LoRAs (`diffusion_model.X.lora_down/up.weight` + `.alpha`), old diffusers `X.lora.down/up`;
// module prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`,
// `unet.` are stripped. A LoRA on a fused `attn.to_qkv` / `attn.add_qkv_proj` is split into the
// model's q/k/v (shared down, up rows in thirds). LoCon/LoKr/LoHa/DoRA/full-diff files are refused
// with an error that names the type and lists what is supported.
//
// ΔW = strength · alpha / r · up · down (alpha = r when absent) is applied per layer format:
//  * svdquant_w4a4: appended to the low-rank branch, no requantization — proj_down gains
//    (scale·down)ᵀ as new columns, proj_up gains up; the grown rank is zero-padded to a multiple
//    of 16 (the kitchen's LoRA-up epilogue works in 16-rank tiles; docs/lora.md). Tile-packed
//    proj_up is handled. The one rounding is that of the factors to the layer's 16-bit dtype.
//  * awq_w4a16: W_eff + ΔW requantized with the converter's AWQ quantizer (the added error is
//    reported).
//  * float layers: W + ΔW in the stored dtype.
//
// Thread safety: Parsing and matching are functions of their arguments only. apply_lora() returns
// a new layer and leaves its input untouched, so concurrent calls are safe; Model::load(path,
// loras) is as thread-safe as Model::load(path). `stats`, when given, must not be shared between
// concurrent calls.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nibble/formats.h"
#include "nibble/tensor.h"

namespace nibble {

struct LoraSpec {
  std::string path;
  float strength = 1.0f;
};
// "FILE[:STRENGTH]" (the last ':' followed by a number splits; Windows-style "C:\..." is kept).
LoraSpec parse_lora_spec(const std::string& text);

struct LoraDelta {
  std::string source;  // "file.safetensors: module"
  Tensor down;         // (r, K) F32
  Tensor up;           // (N, r) F32
  float scale = 1.0f;  // strength · alpha / r
};

struct LoraMatch {
  std::map<std::string, std::vector<LoraDelta>> layers;  // model layer name → deltas (in LoRA order)
  std::vector<std::string> unmatched;                     // LoRA modules that match no layer
};
// Parses every LoRA file and matches its modules to `layer_names` (the model's linear names,
// without the checkpoint prefix). Unmatched modules: an error listing them, or (partial) kept in
// `unmatched`. No module matching at all: an error suggesting a LoRA for another architecture.
LoraMatch match_loras(const std::vector<LoraSpec>& loras, const std::vector<std::string>& layer_names,
                      bool partial = false);

struct LoraApplyStats {
  int64_t layers = 0, svdquant_layers = 0, awq_layers = 0, float_layers = 0;
  int64_t max_rank_before = 0, max_rank_after = 0;
  double awq_max_rel_error = 0;  // max over awq layers of ‖W_new − (W_eff + ΔW)‖_F / ‖W_eff + ΔW‖_F
  double awq_max_rel_delta = 0;  // the same error / ‖ΔW‖_F (> 1: the LoRA is below the int4 grid)
  void merge(const LoraApplyStats& o);
};
// Applies deltas to a bound layer (shapes checked: the error names the layer and both shapes).
QuantizedLayer apply_lora(const QuantizedLayer& layer, const std::vector<LoraDelta>& deltas,
                          LoraApplyStats* stats = nullptr);

// `nibble lora CKPT LORA[:S]... -o OUT`: every tensor copied, LoRA'd layers rewritten under their
// source key spellings. Atomic: nothing at OUT on failure.
LoraApplyStats apply_loras_to_checkpoint(const std::string& ckpt, const std::vector<LoraSpec>& loras,
                                         const std::string& out, bool partial = false,
                                         std::vector<std::string>* unmatched = nullptr);

}  // namespace nibble
