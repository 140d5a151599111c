// src/kernels/svdquant_w4a4_kernels.h — internal kernels of the SVDQuant W4A4 ops (spec §3.3–3.4).
//
// Numerics (identical in every variant, so every ISA is bit-identical to the reference):
//   quantize   per row m, group g of 64: y = x·inv_s (inv_s = 1/s, or 0 if |s| ≤ 1e-10), amax = max|y|,
//              scale = max(amax/qmax, 1e-10), q = rint(y·(1/scale)) (half-even), clamped to [−7, 7] or
//              [0, 15]; all fp32, no contraction. Non-finite x: a NaN |y| makes amax (so the scale, so the
//              row's output) NaN, whatever its position; a q that is NaN (y·0 for y = ±inf) is the low
//              clamp. Every variant does exactly this, so bad input shows as NaN rather than as codes.
//   low-rank   lora[m, r] = fma chain over k = 0..K−1 of x[m,k]·down[k,r], starting from 0.
//              bf16 low-rank (the kitchen's cuBLAS bf16 matmul; used when proj_down is stored as bf16 and the
//              low-rank input is bf16 or fp32, see lowrank_bf16()): x̂ = RNE_bf16(x) (|x| < 2^-126 → 0,
//              exact for bf16 x), then the fma chain over k in pair order 1, 0, 3, 2, … (k = kk ^ 1), i.e.
//              vdpbf16ps's order (odd element of a pair first; bf16·bf16 products are exact in fp32, so
//              each step is one rounding, an fma). Same bits on every ISA: AVX-512 BF16 runs vdpbf16ps on
//              pair-packed operands, the others the fp32 fma chain in that order on x̂. The one exception:
//              vdpbf16ps treats a bf16 input below 2^-126 (a denormal proj_down / proj_up / lora entry) as 0
//              and flushes a partial sum below 2^-126 to zero; the fp32 chains do not.
//   GEMM       d = Σ_{k∈g} a·w exactly in int32; acc = fma(float(d)·ascale[m,g], wscale[g,n], acc) for
//              g = 0..G−1 in order, then acc = fma(lora[m,r], up[n,r], acc) for r = 0..R−1, from acc = 0.
//              bf16 up-projection (lora values bf16 — lora_act stored bf16, or the layer's lora rounded to bf16
//              — and proj_up stored bf16): r in pair order 1, 0, 3, 2, … (vdpbf16ps's; exact products), for
//              odd R the pad index R adds +0. AVX-512 BF16 runs vdpbf16ps, the others the fp32 chain.
//              The driver adds the bias (acc + bias, fp32) and rounds to the output dtype.
// Fast variants use int8 dot products: the weight code w ∈ [−8, 7] is stored offset, u = w + 8 ∈ [0, 15]
// (unsigned operand of vpdpbusd / vpmaddubsw), the activation code a (signed or unsigned, |a| ≤ 15) is the
// signed operand, and Σ a·w = Σ a·u − 8·Σ a: the correction −8·Σ_{k∈g} a[m,k] (acorr) seeds the int32
// accumulator. Every product and sum is an exact small integer.
//
// Packed weight layout (prepare time; shared by the AVX2 and AVX-512 VNNI kernels): columns in tiles of
// kTileN = 32; per tile t and group g a 1024-byte block of 8 quad pairs p × 2 halves h × 64 bytes; byte
// 4j + b of block (p, h) holds column n = 32t + 16h + j:
//     low nibble  = u[n, 64g + 8p + b],  high nibble = u[n, 64g + 8p + 4 + b]   (b < 4)
// so one 64-byte load gives two 16-lane × 4-k operand vectors after a mask / shift. Columns past N are
// padded with u = 8 (w = 0), scale 0, up 0. Per-tile fp32 side arrays: wsc[t][g][32], up[t][r][32].
#pragma once
#include <functional>
#include <cstdint>

#include "nibble/isa.h"
#include "nibble/tensor.h"

namespace nibble {
struct SvdquantW4A4Prepared;
}

