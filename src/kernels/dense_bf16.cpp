// The bf16 dense GEMM driver (contract and layouts: kernels/dense_bf16.h) and linear_bf16 (ops.h).
//
// Paths: active ISA ≥ Avx512Bf16 → per task, activation chunks rounded into thread scratch and the
// vdpbf16ps micro-kernel (kernels/avx512bf16/dense_bf16_avx512bf16.cpp); otherwise a portable loop
// over the same packed weight with the same rounding (slow; nn::Linear only offers this path where
// the kernel runs). The oracle of the tests is kernels/reference/dense_bf16_ref.cpp.
#include <fmt/format.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "kernels/dense_bf16_kernels.h"
#include "kernels/dense_call.h"
#include "kernels/workspace.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble {
namespace kernels::dense_bf16 {

namespace {
inline uint16_t weight_bf16(const void* w, DType wdt, int64_t i) {
  switch (wdt) {
    case DType::F32: return f32_to_bf16(static_cast<const float*>(w)[i]);
    case DType::BF16: return static_cast<const uint16_t*>(w)[i];
    default: return f32_to_bf16(f16_to_f32(static_cast<const uint16_t*>(w)[i]));
  }
}

// Portable path: the same packed weight, the same sums per output (pairs ascending, 2q then 2q+1).
void gemm_portable(const float* x, int64_t M, const PackedBf16Weight& w, float* y, int64_t p0, int64_t p1) {
  const int64_t K = w.K;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t n = p * kPanel + j;
      if (n >= w.N) break;
      for (int64_t m = 0; m < M; ++m) {
        float s = 0.0f;
        for (int64_t q = 0; q < w.K2; ++q)
          for (int e = 0; e < 2; ++e) {
            const int64_t k = 2 * q + e;
            if (k >= K) break;
            const float xv = bf16_to_f32(f32_to_bf16(x[m * K + k]));
            s += xv * bf16_to_f32(w.data[((p * w.K2 + q) * kPanel + j) * 2 + e]);
          }
        y[m * w.N + n] = s;
      }
    }
}
}  // namespace

Plan plan(Isa isa) {
  Plan pl;
  pl.isa = isa;
#if defined(NIBBLE_HAVE_AVX512)
  if (isa >= Isa::Avx512Bf16) {
    pl.name = "avx512bf16";
    pl.reference = false;
    pl.pack_x = &pack_x_avx512bf16;
    pl.gemm = &gemm_chunk_avx512bf16;
  }
#endif
  return pl;
}

bool supported() { return !plan(active_isa()).reference; }

PackedBf16Weight pack_weight(const void* w, DType wdt, int64_t N, int64_t K) {
  PackedBf16Weight p;
  p.N = N;
  p.K = K;
  p.K2 = (K + 1) / 2;
  p.panels = (N + kPanel - 1) / kPanel;
  const size_t bytes = p.bytes();
  void* mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!mem) throw Error(fmt::format("linear_bf16: out of memory packing a ({}, {}) weight", N, K));
  p.storage = std::shared_ptr<void>(mem, [](void* q) { std::free(q); });
  p.data = static_cast<uint16_t*>(mem);
  uint16_t* dst = p.data;
  const int64_t K2 = p.K2;
  parallel_for(p.panels, [&](int64_t panel) {
    uint16_t* out = dst + panel * K2 * kPanel * 2;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t n = panel * kPanel + j;
      for (int64_t k = 0; k < 2 * K2; ++k)
        out[((k / 2) * kPanel + j) * 2 + (k & 1)] = (n < N && k < K) ? weight_bf16(w, wdt, n * K + k) : uint16_t(0);
    }
  });
  return p;
}

