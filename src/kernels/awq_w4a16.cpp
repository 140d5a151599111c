// awq_w4a16 op driver (spec §2.3): validation, flattening, activation layouts, ISA dispatch,
// thread partition over output columns, epilogue (bias, output dtype).
//
// Paths (see docs/awq.md for the measurements behind the thresholds):
//   Isa::Scalar            reference oracle, any M.
//   prepared weights, M ≤ tiled_gemv_max_m(isa)
//                          tiled GEMV: one sequential stream per thread (the prepared repack),
//                          lanes over output columns; exact products of the weights with x as the
//                          kernel gets it (avx512bf16: fp32 x rounded once to bf16, as the kitchen
//                          multiplies x in the model dtype), fp32 sums.
//   M ≤ gemv_max_m(isa)    GEMV: weights streamed once from the stored layout, fp32-exact products
//                          (avx512bf16 splits x exactly into 1/2/3 bf16 parts for bf16/f16/f32 x,
//                          so vdpbf16ps products are exact and only fp32 sums are rounded).
//   M > gemv_max_m(isa)    GEMM: a block of weight rows is dequantized once per task and reused by
//                          every row of x. avx2/avx512 dequantize to fp32 (same numerics as the
//                          reference); avx512bf16 rounds the dequantized weight and x to bf16 like
//                          the kitchen's MMA tier (8 < M; x in the model dtype), fp32 accumulation.
// Column blocks have a fixed width, so the work split — and every bit of the result — does not
// depend on the thread count.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "core/shape_math.h"
#include "kernels/awq_gemm_bf16.h"
#include "kernels/awq_w4a16_kernels.h"
#include "kernels/kernel_ref.h"
#include "kernels/output_tensor.h"
#include "kernels/svdquant_w4a4_kitchen_io.h"
#include "kernels/workspace.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble {

struct AwqW4A16Prepared {
  AwqW4A16Params params;  // validated, as stored (saving, the GEMM tier, ISAs without the tiled GEMV)
  Tensor tiled;           // repacked GEMV stream (kernels/awq_w4a16_kernels.h), when AVX2+ is here
};