namespace nibble::kernels::w4a4 {

inline constexpr int64_t kGroup = 64;
inline constexpr int64_t kTileN = 32;
inline constexpr int64_t kTileBytesPerGroup = kTileN * kGroup / 2;  // 1024

// ---- reference oracles (src/kernels/reference/svdquant_w4a4_ref.cpp, -ffp-contract=off)
// inv_s[k] per spec §3.3 step 1.
void inv_smooth_ref(const float* smooth, int64_t K, float* inv_s);
// Rows [m0, m1) of x (ldx = K): codes (M, K) int8, scales (M, K/64) fp32 (not yet rounded to a dtype).
void quantize_ref(const float* x, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes, float* scales,
                  int64_t m0, int64_t m1);
// lora (M, R) = x (M, K) · down (K, R), rows [m0, m1); pairs: the bf16 low-rank order (on x̂ already rounded).
void lora_ref(const float* x, int64_t K, const float* down, int64_t R, float* lora, int64_t m0, int64_t m1,
              bool pairs = false);
// out[i] = RNE_bf16(x[i]) as fp32, |x| < 2^-126 flushed to (signed) zero (the bf16 low-rank's x̂).
void round_bf16_ref(const float* x, int64_t n, float* out);
// Straight from the natural layout: codes (M, K), ascale (M, K/64) [m][g], qweight (N, K/2) signed nibbles,
// wscale (K/64, N), lora (M, R), up (N, R); acc (M, N) columns [n0, n1) (no bias).
void gemm_ref(int64_t M, int64_t N, int64_t K, int64_t R, const int8_t* codes, const float* ascale,
              const uint8_t* qweight, const float* wscale, const float* lora, const float* up, float* acc, int64_t n0,
              int64_t n1, bool up_pairs = false);

// ---- fast variants
struct GemmArgs {
  int64_t N = 0, K = 0, R = 0;
  const int8_t* a8 = nullptr;      // (M, K) activation codes
  const int32_t* acorr = nullptr;  // (M, K/64) −8·Σ_{k∈g} a
  const float* ascale = nullptr;   // (M, K/64)
  const uint8_t* wpk = nullptr;    // packed weights (layout above)
  const float* wsc = nullptr;      // [T][G][32]
  const float* lora = nullptr;     // (M, R), null if R == 0
  const float* up = nullptr;       // [T][R][32]
  bool up_pairs = false;           // the bf16 up-projection's order (fp32 chains)
  const uint32_t* lora2 = nullptr; // (M, R2 = ⌈R/2⌉) bf16 pairs of lora (vdpbf16ps kernel only), pad 0
  const uint16_t* up2 = nullptr;   // [T][R2][32][2] bf16 pairs of up: up2[((t·R2 + q)·32 + j)·2 + e] = up[t][2q+e][j]
  float* y = nullptr;              // acc for rows [m0, m1), columns of tiles [t0, t1):
  int64_t ldy = 0;                 //   element (m, n) at y[(m − y_row0)·ldy + n − y_col0]
  int64_t y_row0 = 0, y_col0 = 0;
};
void gemm_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
void gemm_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
// The VNNI GEMM whose up-projection runs vdpbf16ps when lora2 and up2 are set (else gemm_avx512vnni's).
void gemm_avx512bf16(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1);

// Quantize rows [m0, m1) of x (row stride ldx) into codes (ldc = K), fp32 scales (M, K/64) and acorr.
void quantize_avx512(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                     float* scales, int32_t* acorr, int64_t m0, int64_t m1);
void quantize_avx2(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                   float* scales, int32_t* acorr, int64_t m0, int64_t m1);
// The same for bf16 (f16 = false) or fp16 rows, widened in-register: the bits of quantize_avx512 on the
// widened rows, reading half the bytes.
void quantize_half_avx512(const uint16_t* x, bool f16, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned,
                          int8_t* codes, float* scales, int32_t* acorr, int64_t m0, int64_t m1);
// lora (M, ldl) = x (M, K) · down (K, ldd), R columns (ldd, ldl ≥ R; ldd a multiple of the vector width);
// pairs: the bf16 low-rank order (x already rounded to x̂).
void lora_avx512(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
                 int64_t ldl, int64_t m0, int64_t m1, bool pairs);
void lora_avx2(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
               int64_t ldl, int64_t m0, int64_t m1, bool pairs);
// bf16 low-rank, AVX-512 BF16: lora (rows, ldl) = x̂ · down for `rows` rows of fp32 x (row stride ldx; x̂ =
// RNE_bf16(x), denormals 0, formed in the kernel) and the pair-packed bf16 down dpk[(q·ldd + r)·2 + e] =
// down[2q + e, r] (ldd a multiple of 16, zero padded). vdpbf16ps per pair, q ascending.
void lora_bf16_avx512bf16(const float* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd, int64_t R,
                          float* lora, int64_t ldl, int64_t rows);
// The same for bf16 x (row stride ldx elements), whose pairs are its own bits: equal to the fp32 entry on the
// widened rows.
void lora_bf16_xbf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd,
                                int64_t R, float* lora, int64_t ldl, int64_t rows);

