// AVX-512 kernels of the dense fp32 linear (layouts: kernels/linear_f32_kernels.h).
// GEMM micro-kernel: MR (≤ 8) activation rows × one 32-column panel, 2·MR zmm accumulators, one
// broadcast per row and two weight loads per k. GEMV: 4 weight rows at a time, 16 k-lanes each,
// fp32/bf16/fp16 weights widened in registers.
// GCC 12 reports the intrinsics' own _mm*_undefined_* operands (reductions, casts) as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/linear_f32_kernels.h"

namespace nibble::kernels::linear {

namespace {

template <int MR>
inline void micro_kernel(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy,
                         bool accumulate, __mmask16 mask0, __mmask16 mask1) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      c0[r] = _mm512_maskz_loadu_ps(mask0, y + r * ldy);
      c1[r] = _mm512_maskz_loadu_ps(mask1, y + r * ldy + 16);
    } else {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(wp + k * kPanel);
    const __m512 b1 = _mm512_load_ps(wp + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, mask0, c0[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, mask1, c1[r]);
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool, __mmask16, __mmask16);
constexpr int kMr = 8;  // rows per micro-tile: 16 accumulators (12 rows measured slower: spills)
constexpr MicroFn kMicro[kMr + 1] = {nullptr,         micro_kernel<1>, micro_kernel<2>, micro_kernel<3>, micro_kernel<4>,
                                     micro_kernel<5>, micro_kernel<6>, micro_kernel<7>, micro_kernel<8>};

inline __m512 load_weight16(const void* w, DType wdt, int64_t i, __mmask16 m) {
  switch (wdt) {
    case DType::F32: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + i);
    case DType::BF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default: {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
      return _mm512_cvtph_ps(h);
    }
  }
}

// R weight rows [n, n+R) against activation row x: out[r] = Σ_k x[k]·W[n+r, k].
template <int R>
inline void dot_rows(const float* x, int64_t K, const void* w, DType wdt, int64_t n, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, load_weight16(w, wdt, (n + r) * K + k, 0xFFFF), acc[r]);
  }
  if (k < K) {
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, load_weight16(w, wdt, (n + r) * K + k, m), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace

void linear_gemm_avx512(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1) {
  const int64_t K = w.K, N = w.N;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = k0 + kKc < K ? kKc : K - k0;
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = int(M - m0 < kMr ? M - m0 : kMr);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, cols = N - n0 < kPanel ? N - n0 : kPanel;
        const __mmask16 mask0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
        const __mmask16 mask1 = cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
        kMicro[mr](x + m0 * K + k0, K, w.data + (p * K + k0) * kPanel, kc, y + m0 * N + n0, N, k0 != 0, mask0, mask1);
      }
    }
  }
}

void linear_gemv_avx512(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* y,
                        int64_t n0, int64_t n1) {
  gemv_columns(x, M, K, w, wdt, N, y, n0, n1, dot_rows<4>, dot_rows<1>);
}

}  // namespace nibble::kernels::linear