namespace {
using namespace kernels::awq;
using kernels::Slot;
using kernels::test_fill;
using kernels::thread_scratch;
constexpr const char* kOp = "gemv_awq_w4a16";
constexpr int64_t kGemvCols = 256;  // output columns per GEMV task (4 staged sub-blocks)

// The accumulators: uninitialized in production; tests poison them (kernels/workspace.h).
struct AccBuffer {
  std::unique_ptr<float[]> p;
  float* data() const { return p.get(); }
};
AccBuffer acc_buffer(int64_t n) {
  AccBuffer b{std::unique_ptr<float[]>(new float[size_t(n)])};  // default-initialized: no pass over it
  test_fill(b.data(), n);
  return b;
}

// Largest M that takes the GEMV path (measured: docs/awq.md).
int64_t gemv_max_m(Isa isa) {
  // NIBBLE_AWQ_GEMV_MAX_M overrides the threshold (for measuring it; not a user setting).
  static const int64_t env_override = [] {
    const char* e = std::getenv("NIBBLE_AWQ_GEMV_MAX_M");
    return e && *e ? std::atoll(e) : int64_t(-1);
  }();
  if (env_override >= 0 && isa != Isa::Scalar) return env_override;
  switch (isa) {
    // measured crossovers (docs/awq.md): the GEMV re-decodes weights per 4 rows, the GEMM
    // dequantizes once per task; avx2's GEMV stays ahead longer (its fp32 dequantize is dearer).
    case Isa::Avx2: return 16;
    case Isa::Avx512: case Isa::Avx512Vnni: return 8;
    case Isa::Avx512Bf16: return 8;  // also the kitchen's kGemvMThreshold: bf16-rounded weights only for M > 8
    default: return 0;
  }
}

// Largest M that takes the tiled GEMV on prepared weights (measured, K=3072, N=18432, 2 threads:
// on AVX-512 it is ahead of the GEMM up to M = 24 — 5.8 vs 7.7 ms at M = 16 — level from 32 to
// 64 (the GEMM jumps at M = 33: 16.7 ms, its row blocks are 32 wide), and exact where the bf16 GEMM
// tier rounds weights; on AVX2 level with the GEMM at 16).
int64_t tiled_gemv_max_m(Isa isa) {
  static const bool env_override = [] {  // the same measuring knob as gemv_max_m
    const char* e = std::getenv("NIBBLE_AWQ_GEMV_MAX_M");
    return e && *e;
  }();
  if (env_override && isa != Isa::Scalar) return gemv_max_m(isa);
  switch (isa) {
    case Isa::Avx2: return 16;
    case Isa::Avx512: case Isa::Avx512Vnni: case Isa::Avx512Bf16: return 48;
    default: return 0;
  }
}

int bf16_parts(DType xdt) { return xdt == DType::BF16 ? 1 : xdt == DType::F16 ? 2 : 3; }

// Exact split of an fp32 value into bf16 parts: x = hi + mid + lo (hi = RNE(x), then the residuals).
// For bf16 inputs hi == x; for f16 inputs the first residual has ≤ 3 significant bits; for f32 the
// second residual has ≤ 8 (a bf16 significand), so the sum of the parts is x exactly (barring
// underflow of residuals below 2^-133, which vdpbf16ps would flush anyway).
inline void split_bf16(float x, int parts, uint16_t* out) {
  float r = x;
  for (int p = 0; p < parts; ++p) {
    const uint16_t h = f32_to_bf16(r);
    out[p] = h;
    r = r - bf16_to_f32(h);
  }
}

struct Impl {
  Problem p;
  DType xdt, out_dt;
  std::vector<float> bias32;  // the bias widened once per call (empty: no bias)
  kernels::w4a4::KitchenIo io;  // vector conversions of the epilogue (bit-identical to the scalar ones)
};

void check_inputs(const Tensor& x, const AwqW4A16Params& w) {
  if (!x.defined()) throw Error(fmt::format("{}: x is undefined", kOp));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: x", kOp));
  if (x.dim() < 1) throw Error(fmt::format("{}: x: expected shape (..., K), got a scalar", kOp));
  const int64_t K = x.size(-1), G = w.group_size;
  if (G <= 0 || G % 2 != 0)
    throw Error(fmt::format("{}: group_size must be a positive even integer, got {}", kOp, G));
  if (K % G != 0)
    throw Error(fmt::format("{}: K ({}, the last dimension of x) must be divisible by group_size ({})", kOp, K, G));
  if (!w.qweight.defined()) throw Error(fmt::format("{}: qweight is undefined", kOp));
  check_dtype(w.qweight, {DType::I8}, fmt::format("{}: qweight", kOp));
  if (w.qweight.dim() != 2)
    throw Error(fmt::format("{}: qweight: expected 2-D (N, K/2), got shape {}", kOp, shape_str(w.qweight.shape())));
  if (w.qweight.size(1) != K / 2 || K % 2 != 0)
    throw Error(fmt::format("{}: qweight.shape[1]*2 must equal K ({}, the last dimension of x); qweight.shape[1] is {}",
                            kOp, K, w.qweight.size(1)));
  if (K == 0) throw Error(fmt::format("{}: K must be positive", kOp));
  validate(w, kOp);
}

// Activations chunked for the GEMV kernels (layout in awq_w4a16_kernels.h).
template <class T, class Conv>
std::vector<T> chunk_activations(const float* x, int64_t M, int64_t K, int64_t G, int cw, int S, int parts,
                                 Conv conv, int64_t* row_elems) {
  const int64_t cpg = chunks_per_group(G, cw), groups = K / G;
  *row_elems = groups * cpg * cw;
  std::vector<T> out(size_t(M * parts * *row_elems), T(0));
  const int per_stream = cw / S;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t t = 0; t < cpg; ++t)
        for (int r = 0; r < S; ++r)
          for (int j = 0; j < per_stream; ++j) {
            const int64_t col = t * cw + int64_t(S) * j + r;
            if (col >= G) continue;
            const float v = x[m * K + g * G + col];
            for (int p = 0; p < parts; ++p)
              out[size_t((m * parts + p) * *row_elems + (g * cpg + t) * cw + r * per_stream + j)] = conv(v, p);
          }
  return out;
}

