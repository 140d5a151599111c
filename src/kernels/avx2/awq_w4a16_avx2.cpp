// AWQ W4A16 kernels for AVX2 + FMA + F16C (8-lane fp32).
//
// GEMV: 8 packed bytes (16 columns) widen to 8 dwords; low nibble = AND 15, high = shift 4, each
// converted and offset by −8 (exact), multiplied with the even/odd activation streams; one scale
// FMA per group, zero term z·Σx per group added per column. GEMM: rows dequantized once per task to
// fp32 (natural order), register tile 2 × 8 activation rows × 6 weight rows.
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* used by intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "kernels/awq_w4a16_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::awq {

namespace {

constexpr int64_t kSub = kStageCols;  // columns whose scales/zero terms are staged at once

inline __m256 load8_halves(const uint16_t* src, int count, DType dt) {
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  __m128i h;
  if (count >= 8) {
    h = _mm_loadu_si128((const __m128i*)src);
  } else {
    std::memcpy(tmp, src, size_t(count) * 2);
    h = _mm_load_si128((const __m128i*)tmp);
  }
  if (dt == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

void stage_scales(const Problem& p, int64_t nb0, int cols, const float* xsum, int64_t M, float* sblk, float* zblk,
                  float* zterm) {
  const int64_t groups = p.K / p.G;
  for (int64_t g = 0; g < groups; ++g)
    for (int j = 0; j < cols; j += 8) {
      const int cnt = kmin(8, cols - j);
      _mm256_storeu_ps(sblk + g * kSub + j, load8_halves(p.wscales + g * p.N + nb0 + j, cnt, p.sdtype));
      _mm256_storeu_ps(zblk + g * kSub + j, load8_halves(p.wzeros + g * p.N + nb0 + j, cnt, p.sdtype));
    }
  if (!zterm) return;
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < cols; j += 8) {
      __m256 t = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g)
        t = _mm256_fmadd_ps(_mm256_loadu_ps(zblk + g * kSub + j), _mm256_set1_ps(xsum[m * groups + g]), t);
      _mm256_storeu_ps(zterm + m * kSub + j, t);
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bytes (tail: fewer, zero filled) → (q_lo − 8, q_hi − 8) as fp32.
inline void decode8(const uint8_t* src, int bytes, __m256* lo, __m256* hi) {
  __m128i raw;
  if (bytes >= 8) {
    raw = _mm_loadl_epi64((const __m128i*)src);
  } else {
    uint64_t t = 0;
    std::memcpy(&t, src, size_t(bytes));
    raw = _mm_cvtsi64_si128((long long)t);
  }
  const __m256i b = _mm256_cvtepu8_epi32(raw);
  const __m256i eight = _mm256_set1_epi32(8);
  *lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
  *hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
}

template <int MB>
void gemv_rows(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G, cpg = chunks_per_group(G, kChunkAvx2);
  const int64_t full = G / kChunkAvx2;
  const int tail_bytes = int((G % kChunkAvx2) / 2);
  const float* xc = static_cast<const float*>(a.xc);
  for (int64_t n = nb0; n < nb1; ++n) {
    const uint8_t* qrow = p.qweight + n * (K / 2);
    // two accumulator sets (even/odd groups) keep the scale FMA chain off the critical path
    __m256 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    auto group = [&](int64_t g, __m256* accx) __attribute__((always_inline)) {
      __m256 dot[MB];
      for (int m = 0; m < MB; ++m) dot[m] = _mm256_setzero_ps();
      const uint8_t* qg = qrow + g * (G / 2);
      for (int64_t t = 0; t < cpg; ++t) {
        __m256 lo, hi;
        decode8(qg + t * 8, t < full ? 8 : tail_bytes, &lo, &hi);
        const int64_t off = (g * cpg + t) * kChunkAvx2;
        for (int m = 0; m < MB; ++m) {
          const float* xr = xc + (m0 + m) * a.xc_row_elems + off;
          dot[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), dot[m]);
          dot[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + 8), dot[m]);
        }
      }
      const __m256 s = _mm256_set1_ps(sblk[g * kSub + (n - nb0)]);
      for (int m = 0; m < MB; ++m) accx[m] = _mm256_fmadd_ps(dot[m], s, accx[m]);
    };
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      group(g, acc0);
      group(g + 1, acc1);
    }
    if (g < groups) group(g, acc0);
    for (int m = 0; m < MB; ++m)
      a.acc[(m0 + m) * N + n] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + zterm[(m0 + m) * kSub + (n - nb0)];
  }
}

}  // namespace

