// AWQ W4A16 GEMV over prepared (tiled) weights, AVX-512 + BF16 (layout: awq_w4a16_kernels.h).
//
// Lanes are output columns: one 64-byte line holds 8 columns of k for 16 output columns. It is
// decoded with one vpermw per nibble position into exact bf16 (q − 8) pairs, and each pair meets a
// broadcast activation pair in vdpbf16ps. Products are exact (bf16 × exact bf16 parts of x), sums
// are fp32: the arithmetic class of the spec's fp32 GEMV. Per group: acc += s·D + z·Σx, with s and z
// loaded as 16-lane vectors from the scale line that follows the group's weight lines.
//
// Why this layout: the stored layout streams K/G strided scale runs per column block and needs a
// horizontal sum per output, so a core spends its time waiting on memory between short bursts;
// here each thread reads one sequential stream and the decode keeps pace with it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/awq_w4a16_kernels.h"

namespace nibble::kernels::awq {

namespace {

// acc += dot(w, broadcast(*pair)) with the pair as an embedded-broadcast memory operand: GCC 12
// otherwise emits a separate vpbroadcastd per dot product (a quarter of the loop's instructions).
inline __m512 dp_bcast(__m512 acc, __m512i w, const uint32_t* pair) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*pair));
  return acc;
}

