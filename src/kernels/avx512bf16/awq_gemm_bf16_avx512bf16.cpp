// AWQ GEMM tier on bf16 weights, AVX-512 BF16: the int4 decode runs inside the vdpbf16ps
// micro-kernel (design, arithmetic and layouts: kernels/awq_gemm_bf16.h).
//
// Micro-tile: R ≤ 4 vectors of 16 rows × 6 columns = 24 fp32 accumulators. Per k pair: R loads of
// x (contiguous), 6 broadcasts of a decoded ŵ pair, 6·R vdpbf16ps. After every block of 16 pairs of
// the first row pass over a panel, the same 16 pairs of the NEXT panel are decoded: per column one
// 16-byte load widened to dwords, idx = d | d << 12 (the low nibble in the low word's index bits,
// the high nibble in the high word's), one vpermw on the group's 32-word table, one store.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/awq_gemm_bf16.h"
#include "kernels/isa_local.h"

namespace nibble::kernels::awq {

namespace {

constexpr int kC = int(kGemmPanelCols);

// One panel to decode: kC columns from n0 (the first `cols` exist), k pairs [q0, q0 + nq), column c
// written at out + c·nqp (nqp = nq rounded up to 16, zero filled).
struct Decoder {
  const Problem* p = nullptr;
  int64_t K2 = 0, hg = 0;  // pairs per row; pairs per group
  int64_t n0 = 0, q0 = 0, nq = 0, nqp = 0;
  int cols = 0;
  bool fast = false;  // hg % 16 == 0: a block of 16 pairs never straddles two groups (table decode)
  uint32_t* out = nullptr;
  uint16_t* tbl = nullptr;  // fast: the table of group g, column c at tbl + ((g − g0)·kC + c)·32
  int64_t g0 = 0;
  // the panel after this one: its stored bytes are prefetched while this one is decoded (weights
  // stream once per call; a decode waiting on memory stalls the micro-kernel around it)
  int64_t pf_n0 = 0, pf_q0 = 0, pf_nq = 0;
  int pf_cols = 0;
};

// 16 halves (bf16 or f16) → fp32, the first `count` lanes (rest zero).
inline __m512 load_halves(const uint16_t* src, int count, DType dt) {
  const __mmask16 m = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, src);
  if (dt == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// The fast path's tables: every group the panel's pairs touch, every existing column. The group's
// scales and zeros of the panel's columns are widened once (one vector each) and broadcast from L1.
void build_tables(Decoder& d) {
  const Problem& p = *d.p;
  const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  alignas(64) float sz[2][16];
  d.g0 = d.q0 / d.hg;
  const int64_t g1 = (d.q0 + d.nq - 1) / d.hg;
  for (int64_t g = d.g0; g <= g1; ++g) {
    _mm512_store_ps(sz[0], load_halves(p.wscales + g * p.N + d.n0, d.cols, p.sdtype));
    _mm512_store_ps(sz[1], load_halves(p.wzeros + g * p.N + d.n0, d.cols, p.sdtype));
    for (int c = 0; c < d.cols; ++c) {
      const __m512 v = _mm512_fmadd_ps(codes, _mm512_set1_ps(sz[0][c]), _mm512_set1_ps(sz[1][c]));
      _mm512_store_si512(d.tbl + ((g - d.g0) * kC + c) * 32, (__m512i)_mm512_cvtne2ps_pbh(v, v));
    }
  }
}

// Any group size: per-lane scales (a block may straddle groups; G % 32 != 0 only).
__m512i decode_generic(const Decoder& d, int64_t n, int64_t q, __mmask16 lm) {
  const Problem& p = *d.p;
  alignas(32) uint16_t hs[16] = {}, hz[16] = {};
  for (int j = 0; j < 16; ++j)
    if ((lm >> j) & 1) {
      const int64_t g = (q + j) / d.hg;
      hs[j] = p.wscales[g * p.N + n], hz[j] = p.wzeros[g * p.N + n];
    }
  const __m256i vs = _mm256_load_si256(reinterpret_cast<const __m256i*>(hs));
  const __m256i vz = _mm256_load_si256(reinterpret_cast<const __m256i*>(hz));
  const bool bf = p.sdtype == DType::BF16;
  const __m512 s = bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(vs), 16)) : _mm512_cvtph_ps(vs);
  const __m512 z = bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(vz), 16)) : _mm512_cvtph_ps(vz);
  const __m512i dw = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, p.qweight + n * d.K2 + q));
  const __m512 eight = _mm512_set1_ps(8.0f);
  const __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(dw, _mm512_set1_epi32(15))), eight);
  const __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(dw, 4)), eight);
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 16; ++j) idx[2 * j] = uint16_t(j), idx[2 * j + 1] = uint16_t(16 + j);
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s, z), _mm512_fmadd_ps(lo, s, z));
  return _mm512_maskz_mov_epi32(lm, _mm512_permutexvar_epi16(_mm512_load_si512(idx), packed));
}

