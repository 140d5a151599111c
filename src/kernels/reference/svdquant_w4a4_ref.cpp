// Scalar reference oracles of the SVDQuant W4A4 ops, written from the spec (§3.3 CUDA quantize
// semantics, §3.4 GEMM). Compiled with -ffp-contract=off: every fused multiply-add below is an explicit
// std::fmaf, every other product/sum is rounded separately, so the fast variants can reproduce each
// rounding step exactly (see svdquant_w4a4_kernels.h for the shared operation order).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/svdquant_w4a4_kernels.h"
#include "nibble/formats.h"

namespace nibble::kernels::w4a4 {

void round_bf16_ref(const float* x, int64_t n, float* out) {
  // f32_to_bf16 / vcvtne2ps2bf16 in integer form, branch-free so the compiler vectorizes it (it also
  // serves the AVX2 / AVX-512 plans): RNE on the bit pattern, NaN kept quiet, |x| < 2^-126 → ±0.
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    const uint32_t a = b & 0x7fffffffu;
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
    r = a > 0x7f800000u ? ((b | 0x00400000u) & 0xffff0000u) : r;
    r = a < 0x00800000u ? (b & 0x80000000u) : r;
    std::memcpy(out + i, &r, 4);
  }
}

void inv_smooth_ref(const float* smooth, int64_t K, float* inv_s) {
  for (int64_t k = 0; k < K; ++k) inv_s[k] = std::fabs(smooth[k]) > 1e-10f ? 1.0f / smooth[k] : 0.0f;
}

void quantize_ref(const float* x, int64_t K, const float* inv_s, bool act_unsigned, int8_t* codes, float* scales,
                  int64_t m0, int64_t m1) {
  const int64_t G = K / kGroup;
  const float qmax = act_unsigned ? 15.0f : 7.0f;
  const float lo = act_unsigned ? 0.0f : -7.0f, hi = act_unsigned ? 15.0f : 7.0f;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float y[kGroup];
      float amax = 0.0f;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t k = g * kGroup + j;
        y[j] = x[m * K + k] * inv_s[k];
        const float a = std::fabs(y[j]);
        if (!std::isnan(amax) && !(a <= amax)) amax = a;  // a NaN in the group stays: scale NaN
      }
      const float scale = std::max(amax / qmax, 1e-10f);  // NaN stays NaN (std::max keeps its first)
      const float inv = 1.0f / scale;
      for (int64_t j = 0; j < kGroup; ++j) {
        const float r = std::rint(y[j] * inv);  // default rounding: half-even
        const float q = std::isnan(r) ? lo : std::clamp(r, lo, hi);  // NaN → lo, as the vector clamps give
        codes[m * K + g * kGroup + j] = int8_t(q);
      }
      scales[m * G + g] = scale;
    }
  }
}

void lora_ref(const float* x, int64_t K, const float* down, int64_t R, float* lora, int64_t m0, int64_t m1,
              bool pairs) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t k = pairs ? (kk ^ 1) : kk;  // pairs: 1, 0, 3, 2, … (K is even)
        acc = std::fmaf(x[m * K + k], down[k * R + r], acc);
      }
      lora[m * R + r] = acc;
    }
}

void gemm_ref(int64_t M, int64_t N, int64_t K, int64_t R, const int8_t* codes, const float* ascale,
              const uint8_t* qweight, const float* wscale, const float* lora, const float* up, float* acc, int64_t n0,
              int64_t n1, bool up_pairs) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float a = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t d = 0;  // exact: |d| ≤ 64·15·8
        for (int64_t j = 0; j < kGroup; ++j) {
          const int64_t k = g * kGroup + j;
          const uint8_t byte = qweight[n * (K / 2) + k / 2];
          const int w = (k % 2 == 0) ? unpack_lo_signed(byte) : unpack_hi_signed(byte);
          d += int32_t(codes[m * K + k]) * w;
        }
        const float t = float(d) * ascale[m * G + g];
        a = std::fmaf(t, wscale[g * N + n], a);
      }
      const int64_t Rn = up_pairs ? R + (R & 1) : R;  // pairs: 1, 0, 3, 2, …; the pad index R adds +0
      for (int64_t rr = 0; rr < Rn; ++rr) {
        const int64_t r = up_pairs ? (rr ^ 1) : rr;
        a = r < R ? std::fmaf(lora[m * R + r], up[n * R + r], a) : a + 0.0f;
      }
      acc[m * N + n] = a;
    }
  }
}

}  // namespace nibble::kernels::w4a4
