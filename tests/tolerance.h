// tolerance.h — error bounds the tests share, each derived once from the arithmetic it bounds.
//
// Unit roundoffs (round to nearest, p significand bits including the implicit one: u = 2^-p):
//   fp32 2^-24, bf16 2^-8, fp16 2^-11.
// γ_n = n·u / (1 − n·u) bounds the relative error of n successive roundings (Higham, Accuracy and
// Stability of Numerical Algorithms, §3.1); γ_a + γ_b ≤ γ_(a+b), so counts of two computations that
// are compared with each other simply add.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace nibble::test {

inline constexpr double kUnitRoundoffF32 = 0x1p-24;
inline constexpr double kUnitRoundoffBf16 = 0x1p-8;
inline constexpr double kUnitRoundoffF16 = 0x1p-11;

inline double gamma(double n, double u = kUnitRoundoffF32) { return n * u / (1.0 - n * u); }

// ---------------------------------------------------------------------------------- awq_w4a16
// Error of y[m,n] = Σ_k x[m,k]·W[n,k], W = (q−8)·s + z, relative to
//   A[m,n] = Σ_k |x[m,k]|·(|(q−8)·s| + |z|)     (s, z of the group of k; q−8 ∈ [−8, 7]).
// (q−8)·s is exact in fp32 (a 4-bit integer times a ≤ 11-bit significand), so every path's weight
// is within one rounding of the exact W, and |W| ≤ |(q−8)·s| + |z|.
//
// Scalar oracle (kernels/reference/awq_w4a16_ref.cpp): W rounded once, x·W rounded once, K − 1
// additions in k order: at most K + 2 roundings per term (one spare): ≤ γ_(K+2)·A.
inline double awq_oracle_terms(int64_t K) { return double(K) + 2.0; }

// Fast paths (kernels/awq_w4a16.cpp, the driver's path list):
//   GEMV (stored layout): exact products summed per group (≤ G roundings), the group sum scaled and
//     the zero term z·Σx added per group (K/G groups, a few roundings each): ≤ G + K/G + 6;
//   tiled GEMV (prepared weights): the same group sums in lanes of output columns, then two FMAs
//     per group (s·D and z·Σx): ≤ G + 2K/G + 6;
//   GEMM tiers (avx2 / avx512; avx512bf16 before its bf16 rounding): W dequantized in fp32 (one
//     rounding), then K products accumulated by FMA in one chain per output, x split into at most
//     3 exact bf16 parts summed at the end (≤ 2 more): ≤ K + 4.
// The bound covers the worst of them.
inline double awq_fast_terms(int64_t K, int64_t G) {
  return std::max(double(G) + 2.0 * double(K) / double(G) + 6.0, double(K) + 4.0);
}

// |fast − oracle| ≤ awq_vs_oracle(K, G, bf16_weights)·A, plus the bias add (one fp32 rounding of
// |y| in each: 2u·|y|, added by the caller). bf16_weights: the avx512bf16 GEMM tier rounds the
// dequantized fp32 weight to bf16 (like the kitchen's MMA tier), a relative error ≤ 2^-8 of |W|.
// bf16_x: that tier also rounds x to bf16 (for fp32/fp16 x): with x̂ = x(1+δ), ŵ the rounded weight,
// |x̂ŵ − xw| ≤ |x̂|·|ŵ − w| + |x̂ − x|·|w|, so the weight term grows by (1 + 2^-8), x adds 2^-8, and
// the fp32 sums run over |x̂||ŵ| ≤ (1 + 2^-8)²·A.
// bf16_x without bf16_weights: the avx512bf16 tiled GEMV on fp32 x ("gemv-tiled-bf16dot-xbf16")
// rounds x once (RNE) and keeps the weight exact: |x̂w − xw| ≤ 2^-8·|x||w| (+ 2^-8·A), its group sums
// Σx̂ are of the rounded x, and its fp32 sums run over |x̂||w| ≤ (1 + 2^-8)·A (covered by the (1 + 2^-8)²
// factor below).
inline double awq_vs_oracle(int64_t K, int64_t G, bool bf16_weights, bool bf16_x = false) {
  const double ub = kUnitRoundoffBf16, xs = bf16_x ? 1.0 + ub : 1.0;
  const double fp32 = gamma(awq_oracle_terms(K) + awq_fast_terms(K, G)) * xs * xs;
  return fp32 + (bf16_weights ? ub * (1.0 + kUnitRoundoffF32) * xs : 0.0) + (bf16_x ? ub : 0.0);
}

// The same, for a path compared with an exact (double) evaluation of its own documented weight
// rounding — the oracle's fp32 W, or for the bf16 tier W_bf16 = RNE_bf16(fp32 W) and x_bf16 — where only the
// fp32 sums remain: γ_(fast terms + 1), relative to A computed from that weight (+1: the GEMV
// paths never form W, and the fp32 W is one rounding away from the exact one).
inline double awq_vs_exact(int64_t K, int64_t G) { return gamma(awq_fast_terms(K, G) + 1.0); }

// ---------------------------------------------------------------------------------- svdquant_w4a4
// The bf16 low-rank branch (kernels/svdquant_w4a4_kernels.h): lora = Σ_k x̂_k·d_k with x̂ = RNE_bf16(x)
// (|x| < 2^-126 → 0), d the stored bf16 proj_down, each bf16·bf16 product exact in fp32, summed by one
// fp32 chain of K steps (one rounding each) in pair order. Against the exact Σ_k x_k·d_k:
//   input rounding   |Σ x̂d − Σ xd| ≤ u_bf16·Σ|x||d|                  (|x̂ − x| ≤ 2^-8·|x|; 0 for bf16 x)
//   fp32 chain       |fl(Σ x̂d) − Σ x̂d| ≤ γ_K·Σ|x̂||d| ≤ γ_K·(1 + u_bf16)·Σ|x||d|
// relative to A = Σ_k |x_k|·|d_k|, plus an absolute term for the flushes below 2^-126 (the x flush,
// ≤ 2^-126·Σ|d|; vdpbf16ps reading a denormal d as 0, ≤ 2^-126·Σ|x|; its FTZ of a partial sum,
// ≤ 2^-126 per step: ≤ 2^-126·(K + Σ|d| + Σ|x|)), which svdquant_lowrank_bf16_abs returns.
// x_rounded: false when x was bf16 already (x̂ = x).
inline double svdquant_lowrank_bf16_rel(int64_t K, bool x_rounded) {
  const double ub = x_rounded ? kUnitRoundoffBf16 : 0.0;
  return ub + gamma(double(K)) * (1.0 + ub);
}
inline double svdquant_lowrank_bf16_abs(int64_t K, double sum_abs_d, double sum_abs_x) {
  return 0x1p-126 * (double(K) + sum_abs_d + sum_abs_x);
}

}  // namespace nibble::test
