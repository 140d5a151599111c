// The shared checks of the dense entry points (see kernels/dense_call.h).
#include "kernels/dense_call.h"

#include <fmt/format.h>

#include "nibble/error.h"
#include "nibble/ops.h"

namespace nibble::kernels {

DenseCall prepare_dense_call(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias,
                             bool keep_bf16_x) {
  if (!x.defined() || !weight.defined()) throw Error(fmt::format("{}: x and weight must be defined", op));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16, DType::F64}, fmt::format("{}: x", op));
  check_dtype(weight, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: weight", op));
  if (weight.dim() != 2)
    throw Error(fmt::format("{}: weight: expected 2-D (N, K), got shape {}", op, shape_str(weight.shape())));
  if (x.dim() < 1) throw Error(fmt::format("{}: x: expected shape (..., K), got a scalar", op));
  DenseCall c;
  c.N = weight.size(0);
  c.K = weight.size(1);
  if (x.size(-1) != c.K)
    throw Error(fmt::format("{}: x's last dimension ({}) must equal the weight's in_features ({})", op, x.size(-1), c.K));
  if (bias.defined()) {
    check_dtype(bias, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: bias", op));
    check_shape(bias, {c.N}, fmt::format("{}: bias", op));
    c.bias = bias.to_f32();
  }
  c.x = keep_bf16_x && x.dtype() == DType::BF16 ? x : x.to_f32();
  c.M = 1;  // product of the leading dims (numel / K would lose the rows when K == 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) c.M *= x.size(d);
  Shape out_shape = x.shape();
  out_shape.back() = c.N;
  c.y = Tensor::empty(DType::F32, out_shape);
  if (c.M == 0 || c.N == 0) {
    c.done = true;
  } else if (c.K == 0) {
    float* yp = c.y.mutable_data<float>();
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) yp[m * c.N + n] = c.bias.defined() ? c.bias.data<float>()[n] : 0.0f;
    c.done = true;
  }
  return c;
}

}  // namespace nibble::kernels