// Epilogue for columns [n0, n1): acc (fp32, no bias) → y in out dtype (spec §2.3: round to the
// output dtype, then add the bias in that dtype).
void epilogue(const Impl& im, const float* acc, int64_t acc_stride_m, int64_t acc_stride_n, void* y,
              int64_t n0, int64_t n1, int parts_to_sum) {
  const int64_t M = im.p.M, N = im.p.N;
  const float* b = im.bias32.empty() ? nullptr : im.bias32.data();
  if (acc_stride_n == 1 && parts_to_sum == 1) {
    // Rows of acc contiguous in n (the GEMV families): vector conversions in L1-sized chunks. At M = 1
    // the scalar loop below took about half of a call's work outside the kernel (~20 µs at N = 18432).
    constexpr int64_t kChunk = 256;
    alignas(64) uint16_t h[kChunk];
    alignas(64) float w[kChunk];
    const bool bf16 = im.out_dt == DType::BF16;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
        const int64_t n = std::min(kChunk, n1 - c0);
        const float* a = acc + m * acc_stride_m + c0;
        if (im.out_dt == DType::F32) {
          float* yo = static_cast<float*>(y) + m * N + c0;
          if (b)
            for (int64_t i = 0; i < n; ++i) yo[i] = a[i] + b[c0 + i];
          else
            std::memcpy(yo, a, size_t(n) * sizeof(float));
          continue;
        }
        uint16_t* yo = static_cast<uint16_t*>(y) + m * N + c0;
        if (!b) {
          im.io.store_half(a, nullptr, n, bf16, yo);
          continue;
        }
        im.io.store_half(a, nullptr, n, bf16, h);  // round to the output dtype, then add the bias there
        (bf16 ? im.io.bf16_to_f32 : im.io.f16_to_f32)(h, n, w);
        im.io.store_half(w, b + c0, n, bf16, yo);
      }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float a = acc[m * parts_to_sum * acc_stride_m + n * acc_stride_n];
      for (int p = 1; p < parts_to_sum; ++p) a += acc[(m * parts_to_sum + p) * acc_stride_m + n * acc_stride_n];
      if (im.out_dt == DType::F32) {
        static_cast<float*>(y)[m * N + n] = b ? a + b[n] : a;
      } else if (im.out_dt == DType::BF16) {
        uint16_t t = f32_to_bf16(a);
        if (b) t = f32_to_bf16(bf16_to_f32(t) + b[n]);
        static_cast<uint16_t*>(y)[m * N + n] = t;
      } else {
        uint16_t t = f32_to_f16(a);
        if (b) t = f32_to_f16(f16_to_f32(t) + b[n]);
        static_cast<uint16_t*>(y)[m * N + n] = t;
      }
    }
  }
}

// Group sums of x (fp32, in order) for the folded zero term.
std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  std::vector<float> xsum(size_t(M * groups));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = 0; k < G; ++k) s += x[m * K + g * G + k];
      xsum[size_t(m * groups + g)] = s;
    }
  return xsum;
}

