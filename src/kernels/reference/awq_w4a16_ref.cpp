// Scalar oracle of awq_w4a16 (spec §2.1/§2.3, the kitchen's naive M ≤ 8 tier), written straight
// from the formula and built with -ffp-contract=off so every product and sum is rounded as written:
//   W[n,k] = (q[n,k] − 8) · s[k/G, n] + z[k/G, n]      (fp32; s, z upcast from bf16/fp16)
//   acc[m,n] = Σ_k x[m,k] · W[n,k]                      (fp32, in k order)
// No folding, no vectors: it is what every fast path is tested against (Isa::Scalar runs it).
#include "kernels/awq_w4a16_kernels.h"

namespace nibble::kernels::awq {

namespace {
float half_to_f32(uint16_t v, DType dt) { return dt == DType::BF16 ? bf16_to_f32(v) : f16_to_f32(v); }
}  // namespace

void awq_ref(const Problem& p, const float* x, float* acc, int64_t n0, int64_t n1) {
  const int64_t K = p.K, N = p.N, G = p.G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = p.qweight + n * (K / 2);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = x + m * K;
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = qrow[k / 2];
        const int code = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);  // low nibble = even column
        const int64_t gi = (k / G) * N + n;
        const float s = half_to_f32(p.wscales[gi], p.sdtype);
        const float z = half_to_f32(p.wzeros[gi], p.sdtype);
        const float w = float(code - 8) * s + z;
        sum = sum + xr[k] * w;
      }
      acc[m * N + n] = sum;
    }
  }
}

}  // namespace nibble::kernels::awq
