// AVX2 softmax row of the block's joint attention (see kernels/linear_f32.h): hosts without AVX-512
// ran the portable loop, which the compiler cannot vectorize (the running sum is a chain).
#include <immintrin.h>

#include "kernels/linear_f32_kernels.h"
#include "nn/fast_exp_avx2.h"

namespace nibble::kernels::attention {

namespace {
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
}  // namespace

float softmax_row_avx2(float* s, int64_t n, float scale) {
  __m256 mx = _mm256_set1_ps(-__builtin_inff());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
  float m = hmax8(mx);
  for (int64_t t = j; t < n; ++t) m = s[t] > m ? s[t] : m;
  const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = nn::fast_exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm), vs));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum8(sum);
  for (; j < n; ++j) {  // the tail through the same vector exp, one lane
    const float e = _mm256_cvtss_f32(nn::fast_exp_avx2(_mm256_set1_ps((s[j] - m) * scale)));
    s[j] = e;
    total += e;
  }
  return total;
}

}  // namespace nibble::kernels::attention
