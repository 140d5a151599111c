// kernels/dense_call.h — the argument checks and output shape shared by the dense entry points
// (linear_f32, linear_bf16): y = x · Wᵀ + b with x (..., K), W (N, K), b (N).
#pragma once
#include <cstdint>

#include "nibble/tensor.h"

namespace nibble::kernels {

struct DenseCall {
  int64_t M = 0, N = 0, K = 0;  // rows of x (all leading dims), out and in features
  Tensor x;                     // x in fp32 (or x itself when it is bf16 and bf16 x was asked for)
  Tensor bias;                  // fp32 (N), or undefined
  Tensor y;                     // fp32 (..., N), allocated
  bool done = false;            // M, N or K is 0: y is final (bias or zeros when K == 0)
};

// Throws nibble::Error naming `op` and the argument on a wrong dtype, rank or shape.
// keep_bf16_x: a bf16 x stays as it is (a kernel that reads bf16 pairs), other dtypes still go to fp32.
DenseCall prepare_dense_call(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias,
                             bool keep_bf16_x = false);

}  // namespace nibble::kernels
