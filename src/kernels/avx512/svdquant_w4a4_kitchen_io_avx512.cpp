// AVX-512 (F, BW, VL) kitchen I/O of the SVDQuant ops (svdquant_w4a4_kitchen_io.h): integer shuffles and
// exact widenings only, so every result equals the scalar version bit for bit.
// Pack / unpack work on 16-bit lanes: the word of bytes (c[2i], c[2i+1]) becomes the byte
// (c[2i] & 0xF) | (c[2i+1] & 0xF) << 4 and back, so the kitchen's nibble order needs no shuffle.

// GCC 12 flags its own _mm512_undefined_* helpers inside the intrinsics headers (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/isa_local.h"
#include "kernels/svdquant_w4a4_kitchen_io.h"

namespace nibble::kernels::w4a4 {

void pack_codes_avx512(const int8_t* codes, int64_t n, uint8_t* q) {
  const __m512i lo = _mm512_set1_epi16(0x000F), hi = _mm512_set1_epi16(0x00F0);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i w = _mm512_loadu_si512(codes + i);
    const __m512i b = _mm512_or_si512(_mm512_and_si512(w, lo), _mm512_and_si512(_mm512_srli_epi16(w, 4), hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i / 2), _mm512_cvtepi16_epi8(b));
  }
  for (; i + 1 < n; i += 2) q[i / 2] = uint8_t((codes[i] & 0xF) | ((codes[i + 1] & 0xF) << 4));
}

void unpack_codes_avx512(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr) {
  const int64_t G = K / 64;
  const __m512i lo = _mm512_set1_epi16(0x000F), hi = _mm512_set1_epi16(0x0F00), eight = _mm512_set1_epi8(8);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * (K / 2) + g * 32)));
      __m512i v = _mm512_or_si512(_mm512_and_si512(w, lo), _mm512_and_si512(_mm512_slli_epi16(w, 4), hi));  // nibbles
      int64_t s;
      if (act_unsigned) {
        s = _mm512_reduce_add_epi64(_mm512_sad_epu8(v, zero));
      } else {  // signed code = (u ^ 8) − 8: Σ code = Σ (u ^ 8) − 8·64
        v = _mm512_xor_si512(v, eight);
        s = _mm512_reduce_add_epi64(_mm512_sad_epu8(v, zero)) - 512;
        v = _mm512_sub_epi8(v, eight);
      }
      _mm512_storeu_si512(codes + m * K + g * 64, v);
      acorr[m * G + g] = int32_t(-8 * s);
    }
}

void bf16_to_f32_avx512(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, src + i));
    _mm512_mask_storeu_epi32(dst + i, k, _mm512_slli_epi32(w, 16));
  }
}

void f16_to_f32_avx512(const uint16_t* src, int64_t n, float* dst) {
  const __m512i abs = _mm512_set1_epi32(0x7FFF), inf = _mm512_set1_epi32(0x7C00);
  const __m512i sign = _mm512_set1_epi32(0x8000), man = _mm512_set1_epi32(0x3FF), exp = _mm512_set1_epi32(0x7F800000);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m256i h16 = _mm256_maskz_loadu_epi16(k, src + i);
    const __m512i h = _mm512_cvtepu16_epi32(h16);
    __m512i f = _mm512_castps_si512(_mm512_cvtph_ps(h16));  // exact, but quiets signalling NaNs
    // NaN: the payload moved up as is (f16_to_f32)
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(h, abs), inf);
    const __m512i keep = _mm512_or_si512(_mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(h, sign), 16), exp),
                                         _mm512_slli_epi32(_mm512_and_si512(h, man), 13));
    f = _mm512_mask_mov_epi32(f, nan, keep);
    _mm512_mask_storeu_epi32(dst + i, k, f);
  }
}

void store_half_avx512(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst) {
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i rnd = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
  const __m512i sign16 = _mm512_set1_epi32(0x8000), nan16 = _mm512_set1_epi32(0x7E00);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(k, src + i);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + i));
    const __m512i b = _mm512_castps_si512(v), hi = _mm512_srli_epi32(b, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs), inf);
    __m256i h;
    if (bf16) {  // f32_to_bf16: b + 0x7FFF + lsb, top half; a NaN keeps its top half, made quiet
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(rnd, _mm512_and_si512(hi, one))), 16);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, quiet));
      h = _mm512_cvtepi32_epi16(r);
    } else {  // f32_to_f16: the hardware's round to nearest even; a NaN becomes sign | 0x7E00
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i fix = _mm512_cvtepi32_epi16(_mm512_or_si512(_mm512_and_si512(hi, sign16), nan16));
      h = _mm256_mask_mov_epi16(h, nan, fix);
    }
    _mm256_mask_storeu_epi16(dst + i, k, h);
  }
}

}  // namespace nibble::kernels::w4a4
