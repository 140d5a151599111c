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
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "nibble/formats.h"
#include "nibble/tensor.h"

namespace nibble {

// Per-input-channel activation statistics of one layer (a row of the --calib file).
struct ActStats {
  Tensor mean_abs;  // (K) F32: mean |x| over calibration tokens (AWQ's importance)
  Tensor max_abs;   // (K) F32: max |x| (SmoothQuant's statistic)
  Tensor mean_sq;   // (K) F32: mean x² (optional; output-error weights; else derived)
  Tensor sample;    // (M, K) F32 optional: a few activation rows, used for the α search when present
  bool empty() const { return !mean_abs.defined() && !max_abs.defined() && !sample.defined(); }
};

// ---------------------------------------------------------------- awq_w4a16
struct AwqQuantOptions {
  int64_t group_size = 64;
  DType scale_dtype = DType::BF16;      // wscales / wzeros dtype (BF16 | F16); bias is stored in it too
  const ActStats* calib = nullptr;      // with mean_abs: per-group clipping search
  int clip_grid = 20;                   // ratios 1, 1−1/grid·(1−min_clip), … min_clip
  float min_clip = 0.5f;
  double* weight_rel_error = nullptr;   // out (optional): ‖W_eff − W‖_F / ‖W‖_F
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
  const ActStats* calib = nullptr;      // with max_abs: smoothing with α searched on alpha_grid
  std::vector<float> alpha_grid = {0.3f, 0.4f, 0.5f, 0.6f, 0.7f};
  uint64_t seed = 0x5eed;               // randomized SVD test matrix
  int oversample = 8, power_iterations = 2;
  std::vector<double>* weight_rel_errors = nullptr;  // out (optional): ‖W_eff − W‖_F/‖W‖_F per member
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
// The kitchen Qwen-Image-Edit map (spec §7).
std::vector<ConvertRule> preset_rules(const std::string& preset);

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
  uint64_t mem_budget = 2ull << 30;     // bytes of working memory for in-flight layers
  uint64_t shard_size = 0;              // 0 = one file; else split output above this many bytes
  int threads = 0;                      // 0 = library default
};

struct LayerPlan {
  std::string name;                     // layer prefix P
  std::string format;                   // target format, or "" for copy
  int64_t N = 0, K = 0;
  std::string source_dtype;
  uint64_t bytes_before = 0, bytes_after = 0;
  std::vector<std::string> group;       // q/k/v group members (this layer first), if grouped
  std::map<std::string, std::string> opts;
};
struct ConvertPlan {
  std::vector<LayerPlan> layers;        // quantized layers, in output order
  uint64_t tensors_total = 0, passthrough_tensors = 0;
  uint64_t bytes_in = 0, bytes_out = 0; // tensor bytes; output file size incl. header in file_size
  uint64_t file_size = 0;
};

struct LayerResult {
  std::string name, format;
  int64_t N = 0, K = 0;
  uint64_t bytes_before = 0, bytes_after = 0;
  double weight_rel_error = 0;          // ‖W_eff − W‖_F / ‖W‖_F
  double seconds = 0;
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

// ---------------------------------------------------------------- calibration statistics file
// Layout (docs/convert.md): `<layer>.mean_abs`, `<layer>.max_abs`, optional `<layer>.mean_sq`,
// `<layer>.sample` tensors, F32, (K) resp. (M, K); `__metadata__` {"format": "nibble_calib_v1"}.
std::map<std::string, ActStats> load_calib_stats(const std::string& path);
// Accumulates statistics from activation batches (the `nibble calib` helper).
class CalibAccumulator {
 public:
  void add(const std::string& layer, const Tensor& x);  // x (..., K) float
  std::map<std::string, ActStats> finish(int64_t sample_rows = 16) const;
  void save(const std::string& path, int64_t sample_rows = 16) const;
 private:
  struct Acc { std::vector<double> sum_abs, sum_sq; std::vector<float> max_abs; int64_t count = 0;
               std::vector<float> sample; int64_t sample_rows = 0; };
  std::map<std::string, Acc> acc_;
};

}  // namespace nibble
