// devtools/bench_peers.h — the competitors and ceilings the benchmarks compare nibble with:
// OpenBLAS on fp32 weights (the CPU peer), a plain bf16-weight GEMV (what a 16-bit checkpoint
// costs), and the int8 VNNI peak (a register-only vpdpbusd loop).
//
// OpenBLAS is loaded at run time (dlopen) on first use, not linked: its workers spin for ~100 ms
// after every call unless OPENBLAS_THREAD_TIMEOUT is set before the library initializes, so the
// loader sets OPENBLAS_THREAD_TIMEOUT=23 (2^23 ticks ≈ 3 ms, what nibble's pool spins) first,
// unless the user set it. Programs that never benchmark never load it.
//
// Part of nibble_devtools (not of libnibble). Thread-safe to call; the kernels run on the
// library pool (bf16, VNNI) or on OpenBLAS's own threads.
#pragma once
#include <cstdint>
#include <string>

namespace nibble::bench {

// True when an OpenBLAS shared library could be loaded (tried once); openblas_info() says which, or why not.
bool openblas_available();
std::string openblas_info();
// C (M,N) = A (M,K) · B(N,K)ᵀ, all fp32 row-major; cblas_sgemv when M == 1. OpenBLAS's thread
// count is set to nibble::num_threads(). Throws if OpenBLAS is unavailable.
void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C);

// y (M,N) fp32 = x (M,K) bf16 · W (N,K) bf16ᵀ, fp32 accumulation, with the instructions of nibble's
// active ISA level: vdpbf16ps (avx512bf16), FMA on widened values (avx512, avx512vnni: 16 lanes;
// avx2: 8), plain C (scalar). Threaded over output columns on the library pool.
void gemv_bf16_weights(int64_t M, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y);

// The int8 peak of the pool in GOP/s (best of `trials`; NaN without AVX-512 VNNI): many equal
// register-only tasks so that every thread stays busy.
double vnni_peak_gops(int trials);
// One thread's register-only vpdpbusd loop: `iters` iterations of 12 independent 16-lane dot
// products; returns the integer ops done (2 per multiply-add). Needs AVX-512 VNNI.
double vnni_peak_ops(int64_t iters);

}  // namespace nibble::bench
