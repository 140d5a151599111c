// make_synth_block_files (qwen_image_synth.h): its own file so that users of the inputs/measures
// do not link the checkpoint converter.
#include <fmt/format.h>

#include <chrono>
#include <filesystem>

#include "nibble/convert.h"
#include "nibble/synth.h"
#include "devtools/qwen_image_synth.h"

namespace nibble::nn {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

SynthBlockFiles make_synth_block_files(const std::string& dir, const SynthBlockOptions& o,
                                       const std::function<void(const std::string&)>& log) {
  SynthBlockFiles f;
  const char* stem = o.whole_model ? "qwen_model" : "qwen_block";
  f.float_path = (std::filesystem::path(dir) / fmt::format("{}_bf16.safetensors", stem)).string();
  f.quant_path = (std::filesystem::path(dir) / fmt::format("{}_nibble.safetensors", stem)).string();
  SynthCheckpointOptions so;
  so.blocks = o.whole_model ? o.blocks : 1;
  so.hidden = o.hidden;
  so.mlp_hidden = o.mlp_hidden;
  so.head_dim = o.head_dim;
  so.top_level = o.whole_model;
  so.joint_dim = o.whole_model ? o.joint_dim : 0;
  so.dtype = DType::BF16;
  so.seed = o.seed;
  double t0 = now_s();
  if (log)
    log(o.whole_model ? fmt::format("writing a synthetic Qwen-Image model ({} blocks, hidden {}, joint {}, bf16) ...",
                                    so.blocks, o.hidden, so.joint_dim)
                      : fmt::format("writing a synthetic Qwen-Image block (hidden {}, bf16) ...", o.hidden));
  f.float_file_bytes = write_synth_qwen_image_checkpoint(f.float_path, so);
  f.synth_seconds = now_s() - t0;
  ConvertOptions co;
  co.preset = "qwen-image";
  co.rank = o.rank;
  t0 = now_s();
  if (log) log(fmt::format("converting with the kitchen Qwen-Image-Edit rules (awq_w4a16 for *_mod.1, "
                           "svdquant_w4a4 rank {} elsewhere, act_unsigned on net.2) ...", o.rank));
  convert_checkpoint(f.float_path, f.quant_path, co);
  f.convert_seconds = now_s() - t0;
  f.quant_file_bytes = std::filesystem::file_size(f.quant_path);
  return f;
}

QualityVsNaive svdquant_quality_vs_naive(int64_t N, int64_t K, int64_t M, int64_t rank, uint64_t seed) {
  const Tensor W = synth_weight(N, K, seed), b = synth_bias(N, seed + 1);
  // Disjoint rows of one activation stream: [0, M) calibrate the smoothing, [M, 2M) measure, so
  // the calibrated figure is out of sample.
  const Tensor rows = synth_activations(2 * M, K, seed + 2);
  const Tensor x_cal = rows.slice_rows(0, M), x = rows.slice_rows(M, 2 * M);
  const Tensor y_ref = Linear::from_float("float", W, b).forward(x);
  auto snr_of = [&](const SvdquantQuantOptions& o) {
    const SvdquantW4A4Params p = quantize_weight_svdquant_w4a4(W, b, o);
    LayerSource src;
    src.name = "quality_probe";
    src.config = svdquant_quant_config(o);
    for (auto& [k, t] : layer_tensors(p)) src.tensors[k] = t;
    const Linear l = Linear::from_layer(bind_layer(src));
    return compare_outputs(l.forward(x), y_ref).snr_db;
  };
  QualityVsNaive q;
  SvdquantQuantOptions naive;
  naive.rank = 0;
  q.naive_snr_db = snr_of(naive);
  SvdquantQuantOptions lr;
  lr.rank = rank;
  q.svdquant_snr_db = snr_of(lr);
  ActStats stats;
  stats.sample = x_cal;
  SvdquantQuantOptions sm = lr;
  sm.calib = &stats;
  q.svdquant_smooth_snr_db = snr_of(sm);
  return q;
}

}  // namespace nibble::nn
