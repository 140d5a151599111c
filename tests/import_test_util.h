// tests/import_test_util.h — small helpers shared by the importer tests (test_import_checkpoints,
// test_import_flux): a tensor element as fp32, byte equality, one layer of a checkpoint bound.
#pragma once
#include <cstring>
#include <string>

#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/formats.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"

namespace nibble::import_test {

inline float value_at(const Tensor& t, int64_t i) {  // f32, f16 or bf16 element i as fp32
  if (t.dtype() == DType::F32) return t.data<float>()[i];
  return t.dtype() == DType::F16 ? f16_to_f32(t.data<uint16_t>()[i]) : bf16_to_f32(t.data<uint16_t>()[i]);
}
inline bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}
inline QuantizedLayer bound(const Checkpoint& ck, const std::string& name) {
  for (const auto& src : collect_layers(ck))
    if (src.name == name) return bind_layer(src);
  throw Error("no layer " + name);
}

}  // namespace nibble::import_test
