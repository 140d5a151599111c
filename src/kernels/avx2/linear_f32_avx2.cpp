// AVX2 + FMA kernels of the dense fp32 linear (layouts: kernels/linear_f32_kernels.h), for hosts
// without AVX-512, which ran the scalar oracle before: 9.3 → 115 GFLOP/s at M = 1024, K = N = 3072
// and 6.4 → 92 GFLOP/s for the GEMV at M = 4 (2 threads, `--isa avx2` on this Zen 4; k chunks of
// 128–3072 all within 10 %).
// GEMM micro-kernel: MR (≤ 6) activation rows × one half panel (16 columns, two ymm): 2·MR ymm
// accumulators, two weight loads and MR broadcasts per k (15 of the 16 ymm registers). k walks the
// same chunks as the AVX-512 kernel, partial sums in y, so every output is one fma chain in k order.
// GEMV: 4 weight rows at a time, 8 k-lanes each, fp32/bf16/fp16 weights widened in registers.
#include <immintrin.h>

#include <cstring>

#include "kernels/linear_f32_kernels.h"

namespace nibble::kernels::linear {

namespace {

constexpr int kHalf = 16;  // columns per micro-tile (half of a 32-column panel)

// Lanes [0, n) of 8 set (n clamped to 0..8), for maskload / maskstore.
inline __m256i lane_mask(int64_t n) {
  const int c = n <= 0 ? 0 : n >= 8 ? 8 : int(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int MR>
void micro_kernel(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy, bool accumulate,
                  __m256i mask0, __m256i mask1) {
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      c0[r] = _mm256_maskload_ps(y + r * ldy, mask0);
      c1[r] = _mm256_maskload_ps(y + r * ldy + 8, mask1);
    } else {
      c0[r] = _mm256_setzero_ps();
      c1[r] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(wp + k * kPanel);
    const __m256 b1 = _mm256_load_ps(wp + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_maskstore_ps(y + r * ldy, mask0, c0[r]);
    _mm256_maskstore_ps(y + r * ldy + 8, mask1, c1[r]);
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool, __m256i, __m256i);
constexpr int kMr = 6;
constexpr MicroFn kMicro[kMr + 1] = {nullptr,         micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                     micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

// 8 weights from element i on (all 8 in range), widened to fp32.
inline __m256 load_weight8(const void* w, DType wdt, int64_t i) {
  switch (wdt) {
    case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(w) + i);
    case DType::BF16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
      return _mm256_cvtph_ps(h);
    }
  }
}
// The k tail (n < 8 elements) widened through a zero-padded buffer: lanes ≥ n are 0 (0·x adds +0).
inline __m256 load_weight_tail(const void* w, DType wdt, int64_t i, int64_t n) {
  alignas(32) uint8_t buf[32] = {};
  const size_t es = wdt == DType::F32 ? 4 : 2;
  std::memcpy(buf, static_cast<const uint8_t*>(w) + i * int64_t(es), size_t(n) * es);
  return load_weight8(buf, wdt, 0);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// R weight rows [n, n+R) against activation row x: out[r] = Σ_k x[k]·W[n+r, k].
template <int R>
void dot_rows(const float* x, int64_t K, const void* w, DType wdt, int64_t n, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(xv, load_weight8(w, wdt, (n + r) * K + k), acc[r]);
  }
  if (k < K) {
    const __m256 xv = _mm256_maskload_ps(x + k, lane_mask(K - k));
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(xv, load_weight_tail(w, wdt, (n + r) * K + k, K - k), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum8(acc[r]);
}

}  // namespace

void linear_gemm_avx2(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1) {
  const int64_t K = w.K, N = w.N;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = k0 + kKc < K ? kKc : K - k0;
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = int(M - m0 < kMr ? M - m0 : kMr);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t h = 0; h < kPanel / kHalf; ++h) {
          const int64_t n0 = p * kPanel + h * kHalf, cols = N - n0;
          if (cols <= 0) break;
          kMicro[mr](x + m0 * K + k0, K, w.data + (p * K + k0) * kPanel + h * kHalf, kc, y + m0 * N + n0, N, k0 != 0,
                     lane_mask(cols), lane_mask(cols - 8));
        }
    }
  }
}

void linear_gemv_avx2(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* y,
                      int64_t n0, int64_t n1) {
  gemv_columns(x, M, K, w, wdt, N, y, n0, n1, dot_rows<4>, dot_rows<1>);
}

}  // namespace nibble::kernels::linear
