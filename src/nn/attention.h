// src/nn/attention.h — the joint attention of the Qwen-Image block, over batches and heads.
//
// o (B, S, D) = softmax(q·kᵀ/√hd + bias)·v for every (batch, head); q/k/v/o (B, S, D) fp32, heads
// are column slices of hd. `key_bias` (optional, (B, n_bias)) is added to the scaled scores of
// keys [0, n_bias) — the text keys of the joint sequence (ComfyUI's text attention mask).
// Paths: Fp32 (K and Vᵀ of a head packed once, the linear_f32 panel GEMM on blocks of 64 queries,
// fp32 softmax); Bf16 (flash-style vdpbf16ps kernel, kernels/attention_kernels.h) on AVX-512 BF16.
// Both hold O(S·hd) scratch per thread; neither materialises S×S scores. Tasks are (batch, head)
// pairs, so results do not depend on the thread count.
#pragma once
#include <cstdint>

namespace nibble::nn {

enum class AttentionPrecision { Auto, Fp32, Bf16 };
// Auto → Bf16 when the active ISA has AVX-512 BF16 and head_dim allows, else Fp32.
AttentionPrecision resolve_attention(AttentionPrecision p, int64_t head_dim);
const char* attention_name(AttentionPrecision p);

void joint_attention(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t D, int64_t hd,
                     const float* key_bias, int64_t n_bias, float* o, AttentionPrecision p);
// Scalar reference in fp64 (tests): same contract.
void joint_attention_ref(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t D, int64_t hd,
                         const float* key_bias, int64_t n_bias, float* o);

}  // namespace nibble::nn
