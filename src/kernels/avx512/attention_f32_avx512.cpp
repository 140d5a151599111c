// AVX-512 softmax row of the block's joint attention (see kernels/linear_f32_kernels.h).
// GCC 12 reports the intrinsics' own _mm*_undefined_* operands (reductions, casts) as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/linear_f32_kernels.h"
#include "nn/fast_exp_avx512.h"

namespace nibble::kernels::attention {

float softmax_row_avx512(float* s, int64_t n, float scale) {
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  float m = _mm512_reduce_max_ps(mx);
  for (int64_t t = j; t < n; ++t) m = s[t] > m ? s[t] : m;
  const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = nn::fast_exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm), vs));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 k = __mmask16((1u << (n - j)) - 1);
    const __m512 e = nn::fast_exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm), vs));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace nibble::kernels::attention
