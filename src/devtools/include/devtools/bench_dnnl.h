// devtools/bench_dnnl.h — oneDNN's matmul as a benchmark peer (what torch's CPU bf16/int8 linears
// run): y (M,N) = x (M,K) · W (N,K)ᵀ with the weight reordered once to oneDNN's preferred layout
// (format `any`, as a framework caches it), activations in plain row-major.
//
// Optional at build time: compiled in when CMake finds Debian's libdnnl-dev (NIBBLE_HAVE_DNNL);
// without it dnnl_available() is false and the constructors throw. oneDNN runs on its own OpenMP
// threads, set to nibble::num_threads() at construction (a foreign pool for time_interleaved).
// Part of nibble_devtools (not of libnibble). Not thread-safe: one object per thread.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace nibble::bench {

bool dnnl_available();
std::string dnnl_info();  // "oneDNN 2.6.3 (cpu isa ...)" or why it is unavailable

// bf16 x (M,K) · bf16 W (N,K)ᵀ → fp32 y (M,N).
class DnnlBf16Matmul {
 public:
  DnnlBf16Matmul(int64_t M, int64_t N, int64_t K, const uint16_t* w);
  ~DnnlBf16Matmul();
  void run(const uint16_t* x, float* y);
 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// u8 x (M,K) · s8 W (N,K)ᵀ → s32 y (M,N) (the int8 matmul of VNNI; no scales).
class DnnlS8Matmul {
 public:
  DnnlS8Matmul(int64_t M, int64_t N, int64_t K, const int8_t* w);
  ~DnnlS8Matmul();
  void run(const uint8_t* x, int32_t* y);
 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::bench
