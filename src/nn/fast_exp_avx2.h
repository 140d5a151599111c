// src/nn/fast_exp_avx2.h — nn/fast_exp.h's fast_exp on 8 lanes (AVX2 + FMA): the same steps as the
// AVX-512 one (round(x/ln2) by the 1.5·2^23 trick, two-part ln2 reduction, degree-6 Horner polynomial)
// with 2^n added to the exponent bits as the scalar one does (AVX2 has no scalef).
// Include only from AVX2 code (files built with -mavx2 -mfma).
#pragma once
#include <immintrin.h>

namespace nibble::nn {

inline __m256 fast_exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(12582912.0f)),
                                 _mm256_set1_ps(12582912.0f));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

}  // namespace nibble::nn
