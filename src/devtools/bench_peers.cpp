// The benchmarks' competitors and ceilings (see devtools/bench_peers.h).
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* used by the reduce intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "devtools/bench_peers.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "devtools/bench_timing.h"
#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"

namespace nibble::bench {

// ---------------------------------------------------------------- OpenBLAS (dlopen)
namespace {
// The CBLAS ABI: enums are ints (CblasRowMajor 101, CblasNoTrans 111, CblasTrans 112).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using SgemvFn = void (*)(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using SetThreadsFn = void (*)(int);
struct Blas {
  SgemmFn sgemm = nullptr;
  SgemvFn sgemv = nullptr;
  SetThreadsFn set_threads = nullptr;
  std::string info;
};
const Blas& blas() {
  static Blas b;
  static std::once_flag once;
  std::call_once(once, [] {
    // read by OpenBLAS when it initializes, i.e. at dlopen: must be set before
    if (!std::getenv("OPENBLAS_THREAD_TIMEOUT")) setenv("OPENBLAS_THREAD_TIMEOUT", "23", 1);
    std::vector<std::string> names;
#ifdef NIBBLE_OPENBLAS_PATH
    names.push_back(NIBBLE_OPENBLAS_PATH);
#endif
    for (const char* n : {"libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0"}) names.push_back(n);
    for (const auto& n : names) {
      void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) continue;
      auto sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "cblas_sgemm"));
      auto sgemv = reinterpret_cast<SgemvFn>(dlsym(h, "cblas_sgemv"));
      auto st = reinterpret_cast<SetThreadsFn>(dlsym(h, "openblas_set_num_threads"));
      if (sgemm && sgemv && st) {
        b.sgemm = sgemm, b.sgemv = sgemv, b.set_threads = st;
        b.info = n;
        return;
      }
      dlclose(h);
    }
    b.info = fmt::format("not found (tried {})", fmt::join(names, ", "));
  });
  return b;
}
}  // namespace

bool openblas_available() { return blas().sgemm != nullptr; }
std::string openblas_info() { return blas().info; }

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C) {
  const Blas& b = blas();
  if (!b.sgemm) throw Error("bench: OpenBLAS is unavailable (" + b.info + ")");
  b.set_threads(num_threads());
  if (M == 1)  // y (N) = B (N,K) · x (K)
    b.sgemv(101, 111, int(N), int(K), 1.0f, B, int(K), A, 1, 0.0f, C, 1);
  else
    b.sgemm(101, 111, 112, int(M), int(N), int(K), 1.0f, A, int(K), B, int(K), 0.0f, C, int(N));
}

// ---------------------------------------------------------------- bf16-weight GEMV
namespace {

// Rows [n0, n1) for activation rows [m0, m0+MB): one 64-byte weight load feeds MB vdpbf16ps.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_rows_avx512(
    int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t full = K / 32;
  const __mmask16 tail = __mmask16((1u << ((K % 32) / 2)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      const __m512i wv = _mm512_loadu_si512(w + 32 * c);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + 32 * c));
    }
    if (tail) {
      const __m512i wv = _mm512_maskz_loadu_epi32(tail, w + 32 * full);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv,
                                  (__m512bh)_mm512_maskz_loadu_epi32(tail, x + (m0 + m) * K + 32 * full));
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// The AVX-512F level (no BF16): bf16 widened to fp32 by a shift, FMA; one weight load feeds MB rows.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 widen16_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bf16_rows_avx512f(int64_t N, int64_t K, const uint16_t* x,
                                                                          const uint16_t* W, float* y, int64_t n0,
                                                                          int64_t n1, int64_t m0) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 wv = widen16_bf16(w + k);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, widen16_bf16(x + (m0 + m) * K + k), acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(acc[m]);
      for (int64_t j = k; j < K; ++j) s += bf16_to_f32(w[j]) * bf16_to_f32(x[(m0 + m) * K + j]);
      y[(m0 + m) * N + n] = s;
    }
  }
}