// Activation pairs of the bf16 tiled kernel (layout: awq_w4a16_kernels.h), `parts` exact bf16
// parts per row.
std::vector<uint32_t> tiled_x_pairs(const float* x, int64_t M, int64_t K, int parts) {
  std::vector<uint32_t> xpairs(size_t(M * parts * (K / 2)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k8 = 0; k8 < K; k8 += 8)
      for (int r = 0; r < 4; ++r) {
        if (parts == 1) {  // bf16 x: the pairs are its own bits (x here is its exact fp32 widening)
          uint32_t lo, hi;
          std::memcpy(&lo, &x[m * K + k8 + r], 4);
          std::memcpy(&hi, &x[m * K + k8 + 4 + r], 4);
          xpairs[size_t(m * (K / 2) + k8 / 2 + r)] = (lo >> 16) | (hi & 0xFFFF0000u);
          continue;
        }
        uint16_t lo[3], hi[3];
        split_bf16(x[m * K + k8 + r], parts, lo);
        split_bf16(x[m * K + k8 + 4 + r], parts, hi);
        for (int q = 0; q < parts; ++q)
          xpairs[size_t((m * parts + q) * (K / 2) + k8 / 2 + r)] = uint32_t(lo[q]) | (uint32_t(hi[q]) << 16);
      }
  return xpairs;
}

[[noreturn]] void not_built(const Plan& pl) {
  throw Error(fmt::format("{}: internal error: kernel {} ({}) was not built", kOp, pl.name, isa_name(pl.isa)));
}

// GEMV over the prepared tiled stream (plan: gemv-tiled-*).
void run_tiled(const Impl& im, const Plan& pl, const float* x, const Tensor& tiled, void* yp) {
  const int64_t M = im.p.M, N = im.p.N, K = im.p.K, G = im.p.G;
  constexpr int64_t tiles_per_task = 32;  // 884 KB of stream per task at K=3072 (measured: 16–64 equal within 2 %)
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t tasks = (tiles + tiles_per_task - 1) / tiles_per_task;
  if (!pl.tiled_f32 && !pl.tiled_bf16) not_built(pl);
  std::vector<float> xr;
  if (pl.bf16_x) {  // x rounded once to bf16 (RNE); the group sums are of the rounded x
    xr.resize(size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) xr[size_t(i)] = bf16_to_f32(f32_to_bf16(x[i]));
    x = xr.data();
  }
  const std::vector<float> xsum = group_sums(x, M, K, G);
  const AccBuffer acc = acc_buffer(M * N);
  std::vector<uint32_t> xpairs;
  TiledF32Args af;
  TiledArgs ab;
  if (pl.tiled_f32) {
    af.p = im.p, af.tiled = tiled.data<uint8_t>(), af.x = x, af.xsum = xsum.data(), af.acc = acc.data();
  } else {
    ab.p = im.p, ab.tiled = tiled.data<uint8_t>(), ab.parts = pl.bf16_x ? 1 : bf16_parts(im.xdt);
    xpairs = tiled_x_pairs(x, M, K, ab.parts);
    ab.xpairs = xpairs.data(), ab.xsum = xsum.data(), ab.acc = acc.data();
  }
  parallel_for(tasks, [&](int64_t task) {
    const int64_t t0 = task * tiles_per_task, t1 = std::min(tiles, t0 + tiles_per_task);
    if (pl.tiled_f32) pl.tiled_f32(af, t0, t1);
    else pl.tiled_bf16(ab, t0, t1);
    epilogue(im, acc.data(), N, 1, yp, t0 * kTileCols, std::min(N, t1 * kTileCols), 1);
  });
}

void run_gemv(const Impl& im, const Plan& pl, const float* x, void* yp) {
  const int64_t M = im.p.M, N = im.p.N, K = im.p.K, G = im.p.G;
  if (!pl.gemv) not_built(pl);
  const std::vector<float> xsum = group_sums(x, M, K, G);
  GemvArgs a;
  a.p = im.p;
  a.xsum = xsum.data();
  const AccBuffer acc = acc_buffer(M * N);
  a.acc = acc.data();
  std::vector<float> xc32;
  std::vector<uint16_t> xc16;
  if (pl.bf16_dot) {
    a.parts = bf16_parts(im.xdt);
    a.wide = bf16_wide_ok(K, G);
    xc16 = chunk_activations<uint16_t>(x, M, K, a.wide ? kChunkBf16Wide : G, a.wide ? kChunkBf16Wide : kChunkBf16,
                                       kStreamsBf16, a.parts,
                                       [](float v, int p) {
                                         uint16_t parts[3];
                                         split_bf16(v, p + 1, parts);
                                         return parts[p];
                                       },
                                       &a.xc_row_elems);
    a.xc = xc16.data();
  } else {
    const bool is512 = pl.isa != Isa::Avx2;
    xc32 = chunk_activations<float>(x, M, K, G, is512 ? kChunkAvx512 : kChunkAvx2, is512 ? kStreamsAvx512 : kStreamsAvx2,
                                    1, [](float v, int) { return v; }, &a.xc_row_elems);
    a.xc = xc32.data();
  }
  const int64_t tasks = (N + kGemvCols - 1) / kGemvCols;
  const int64_t ws_floats = gemv_ws_floats(im.p);
  parallel_for(tasks, [&](int64_t t) {
    const int64_t n0 = t * kGemvCols, n1 = std::min(N, n0 + kGemvCols);
    pl.gemv(a, n0, n1, thread_scratch<float>(Slot::Stage, ws_floats));
    epilogue(im, acc.data(), N, 1, yp, n0, n1, 1);
  });
}

// GEMM, bf16 tier (avx512bf16, bf16 models): int4 decoded to bf16 inside the vdpbf16ps micro-kernel
// (kernels/awq_gemm_bf16.h): x rounded once to bf16 pairs (16-row vectors), then per task (96 output
// columns, every row) 6-column panels decoded while the previous one is multiplied; the fp32 sums
// land column-major in the task's scratch. Each output is one fp32 chain over k pairs ascending, whatever the
// thread count.
void run_gemm_panels(const Impl& im, const Plan& pl, const float* x, void* yp) {
#if !defined(NIBBLE_HAVE_AVX512)
  (void)x, (void)yp;
  not_built(pl);
#else
  if (!pl.gemm_bf16) not_built(pl);
  const int64_t M = im.p.M, N = im.p.N, K = im.p.K;
  GemmBf16Args a;
  a.p = im.p, a.Mp = gemm_rows_padded(M), a.K2p = gemm_pairs_padded(K);
  std::vector<uint32_t> xt(size_t(a.Mp * a.K2p));
  parallel_for(a.Mp / 16, [&](int64_t g) { awq_gemm_pack_x_avx512bf16(x, M, K, a.Mp, 16 * g, 16, xt.data()); });
  a.xt = xt.data();
  const int64_t tasks = (N + kGemmCols - 1) / kGemmCols;
  const int64_t ws = gemm_bf16_ws_dwords(K, a.Mp);
  // fp32 / bf16 output: each task's sums in its thread's scratch, written out by the kernel's store;
  // fp16 output: the driver's epilogue over sums kept for the whole call.
  const bool own_store = im.out_dt == DType::F32 || im.out_dt == DType::BF16;
  const AccBuffer accT = acc_buffer(own_store ? 0 : tasks * kGemmCols * a.Mp);
  parallel_for(tasks, [&](int64_t t) {
    const int64_t n0 = t * kGemmCols, n1 = std::min(N, n0 + kGemmCols);
    float* acc = own_store ? thread_scratch<float>(Slot::Acc, kGemmCols * a.Mp) : accT.data() + n0 * a.Mp;
    pl.gemm_bf16(a, n0, n1, thread_scratch<uint32_t>(Slot::Weights, ws), acc);
    if (own_store)
      awq_gemm_store_avx512bf16(acc, a.Mp, M, N, n0, n1, im.bias32.empty() ? nullptr : im.bias32.data(), im.out_dt, yp);
    else
      epilogue(im, accT.data(), 1, a.Mp, yp, n0, n1, 1);
  });
#endif
}

// GEMM, fp32 tiers (avx2 / avx512, and fp16 models on avx512bf16: exact dequantized weights).
void run_gemm(const Impl& im, const Plan& pl, const float* x, const Tensor& tiled, void* yp) {
  const int64_t M = im.p.M, N = im.p.N, K = im.p.K;
  if (pl.bf16_weights) {
    run_gemm_panels(im, pl, x, yp);
    return;
  }
  if (!pl.gemm) not_built(pl);
  GemmArgs a;
  a.p = im.p;
  std::vector<float> xp32;
  const int parts = 1;
  {
    const int mv = pl.isa == Isa::Avx2 ? kGemmMvAvx2 : kGemmMvAvx512;
    a.Mp = (M + mv - 1) / mv * mv;
    xp32.assign(size_t(K * a.Mp), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t m0 = m / (2 * mv) * (2 * mv), bw = std::min<int64_t>(2 * mv, a.Mp - m0);
        xp32[size_t(m0 * K + k * bw + (m - m0))] = x[m * K + k];
      }
    a.xp = xp32.data();
  }
  const AccBuffer accT = acc_buffer(N * a.Mp);
  a.accT = accT.data();
  const int64_t tasks = (N + kGemmRowsPerTask - 1) / kGemmRowsPerTask;
  parallel_for(tasks, [&](int64_t t) {
    const int64_t n0 = t * kGemmRowsPerTask, n1 = std::min(N, n0 + kGemmRowsPerTask);
    pl.gemm(a, n0, n1, thread_scratch<float>(Slot::Weights, gemm_ws_floats(im.p, n1 - n0)));
    epilogue(im, accT.data(), 1, a.Mp, yp, n0, n1, parts);
  });
}

Tensor run(const Tensor& x_in, const AwqW4A16Params& w, std::optional<DType> out_dtype, const Tensor& tiled = {},
           const Tensor& out = {}) {
  check_inputs(x_in, w);
  Impl im;
  const int64_t K = x_in.size(-1), N = w.qweight.size(0), G = w.group_size;
  const int64_t M = x_in.numel() / K;
  im.xdt = x_in.dtype();
  im.out_dt = out_dtype.value_or(w.wscales.dtype());
  if (im.out_dt != DType::F32 && im.out_dt != DType::BF16 && im.out_dt != DType::F16)
    throw Error(fmt::format("{}: out_dtype must be F32, BF16 or F16, got {}", kOp, dtype_name(im.out_dt)));
  im.io = kernels::w4a4::kitchen_io(active_isa());
  if (w.bias.defined()) {
    im.bias32.resize(size_t(w.bias.numel()));
    const DType bd = w.bias.dtype();
    if (bd == DType::F32) std::memcpy(im.bias32.data(), w.bias.data<float>(), im.bias32.size() * sizeof(float));
    else (bd == DType::BF16 ? im.io.bf16_to_f32 : im.io.f16_to_f32)(w.bias.data<uint16_t>(), w.bias.numel(), im.bias32.data());
  }
  im.p = Problem{M, N, K, G, w.qweight.data<uint8_t>(), w.wscales.data<uint16_t>(), w.wzeros.data<uint16_t>(),
                 w.wscales.dtype()};
  Shape out_shape = x_in.shape();
  out_shape.back() = N;
  Tensor y = kernels::output_tensor(out, im.out_dt, out_shape, kOp);
  if (M == 0 || N == 0) return y;
  void* yp = y.mutable_raw();

  const Tensor x32t = x_in.to_f32();
  const float* x = x32t.data<float>();
  const Plan pl = plan(active_isa(), M, G, im.xdt, im.p.sdtype, tiled.defined());
  switch (pl.family) {
    case Family::Reference: {
      const AccBuffer acc = acc_buffer(M * N);
      parallel_for((N + kGemvCols - 1) / kGemvCols, [&](int64_t t) {
        const int64_t n0 = t * kGemvCols, n1 = std::min(N, n0 + kGemvCols);
        awq_ref(im.p, x, acc.data(), n0, n1);
        epilogue(im, acc.data(), N, 1, yp, n0, n1, 1);
      });
      break;
    }
    case Family::Tiled: run_tiled(im, pl, x, tiled, yp); break;
    case Family::Gemv: run_gemv(im, pl, x, yp); break;
    case Family::Gemm: run_gemm(im, pl, x, tiled, yp); break;
  }
  return y;
}

}  // namespace

