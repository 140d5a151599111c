// AWQ W4A16 kernels for AVX-512 F/BW/VL/DQ (fp32 FMA; used by the avx512 and avx512vnni levels,
// and by avx512bf16 when G is not a multiple of 8).
//
// GEMV: 16 packed bytes (32 columns) widen to 16 dwords; the low nibble indexes a 16-entry fp32
// table holding (i − 8) directly (vpermps ignores the upper index bits), the high nibble after one
// shift; activations are pre-split into even/odd column streams, so the inner loop is
// load+widen, shift, 2 vpermps, 2 FMA per 32 weights, plus one scale FMA per group; the zero term
// is z·Σx per group, added per column. GEMM: rows dequantized once per task to fp32 (natural
// column order), register tile 2 × 16 activation rows × 6 weight rows.
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* used by intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>


#include "kernels/awq_w4a16_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::awq {

namespace {

constexpr int64_t kSub = kStageCols;  // columns whose scales/zero terms are staged at once

inline __m512 load_halves(const uint16_t* src, int count, DType dt) {
  const __mmask16 m = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, src);
  if (dt == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

void stage_scales(const Problem& p, int64_t nb0, int cols, const float* xsum, int64_t M, float* sblk, float* zblk,
                  float* zterm) {
  const int64_t groups = p.K / p.G;
  for (int64_t g = 0; g < groups; ++g)
    for (int j = 0; j < cols; j += 16) {
      const int cnt = kmin(16, cols - j);
      _mm512_storeu_ps(sblk + g * kSub + j, load_halves(p.wscales + g * p.N + nb0 + j, cnt, p.sdtype));
      _mm512_storeu_ps(zblk + g * kSub + j, load_halves(p.wzeros + g * p.N + nb0 + j, cnt, p.sdtype));
    }
  if (!zterm) return;
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < cols; j += 16) {
      __m512 t = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g)
        t = _mm512_fmadd_ps(_mm512_loadu_ps(zblk + g * kSub + j), _mm512_set1_ps(xsum[m * groups + g]), t);
      _mm512_storeu_ps(zterm + m * kSub + j, t);
    }
}

// The scales of a column block are K/G short runs, N elements apart: K/G concurrent streams that
// the hardware prefetcher does not track, so without this every run is a DRAM round trip.
inline void prefetch_scales(const Problem& p, int64_t nb0) {
  if (nb0 >= p.N) return;
  const int64_t groups = p.K / p.G;
  for (int64_t g = 0; g < groups; ++g) {
    const char* s = reinterpret_cast<const char*>(p.wscales + g * p.N + nb0);
    const char* z = reinterpret_cast<const char*>(p.wzeros + g * p.N + nb0);
    _mm_prefetch(s, _MM_HINT_T0);
    _mm_prefetch(s + 64, _MM_HINT_T0);
    _mm_prefetch(z, _MM_HINT_T0);
    _mm_prefetch(z + 64, _MM_HINT_T0);
  }
}

inline const __m512 code_table() { return _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); }

template <int MB>
void gemv_rows(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G, cpg = chunks_per_group(G, kChunkAvx512);
  const int64_t full = G / kChunkAvx512;
  const int tail_bytes = int((G % kChunkAvx512) / 2);
  const __mmask16 tail_mask = __mmask16((1u << tail_bytes) - 1);
  const __m512 table = code_table();
  const float* xc = static_cast<const float*>(a.xc);
  for (int64_t n = nb0; n < nb1; ++n) {
    const uint8_t* qrow = p.qweight + n * (K / 2);
    // two accumulator sets (even/odd groups) keep the scale FMA chain off the critical path
    __m512 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    auto group = [&](int64_t g, __m512* accx) __attribute__((always_inline)) {
      __m512 dot[MB];
      for (int m = 0; m < MB; ++m) dot[m] = _mm512_setzero_ps();
      const uint8_t* qg = qrow + g * (G / 2);
      for (int64_t t = 0; t < cpg; ++t) {
        const __m128i raw = t < full ? _mm_loadu_si128((const __m128i*)(qg + t * 16))
                                     : _mm_maskz_loadu_epi8(tail_mask, qg + t * 16);
        const __m512i b = _mm512_cvtepu8_epi32(raw);
        const __m512 lo = _mm512_permutexvar_ps(b, table);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        const int64_t off = (g * cpg + t) * kChunkAvx512;
        for (int m = 0; m < MB; ++m) {
          const float* xr = xc + (m0 + m) * a.xc_row_elems + off;
          dot[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), dot[m]);
          dot[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), dot[m]);
        }
      }
      const __m512 s = _mm512_set1_ps(sblk[g * kSub + (n - nb0)]);
      for (int m = 0; m < MB; ++m) accx[m] = _mm512_fmadd_ps(dot[m], s, accx[m]);
    };
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      group(g, acc0);
      group(g + 1, acc1);
    }
    if (g < groups) group(g, acc0);
    for (int m = 0; m < MB; ++m)
      a.acc[(m0 + m) * N + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + zterm[(m0 + m) * kSub + (n - nb0)];
  }
}

}  // namespace

