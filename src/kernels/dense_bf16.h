// src/kernels/dense_bf16.h — the bf16 dense GEMM (vdpbf16ps, AVX-512 BF16) as the kernel layer
// offers it to the layers above (nn::Linear's opt-in bf16 dense path, linear_bf16 in ops.h).
//
// Arithmetic (docs/dense.md): y (M, N) = x (M, K) · W (N, K)ᵀ + b with x rounded to bf16 (RNE) and W
// rounded to bf16 (RNE; exact when stored as bf16). A product of two bf16 values is exact in fp32;
// the K products of an output are summed in fp32 in a fixed order (k pairs ascending; within a
// pair, the hardware's order), bias added last in fp32. So |y − x·Wᵀ| ≤ γ_K·Σ_k|x̂_k||ŵ_k| (γ_K = K·u/(1−K·u),
// u = 2^-24, x̂/ŵ the rounded inputs) plus the input rounding 2^-8·Σ|x||w| (and 2^-8 again for W
// when it was not bf16). vdpbf16ps treats bf16 denormal inputs as zero and flushes denormal results.
//
// Layouts:
//  * packed weight: column panels of kPanel (64) output columns; panel p holds, for every k pair
//    q < K2 = ceil(K/2), 64 columns × 2 bf16 (k = 2q, 2q+1) = four 64-byte lines:
//    data[((p·K2 + q)·64 + j)·2 + e] = bf16(W[p·64 + j, 2q + e]), zero padded (n ≥ N, k ≥ K).
//  * packed activations (per task, thread scratch): rows of K2 uint32 bf16 pairs, same k pairing.
// Dispatch: plan(isa) in dense_bf16_kernels.h. Work split: tasks are fixed (row block of kMc rows) × (column block of kPanelsPerTask panels)
// output tiles, independent of the thread count; inside a task k walks fixed chunks of kKcPairs
// pairs with partial sums kept in fp32 in y. Every output's summation order is fixed, so results are
// bit-identical for any thread count.
#pragma once
#include <cstdint>
#include <memory>

#include "nibble/dtype.h"

namespace nibble::kernels::dense_bf16 {

inline constexpr int64_t kPanel = 64;         // output columns per packed panel (4 zmm)
inline constexpr int64_t kPanelsPerTask = 2;  // 128 output columns per task
inline constexpr int64_t kMc = 192;           // rows per task (32 micro-tiles of kMr)
inline constexpr int64_t kMr = 6;             // rows of the micro-tile (24 accumulators)
inline constexpr int64_t kKcPairs = 1536;     // k pairs per chunk: all of K ≤ 3072 in one pass. Each chunk
                                              // after the first reloads and stores the 24 accumulators of
                                              // every micro-tile; against 256 (the panel's chunk in L1/L2)
                                              // this ran 87 → 94 % of the bf16 peak at M = 4096, K = N = 3072
                                              // and 86 → 96 % at K = 3072, N = 12288 (82 → 86 % at K = 12288;
                                              // 768: between; the whole K = 12288 at once: 81 %)

struct PackedBf16Weight {
  int64_t N = 0, K = 0, K2 = 0, panels = 0;
  uint16_t* data = nullptr;  // 64-byte aligned, owned by `storage`
  std::shared_ptr<void> storage;
  size_t bytes() const { return size_t(panels * K2 * kPanel * 2) * sizeof(uint16_t); }
};

// True when the active ISA runs the vdpbf16ps kernel (else run_packed uses the scalar reference).
bool supported();
// Packs W (N, K) of dtype F32/BF16/F16 (row-major), rounding to bf16 RNE, on the thread pool.
PackedBf16Weight pack_weight(const void* w, DType wdt, int64_t N, int64_t K);
// y (M, w.N) fp32 = bf16(x) (M, w.K) · Wᵀ + bias (may be null); x fp32 row-major. Validated inputs.
void run_packed(const float* x, int64_t M, const PackedBf16Weight& w, const float* bias, float* y);
// The same on bf16 x (M, w.K): its values are their own rounding, so the result equals run_packed on the
// widened x, bit for bit; the pairs are read as they are (no copy when K is even and fits one k chunk).
void run_packed_bf16x(const uint16_t* x, int64_t M, const PackedBf16Weight& w, const float* bias, float* y);

}  // namespace nibble::kernels::dense_bf16
