// Flash-style attention of one head with vdpbf16ps (AVX-512 BF16): bf16 Q, K, V and P, fp32
// accumulation, fp32 online softmax. See kernels/attention_kernels.h for the contract.
//
// Layouts (per head, built once per call into thread-local buffers):
// (the buffers are the calling thread's driver scratch, kernels/workspace.h: no STL in ISA files)
//   kpack[kb][p][j]  = bf16 pair (K[kb·32 + j][2p], K[kb·32 + j][2p+1])   32 keys per block
//   vpack[jp][d]     = bf16 pair (V[2jp][d], V[2jp+1][d])
// Scores of 8 query rows × 32 keys live in 16 zmm accumulators (one pair of hd per vdpbf16ps);
// P (bf16) · V runs per two 16-wide chunks of hd with 16 accumulators, the running output in L1.
// The softmax works on the 8 rows at once: their maxima and sums by one permute network each
// (rowreduce8), their rescale factors exp(m_old − m_new) by one vector fast_exp (was, per row and
// block, two horizontal reductions and a libm expf). Together: 59–62 → 72–73 % of the vdpbf16ps
// peak at S = 1280 and 4096 (one core, CPU time, old and new binaries interleaved).
// GCC 12 reports the intrinsics' own _mm*_undefined_* operands (reductions, casts) as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <ctime>
#include <cstring>

#include "kernels/attention_kernels.h"
#include "kernels/workspace.h"
#include "nn/fast_exp_avx512.h"

