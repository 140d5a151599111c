// nibble/convert.h — the CPU converter: float linears → kitchen-native awq_w4a16 / svdquant_w4a4.
//
// Two levels:
//  * In-memory quantizers (one layer, or a q/k/v group): float W (N, K) [+ bias] → the typed params
//    of formats.h, plus the QuantConfig to store as `P.comfy_quant`. Pure functions of their inputs
//    and options (seeded randomized SVD), single-threaded math: callers parallelize over layers.
//  * The streaming checkpoint converter (convert_checkpoint): a plan (layer → format) from a preset
//    and `--tensor-type` rules, the output header computed up front, layers quantized by the thread
//    pool under a memory budget and written in order through the atomic SafetensorsWriter, so a
//    failure leaves nothing at the target and output bytes do not depend on the thread count.
//
// Output key spellings (spec §2.2 / §3.7 list the conflicts):
//   awq_w4a16:     P.weight, P.weight_scale, P.weight_zeros (the upstream ComfyUI loader's and the
//                  kitchen serializer's spelling), P.bias, P.comfy_quant
//   svdquant_w4a4: P.weight, P.weight_scale, P.smooth_factor, P.proj_down, P.proj_up, P.bias,
//                  P.comfy_quant (the CQ converter / PR #13580 loader spelling)
// svdquant tensors (scales, smooth, projections, bias) are all stored in one 16-bit dtype (bf16).
//
// Thread safety: The in-memory quantizers are functions of their arguments only and may run
// concurrently. convert_checkpoint() runs its layer jobs on the library pool; concurrent calls
// writing different outputs are safe (their parallel regions take turns on the pool); `progress`
// is called from the writing thread.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "nibble/formats.h"
#include "nibble/tensor.h"

namespace nibble { class Checkpoint; }

