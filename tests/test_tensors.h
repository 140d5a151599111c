// tests/test_tensors.h — random operands and bit comparison shared by the kernel / thread tests.
#pragma once
#include <cstring>
#include <random>

#include "nibble/tensor.h"

namespace nibble::testing_tensors {

// U(lo, hi) drawn in fp32, then converted to dt.
inline Tensor random_f32(std::mt19937& rng, Shape shape, float lo, float hi, DType dt = DType::F32) {
  Tensor f = Tensor::empty(DType::F32, shape);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < f.numel(); ++i) f.mutable_data<float>()[i] = d(rng);
  return dt == DType::F32 ? f : f.to(dt);
}
// Uniform random bytes in an I8 tensor (packed codes of any format).
inline Tensor random_bytes(std::mt19937& rng, Shape shape) {
  Tensor t = Tensor::empty(DType::I8, shape);
  std::uniform_int_distribution<int> b(0, 255);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<uint8_t>()[i] = uint8_t(b(rng));
  return t;
}
// Same dtype, shape and bytes.
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

}  // namespace nibble::testing_tensors
