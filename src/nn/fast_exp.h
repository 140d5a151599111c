// src/nn/fast_exp.h — exp(x) in fp32 without libm calls, for the softmax and activations of the
// runtime's fp32 paths (one definition; the block and the attention use it).
//
// x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 Taylor/Horner polynomial (relative error < 2e-7),
// 2^n via the exponent bits; written so the compiler can vectorize it. Inputs below −87 return ~0,
// above 88 saturate to ~2^127.
#pragma once
#include <cstdint>
#include <cstring>

namespace nibble::nn {

inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x/ln2) via the 1.5·2^23 trick
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += int32_t(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace nibble::nn