// Block b (pairs [q0 + 16b, q0 + 16b + 16)) of line b of the next panel's prefetch (64 pairs a
// line), then its scales.
__attribute__((always_inline)) inline void prefetch_block(const Decoder& d, int64_t b) {
  if (64 * b < d.pf_nq) {
    for (int c = 0; c < d.pf_cols; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(d.p->qweight + (d.pf_n0 + c) * d.K2 + d.pf_q0 + 64 * b), _MM_HINT_T0);
  } else if (64 * b - d.pf_nq < 64 && d.pf_cols > 0) {
    for (int64_t g = d.pf_q0 / d.hg; g <= (d.pf_q0 + d.pf_nq - 1) / d.hg; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(d.p->wscales + g * d.p->N + d.pf_n0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(d.p->wzeros + g * d.p->N + d.pf_n0), _MM_HINT_T0);
    }
  }
}

// Whether the micro-kernel can decode the panel in its loop: table path, all kC columns, whole blocks.
bool fusable(const Decoder& d) { return d.fast && d.cols == kC && d.nq == d.nqp; }

// Block b of a fusable panel (tables built): per column one 16-byte load widened to dwords,
// idx = d | d << 12, one vpermw, one store. Few registers and no call: the accumulators around it
// stay in registers.
__attribute__((always_inline)) inline void decode_block_fused(const Decoder& d, int64_t b) {
  if (16 * b >= d.nqp) return;  // a last, shorter chunk
  prefetch_block(d, b);
  const int64_t q = d.q0 + 16 * b;
  const uint16_t* t = d.tbl + (q / d.hg - d.g0) * kC * 32;
  const uint8_t* src = d.p->qweight + d.n0 * d.K2 + q;
  for (int c = 0; c < kC; ++c) {
    const __m512i dw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c * d.K2)));
    const __m512i idx = _mm512_or_si512(dw, _mm512_slli_epi32(dw, 12));
    _mm512_store_si512(d.out + c * d.nqp + 16 * b, _mm512_permutexvar_epi16(idx, _mm512_load_si512(t + 32 * c)));
  }
}

// Any panel, outside the micro-kernel (the first of a task, tails, group sizes without the table path).
void decode_panel(Decoder& d) {
  if (d.fast) build_tables(d);
  for (int64_t b = 0; b < d.nqp / 16; ++b) {
    prefetch_block(d, b);
    const int64_t q = d.q0 + 16 * b, left = d.q0 + d.nq - q;
    const __mmask16 lm = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    for (int c = 0; c < kC; ++c) {
      __m512i w = _mm512_setzero_si512();
      if (c < d.cols && d.fast) {
        const __m512i dw = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, d.p->qweight + (d.n0 + c) * d.K2 + q));
        const __m512i idx = _mm512_or_si512(dw, _mm512_slli_epi32(dw, 12));
        const __m512i t = _mm512_load_si512(d.tbl + ((q / d.hg - d.g0) * kC + c) * 32);
        w = _mm512_maskz_mov_epi32(lm, _mm512_permutexvar_epi16(idx, t));
      } else if (c < d.cols) {
        w = decode_generic(d, d.n0 + c, q, lm);
      }
      _mm512_store_si512(d.out + c * d.nqp + 16 * b, w);
    }
  }
}

