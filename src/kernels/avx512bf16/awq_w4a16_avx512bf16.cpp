// AWQ W4A16 kernels for AVX-512 + BF16 (vdpbf16ps; Zen 4, Sapphire Rapids).
//
// GEMV (small M): per weight row and group, 32 packed bytes (64 columns) are decoded with one
// vpermw per nibble position into exact bf16 values (q − 8) ∈ [−8, 7]: a 16-bit word of the packed
// row holds columns 4j..4j+3 in its four nibbles, so "word >> 4r" indexes the 16-entry table and
// the activation streams are pre-arranged as X_r[j] = x[c0 + 4j + r]. The activations are exact
// bf16 parts of x (1, 2 or 3 parts for bf16/f16/f32 input), so every vdpbf16ps product is exact
// and only the fp32 sums round: the same arithmetic class as the spec's fp32 GEMV. Per group:
// acc += s·dot; the zero term z·Σx is added once per column from the group sums.
// GEMM (larger M): weight rows are dequantized once per task, rounded to bf16 (as the kitchen's
// MMA tier does for 8 < M) and stored as (w[2c], w[2c+1]) pairs; the register tile is
// 2 × 16 activation rows × 6 weight rows, x broadcast-free (activations are the vector operand).
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* used by intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>


#include "kernels/awq_w4a16_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::awq {

