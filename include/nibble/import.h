// nibble/import.h — importers: existing int4 checkpoints → kitchen-native, without requantizing.
//
//  * autoawq  — AutoAWQ / llm-awq GEMM-packed linears (`P.qweight` int32 (K, N/8) in AWQ's
//               interleaved nibble order, `P.qzeros` int32 (K/G, N/8), `P.scales` (K/G, N),
//               `P.bias`) → awq_w4a16. W = (q − z)·s is re-expressed as (q − 8)·s + z′ with
//               z′ = (8 − z)·s: exact in fp32, one rounding when stored in the scale dtype (the
//               report counts and bounds it). G = 128 is split into two identical 64-groups by
//               default (exact; the kitchen's CUDA MMA tier reads only G = 64, spec §2.3).
//  * nunchaku — nunchaku SVDQuant INT4 checkpoints (Qwen-Image, FLUX.1 dev/schnell), both key
//               generations → svdquant_w4a4 natural layout with ComfyUI names: codes copied
//               bit-exactly out of the MMA-fragment packing (spec §9.1), padding dropped; Qwen's
//               fused qkv split into q/k/v (shared smooth_factor and proj_down); FLUX's single-block
//               parts joined into ComfyUI's linear1 (rows, exact) and linear2 (K, see
//               `flux_linear2`); the AWQ W4A16 modulation linears → awq_w4a16 with ComfyUI's [S, D]
//               chunk order and the +1 of the scale chunks taken out of the bias (spec §9.2); the
//               float rest renamed.
// Output goes through the atomic writer: a failure leaves nothing at the target. docs/import.md.
//
// Thread safety: The importers are functions of their arguments only (read inputs, write one
// output through the atomic writer); concurrent calls writing different outputs are safe, and
// their parallel regions take turns on the library pool.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "nibble/formats.h"
#include "nibble/tensor.h"

