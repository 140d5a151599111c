// src/kernels/dense_bf16_kernels.h — micro-kernels of the bf16 dense GEMM (kernel-internal; the
// interface and the layouts are in dense_bf16.h).
#pragma once
#include <cstdint>

#include "kernels/dense_bf16.h"
#include "nibble/isa.h"

namespace nibble::kernels::dense_bf16 {

// Scalar reference, same arithmetic as the kernel: acc[m, n] (row stride N) = Σ_k bf16(x[m,k])·
// bf16(W[n,k]) for n in [n0, n1) in fp32, k ascending (no denormal flushing), from the
// stored rows (F32/BF16/F16).
void dense_bf16_ref(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* acc,
                    int64_t n0, int64_t n1);

// AVX-512 BF16: rounds x rows [m0, m0+rows) × pairs [q0, q0+nq) to bf16 pairs into xp (rows × nq uint32).
void pack_x_avx512bf16(const float* x, int64_t K, int64_t m0, int64_t rows, int64_t q0, int64_t nq, uint32_t* xp);
// AVX-512 BF16: y[m0+r, p·32 + j] (+)= Σ_{q<nq} xp[r·nq + q] · panel p pair (q0 + q), for r < rows,
// panels [p0, p1); accumulate = false starts from zero. y row stride w.N, columns ≥ N not written.
void gemm_chunk_avx512bf16(const uint32_t* xp, int64_t rows, int64_t nq, const PackedBf16Weight& w, int64_t q0,
                           int64_t p0, int64_t p1, bool accumulate, float* y, int64_t m0);

// ---- the kernel plan of an ISA level, decided once; the driver runs it, tests and tools read it.
// Scalar/Avx2/Avx512/Avx512Vnni: the portable loop over the packed weight (same rounding; nn::Linear
// keeps its fp32 kernels there). Avx512Bf16: activation packing + vdpbf16ps micro-kernel.
using PackXKernel = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t*);
using GemmChunkKernel = void (*)(const uint32_t*, int64_t, int64_t, const PackedBf16Weight&, int64_t, int64_t,
                                 int64_t, bool, float*, int64_t);
struct Plan {
  Isa isa = Isa::Scalar;
  const char* name = "portable";
  bool reference = true;  // the portable loop; the fast pointers below are then null
  PackXKernel pack_x = nullptr;
  GemmChunkKernel gemm = nullptr;
};
Plan plan(Isa isa);

}  // namespace nibble::kernels::dense_bf16