// acc[c·Mp + 16r + i] (+)= Σ_q xq[q·w + 16r + i] · wp[c·nqp + q] for r < R, c < kC; decodes `dec`
// (when given) block by block in between.
template <int R>
void pass(const uint32_t* xq, int64_t w, const uint32_t* wp, int64_t nqp, float* acc, int64_t Mp, bool accumulate,
          const Decoder* dec) {
  __m512 a[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) a[r][c] = accumulate ? _mm512_loadu_ps(acc + c * Mp + 16 * r) : _mm512_setzero_ps();
  const int64_t nb = nqp / 16;
  for (int64_t b = 0; b < nb; ++b) {
    const uint32_t* xb = xq + 16 * b * w;
    const uint32_t* wb = wp + 16 * b;
#pragma GCC unroll 2
    for (int qq = 0; qq < 16; ++qq) {
      __m512bh xv[R];
      for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(xb + qq * w + 16 * r);
      for (int c = 0; c < kC; ++c) {
        const __m512bh wv = (__m512bh)_mm512_set1_epi32(int(wb[c * nqp + qq]));
        for (int r = 0; r < R; ++r) a[r][c] = _mm512_dpbf16_ps(a[r][c], xv[r], wv);
      }
    }
    if (dec) decode_block_fused(*dec, b);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) _mm512_storeu_ps(acc + c * Mp + 16 * r, a[r][c]);
}

using PassFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool, const Decoder*);
constexpr PassFn kPasses[5] = {nullptr, pass<1>, pass<2>, pass<3>, pass<4>};

}  // namespace

