// `nibble bench --op model`: one step of the whole Qwen-Image transformer (nn::QwenImageTransformer)
// at 1024 image + 256 text tokens on a reduced-depth, true-width synthetic checkpoint (hidden 3072,
// 24 heads × 128, joint 3584; 2 blocks, 1 with --quick at fewer tokens), converted with the kitchen
// Qwen-Image rules (`convert --preset qwen-image`). Reports the shares of the step in the linears,
// in attention (the kernel proper) and in everything else; attention's FLOP rate as a share of the
// vdpbf16ps peak measured in this process on all threads; the speed-up over the same model with
// its bf16 weights on nibble's fastest dense kernel (the bf16 dense GEMM linear_bf16, linear_f32
// packed panels, or OpenBLAS sgemm in the full run, whichever runs the float model faster here);
// weight bytes bf16 / nibble; peak RSS. All cases are warmed up first, then timed in interleaved
// rounds (bench::time_interleaved), medians.
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <vector>
#include <filesystem>
#include <random>

#include "bench_registry.h"
#include "devtools/bench_util.h"
#include "devtools/scratch_dir.h"
#include "kernels/attention_kernels.h"
#include "kernels/dense_bf16.h"
#include "nn/attention.h"
#include "nibble/convert.h"
#include "nibble/isa.h"
#include "nibble/qwen_image.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {
namespace fs = std::filesystem;

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

