// bf16 low-rank down-projection and GEMM of the SVDQuant W4A4 layer, AVX-512 BF16 (numerics and layouts:
// svdquant_w4a4_kernels.h). MR rows × RV·16 rank columns of fp32 accumulators; per k pair one 64-byte
// load of the pair-packed down per 16 columns and, per row, one broadcast of the row's bf16 pair into RV
// vdpbf16ps. Every output is one accumulator chain over the pairs in ascending order, so the result
// equals the fma chain in pair order 1, 0, 3, 2, … of the reference (the hardware adds the odd product
// of a pair first; bf16 products are exact in fp32). 8 rows × 2 vectors (16 chains) against 12 × 2 ran
// at the same rate (M = 480, K = 3072, R = 32, one thread); 1.8× the fp32 fma kernel's rate (x in cache).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/avx512vnni/svdquant_w4a4_vnni_micro.h"
#include "kernels/svdquant_w4a4_kernels.h"

namespace nibble::kernels::w4a4 {

namespace {

// fp32 x is read and rounded here, 32 pairs of MR rows at a time into an L1 buffer (vcvtne2ps2bf16:
// RNE, denormal inputs as zero — x̂), so the loads of x overlap the vdpbf16ps work: a separate packing
// pass first (dense_bf16's pack_x) cost as much again when x came from DRAM (the staged benchmark).
// bf16 x (XBf16) is its own pairs: broadcast straight from the row (vdpbf16ps reads a denormal as zero,
// as the rounding flushes it, so both give x̂).
constexpr int64_t kPairChunk = 32;  // K is a multiple of 64, so K/2 of 32
template <int MR, int RV, bool XBf16>
void rows_bf16(const void* x, int64_t ldx, int64_t K2, const uint16_t* dpk, int64_t ldd, int64_t r0, int64_t R,
               float* lora, int64_t ldl, int64_t m) {
  __m512 acc[MR][RV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  alignas(64) uint32_t buf[MR][kPairChunk];
  for (int64_t q0 = 0; q0 < K2; q0 += kPairChunk) {
    const uint32_t* pairs[MR];  // row i's pairs q0.. of this chunk
    for (int i = 0; i < MR; ++i) {
      if constexpr (XBf16) {
        const uint32_t* xr = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(x) + (m + i) * ldx) + q0;
        if (q0 + 4 * kPairChunk < K2)  // the chunk four ahead (two lines)
          for (int l = 0; l < 2; ++l) _mm_prefetch(reinterpret_cast<const char*>(xr + 4 * kPairChunk + 16 * l), _MM_HINT_T0);
        pairs[i] = xr;
        continue;
      }
      const float* xr = static_cast<const float*>(x) + (m + i) * ldx + 2 * q0;
      if (q0 + 4 * kPairChunk < K2)  // the chunk four ahead (x from DRAM in the staged benchmark)
        for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(xr + 8 * kPairChunk + 16 * l), _MM_HINT_T0);
      for (int c = 0; c < 2; ++c) {  // element j of the result: lo[j] (j < 16), hi[j − 16]: pairs (2q, 2q+1)
        const __m512 lo = _mm512_loadu_ps(xr + 32 * c), hi = _mm512_loadu_ps(xr + 32 * c + 16);
        _mm512_store_si512(buf[i] + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      pairs[i] = buf[i];
    }
    for (int64_t q = 0; q < kPairChunk; ++q) {
      __m512bh d[RV];
      for (int v = 0; v < RV; ++v) d[v] = (__m512bh)_mm512_loadu_si512(dpk + ((q0 + q) * ldd + r0 + 16 * v) * 2);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(pairs[i][q]));
        for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xb, d[v]);
      }
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

template <int RV, bool XB>
void block_bf16(int rows, const void* xp, int64_t ldx, int64_t K2, const uint16_t* dpk, int64_t ldd, int64_t r0,
                int64_t R, float* lora, int64_t ldl, int64_t m) {
  switch (rows) {
    case 8: rows_bf16<8, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 7: rows_bf16<7, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 6: rows_bf16<6, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 5: rows_bf16<5, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 4: rows_bf16<4, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 3: rows_bf16<3, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    case 2: rows_bf16<2, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
    default: rows_bf16<1, RV, XB>(xp, ldx, K2, dpk, ldd, r0, R, lora, ldl, m); break;
  }
}

template <bool XB>
void lora_bf16_rows(const void* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd, int64_t R, float* lora,
                    int64_t ldl, int64_t rows) {
  const int64_t K2 = K / 2;
  for (int64_t m = 0; m < rows; m += 8) {
    const int mr = int(rows - m < 8 ? rows - m : 8);
    int64_t r0 = 0;
    for (; r0 + 16 < R; r0 += 32) block_bf16<2, XB>(mr, x, ldx, K2, dpk, ldd, r0, R, lora, ldl, m);
    for (; r0 < R; r0 += 16) block_bf16<1, XB>(mr, x, ldx, K2, dpk, ldd, r0, R, lora, ldl, m);
  }
}

}  // namespace

void lora_bf16_avx512bf16(const float* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd, int64_t R,
                          float* lora, int64_t ldl, int64_t rows) {
  lora_bf16_rows<false>(x, ldx, K, dpk, ldd, R, lora, ldl, rows);
}
void lora_bf16_xbf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* dpk, int64_t ldd,
                                int64_t R, float* lora, int64_t ldl, int64_t rows) {
  lora_bf16_rows<true>(x, ldx, K, dpk, ldd, R, lora, ldl, rows);
}

// The VNNI GEMM with the up-projection on vdpbf16ps when the driver passes pair-packed lora / up.
void gemm_avx512bf16(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (a.lora2 && a.up2) gemm_vnni_blocks<true>(a, m0, m1, t0, t1);
  else gemm_vnni_blocks<false>(a, m0, m1, t0, t1);
}

}  // namespace nibble::kernels::w4a4