using GemmKernel = void (*)(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
using QuantizeKernel = void (*)(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned,
                                int8_t* codes, float* scales, int32_t* acorr, int64_t m0, int64_t m1);
using LoraKernel = void (*)(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R,
                            float* lora, int64_t ldl, int64_t m0, int64_t m1, bool pairs);
using LoraBf16Kernel = void (*)(const float* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd, int64_t R,
                                float* lora, int64_t ldl, int64_t rows);
using QuantizeHalfKernel = void (*)(const uint16_t* x, bool f16, int64_t ldx, int64_t K, const float* inv_s,
                                    bool act_unsigned, int8_t* codes, float* scales, int32_t* acorr, int64_t m0,
                                    int64_t m1);
using LoraBf16XKernel = void (*)(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd,
                                 int64_t R, float* lora, int64_t ldl, int64_t rows);

// The bf16 low-rank arithmetic applies (header comment) when proj_down is stored as bf16 and the low-rank
// input is bf16 or fp32 (fp16 x and fp32/fp16 proj_down keep the fp32 chain: rounding them would lose bits).
inline bool lowrank_bf16(DType lora_x, DType proj_down) {
  return proj_down == DType::BF16 && (lora_x == DType::BF16 || lora_x == DType::F32);
}

// ---- the kernel plan of an ISA level, decided once; the drivers run it, tests and tools read it.
// Scalar: the reference oracles (natural layout). Avx2: AVX2 quantize / low-rank / vpmaddubsw GEMM.
// Avx512: AVX-512 quantize and low-rank, AVX2 GEMM. Avx512Vnni/Bf16: AVX-512 quantize, VNNI GEMM;
// Avx512Bf16 also runs the bf16 low-rank with vdpbf16ps (lora_bf16 and gemm_bf16up).
struct Plan {
  Isa isa = Isa::Scalar;
  const char* name = "reference";
  bool reference = true;  // the oracles; the fast pointers below are then null
  QuantizeKernel quantize = nullptr;
  LoraKernel lora = nullptr;
  GemmKernel gemm = nullptr;
  LoraBf16Kernel lora_bf16 = nullptr;  // null: the bf16 low-rank runs `lora` in pair order on x̂
  GemmKernel gemm_bf16up = nullptr;    // null: the bf16 up-projection runs `gemm` with up_pairs
  QuantizeHalfKernel quantize_half = nullptr;  // bf16/f16 x read as such (null: rows widened to fp32 first)
  LoraBf16XKernel lora_bf16_xbf16 = nullptr;   // bf16 x's own pairs (null: widened, then lora_bf16 / lora)
};
Plan plan(Isa isa);

// ---- profiling hook
// The fused layer (fp32 out) run stage by stage: activation quantization, the low-rank
// down-projection, the integer GEMM with its epilogue, each its own pass; `boundary(i)` is called
// before stage i (0, 1, 2) and after the last (3). Same result as svdquant_linear. No clocks here:
// the timing lives in the dev tools (src/devtools/w4a4_stages.cpp).
Tensor svdquant_linear_staged(const Tensor& x, const SvdquantW4A4Prepared& w,
                              const std::function<void(int)>& boundary);

}  // namespace nibble::kernels::w4a4