void awq_gemv_avx2(const GemvArgs& a, int64_t n0, int64_t n1, float* ws) {
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

constexpr int kNr = 4;  // 2 × 4 accumulators + 2 activation vectors + 1 broadcast fit the 16 ymm registers

void dequant_rows_f32(const Problem& p, int64_t n0, int64_t n1, float* wb, float* sz) {
  const int64_t K = p.K, G = p.G, groups = K / G;
  float* sblk = sz;
  float* zblk = sz + groups * kSub;
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kSub) {
    const int cols = int(kmin<int64_t>(kSub, n1 - nb0));
    stage_scales(p, nb0, cols, nullptr, 0, sblk, zblk, nullptr);
    for (int j = 0; j < cols; ++j) {
      const int64_t n = nb0 + j;
      const uint8_t* qrow = p.qweight + n * (K / 2);
      float* out = wb + (n - n0) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 s = _mm256_set1_ps(sblk[g * kSub + j]), z = _mm256_set1_ps(zblk[g * kSub + j]);
        for (int64_t c = 0; c < G / 2; c += 8) {
          const int bytes = int(kmin<int64_t>(8, G / 2 - c));
          __m256 lo, hi;
          decode8(qrow + g * (G / 2) + c, bytes, &lo, &hi);
          lo = _mm256_fmadd_ps(lo, s, z);
          hi = _mm256_fmadd_ps(hi, s, z);
          // interleave even/odd columns back into natural order
          const __m256 a0 = _mm256_unpacklo_ps(lo, hi), a1 = _mm256_unpackhi_ps(lo, hi);
          alignas(32) float tmp[16];
          _mm256_store_ps(tmp, _mm256_permute2f128_ps(a0, a1, 0x20));
          _mm256_store_ps(tmp + 8, _mm256_permute2f128_ps(a0, a1, 0x31));
          std::memcpy(out + g * G + 2 * c, tmp, size_t(2 * bytes) * sizeof(float));
        }
      }
    }
  }
}

template <int MV, int NR>
void tile(const float* xp, int64_t ldx, int64_t Mp, int64_t m0, const float* wb, int64_t K, float* accT) {
  __m256 acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
  const float* xr = xp;  // this row block, packed [k][ldx]
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xr + k * ldx + 8 * v);
    for (int r = 0; r < NR; ++r) {
      const __m256 b = _mm256_broadcast_ss(wb + r * K + k);
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(xv[v], b, acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(accT + r * Mp + m0 + 8 * v, acc[r][v]);
}

// The full 2 × 4 tile written out: GCC 12 keeps a 2-D array of accumulators in memory here.
void tile_2x4(const float* xp, int64_t ldx, int64_t Mp, int64_t m0, const float* wb, int64_t K, float* accT) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const float* xr = xp;  // this row block, packed [k][ldx]
  const float *w0 = wb, *w1 = wb + K, *w2 = wb + 2 * K, *w3 = wb + 3 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 x0 = _mm256_loadu_ps(xr + k * ldx), x1 = _mm256_loadu_ps(xr + k * ldx + 8);
    __m256 b = _mm256_broadcast_ss(w0 + k);
    c00 = _mm256_fmadd_ps(x0, b, c00);
    c01 = _mm256_fmadd_ps(x1, b, c01);
    b = _mm256_broadcast_ss(w1 + k);
    c10 = _mm256_fmadd_ps(x0, b, c10);
    c11 = _mm256_fmadd_ps(x1, b, c11);
    b = _mm256_broadcast_ss(w2 + k);
    c20 = _mm256_fmadd_ps(x0, b, c20);
    c21 = _mm256_fmadd_ps(x1, b, c21);
    b = _mm256_broadcast_ss(w3 + k);
    c30 = _mm256_fmadd_ps(x0, b, c30);
    c31 = _mm256_fmadd_ps(x1, b, c31);
  }
  float* o = accT + m0;
  _mm256_storeu_ps(o, c00);
  _mm256_storeu_ps(o + 8, c01);
  _mm256_storeu_ps(o + Mp, c10);
  _mm256_storeu_ps(o + Mp + 8, c11);
  _mm256_storeu_ps(o + 2 * Mp, c20);
  _mm256_storeu_ps(o + 2 * Mp + 8, c21);
  _mm256_storeu_ps(o + 3 * Mp, c30);
  _mm256_storeu_ps(o + 3 * Mp + 8, c31);
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

void awq_gemm_avx2(const GemmArgs& a, int64_t n0, int64_t n1, float* ws) {
  const Problem& p = a.p;
  float* wb = ws;                     // gemm_ws_floats(p, n1 - n0): rows, then staged scales
  float* sz = ws + (n1 - n0) * p.K;
  dequant_rows_f32(p, n0, n1, wb, sz);
  const float* xp = static_cast<const float*>(a.xp);
  for (int64_t m0 = 0; m0 < a.Mp; m0 += 16) {
    const bool two = m0 + 16 <= a.Mp;
    for (int64_t r0 = n0; r0 < n1; r0 += kNr) {
      const int nr = int(kmin<int64_t>(kNr, n1 - r0));
      const float* w = wb + (r0 - n0) * p.K;
      float* out = a.accT + r0 * a.Mp;
      if (two && nr == kNr) tile_2x4(xp + m0 * p.K, 16, a.Mp, m0, w, p.K, out);
      else if (two) tile_nr<2>(nr, xp + m0 * p.K, two ? 16 : 8, a.Mp, m0, w, p.K, out);
      else tile_nr<1>(nr, xp + m0 * p.K, two ? 16 : 8, a.Mp, m0, w, p.K, out);
    }
  }
}

}  // namespace nibble::kernels::awq