void awq_gemm_pack_x_avx512bf16(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t m0, int64_t rows,
                                uint32_t* xt) {
  const int64_t K2p = gemm_pairs_padded(K);
  alignas(64) uint32_t tile[16][16];
  for (int64_t g0 = m0; g0 < m0 + rows; g0 += 16) {
    int64_t s0 = 0, w = 0;
    gemm_pass_of(Mp, g0, &s0, &w);
    uint32_t* base = xt + s0 * K2p + (g0 - s0);
    for (int64_t q = 0; q < K2p; q += 16) {
      for (int r = 0; r < 16; ++r) {
        const int64_t m = g0 + r, k0 = 2 * q;
        const int64_t valid = m < M ? kmin<int64_t>(32, kmax<int64_t>(0, K - k0)) : 0;
        const __mmask16 ma = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
        const __mmask16 mb = valid >= 32 ? __mmask16(0xFFFF) : valid <= 16 ? __mmask16(0) : __mmask16((1u << (valid - 16)) - 1);
        const float* src = x + m * K + k0;
        const __m512 lo = _mm512_maskz_loadu_ps(ma, src), hi = _mm512_maskz_loadu_ps(mb, src + 16);
        // RNE; dword j = (x̂[2(q+j)], x̂[2(q+j)+1])
        _mm512_store_si512(tile[r], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      for (int j = 0; j < 16; ++j)
        for (int r = 0; r < 16; ++r) base[(q + j) * w + r] = tile[r][j];
    }
  }
}

void awq_gemm_bf16_avx512bf16(const GemmBf16Args& a, int64_t n0, int64_t n1, uint32_t* ws, float* acc) {
  const Problem& p = a.p;
  const int64_t Mp = a.Mp, K2 = p.K / 2, npan = (n1 - n0 + kC - 1) / kC;
  const int64_t kc = gemm_chunk_pairs(p.K, kmin(kGemmRowBlock, Mp));  // the workspace's chunk
  uint16_t* tbl = reinterpret_cast<uint16_t*>(ws + 2 * kC * kc);
  const int64_t V = Mp / 16, nblocks = gemm_row_blocks(Mp);
  for (int64_t bi = 0, rb0 = 0; bi < nblocks; rb0 += 16 * gemm_share(V, nblocks, bi), ++bi) {
    const int64_t bv = gemm_share(V, nblocks, bi), npass = (bv + 3) / 4;
    uint32_t* buf[2] = {ws, ws + kC * kc};
    const int64_t nchunks = (K2 + kc - 1) / kc, total = nchunks * npan;
    const auto make = [&](int64_t i) {
      Decoder d;
      d.p = &p, d.K2 = K2, d.hg = p.G / 2, d.fast = (p.G / 2) % 16 == 0, d.tbl = tbl;
      d.n0 = n0 + (i % npan) * kC;
      d.cols = int(kmax<int64_t>(0, kmin<int64_t>(kC, p.N - d.n0)));
      d.q0 = (i / npan) * kc, d.nq = kmin(kc, K2 - d.q0), d.nqp = (d.nq + 15) / 16 * 16;
      d.out = buf[i & 1];
      if (i + 1 < total) {
        const int64_t j = i + 1;
        d.pf_n0 = n0 + (j % npan) * kC, d.pf_q0 = (j / npan) * kc, d.pf_nq = kmin(kc, K2 - d.pf_q0);
        d.pf_cols = int(kmax<int64_t>(0, kmin<int64_t>(kC, p.N - d.pf_n0)));
      }
      return d;
    };
    Decoder cur = make(0);
    decode_panel(cur);
    for (int64_t i = 0; i < total; ++i) {
      const bool has_next = i + 1 < total;
      Decoder next = has_next ? make(i + 1) : Decoder{};
      // the next panel is decoded inside the first row pass (fast path), or after the passes
      const bool fused = has_next && fusable(next);
      if (fused) build_tables(next);
      for (int64_t pi = 0, pb0 = rb0; pi < npass; pb0 += 16 * gemm_share(bv, npass, pi), ++pi) {
        const int64_t w = 16 * gemm_share(bv, npass, pi);
        const uint32_t* xq = a.xt + pb0 * a.K2p + cur.q0 * w;  // the pass's rows start at pb0·K2p
        kPasses[w / 16](xq, w, cur.out, cur.nqp, acc + (cur.n0 - n0) * Mp + pb0, Mp, cur.q0 > 0,
                        fused && pi == 0 ? &next : nullptr);
      }
      if (has_next && !fused) decode_panel(next);
      if (has_next) cur = next;
    }
  }
}

}  // namespace nibble::kernels::awq

namespace nibble::kernels::awq {

namespace {
// f32_to_bf16 (nibble/dtype.h) on 16 lanes: round to nearest even, NaN kept quiet.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  r = _mm512_mask_or_epi32(r, nan, b, _mm512_set1_epi32(0x400000));  // NaN: (b >> 16) | 0x40 after the shift
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
}  // namespace

void awq_gemm_store_avx512bf16(const float* acc, int64_t Mp, int64_t M, int64_t N, int64_t n0, int64_t n1,
                               const float* bias, DType out, void* y) {
  // 16 × 16 blocks: 16 columns of acc (16 rows each) transposed in registers by four butterfly
  // stages (block swaps of 8, 4, 2, 1), then one masked store per output row.
  __m512i lo[4], hi[4];
  for (int s = 0; s < 4; ++s) {
    const int d = 8 >> s;
    alignas(64) int32_t il[16], ih[16];
    for (int j = 0; j < 16; ++j) {
      il[j] = (j & d) ? 16 + j - d : j;
      ih[j] = (j & d) ? 16 + j : j + d;
    }
    lo[s] = _mm512_load_si512(il), hi[s] = _mm512_load_si512(ih);
  }
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {
    const int64_t cols = kmin<int64_t>(16, n1 - c0);
    const __mmask16 cm = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(cm, bias + c0) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      __m512 v[16];
      for (int j = 0; j < 16; ++j) v[j] = j < cols ? _mm512_loadu_ps(acc + (c0 - n0 + j) * Mp + m0) : _mm512_setzero_ps();
      for (int s = 0; s < 4; ++s) {
        const int d = 8 >> s;
        for (int i = 0; i < 16; ++i)
          if (!(i & d)) {
            const __m512 a = v[i], c = v[i + d];
            v[i] = _mm512_permutex2var_ps(a, lo[s], c);
            v[i + d] = _mm512_permutex2var_ps(a, hi[s], c);
          }
      }
      const int64_t rows = kmin<int64_t>(16, M - m0);
      for (int r = 0; r < rows; ++r) {
        const int64_t o = (m0 + r) * N + c0;
        if (out == DType::F32) {
          _mm512_mask_storeu_ps(static_cast<float*>(y) + o, cm, bias ? _mm512_add_ps(v[r], b) : v[r]);
        } else {  // BF16: round, then (spec §2.3) add the bias to the rounded value and round again
          __m256i t = to_bf16(v[r]);
          if (bias) t = to_bf16(_mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(t), 16)), b));
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + o, cm, t);
        }
      }
    }
  }
}

}  // namespace nibble::kernels::awq
