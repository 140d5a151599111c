// devtools/random_tensor.h — uniform random test operands for the benchmarks: values drawn in fp32
// from U(lo, hi) with the caller's generator, then converted to dt.
#pragma once
#include <random>

#include "nibble/tensor.h"

namespace nibble::bench {

inline Tensor random_tensor(std::mt19937& rng, DType dt, Shape shape, float lo, float hi) {
  Tensor f = Tensor::empty(DType::F32, shape);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < f.numel(); ++i) f.mutable_data<float>()[i] = d(rng);
  return dt == DType::F32 ? f : f.to(dt);
}

}  // namespace nibble::bench
