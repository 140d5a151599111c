// svdquant_w4a4 op drivers (spec §3.3–3.4): validation, layouts, ISA dispatch, threads, epilogue.
//
// Three entry points share two internal stages:
//   Acts   = quantize stage: int8 codes (M, K), fp32 ascale [m][g] already rounded to the stored dtype,
//            the signed-offset correction acorr [m][g], and lora (M, R) rounded to its dtype.
//   GEMM   = integer dot products + fp32 scale epilogue + low-rank + bias, written into y.
// quantize_svdquant_w4a4 and scaled_mm_svdquant_w4a4 run one stage each and convert from/to the kitchen
// tensors (nibbles, transposed ascales, M padding); svdquant_linear runs both without materializing the
// kitchen intermediates. Every variant performs the same fp32 operations in the same order
// (svdquant_w4a4_kernels.h), so the fused layer equals the two-op composition bit for bit, and every ISA
// equals the scalar reference.
// Dispatch: Scalar → reference oracles; Avx2/Avx512 → AVX2 GEMM (vpmaddubsw), AVX-512 quantize when
// available; Avx512Vnni/Bf16 → VNNI GEMM. Work is split into fixed blocks of rows and output columns, so
// results do not depend on the thread count.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/shape_math.h"
#include "kernels/svdquant_w4a4_kernels.h"
#include "kernels/svdquant_w4a4_kitchen_io.h"
#include "kernels/kernel_ref.h"
#include "kernels/output_tensor.h"
#include "kernels/workspace.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble {

using namespace kernels::w4a4;

// Load-time form: the stored params (kept for saving and for the scalar reference) plus the weight in
// the micro-kernel layout and fp32 side arrays.
struct SvdquantW4A4Prepared {
  SvdquantW4A4Params params;
  int64_t N = 0, K = 0, R = 0, G = 0, T = 0, Rd = 0;
  Tensor wpk;    // U8 packed weights (T·G·1024 bytes)
  Tensor wsc;    // F32 [T][G][32]
  Tensor up;     // F32 [T][R][32]
  Tensor down;   // F32 (K, Rd), Rd = R rounded up to 16, zero padded
  Tensor down_pk;  // U16 (K/2, Rd, 2) bf16 pairs of `down` for vdpbf16ps; only when proj_down is stored bf16
  Tensor up_pk;    // U16 [T][⌈R/2⌉][32][2] bf16 pairs of `up` for vdpbf16ps; only when proj_up is stored bf16
  bool up_bf16 = false;  // proj_up stored bf16: the bf16 up-projection applies to bf16 lora
  Tensor inv_s;  // F32 (K)
  Tensor bias;   // F32 (N) or undefined
};

namespace {

// GEMM task = kRowsPerTask rows (a multiple of the VNNI MR = 6 and the AVX2 MR = 3) × kTilesPerTask
// tiles of 32 columns; at K = 3072 its activation block (576 KiB) and weight block (192 KiB) share the
// 1 MiB L2. Against 96 × 8 (the weights of every row block streamed from L3 twice as often), 192 × 4
// ran the whole single-thread GEMM at 74–76 % of the VNNI peak instead of 71–73 % (M = 1152, K = 3072,
// N = 3072 and 12288; CPU time, same process); 384 × 2 and 48 × 16 were slower.
constexpr int64_t kRowsPerTask = 192;
constexpr int64_t kTilesPerTask = 4;
constexpr int64_t kQuantRows = 16;     // quantize / low-rank task rows

float round_to(float v, DType dt) {
  switch (dt) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(v));
    case DType::F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}
void store_as(void* dst, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::F32: static_cast<float*>(dst)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(dst)[i] = f32_to_f16(v); break;
  }
}

void check_out_dtype(DType dt, const char* op) {
  if (dt != DType::F32 && dt != DType::BF16 && dt != DType::F16)
    throw Error(fmt::format("{}: output dtype must be F32, BF16 or F16, got {}", op, dtype_name(dt)));
}

[[noreturn]] void not_built(const Plan& pl, const char* stage) {
  throw Error(fmt::format("svdquant_w4a4: internal error: the {} kernel of plan {} ({}) was not built", stage, pl.name,
                          isa_name(pl.isa)));
}

// ---- weight packing (layout: svdquant_w4a4_kernels.h)
Tensor pack_weight(const uint8_t* q, int64_t N, int64_t K) {
  const int64_t G = K / kGroup, T = (N + kTileN - 1) / kTileN;
  Tensor out = Tensor::empty(DType::U8, {T * G * kTileBytesPerGroup});
  uint8_t* d = out.mutable_data<uint8_t>();
  parallel_for(T, [&](int64_t t) {
    for (int64_t g = 0; g < G; ++g)
      for (int p = 0; p < 8; ++p)
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < 16; ++j) {
            const int64_t n = t * kTileN + h * 16 + j;
            uint8_t* o = d + ((t * G + g) * 8 + p) * 128 + h * 64 + j * 4;
            for (int b = 0; b < 4; ++b) {
              if (n >= N) {
                o[b] = 0x88;  // w = 0
                continue;
              }
              const int64_t k_lo = g * kGroup + 8 * p + b, k_hi = k_lo + 4;
              const uint8_t blo = q[n * (K / 2) + k_lo / 2], bhi = q[n * (K / 2) + k_hi / 2];
              // offset u = w + 8 is the signed nibble with its top bit flipped
              const uint8_t ulo = uint8_t(((k_lo % 2) ? (blo >> 4) : (blo & 0xF)) ^ 8);
              const uint8_t uhi = uint8_t(((k_hi % 2) ? (bhi >> 4) : (bhi & 0xF)) ^ 8);
              o[b] = uint8_t(ulo | (uhi << 4));
            }
          }
  });
  return out;
}
// (G, N) fp32 natural → [T][G][32]
Tensor pack_cols(const float* s, int64_t rows, int64_t N) {
  const int64_t T = (N + kTileN - 1) / kTileN;
  Tensor out = Tensor::zeros(DType::F32, {T * rows * kTileN});
  float* d = out.mutable_data<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < kTileN && t * kTileN + j < N; ++j) d[(t * rows + r) * kTileN + j] = s[r * N + t * kTileN + j];
  return out;
}
// (N, R) → (R, N) fp32
std::vector<float> transpose(const float* a, int64_t rows, int64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[size_t(j * rows + i)] = a[i * cols + j];
  return out;
}