namespace nibble {

// Per-input-channel activation statistics of one layer (a row of the --calib file).
struct ActStats {
  Tensor mean_abs;  // (K) F32: mean |x| over calibration tokens (AWQ's importance)
  Tensor max_abs;   // (K) F32: max |x| (SmoothQuant's statistic)
  Tensor mean_sq;   // (K) F32: mean x² (optional; output-error weights; else derived)
  Tensor sample;    // (M, K) F32 optional: a few activation rows, used for the α search when present
  Tensor min;       // (K) F32 optional: min x_k (checks act_unsigned: inputs must be ≥ −0.171875)
  Tensor max;       // (K) F32 optional: max x_k
  bool empty() const { return !mean_abs.defined() && !max_abs.defined() && !sample.defined(); }
};

// What a quantizer did (optional out-param of the options below; filled per layer / group member).
// SNRs are of the layer output on the calibration sample rows (NaN without a sample), in dB:
// before = plain round-to-nearest (awq: min/max; svdquant: no smoothing, no low-rank branch),
// lowrank = svdquant with the low-rank branch but no smoothing, after = what was written.
struct QuantInfo {
  bool calibrated = false;              // statistics were used
  int64_t sample_rows = 0;
  double alpha = -1, beta = -1;         // svdquant smoothing exponents chosen (−1: no smoothing, s = 1)
  bool alpha_on_edge = false;           // α (or β) is the largest or smallest value of its grid
  double snr_before_db = NAN, snr_lowrank_db = NAN, snr_after_db = NAN;
  double clip_ratio_mean = 1;           // awq: mean clipping ratio chosen
  bool gptq = false;                    // rounded by GPTQ (--gptq with sample rows)
  bool noise_aware = false;             // svdquant: residual rounded towards the noise-aware target
};

// ---------------------------------------------------------------- awq_w4a16
struct AwqQuantOptions {
  int64_t group_size = 64;
  DType scale_dtype = DType::BF16;      // wscales / wzeros dtype (BF16 | F16); bias is stored in it too
  const ActStats* calib = nullptr;      // with mean_abs: per-group clipping search
  int clip_grid = 20;                   // ratios 1, 1−1/grid·(1−min_clip), … min_clip
  float min_clip = 0.5f;
  // With statistics: importance E[x²] (mean_sq) instead of mean|x|², asymmetric clipping (low and
  // high end searched in turn after the symmetric ratio) and a weighted least-squares refit of
  // (scale, zero) for the chosen codes. false = the original symmetric search.
  bool improved_search = true;
  // GPTQ (needs calib->sample): columns rounded in turn with error feedback through H = XᵀX of the
  // sample rows; each group's (scale, zero) searched as above on its values after the feedback.
  bool gptq = false;
  double gptq_damp = 0.1;               // ridge: λ = max(damp·K/S, 0.01)·mean(diag H), S sample rows
  double* weight_rel_error = nullptr;   // out (optional): ‖W_eff − W‖_F / ‖W‖_F
  QuantInfo* info = nullptr;            // out (optional)
};
// W (N, K) any float dtype, bias (N) optional. K % group_size == 0, group_size even.
// Codes q ∈ [0,15], W ≈ (q − 8)·s + z with s, z the stored (rounded) values.
AwqW4A16Params quantize_awq_w4a16(const Tensor& W, const Tensor& bias, const AwqQuantOptions& options = {});
QuantConfig awq_quant_config(const AwqQuantOptions& options = {});

// ---------------------------------------------------------------- svdquant_w4a4
enum class SvdMethod { Randomized, Exact };

struct SvdquantQuantOptions {
  int64_t rank = 32;
  bool act_unsigned = false;            // post-GELU layer: main path sees x + 0.171875 (spec §3.4)
  bool tile_layout = false;             // kitchen_tile_packed_w4a4 (needs N % 128 == 0)
  SvdMethod svd = SvdMethod::Randomized;
  int refine_iterations = 2;            // L ← SVD_R(W − Q(W − L))
  DType dtype = DType::BF16;            // one 16-bit dtype for every float tensor (BF16 | F16)
  // Calibrated (calib with max_abs and/or sample): smoothing s_k = max|x_k|^α / max_n|W_nk|^β. The
  // search scores each candidate by the layer-output error of the full W4A4 forward (low-rank
  // branch and int4 residual applied) on the sample rows (else a proxy from the statistics):
  // s = 1, then α on alpha_grid with β = 1 − α, then (fine_search) α ± 0.05 around the best and
  // β ± 0.05, ± 0.1 around 1 − α, all within [0.05, 0.95] (DeepCompressor's range).
  const ActStats* calib = nullptr;
  std::vector<float> alpha_grid = {0.1f, 0.3f, 0.5f, 0.7f, 0.9f};
  bool fine_search = true;
  // Refit proj_up on the sample after the residual is quantized (least squares of the output error
  // the int4 main path leaves, ridge-regularised; proj_down kept). Needs sample rows ≥ 4·rank.
  bool refit_lowrank = true;
  // Noise-aware residual (needs calib->sample): the residual is rounded towards r·H·(H + D)⁻¹, the
  // row that minimises the main path's output error once the int4 activation noise D (measured on
  // the sample) is added to x_s (H = X_sᵀX_s, block diagonal in blocks of noise_block channels).
  bool noise_aware = true;
  int64_t noise_block = 128;
  // Per-group weight scale search (needs calib->sample): absmax·r/7, r ∈ [0.8, 1], weighted by the
  // main path's input energy per channel (diag of H + D).
  bool scale_search = true;
  // GPTQ on the int4 residual W_s − L after the low-rank branch (needs calib->sample): columns are
  // rounded in turn with error feedback through H (+ D) over all K channels.
  bool gptq = false;
  // Ridge of the sample Gram matrices: λ = max(damp·B/S, 0.01)·mean(diag H), B the channels solved
  // together, S the sample rows (the estimate's noise grows with B/S).
  double gptq_damp = 0.1;
  uint64_t seed = 0x5eed;               // randomized SVD test matrix
  int oversample = 8, power_iterations = 2;
  std::vector<double>* weight_rel_errors = nullptr;  // out (optional): ‖W_eff − W‖_F/‖W‖_F per member
  std::vector<QuantInfo>* info = nullptr;            // out (optional): per member
};

// W (N, K) any float dtype, bias (N) optional; K % 64 == 0. (The activation quantizer of the
// runtime is nibble::quantize_svdquant_w4a4 in ops.h.)
SvdquantW4A4Params quantize_weight_svdquant_w4a4(const Tensor& W, const Tensor& bias,
                                                 const SvdquantQuantOptions& options = {});
// q/k/v sharing (spec §3.8): one smooth_factor and one proj_down for all members. The low-rank
// basis is the top-R right singular subspace of the stacked [W_0; W_1; …] (smoothed), each member's
// proj_up its projection on that basis; residuals are quantized per member. Members must share K.
std::vector<SvdquantW4A4Params> quantize_weight_svdquant_w4a4_group(const std::vector<Tensor>& Ws,
                                                                    const std::vector<Tensor>& biases,
                                                                    const SvdquantQuantOptions& options = {});
QuantConfig svdquant_quant_config(const SvdquantQuantOptions& options = {});

// Effective fp32 weight (N, K) of typed params, computed here independently of the registry
// (W_eff = (q−8)·s + z, resp. R_q·diag(1/smooth) + proj_up·proj_downᵀ; natural or tile).
Tensor effective_weight(const AwqW4A16Params& p);
Tensor effective_weight(const SvdquantW4A4Params& p);

// The output keys (suffix → tensor) of a quantized layer, in the order nibble writes them.
std::vector<std::pair<std::string, Tensor>> layer_tensors(const AwqW4A16Params& p);
std::vector<std::pair<std::string, Tensor>> layer_tensors(const SvdquantW4A4Params& p);

// ---------------------------------------------------------------- the checkpoint converter
struct ConvertRule {
  std::string pattern;                  // ECMAScript regex, matched with regex_search on the layer name
  std::string format;                   // awq_w4a16 | svdquant_w4a4 | keep (= copy unchanged)
  std::map<std::string, std::string> opts;  // group_size, rank, act_unsigned, layout, svd, refine
};
// "REGEX=FORMAT[:opt=v,...]" → rule; throws nibble::Error naming the rule and the problem.
ConvertRule parse_convert_rule(const std::string& text);
// Layer → format maps: "qwen-image" (the kitchen Qwen-Image-Edit map, spec §7), "flux" (FLUX.1
// dev/schnell as ComfyUI names it), "wan" (Wan 2.1 / 2.2 DiT). Throws for an unknown name.
std::vector<ConvertRule> preset_rules(const std::string& preset);
std::vector<std::string> preset_names();
// The preset whose rules match the most linear layers of `ck` ("" if none matches any), and how
// many layers it would quantize.
std::string detect_preset(const Checkpoint& ck, int64_t* layers = nullptr);

struct ConvertOptions {
  std::string preset;                   // "" | "qwen-image"
  std::vector<ConvertRule> rules;       // first match wins; checked before the preset's
  std::vector<std::string> exclude;     // regexes: matching layers are copied unchanged
  int64_t rank = 32, group_size = 64;
  bool tile_layout = false;
  SvdMethod svd = SvdMethod::Randomized;
  int refine_iterations = 2;
  std::string calib_path;               // safetensors stats file (docs/convert.md)
  bool allow_requantize = false;
  std::vector<std::string> share;       // regexes: layers equal up to the matched part share one input
  // "full": the searches documented in docs/convert.md; "legacy": the earlier ones (svdquant α on
  // {0.3 … 0.7} with β = 1 − α, no refit; awq symmetric clipping on mean|x|²) — for comparisons.
  std::string search = "full";
  bool gptq = false;                    // GPTQ on the int4 weights from the calibration sample rows
  double gptq_damp = 0.1;
  bool strict = false;                  // warnings about calibration coverage become errors
  bool force = false;                   // act_unsigned on inputs the calibration shows negative: warn only
  uint64_t mem_budget = 2ull << 30;     // bytes of working memory for in-flight layers
  uint64_t shard_size = 0;              // 0 = one file; else split output above this many bytes
  int threads = 0;                      // 0 = library default
  // Spelling of the svdquant side tensors: "comfyui" (smooth_factor / proj_down / proj_up, what
  // ComfyUI's loaders read) or "kitchen" (weight_smooth_factor / weight_proj_down / weight_proj_up,
  // comfy-kitchen's serializer). awq_w4a16 writes weight_zeros in both.
  std::string key_style = "comfyui";
};

struct LayerPlan {
  std::string name;                     // layer prefix P
  std::string format;                   // target format, or "" for copy
  int64_t N = 0, K = 0;
  std::string source_dtype;
  uint64_t bytes_before = 0, bytes_after = 0;
  std::vector<std::string> group;       // members sharing the input (smooth, proj_down), if grouped
  std::map<std::string, std::string> opts;
  std::string rule;                     // what picked the format: "--tensor-type 'R'" or "preset P 'R'"
  bool act_unsigned = false;
  std::string calib_key;                // statistics used ("" = weight-only)
};
struct SkippedTensor {
  std::string name;                     // tensor name
  std::string reason;                   // why it is not a linear layer (or not converted)
};
struct ConvertPlan {
  std::vector<LayerPlan> layers;        // quantized layers, in output order
  uint64_t tensors_total = 0;           // tensors in the output file
  uint64_t passthrough_tensors = 0;     // tensors copied byte-for-byte
  uint64_t linear_layers = 0;           // linear layers found in the input (float or quantized)
  uint64_t kept_layers = 0;             // linear layers left as they are (keep rule, exclude, no rule)
  std::vector<SkippedTensor> skipped;   // tensors named like weights that are not linear layers
  std::vector<std::string> warnings;    // things the user should know (uncalibrated layers, ...)
  std::vector<std::string> notes;       // facts about the plan (act_unsigned without a check, ...)
  uint64_t bytes_in = 0, bytes_out = 0; // tensor bytes; output file size incl. header in file_size
  uint64_t file_size = 0;
};

struct LayerResult {
  std::string name, format;
  int64_t N = 0, K = 0;
  uint64_t bytes_before = 0, bytes_after = 0;
  double weight_rel_error = 0;          // ‖W_eff − W‖_F / ‖W‖_F
  double seconds = 0;
  int64_t rank = 0;
  QuantInfo info;
};
struct ConvertProgress {
  int64_t index = 0, total = 0;         // 1-based tensor index of what was just written
  std::string name, format;             // tensor (or layer) name; format "" for passthrough
  Shape shape;
  uint64_t bytes_before = 0, bytes_after = 0, bytes_done = 0, bytes_total = 0;
  double rel_error = -1;                // < 0 for passthrough
  double elapsed_seconds = 0;
};
struct ConvertReport {
  ConvertPlan plan;
  std::vector<LayerResult> layers;
  double seconds = 0;
  uint64_t peak_rss = 0;                // bytes, from /proc (0 if unknown)
};

// Plans without touching OUT (this is --dry-run).
ConvertPlan plan_conversion(const std::string& in, const ConvertOptions& options);
// Converts IN → OUT. `progress` is called from the writing thread in output order.
ConvertReport convert_checkpoint(const std::string& in, const std::string& out, const ConvertOptions& options,
                                 const std::function<void(const ConvertProgress&)>& progress = {});
// The JSON report (--json).
std::string convert_report_json(const ConvertReport& report);
// The summary lines the CLI prints (every count says what it counts).
std::string convert_summary_text(const ConvertReport& report);

// SIGINT / SIGTERM during convert_checkpoint: remove the temporary output files and exit with
// 128 + signal (130 / 143). Installed by the CLI; library users (Python) keep their own handlers.
void install_convert_signal_cleanup();
// Removes temporary files `.<name>.tmp-<pid>-…` left beside OUT (or its shards) by processes that no
// longer run; returns their paths.
std::vector<std::string> remove_stale_temp_files(const std::string& out);

// ---------------------------------------------------------------- calibration statistics file
// Layout (docs/convert.md): `<layer>.mean_abs`, `<layer>.max_abs`, optional `<layer>.mean_sq`,
// `<layer>.min`, `<layer>.max`, `<layer>.sample` tensors, F32, (K) resp. (M, K); `__metadata__` {"format": "nibble_calib_v1"}.
std::map<std::string, ActStats> load_calib_stats(const std::string& path);
// Accumulates statistics from activation batches (the `nibble calib` helper).
class CalibAccumulator {
 public:
  // `sample_rows`: rows kept per layer, a uniform random sample (reservoir) of all rows seen across
  // every add(); `seed` makes it reproducible.
  explicit CalibAccumulator(int64_t sample_rows = 256, uint64_t seed = 0x5eed)
      : sample_rows_(sample_rows), seed_(seed) {}
  void add(const std::string& layer, const Tensor& x);  // x (..., K) float
  // sample_rows ≥ 0 keeps at most that many of the sampled rows (still a uniform sample); −1 = all.
  std::map<std::string, ActStats> finish(int64_t sample_rows = -1) const;
  void save(const std::string& path, int64_t sample_rows = -1) const;
  int64_t rows_seen(const std::string& layer) const;
 private:
  struct Acc { std::vector<double> sum_abs, sum_sq; std::vector<float> max_abs, min, max; int64_t count = 0;
               std::vector<float> sample; int64_t sample_rows = 0; uint64_t rng = 0; };
  int64_t sample_rows_;
  uint64_t seed_;
  std::map<std::string, Acc> acc_;
};

}  // namespace nibble
