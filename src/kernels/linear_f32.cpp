// linear_f32 (include/nibble/ops.h): the dense fp32 baseline and the eager fallback of every
// format without a fused kernel. Validation, packing, ISA dispatch and the fixed work split of
// kernels/linear_f32_kernels.h (results are bit-identical for any thread count).
//
// Paths: Isa::Scalar → the oracle (kernels/reference/linear_f32_ref.cpp);
//        M < kGemmMinRows → GEMV on the stored rows (AVX-512 or AVX2);
//        otherwise → pack W into 32-column panels, then the panel GEMM (AVX-512 or AVX2
//        micro-kernel; the portable loop only for the scalar ISA).
#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

#include "kernels/dense_call.h"
#include "kernels/linear_f32_kernels.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble {
namespace kernels::linear {

namespace {
constexpr int64_t kRowsTaskCols = 64;  // output columns per GEMV / oracle task

inline float weight_at(const void* w, DType wdt, int64_t i) {
  switch (wdt) {
    case DType::F32: return static_cast<const float*>(w)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
  }
}

void add_bias(float* y, int64_t M, int64_t N, const float* bias, int64_t n0, int64_t n1) {
  if (!bias) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) y[m * N + n] += bias[n];
}
}  // namespace

PackedF32Weight pack_weight(const void* w, DType wdt, int64_t N, int64_t K) {
  PackedF32Weight p;
  p.N = N;
  p.K = K;
  p.panels = (N + kPanel - 1) / kPanel;
  const size_t bytes = size_t(p.panels * K * kPanel) * sizeof(float);
  void* mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!mem) throw Error(fmt::format("linear_f32: out of memory packing a ({}, {}) weight", N, K));
  p.storage = std::shared_ptr<void>(mem, [](void* q) { std::free(q); });
  p.data = static_cast<float*>(mem);
  float* dst = p.data;
  parallel_for(p.panels, [&](int64_t panel) {
    float* out = dst + panel * K * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t n = panel * kPanel + j;
      if (n >= N) {
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = 0.0f;
      } else if (wdt == DType::F32) {
        const float* row = static_cast<const float*>(w) + n * K;
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = row[k];
      } else {
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = weight_at(w, wdt, n * K + k);
      }
    }
  });
  return p;
}

void run_packed(const float* x, int64_t M, const PackedF32Weight& w, const float* bias, float* y) {
  const Isa isa = active_isa();
  const int64_t tasks = (w.panels + kPanelsPerTask - 1) / kPanelsPerTask;
  parallel_for(tasks, [&](int64_t t) {
    const int64_t p0 = t * kPanelsPerTask, p1 = p0 + kPanelsPerTask < w.panels ? p0 + kPanelsPerTask : w.panels;
#if defined(NIBBLE_HAVE_AVX512)
    if (isa >= Isa::Avx512)
      linear_gemm_avx512(x, M, w, y, p0, p1);
    else
#endif
#if defined(NIBBLE_HAVE_AVX2)
    if (isa >= Isa::Avx2)
      linear_gemm_avx2(x, M, w, y, p0, p1);
    else
#endif
      linear_gemm_generic(x, M, w, y, p0, p1);
    const int64_t n1 = p1 * kPanel < w.N ? p1 * kPanel : w.N;
    add_bias(y, M, w.N, bias, p0 * kPanel, n1);
  });
  (void)isa;
}

void run_rows(const float* x, int64_t M, int64_t K, const void* w, DType wdt, int64_t N, const float* bias,
              float* y) {
  const Isa isa = active_isa();
  parallel_for_range(N, kRowsTaskCols, [&](int64_t n0, int64_t n1) {
#if defined(NIBBLE_HAVE_AVX512)
    if (isa >= Isa::Avx512)
      linear_gemv_avx512(x, M, K, w, wdt, N, y, n0, n1);
    else
#endif
#if defined(NIBBLE_HAVE_AVX2)
    if (isa >= Isa::Avx2)
      linear_gemv_avx2(x, M, K, w, wdt, N, y, n0, n1);
    else
#endif
      linear_ref(x, M, K, w, wdt, N, y, n0, n1);
    add_bias(y, M, N, bias, n0, n1);
  });
  (void)isa;
}

void pack_rows_f32(const float* w, int64_t ld, int64_t N, int64_t K, float* dst) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  for (int64_t panel = 0; panel < panels; ++panel) {
    float* out = dst + panel * K * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t n = panel * kPanel + j;
      if (n >= N) {
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = 0.0f;
      } else {
        const float* row = w + n * ld;
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = row[k];
      }
    }
  }
}

void gemm_packed_serial(const float* x, int64_t M, const PackedF32Weight& w, float* y) {
#if defined(NIBBLE_HAVE_AVX512)
  if (active_isa() >= Isa::Avx512) return linear_gemm_avx512(x, M, w, y, 0, w.panels);
#endif
#if defined(NIBBLE_HAVE_AVX2)
  if (active_isa() >= Isa::Avx2) return linear_gemm_avx2(x, M, w, y, 0, w.panels);
#endif
  linear_gemm_generic(x, M, w, y, 0, w.panels);
}

}  // namespace kernels::linear

Tensor linear_f32(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  using namespace kernels::linear;
  kernels::DenseCall c = kernels::prepare_dense_call("linear_f32", x, weight, bias);
  if (c.done) return c.y;
  const float* bp = c.bias.defined() ? c.bias.data<float>() : nullptr;
  if (active_isa() == Isa::Scalar || c.M < kGemmMinRows) {
    run_rows(c.x.data<float>(), c.M, c.K, weight.raw(), weight.dtype(), c.N, bp, c.y.mutable_data<float>());
  } else {
    const PackedF32Weight packed = pack_weight(weight.raw(), weight.dtype(), c.N, c.K);
    run_packed(c.x.data<float>(), c.M, packed, bp, c.y.mutable_data<float>());
  }
  return c.y;
}

}  // namespace nibble