Tensor natural_weight(const SvdquantW4A4Params& p) { return p.tile_packed ? tile_unpack_weight(p.qweight) : p.qweight; }
Tensor natural_wscales_f32(const SvdquantW4A4Params& p) {
  return (p.tile_packed ? tile_unpack_wscales(p.wscales) : p.wscales).to_f32();
}
Tensor natural_up_f32(const SvdquantW4A4Params& p) {
  return (p.proj_up_tile ? tile_unpack_proj_up(p.proj_up) : p.proj_up).to_f32();
}

// ---- activations in the internal form
struct Acts {
  int64_t M = 0, K = 0, G = 0, R = 0;
  std::vector<int8_t> codes;    // (M, K)
  std::vector<float> ascale;    // (M, G), rounded to the stored dtype
  std::vector<int32_t> acorr;   // (M, G)
  std::vector<float> lora;      // (M, R), rounded to the lora dtype
  bool lora_bf16 = false;       // the lora values are bf16 (its dtype is BF16): bf16 up-projection
  std::vector<uint32_t> lora2;  // (M, ⌈R/2⌉) their bf16 pairs (pad 0), when filled by fill_acts
  bool lora2_ready = false;
};
// lora rows [m0, m1) (M, R) → bf16 pairs (M, R2), the pad index R zero.
void pack_lora_pairs(const float* lora, int64_t R, uint32_t* l2, int64_t m0, int64_t m1) {
  const int64_t R2 = (R + 1) / 2;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t q = 0; q < R2; ++q) {
      const float* l = lora + m * R;
      const uint32_t lo = f32_to_bf16(l[2 * q]), hi = 2 * q + 1 < R ? f32_to_bf16(l[2 * q + 1]) : 0u;
      l2[m * R2 + q] = lo | (hi << 16);
    }
}

// Quantize rows of x (fp32 (M, K)); `shift` adds the act_unsigned shift rounded to x_dtype first.
// lora from lora_x (fp32 (M, K)) with down (K, ldd).
// `parts` selects the stages (1 = quantize, 2 = low-rank, 3 = both; the benchmark times them apart).
// Buffers only grow: a reused Acts (the fused layer keeps one per calling thread, like the kitchen's
// workspace reuse) costs no allocation or page faults for a shape it has seen.
template <class T>
void grow(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}
// Rows of a float (M, K) input as fp32: its own rows when F32, else widened exactly (as to_f32 does) into
// this thread's scratch `slot`, one task's rows at a time — a bf16/f16 x is never copied whole (a whole
// fp32 copy wrote and re-read twice x's bytes: ~3 % of the fused layer at M = 4096).
struct RowSource {
  const float* f32 = nullptr;
  const uint16_t* half = nullptr;  // bf16 / f16 rows (dt)
  DType dt = DType::F32;
  HalfToF32Kernel widen = nullptr;
  static RowSource of(const float* x) {
    RowSource s;
    s.f32 = x;
    return s;
  }
  static RowSource of(const Tensor& t, const KitchenIo& io) {
    if (t.dtype() == DType::F32) return of(t.data<float>());
    RowSource s;
    s.half = t.data<uint16_t>();
    s.dt = t.dtype();
    s.widen = t.dtype() == DType::BF16 ? io.bf16_to_f32 : io.f16_to_f32;
    return s;
  }
  bool same_as(const RowSource& o) const { return f32 == o.f32 && half == o.half; }
  RowSource from_row(int64_t m0, int64_t K) const {  // the rows from m0 on
    RowSource s = *this;
    if (f32) s.f32 += m0 * K;
    else s.half += m0 * K;
    return s;
  }
  const float* rows(int64_t m0, int64_t m1, int64_t K, kernels::Slot slot) const {
    if (f32) return f32 + m0 * K;
    float* d = kernels::thread_scratch<float>(slot, (m1 - m0) * K);
    widen(half + m0 * K, (m1 - m0) * K, d);
    return d;
  }
};