namespace kernels::awq {
void repack_tiled(const Problem& p, uint8_t* out) {
  const int64_t N = p.N, K = p.K, G = p.G, groups = K / G, L = G / 8;
  const int64_t tiles = (N + kTileCols - 1) / kTileCols, group_bytes = tiled_lines_per_group(G) * 64;
  // one task per tile: the repack of a large layer (load time) uses the pool too
  parallel_for(tiles, [&](int64_t t) {
    uint8_t* tile = out + t * tiled_tile_bytes(K, G);
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* blk = tile + g * group_bytes;
      for (int r = 0; r < kTileCols; ++r) {
        const int64_t n = t * kTileCols + r;
        for (int64_t j = 0; j < L; ++j) {
          uint8_t* d = blk + j * 64 + 4 * r;
          if (n < N) std::memcpy(d, p.qweight + n * (K / 2) + g * (G / 2) + 4 * j, 4);
          else std::memset(d, 0x88, 4);  // code 8: weight (8 − 8)·0 + 0 = 0
        }
        const uint16_t sv = n < N ? p.wscales[g * N + n] : uint16_t(0);
        const uint16_t zv = n < N ? p.wzeros[g * N + n] : uint16_t(0);
        std::memcpy(blk + L * 64 + 2 * r, &sv, 2);
        std::memcpy(blk + L * 64 + 32 + 2 * r, &zv, 2);
      }
    }
  });
}

