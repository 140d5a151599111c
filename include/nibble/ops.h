// nibble/ops.h — the kitchen ops (spec §6) and their prepared (load-time repacked) forms.
//
// Semantics follow the spec's CUDA path (fp32 scale math, round-half-even, exact int32 group sums).
// Every op validates its inputs and throws nibble::Error with the spec's messages. All ops dispatch
// on active_isa(); Isa::Scalar runs the reference oracles of src/kernels/reference/. Work is split
// over output columns on the library thread pool, so results do not depend on the thread count.
//
// Thread safety: Every op may be called from several threads at once; each call allocates its own
// outputs (and per-thread workspaces), and their parallel regions take turns on the one library
// pool. Prepared weights (AwqW4A16Prepared, SvdquantW4A4Prepared) are immutable after prepare_*()
// and may be shared by concurrent calls.
#pragma once
#include <memory>
#include <optional>

#include "nibble/formats.h"
#include "nibble/tensor.h"

namespace nibble {

// ---------------------------------------------------------------- awq_w4a16 (spec §2)
// x (..., K) F32|BF16|F16; qweight (N, K/2) I8; wscales/wzeros (K/G, N) BF16|F16; bias (N) optional.
// y (..., N) in wscales' dtype, or `out_dtype` (F32 for the runtime).
// Math: y[m,n] = Σ_g [ s[g,n]·Σ_{k∈g} x[m,k]·(q[n,k]−8) + z[g,n]·Σ_{k∈g} x[m,k] ] + bias[n],
// fp32 accumulation (the zero term folded per group).
Tensor gemv_awq_w4a16(const Tensor& x, const Tensor& qweight, const Tensor& wscales,
                      const Tensor& wzeros, const Tensor& bias = {}, int64_t group_size = 64,
                      std::optional<DType> out_dtype = std::nullopt);

// Load-time prepared AWQ weights (any repack for the active ISA lives here; the original tensors
// are kept by the caller for saving).
struct AwqW4A16Prepared;
std::shared_ptr<const AwqW4A16Prepared> prepare_awq_w4a16(const AwqW4A16Params& p);
// out: when defined — the output dtype, shape (..., N), writable — the result is written into it
// (no allocation, no copy) and out is returned.
Tensor gemv_awq_w4a16(const Tensor& x, const AwqW4A16Prepared& w,
                      std::optional<DType> out_dtype = std::nullopt, const Tensor& out = {});

// ---------------------------------------------------------------- svdquant_w4a4 (spec §3)
struct SvdquantActs {
  Tensor q_x;       // (M_pad, K/2) I8
  Tensor ascales;   // (K/64, M_pad) dtype of x
  Tensor lora_act;  // (M_pad, R), dtype of x by default (CUDA semantics)
};
// x (M, K) F32|BF16|F16, smooth (K), proj_down (K, R); K % 64 == 0.
SvdquantActs quantize_svdquant_w4a4(const Tensor& x, const Tensor& smooth, const Tensor& proj_down,
                                    int64_t pad_size = 256, bool act_unsigned = false,
                                    const Tensor& lora_x = {},
                                    std::optional<DType> lora_act_dtype = std::nullopt);
// act (M, K/2) I8; wgt natural (N, K/2) or tile (N/128, K/64, 32, 128); ascales (K/64, M);
// wscales natural (K/64, N) or tile; lora_act (M, R); proj_up natural (N, R) or tile (N/128, R, 128).
// Output (M, N) in proj_up's dtype, or `out_dtype`.
Tensor scaled_mm_svdquant_w4a4(const Tensor& act, const Tensor& wgt, const Tensor& ascales,
                               const Tensor& wscales, const Tensor& lora_act, const Tensor& proj_up,
                               const Tensor& bias = {}, bool act_unsigned = false,
                               std::optional<DType> out_dtype = std::nullopt);

struct SvdquantW4A4Prepared;
std::shared_ptr<const SvdquantW4A4Prepared> prepare_svdquant_w4a4(const SvdquantW4A4Params& p);
// The layer forward of spec §3.4: x (..., K) → y (..., N). Shift for act_unsigned on the main path,
// low-rank branch on the raw input, bias last. Output dtype: x's dtype unless `out_dtype`.
// out: as for gemv_awq_w4a16 (written in place and returned when defined).
Tensor svdquant_linear(const Tensor& x, const SvdquantW4A4Prepared& w,
                       std::optional<DType> out_dtype = std::nullopt, const Tensor& out = {});
Tensor svdquant_linear(const Tensor& x, const SvdquantW4A4Params& p,
                       std::optional<DType> out_dtype = std::nullopt);

// ---------------------------------------------------------------- weight side prepared for the kitchen ops
// The kitchen ops receive the stored weights on every call. These derive the weight side once into
// owned buffers that reference nothing of the inputs (the Python adapter caches them per weight
// tensor); each call then passes the same weights again together with the prepared form.
// AWQ: the tiled GEMV stream of prepare_awq_w4a16 (undefined when this CPU / group size has none).
Tensor prepare_awq_w4a16_stream(const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                                int64_t group_size = 64);
Tensor gemv_awq_w4a16_prepared(const Tensor& x, const Tensor& qweight, const Tensor& wscales,
                               const Tensor& wzeros, const Tensor& bias, int64_t group_size,
                               std::optional<DType> out_dtype, const Tensor& stream);
// SVDQuant: the packed GEMM side (weights, scales, proj_up) of scaled_mm_svdquant_w4a4.
std::shared_ptr<const SvdquantW4A4Prepared> prepare_svdquant_w4a4_gemm(const Tensor& wgt,
                                                                       const Tensor& wscales,
                                                                       const Tensor& proj_up);
int64_t prepared_nbytes(const SvdquantW4A4Prepared& w);  // bytes the prepared form holds
// scaled_mm_svdquant_w4a4 with `gemm` from prepare_svdquant_w4a4_gemm of the same wgt/wscales/proj_up.
// Only act rows [0, rows) are computed (rows < 0: all); the output of rows ≥ rows is 0 + bias, which
// is exact when those rows have zero ascales and zero lora_act (the kitchen's M padding, spec §3.3).
Tensor scaled_mm_svdquant_w4a4_prepared(const Tensor& act, const Tensor& wgt, const Tensor& ascales,
                                        const Tensor& wscales, const Tensor& lora_act,
                                        const Tensor& proj_up, const Tensor& bias, bool act_unsigned,
                                        std::optional<DType> out_dtype,
                                        const SvdquantW4A4Prepared& gemm, int64_t rows = -1);

// ---------------------------------------------------------------- dense helpers
// y = x·Wᵀ + b in fp32 (x (..., K) any float dtype, W (N, K) F32|BF16|F16). The float baseline and
// the eager fallback of formats without a fused kernel. Threaded, ISA dispatched.
Tensor linear_f32(const Tensor& x, const Tensor& weight, const Tensor& bias = {});
// The same with bf16 inputs and fp32 accumulation (docs/dense.md): x and W rounded to bf16 (RNE),
// exact products, fp32 sums, fp32 bias. vdpbf16ps on AVX-512 BF16, a scalar loop elsewhere.
Tensor linear_bf16(const Tensor& x, const Tensor& weight, const Tensor& bias = {});

}  // namespace nibble
