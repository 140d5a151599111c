// AVX-512 activation quantizer and low-rank projection of the SVDQuant W4A4 layer (numerics:
// svdquant_w4a4_kernels.h — every step is the reference's fp32 operation, so results are bit-identical).
// Quantize: 16 groups (four zmm each) per batch; the max and the integer sum are exact in any order.
// Low-rank: vectors over r (down padded to a multiple of 16 columns), 4 rows per pass, fma chain over k.

// GCC 12 flags its own _mm512_undefined_* helpers inside the intrinsics headers (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>


#include "kernels/svdquant_w4a4_kernels.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::w4a4 {

namespace {
// 16 vectors → one whose lane b is the reduction (max / add, int32) of v[b]'s 16 lanes: a 4-level vpermt2ps
// network (15 pairs × 2 permutes + 1 op) instead of 16 separate horizontal reductions. Max and integer
// add are exact in any order, so the result equals the reference's sequential max / sum.
struct Reduce16Idx {
  __m512i a[4], b[4];
  Reduce16Idx() {
    alignas(64) int32_t ia[4][16], ib[4][16];
    for (int l = 0; l < 4; ++l) {
      const int w = 8 >> l;  // lanes per group kept at level l (8, 4, 2, 1)
      for (int i = 0; i < 16; ++i) {
        const int blk = i / w, off = i % w;  // output block blk of w lanes: 2w input lanes of one group
        ia[l][i] = blk * 2 * w + off;
        ib[l][i] = blk * 2 * w + w + off;
      }
      a[l] = _mm512_load_si512(ia[l]);
      b[l] = _mm512_load_si512(ib[l]);
    }
  }
};
template <class Op>
inline __m512i reduce16(__m512i v[16], const Reduce16Idx& ix, Op op) {
  for (int l = 0, n = 8; l < 4; ++l, n >>= 1)
    for (int p = 0; p < n; ++p)
      v[p] = op(_mm512_permutex2var_epi32(v[2 * p], ix.a[l], v[2 * p + 1]),
                _mm512_permutex2var_epi32(v[2 * p], ix.b[l], v[2 * p + 1]));
  return v[0];
}

// The input row's element type: fp32, or bf16 / fp16 widened in-register (exactly, as to_f32 does), so a
// half-precision x is read at its own size instead of through an fp32 copy.
enum class XIn { F32, BF16, F16 };
template <XIn In>
inline __m512 load_x16(const void* row, int64_t i) {
  if constexpr (In == XIn::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i));
    if constexpr (In == XIn::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// Batches of 16 groups: pass 1 forms y = x·inv_s (kept in an L1 buffer) and each group's lane-wise
// max|y|; the network reduces the 16 to one vector, so scale and 1/scale are one vdivps for 16 groups;
// pass 2 rounds y·(1/scale) with vcvtps2dq (embedded RNE), packs 64 codes with two saturating packs and
// one dword permute, clamps the bytes, and sums them (vpmaddubsw + vpmaddwd). On Zen 4 a zmm op holds a
// 256-bit pipe for two cycles, so the op count is the cost. The earlier kernel (per group: two horizontal
// reductions, a scalar divide, fp clamps) took 1.74x as long with x in cache (BM_quantize_rows_in_cache,
// 7.0 vs 4.0 us); from DRAM, with two threads, both run at the read bandwidth.
template <XIn In>
void quantize_rows(const void* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                   float* scales, int32_t* acorr, int64_t m0, int64_t m1) {
  constexpr int64_t esize = In == XIn::F32 ? 4 : 2;
  constexpr int lines = int(kGroup * esize / 64);  // cache lines of x per group (4 or 2)
  static const Reduce16Idx ix;
  const int64_t G = K / kGroup;
  const __m512 qmax = _mm512_set1_ps(act_unsigned ? 15.0f : 7.0f), floor = _mm512_set1_ps(1e-10f);
  const __m512i lo = _mm512_set1_epi8(act_unsigned ? 0 : -7), hi = _mm512_set1_epi8(act_unsigned ? 15 : 7);
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff), ones = _mm512_set1_epi8(1);
  const __m512i ones16 = _mm512_set1_epi16(1);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  // |y| compared as int32 bit patterns: the order of non-negative floats, and a NaN (above +inf) always
  // wins, so a NaN anywhere in a group makes its scale NaN and the row's output NaN (never a silent code).
  const auto vmax = [](__m512i a, __m512i b) { return _mm512_max_epi32(a, b); };
  const auto vadd = [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); };
  alignas(64) float ybuf[16 * kGroup];
  for (int64_t m = m0; m < m1; ++m) {
    const char* xr = static_cast<const char*>(x) + m * ldx * esize;
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
      const int nb = int(G - g0 < 16 ? G - g0 : 16);
      __m512i v[16];
      for (int b = 0; b < 16; ++b) {
        if (b >= nb) {
          v[b] = _mm512_setzero_si512();
          continue;
        }
        const int64_t k0 = (g0 + b) * kGroup;
        // x streams from DRAM: the batch ahead (4 KiB) is requested half in each pass, so misses stay in
        // flight through the compute-only pass 2 (all 64 lines in pass 1 ran ~10 % slower from DRAM)
        for (int l = 0; l < lines / 2; ++l) _mm_prefetch(xr + (k0 + 16 * kGroup) * esize + 64 * l, _MM_HINT_T0);
        __m512i amax = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) {
          const __m512 y = _mm512_mul_ps(load_x16<In>(xr, k0 + 16 * j), _mm512_loadu_ps(inv_s + k0 + 16 * j));
          _mm512_store_ps(ybuf + b * kGroup + 16 * j, y);
          amax = _mm512_max_epi32(amax, _mm512_and_si512(_mm512_castps_si512(y), absmask));
        }
        v[b] = amax;
      }
      const __m512 amax = _mm512_castsi512_ps(reduce16(v, ix, vmax));
      const __m512 scale = _mm512_max_ps(floor, _mm512_div_ps(amax, qmax));  // std::max(a, floor): a unless a < floor (NaN kept)
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), scale);
      const __mmask16 live = __mmask16((1u << nb) - 1);
      _mm512_mask_storeu_ps(scales + m * G + g0, live, scale);
      for (int b = 0; b < nb; ++b) {
        const __m512 ib = _mm512_permutexvar_ps(_mm512_set1_epi32(b), inv);
        for (int l = lines / 2; l < lines; ++l) _mm_prefetch(xr + (g0 + b + 16) * kGroup * esize + 64 * l, _MM_HINT_T0);
        __m512i qi[4];
        for (int j = 0; j < 4; ++j)  // rint half-even (a NaN gives INT_MIN: clamped to lo below, as fp clamps do)
          qi[j] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_load_ps(ybuf + b * kGroup + 16 * j), ib),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // the saturating packs interleave 128-bit lanes; the permute puts dword 4L + j (codes 4L..4L+3
        // of qi[j]) back at 4j + L. Clamping the bytes equals clamping before the packs.
        const __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(qi[0], qi[1]), _mm512_packs_epi32(qi[2], qi[3]));
        const __m512i c = _mm512_min_epi8(_mm512_max_epi8(_mm512_permutexvar_epi32(order, p), lo), hi);
        _mm512_storeu_si512(codes + m * K + (g0 + b) * kGroup, c);
        v[b] = _mm512_madd_epi16(_mm512_maddubs_epi16(ones, c), ones16);  // 16 exact sums of 4 codes
      }
      if (acorr) {
        for (int b = nb; b < 16; ++b) v[b] = _mm512_setzero_si512();
        const __m512i sum = reduce16(v, ix, vadd);
        _mm512_mask_storeu_epi32(acorr + m * G + g0, live, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 3)));
      }
    }
  }
}

}  // namespace