Plan plan(Isa isa, int64_t M, int64_t G, DType xdt, DType sdt, bool tiled) {
  Plan pl;
  if (isa == Isa::Avx512Bf16 && G % 8 != 0) isa = Isa::Avx512;  // the bf16 kernels read 8-column lanes
  pl.isa = isa;
  if (isa == Isa::Scalar) return pl;  // reference, any M
  if (tiled && tiled_ok(G) && M <= tiled_gemv_max_m(isa)) {
    pl.family = Family::Tiled;
    pl.bf16_dot = isa == Isa::Avx512Bf16;
    // fp32 x (nn::Linear) is rounded once to bf16 (RNE) and runs the one-part bf16 kernel, as the
    // GEMM tier does (bf16_x): the kitchen multiplies x in the model dtype (bf16/fp16), never in fp32,
    // and exact products of fp32 x would need three bf16 parts (3× the dot products) or the fp32-FMA
    // kernel (measured with the same prefetch, interleaved: 1.14× slower at M = 1 and 2, 2× at M = 4,
    // 3× at M = 8; three parts 1.33× at M = 1). Weights stay exact; bf16/fp16 x stay exact (1/2 parts).
    pl.bf16_x = pl.bf16_dot && xdt == DType::F32;
    pl.name = pl.bf16_x ? "gemv-tiled-bf16dot-xbf16" : pl.bf16_dot ? "gemv-tiled-bf16dot" : "gemv-tiled-fp32";
    if (isa == Isa::Avx2) pl.tiled_f32 = NIBBLE_K2(awq_gemv_tiled_avx2);
    else if (pl.bf16_dot) pl.tiled_bf16 = NIBBLE_K512(awq_gemv_tiled_avx512bf16);
    else pl.tiled_f32 = NIBBLE_K512(awq_gemv_tiled_avx512);
    return pl;
  }
  if (M <= gemv_max_m(isa)) {
    // fp32 x would need 3 exact bf16 parts (3× the vdpbf16ps work); the fp32-FMA GEMV is faster
    // there (measured: 0.073 vs 0.082 ms at M=1, N=512, K=3072) and equally exact.
    if (isa == Isa::Avx512Bf16 && xdt == DType::F32) isa = Isa::Avx512;
    pl.family = Family::Gemv;
    pl.isa = isa;
    pl.bf16_dot = isa == Isa::Avx512Bf16;
    pl.name = pl.bf16_dot ? "gemv-bf16dot" : "gemv-fp32";
    pl.gemv = isa == Isa::Avx2 ? NIBBLE_K2(awq_gemv_avx2)
              : pl.bf16_dot    ? NIBBLE_K512(awq_gemv_avx512bf16)
                               : NIBBLE_K512(awq_gemv_avx512);
    return pl;
  }
  // the bf16 weight tier would be coarser than the kitchen for fp16 models: fp32 GEMM there
  if (isa == Isa::Avx512Bf16 && sdt == DType::F16) isa = Isa::Avx512;
  pl.family = Family::Gemm;
  pl.isa = isa;
  pl.bf16_dot = pl.bf16_weights = pl.bf16_x = isa == Isa::Avx512Bf16;
  pl.name = pl.bf16_weights ? "gemm-bf16w" : "gemm-fp32";
  if (pl.bf16_weights) {
    pl.gemm_bf16 = NIBBLE_K512(awq_gemm_bf16_avx512bf16);
    return pl;
  }
  pl.gemm = isa == Isa::Avx2 ? NIBBLE_K2(awq_gemm_avx2) : NIBBLE_K512(awq_gemm_avx512);
  return pl;
}

