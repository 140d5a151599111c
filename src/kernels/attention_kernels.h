// src/kernels/attention_kernels.h — attention of one head (the joint attention of the Qwen-Image
// block; nn/attention.h drives it over batches and heads).
#pragma once
#include <cstdint>

namespace nibble::kernels::attention {

// AVX-512 BF16 (vdpbf16ps) flash attention of one head: q, k, v are rows of hd fp32 values with
// row stride `ld` (S rows each), o rows with stride `ldo`. Q, K, V and the softmax weights P are
// rounded to bf16 (RNE); scores, the online softmax (running max and sum) and P·V accumulate in
// fp32. `bias` (may be null) is added to the scaled scores of keys [0, n_bias). Key blocks of 32,
// query blocks of 8; scratch is O(S·hd) per thread, never S×S. Needs flash_head_bf16_supported(hd).
bool flash_head_bf16_supported(int64_t hd);
void flash_head_bf16(const float* q, const float* k, const float* v, int64_t ld, int64_t S, int64_t hd,
                     const float* bias, int64_t n_bias, float scale, float* o, int64_t ldo);
// The vdpbf16ps peak of one core in GFLOP/s (64 flop per instruction), timed for `seconds` of
// this thread's CPU time (so a preempted thread on a shared host still measures the core).
double bf16_peak_gflops(double seconds);

}  // namespace nibble::kernels::attention