template <DType SD>
inline __m512 load16_halves(const uint8_t* src) {
  const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (SD == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

// Software prefetch (PREFETCHT0) 4 KB ahead of the line being decoded. Without it a core streamed
// ~25 GB/s from DRAM although the loop needs only ≈ 3.3 cycles per line from L2 (the same loop over
// an L2-resident stream, 1 thread) and a plain read of the same access pattern reached ~73 GB/s on 2
// cores: demand loads and the hardware prefetcher kept too few lines in flight. On 4 KiB pages 16 KB
// ahead was best (against none: 1.04–1.31× at M = 1, 1.4–1.9× at M = 2–8; 8 KB and PREFETCHNTA 0–10 %
// behind). Since the stream lives on huge pages (Tensor::empty_weights) shorter is better: through the
// op, one process per setting, interleaved, speedup over the bf16 GEMV at M = 1 (nn.Linear / kitchen
// cached), 3 rounds each: 2 KB 3.33–3.42 / 3.49–3.59, 3–6 KB 3.38–3.53 / 3.52–3.71, 8 KB
// 3.36–3.42 / 3.51–3.59, 16 KB 3.18–3.33 / 3.38–3.47, none 3.09 / 3.21–3.26; M = 2–16 equal within
// noise; T1/T2/NTA hints equal to T0. The address is clamped to the stream's last line, so nothing
// past the buffer is touched.
constexpr int64_t kPrefetchAhead = 4096;

// MB activation rows (each `P` exact bf16 parts) against tiles [t0, t1). One dot-product chain per
// row and nibble position: a group's G/8 lines are deep enough to hide the vdpbf16ps latency (8
// chains for one row were 2 % slower: their sums cost more than the latency they hid). From L2 the
// loop takes ≈ 3.3 cycles per 64-byte line (3 shifts, 4 vpermw, 4 vdpbf16ps plus a ninth of the
// group's scale work; measured, 1 thread), well under the ~8 cycles per line a core's share of DRAM
// bandwidth allows, so with the prefetch above it is memory bound. Measured and rejected:
// a permute-free decode (vpternlogd of the shifted nibbles into the bf16 16 + q, then
// Σx(q−8) = D − 24·Σx): 7 % slower than vpermw from L2; through the op with this prefetch, interleaved,
// −6…+12 % at M = 1, −2 % at M = 2, −30 % at M = 4 — no reliable gain for 4× larger partial sums
// (docs/awq.md); two tiles per step sharing each broadcast (5 % faster from cache, 8 % slower from
// DRAM: two streams per thread).
template <int MB, int P, DType SD>
void tiles_rows(const TiledArgs& a, int64_t t0, int64_t t1, int64_t m0) {
  const Problem& p = a.p;
  const int64_t K = p.K, G = p.G, N = p.N, groups = K / G, L = G / 8;
  const int64_t tile_bytes = tiled_tile_bytes(K, G), group_bytes = tiled_lines_per_group(G) * 64;
  // bf16 of (i − 8) for the low 4 index bits; vpermw reads 5 bits, so the table repeats
  const __m512i table = _mm512_set_epi16(
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, (short)0xBF80, (short)0xC000, (short)0xC040,
      (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
      0x4040, 0x4000, 0x3F80, 0x0000, (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0,
      (short)0xC0C0, (short)0xC0E0, (short)0xC100);
  const int64_t last_line = ((p.N + kTileCols - 1) / kTileCols) * tile_bytes - 64;  // offset in the stream
  const uint32_t* xr[MB][P];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    for (int q = 0; q < P; ++q) xr[m][q] = a.xpairs + ((m0 + m) * P + q) * (K / 2);
    xs[m] = a.xsum + (m0 + m) * groups;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.tiled + t * tile_bytes;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* blk = tile + g * group_bytes;
      __m512 d[MB][4];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < 4; ++r) d[m][r] = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; ++j) {
        const int64_t ahead = (blk - a.tiled) + j * 64 + kPrefetchAhead;
        _mm_prefetch(reinterpret_cast<const char*>(a.tiled + (ahead < last_line ? ahead : last_line)), _MM_HINT_T0);
        const __m512i w = _mm512_load_si512(blk + j * 64);
        __m512i dec[4];
        dec[0] = _mm512_permutexvar_epi16(w, table);
        dec[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
        dec[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
        dec[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
        const int64_t xo = g * (G / 2) + 4 * j;
        for (int m = 0; m < MB; ++m)
          for (int q = 0; q < P; ++q)
            for (int r = 0; r < 4; ++r) d[m][r] = dp_bcast(d[m][r], dec[r], xr[m][q] + xo + r);
      }
      const uint8_t* sl = blk + L * 64;
      const __m512 s = load16_halves<SD>(sl), z = load16_halves<SD>(sl + 32);
      for (int m = 0; m < MB; ++m) {
        const __m512 dm = _mm512_add_ps(_mm512_add_ps(d[m][0], d[m][1]), _mm512_add_ps(d[m][2], d[m][3]));
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

template <int MB, int P>
void tiles_dt(const TiledArgs& a, int64_t t0, int64_t t1, int64_t m0) {
  if (a.p.sdtype == DType::BF16) tiles_rows<MB, P, DType::BF16>(a, t0, t1, m0);
  else tiles_rows<MB, P, DType::F16>(a, t0, t1, m0);
}

template <int P>
void tiles_batch(const TiledArgs& a, int64_t t0, int64_t t1, int64_t m0, int mb) {
  switch (mb) {
    case 1: tiles_dt<1, P>(a, t0, t1, m0); break;
    case 2: tiles_dt<2, P>(a, t0, t1, m0); break;
    case 3: tiles_dt<3, P>(a, t0, t1, m0); break;
    default: tiles_dt<4, P>(a, t0, t1, m0); break;
  }
}

}  // namespace

void awq_gemv_tiled_avx512bf16(const TiledArgs& a, int64_t t0, int64_t t1) {
  // rows per pass: the decoded line feeds MB·P·4 chains, which must stay in registers
  const int max_rows = a.parts == 1 ? 4 : a.parts == 2 ? 2 : 1;
  if (a.p.M <= max_rows) {
    const int mb = int(a.p.M);
    if (a.parts == 1) tiles_batch<1>(a, t0, t1, 0, mb);
    else if (a.parts == 2) tiles_batch<2>(a, t0, t1, 0, mb);
    else tiles_batch<3>(a, t0, t1, 0, mb);
    return;
  }
  // more rows than one pass holds: every pass over a tile while it is still in L1/L2
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m0 = 0; m0 < a.p.M; m0 += max_rows) {
      const int mb = int(a.p.M - m0 < max_rows ? a.p.M - m0 : max_rows);
      if (a.parts == 1) tiles_batch<1>(a, t, t + 1, m0, mb);
      else if (a.parts == 2) tiles_batch<2>(a, t, t + 1, m0, mb);
      else tiles_batch<3>(a, t, t + 1, m0, mb);
    }
}

}  // namespace nibble::kernels::awq