const char* path_name(Isa isa, int64_t M, int64_t G, DType xdt, DType sdt, bool prepared) {
  return plan(isa, M, G, xdt, sdt, prepared && prepared_has_tiled(G)).name;
}
}  // namespace kernels::awq

Tensor gemv_awq_w4a16(const Tensor& x, const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                      const Tensor& bias, int64_t group_size, std::optional<DType> out_dtype) {
  AwqW4A16Params w;
  w.qweight = qweight;
  w.wscales = wscales;
  w.wzeros = wzeros;
  w.bias = bias;
  w.group_size = group_size;
  if (qweight.defined() && qweight.dim() == 2) {
    w.N = qweight.size(0);
    w.K = checked_mul(2, qweight.size(1), fmt::format("{}: qweight: K = 2·shape[1]", kOp));
  }
  return run(x, w, out_dtype);
}

std::shared_ptr<const AwqW4A16Prepared> prepare_awq_w4a16(const AwqW4A16Params& p) {
  validate(p, "prepare_awq_w4a16");
  auto r = std::make_shared<AwqW4A16Prepared>();
  r->params = p;
  const int64_t N = p.qweight.size(0), K = 2 * p.qweight.size(1), G = p.group_size;
  // The tiled stream serves the AVX2/AVX-512 GEMVs; the oracle reads the stored layout.
  if (prepared_has_tiled(G) && N > 0 && K > 0) {
    r->tiled = Tensor::empty_weights(DType::U8, {tiled_bytes(N, K, G)});  // streamed every call: huge pages
    const Problem prob{0, N, K, G, p.qweight.data<uint8_t>(), p.wscales.data<uint16_t>(), p.wzeros.data<uint16_t>(),
                       p.wscales.dtype()};
    repack_tiled(prob, r->tiled.mutable_data<uint8_t>());
  }
  return r;
}

