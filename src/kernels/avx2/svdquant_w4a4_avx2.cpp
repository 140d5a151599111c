// AVX2 kernels of the SVDQuant W4A4 layer (layout and numerics: svdquant_w4a4_kernels.h).
//
// GEMM: vpmaddubsw multiplies the offset weight nibbles (u8, 0..15) by the activation codes (s8,
// |a| ≤ 15): pair sums stay within ±450, far from int16 saturation, and vpmaddwd by 1 widens them to
// int32 exactly. Register tile: MR rows × 16 columns (two 8-lane vectors = one half of a 32-column
// packed tile). Quantize and low-rank follow the reference operation by operation (bit-identical).
#include <immintrin.h>


#include "kernels/svdquant_w4a4_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::w4a4 {

namespace {

inline int32_t load_dword(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

template <int MR>
void micro(const GemmArgs& a, int64_t m, int64_t t, int h) {
  const int64_t K = a.K, G = K / kGroup, R = a.R;
  const int8_t* arow[MR];
  for (int i = 0; i < MR; ++i) arow[i] = a.a8 + (m + i) * K;
  const uint8_t* wp = a.wpk + t * G * kTileBytesPerGroup + h * 64;
  const float* wsc = a.wsc + t * G * kTileN + h * 16;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);

  __m256 f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i d[MR][2];
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm256_set1_epi32(a.acorr[(m + i) * G + g]);
    const uint8_t* wg = wp + g * kTileBytesPerGroup;
    const int64_t kg = g * kGroup;
    for (int p = 0; p < 8; ++p) {
      const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * 128));
      const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * 128 + 32));
      const __m256i lo0 = _mm256_and_si256(raw0, nib), lo1 = _mm256_and_si256(raw1, nib);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), nib);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), nib);
      for (int i = 0; i < MR; ++i) {
        const __m256i al = _mm256_set1_epi32(load_dword(arow[i] + kg + 8 * p));
        const __m256i ah = _mm256_set1_epi32(load_dword(arow[i] + kg + 8 * p + 4));
        const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, al), _mm256_maddubs_epi16(hi0, ah));
        const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, al), _mm256_maddubs_epi16(hi1, ah));
        d[i][0] = _mm256_add_epi32(d[i][0], _mm256_madd_epi16(s0, ones));
        d[i][1] = _mm256_add_epi32(d[i][1], _mm256_madd_epi16(s1, ones));
      }
    }
    const __m256 ws0 = _mm256_loadu_ps(wsc + g * kTileN), ws1 = _mm256_loadu_ps(wsc + g * kTileN + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 as = _mm256_set1_ps(a.ascale[(m + i) * G + g]);
      f[i][0] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d[i][0]), as), ws0, f[i][0]);
      f[i][1] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d[i][1]), as), ws1, f[i][1]);
    }
  }
  if (R > 0) {
    const float* up = a.up + t * R * kTileN + h * 16;
    // up_pairs: r in the order 1, 0, 3, 2, … (rr ^ 1); for odd R the pad index R adds +0 (vdpbf16ps's 0·0)
    const int64_t Rn = a.up_pairs ? R + (R & 1) : R;
    for (int64_t rr = 0; rr < Rn; ++rr) {
      const int64_t r = a.up_pairs ? (rr ^ 1) : rr;
      if (r >= R) {
        for (int i = 0; i < MR; ++i) {
          f[i][0] = _mm256_add_ps(f[i][0], _mm256_setzero_ps());
          f[i][1] = _mm256_add_ps(f[i][1], _mm256_setzero_ps());
        }
        continue;
      }
      const __m256 u0 = _mm256_loadu_ps(up + r * kTileN), u1 = _mm256_loadu_ps(up + r * kTileN + 8);
      for (int i = 0; i < MR; ++i) {
        const __m256 l = _mm256_set1_ps(a.lora[(m + i) * R + r]);
        f[i][0] = _mm256_fmadd_ps(l, u0, f[i][0]);
        f[i][1] = _mm256_fmadd_ps(l, u1, f[i][1]);
      }
    }
  }
  const int64_t n0 = t * kTileN + h * 16;
  const int64_t valid = kmin<int64_t>(16, a.N - n0);
  for (int i = 0; i < MR; ++i) {
    float* y = a.y + (m + i - a.y_row0) * a.ldy + (n0 - a.y_col0);
    if (valid == 16) {
      _mm256_storeu_ps(y, f[i][0]);
      _mm256_storeu_ps(y + 8, f[i][1]);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, f[i][0]);
      _mm256_store_ps(tmp + 8, f[i][1]);
      for (int64_t j = 0; j < valid; ++j) y[j] = tmp[j];
    }
  }
}

