// src/kernels/awq_gemm_bf16.h — the AWQ GEMM tier on bf16 weights (avx512bf16, 8 < M): int4 decoded
// to bf16 inside the vdpbf16ps micro-kernel (kernel-internal; the driver is run_gemm_panels in
// src/kernels/awq_w4a16.cpp, the arithmetic and the measurements in docs/awq.md and docs/dense.md).
//
// Arithmetic (the kitchen's MMA tier): ŵ[n, k] = RNE_bf16(fma(q − 8, s[g, n], z[g, n])) in fp32, x̂ =
// RNE_bf16(x); acc[m, n] = one fp32 chain over the k pairs ascending (vdpbf16ps: two exact products
// per step, the hardware's order within a pair). Nothing depends on the thread count.
//
// Why this shape (measured on Zen 5, docs/dense.md): vdpbf16ps issues on the two FMA pipes, while
// the shuffles, shifts and loads a table decode needs issue beside it at no cost — but only when
// they are interleaved with it at instruction level. So:
//  * the lanes of the micro-kernel run over 16 ROWS of x (x is the vector operand, ŵ the broadcast
//    one): a weight column's 16 consecutive k pairs are then one vector, decoded from 16 stored bytes
//    by one vpermw on a 32-word table of that column's group (its 16 ŵ values, twice) — no FMA per
//    weight; the table costs one FMA per column and group;
//  * the next 6-column panel is decoded block by block (16 pairs) between the blocks of the current
//    panel's first row pass, so the decode hides under the vdpbf16ps of the current one.
//
// Layouts:
//  * xt (packed activations, per pass of w rows from row s (gemm_pass_of), Mp = M rounded up to 16):
//    xt[s·K2p + q·w + (m − s)] = the bf16 pair (x̂[m, 2q], x̂[m, 2q+1]) as a dword, K2p = K/2 rounded
//    up to 16, zero for m ≥ M or q ≥ K/2.
//  * acc (fp32 sums of a task, column-major): acc[(n − n0)·Mp + m].
#pragma once
#include <cstdint>

#include "kernels/awq_w4a16_kernels.h"

namespace nibble::kernels::awq {

inline constexpr int64_t kGemmPanelCols = 6;    // columns of a decoded panel (6 broadcasts × 4 row vectors)
inline constexpr int64_t kGemmCols = 96;        // output columns per task (16 panels)
inline constexpr int64_t kGemmRowBlock = 256;   // rows per pass over the decoded weights (x chunk in L2)
inline constexpr int64_t kGemmXBudget = 131072; // dwords of x per k chunk (512 KiB, L2) ...
inline constexpr int64_t kGemmMaxChunk = 512;   // ... and at most this many k pairs (measured: M = 64
                                                // 83 % at 512 pairs, 79 % at 1536; M = 512 91 % vs 88 % at 128)

static inline int64_t gemm_rows_padded(int64_t M) { return (M + 15) / 16 * 16; }
static inline int64_t gemm_pairs_padded(int64_t K) { return (K / 2 + 15) / 16 * 16; }
// k pairs per chunk for a row block of `rows_p` (padded) rows: the x chunk stays in L2.
static inline int64_t gemm_chunk_pairs(int64_t K, int64_t rows_p) {
  int64_t kc = kGemmXBudget / rows_p / 16 * 16;
  if (kc < 64) kc = 64;
  if (kc > kGemmMaxChunk) kc = kGemmMaxChunk;
  const int64_t k2p = gemm_pairs_padded(K);
  return kc < k2p ? kc : k2p;
}
// The row split, balanced so that no pass is left with one or two row vectors while another has four
// (measured: M = 72 ran at 63 % of the peak as 64 + 16 rows): row blocks of ≤ kGemmRowBlock rows share
// the Mp/16 row vectors evenly (the first blocks one more), and a block's passes of ≤ 4 vectors share
// its vectors the same way. xt stores each pass contiguously (see the layout above).
static inline int64_t gemm_share(int64_t total, int64_t parts, int64_t i) {
  return total / parts + (i < total % parts ? 1 : 0);
}
static inline int64_t gemm_row_blocks(int64_t Mp) { return (Mp / 16 + kGemmRowBlock / 16 - 1) / (kGemmRowBlock / 16); }
// The pass holding row m: its first row and its width (rows).
static inline void gemm_pass_of(int64_t Mp, int64_t m, int64_t* start, int64_t* width) {
  const int64_t V = Mp / 16, nb = gemm_row_blocks(Mp);
  int64_t s = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t bv = gemm_share(V, nb, b), np = (bv + 3) / 4;
    for (int64_t i = 0; i < np; ++i) {
      const int64_t w = 16 * gemm_share(bv, np, i);
      if (m < s + w) {
        *start = s, *width = w;
        return;
      }
      s += w;
    }
  }
  *start = s, *width = 0;
}

// Workspace (dwords) of one task: two decoded panels of one chunk and the group tables of one (a
// chunk of kc pairs touches at most kc/16 + 1 groups when the table path runs: G % 32 == 0).
static inline int64_t gemm_bf16_ws_dwords(int64_t K, int64_t Mp) {
  const int64_t kc = gemm_chunk_pairs(K, Mp < kGemmRowBlock ? Mp : kGemmRowBlock);
  return 2 * kGemmPanelCols * kc + kGemmPanelCols * (kc / 16 + 1) * 16;
}

struct GemmBf16Args {
  Problem p;
  const uint32_t* xt = nullptr;  // packed activations (layout above)
  int64_t Mp = 0, K2p = 0;
};

// Packs rows [m0, m0 + rows) of x (fp32, (M, K) row-major; m0 and rows multiples of 16, m0 + rows ≤
// Mp) into xt (Mp·K2p dwords); rows ≥ M as zeros.
void awq_gemm_pack_x_avx512bf16(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t m0, int64_t rows,
                                uint32_t* xt);
// The sums of columns [n0, n1) (n0 % kGemmPanelCols == 0) for every row into acc[(n − n0)·Mp + m]
// (columns up to n0 + round-up(n1 − n0, 6) are written); ws: gemm_bf16_ws_dwords dwords, 64-byte aligned.
void awq_gemm_bf16_avx512bf16(const GemmBf16Args& a, int64_t n0, int64_t n1, uint32_t* ws, float* acc);
// The op's epilogue for fp32 and bf16 output (spec §2.3: round to the output dtype, then add the bias
// in that dtype; nibble/dtype.h's f32_to_bf16 rounding, NaN kept quiet): y (M, N) row-major, columns
// [n0, n1), from the task's fp32 sums acc[(n − n0)·Mp + m]; bias (fp32, N) may be null. The driver's
// generic epilogue reads them one element at a time, 64+ rows apart (6 % of the tier at M = 64 for
// fp32 output, ~15 % for bf16 output).
void awq_gemm_store_avx512bf16(const float* acc, int64_t Mp, int64_t M, int64_t N, int64_t n0, int64_t n1,
                               const float* bias, DType out, void* y);

}  // namespace nibble::kernels::awq