// lr_bf16: the bf16 low-rank arithmetic (kernels header); dpk: down pair-packed (pack_down_pairs), needed
// by a plan with a vdpbf16ps kernel.
struct LowRank {
  const float* down = nullptr;  // (K, ldd) fp32
  int64_t ldd = 0, R = 0;
  DType dt = DType::F32;  // lora rounded to this dtype
  bool bf16 = false;
  const uint16_t* dpk = nullptr;
};
void fill_acts(Acts& a, const Plan& pl, const RowSource& x, int64_t M, int64_t K, DType x_dtype, bool shift, const float* inv_s,
               bool act_unsigned, const RowSource& lora_x, const LowRank& lr, int parts = 3) {
  const float* down = lr.down;
  const int64_t ldd = lr.ldd, R = lr.R;
  const DType lora_dt = lr.dt;
  a.M = M, a.K = K, a.G = K / kGroup, a.R = R;
  const int64_t G = a.G;
  const bool do_q = parts & 1, do_l = (parts & 2) && R > 0;
  if (do_q) {
    grow(a.codes, M * K);
    grow(a.ascale, M * G);
    grow(a.acorr, M * G);
  }
  if (parts & 2) a.lora_bf16 = lora_dt == DType::BF16;
  a.lora2_ready = do_l && a.lora_bf16 && pl.gemm_bf16up;  // pairs for the vdpbf16ps up-projection, per task
  if (a.lora2_ready) grow(a.lora2, M * ((R + 1) / 2));
  if (do_l) {
    grow(a.lora, M * R);
    kernels::test_fill(a.lora.data(), M * R);  // tests poison it: an unwritten element shows as NaN
  }
  const int64_t tasks = (M + kQuantRows - 1) / kQuantRows;
  if (!pl.reference && ((do_q && !pl.quantize) || (do_l && !pl.lora))) not_built(pl, "quantize/low-rank");
  std::vector<float> down_nat;  // the reference wants (K, R) without padding
  if (pl.reference && R > 0 && ldd != R) {
    down_nat.resize(size_t(K * R));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) down_nat[size_t(k * R + r)] = down[k * ldd + r];
  }
  parallel_for(tasks, [&](int64_t task) {
    const int64_t m0 = task * kQuantRows, m1 = std::min(M, m0 + kQuantRows);
    // Kernels that read bf16/f16 rows as such (no shift to apply first) skip the fp32 rows; otherwise this
    // task's rows widened (row m0 first). The low-rank input is the same rows unless the caller gave its own.
    const bool q_half = do_q && !shift && x.half && pl.quantize_half;
    const bool l_half = do_l && lora_x.half && lora_x.dt == DType::BF16 && lr.bf16 && lr.dpk && pl.lora_bf16_xbf16;
    const bool l_same = lora_x.same_as(x);
    const float* xr =
        (do_q && !q_half) || (do_l && !l_half && l_same) ? x.rows(m0, m1, K, kernels::Slot::KitchenX) : nullptr;
    const float* xs = xr;
    if (shift && do_q) {
      float* sh = kernels::thread_scratch<float>(kernels::Slot::Shift, (m1 - m0) * K);
      const float* src = xr;
      const int64_t n = (m1 - m0) * K;
      // x + shift rounded to x's dtype (a bf16/f16 tensor op in the kitchen, spec §3.4)
      if (x_dtype == DType::F32)
        for (int64_t i = 0; i < n; ++i) sh[i] = src[i] + kSvdquantUnsignedShift;
      else
        for (int64_t i = 0; i < n; ++i) sh[i] = round_to(src[i] + kSvdquantUnsignedShift, x_dtype);
      xs = sh;
    }
    if (do_q) {
      int8_t* codes = a.codes.data() + m0 * K;
      float* sc = a.ascale.data() + m0 * G;
      int32_t* corr = a.acorr.data() + m0 * G;
      if (pl.reference) {
        quantize_ref(xs, K, inv_s, act_unsigned, codes, sc, 0, m1 - m0);
        for (int64_t i = 0; i < (m1 - m0) * K; i += kGroup) {
          int32_t s = 0;
          for (int64_t j = 0; j < kGroup; ++j) s += codes[i + j];
          corr[i / kGroup] = -8 * s;
        }
      } else if (q_half) {
        pl.quantize_half(x.half + m0 * K, x.dt == DType::F16, K, K, inv_s, act_unsigned, codes, sc, corr, 0, m1 - m0);
      } else {
        pl.quantize(xs, K, K, inv_s, act_unsigned, codes, sc, corr, 0, m1 - m0);
      }
      for (int64_t i = 0; i < (m1 - m0) * G; ++i) sc[i] = round_to(sc[i], x_dtype);
    }
    if (do_l) {
      float* lo = a.lora.data() + m0 * R;
      const float* lx = l_half ? nullptr : l_same ? xr : lora_x.rows(m0, m1, K, kernels::Slot::KitchenLoraX);
      const int64_t rows = m1 - m0;
      if (l_half) {  // bf16 x's own pairs
        pl.lora_bf16_xbf16(lora_x.half + m0 * K, K, K, lr.dpk, ldd, R, lo, R, rows);
      } else if (lr.bf16 && pl.lora_bf16 && lr.dpk) {  // vdpbf16ps, x̂ formed in the kernel
        pl.lora_bf16(lx, K, K, lr.dpk, ldd, R, lo, R, rows);
      } else {
        if (lr.bf16) {  // x̂, then the fp32 fma chain in pair order
          float* xr = kernels::thread_scratch<float>(kernels::Slot::Stage, rows * K);
          round_bf16_ref(lx, rows * K, xr);
          lx = xr;
        }
        if (pl.reference)
          lora_ref(lx, K, down_nat.empty() ? down : down_nat.data(), R, lo, 0, rows, lr.bf16);
        else
          pl.lora(lx, K, K, down, ldd, R, lo, R, 0, rows, lr.bf16);
      }
      for (int64_t i = 0; i < (m1 - m0) * R; ++i) lo[i] = round_to(lo[i], lora_dt);
      if (a.lora2_ready) pack_lora_pairs(a.lora.data(), R, a.lora2.data(), m0, m1);
    }
  });
}

// Packed weights for the fast GEMM (from a prepared layer, or built per call by scaled_mm).
struct PackedView {
  int64_t N = 0, K = 0, R = 0;
  const uint8_t* wpk = nullptr;
  const float* wsc = nullptr;
  const float* up = nullptr;
  bool up_bf16 = false;          // proj_up stored bf16
  const uint16_t* up2 = nullptr;  // its pairs (pack_up_pairs), for a plan with gemm_bf16up
};
PackedView view_of(const SvdquantW4A4Prepared& w) {
  return {w.N, w.K, w.R, w.wpk.data<uint8_t>(), w.wsc.data<float>(), w.up.data<float>(), w.up_bf16,
          w.up_pk.defined() ? w.up_pk.data<uint16_t>() : nullptr};
}
// [T][R][32] fp32 holding bf16 values → [T][R2][32][2] bf16 pairs (R2 = ⌈R/2⌉, the pad index R is 0).
std::vector<uint16_t> pack_up_pairs(const float* up, int64_t T, int64_t R) {
  const int64_t R2 = (R + 1) / 2;
  std::vector<uint16_t> out(size_t(T * R2 * 2 * kTileN), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t q = 0; q < R2; ++q)
      for (int64_t j = 0; j < kTileN; ++j)
        for (int64_t e = 0; e < 2; ++e)
          if (2 * q + e < R)
            out[size_t(((t * R2 + q) * kTileN + j) * 2 + e)] = f32_to_bf16(up[(t * R + 2 * q + e) * kTileN + j]);
  return out;
}
void set_up_pairs(SvdquantW4A4Prepared& w, DType up_dtype) {
  w.up_bf16 = up_dtype == DType::BF16;
  if (!w.up_bf16 || w.R == 0) return;
  const std::vector<uint16_t> pk = pack_up_pairs(w.up.data<float>(), w.T, w.R);
  w.up_pk = Tensor::from_bytes(DType::U16, {int64_t(pk.size())}, pk.data(), pk.size() * sizeof(uint16_t));
}

