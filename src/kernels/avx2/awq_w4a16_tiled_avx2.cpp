// AWQ W4A16 GEMV over prepared (tiled) weights, AVX2 + FMA + F16C (layout: awq_w4a16_kernels.h).
//
// The AVX2 form of the fp32 tiled GEMV: a 64-byte line (16 output columns × 8 columns of k) is two
// ymm halves of 8 output columns. Nibble i of every dword is isolated with a shift and a mask,
// made exact (q − 8) with an integer subtract and converted to fp32, then meets x[k0+i] (broadcast)
// in one FMA: the same fp32 arithmetic as the AVX-512 kernels, with 8 lanes. AVX2 has 16 vector
// registers, so one activation row is done per pass, with the passes of a tile back to back while
// it is in L1/L2.
#include <immintrin.h>

#include <cstring>

#include "kernels/awq_w4a16_kernels.h"

namespace nibble::kernels::awq {

namespace {

template <DType SD>
inline __m256 load8_halves(const uint8_t* src) {
  const __m128i h = _mm_load_si128(reinterpret_cast<const __m128i*>(src));
  if constexpr (SD == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

// (q − 8) of nibble i of every dword, as fp32.
template <int I>
inline __m256 nibble_f32(__m256i w, __m256i mask, __m256i eight) {
  const __m256i q = _mm256_and_si256(I == 0 ? w : _mm256_srli_epi32(w, 4 * I), mask);
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight));
}

// One activation row m against tiles [t0, t1). Two chains per half (even/odd nibbles) keep the
// FMA latency hidden within the 16-register budget.
template <DType SD>
void tiles_row_avx2(const TiledF32Args& a, int64_t t0, int64_t t1, int64_t m) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G, L = G / 8;
  const int64_t tile_bytes = tiled_tile_bytes(K, G), group_bytes = tiled_lines_per_group(G) * 64;
  const __m256i mask = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  const float* xr = a.x + m * K;
  const float* xs = a.xsum + m * groups;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.tiled + t * tile_bytes;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* blk = tile + g * group_bytes;
      __m256 d0e = _mm256_setzero_ps(), d0o = d0e, d1e = d0e, d1o = d0e;
      for (int64_t j = 0; j < L; ++j) {
        const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + j * 64));
        const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + j * 64 + 32));
        const float* xk = xr + g * G + 8 * j;
#define NIBBLE_STEP(I, DA, DB)                                        \
  {                                                                   \
    const __m256 xb = _mm256_broadcast_ss(xk + I);                    \
    DA = _mm256_fmadd_ps(nibble_f32<I>(w0, mask, eight), xb, DA);     \
    DB = _mm256_fmadd_ps(nibble_f32<I>(w1, mask, eight), xb, DB);     \
  }
        NIBBLE_STEP(0, d0e, d1e)
        NIBBLE_STEP(1, d0o, d1o)
        NIBBLE_STEP(2, d0e, d1e)
        NIBBLE_STEP(3, d0o, d1o)
        NIBBLE_STEP(4, d0e, d1e)
        NIBBLE_STEP(5, d0o, d1o)
        NIBBLE_STEP(6, d0e, d1e)
        NIBBLE_STEP(7, d0o, d1o)
#undef NIBBLE_STEP
      }
      const uint8_t* sl = blk + L * 64;
      const __m256 xsum = _mm256_set1_ps(xs[g]);
      acc0 = _mm256_fmadd_ps(_mm256_add_ps(d0e, d0o), load8_halves<SD>(sl), acc0);
      acc0 = _mm256_fmadd_ps(load8_halves<SD>(sl + 32), xsum, acc0);
      acc1 = _mm256_fmadd_ps(_mm256_add_ps(d1e, d1o), load8_halves<SD>(sl + 16), acc1);
      acc1 = _mm256_fmadd_ps(load8_halves<SD>(sl + 48), xsum, acc1);
    }
    const int64_t n0 = t * kTileCols;
    float* out = a.acc + m * N + n0;
    if (N - n0 >= kTileCols) {
      _mm256_storeu_ps(out, acc0);
      _mm256_storeu_ps(out + 8, acc1);
    } else {  // ragged last tile: only the real columns are written
      alignas(32) float tmp[kTileCols];
      _mm256_store_ps(tmp, acc0);
      _mm256_store_ps(tmp + 8, acc1);
      std::memcpy(out, tmp, size_t(N - n0) * sizeof(float));
    }
  }
}

}  // namespace

void awq_gemv_tiled_avx2(const TiledF32Args& a, int64_t t0, int64_t t1) {
  // one row per pass; for several rows, every pass over a tile while it is still in L1/L2
  const int64_t step = a.p.M == 1 ? t1 - t0 : 1;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t te = t + step < t1 ? t + step : t1;
    for (int64_t m = 0; m < a.p.M; ++m) {
      if (a.p.sdtype == DType::BF16) tiles_row_avx2<DType::BF16>(a, t, te, m);
      else tiles_row_avx2<DType::F16>(a, t, te, m);
    }
  }
}

}  // namespace nibble::kernels::awq