[[maybe_unused]] double process_cpu_seconds() {  // used only with AVX-512
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// The joint attention alone at the model's shape (24 heads × 128, S tokens) on all threads, rated
// per core in CPU time (process CPU seconds over the call, so preemption on a shared host does not
// count; idle pool threads that spin count against it), and the vdpbf16ps peak measured the same
// way: the probe runs on every thread at once (so both figures see the same sharing of the cores)
// and its per-thread CPU-time rates are averaged. Returns GFLOP/s per core; *peak gets the peak
// per core (0 without AVX-512 BF16).
double attention_gflops_per_core(int64_t S, double* peak) {
  *peak = 0;
#if defined(NIBBLE_HAVE_AVX512)
  if (active_isa() < Isa::Avx512Bf16) return 0;
  const int64_t D = 3072, hd = 128;
  const Tensor q = synth_activations(S, D, 21), k = synth_activations(S, D, 22), v = synth_activations(S, D, 23);
  std::vector<float> o(static_cast<size_t>(S * D));
  auto run = [&] {
    nn::joint_attention(q.data<float>(), k.data<float>(), v.data<float>(), 1, S, D, hd, nullptr, 0, o.data(),
                        nn::AttentionPrecision::Bf16);
  };
  run();
  std::vector<double> rates;
  const int reps = S < 1024 ? 7 : 3;  // short calls: more of them
  for (int i = 0; i < reps; ++i) {
    const double c0 = process_cpu_seconds();
    run();
    const double c = process_cpu_seconds() - c0;
    rates.push_back(double(D / hd) * 4.0 * double(S) * double(S) * double(hd) / c * 1e-9);
  }
  const int nt = num_threads();
  std::vector<double> probe(static_cast<size_t>(nt), 0.0);
  parallel_for(nt, [&](int64_t t) { probe[size_t(t)] = kernels::attention::bf16_peak_gflops(0.25); });
  double sum = 0;
  for (double p : probe) sum += p;
  *peak = sum / nt;
  return bench::median(rates);
#else
  (void)S;
  return 0;
#endif
}

int run_model(const BenchOptions& opt) {
  const int64_t D = 3072, blocks = opt.quick ? 1 : 2, side = opt.quick ? 32 : 64, St = opt.quick ? 64 : 256;
  const int64_t Si = (side / 2) * (side / 2);
  const int reps = std::max(1, opt.repeats);
  const bench::ScratchDir scratch("bench_model");
  const std::string dir = scratch.str();
  auto log = [&](const std::string& s) {
    if (!opt.json) fmt::print("# {}\n", s);
  };
  const std::string fpath = dir + "/model_bf16.safetensors", qpath = dir + "/model_nibble.safetensors";
  SynthCheckpointOptions so;
  so.blocks = blocks;
  so.hidden = D;
  so.joint_dim = 3584;
  so.dtype = DType::BF16;
  log(fmt::format("writing a synthetic Qwen-Image transformer ({} blocks, hidden {}, bf16) ...", blocks, D));
  write_synth_qwen_image_checkpoint(fpath, so);
  log("converting with --preset qwen-image ...");
  ConvertOptions co;
  co.preset = "qwen-image";
  convert_checkpoint(fpath, qpath, co);
  nn::set_notice_handler(nullptr);

  nn::QwenImageLoadOptions lo;
  const auto nib = nn::QwenImageTransformer::load(qpath, lo);
  lo.stream_float_weights = 0;
  const auto flt = nn::QwenImageTransformer::load(fpath, lo);

  nn::QwenImageInputs in;
  in.latent = synth_activations(16, side * side, 11).reshape({1, 16, side, side});
  in.context = synth_activations(St, 3584, 12).reshape({1, St, 3584});
  in.timestep = Tensor::empty(DType::F32, {1});
  in.timestep.mutable_data<float>()[0] = 0.5f;

  // Cases: nibble (the process's dense math for its bf16 top-level layers), the float model on the
  // bf16 dense GEMM, on linear_f32, and (full run) on OpenBLAS. One warm-up round packs every
  // layout, then interleaved timed rounds; shares come from the timed rounds only.
  nn::QwenImageTimings tn, tl, t16, tb;
  Tensor y;
  const nn::DenseMath math0 = nn::dense_math();
  const bool bf16_gemm = kernels::dense_bf16::supported();
  const bool blas = !opt.quick && bench::openblas_available();
  auto timed = [](int i, nn::QwenImageTimings& t) { return i > 0 ? &t : nullptr; };
  std::vector<bench::InterleavedCase> cases = {
      {[&](int i) { y = nib.forward(in, timed(i, tn)); }},
      {[&](int i) {
         nn::set_dense_math(nn::DenseMath::F32);
         y = flt.forward(in, timed(i, tl));
         nn::set_dense_math(math0);
       }}};
  if (bf16_gemm)
    cases.push_back({[&](int i) {
      nn::set_dense_math(nn::DenseMath::Bf16);
      y = flt.forward(in, timed(i, t16));
      nn::set_dense_math(math0);
    }});
  if (blas)
    cases.push_back({[&](int i) {
                       nn::set_dense_gemm(&bench::sgemm_nt);
                       y = flt.forward(in, timed(i, tb));
                       nn::set_dense_gemm(nullptr);
                     },
                     true});
  bench::settle_pools(true);
  const std::vector<bench::Timing> T = bench::time_interleaved(reps, cases);
  const double runs = double(reps);
  const double t_nib = T[0].median, t_lin = T[1].median;
  const double t_b16 = bf16_gemm ? T[2].median : 0, t_blas = blas ? T.back().median : 0;
  std::string kernel = "linear_f32";
  size_t kcase = 1;
  if (bf16_gemm && t_b16 < T[kcase].median) kernel = "linear_bf16", kcase = 2;
  if (blas && t_blas < T[kcase].median) kernel = "openblas_sgemm", kcase = T.size() - 1;
  const double t_flt = T[kcase].median;
  const double speedup = bench::paired_ratio(T[kcase], T[0]);
  const double S = double(Si + St), H = double(D / 128);
  double peak = 0;
  const double attn_core = attention_gflops_per_core(Si + St, &peak);
  const double pct_peak = peak > 0 ? 100.0 * attn_core / peak : NAN;
  // The same from the model step's wall-clock attention time against all threads' peak.
  const double attn_flop = double(blocks) * H * 4.0 * S * S * 128.0;  // q·kᵀ and p·v, 2 flop per MAC
  const double attn_s = tn.attention / runs;
  const double pct_peak_wall =
      peak > 0 && attn_s > 0 ? 100.0 * attn_flop / attn_s / (peak * num_threads() * 1e9) : NAN;

  bench::Record r;
  r.s("op", "model").s("isa", isa_name(active_isa())).s("float_kernel", kernel).s("attention", nib.attention_path());
  r.n("threads", num_threads()).n("tokens", S).n("img_tokens", double(Si)).n("txt_tokens", double(St));
  r.n("blocks", double(blocks)).n("hidden", double(D));
  r.n("nibble_ms", t_nib * 1e3).n("float_ms", t_flt * 1e3);
  r.n("pct_linear", 100.0 * tn.linear / tn.total).n("pct_attention", 100.0 * tn.attention / tn.total);
  r.n("pct_other", 100.0 * tn.other / tn.total);
  r.n("attention_ms", attn_s * 1e3).n("bf16_peak_gflops_per_core", peak).n("attention_gflops_per_core", attn_core);
  r.n("attention_pct_bf16_peak", pct_peak).n("attention_pct_bf16_peak_wall", pct_peak_wall);
  r.n("speedup_vs_float", speedup);
  r.n("float_linear_f32_ms", t_lin * 1e3).n("float_linear_bf16_ms", bf16_gemm ? t_b16 * 1e3 : NAN);
  r.n("float_openblas_ms", blas ? t_blas * 1e3 : NAN).n("load_average", bench::load_average());
  r.n("weight_bytes_nibble", double(nib.stored_bytes())).n("weight_bytes_bf16", double(flt.stored_bytes()));
  // The ratio of the transformer blocks (what a 60-block model is made of: the top-level layers,
  // kept bf16 by the preset, are ~1 % of it), and of the whole reduced-depth files.
  r.n("weight_bytes_ratio", double(flt.block_stored_bytes()) / double(nib.block_stored_bytes()));
  r.n("weight_bytes_ratio_file", double(flt.stored_bytes()) / double(nib.stored_bytes()));
  double ratio_60 = 0;
  {
    const double top_f = double(flt.stored_bytes() - flt.block_stored_bytes());
    const double top_n = double(nib.stored_bytes() - nib.block_stored_bytes());
    const double per_f = double(flt.block_stored_bytes()) / double(blocks);
    const double per_n = double(nib.block_stored_bytes()) / double(blocks);
    ratio_60 = (top_f + 60 * per_f) / (top_n + 60 * per_n);
    r.n("weight_bytes_ratio_60_blocks", ratio_60);
  }
  r.n("peak_rss_mib", peak_rss_mib());
  if (opt.json) {
    fmt::print("{}\n", bench::records_to_json({r}));
  } else {
    fmt::print("{}", bench::records_to_table({r}, {"op", "tokens", "blocks", "nibble_ms", "float_ms", "float_kernel",
                                                   "pct_linear", "pct_attention", "pct_other",
                                                   "attention_pct_bf16_peak", "speedup_vs_float", "weight_bytes_ratio",
                                                   "peak_rss_mib"}));
    fmt::print("# attention_pct_bf16_peak: the attention alone at {} tokens in CPU time per core ({:.1f} GFLOP/s) vs "
               "the vdpbf16ps peak per core, probed on all threads at once ({:.1f}); from the step's wall clock "
               "against all threads' peak: {:.1f} %\n",
               Si + St, attn_core, peak, pct_peak_wall);
    fmt::print("# attention: {}; float model (bf16 weights): linear_bf16 {}, linear_f32 {:.1f} ms, openblas {}; "
               "baseline {}; speedup = median of per-round ratios; load average {:.1f}: ratios only\n",
               nib.attention_path(), bf16_gemm ? fmt::format("{:.1f} ms", t_b16 * 1e3) : "n/a (no AVX-512 BF16)",
               t_lin * 1e3, blas ? fmt::format("{:.1f} ms", t_blas * 1e3) : (opt.quick ? "skipped (--quick)" : "n/a"),
               kernel, bench::load_average());
    fmt::print("# weight_bytes_ratio = bf16 / nibble bytes of the blocks; whole reduced-depth files {:.2f}, "
               "a 60-block model {:.2f}\n", double(flt.stored_bytes()) / double(nib.stored_bytes()), ratio_60);
    fmt::print("# peak_rss_mib covers the whole process (both models are loaded; the float one packs fp32 panels)\n");
  }
  return 0;
}

const BenchRegistration reg("model",
                            "one step of the whole Qwen-Image transformer: shares, attention vs bf16 peak, "
                            "speed-up vs bf16 weights, weight bytes, peak RSS",
                            run_model);
}  // namespace
}  // namespace nibble::cli
