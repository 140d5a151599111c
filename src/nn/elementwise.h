// src/nn/elementwise.h — the element-wise parts of the Qwen-Image model (everything that is not a
// linear or the attention kernel): LayerNorm + modulation, RMSNorm (+ RoPE) per head, GELU-tanh,
// gated residuals, SiLU, RMSNorm rows. One implementation per op: an AVX-512 body (function
// target attributes, so no special compile flags) used when active_isa() ≥ Avx512, and a portable
// body with the same arithmetic (fp32, 16 partial sums per reduction, same order of operations) for
// the other ISAs. Every op is a pure function of its row, so results do not depend on the thread
// count. The threaded entry points split rows on the library pool.
//
// Arithmetic (all fp32):
//  * layernorm_modulate: mean = Σx/D, var = Σ(x − mean)²/D (two passes, 16 partial sums each),
//    out = (x − mean)·(1/√(var + eps))·(1 + scale) + shift.
//  * rmsnorm_rope: per head of hd: inv = 1/√(Σv²/hd + eps), y = v·inv·w; with RoPE (pairs 2i, 2i+1
//    rotated by the angle of pair i): out = y·C + swap_pairs(y)·S' with C = (c0, c0, c1, c1, ...)
//    and S' = (−s0, s0, −s1, s1, ...) — the expanded tables of rope_expand().
//  * gelu_tanh: x·e/(e + 1) with e = exp(2u), u = √(2/π)·(x + 0.044715·x³) — the same value as
//    0.5·x·(1 + tanh(u)); exp is nn/fast_exp.h (relative error < 2e-7).
#pragma once
#include <cstdint>

namespace nibble::nn::ew {

// out (rows, D) = LayerNorm(x)·(1 + scale) + shift (no affine, eps), rows split on the pool.
void layernorm_modulate(const float* x, int64_t rows, int64_t D, float eps, const float* shift, const float* scale,
                        float* out);

// RoPE tables (S, hd/2) cos/sin → expanded (S, hd): C = (c0, c0, c1, c1, ...), S' = (−s0, s0, ...).
void rope_expand(const float* cos, const float* sin, int64_t S, int64_t hd, float* c2, float* s2);

// In place on one row of D = heads·hd: RMSNorm per head with weight w (hd), then RoPE with the
// expanded tables of this row's position (c2, s2 of hd floats; both null = no RoPE).
void rmsnorm_rope_row(float* v, int64_t D, int64_t hd, float eps, const float* w, const float* c2, const float* s2);

// x[i] = GELU_tanh(x[i]) for i < n, split on the pool.
void gelu_tanh_inplace(float* x, int64_t n);

// x (rows, D) += gate ⊙ y; rows grouped by batch (rows_per_batch each); within batch b, rows
// before zero_from use mod row b, rows at or after it mod row B + b (B = rows / rows_per_batch);
// the gate is mod[row·mod_stride + gate_offset ...]. Split on the pool.
void gated_residual(float* x, const float* y, int64_t rows, int64_t rows_per_batch, int64_t D, const float* mod,
                    int64_t mod_stride, int64_t gate_offset, int64_t zero_from);

// out[i] = x[i]·sigmoid(x[i]) (serial: used on (B, D) embeddings).
void silu(const float* x, int64_t n, float* out);

// out (rows, D) = x·(1/√(Σx²/D + eps))·w, rows split on the pool (txt_norm).
void rmsnorm_rows(const float* x, int64_t rows, int64_t D, float eps, const float* w, float* out);

// Grow-only scratch of the calling thread, slot i (contents unspecified); valid until the
// thread's next request of the same slot. The block uses it for its activations so a step does
// not allocate (and fault in) hundreds of MB per block.
float* scratch(int slot, int64_t n);

}  // namespace nibble::nn::ew
