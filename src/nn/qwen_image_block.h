// src/nn/qwen_image_block.h — one Qwen-Image dual-stream transformer block (spec §7) in fp32
// around nn::Linear layers (quantized, float, or dequantized).
//
// Order (ComfyUI comfy/ldm/qwen_image/model.py, QwenImageTransformerBlock.forward):
//   mod = {img,txt}_mod.1(SiLU(temb)), rows of 6·D = [shift1, scale1, gate1, shift2, scale2, gate2]
//   x̂ = LayerNorm(x) (no affine, eps 1e-6) · (1 + scale1) + shift1          (both streams)
//   q,k,v = to_q/k/v(x̂_img), add_q/k/v_proj(x̂_txt); RMSNorm per head (norm_q/k, norm_added_q/k,
//   learnable weight, eps 1e-6); joint sequence = [txt ; img]; optional RoPE (cos/sin per joint
//   position and pair, pairs (2i, 2i+1)); softmax(q·kᵀ/√hd)·v per head
//   img += gate1 · to_out.0(o_img);  txt += gate1 · to_add_out(o_txt)
//   x += gate2 · net.2(GELU_tanh(net.0.proj(LayerNorm(x) · (1 + scale2) + shift2)))   (both streams)
// The joint attention packs K and Vᵀ of a head once and runs the panel GEMM of linear_f32 on
// blocks of 64 queries; tasks are (batch, head) pairs, so results do not depend on thread count.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nn/attention.h"

namespace nibble::nn {

struct QwenBlockConfig {
  int64_t hidden = 3072;      // D
  int64_t heads = 24;
  int64_t head_dim = 128;     // D = heads · head_dim
  int64_t mlp_hidden = 12288;
  float eps = 1e-6f;          // LayerNorm and RMSNorm
};

struct QwenBlockInputs {
  Tensor img;       // (B, S_img, D) or (S_img, D)
  Tensor txt;       // (B, S_txt, D) or (S_txt, D)
  Tensor temb;      // (B, D) or (D)
  Tensor rope_cos;  // optional (S_txt + S_img, head_dim/2), joint order (txt first)
  Tensor rope_sin;  // same shape as rope_cos
  // Optional (B, S_txt) fp32 bias added to the attention scores (after the 1/√hd scaling) of every
  // query against text key j: ComfyUI's text attention mask (0 = keep, −inf / −FLT_MAX = masked).
  Tensor txt_key_bias;
  // Edit models with `index_timestep_zero`: image rows >= img_zero_from (the reference tokens) take
  // their img_mod modulation (shift, scale, gate) from temb_zero (B, D) instead of temb. -1 = off.
  Tensor temb_zero;
  int64_t img_zero_from = -1;
};
struct QwenBlockOutputs {
  Tensor img, txt;  // fp32, shapes of the inputs
};
struct QwenBlockTimings {  // seconds, accumulated by forward()
  double modulation = 0, norms = 0, qkv = 0, attention = 0, out_proj = 0, mlp = 0, total = 0;
  // Across the phases: time inside the 14 linears, and inside the attention kernel proper
  // (scores, softmax, ·V; not the q/k RMSNorm and RoPE).
  double linear = 0, attention_core = 0;
};

class QwenImageBlock {
 public:
  // Relative names of the 14 linears of a block.
  static const std::vector<std::string>& linear_names();
  static const std::vector<std::string>& norm_names();  // attn.norm_q.weight, ...

  // From a loaded model, block prefix e.g. "transformer_blocks.0". Widths are read from the
  // layers (head_dim defaults to 128); every mismatch is an error naming the layer.
  static QwenImageBlock from_model(const Model& model, const std::string& block_prefix, int64_t head_dim = 128);
  // From explicit layers keyed by relative name; missing norm weights mean ones.
  static QwenImageBlock from_linears(std::map<std::string, Linear> linears, std::map<std::string, Tensor> norms,
                                     int64_t head_dim = 128);

  // The same block with every linear replaced by its dequantized fp32 equivalent.
  QwenImageBlock dequantized() const;
  // The same block with its float / row-separable layers on the streamed path (Linear::streamed()).
  QwenImageBlock streamed() const;
  QwenBlockOutputs forward(const QwenBlockInputs& in, QwenBlockTimings* timings = nullptr) const;
  // The same, updating in.img and in.txt in place (both fp32 and writable: the caller's working
  // tensors, as the whole model passes them); no copies of the streams.
  void forward_inplace(QwenBlockInputs& in, QwenBlockTimings* timings = nullptr) const;

  // Attention path (nn/attention.h); default Fp32. Auto picks bf16 vdpbf16ps where available.
  QwenImageBlock with_attention(AttentionPrecision p) const {
    QwenImageBlock b = *this;
    b.attention_ = p;
    return b;
  }
  AttentionPrecision attention() const { return attention_; }

  const QwenBlockConfig& config() const { return cfg_; }
  const Linear& linear(const std::string& rel_name) const;
  const Tensor& norm_weight(const std::string& rel_name) const;  // fp32 (head_dim)
  uint64_t stored_bytes() const;  // stored bytes of the 14 linears
  void prepare_dense() const;     // pack dense weights now (before timing)

 private:
  QwenBlockConfig cfg_;
  std::map<std::string, Linear> lin_;
  std::map<std::string, Tensor> norms_;
  AttentionPrecision attention_ = AttentionPrecision::Fp32;
};

}  // namespace nibble::nn