Tensor gemv_awq_w4a16(const Tensor& x, const AwqW4A16Prepared& w, std::optional<DType> out_dtype, const Tensor& out) {
  return run(x, w.params, out_dtype, w.tiled, out);
}

namespace {
AwqW4A16Params awq_args(const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros, int64_t group_size) {
  AwqW4A16Params w;
  w.qweight = qweight;
  w.wscales = wscales;
  w.wzeros = wzeros;
  w.group_size = group_size;
  if (qweight.defined() && qweight.dim() == 2) {
    w.N = qweight.size(0);
    w.K = checked_mul(2, qweight.size(1), fmt::format("{}: qweight: K = 2·shape[1]", kOp));
  }
  return w;
}
}  // namespace

Tensor prepare_awq_w4a16_stream(const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                                int64_t group_size) {
  return prepare_awq_w4a16(awq_args(qweight, wscales, wzeros, group_size))->tiled;  // owned, may be undefined
}

Tensor gemv_awq_w4a16_prepared(const Tensor& x, const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                               const Tensor& bias, int64_t group_size, std::optional<DType> out_dtype,
                               const Tensor& stream) {
  AwqW4A16Params w = awq_args(qweight, wscales, wzeros, group_size);
  w.bias = bias;
  if (stream.defined() && w.N > 0 && group_size > 0 && int64_t(stream.nbytes()) != tiled_bytes(w.N, w.K, group_size))
    throw Error(fmt::format("{}: the prepared stream ({} bytes) is not the one of these weights ({} bytes)", kOp,
                            stream.nbytes(), tiled_bytes(w.N, w.K, group_size)));
  return run(x, w, out_dtype, stream);
}

}  // namespace nibble