namespace {

constexpr int64_t kSub = kStageCols;  // columns whose scales/zero terms are staged at once

// 16 halves (bf16 or f16) → fp32, the first `count` lanes (rest zero).
inline __m512 load_halves(const uint16_t* src, int count, DType dt) {
  const __mmask16 m = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, src);
  if (dt == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Stages, for columns [nb0, nb0+cols): sblk[g][j] = s[g, n] and (if zterm) zterm[m][j] = Σ_g z[g,n]·xsum[m,g].
void stage_scales(const Problem& p, int64_t nb0, int cols, const float* xsum, int64_t M, float* sblk, float* zblk,
                  float* zterm) {
  const int64_t groups = p.K / p.G;
  for (int64_t g = 0; g < groups; ++g)
    for (int j = 0; j < cols; j += 16) {
      const int cnt = kmin(16, cols - j);
      _mm512_storeu_ps(sblk + g * kSub + j, load_halves(p.wscales + g * p.N + nb0 + j, cnt, p.sdtype));
      if (zblk) _mm512_storeu_ps(zblk + g * kSub + j, load_halves(p.wzeros + g * p.N + nb0 + j, cnt, p.sdtype));
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256bh as_bh(__m256i v) { return (__m256bh)v; }

// CPG: chunks per group known at compile time (1 for G = 64, 2 for G = 128) or 0 (runtime, with a
// masked tail chunk). Each chunk feeds two independent vdpbf16ps chains (nibbles 0,2 and 1,3) so
// the chain latency does not bound the loop.
template <int MB, int P, int CPG>
void gemv_rows(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G;
  const int64_t cpg = CPG ? CPG : chunks_per_group(G, kChunkBf16);
  const int64_t full = CPG ? CPG : G / kChunkBf16;
  const __mmask8 tail_mask = __mmask8((1u << ((G % kChunkBf16) / 8)) - 1);
  // bf16 of (i − 8), i = 0..15
  const __m256i table = _mm256_setr_epi16(
      (short)0xC100, (short)0xC0E0, (short)0xC0C0, (short)0xC0A0, (short)0xC080, (short)0xC040, (short)0xC000,
      (short)0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0);
  const uint16_t* xc = static_cast<const uint16_t*>(a.xc);
  const uint16_t* xrow[MB][P];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < P; ++q) xrow[m][q] = xc + ((m0 + m) * P + q) * a.xc_row_elems;

  for (int64_t n = nb0; n < nb1; ++n) {
    const uint8_t* qrow = p.qweight + n * (K / 2);
    // two accumulator sets (even/odd groups) keep the scale FMA chain off the critical path
    __m256 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    auto group = [&](int64_t g, __m256* accx) __attribute__((always_inline)) {
      __m256 da[MB], db[MB];
      for (int m = 0; m < MB; ++m) da[m] = db[m] = _mm256_setzero_ps();
      const uint8_t* qg = qrow + g * (G / 2);
      for (int64_t t = 0; t < cpg; ++t) {
        const __m256i w = (CPG || t < full) ? _mm256_loadu_si256((const __m256i*)(qg + t * 32))
                                            : _mm256_maskz_loadu_epi32(tail_mask, qg + t * 32);
        const __m256i a0 = _mm256_permutexvar_epi16(w, table);
        const __m256i a1 = _mm256_permutexvar_epi16(_mm256_srli_epi16(w, 4), table);
        const __m256i a2 = _mm256_permutexvar_epi16(_mm256_srli_epi16(w, 8), table);
        const __m256i a3 = _mm256_permutexvar_epi16(_mm256_srli_epi16(w, 12), table);
        const int64_t off = (g * cpg + t) * kChunkBf16;
        for (int m = 0; m < MB; ++m)
          for (int q = 0; q < P; ++q) {
            const uint16_t* xr = xrow[m][q] + off;
            da[m] = _mm256_dpbf16_ps(da[m], as_bh(a0), as_bh(_mm256_loadu_si256((const __m256i*)xr)));
            db[m] = _mm256_dpbf16_ps(db[m], as_bh(a1), as_bh(_mm256_loadu_si256((const __m256i*)(xr + 16))));
            da[m] = _mm256_dpbf16_ps(da[m], as_bh(a2), as_bh(_mm256_loadu_si256((const __m256i*)(xr + 32))));
            db[m] = _mm256_dpbf16_ps(db[m], as_bh(a3), as_bh(_mm256_loadu_si256((const __m256i*)(xr + 48))));
          }
      }
      const __m256 s = _mm256_set1_ps(sblk[g * kSub + (n - nb0)]);
      for (int m = 0; m < MB; ++m) accx[m] = _mm256_fmadd_ps(_mm256_add_ps(da[m], db[m]), s, accx[m]);
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

template <int MB, int P>
void gemv_rows_g(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  if (a.p.G == 64) gemv_rows<MB, P, 1>(a, nb0, nb1, m0, sblk, zterm);
  else if (a.p.G == 128) gemv_rows<MB, P, 2>(a, nb0, nb1, m0, sblk, zterm);
  else gemv_rows<MB, P, 0>(a, nb0, nb1, m0, sblk, zterm);
}

// Software prefetch of the packed rows in the wide variant (rows are consecutive, so within a task
// this is one sequential stream), clamped to the buffer's last line. The stored layout is what the
// kitchen op reads without a prepared cache. Measured through `--op awq` (kitchen.stored, K = 3072,
// N = 18432, 2 threads, one process per setting, 2 rounds): speedup over the bf16 GEMV at M = 1 / 8
// without 1.82–1.83× / 1.17–1.19×, 2 KB 1.97–2.07 / 1.61–1.65, 8 KB 2.23–2.28 / 1.76, 16 KB
// 2.21–2.22 / 1.70–1.73.
constexpr int64_t kStoredPrefetchAhead = 8192;

// The wide variant (G ∈ {64, 128}, K % 128 == 0): 64 packed bytes = 128 columns per zmm, one or
// two groups per vector (dword lanes 0–7 and 8–15), with a per-half scale vector when G = 64.
// zmm vpermw reads 5 index bits, so its table repeats the 16 values twice.
template <int MB, int P, int GPZ>
void gemv_rows_wide(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  const Problem& p = a.p;
  const int64_t K = p.K, N = p.N, zchunks = K / kChunkBf16Wide;
  const __m512i table = _mm512_set_epi16(
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, (short)0xBF80, (short)0xC000, (short)0xC040,
      (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
      0x4040, 0x4000, 0x3F80, 0x0000, (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0,
      (short)0xC0C0, (short)0xC0E0, (short)0xC100);
  const uint16_t* xc = static_cast<const uint16_t*>(a.xc);
  const uint16_t* xrow[MB][P];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < P; ++q) xrow[m][q] = xc + ((m0 + m) * P + q) * a.xc_row_elems;

  const uint8_t* qend = p.qweight + N * (K / 2);
  const uint8_t* qlast = qend - 64;  // K/2 ≥ 64 here (K % 128 == 0)
  for (int64_t n = nb0; n < nb1; ++n) {
    const uint8_t* qrow = p.qweight + n * (K / 2);
    const float* srow = sblk + (n - nb0);
    __m512 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    auto chunk = [&](int64_t c, __m512* accx) __attribute__((always_inline)) {
      const uint8_t* ahead = qrow + c * 64 + kStoredPrefetchAhead;
      _mm_prefetch(reinterpret_cast<const char*>(ahead < qend ? ahead : qlast), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(qrow + c * 64);
      const __m512i a0 = _mm512_permutexvar_epi16(w, table);
      const __m512i a1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
      const __m512i a2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
      const __m512i a3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
      __m512 s;
      if (GPZ == 1) {
        s = _mm512_set1_ps(srow[c * kSub]);
      } else {
        s = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(srow[(2 * c) * kSub])),
                               _mm256_set1_ps(srow[(2 * c + 1) * kSub]), 1);
      }
      const int64_t off = c * kChunkBf16Wide;
      for (int m = 0; m < MB; ++m) {
        __m512 da = _mm512_setzero_ps(), db = _mm512_setzero_ps();
        for (int q = 0; q < P; ++q) {
          const uint16_t* xr = xrow[m][q] + off;
          da = _mm512_dpbf16_ps(da, (__m512bh)a0, (__m512bh)_mm512_loadu_si512(xr));
          db = _mm512_dpbf16_ps(db, (__m512bh)a1, (__m512bh)_mm512_loadu_si512(xr + 32));
          da = _mm512_dpbf16_ps(da, (__m512bh)a2, (__m512bh)_mm512_loadu_si512(xr + 64));
          db = _mm512_dpbf16_ps(db, (__m512bh)a3, (__m512bh)_mm512_loadu_si512(xr + 96));
        }
        accx[m] = _mm512_fmadd_ps(_mm512_add_ps(da, db), s, accx[m]);
      }
    };
    int64_t c = 0;
    for (; c + 1 < zchunks; c += 2) {
      chunk(c, acc0);
      chunk(c + 1, acc1);
    }
    if (c < zchunks) chunk(c, acc0);
    for (int m = 0; m < MB; ++m)
      a.acc[(m0 + m) * N + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + zterm[(m0 + m) * kSub + (n - nb0)];
  }
}

template <int MB, int P>
void gemv_rows_any(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, const float* sblk, const float* zterm) {
  if (a.wide && a.p.G == 128) gemv_rows_wide<MB, P, 1>(a, nb0, nb1, m0, sblk, zterm);
  else if (a.wide) gemv_rows_wide<MB, P, 2>(a, nb0, nb1, m0, sblk, zterm);
  else gemv_rows_g<MB, P>(a, nb0, nb1, m0, sblk, zterm);
}

template <int P>
void gemv_batch(const GemvArgs& a, int64_t nb0, int64_t nb1, int64_t m0, int mb, const float* sblk,
                const float* zterm) {
  switch (mb) {
    case 1: gemv_rows_any<1, P>(a, nb0, nb1, m0, sblk, zterm); break;
    case 2: gemv_rows_any<2, P>(a, nb0, nb1, m0, sblk, zterm); break;
    case 3: gemv_rows_any<3, P>(a, nb0, nb1, m0, sblk, zterm); break;
    default: gemv_rows_any<4, P>(a, nb0, nb1, m0, sblk, zterm); break;
  }
}

}  // namespace

void awq_gemv_avx512bf16(const GemvArgs& a, int64_t n0, int64_t n1, float* ws) {
  const Problem& p = a.p;
  const int64_t groups = p.K / p.G;
  float* sblk = ws;  // gemv_ws_floats(p)
  float* zblk = sblk + groups * kSub;
  float* zterm = zblk + groups * kSub;
  // at most 4 rows share a decoded chunk; more rows than 3 parts × 4 would spill registers
  const int max_rows = a.parts == 1 ? 4 : a.parts == 2 ? 2 : 1;
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kSub) {
    const int64_t nb1 = kmin(n1, nb0 + kSub);
    prefetch_scales(p, nb0 + 2 * kSub);
    stage_scales(p, nb0, int(nb1 - nb0), a.xsum, p.M, sblk, zblk, zterm);
    for (int64_t m0 = 0; m0 < p.M; m0 += max_rows) {
      const int mb = int(kmin<int64_t>(max_rows, p.M - m0));
      if (a.parts == 1) gemv_batch<1>(a, nb0, nb1, m0, mb, sblk, zterm);
      else if (a.parts == 2) gemv_batch<2>(a, nb0, nb1, m0, mb, sblk, zterm);
      else gemv_batch<3>(a, nb0, nb1, m0, mb, sblk, zterm);
    }
  }
}

}  // namespace nibble::kernels::awq
