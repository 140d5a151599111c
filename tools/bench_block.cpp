// `nibble bench --op block`: one Qwen-Image block (1024 image + 256 text tokens, hidden 3072) with
// nibble kernels vs the same block with fp32 weights on the best float kernel here (OpenBLAS sgemm
// or linear_f32, whichever runs the whole float block faster in this run). Weights come from
// the synthetic checkpoint + converter of `nibble demo`. The three blocks are timed interleaved
// (each repetition runs each once). Reports speedup_vs_fp32, weight_bytes_ratio (fp32 bytes /
// nibble bytes of the 14 linears, as stored) and the memory the process really holds for each
// model: resident (RSS) and anonymous (heap: repacks, dense copies) bytes after load and after the
// first forward, next to the file bytes.
#include <fmt/format.h>
#include <malloc.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "bench_registry.h"
#include "kernels/dense_bf16.h"
#include "devtools/bench_util.h"
#include "devtools/scratch_dir.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "devtools/qwen_image_synth.h"

namespace nibble::cli {
namespace {
namespace fs = std::filesystem;

int run_block(const BenchOptions& opt) {
  const int64_t D = opt.quick ? 1024 : 3072, Si = opt.quick ? 256 : 1024, St = opt.quick ? 64 : 256;
  const int reps = std::max(1, opt.repeats);
  const bench::ScratchDir scratch("bench_block");
  const std::string dir = scratch.str();
  auto log = [&](const std::string& s) {
    if (!opt.json) fmt::print("# {}\n", s);
  };
  nn::SynthBlockOptions so;
  so.hidden = D;
  const nn::SynthBlockFiles files = nn::make_synth_block_files(dir, so, log);
  nn::set_notice_handler(nullptr);
  const auto in = nn::synth_block_inputs(D, 128, Si, St, 99);
  // Memory: process RSS / anonymous bytes around each model's load (the nibble model first, so the
  // float model's pages are not yet counted), and after one forward (lazy packs, re-faulted pages).
  ::malloc_trim(0);  // hand the synth/convert step's freed heap back, so growth below is the model's
  const bench::ProcessMemory m0 = bench::process_memory();
  const nn::Model qmodel = nn::load_checkpoint(files.quant_path);
  const auto nib = nn::QwenImageBlock::from_model(qmodel, "transformer_blocks.0");
  const bench::ProcessMemory m1 = bench::process_memory();
  (void)nib.forward(in);
  const bench::ProcessMemory m2 = bench::process_memory();
  const nn::Model fmodel = nn::load_checkpoint(files.float_path);
  const auto flt = nn::QwenImageBlock::from_model(fmodel, "transformer_blocks.0");
  flt.prepare_dense();
  const bench::ProcessMemory m3 = bench::process_memory();
  auto delta = [](uint64_t a, uint64_t b) { return double(b > a ? b - a : 0); };

  // The fp32 baseline: the whole float block timed with each float kernel here (linear_f32 on
  // nibble's pool; OpenBLAS sgemm on its own threads), the faster one counts. Timing whole blocks
  // (not one GEMM) charges OpenBLAS for sharing the 2 cores with nibble's pool, which runs the
  // block's attention and norms; the pools are settled around the OpenBLAS case (bench_timing.h).
  nn::QwenBlockOutputs y_nib, y_flt, y_tmp;
  nn::QwenBlockTimings tn, tf, tf_lin, tf_blas, tf_bf16;
  const bool blas = bench::openblas_available();
  const nn::DenseMath math0 = nn::dense_math();
  std::vector<bench::InterleavedCase> cases = {
      {[&](int) { y_nib = nib.forward(in, &tn); }},
      {[&](int) {
         nn::set_dense_math(nn::DenseMath::F32);
         y_flt = flt.forward(in, &tf_lin);
         nn::set_dense_math(math0);
       }},
      {[&](int) {  // the bf16 dense GEMM (vdpbf16ps) on the same bf16 weights
         nn::set_dense_math(nn::DenseMath::Bf16);
         y_tmp = flt.forward(in, &tf_bf16);
         nn::set_dense_math(math0);
       }}};
  if (blas)  // OpenBLAS runs on its own threads: the pools are settled around it (bench_timing.h)
    cases.push_back({[&](int) {
                       nn::set_dense_gemm(&bench::sgemm_nt);
                       y_tmp = flt.forward(in, &tf_blas);
                       nn::set_dense_gemm(nullptr);
                     },
                     true});
  bench::settle_pools(true);
  const std::vector<bench::Timing> T = bench::time_interleaved(reps, cases);
  const double t_nib = T[0].median, t_lin = T[1].median, t_bf16 = T[2].median, t_blas = blas ? T[3].median : 0;
  std::string kernel = "linear_f32";
  tf = tf_lin;
  if (blas && t_blas < t_lin) kernel = "openblas_sgemm", tf = tf_blas;
  const double t_flt = kernel == "openblas_sgemm" ? t_blas : t_lin;
  const double speedup = bench::paired_ratio(kernel == "openblas_sgemm" ? T[3] : T[1], T[0]);
  // The float baseline of the issue: the same bf16 weights on nibble's fastest dense kernel.
  const bool bf16_fastest = kernels::dense_bf16::supported() && t_bf16 < t_flt;
  const std::string float_kernel = bf16_fastest ? "linear_bf16" : kernel;
  const double t_float = bf16_fastest ? t_bf16 : t_flt;
  const double speedup_float = bf16_fastest ? bench::paired_ratio(T[2], T[0]) : speedup;
  log(fmt::format("float block: linear_f32 {:.1f} ms, linear_bf16 {:.1f} ms{}, openblas {}; baseline: {}", t_lin * 1e3,
                  t_bf16 * 1e3, kernels::dense_bf16::supported() ? "" : " (no AVX-512 BF16: scalar reference)",
                  blas ? fmt::format("{:.1f} ms", t_blas * 1e3) : "n/a (" + bench::openblas_info() + ")", float_kernel));
  const auto deq = nib.dequantized();
  deq.prepare_dense();
  const auto y_deq = deq.forward(in);
  const nn::Fidelity f_deq = nn::compare_outputs(y_nib.img, y_deq.img);
  const nn::Fidelity f_flt = nn::compare_outputs(y_nib.img, y_flt.img);
  const nn::Fidelity u_deq = nn::compare_updates(y_nib.img, y_deq.img, in.img);

  uint64_t params = 0;
  for (const auto& n : nn::QwenImageBlock::linear_names())
    params += uint64_t(flt.linear(n).out_features() * flt.linear(n).in_features() + flt.linear(n).out_features());
  const uint64_t fp32_bytes = params * 4, bf16_bytes = flt.stored_bytes(), nib_bytes = nib.stored_bytes();
  const double runs = double(reps + 1);
  bench::Record r;
  r.s("op", "block").s("isa", isa_name(active_isa())).s("fp32_kernel", kernel);
  r.n("threads", num_threads()).n("hidden", double(D)).n("img_tokens", double(Si)).n("txt_tokens", double(St));
  r.n("nibble_ms", t_nib * 1e3).n("fp32_ms", t_flt * 1e3).n("speedup_vs_fp32", speedup);
  r.n("fp32_linear_f32_ms", t_lin * 1e3).n("fp32_openblas_ms", t_blas > 0 ? t_blas * 1e3 : NAN);
  r.s("float_kernel", float_kernel).n("float_ms", t_float * 1e3).n("speedup_vs_float", speedup_float);
  r.n("bf16_linear_bf16_ms", t_bf16 * 1e3);
  r.n("nibble_attention_ms", tn.attention / runs * 1e3).n("fp32_attention_ms", tf.attention / runs * 1e3);
  r.n("weight_bytes_nibble", double(nib_bytes)).n("weight_bytes_fp32", double(fp32_bytes));
  r.n("weight_bytes_bf16", double(bf16_bytes)).n("weight_bytes_ratio", double(fp32_bytes) / double(nib_bytes));
  r.n("weight_bytes_ratio_vs_bf16", double(bf16_bytes) / double(nib_bytes));
  r.n("file_bytes_nibble", double(files.quant_file_bytes)).n("file_bytes_bf16", double(files.float_file_bytes));
  r.n("rss_after_load_nibble", delta(m0.rss, m1.rss)).n("anon_after_load_nibble", delta(m0.anon, m1.anon));
  r.n("rss_after_run_nibble", delta(m0.rss, m2.rss)).n("anon_after_run_nibble", delta(m0.anon, m2.anon));
  r.n("rss_after_load_fp32", delta(m2.rss, m3.rss)).n("anon_after_load_fp32", delta(m2.anon, m3.anon));
  r.n("resident_ratio_vs_fp32", delta(m2.rss, m3.rss) / std::max(1.0, delta(m0.rss, m2.rss)));
  r.n("psnr_vs_dequantized_db", f_deq.psnr_db).n("update_psnr_vs_dequantized_db", u_deq.psnr_db);
  r.n("snr_vs_float_db", f_flt.snr_db);
  if (opt.json) {
    fmt::print("{}\n", bench::records_to_json({r}));
  } else {
    fmt::print("{}", bench::records_to_table({r}, {"op", "img_tokens", "txt_tokens", "nibble_ms", "fp32_ms",
                                                   "fp32_kernel", "speedup_vs_fp32", "float_kernel", "speedup_vs_float", "weight_bytes_ratio",
                                                   "weight_bytes_ratio_vs_bf16", "resident_ratio_vs_fp32", "psnr_vs_dequantized_db",
                                                   "snr_vs_float_db"}));
    fmt::print("# per phase (s, summed over {} runs) nibble: mod {:.3f} norms {:.3f} qkv {:.3f} attn {:.3f} out {:.3f} mlp {:.3f}\n",
               reps + 1, tn.modulation, tn.norms, tn.qkv, tn.attention, tn.out_proj, tn.mlp);
    fmt::print("# per phase (s, summed over {} runs) fp32:   mod {:.3f} norms {:.3f} qkv {:.3f} attn {:.3f} out {:.3f} mlp {:.3f}\n",
               reps + 1, tf.modulation, tf.norms, tf.qkv, tf.attention, tf.out_proj, tf.mlp);
    fmt::print("# weight_bytes_ratio = fp32 bytes / nibble bytes of the 14 linears (incl. bias); shared host: ratios only\n");
    auto mb = [](double b) { return b / double(1 << 20); };
    fmt::print("# memory (MiB)       file   resident after load   anon after load   resident after 1st run   anon after 1st run\n");
    fmt::print("# nibble model   {:9.1f}   {:19.1f}   {:15.1f}   {:22.1f}   {:18.1f}\n", mb(double(files.quant_file_bytes)),
               mb(delta(m0.rss, m1.rss)), mb(delta(m0.anon, m1.anon)), mb(delta(m0.rss, m2.rss)), mb(delta(m0.anon, m2.anon)));
    fmt::print("# fp32 baseline  {:9.1f}   {:19.1f}   {:15.1f}   (bf16 file, packed to fp32 panels at load)\n",
               mb(double(files.float_file_bytes)), mb(delta(m2.rss, m3.rss)), mb(delta(m2.anon, m3.anon)));
    fmt::print("# resident_ratio_vs_fp32 = fp32 model's resident growth / nibble model's (after its first run)\n");
  }
  return 0;
}

const BenchRegistration reg("block", "one Qwen-Image block: nibble vs the fp32 block (speedup, weight bytes, PSNR)",
                            run_block);
}  // namespace
}  // namespace nibble::cli