// y (M, N) in out_dt = acc + bias. Fast path: packed weights; scalar path: natural weights.
void run_gemm(const Plan& pl, const Acts& a, const PackedView* pk, const SvdquantW4A4Params* nat, const float* bias,
              void* y, DType out_dt) {
  const int64_t M = a.M, K = a.K, R = a.R;
  const int64_t N = pk ? pk->N : nat->N;
  if (M == 0) return;
  const bool up_pairs = R > 0 && a.lora_bf16 && (pk ? pk->up_bf16 : nat->proj_up.dtype() == DType::BF16);
  if (pl.reference) {
    const Tensor qw = natural_weight(*nat);
    const Tensor ws = natural_wscales_f32(*nat);
    const Tensor up = natural_up_f32(*nat);
    const int64_t cols = 256, tasks = (N + cols - 1) / cols;
    std::unique_ptr<float[]> acc(new float[size_t(M * N)]);  // (M, N), each task its columns
    kernels::test_fill(acc.get(), M * N);
    parallel_for(tasks, [&](int64_t t) {
      const int64_t n0 = t * cols, n1 = std::min(N, n0 + cols);
      gemm_ref(M, N, K, R, a.codes.data(), a.ascale.data(), qw.data<uint8_t>(), ws.data<float>(), a.lora.data(),
               up.data<float>(), acc.get(), n0, n1, up_pairs);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          const float v = acc[size_t(m * N + n)];
          store_as(y, m * N + n, bias ? v + bias[n] : v, out_dt);
        }
    });
    return;
  }
  GemmArgs g;
  g.N = N, g.K = K, g.R = R;
  g.a8 = a.codes.data();
  g.acorr = a.acorr.data();
  g.ascale = a.ascale.data();
  g.wpk = pk->wpk;
  g.wsc = pk->wsc;
  g.lora = R > 0 ? a.lora.data() : nullptr;
  g.up = pk->up;
  g.up_pairs = up_pairs;
  GemmKernel kernel = pl.gemm;
  if (up_pairs && pl.gemm_bf16up && pk->up2) {  // vdpbf16ps up-projection on lora pairs (pad 0)
    const uint32_t* l2 = a.lora2_ready ? a.lora2.data() : nullptr;  // packed by fill_acts' tasks
    if (!l2) {  // scaled_mm: lora_act came from the caller
      uint32_t* s = kernels::thread_scratch<uint32_t>(kernels::Slot::Weights, M * ((R + 1) / 2));
      pack_lora_pairs(a.lora.data(), R, s, 0, M);
      l2 = s;
    }
    g.lora2 = l2, g.up2 = pk->up2;
    kernel = pl.gemm_bf16up;
  }
  const int64_t T = (N + kTileN - 1) / kTileN;
  const int64_t mb = (M + kRowsPerTask - 1) / kRowsPerTask, nb = (T + kTilesPerTask - 1) / kTilesPerTask;
  if (!kernel) not_built(pl, "GEMM");
  const StoreHalfKernel store_half = kitchen_io(pl.isa).store_half;
  parallel_for(mb * nb, [&](int64_t task) {
    const int64_t bm = task / nb, bn = task % nb;  // column blocks inner: neighbours share the activation block
    const int64_t m0 = bm * kRowsPerTask, m1 = std::min(M, m0 + kRowsPerTask);
    const int64_t t0 = bn * kTilesPerTask, t1 = std::min(T, t0 + kTilesPerTask);
    const int64_t n0 = t0 * kTileN, n1 = std::min(N, t1 * kTileN);
    GemmArgs ga = g;
    if (out_dt == DType::F32) {  // straight into y
      ga.y = static_cast<float*>(y);
      ga.ldy = N, ga.y_row0 = 0, ga.y_col0 = 0;
      if (kernels::test_fill_active())  // tests poison the block the kernel must write
        for (int64_t m = m0; m < m1; ++m) kernels::test_fill(ga.y + m * N + n0, n1 - n0);
    } else {  // an fp32 block, then rounded to the output dtype
      ga.y = kernels::thread_scratch<float>(kernels::Slot::Acc, (m1 - m0) * (n1 - n0));
      ga.ldy = n1 - n0, ga.y_row0 = m0, ga.y_col0 = n0;
    }
    kernel(ga, m0, m1, t0, t1);
    for (int64_t m = m0; m < m1; ++m) {
      float* src = ga.y + (m - ga.y_row0) * ga.ldy - ga.y_col0;
      if (out_dt == DType::F32) {
        if (bias)
          for (int64_t n = n0; n < n1; ++n) src[n] = src[n] + bias[n];
      } else {
        store_half(src + n0, bias ? bias + n0 : nullptr, n1 - n0, out_dt == DType::BF16,
                   static_cast<uint16_t*>(y) + m * N + n0);  // store_as, vectorised (kitchen_io)
      }
    }
  });
}

std::vector<float> inv_smooth(const Tensor& smooth) {
  const Tensor s = smooth.to_f32();
  std::vector<float> inv(size_t(s.numel()));
  inv_smooth_ref(s.data<float>(), s.numel(), inv.data());
  return inv;
}
// down (K, R) → fp32 (K, Rd) zero padded to a multiple of 16 columns
std::vector<float> pad_down(const Tensor& down, int64_t K, int64_t R, int64_t* Rd) {
  *Rd = std::max<int64_t>(16, (R + 15) / 16 * 16);
  const Tensor d = down.to_f32();
  std::vector<float> out(size_t(K * *Rd), 0.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) out[size_t(k * *Rd + r)] = d.data<float>()[k * R + r];
  return out;
}
// (K, Rd) fp32 holding bf16 values → the pair-packed bf16 down: out[(q·Rd + r)·2 + e] = down[2q + e, r].
std::vector<uint16_t> pack_down_pairs(const float* down, int64_t K, int64_t Rd) {
  std::vector<uint16_t> out(size_t(K * Rd));
  for (int64_t q = 0; q < K / 2; ++q)
    for (int64_t r = 0; r < Rd; ++r)
      for (int64_t e = 0; e < 2; ++e) out[size_t((q * Rd + r) * 2 + e)] = f32_to_bf16(down[(2 * q + e) * Rd + r]);
  return out;
}

// ---- the kitchen ops' tensor I/O (quantize_svdquant_w4a4, scaled_mm_impl)
// n fp32 values v[i·vstride] → ((T*)dst)[off + i] in dt (F32, BF16 or F16), as store_as rounds them (a
// value already rounded to dt is stored exactly; a NaN stays the same quiet NaN).
void store_f32_as(void* dst, int64_t off, const float* v, int64_t vstride, int64_t n, DType dt) {
  if (dt == DType::F32) {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = v[i * vstride];
  } else if (dt == DType::BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(v[i * vstride]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(v[i * vstride]);
  }
}
// n values of a float tensor from element `off` on, stride `stride`, as fp32 (exact).
void load_as_f32(const Tensor& t, int64_t off, int64_t stride, int64_t n, float* out) {
  if (t.dtype() == DType::F32) {
    const float* s = t.data<float>() + off;
    for (int64_t i = 0; i < n; ++i) out[i] = s[i * stride];
  } else {
    const uint16_t* s = t.data<uint16_t>() + off;
    if (t.dtype() == DType::BF16)
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(s[i * stride]);
    else
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(s[i * stride]);
  }
}
// quantize's per-call side inputs: inv_s (K) and proj_down as fp32 (K, ldd) — ldd = R for the reference,
// R rounded up to 16 (zero columns) for the fast low-rank kernels, as prepare_svdquant_w4a4 pads it. An F32
// proj_down that needs no padding is used in place; otherwise this calling thread's grow-only buffers
// (no allocation per call for a shape seen before).
struct KitchenSide {
  const float* inv_s = nullptr;
  const float* down = nullptr;
  int64_t ldd = 0;
};
KitchenSide kitchen_side(const Tensor& smooth, const Tensor& proj_down, int64_t K, int64_t R, bool reference) {
  thread_local std::vector<float> inv, sm, down;
  grow(inv, K);
  grow(sm, K);
  load_as_f32(smooth, 0, 1, K, sm.data());
  inv_smooth_ref(sm.data(), K, inv.data());
  KitchenSide k;
  k.inv_s = inv.data();
  if (R == 0) return k;
  k.ldd = reference ? R : std::max<int64_t>(16, (R + 15) / 16 * 16);
  if (proj_down.dtype() == DType::F32 && k.ldd == R) {
    k.down = proj_down.data<float>();
    return k;
  }
  grow(down, K * k.ldd);
  for (int64_t i = 0; i < K; ++i) {
    float* row = down.data() + i * k.ldd;
    load_as_f32(proj_down, i * R, 1, R, row);
    std::fill(row + R, row + k.ldd, 0.0f);
  }
  k.down = down.data();
  return k;
}

constexpr const char* kQuantOp = "quantize_svdquant_w4a4";
constexpr const char* kMmOp = "scaled_mm_svdquant_w4a4";
constexpr const char* kLinOp = "svdquant_linear";

}  // namespace

