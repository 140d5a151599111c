// convert_arrays.h — Python arrays ⇄ nibble::Tensor.
//
// In: anything nanobind's ndarray caster accepts (DLPack producers such as torch tensors, numpy
// arrays through DLPack or the buffer protocol), plus numpy arrays of the ml_dtypes types numpy
// cannot export (bfloat16, float8_e4m3fn, float8_e5m2), which are reinterpreted as same-width
// unsigned integers and tagged with the right nibble dtype. C-contiguous CPU arrays are wrapped
// zero-copy with Tensor::view; other layouts are made contiguous first (one copy), and so are
// arrays whose data is not aligned to their element size (e.g. a view at an odd byte offset). The wrapped
// tensors borrow memory: the caller keeps the ArgArrays alive until the kernels return — the
// kernels run with the GIL released, so the Python objects cannot be owned by the Tensor.
//
// Out: a numpy array that owns a heap copy of the Tensor handle (shared storage, no data copy)
// through a capsule; bf16/fp8 results come back as ml_dtypes arrays.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>
#include <vector>

#include "nibble/tensor.h"

namespace nibble_py {

namespace nb = nanobind;

// Holds the Python-side arrays whose memory the wrapped Tensors borrow.
class ArgArrays {
 public:
  // `obj` may be None (→ undefined Tensor). `what` names the argument in errors.
  // `bytes_as_int8`: a uint8 array is reinterpreted as int8 (packed nibbles: same bytes).
  nibble::Tensor wrap(nb::handle obj, const char* what, bool bytes_as_int8 = false);
  // True if [p, p+n) overlaps the memory of any wrapped input.
  bool overlaps(const void* p, size_t n) const;

 private:
  std::vector<nb::ndarray<nb::ro>> arrays_;
  std::vector<nb::object> objects_;  // converted (contiguous / reinterpreted) temporaries
};

// A numpy array sharing `t`'s storage. If `t` aliases an input of `args`, it is copied first.
nb::object to_numpy(const nibble::Tensor& t, const ArgArrays* args = nullptr);

// "float32" / "bfloat16" / ... → DType (the names numpy, ml_dtypes and torch use, and the
// safetensors spellings); throws ValueError listing the accepted names.
nibble::DType parse_dtype_name(const std::string& name);
std::string dtype_display_name(nibble::DType t);

}  // namespace nibble_py
