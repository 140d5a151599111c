// AWQ W4A16 GEMV over prepared (tiled) weights, AVX-512F fp32 FMA (layout: awq_w4a16_kernels.h).
//
// Lanes are output columns. A 64-byte line holds, per column, one dword of 8 nibbles (columns
// k0..k0+7 of the input); "dword >> 4i" puts nibble i in the low 4 bits, which vpermps uses as the
// index into a table of exact fp32 (q − 8). Each decoded vector meets x[k0+i] broadcast from memory
// in one FMA: fp32 products of an exact weight code, fp32 sums — the arithmetic of the spec's GEMV
// with no bf16 split of x. Used for fp32 activations (three exact bf16 parts would triple the
// vdpbf16ps work) and on AVX-512 CPUs without BF16.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/awq_w4a16_kernels.h"

namespace nibble::kernels::awq {

namespace {

template <DType SD>
inline __m512 load16_halves(const uint8_t* src) {
  const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (SD == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

// Software prefetch 4 KB ahead (as the bf16 kernel, see there). On 4 KiB pages 16 KB was measured
// against the previous 512 B (one process, interleaved, K = 3072, N = 18432, 2 threads, loaded host):
// 1.16× at M = 1, 2.0× at M = 2, 1.25× at M = 8. With the stream on huge pages 4 KB and 16 KB are equal
// here (M = 1, NIBBLE_ISA=avx512, 2 rounds each: 3.25–3.39 vs 3.23–3.31× the bf16 GEMV); 4 KB keeps
// the two kernels alike. Clamped to the stream's last line.
constexpr int64_t kPrefetchAhead = 4096;

// MB activation rows against tiles [t0, t1). Chains: 8 per row (one per nibble position) for a
// single row, 4 per row otherwise, so the FMA latency never bounds the loop.
template <int MB, DType SD>
void tiles_rows_f32(const TiledF32Args& a, int64_t t0, int64_t t1, int64_t m0) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G, L = G / 8;
  const int64_t tile_bytes = tiled_tile_bytes(K, G), group_bytes = tiled_lines_per_group(G) * 64;
  constexpr int CH = MB == 1 ? 8 : 4;
  const int64_t last_line = ((N + kTileCols - 1) / kTileCols) * tile_bytes - 64;  // offset in the stream
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const float* xr[MB];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    xr[m] = a.x + (m0 + m) * K;
    xs[m] = a.xsum + (m0 + m) * groups;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.tiled + t * tile_bytes;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* blk = tile + g * group_bytes;
      __m512 d[MB][CH];
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < CH; ++c) d[m][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; ++j) {
        const int64_t ahead = (blk - a.tiled) + j * 64 + kPrefetchAhead;
        _mm_prefetch(reinterpret_cast<const char*>(a.tiled + (ahead < last_line ? ahead : last_line)), _MM_HINT_T0);
        const __m512i w = _mm512_load_si512(blk + j * 64);
        const float* xk = nullptr;
        for (int i = 0; i < 8; ++i) {
          const __m512 wv = _mm512_permutexvar_ps(i == 0 ? w : _mm512_srli_epi32(w, 4 * i), table);
          for (int m = 0; m < MB; ++m) {
            xk = xr[m] + g * G + 8 * j;
            d[m][i % CH] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xk[i]), d[m][i % CH]);
          }
        }
      }
      const uint8_t* sl = blk + L * 64;
      const __m512 s = load16_halves<SD>(sl), z = load16_halves<SD>(sl + 32);
      for (int m = 0; m < MB; ++m) {
        __m512 dm = d[m][0];
        for (int c = 1; c < CH; ++c) dm = _mm512_add_ps(dm, d[m][c]);
        acc[m] = _mm512_fmadd_ps(dm, s, acc[m]);
        acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[m][g]), acc[m]);
      }
    }
    const int64_t n0 = t * kTileCols;
    const int64_t cols = N - n0 < kTileCols ? N - n0 : kTileCols;
    const __mmask16 keep = cols == kTileCols ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(a.acc + (m0 + m) * N + n0, keep, acc[m]);
  }
}

template <int MB>
void tiles_dt_f32(const TiledF32Args& a, int64_t t0, int64_t t1, int64_t m0) {
  if (a.p.sdtype == DType::BF16) tiles_rows_f32<MB, DType::BF16>(a, t0, t1, m0);
  else tiles_rows_f32<MB, DType::F16>(a, t0, t1, m0);
}

}  // namespace

void awq_gemv_tiled_avx512(const TiledF32Args& a, int64_t t0, int64_t t1) {
  // rows beyond one pass of 4: every pass over a tile while it is still in L1/L2
  const int64_t step = a.p.M <= 4 ? t1 - t0 : 1;
  for (int64_t t = t0; t < t1; t += step)
    for (int64_t m0 = 0; m0 < a.p.M; m0 += 4) {
      const int64_t te = t + step < t1 ? t + step : t1;
      switch (a.p.M - m0 < 4 ? a.p.M - m0 : 4) {
        case 1: tiles_dt_f32<1>(a, t, te, m0); break;
        case 2: tiles_dt_f32<2>(a, t, te, m0); break;
        case 3: tiles_dt_f32<3>(a, t, te, m0); break;
        default: tiles_dt_f32<4>(a, t, te, m0); break;
      }
    }
}

}  // namespace nibble::kernels::awq
