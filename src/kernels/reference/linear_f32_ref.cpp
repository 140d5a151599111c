// Scalar oracle of the dense fp32 linear: acc = Σ_k x·w, k ascending, fp32, no contraction
// (this file is built with -ffp-contract=off).
#include "kernels/linear_f32_kernels.h"

namespace nibble::kernels::linear {

namespace {
inline float weight_at(const void* w, DType wdt, int64_t i) {
  switch (wdt) {
    case DType::F32: return static_cast<const float*>(w)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
  }
}
}  // namespace

void linear_ref(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* acc,
                int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * weight_at(w, wdt, n * K + k);
      acc[m * N + n] = s;
    }
}

void linear_gemm_generic(const float* x, int64_t M, const PackedF32Weight& w, float* y, int64_t p0, int64_t p1) {
  const int64_t K = w.K, N = w.N;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t k1 = k0 + kKc < K ? k0 + kKc : K;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = p0; p < p1; ++p) {
        const float* wp = w.data + p * K * kPanel;
        for (int64_t j = 0; j < kPanel; ++j) {
          const int64_t n = p * kPanel + j;
          if (n >= N) break;
          float s = k0 == 0 ? 0.0f : y[m * N + n];
          for (int64_t k = k0; k < k1; ++k) s += x[m * K + k] * wp[k * kPanel + j];
          y[m * N + n] = s;
        }
      }
  }
}

}  // namespace nibble::kernels::linear