// ============================================================================ quantize
SvdquantActs quantize_svdquant_w4a4(const Tensor& x, const Tensor& smooth, const Tensor& proj_down, int64_t pad_size,
                                    bool act_unsigned, const Tensor& lora_x, std::optional<DType> lora_act_dtype) {
  if (!x.defined()) throw Error(fmt::format("{}: x is undefined", kQuantOp));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: x", kQuantOp));
  if (x.dim() != 2) throw Error(fmt::format("{}: x: expected 2-D (M, K), got {}", kQuantOp, shape_str(x.shape())));
  const int64_t M = x.size(0), K = x.size(1);
  if (K <= 0 || K % kGroup != 0)
    throw Error(fmt::format("{}: K = {} (x.shape[1]) must be a positive multiple of 64", kQuantOp, K));
  if (pad_size <= 0) throw Error(fmt::format("{}: pad_size must be positive, got {}", kQuantOp, pad_size));
  if (!smooth.defined() || !proj_down.defined())
    throw Error(fmt::format("{}: smooth and proj_down are required", kQuantOp));
  check_dtype(smooth, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: smooth", kQuantOp));
  check_shape(smooth, {K}, fmt::format("{}: smooth (K)", kQuantOp));
  check_dtype(proj_down, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: proj_down", kQuantOp));
  if (proj_down.dim() != 2 || proj_down.size(0) != K)
    throw Error(fmt::format("{}: proj_down: expected (K, R) = ({}, R), got {}", kQuantOp, K, shape_str(proj_down.shape())));
  const int64_t R = proj_down.size(1);
  if (lora_x.defined()) {
    check_dtype(lora_x, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: lora_x", kQuantOp));
    check_shape(lora_x, {M, K}, fmt::format("{}: lora_x (same shape as x)", kQuantOp));
  }
  const DType xdt = x.dtype(), ldt = lora_act_dtype.value_or(xdt);
  check_out_dtype(ldt, kQuantOp);
  if (M > (int64_t(1) << 40) / std::max<int64_t>(1, pad_size))
    throw Error(fmt::format("{}: M = {} too large", kQuantOp, M));
  const int64_t M_pad = (M + pad_size - 1) / pad_size * pad_size, G = K / kGroup;

  SvdquantActs out;
  out.q_x = Tensor::empty(DType::I8, {M_pad, K / 2});
  out.ascales = Tensor::empty(xdt, {G, M_pad});
  out.lora_act = Tensor::empty(ldt, {M_pad, R});
  uint8_t* q = out.q_x.mutable_data<uint8_t>();
  auto* as = static_cast<uint8_t*>(out.ascales.mutable_raw());
  auto* la = static_cast<uint8_t*>(out.lora_act.mutable_raw());
  if (kernels::test_fill_active())  // tests: every byte the op must write starts as 0xFF (NaN as a float)
    for (Tensor* t : {&out.q_x, &out.ascales, &out.lora_act}) std::memset(t->mutable_raw(), 0xFF, t->nbytes());
  // the M padding (spec §3.3 step 5): zero codes, scales and lora_act
  const size_t xds = dtype_size(xdt), lds = dtype_size(ldt);
  std::memset(q + M * (K / 2), 0, size_t((M_pad - M) * (K / 2)));
  for (int64_t g = 0; g < G; ++g) std::memset(as + (g * M_pad + M) * int64_t(xds), 0, size_t(M_pad - M) * xds);
  std::memset(la + M * R * int64_t(lds), 0, size_t((M_pad - M) * R) * lds);
  if (M == 0) return out;

  const Plan pl = plan(active_isa());
  const KitchenIo io = kitchen_io(pl.isa);
  const KitchenSide side = kitchen_side(smooth, proj_down, K, R, pl.reference);
  LowRank lr{side.down, side.ldd, R, ldt, lowrank_bf16(lora_x.defined() ? lora_x.dtype() : xdt, proj_down.dtype())};
  std::vector<uint16_t> dpk;  // down pair-packed for the vdpbf16ps low-rank kernel
  if (lr.bf16 && pl.lora_bf16 && R > 0 && !pl.reference) {
    dpk = pack_down_pairs(side.down, K, side.ldd);
    lr.dpk = dpk.data();
  }
  // Per task of kQuantRows rows: the fused layer's own activation stage (fill_acts, run inline on these
  // rows: bf16/f16 read as such or widened per task, the same operations as on x.to_f32()), then the
  // kitchen tensors written straight from the task's buffers.
  const RowSource xsrc = RowSource::of(x, io), lsrc = lora_x.defined() ? RowSource::of(lora_x, io) : xsrc;
  parallel_for((M + kQuantRows - 1) / kQuantRows, [&](int64_t task) {
    const int64_t m0 = task * kQuantRows, m1 = std::min(M, m0 + kQuantRows), n = m1 - m0;
    thread_local Acts ta;  // this thread's task-sized activations (grow-only)
    fill_acts(ta, pl, xsrc.from_row(m0, K), n, K, xdt, false, side.inv_s, act_unsigned, lsrc.from_row(m0, K), lr);
    io.pack(ta.codes.data(), n * K, q + m0 * (K / 2));
    // ascales (G, M_pad), column m; the values are already rounded to x's dtype (storing is exact)
    for (int64_t g = 0; g < G; ++g) store_f32_as(as, g * M_pad + m0, ta.ascale.data() + g, G, n, xdt);
    if (R > 0) store_f32_as(la, m0 * R, ta.lora.data(), 1, n * R, ldt);
  });
  return out;
}

// ============================================================================ scaled_mm
namespace {
// `packed`: the weight side prepared earlier from these wgt/wscales/proj_up (prepare_svdquant_w4a4_gemm), or
// null to pack per call. Rows [rows, M) are not computed: their output is 0 + bias (the caller has proven
// they contribute nothing else: zero ascales and zero lora_act).
Tensor scaled_mm_impl(const Tensor& act, const Tensor& wgt, const Tensor& ascales, const Tensor& wscales,
                      const Tensor& lora_act, const Tensor& proj_up, const Tensor& bias, bool act_unsigned,
                      std::optional<DType> out_dtype, const SvdquantW4A4Prepared* packed, int64_t rows) {
  for (const auto* t : {&act, &wgt, &ascales, &wscales, &lora_act, &proj_up})
    if (!t->defined()) throw Error(fmt::format("{}: act, wgt, ascales, wscales, lora_act and proj_up are required", kMmOp));
  check_dtype(act, {DType::I8}, fmt::format("{}: act", kMmOp));
  if (act.dim() != 2) throw Error(fmt::format("{}: act: expected 2-D (M, K/2), got {}", kMmOp, shape_str(act.shape())));
  const int64_t M = act.size(0), K = checked_mul(2, act.size(1), fmt::format("{}: act: K = 2·shape[1]", kMmOp));
  if (K <= 0 || K % kGroup != 0)
    throw Error(fmt::format("{}: K = {} (2·act.shape[1]) must be a positive multiple of 64", kMmOp, K));
  check_dtype(wgt, {DType::I8}, fmt::format("{}: wgt", kMmOp));
  int64_t N = 0;
  if (wgt.dim() == 2) N = wgt.size(0);
  else if (wgt.dim() == 4) N = checked_mul(wgt.size(0), 128, fmt::format("{}: wgt: N = 128·shape[0]", kMmOp));
  else throw Error(fmt::format("{}: wgt: expected (N, K/2) or (N/128, K/64, 32, 128), got {}", kMmOp, shape_str(wgt.shape())));
  if (lora_act.dim() != 2 || lora_act.size(0) != M)
    throw Error(fmt::format("{}: lora_act: expected (M, R) with M = {}, got {}", kMmOp, M, shape_str(lora_act.shape())));
  check_dtype(lora_act, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: lora_act", kMmOp));
  check_dtype(ascales, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: ascales", kMmOp));
  check_shape(ascales, {K / kGroup, M}, fmt::format("{}: ascales (K/64, M)", kMmOp));
  SvdquantW4A4Params p;
  p.qweight = wgt;
  p.wscales = wscales;
  p.proj_up = proj_up;
  p.bias = bias;
  p.N = N, p.K = K, p.R = lora_act.size(1);
  p.act_unsigned = act_unsigned;
  p.tile_packed = wgt.dim() == 4;
  p.proj_up_tile = proj_up.dim() == 3;
  // smooth / proj_down do not enter the GEMM; stand-ins let the shared validation check the rest
  // (kept per thread: a (K, R) allocation per call is measurable next to a small-M GEMM).
  thread_local Tensor smooth_standin, down_standin;
  if (!smooth_standin.defined() || smooth_standin.size(0) != K) smooth_standin = Tensor::zeros(DType::F32, {K});
  if (!down_standin.defined() || down_standin.shape() != Shape{K, p.R}) down_standin = Tensor::zeros(DType::F32, {K, p.R});
  p.smooth = smooth_standin;
  p.proj_down = down_standin;
  validate(p, kMmOp);
  const DType out_dt = out_dtype.value_or(proj_up.dtype());
  check_out_dtype(out_dt, kMmOp);

  Tensor y = Tensor::empty(out_dt, {M, N});
  if (M == 0) return y;
  const int64_t G = K / kGroup, R = p.R;
  if (packed && (packed->N != N || packed->K != K || packed->R != R))
    throw Error(fmt::format("{}: prepared weights are ({}, {}, R={}), the call's are ({}, {}, R={})", kMmOp,
                            packed->N, packed->K, packed->R, N, K, R));
  Tensor b32;
  if (bias.defined()) b32 = bias.to_f32();
  const float* bp = bias.defined() ? b32.data<float>() : nullptr;
  const int64_t Mc = rows < 0 ? M : std::min(rows, M);  // rows computed by the GEMM
  if (Mc < M) {  // one row of 0 + bias in the output dtype, copied to the other skipped rows
    for (int64_t n = 0; n < N; ++n) store_as(y.mutable_raw(), Mc * N + n, bp ? 0.0f + bp[n] : 0.0f, out_dt);
    auto* base = static_cast<uint8_t*>(y.mutable_raw());
    const size_t row_bytes = size_t(N) * dtype_size(out_dt);
    for (int64_t m = Mc + 1; m < M; ++m) std::memcpy(base + m * row_bytes, base + Mc * row_bytes, row_bytes);
  }
  if (Mc == 0) return y;
  const Plan pl = plan(active_isa());
  const KitchenIo io = kitchen_io(pl.isa);
  // The GEMM's activation side, per task of kQuantRows rows: codes and acorr unpacked from the nibbles,
  // ascales (G, M) gathered to [m][g] and lora_act widened to fp32 (all exact). Into this calling
  // thread's grow-only buffers, like the fused layer's: no allocation, zero fill or page faults per call
  // for a shape seen before.
  thread_local Acts workspace;
  Acts& a = workspace;
  a.M = Mc, a.K = K, a.G = G, a.R = R;
  grow(a.codes, Mc * K);
  grow(a.ascale, Mc * G);
  grow(a.acorr, Mc * G);
  grow(a.lora, Mc * R);
  const uint8_t* q = act.data<uint8_t>();
  parallel_for((Mc + kQuantRows - 1) / kQuantRows, [&](int64_t task) {
    const int64_t m0 = task * kQuantRows, m1 = std::min(Mc, m0 + kQuantRows);
    io.unpack(q + m0 * (K / 2), K, m1 - m0, act_unsigned, a.codes.data() + m0 * K, a.acorr.data() + m0 * G);
    for (int64_t m = m0; m < m1; ++m) load_as_f32(ascales, m, M, G, a.ascale.data() + m * G);
    if (R > 0) {
      float* lo = a.lora.data() + m0 * R;
      if (lora_act.dtype() == DType::F32) std::memcpy(lo, lora_act.data<float>() + m0 * R, size_t((m1 - m0) * R) * 4);
      else (lora_act.dtype() == DType::BF16 ? io.bf16_to_f32 : io.f16_to_f32)(lora_act.data<uint16_t>() + m0 * R, (m1 - m0) * R, lo);
    }
  });
  a.lora_bf16 = lora_act.dtype() == DType::BF16;  // the up-projection's arithmetic (fill_acts sets it for the layer)
  a.lora2_ready = false;

  if (pl.reference) {
    run_gemm(pl, a, nullptr, &p, bp, y.mutable_raw(), out_dt);
    return y;
  }
  if (packed) {
    const PackedView pk = view_of(*packed);
    run_gemm(pl, a, &pk, nullptr, bp, y.mutable_raw(), out_dt);
    return y;
  }
  const Tensor qn = natural_weight(p);
  const Tensor wsn = natural_wscales_f32(p), upn = natural_up_f32(p);
  const Tensor wpk = pack_weight(qn.data<uint8_t>(), N, K);
  const Tensor wsc = pack_cols(wsn.data<float>(), G, N);
  const std::vector<float> upT = transpose(upn.data<float>(), N, R);
  const Tensor upp = pack_cols(upT.data(), R, N);
  PackedView pk{N, K, R, wpk.data<uint8_t>(), wsc.data<float>(), upp.data<float>(), proj_up.dtype() == DType::BF16};
  std::vector<uint16_t> up2;
  if (pk.up_bf16 && pl.gemm_bf16up && R > 0) {
    up2 = pack_up_pairs(upp.data<float>(), (N + kTileN - 1) / kTileN, R);
    pk.up2 = up2.data();
  }
  run_gemm(pl, a, &pk, nullptr, bp, y.mutable_raw(), out_dt);
  return y;
}
}  // namespace

Tensor scaled_mm_svdquant_w4a4(const Tensor& act, const Tensor& wgt, const Tensor& ascales, const Tensor& wscales,
                               const Tensor& lora_act, const Tensor& proj_up, const Tensor& bias, bool act_unsigned,
                               std::optional<DType> out_dtype) {
  return scaled_mm_impl(act, wgt, ascales, wscales, lora_act, proj_up, bias, act_unsigned, out_dtype, nullptr, -1);
}

Tensor scaled_mm_svdquant_w4a4_prepared(const Tensor& act, const Tensor& wgt, const Tensor& ascales,
                                        const Tensor& wscales, const Tensor& lora_act, const Tensor& proj_up,
                                        const Tensor& bias, bool act_unsigned, std::optional<DType> out_dtype,
                                        const SvdquantW4A4Prepared& gemm, int64_t rows) {
  return scaled_mm_impl(act, wgt, ascales, wscales, lora_act, proj_up, bias, act_unsigned, out_dtype, &gemm, rows);
}

std::shared_ptr<const SvdquantW4A4Prepared> prepare_svdquant_w4a4_gemm(const Tensor& wgt, const Tensor& wscales,
                                                                       const Tensor& proj_up) {
  constexpr const char* what = "prepare_svdquant_w4a4_gemm";
  for (const auto* t : {&wgt, &wscales, &proj_up})
    if (!t->defined()) throw Error(fmt::format("{}: wgt, wscales and proj_up are required", what));
  SvdquantW4A4Params p;
  p.qweight = wgt;
  p.wscales = wscales;
  p.proj_up = proj_up;
  if (wgt.dim() == 2) p.N = wgt.size(0), p.K = checked_mul(2, wgt.size(1), fmt::format("{}: wgt: K = 2·shape[1]", what));
  else if (wgt.dim() == 4)
    p.N = checked_mul(wgt.size(0), 128, fmt::format("{}: wgt: N = 128·shape[0]", what)),
    p.K = checked_mul(wgt.size(1), kGroup, fmt::format("{}: wgt: K = 64·shape[1]", what));
  else throw Error(fmt::format("{}: wgt: expected (N, K/2) or (N/128, K/64, 32, 128), got {}", what, shape_str(wgt.shape())));
  p.R = proj_up.dim() == 2 ? proj_up.size(1) : proj_up.dim() == 3 ? proj_up.size(1) : -1;
  if (p.R < 0) throw Error(fmt::format("{}: proj_up: expected (N, R) or (N/128, R, 128), got {}", what, shape_str(proj_up.shape())));
  p.tile_packed = wgt.dim() == 4;
  p.proj_up_tile = proj_up.dim() == 3;
  p.smooth = Tensor::zeros(DType::F32, {p.K});  // not part of the GEMM side
  p.proj_down = Tensor::zeros(DType::F32, {p.K, p.R});
  validate(p, what);
  // Owned buffers only: the result references nothing of the inputs.
  auto w = std::make_shared<SvdquantW4A4Prepared>();
  w->N = p.N, w->K = p.K, w->R = p.R, w->G = p.K / kGroup, w->T = (p.N + kTileN - 1) / kTileN;
  const Tensor qn = natural_weight(p);
  w->wpk = pack_weight(qn.data<uint8_t>(), p.N, p.K);
  const Tensor wsn = natural_wscales_f32(p);
  w->wsc = pack_cols(wsn.data<float>(), w->G, p.N);
  const Tensor upn = natural_up_f32(p);
  const std::vector<float> upT = transpose(upn.data<float>(), p.N, p.R);
  w->up = pack_cols(upT.data(), p.R, p.N);
  set_up_pairs(*w, proj_up.dtype());
  return w;
}

int64_t prepared_nbytes(const SvdquantW4A4Prepared& w) {
  int64_t n = 0;
  for (const Tensor* t : {&w.wpk, &w.wsc, &w.up, &w.up_pk, &w.down, &w.down_pk, &w.inv_s, &w.bias})
    if (t->defined()) n += t->nbytes();
  return n;
}

// ============================================================================ prepared layer
std::shared_ptr<const SvdquantW4A4Prepared> prepare_svdquant_w4a4(const SvdquantW4A4Params& p) {
  validate(p, "prepare_svdquant_w4a4");
  auto w = std::make_shared<SvdquantW4A4Prepared>();
  w->params = p;
  w->N = p.N, w->K = p.K, w->R = p.R, w->G = p.K / kGroup, w->T = (p.N + kTileN - 1) / kTileN;
  const Tensor qn = natural_weight(p);
  w->wpk = pack_weight(qn.data<uint8_t>(), p.N, p.K);
  const Tensor wsn = natural_wscales_f32(p);
  w->wsc = pack_cols(wsn.data<float>(), w->G, p.N);
  const Tensor upn = natural_up_f32(p);
  const std::vector<float> upT = transpose(upn.data<float>(), p.N, p.R);
  w->up = pack_cols(upT.data(), p.R, p.N);
  set_up_pairs(*w, p.proj_up.dtype());
  int64_t Rd = 0;
  const std::vector<float> down = pad_down(p.proj_down, p.K, p.R, &Rd);
  w->Rd = Rd;
  w->down = Tensor::from_bytes(DType::F32, {p.K, Rd}, down.data(), down.size() * sizeof(float));
  if (p.proj_down.dtype() == DType::BF16) {
    const std::vector<uint16_t> pk = pack_down_pairs(down.data(), p.K, Rd);
    w->down_pk = Tensor::from_bytes(DType::U16, {p.K / 2, Rd, 2}, pk.data(), pk.size() * sizeof(uint16_t));
  }
  const std::vector<float> inv = inv_smooth(p.smooth);
  w->inv_s = Tensor::from_bytes(DType::F32, {p.K}, inv.data(), inv.size() * sizeof(float));
  if (p.bias.defined()) w->bias = p.bias.to_f32().clone();
  return w;
}

namespace {
// The low-rank stage of a prepared layer for an input of dtype xdt (lora rounded to xdt, spec §3.4).
// fp32 x on the bf16 low-rank branch with a bf16 proj_up: lora rounded to bf16, as the kitchen's bf16
// layer rounds it, so the up-projection runs in bf16 too.
LowRank lowrank_of(const SvdquantW4A4Prepared& w, DType xdt) {
  const bool bf16 = lowrank_bf16(xdt, w.params.proj_down.dtype());
  const DType dt = xdt == DType::F32 && bf16 && w.up_bf16 ? DType::BF16 : xdt;
  LowRank lr{w.down.data<float>(), w.Rd, w.R, dt, bf16};
  if (lr.bf16 && w.down_pk.defined()) lr.dpk = w.down_pk.data<uint16_t>();
  return lr;
}
}  // namespace

Tensor svdquant_linear(const Tensor& x, const SvdquantW4A4Prepared& w, std::optional<DType> out_dtype,
                       const Tensor& out) {
  if (!x.defined()) throw Error(fmt::format("{}: x is undefined", kLinOp));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: x", kLinOp));
  if (x.dim() < 1 || x.size(-1) != w.K)
    throw Error(fmt::format("{}: x: expected shape (..., K) with K = {}, got {}", kLinOp, w.K, shape_str(x.shape())));
  const DType out_dt = out_dtype.value_or(x.dtype());
  check_out_dtype(out_dt, kLinOp);
  const int64_t K = w.K, M = x.numel() / K, N = w.N;
  Shape os = x.shape();
  os.back() = N;
  Tensor y = kernels::output_tensor(out, out_dt, os, kLinOp);
  if (M == 0) return y;
  const Plan pl = plan(active_isa());
  const RowSource xs = RowSource::of(x, kitchen_io(pl.isa));  // bf16/f16 rows widened per task
  // The layer forward (spec §3.4): main path shifted for act_unsigned, low-rank on the raw input,
  // lora_act and ascales rounded to x's dtype (the kitchen's CUDA defaults).
  thread_local Acts workspace;
  Acts& a = workspace;
  fill_acts(a, pl, xs, M, K, x.dtype(), w.params.act_unsigned, w.inv_s.data<float>(), w.params.act_unsigned, xs,
            lowrank_of(w, x.dtype()));
  const float* bp = w.bias.defined() ? w.bias.data<float>() : nullptr;
  if (pl.reference) {
    run_gemm(pl, a, nullptr, &w.params, bp, y.mutable_raw(), out_dt);
  } else {
    const PackedView pk = view_of(w);
    run_gemm(pl, a, &pk, nullptr, bp, y.mutable_raw(), out_dt);
  }
  return y;
}

namespace kernels::w4a4 {
Plan plan(Isa isa) {
  Plan pl;
  pl.isa = isa;
  switch (isa) {
    case Isa::Scalar: return pl;
    case Isa::Avx2:
      pl.name = "avx2";
      pl.quantize = NIBBLE_K2(quantize_avx2), pl.lora = NIBBLE_K2(lora_avx2), pl.gemm = NIBBLE_K2(gemm_avx2);
      break;
    case Isa::Avx512:
      pl.name = "avx512-quantize+avx2-gemm";
      pl.quantize = NIBBLE_K512(quantize_avx512), pl.lora = NIBBLE_K512(lora_avx512), pl.gemm = NIBBLE_K2(gemm_avx2);
      pl.quantize_half = NIBBLE_K512(quantize_half_avx512);
      break;
    case Isa::Avx512Vnni: case Isa::Avx512Bf16:
      pl.name = "avx512-quantize+vnni-gemm";
      pl.quantize = NIBBLE_K512(quantize_avx512), pl.lora = NIBBLE_K512(lora_avx512);
      pl.quantize_half = NIBBLE_K512(quantize_half_avx512);
      pl.gemm = NIBBLE_K512(gemm_avx512vnni);
      if (isa == Isa::Avx512Bf16) {
        pl.name = "avx512-quantize+bf16-lowrank+vnni-gemm";
        pl.lora_bf16 = NIBBLE_K512(lora_bf16_avx512bf16);
        pl.lora_bf16_xbf16 = NIBBLE_K512(lora_bf16_xbf16_avx512bf16);
        pl.gemm_bf16up = NIBBLE_K512(gemm_avx512bf16);
      }
      break;
  }
  pl.reference = false;
  return pl;
}

// The fused layer stage by stage (profiling; same result as svdquant_linear).
Tensor svdquant_linear_staged(const Tensor& x, const SvdquantW4A4Prepared& w,
                              const std::function<void(int)>& boundary) {
  const int64_t K = w.K, M = x.numel() / K, N = w.N;
  Tensor y = Tensor::empty(DType::F32, {M, N});
  const Plan pl = plan(active_isa());
  const RowSource xs = RowSource::of(x, kitchen_io(pl.isa));  // as the fused layer: widened per task, per stage
  boundary(0);
  thread_local Acts workspace;
  Acts& a = workspace;
  fill_acts(a, pl, xs, M, K, x.dtype(), w.params.act_unsigned, w.inv_s.data<float>(), w.params.act_unsigned, xs,
            lowrank_of(w, x.dtype()), 1);
  boundary(1);
  fill_acts(a, pl, xs, M, K, x.dtype(), false, w.inv_s.data<float>(), w.params.act_unsigned, xs,
            lowrank_of(w, x.dtype()), 2);
  boundary(2);
  const float* bp = w.bias.defined() ? w.bias.data<float>() : nullptr;
  if (pl.reference) {
    run_gemm(pl, a, nullptr, &w.params, bp, y.mutable_raw(), DType::F32);
  } else {
    const PackedView pk = view_of(w);
    run_gemm(pl, a, &pk, nullptr, bp, y.mutable_raw(), DType::F32);
  }
  boundary(3);
  return y;
}
}  // namespace kernels::w4a4

Tensor svdquant_linear(const Tensor& x, const SvdquantW4A4Params& p, std::optional<DType> out_dtype) {
  return svdquant_linear(x, *prepare_svdquant_w4a4(p), out_dtype);
}

}  // namespace nibble