// MB activation rows on the vdpbf16ps kernel (dot = true) or the AVX-512F FMA one.
template <bool dot, int MB>
void bf16_rows_512(int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y, int64_t n0, int64_t n1,
                   int64_t m0) {
  if constexpr (dot) bf16_rows_avx512<MB>(N, K, x, W, y, n0, n1, m0);
  else bf16_rows_avx512f<MB>(N, K, x, W, y, n0, n1, m0);
}
template <bool dot>
void bf16_rows_mb(int64_t mb, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y, int64_t n0,
                  int64_t n1, int64_t m0) {
  switch (mb) {
    case 1: bf16_rows_512<dot, 1>(N, K, x, W, y, n0, n1, m0); break;
    case 2: bf16_rows_512<dot, 2>(N, K, x, W, y, n0, n1, m0); break;
    case 3: bf16_rows_512<dot, 3>(N, K, x, W, y, n0, n1, m0); break;
    default: bf16_rows_512<dot, 4>(N, K, x, W, y, n0, n1, m0); break;
  }
}

__attribute__((target("avx2,fma"))) void bf16_rows_avx2(int64_t N, int64_t K, const uint16_t* x, const uint16_t* W,
                                                        float* y, int64_t n0, int64_t n1, int64_t m) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    const uint16_t* xr = x + m * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k))), 16));
      const __m256 xv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(xr + k))), 16));
      acc = _mm256_fmadd_ps(wv, xv, acc);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    float s = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
    for (; k < K; ++k) s += bf16_to_f32(w[k]) * bf16_to_f32(xr[k]);
    y[m * N + n] = s;
  }
}

}  // namespace

void gemv_bf16_weights(int64_t M, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y) {
  // the level nibble runs at (--isa / NIBBLE_ISA), so the yardstick has the same instructions as
  // nibble's kernels: vdpbf16ps, AVX-512F FMA on widened values, or AVX2 FMA
  const Isa isa = active_isa();
  const int64_t cols = 64;
  parallel_for((N + cols - 1) / cols, [&](int64_t t) {
    const int64_t n0 = t * cols, n1 = std::min(N, n0 + cols);
    if (isa == Isa::Avx512Bf16 || isa == Isa::Avx512 || isa == Isa::Avx512Vnni) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        if (isa == Isa::Avx512Bf16) bf16_rows_mb<true>(std::min<int64_t>(4, M - m0), N, K, x, W, y, n0, n1, m0);
        else bf16_rows_mb<false>(std::min<int64_t>(4, M - m0), N, K, x, W, y, n0, n1, m0);
      }
    } else if (isa == Isa::Avx2) {
      for (int64_t m = 0; m < M; ++m) bf16_rows_avx2(N, K, x, W, y, n0, n1, m);
    } else {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          float s = 0.0f;
          for (int64_t k = 0; k < K; ++k) s += bf16_to_f32(W[n * K + k]) * bf16_to_f32(x[m * K + k]);
          y[m * N + n] = s;
        }
    }
  });
}

// ---------------------------------------------------------------- int8 VNNI peak
// 12 independent accumulators hide the vpdpbusd latency; the operands stay in registers, so
// nothing but the dot-product unit is measured.
__attribute__((target("avx512f,avx512vnni"))) double vnni_peak_ops(int64_t iters) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));  // keep the loop from being folded
  }
  __m512i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return double(iters) * 12.0 * 64.0 * 2.0;
}

double vnni_peak_gops(int trials) {
  if (!isa_supported(Isa::Avx512Vnni)) return NAN;
  const int64_t iters = 500000, tasks = 16 * num_threads();
  double top = 0;
  for (int trial = 0; trial < std::max(1, trials); ++trial) {
    const double t0 = now_seconds();
    std::vector<double> ops(size_t(tasks), 0.0);
    parallel_for(tasks, [&](int64_t t) { ops[size_t(t)] = vnni_peak_ops(iters); });
    const double dt = now_seconds() - t0;
    double total = 0;
    for (double v : ops) total += v;
    top = std::max(top, total / dt / 1e9);
  }
  return top;
}

}  // namespace nibble::bench
