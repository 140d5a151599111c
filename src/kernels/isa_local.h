// src/kernels/isa_local.h — helpers for the files compiled with ISA flags (src/kernels/avx*/).
//
// An inline function or template used by an ISA file and by generic code is emitted as a weak
// symbol in both objects when not inlined (e.g. -O0), and the linker keeps one of them: possibly the
// copy compiled with -mavx512f, which generic code on an AVX2-only CPU would then call. So ISA files
// use no STL code and no shared inline functions; these helpers have internal linkage (static).
#pragma once

namespace nibble::kernels {

template <class T>
static inline T kmin(T a, T b) {  // std::min's rule: b < a ? b : a
  return b < a ? b : a;
}
template <class T>
static inline T kmax(T a, T b) {  // std::max's rule: a < b ? b : a
  return a < b ? b : a;
}

}  // namespace nibble::kernels
