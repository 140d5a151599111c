// bf16 low-rank down-projection and GEMM of the SVDQuant W4A4 layer, AVX-512 BF16 (numerics and layouts:
// svdquant_w4a4_kernels.h). MR rows × RV·16 rank columns of fp32 accumulators; per k pair one 64-byte
// load of the pair-packed down per 16 columns and, per row, one broadcast of the row's bf16 pair into RV
// vdpbf16ps. Every output is one accumulator chain over the pairs in ascending order, so the result
// equals the fma chain in pair order 1, 0, 3, 2, … of the reference (the hardware adds the odd product
// of a pair first; bf16 products are exact in fp32). 8 rows × 2 vectors (16 chains) against 12 × 2 ran
// at the same rate (M = 480, K = 3072, R = 32, one thread): 5.6× the fp32 fma kernel's rate.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/avx512vnni/svdquant_w4a4_vnni_micro.h"
#include "kernels/svdquant_w4a4_kernels.h"

namespace nibble::kernels::w4a4 {

namespace {

template <int MR, int RV>
void rows_bf16(const uint32_t* xp, int64_t K2, const uint16_t* dpk, int64_t ldd, int64_t r0, int64_t R, float* lora,
               int64_t ldl, int64_t m) {
  __m512 acc[MR][RV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < K2; ++q) {
    __m512bh d[RV];
    for (int v = 0; v < RV; ++v) d[v] = (__m512bh)_mm512_loadu_si512(dpk + (q * ldd + r0 + 16 * v) * 2);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[(m + i) * K2 + q]));
      for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xb, d[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) {
      const int64_t left = R - (r0 + 16 * v);
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm512_mask_storeu_ps(lora + (m + i) * ldl + r0 + 16 * v, mk, acc[i][v]);
    }
}

template <int RV>
void block_bf16(int rows, const uint32_t* xp, int64_t K2, const uint16_t* dpk, int64_t ldd, int64_t r0, int64_t R,
                float* lora, int64_t ldl, int64_t m) {
  switch (rows) {
    case 8: rows_bf16<8, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 7: rows_bf16<7, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 6: rows_bf16<6, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 5: rows_bf16<5, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 4: rows_bf16<4, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 3: rows_bf16<3, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 2: rows_bf16<2, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    default: rows_bf16<1, RV>(xp, K2, dpk, ldd, r0, R, lora, ldl, m); break;
  }
}

}  // namespace

void lora_bf16_avx512bf16(const uint32_t* xp, int64_t K2, const uint16_t* dpk, int64_t ldd, int64_t R, float* lora,
                          int64_t ldl, int64_t rows) {
  for (int64_t m = 0; m < rows; m += 8) {
    const int mr = int(rows - m < 8 ? rows - m : 8);
    int64_t r0 = 0;
    for (; r0 + 16 < R; r0 += 32) block_bf16<2>(mr, xp, K2, dpk, ldd, r0, R, lora, ldl, m);
    for (; r0 < R; r0 += 16) block_bf16<1>(mr, xp, K2, dpk, ldd, r0, R, lora, ldl, m);
  }
}

// The VNNI GEMM with the up-projection on vdpbf16ps when the driver passes pair-packed lora / up.
void gemm_avx512bf16(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (a.lora2 && a.up2) gemm_vnni_blocks<true>(a, m0, m1, t0, t1);
  else gemm_vnni_blocks<false>(a, m0, m1, t0, t1);
}

}  // namespace nibble::kernels::w4a4