namespace nibble {

// Rounding of z′ = (8 − z)·s (AutoAWQ) resp. z′ = wzeros + 8·s (nunchaku) to the stored dtype.
struct ZeroRounding {
  int64_t total = 0, rounded = 0;   // zeros stored; of which not exactly representable
  double max_abs = 0;               // max |stored − exact|
  double max_rel_scale = 0;         // max |stored − exact| / |s| (in units of the group's scale)
  void merge(const ZeroRounding& o);
};

// ---- in-memory, one layer (the checkpoint importer calls these; tests too)
// AutoAWQ GEMM: qweight int32 (K, N/8), qzeros int32 (K/G, N/8), scales F16|BF16|F32 (K/G, N),
// bias optional (N). `out_group_size`: 0 = 64 when G is a multiple of 64, else G; otherwise a
// divisor of G (re-expressed exactly). `scale_dtype`: F16 | BF16 (F16 keeps AutoAWQ's scales exact).
AwqW4A16Params import_autoawq_gemm(const Tensor& qweight, const Tensor& qzeros, const Tensor& scales,
                                   const Tensor& bias, int64_t out_group_size = 0,
                                   DType scale_dtype = DType::F16, ZeroRounding* rounding = nullptr,
                                   const std::string& what = "autoawq");

// nunchaku SVDQuant INT4 layer as stored (spec §9.1): qweight I8 (Np, Kp/2), wscales (Gs, Np),
// smooth (Kp), proj_down (Kp, Rp), proj_up (Np, Rp), bias (Np) optional. N, K: logical sizes
// (0 = the stored ones). `splits`: output sizes along N (e.g. {D, D, D} for fused qkv; empty =
// one layer). Every member gets the shared smooth and proj_down. `rank`: 0 = keep Rp columns.
struct NunchakuW4A4Source {
  Tensor qweight, wscales, smooth, proj_down, proj_up, bias;
};
std::vector<SvdquantW4A4Params> import_nunchaku_w4a4(const NunchakuW4A4Source& src, int64_t N, int64_t K,
                                                     const std::vector<int64_t>& splits = {},
                                                     int64_t rank = 0, bool act_unsigned = false,
                                                     const std::string& what = "nunchaku");

// nunchaku AWQ W4A16 (modulation) layer (spec §9.2): qweight I32 (N/4, K/2) (TinyChat layout),
// wscales/wzeros (≥ K/64, N), bias (N) optional. `chunks` S > 1: stored rows are interleaved
// (o = S·d + c) and reordered to ComfyUI's [S][D]; `scale_chunks_minus_one`: subtract the folded +1
// from the bias of chunks 1 and S−2.
AwqW4A16Params import_nunchaku_awq(const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                                   const Tensor& bias, int chunks, bool scale_chunks_minus_one,
                                   ZeroRounding* rounding = nullptr, const std::string& what = "nunchaku");

// ---- FLUX single blocks: ComfyUI fuses what nunchaku keeps apart (natural-layout params in, out).
// Rows stacked along N (linear1 = [qkv; mlp_fc1]): the parts must share K, act_unsigned and a
// bit-identical smooth_factor (else an error); codes, scale columns and bias concatenated,
// proj_down = [down_1 | down_2 | …], proj_up block-diagonal (rank R1 + R2 + …). Exact.
SvdquantW4A4Params concat_svdquant_rows(const std::vector<SvdquantW4A4Params>& parts, const std::string& what);
// Inputs joined along K (linear2 = [out_proj | mlp_fc2], y = Σ parts(x_part)): codes copied along K,
// scale rows and smooth concatenated, proj_down block-diagonal, proj_up = [up_1 | up_2 | …]; one
// signed activation grid (act_unsigned = false). The bias is Σ biases + every act_unsigned part's
// shift term 0.171875·Σ_k q·s/smooth (svdquant_unsigned_shift_term), in double, rounded once to the
// first part's bias dtype. Not exact for act_unsigned parts: their activations are requantized on
// the signed grid at run time (docs/import.md gives the measured error).
SvdquantW4A4Params concat_svdquant_k(const std::vector<SvdquantW4A4Params>& parts, const std::string& what);
// The same join as a dense float layer: W_eff[n, k] = q·s/smooth[k] + Σ_r up[n, r]·down[k, r] per part
// (double, one rounding to `dtype`), bias as in concat_svdquant_k. Returns {weight (N, ΣK), bias}.
std::pair<Tensor, Tensor> dense_svdquant_k(const std::vector<SvdquantW4A4Params>& parts, DType dtype,
                                           const std::string& what);
// 0.171875·Σ_k q[n, k]·wscale[k/64, n]/smooth[k]: what the +shift of an act_unsigned layer adds to
// output n (the low-rank branch sees the unshifted input).
double svdquant_unsigned_shift_term(const SvdquantW4A4Params& p, int64_t n);

// ---- whole checkpoints
struct ImportOptions {
  std::string format;               // "autoawq" | "nunchaku"
  int64_t group_size = 0;           // autoawq: source G (0 = from config.json next to IN, else shapes)
  int64_t out_group_size = 0;       // autoawq: 0 = 64 when possible (see above)
  std::string scale_dtype;          // autoawq: "" = keep (F16), "bf16", "f16"
  std::string arch;                 // nunchaku: "" = detect, "qwen-image", "flux"
  int64_t hidden = 0;               // nunchaku: model width D (0 = from metadata / img_in)
  bool mod_scale_shift = true;      // nunchaku: take the folded +1 out of the scale chunks' bias
  std::string flux_linear2 = "svdquant";  // nunchaku FLUX single blocks' linear2: "svdquant" | "bf16"
};

struct ImportLayer {
  std::string source, name, format; // source prefix, output prefix, output format ("" = copied float)
  int64_t N = 0, K = 0, R = 0, group_size = 0;
  std::string note;                 // e.g. "split of attn.to_qkv", "act_unsigned"
};
struct ImportReport {
  std::string format, arch;
  std::vector<ImportLayer> layers;  // quantized output layers
  int64_t tensors_copied = 0, tensors_written = 0;
  ZeroRounding zeros;               // over every awq layer
  uint64_t file_size = 0;
  std::vector<std::string> notes;
};

ImportReport import_checkpoint(const std::string& in, const std::string& out, const ImportOptions& options);
std::string import_report_json(const ImportReport& r);

}  // namespace nibble