void awq_gemv_avx512(const GemvArgs& a, int64_t n0, int64_t n1, float* ws) {
  const Problem& p = a.p;
  const int64_t groups = p.K / p.G;
  float* sblk = ws;  // gemv_ws_floats(p)
  float* zblk = sblk + groups * kSub;
  float* zterm = zblk + groups * kSub;
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kSub) {
    const int64_t nb1 = kmin(n1, nb0 + kSub);
    prefetch_scales(p, nb0 + 2 * kSub);
    stage_scales(p, nb0, int(nb1 - nb0), a.xsum, p.M, sblk, zblk, zterm);
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (kmin<int64_t>(4, p.M - m0)) {
        case 1: gemv_rows<1>(a, nb0, nb1, m0, sblk, zterm); break;
        case 2: gemv_rows<2>(a, nb0, nb1, m0, sblk, zterm); break;
        case 3: gemv_rows<3>(a, nb0, nb1, m0, sblk, zterm); break;
        default: gemv_rows<4>(a, nb0, nb1, m0, sblk, zterm); break;
      }
    }
  }
}

// ---------------------------------------------------------------- GEMM
namespace {

constexpr int kNr = 6;

// Dequantizes rows [n0, n1) to fp32 wb[row][K] in natural column order: (q − 8)·s + z.
void dequant_rows_f32(const Problem& p, int64_t n0, int64_t n1, float* wb, float* sz) {
  const int64_t K = p.K, G = p.G, groups = K / G;
  float* sblk = sz;
  float* zblk = sz + groups * kSub;
  const __m512 table = code_table();
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kSub) {
    const int cols = int(kmin<int64_t>(kSub, n1 - nb0));
    stage_scales(p, nb0, cols, nullptr, 0, sblk, zblk, nullptr);
    for (int j = 0; j < cols; ++j) {
      const int64_t n = nb0 + j;
      const uint8_t* qrow = p.qweight + n * (K / 2);
      float* out = wb + (n - n0) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 s = _mm512_set1_ps(sblk[g * kSub + j]), z = _mm512_set1_ps(zblk[g * kSub + j]);
        for (int64_t c = 0; c < G / 2; c += 16) {
          const int64_t cnt = kmin<int64_t>(16, G / 2 - c);  // bytes
          const __mmask16 m = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
          const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, qrow + g * (G / 2) + c));
          const __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, table), s, z);
          const __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), s, z);
          float* o = out + g * G + 2 * c;
          const int64_t cols_here = 2 * cnt;
          const __mmask16 m0 = cols_here >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols_here) - 1);
          const __mmask16 m1 = cols_here >= 32 ? __mmask16(0xFFFF)
                               : cols_here > 16 ? __mmask16((1u << (cols_here - 16)) - 1) : __mmask16(0);
          _mm512_mask_storeu_ps(o, m0, _mm512_permutex2var_ps(lo, lo_idx, hi));
          _mm512_mask_storeu_ps(o + 16, m1, _mm512_permutex2var_ps(lo, hi_idx, hi));
        }
      }
    }
  }
}

template <int MV, int NR>
void tile(const float* xp, int64_t ldx, int64_t Mp, int64_t m0, const float* wb, int64_t K, float* accT) {
  __m512 acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* xr = xp;  // this row block, packed [k][ldx]
  for (int64_t k = 0; k < K; ++k) {
    __m512 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(xr + k * ldx + 16 * v);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(wb[r * K + k]);
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_fmadd_ps(xv[v], b, acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(accT + r * Mp + m0 + 16 * v, acc[r][v]);
}

template <int MV>
void tile_nr(int nr, const float* xp, int64_t ldx, int64_t Mp, int64_t m0, const float* wb, int64_t K, float* accT) {
  switch (nr) {
    case 1: tile<MV, 1>(xp, ldx, Mp, m0, wb, K, accT); break;
    case 2: tile<MV, 2>(xp, ldx, Mp, m0, wb, K, accT); break;
    case 3: tile<MV, 3>(xp, ldx, Mp, m0, wb, K, accT); break;
    case 4: tile<MV, 4>(xp, ldx, Mp, m0, wb, K, accT); break;
    case 5: tile<MV, 5>(xp, ldx, Mp, m0, wb, K, accT); break;
    default: tile<MV, 6>(xp, ldx, Mp, m0, wb, K, accT); break;
  }
}

}  // namespace

void awq_gemm_avx512(const GemmArgs& a, int64_t n0, int64_t n1, float* ws) {
  const Problem& p = a.p;
  float* wb = ws;                     // gemm_ws_floats(p, n1 - n0): rows, then staged scales
  float* sz = ws + (n1 - n0) * p.K;
  dequant_rows_f32(p, n0, n1, wb, sz);
  const float* xp = static_cast<const float*>(a.xp);
  for (int64_t m0 = 0; m0 < a.Mp; m0 += 32) {
    const bool two = m0 + 32 <= a.Mp;
    for (int64_t r0 = n0; r0 < n1; r0 += kNr) {
      const int nr = int(kmin<int64_t>(kNr, n1 - r0));
      const float* w = wb + (r0 - n0) * p.K;
      float* out = a.accT + r0 * a.Mp;
      if (two) tile_nr<2>(nr, xp + m0 * p.K, two ? 32 : 16, a.Mp, m0, w, p.K, out);
      else tile_nr<1>(nr, xp + m0 * p.K, two ? 32 : 16, a.Mp, m0, w, p.K, out);
    }
  }
}

}  // namespace nibble::kernels::awq
