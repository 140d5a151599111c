// bf16 dense GEMM micro-kernel and activation packing, AVX-512 BF16 (layouts: kernels/dense_bf16.h).
//
// Micro-tile: R ≤ 6 rows × 64 columns (one panel) = 24 fp32 accumulators. Per k pair: four 64-byte
// weight loads (the panel's pair lines, L1-resident for the chunk) and, per row, one broadcast of the
// row's bf16 pair into four vdpbf16ps (12 rows × 32 columns, one broadcast per two, ran at half the
// peak) (intrinsics: an asm embedded broadcast made GCC 12 spill all
// 24 accumulators every step). No allocation here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/dense_bf16_kernels.h"

namespace nibble::kernels::dense_bf16 {

namespace {


template <int R>
void tile(const uint32_t* xp, int64_t nq, const uint16_t* wp, bool accumulate, float* y, int64_t ldy,
          const __mmask16* km) {
  __m512 a[R][4];
  if (accumulate) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm512_maskz_loadu_ps(km[v], y + r * ldy + 16 * v);
  } else {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < nq; ++q) {
    __m512bh w[4];
    for (int v = 0; v < 4; ++v) w[v] = (__m512bh)_mm512_load_si512(wp + q * 128 + 32 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[r * nq + q]));
      for (int v = 0; v < 4; ++v) a[r][v] = _mm512_dpbf16_ps(a[r][v], xb, w[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, km[v], a[r][v]);
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint16_t*, bool, float*, int64_t, const __mmask16*);
constexpr TileFn kTiles[kMr + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace

void pack_x_avx512bf16(const float* x, int64_t K, int64_t m0, int64_t rows, int64_t q0, int64_t nq, uint32_t* xp) {
  const int64_t k0 = 2 * q0, nk = 2 * nq;  // k range [k0, k0 + nk), clipped to K (zero padded)
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + (m0 + r) * K + k0;
    uint32_t* dst = xp + r * nq;
    const int64_t valid = K - k0 < nk ? K - k0 : nk;
    for (int64_t k = 0; k < nk; k += 32) {
      const int64_t n = valid - k;
      const __mmask16 ma = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
      const __mmask16 mb = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
      const __m512 lo = _mm512_maskz_loadu_ps(ma, src + k), hi = _mm512_maskz_loadu_ps(mb, src + k + 16);
      // RNE to bf16; element i of the result is lo[i] (i < 16) / hi[i − 16]: pairs stay (2q, 2q+1)
      const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      const int64_t words = nk - k < 32 ? (nk - k) / 2 : 16;
      const __mmask16 ms = words >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << words) - 1);
      _mm512_mask_storeu_epi32(dst + k / 2, ms, packed);
    }
  }
}

void gemm_chunk_avx512bf16(const uint32_t* xp, int64_t rows, int64_t nq, const PackedBf16Weight& w, int64_t q0,
                           int64_t p0, int64_t p1, bool accumulate, float* y, int64_t m0) {
  const int64_t N = w.N;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* wp = w.data + (p * w.K2 + q0) * kPanel * 2;
    const int64_t n0 = p * kPanel, cols = N - n0 < kPanel ? N - n0 : kPanel;
    __mmask16 km[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t c = cols - 16 * v;
      km[v] = c >= 16 ? __mmask16(0xFFFF) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
      const int64_t rr = rows - r0 < kMr ? rows - r0 : kMr;
      kTiles[rr](xp + r0 * nq, nq, wp, accumulate, y + (m0 + r0) * N + n0, N, km);
    }
  }
}

}  // namespace nibble::kernels::dense_bf16
