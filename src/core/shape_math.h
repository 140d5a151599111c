// src/core/shape_math.h — overflow-checked arithmetic on sizes that come from files.
//
// Shapes are validated by shape_numel (the product of the non-zero dimensions fits in int64), but a
// zero-element shape such as [0, 2^62] still has dimensions whose derived sizes (K = 2·shape[1],
// N = 128·shape[0], ...) overflow. Every such product goes through checked_mul.
#pragma once
#include <fmt/format.h>

#include <cstdint>
#include <string_view>

#include "nibble/error.h"

namespace nibble {

// a·b; throws nibble::Error "<what>: a × b overflows int64" instead of wrapping (UB).
inline int64_t checked_mul(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) throw Error(fmt::format("{}: {} × {} overflows int64", what, a, b));
  return r;
}

}  // namespace nibble
