// src/kernels/linear_f32_kernels.h — ISA micro-kernels of the dense fp32 linear (kernel-internal;
// the interface for the layers above is linear_f32.h, which explains the layouts).
#pragma once
#include <cstdint>

#include "kernels/linear_f32.h"
#include "nibble/dtype.h"

namespace nibble::kernels::linear {

// Scalar oracle: acc[m, n] (row stride N) = Σ_k x[m,k]·W[n,k] for n in [n0, n1), k ascending, fp32.
void linear_ref(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* acc,
                int64_t n0, int64_t n1);

// AVX-512 GEMM on packed panels [p0, p1): y (M, N) row-major; no bias.
void linear_gemm_avx512(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1);
// AVX-512 GEMV from stored rows, columns [n0, n1): y (M, N); no bias.
void linear_gemv_avx512(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* y,
                        int64_t n0, int64_t n1);
// AVX2 + FMA forms of the two (hosts without AVX-512); same contracts.
void linear_gemm_avx2(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1);
void linear_gemv_avx2(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* y,
                      int64_t n0, int64_t n1);
// The GEMV drivers' shared loop (instantiated inside each ISA file, so it compiles with that file's
// flags): columns [n0, n1) four weight rows at a time, then one at a time; dot4 / dot1 are the ISA's
// dot_rows<4> / dot_rows<1>, called as dot(x_row, K, w, wdt, n, out).
template <class Dot4, class Dot1>
inline void gemv_columns(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* y,
                         int64_t n0, int64_t n1, Dot4 dot4, Dot1 dot1) {
  float out[4];
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (int64_t m = 0; m < M; ++m) {
      dot4(x + m * K, K, w, wdt, n, out);
      for (int r = 0; r < 4; ++r) y[m * N + n + r] = out[r];
    }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      dot1(x + m * K, K, w, wdt, n, out);
      y[m * N + n] = out[0];
    }
}
// Portable GEMM on packed panels (the scalar ISA); same contract.
void linear_gemm_generic(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1);

}  // namespace nibble::kernels::linear
