// AVX-512 activation quantizer and low-rank projection of the SVDQuant W4A4 layer (numerics:
// svdquant_w4a4_kernels.h — every step is the reference's fp32 operation, so results are bit-identical).
// Quantize: one 64-wide group is four zmm; the max and the integer sum are exact in any order.
// Low-rank: vectors over r (down padded to a multiple of 16 columns), 4 rows per pass, fma chain over k.

// GCC 12 flags its own _mm512_undefined_* helpers inside the intrinsics headers (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>


#include "kernels/svdquant_w4a4_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::w4a4 {

void quantize_avx512(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                     float* scales, int32_t* acorr, int64_t m0, int64_t m1) {
  const int64_t G = K / kGroup;
  const float qmax = act_unsigned ? 15.0f : 7.0f;
  const __m512 lo = _mm512_set1_ps(act_unsigned ? 0.0f : -7.0f), hi = _mm512_set1_ps(act_unsigned ? 15.0f : 7.0f);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t g = 0; g < G; ++g) {
      // x streams from DRAM: ask for the group 8 ahead (2 KiB; the next row's start near the row end)
      for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(xr + (g + 8) * kGroup + 16 * l), _MM_HINT_T0);
      __m512 y[4];
      __m512 amax = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        const int64_t k = g * kGroup + 16 * j;
        y[j] = _mm512_mul_ps(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(inv_s + k));
        amax = _mm512_max_ps(amax, _mm512_and_ps(y[j], absmask));
      }
      const float scale = kmax(_mm512_reduce_max_ps(amax) / qmax, 1e-10f);
      const __m512 inv = _mm512_set1_ps(1.0f / scale);
      __m512i sum = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(y[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        const __m512i qi = _mm512_cvtps_epi32(q);
        sum = _mm512_add_epi32(sum, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + m * K + g * kGroup + 16 * j), _mm512_cvtepi32_epi8(qi));
      }
      scales[m * G + g] = scale;
      if (acorr) acorr[m * G + g] = -8 * _mm512_reduce_add_epi32(sum);
    }
  }
}

namespace {
// MR rows × RV·16 columns of lora: MR·RV independent fp32 FMA chains (8 rows × 2 vectors = 16 hide the
// FMA latency on both ports and halve the passes over `down` against 4 rows: 1.6x on the
// M = 4096, K = 3072, R = 32 low-rank stage). Each output is one chain over k ascending.
// Pairs: k in the bf16 low-rank order 1, 0, 3, 2, … (kk ^ 1; K is even).
template <int MR, int RV, bool Pairs>
void lora_rows(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t r0, int64_t R,
               float* lora, int64_t ldl, int64_t m) {
  __m512 acc[MR][RV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    const int64_t k = Pairs ? (kk ^ 1) : kk;
    __m512 d[RV];
    for (int v = 0; v < RV; ++v) d[v] = _mm512_loadu_ps(down + k * ldd + r0 + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[(m + i) * ldx + k]);
      for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, d[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) {
      const int64_t c = r0 + 16 * v;
      const int64_t left = R - c;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm512_mask_storeu_ps(lora + (m + i) * ldl + c, mk, acc[i][v]);
    }
}
template <int RV, bool P>
void lora_block(int rows, const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t r0,
                int64_t R, float* lora, int64_t ldl, int64_t m) {
  switch (rows) {
    case 8: lora_rows<8, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 7: lora_rows<7, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 6: lora_rows<6, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 5: lora_rows<5, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 4: lora_rows<4, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 3: lora_rows<3, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 2: lora_rows<2, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    default: lora_rows<1, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
  }
}

template <bool P>
void lora_all(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
              int64_t ldl, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m += 8) {
    const int rows = int(kmin<int64_t>(8, m1 - m));
    int64_t r0 = 0;
    for (; r0 + 32 < R + 16 && r0 + 16 < R; r0 += 32) lora_block<2, P>(rows, x, ldx, K, down, ldd, r0, R, lora, ldl, m);
    for (; r0 < R; r0 += 16) lora_block<1, P>(rows, x, ldx, K, down, ldd, r0, R, lora, ldl, m);
  }
}
}  // namespace

void lora_avx512(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
                 int64_t ldl, int64_t m0, int64_t m1, bool pairs) {
  if (pairs) lora_all<true>(x, ldx, K, down, ldd, R, lora, ldl, m0, m1);
  else lora_all<false>(x, ldx, K, down, ldd, R, lora, ldl, m0, m1);
}

}  // namespace nibble::kernels::w4a4