namespace nibble::kernels::attention {

namespace {

inline uint32_t bf16_bits(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
inline uint32_t pair(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

constexpr int kR = 8;    // query rows per block
constexpr int kKB = 32;  // keys per block

// 8 vectors → lanes 0..7 = the reduction (max / add) of each vector's 16 lanes, by halving: the
// pairs (v[2i], v[2i+1]) fold into one vector holding both rows' 8 partials, then 4, 2, 1.
template <class Op>
inline __m256 rowreduce8(__m512 (&v)[kR], Op op) {
  static_assert(kR == 8, "rowreduce8 reduces 8 rows");
  const __m512i a1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i b1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i a2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i b2 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i a3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i b3 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  __m512 w[4], u[2];
  for (int i = 0; i < 4; ++i)  // rows 2i, 2i+1: 8 partials each
    w[i] = op(_mm512_permutex2var_ps(v[2 * i], a1, v[2 * i + 1]), _mm512_permutex2var_ps(v[2 * i], b1, v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // rows 4i .. 4i+3: 4 partials each
    u[i] = op(_mm512_permutex2var_ps(w[2 * i], a2, w[2 * i + 1]), _mm512_permutex2var_ps(w[2 * i], b2, w[2 * i + 1]));
  // rows 0..7: 2 partials each (lanes 2r, 2r+1), then the pairs
  const __m512 t = op(_mm512_permutex2var_ps(u[0], a3, u[1]), _mm512_permutex2var_ps(u[0], b3, u[1]));
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm512_castps512_ps256(op(_mm512_permutexvar_ps(ev, t), _mm512_permutexvar_ps(od, t)));
}

// P (bf16, 8 rows × 32 keys) · V for NC 16-wide chunks of hd from dc on, into the running output:
// each row's broadcast P pair feeds NC vdpbf16ps (NC = 2: half the broadcast loads of one chunk at a
// time, which left the loop bound by loads). Per output the chain over the key pairs is unchanged.
template <int NC>
inline void pv_chunks(const uint32_t* vp, int64_t hd, int64_t dc, const uint16_t (*pb)[kKB], const float* alpha,
                      float (*oacc)[256]) {
  __m512 acc[kR][NC];
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int jp = 0; jp < kKB / 2; ++jp) {
    __m512bh vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * hd + (dc + c) * 16);
    for (int r = 0; r < kR; ++r) {
      uint32_t pr;
      std::memcpy(&pr, pb[r] + 2 * jp, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int(pr));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b, vv[c]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NC; ++c) {
      float* op = oacc[r] + (dc + c) * 16;
      _mm512_store_ps(op, _mm512_fmadd_ps(_mm512_load_ps(op), _mm512_set1_ps(alpha[r]), acc[r][c]));
    }
}

// Raw scores (q·k, fp32, before scale and bias) of the 8 query rows × key block kb into sb: one
// vdpbf16ps chain per output over the hd pairs, p ascending.
inline void qk_block(const uint32_t (*qp)[128], const uint32_t* kpack, int64_t hp, int64_t kb, float (*sb)[kKB]) {
  __m512 s0[kR], s1[kR];
  for (int r = 0; r < kR; ++r) s0[r] = s1[r] = _mm512_setzero_ps();
  const uint32_t* kp = kpack + kb * hp * kKB;
  for (int64_t p = 0; p < hp; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * kKB);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * kKB + 16);
    for (int r = 0; r < kR; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(int(qp[r][p]));
      s0[r] = _mm512_dpbf16_ps(s0[r], qb, k0);
      s1[r] = _mm512_dpbf16_ps(s1[r], qb, k1);
    }
  }
  for (int r = 0; r < kR; ++r) {
    _mm512_store_ps(sb[r], s0[r]);
    _mm512_store_ps(sb[r] + 16, s1[r]);
  }
}

}  // namespace

bool flash_head_bf16_supported(int64_t hd) { return hd >= 16 && hd <= 256 && hd % 16 == 0; }

void flash_head_bf16(const float* q, const float* k, const float* v, int64_t ld, int64_t S, int64_t hd,
                     const float* bias, int64_t n_bias, float scale, float* o, int64_t ldo) {
  const int64_t nkb = (S + kKB - 1) / kKB, Sp = nkb * kKB, hp = hd / 2, dch = hd / 16;
  uint32_t* const kpack = thread_scratch<uint32_t>(Slot::AttnK, nkb * hp * kKB);
  uint32_t* const vpack = thread_scratch<uint32_t>(Slot::AttnV, Sp / 2 * hd);
  float* const colb = thread_scratch<float>(Slot::AttnBias, Sp);
  std::memset(kpack, 0, size_t(nkb * hp * kKB) * sizeof(uint32_t));
  for (int64_t j = 0; j < S; ++j) {
    const float* kr = k + j * ld;
    uint32_t* dst = kpack + (j / kKB) * hp * kKB + (j % kKB);
    for (int64_t p = 0; p < hp; ++p) dst[p * kKB] = pair(kr[2 * p], kr[2 * p + 1]);
  }
  for (int64_t jp = 0; jp < Sp / 2; ++jp) {
    const int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
    uint32_t* dst = vpack + jp * hd;
    for (int64_t d = 0; d < hd; ++d)
      dst[d] = pair(j0 < S ? v[j0 * ld + d] : 0.0f, j1 < S ? v[j1 * ld + d] : 0.0f);
  }
  for (int64_t j = 0; j < Sp; ++j) colb[j] = j >= S ? -INFINITY : (j < n_bias && bias ? bias[j] : 0.0f);

  alignas(64) uint32_t qp[kR][128];
  alignas(64) float oacc[kR][256];
  alignas(64) uint16_t pb[kR][kKB];
  alignas(64) float sbuf[2][kR][kKB];  // raw scores of key blocks kb and kb+1
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t q0 = 0; q0 < S; q0 += kR) {
    const int rows = int(S - q0 < kR ? S - q0 : kR);
    for (int r = 0; r < kR; ++r)
      for (int64_t p = 0; p < hp; ++p)
        qp[r][p] = r < rows ? pair(q[(q0 + r) * ld + 2 * p], q[(q0 + r) * ld + 2 * p + 1]) : 0u;
    float m[kR], l[kR];
    for (int r = 0; r < kR; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
      for (int64_t d = 0; d < hd; ++d) oacc[r][d] = 0.0f;
    }
    // Q·Kᵀ of key block kb+1 is issued between the softmax of block kb and its P·V: the softmax is a
    // chain of dependent steps (max network, exp, sum network) that P·V must wait for, and with the next
    // block's independent dot products right behind it in program order the core fills that wait with
    // them. The raw scores pass through L1 (sbuf; exact), so every value is computed as before.
    qk_block(qp, kpack, hp, 0, sbuf[0]);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      __m512 s0[kR], s1[kR];
      for (int r = 0; r < kR; ++r) {
        s0[r] = _mm512_load_ps(sbuf[kb & 1][r]);
        s1[r] = _mm512_load_ps(sbuf[kb & 1][r] + 16);
      }
      const __m512 cb0 = _mm512_loadu_ps(colb + kb * kKB), cb1 = _mm512_loadu_ps(colb + kb * kKB + 16);
      alignas(32) float alpha[kR], mold[kR], rsum[kR];
      // the 8 rows' maxima at once, lane r = row r (rowreduce8: a permute network instead of 8
      // horizontal reductions, each a serial chain into a scalar compare and a broadcast)
      __m512 x0[kR], x1[kR], v[kR];
      for (int r = 0; r < kR; ++r) {
        x0[r] = _mm512_fmadd_ps(s0[r], vscale, cb0), x1[r] = _mm512_fmadd_ps(s1[r], vscale, cb1);
        v[r] = _mm512_max_ps(x0[r], x1[r]);
      }
      const __m256 mo = _mm256_loadu_ps(m);
      const __m256 mn = _mm256_max_ps(rowreduce8(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }), mo);
      _mm256_store_ps(mold, mo);
      _mm256_storeu_ps(m, mn);  // max(mx, m): mx when mx > m (as before)
      const __m512 mn16 = _mm512_zextps256_ps512(mn);
      for (int r = 0; r < kR; ++r) {
        const __m512 vm = _mm512_permutexvar_ps(_mm512_set1_epi32(r), mn16);
        const __m256bh e0 = _mm512_cvtneps_pbh(nn::fast_exp_avx512(_mm512_sub_ps(x0[r], vm)));
        const __m256bh e1 = _mm512_cvtneps_pbh(nn::fast_exp_avx512(_mm512_sub_ps(x1[r], vm)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(pb[r]), (__m256i)e0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(pb[r] + 16), (__m256i)e1);
        // the row sum of the bf16-rounded weights that multiply V (so the weights sum to 1)
        const __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)e0), 16));
        const __m512 r1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)e1), 16));
        v[r] = _mm512_add_ps(r0, r1);
      }
      _mm256_store_ps(rsum, rowreduce8(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); }));
      {  // the rows' rescale factors exp(m_old − m_new) in one vector exp (0 for a row's first block)
        const __m512 e = nn::fast_exp_avx512(_mm512_zextps256_ps512(_mm256_sub_ps(mo, mn)));
        const __mmask8 first = _mm256_cmp_ps_mask(mo, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
        _mm256_store_ps(alpha, _mm256_mask_blend_ps(first, _mm512_castps512_ps256(e), _mm256_setzero_ps()));
      }
      for (int r = 0; r < kR; ++r) l[r] = l[r] * alpha[r] + rsum[r];
      if (kb + 1 < nkb) qk_block(qp, kpack, hp, kb + 1, sbuf[(kb + 1) & 1]);
      const uint32_t* vp = vpack + kb * (kKB / 2) * hd;
      int64_t dc = 0;
      for (; dc + 2 <= dch; dc += 2) pv_chunks<2>(vp, hd, dc, pb, alpha, oacc);
      if (dc < dch) pv_chunks<1>(vp, hd, dc, pb, alpha, oacc);
    }
    for (int r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[r];
      float* dst = o + (q0 + r) * ldo;
      for (int64_t d = 0; d < hd; ++d) dst[d] = oacc[r][d] * inv;
    }
  }
}

double bf16_peak_gflops(double seconds) {
  // 12 independent accumulators (hides the dpbf16 latency on 2 ports); 64 flop per instruction.
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3F803F80), y = (__m512bh)_mm512_set1_epi32(0x3C003C00);
  const auto now = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);  // CPU time of this thread: robust on a shared host
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  };
  const int64_t iters = 1 << 16;
  int64_t done = 0;
  const double t0 = now();
  double t1 = t0;
  do {
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    done += iters;
    t1 = now();
  } while (t1 - t0 < seconds);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return double(done) * 12.0 * 64.0 / (t1 - t0) * 1e-9;
}

}  // namespace nibble::kernels::attention
