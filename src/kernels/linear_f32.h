// src/kernels/linear_f32.h — the dense fp32 linear (y = x·Wᵀ + b) as the kernel layer offers it to
// the layers above (nn::Linear, the attention of the Qwen-Image block): the packed weight, the two
// drivers and the serial building blocks. The ISA micro-kernels behind them are declared in
// linear_f32_kernels.h (kernel-internal).
//
// Two shapes of work:
//  * GEMM (M >= kGemmMinRows): the weight is first packed into column panels of kPanel output
//    columns — panel p holds, for every k, the fp32 values W[p·kPanel + j, k] (j < kPanel, zero
//    padded) — so the micro-kernel loads one weight vector per k and broadcasts activations. Packing
//    happens once at load for a Linear (PackedF32Weight) or once per call in linear_f32().
//  * GEMV (small M): straight from the stored (N, K) rows (fp32/bf16/fp16), one dot product per
//    output, vector lanes over k.
// The driver splits the output columns into fixed blocks of panels (independent of the thread
// count) and, inside a block, walks k in fixed chunks of kKc with the partial sums kept in fp32 in
// the output; so every output's summation order is fixed and results are bit-identical for any
// thread count. Bias is added last, in fp32.
#pragma once
#include <cstdint>
#include <memory>

#include "nibble/dtype.h"

namespace nibble::kernels::linear {

inline constexpr int64_t kPanel = 32;       // output columns per packed panel (2 zmm)
inline constexpr int64_t kPanelsPerTask = 4; // 128 output columns per task
inline constexpr int64_t kKc = 1024;        // k per chunk: each later chunk reloads and stores every
                                            // micro-tile's accumulators. Against 256: M = 4096, K = N = 3072
                                            // 1.20x (222-227 -> 183-187 ms); K = 12288 1.11x (2048 about the
                                            // same, 3072 slower); M = 64 and 256 within 4 %
inline constexpr int64_t kGemmMinRows = 8;  // M below this uses the GEMV path

// Fp32 weight packed in panels (layout above). `data` has panels·K·kPanel floats.
struct PackedF32Weight {
  int64_t N = 0, K = 0, panels = 0;
  float* data = nullptr;  // 64-byte aligned, owned by `storage`
  std::shared_ptr<void> storage;
  size_t bytes() const { return size_t(panels * K * kPanel) * sizeof(float); }
};
// Packs W (N, K) of dtype F32/BF16/F16 (row-major) on the thread pool.
PackedF32Weight pack_weight(const void* w, DType wdt, int64_t N, int64_t K);

}  // namespace nibble::kernels::linear

namespace nibble::kernels::linear {
// Drivers shared by linear_f32() and nn::Linear (validated inputs; y (M, N) fp32, bias may be null).
// run_packed: GEMM on a packed weight for the active ISA. run_rows: small-M path (or the scalar
// oracle when the active ISA is scalar) straight from the stored rows.
void run_packed(const float* x, int64_t M, const PackedF32Weight& w, const float* bias, float* y);
void run_rows(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, const float* bias,
              float* y);
}  // namespace nibble::kernels::linear

namespace nibble::kernels::linear {
// Serial building blocks for callers that run their own task split (attention):
// packs rows w[n·ld + k] (n < N, k < K) into `dst` (panels·K·kPanel floats, 64-byte aligned);
void pack_rows_f32(const float* w, int64_t ld, int64_t N, int64_t K, float* dst);
// y (M, w.N) = x (M, w.K) · Wᵀ on the calling thread, active ISA (no bias).
void gemm_packed_serial(const float* x, int64_t M, const PackedF32Weight& w, float* y);
}  // namespace nibble::kernels::linear

namespace nibble::kernels::attention {
// In place over one row of attention scores: s[j] = exp((s[j] − max_j s)·scale); returns Σ_j s[j].
// AVX-512 or AVX2 (a degree-6 polynomial exp, relative error < 2e-7) or the portable loop; fixed order.
float softmax_row_avx512(float* s, int64_t n, float scale);
// The same with 8 lanes (AVX2 + FMA; the polynomial's 2^n by exponent-bit addition).
float softmax_row_avx2(float* s, int64_t n, float scale);
}  // namespace nibble::kernels::attention
