// kernels/output_tensor.h — the output of an op entry point: a fresh tensor, or the caller's `out`
// (checked: dtype, shape, writable) so a caller with its own buffer avoids an allocation and a copy.
#pragma once
#include <fmt/format.h>

#include "nibble/error.h"
#include "nibble/tensor.h"

namespace nibble::kernels {

inline Tensor output_tensor(const Tensor& out, DType dtype, const Shape& shape, const char* op) {
  if (!out.defined()) return Tensor::empty(dtype, shape);
  if (out.dtype() != dtype || out.shape() != shape || !out.writable())
    throw Error(fmt::format("{}: out: expected a writable {} tensor of shape {}, got {} {}{}", op, dtype_name(dtype),
                            shape_str(shape), dtype_name(out.dtype()), shape_str(out.shape()),
                            out.writable() ? "" : " (read-only)"));
  return out;
}

}  // namespace nibble::kernels