namespace {
// The GEMM tasks on activations in the chunk-major pair layout xp (chunk c: every row's pairs
// [c·kKcPairs, +nq), row stride nq), or on fp32 x32 for the portable path.
void run_tasks(const uint32_t* xp, const float* x32, int64_t M, const PackedBf16Weight& w, const float* bias,
               float* y, const Plan& pl) {
  const int64_t nblocks = (w.panels + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t mblocks = (M + kMc - 1) / kMc;
  parallel_for(mblocks * nblocks, [&](int64_t t) {
    const int64_t mb = t / nblocks, nb = t % nblocks;
    const int64_t m0 = mb * kMc, rows = M - m0 < kMc ? M - m0 : kMc;
    const int64_t p0 = nb * kPanelsPerTask, p1 = p0 + kPanelsPerTask < w.panels ? p0 + kPanelsPerTask : w.panels;
    const int64_t n0 = p0 * kPanel, n1 = p1 * kPanel < w.N ? p1 * kPanel : w.N;
    if (!pl.reference) {
      for (int64_t q0 = 0; q0 < w.K2; q0 += kKcPairs) {
        const int64_t nq = w.K2 - q0 < kKcPairs ? w.K2 - q0 : kKcPairs;
        pl.gemm(xp + M * q0 + m0 * nq, rows, nq, w, q0, p0, p1, q0 > 0, y, m0);
      }
    } else {
      gemm_portable(x32 + m0 * w.K, rows, w, y + m0 * w.N, p0, p1);
    }
    if (bias)
      for (int64_t m = m0; m < m0 + rows; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * w.N + n] += bias[n];
  });
}
}  // namespace

void run_packed(const float* x, int64_t M, const PackedBf16Weight& w, const float* bias, float* y) {
  const int64_t mblocks = (M + kMc - 1) / kMc;
  const int64_t chunks = (w.K2 + kKcPairs - 1) / kKcPairs;
  const Plan pl = plan(active_isa());
  // x rounded to bf16 pairs once, chunk-major: a task reads its rows' chunk as one contiguous block.
  // Rounding it per task instead (every column block again, from rows 12 KiB apart) took 20 % of the
  // time at M = 1024.
  std::unique_ptr<uint32_t[]> xp;
  if (!pl.reference) {
    xp.reset(new uint32_t[size_t(M * w.K2)]);  // every element is written below
    parallel_for(mblocks * chunks, [&](int64_t t) {
      const int64_t mb = t / chunks, c = t % chunks;
      const int64_t m0 = mb * kMc, rows = M - m0 < kMc ? M - m0 : kMc;
      const int64_t q0 = c * kKcPairs, nq = w.K2 - q0 < kKcPairs ? w.K2 - q0 : kKcPairs;
      pl.pack_x(x, w.K, m0, rows, q0, nq, xp.get() + M * q0 + m0 * nq);
    });
  }
  run_tasks(xp.get(), x, M, w, bias, y, pl);
}

void run_packed_bf16x(const uint16_t* x, int64_t M, const PackedBf16Weight& w, const float* bias, float* y) {
  const Plan pl = plan(active_isa());
  const int64_t K = w.K, chunks = (w.K2 + kKcPairs - 1) / kKcPairs;
  if (pl.reference) {  // the portable loop reads fp32 (exact widening)
    std::vector<float> x32(size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) x32[size_t(i)] = bf16_to_f32(x[i]);
    run_tasks(nullptr, x32.data(), M, w, bias, y, pl);
    return;
  }
  if (K % 2 == 0 && chunks == 1) {  // row-major bf16 x is already the pair layout (row stride K/2)
    run_tasks(reinterpret_cast<const uint32_t*>(x), nullptr, M, w, bias, y, pl);
    return;
  }
  // chunk-major copy of the pairs; an odd K's last pair takes a zero (as pack_x pads)
  std::unique_ptr<uint32_t[]> xp(new uint32_t[size_t(M * w.K2)]);
  parallel_for(chunks, [&](int64_t c) {
    const int64_t q0 = c * kKcPairs, nq = w.K2 - q0 < kKcPairs ? w.K2 - q0 : kKcPairs;
    uint32_t* dst = xp.get() + M * q0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t k = 2 * (q0 + q);
        const uint32_t lo = x[m * K + k], hi = k + 1 < K ? x[m * K + k + 1] : 0u;
        dst[m * nq + q] = lo | (hi << 16);
      }
  });
  run_tasks(xp.get(), nullptr, M, w, bias, y, pl);
}
}  // namespace kernels::dense_bf16

Tensor linear_bf16(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  using namespace kernels::dense_bf16;
  kernels::DenseCall c = kernels::prepare_dense_call("linear_bf16", x, weight, bias, /*keep_bf16_x=*/true);
  if (c.done) return c.y;
  float* yp = c.y.mutable_data<float>();
  kernels::test_fill(yp, c.M * c.N);
  const PackedBf16Weight packed = pack_weight(weight.raw(), weight.dtype(), c.N, c.K);
  const float* bp = c.bias.defined() ? c.bias.data<float>() : nullptr;
  if (c.x.dtype() == DType::BF16) run_packed_bf16x(c.x.data<uint16_t>(), c.M, packed, bp, yp);
  else run_packed(c.x.data<float>(), c.M, packed, bp, yp);
  return c.y;
}

}  // namespace nibble
