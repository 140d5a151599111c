// Scalar reference of the bf16 dense GEMM (contract: kernels/dense_bf16_kernels.h).
#include "kernels/dense_bf16_kernels.h"

namespace nibble::kernels::dense_bf16 {

namespace {
inline float to_bf16_value(const void* w, DType wdt, int64_t i) {
  switch (wdt) {
    case DType::F32: return bf16_to_f32(f32_to_bf16(static_cast<const float*>(w)[i]));
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
    default: return bf16_to_f32(f32_to_bf16(f16_to_f32(static_cast<const uint16_t*>(w)[i])));
  }
}
}  // namespace

void dense_bf16_ref(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, float* acc,
                    int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float xv = bf16_to_f32(f32_to_bf16(x[m * K + k]));
        s += xv * to_bf16_value(w, wdt, n * K + k);  // exact product, one fp32 rounding per add
      }
      acc[m * N + n] = s;
    }
}

}  // namespace nibble::kernels::dense_bf16