constexpr int kMR = 3;

}  // namespace

void gemm_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      if (t * kTileN + h * 16 >= a.N) break;
      int64_t m = m0;
      for (; m + kMR <= m1; m += kMR) micro<kMR>(a, m, t, h);
      switch (m1 - m) {
        case 2: micro<2>(a, m, t, h); break;
        case 1: micro<1>(a, m, t, h); break;
        default: break;
      }
    }
  }
}

namespace {
// The max of 8 lanes of non-negative floats held as int32 bit patterns (their order; a NaN, above +inf,
// always wins), returned as the float.
inline float hmax8_bits(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(_mm_castsi128_ps(m));
}
inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
}  // namespace

void quantize_avx2(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                   float* scales, int32_t* acorr, int64_t m0, int64_t m1) {
  const int64_t G = K / kGroup;
  const float qmax = act_unsigned ? 15.0f : 7.0f;
  const __m256 lo = _mm256_set1_ps(act_unsigned ? 0.0f : -7.0f), hi = _mm256_set1_ps(act_unsigned ? 15.0f : 7.0f);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t g = 0; g < G; ++g) {
      __m256 y[8];
      __m256i amax = _mm256_setzero_si256();  // max|y| on the bit patterns: a NaN in the group wins (kernels header)
      for (int j = 0; j < 8; ++j) {
        const int64_t k = g * kGroup + 8 * j;
        y[j] = _mm256_mul_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(inv_s + k));
        amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_castps_si256(y[j]), absmask));
      }
      const float scale = kmax(hmax8_bits(amax) / qmax, 1e-10f);
      const __m256 inv = _mm256_set1_ps(1.0f / scale);
      __m256i sum = _mm256_setzero_si256();
      alignas(32) int32_t qi[8];
      for (int j = 0; j < 8; ++j) {
        __m256 q = _mm256_round_ps(_mm256_mul_ps(y[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        const __m256i v = _mm256_cvtps_epi32(q);
        sum = _mm256_add_epi32(sum, v);
        _mm256_store_si256(reinterpret_cast<__m256i*>(qi), v);
        int8_t* c = codes + m * K + g * kGroup + 8 * j;
        for (int e = 0; e < 8; ++e) c[e] = int8_t(qi[e]);
      }
      scales[m * G + g] = scale;
      if (acorr) acorr[m * G + g] = -8 * hsum8i(sum);
    }
  }
}

namespace {
// Pairs: k in the bf16 low-rank order 1, 0, 3, 2, … (kk ^ 1; K is even).
template <int RV, bool Pairs>
void lora_rows4(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t r0, int64_t R,
                float* lora, int64_t ldl, int64_t m, int rows) {
  __m256 acc[4][RV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    const int64_t k = Pairs ? (kk ^ 1) : kk;
    __m256 d[RV];
    for (int v = 0; v < RV; ++v) d[v] = _mm256_loadu_ps(down + k * ldd + r0 + 8 * v);
    for (int i = 0; i < 4; ++i) {
      if (i >= rows) break;
      const __m256 xb = _mm256_set1_ps(x[(m + i) * ldx + k]);
      for (int v = 0; v < RV; ++v) acc[i][v] = _mm256_fmadd_ps(xb, d[v], acc[i][v]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int v = 0; v < RV; ++v) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[i][v]);
      for (int e = 0; e < 8; ++e) {
        const int64_t c = r0 + 8 * v + e;
        if (c < R) lora[(m + i) * ldl + c] = tmp[e];
      }
    }
}
}  // namespace

void lora_avx2(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
               int64_t ldl, int64_t m0, int64_t m1, bool pairs) {
  for (int64_t m = m0; m < m1; m += 4) {
    const int rows = int(kmin<int64_t>(4, m1 - m));
    int64_t r0 = 0;
    if (pairs) {
      for (; r0 + 8 < R; r0 += 16) lora_rows4<2, true>(x, ldx, K, down, ldd, r0, R, lora, ldl, m, rows);
      for (; r0 < R; r0 += 8) lora_rows4<1, true>(x, ldx, K, down, ldd, r0, R, lora, ldl, m, rows);
    } else {
      for (; r0 + 8 < R; r0 += 16) lora_rows4<2, false>(x, ldx, K, down, ldd, r0, R, lora, ldl, m, rows);
      for (; r0 < R; r0 += 8) lora_rows4<1, false>(x, ldx, K, down, ldd, r0, R, lora, ldl, m, rows);
    }
  }
}

}  // namespace nibble::kernels::w4a4
