// AVX2 (+F16C) kitchen I/O of the SVDQuant ops (svdquant_w4a4_kitchen_io.h): integer shuffles and exact
// widenings only, so every result equals the scalar version bit for bit. Same 16-bit-lane scheme as the
// AVX-512 file; tails go through a small zero-padded buffer.
#include <immintrin.h>

#include "kernels/isa_local.h"
#include "kernels/svdquant_w4a4_kitchen_io.h"

namespace nibble::kernels::w4a4 {

void pack_codes_avx2(const int8_t* codes, int64_t n, uint8_t* q) {
  const __m256i lo = _mm256_set1_epi16(0x000F), hi = _mm256_set1_epi16(0x00F0);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i + 32));
    const __m256i b0 = _mm256_or_si256(_mm256_and_si256(w0, lo), _mm256_and_si256(_mm256_srli_epi16(w0, 4), hi));
    const __m256i b1 = _mm256_or_si256(_mm256_and_si256(w1, lo), _mm256_and_si256(_mm256_srli_epi16(w1, 4), hi));
    // packus interleaves the 128-bit lanes (b0.lo, b1.lo, b0.hi, b1.hi): put them back in order
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(b0, b1), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i / 2), p);
  }
  for (; i + 1 < n; i += 2) q[i / 2] = uint8_t((codes[i] & 0xF) | ((codes[i + 1] & 0xF) << 4));
}

void unpack_codes_avx2(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr) {
  const int64_t G = K / 64;
  const __m256i lo = _mm256_set1_epi16(0x000F), hi = _mm256_set1_epi16(0x0F00), eight = _mm256_set1_epi8(8);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m256i sum = zero;
      for (int h = 0; h < 2; ++h) {
        const __m256i w =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + m * (K / 2) + g * 32 + h * 16)));
        __m256i v = _mm256_or_si256(_mm256_and_si256(w, lo), _mm256_and_si256(_mm256_slli_epi16(w, 4), hi));
        if (!act_unsigned) v = _mm256_xor_si256(v, eight);  // signed code = (u ^ 8) − 8
        sum = _mm256_add_epi64(sum, _mm256_sad_epu8(v, zero));
        if (!act_unsigned) v = _mm256_sub_epi8(v, eight);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + m * K + g * 64 + h * 32), v);
      }
      const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      int64_t s = _mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1);
      if (!act_unsigned) s -= 512;
      acorr[m * G + g] = int32_t(-8 * s);
    }
}

namespace {
inline __m256 bf16x8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 f16x8(const uint16_t* p) {
  const __m128i h16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i h = _mm256_cvtepu16_epi32(h16);
  const __m256 f = _mm256_cvtph_ps(h16);  // exact, but quiets signalling NaNs
  // NaN: the payload moved up as is (f16_to_f32)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x7FFF)), _mm256_set1_epi32(0x7C00));
  const __m256i keep = _mm256_or_si256(
      _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16), _mm256_set1_epi32(0x7F800000)),
      _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x3FF)), 13));
  return _mm256_blendv_ps(f, _mm256_castsi256_ps(keep), _mm256_castsi256_ps(nan));
}
template <__m256 (*Cvt)(const uint16_t*)>
void widen(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, Cvt(src + i));
  if (i < n) {
    uint16_t in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float out[8];
    for (int64_t j = i; j < n; ++j) in[j - i] = src[j];
    _mm256_storeu_ps(out, Cvt(in));
    for (int64_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}
// 8 fp32 → 8 bf16 / f16 as f32_to_bf16 / f32_to_f16 round them
inline __m128i half8(__m256 v, bool bf16) {
  const __m256i b = _mm256_castps_si256(v), hi = _mm256_srli_epi32(b, 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  if (bf16) {  // b + 0x7FFF + lsb, top half; a NaN keeps its top half, made quiet
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(hi, _mm256_set1_epi32(1))));
    r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  }
  // the hardware's round to nearest even; a NaN becomes sign | 0x7E00
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i fix = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7E00));
  const __m128i fix16 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(fix, fix), 0x08));
  const __m128i nan16 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(nan, nan), 0x08));
  return _mm_blendv_epi8(h, fix16, nan16);
}
}  // namespace

void store_half_avx2(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), half8(v, bf16));
  }
  if (i < n) {
    float in[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint16_t out[8];
    for (int64_t j = i; j < n; ++j) in[j - i] = src[j], b[j - i] = bias ? bias[j] : 0.0f;
    __m256 v = _mm256_loadu_ps(in);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), half8(v, bf16));
    for (int64_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}

void bf16_to_f32_avx2(const uint16_t* src, int64_t n, float* dst) { widen<bf16x8>(src, n, dst); }
void f16_to_f32_avx2(const uint16_t* src, int64_t n, float* dst) { widen<f16x8>(src, n, dst); }

}  // namespace nibble::kernels::w4a4