void quantize_avx512(const float* x, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes,
                     float* scales, int32_t* acorr, int64_t m0, int64_t m1) {
  quantize_rows<XIn::F32>(x, ldx, K, inv_s, act_unsigned, codes, scales, acorr, m0, m1);
}
void quantize_half_avx512(const uint16_t* x, bool f16, int64_t ldx, int64_t K, const float* inv_s, bool act_unsigned,
                          int8_t* codes, float* scales, int32_t* acorr, int64_t m0, int64_t m1) {
  if (f16) quantize_rows<XIn::F16>(x, ldx, K, inv_s, act_unsigned, codes, scales, acorr, m0, m1);
  else quantize_rows<XIn::BF16>(x, ldx, K, inv_s, act_unsigned, codes, scales, acorr, m0, m1);
}

namespace {
// MR rows × RV·16 columns of lora: MR·RV independent fp32 FMA chains (8 rows × 2 vectors = 16 hide the
// FMA latency on both ports and halve the passes over `down` against 4 rows: 1.6x on the
// M = 4096, K = 3072, R = 32 low-rank stage). Each output is one chain over k ascending.
// Pairs: k in the bf16 low-rank order 1, 0, 3, 2, … (kk ^ 1; K is even).
template <int MR, int RV, bool Pairs>
void lora_rows(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t r0, int64_t R,
               float* lora, int64_t ldl, int64_t m) {
  __m512 acc[MR][RV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    const int64_t k = Pairs ? (kk ^ 1) : kk;
    __m512 d[RV];
    for (int v = 0; v < RV; ++v) d[v] = _mm512_loadu_ps(down + k * ldd + r0 + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[(m + i) * ldx + k]);
      for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, d[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) {
      const int64_t c = r0 + 16 * v;
      const int64_t left = R - c;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm512_mask_storeu_ps(lora + (m + i) * ldl + c, mk, acc[i][v]);
    }
}
template <int RV, bool P>
void lora_block(int rows, const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t r0,
                int64_t R, float* lora, int64_t ldl, int64_t m) {
  switch (rows) {
    case 8: lora_rows<8, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 7: lora_rows<7, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 6: lora_rows<6, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 5: lora_rows<5, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 4: lora_rows<4, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 3: lora_rows<3, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    case 2: lora_rows<2, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
    default: lora_rows<1, RV, P>(x, ldx, K, down, ldd, r0, R, lora, ldl, m); break;
  }
}

template <bool P>
void lora_all(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
              int64_t ldl, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m += 8) {
    const int rows = int(kmin<int64_t>(8, m1 - m));
    int64_t r0 = 0;
    for (; r0 + 32 < R + 16 && r0 + 16 < R; r0 += 32) lora_block<2, P>(rows, x, ldx, K, down, ldd, r0, R, lora, ldl, m);
    for (; r0 < R; r0 += 16) lora_block<1, P>(rows, x, ldx, K, down, ldd, r0, R, lora, ldl, m);
  }
}
}  // namespace

void lora_avx512(const float* x, int64_t ldx, int64_t K, const float* down, int64_t ldd, int64_t R, float* lora,
                 int64_t ldl, int64_t m0, int64_t m1, bool pairs) {
  if (pairs) lora_all<true>(x, ldx, K, down, ldd, R, lora, ldl, m0, m1);
  else lora_all<false>(x, ldx, K, down, ldd, R, lora, ldl, m0, m1);
}

}  // namespace nibble::kernels::w4a4
