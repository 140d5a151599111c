// `nibble bench --op model`: one step of the whole Qwen-Image transformer (nn::QwenImageTransformer)
// at 1024 image + 256 text tokens on a reduced-depth, true-width synthetic checkpoint (hidden 3072,
// 24 heads × 128, joint 3584; 2 blocks, 1 with --quick at fewer tokens), converted with the kitchen
// Qwen-Image rules (`convert --preset qwen-image`). Reports the shares of the step in the linears,
// in attention (the kernel proper) and in everything else; attention's FLOP rate as a share of the
// vdpbf16ps peak measured in this process on all threads; the speed-up over the same model with
// its bf16 weights on nibble's fastest dense kernel (linear_f32 packed panels or OpenBLAS sgemm,
// whichever runs the float model faster here); weight bytes bf16 / nibble; peak RSS.
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <random>

#include "bench_registry.h"
#include "devtools/bench_util.h"
#include "kernels/attention_kernels.h"
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

// The vdpbf16ps peak of all pool threads running at once (GFLOP/s), or 0 without AVX-512 BF16.
double bf16_peak_all_threads() {
#if defined(NIBBLE_HAVE_AVX512)
  if (active_isa() < Isa::Avx512Bf16) return 0;
  std::atomic<double> total{0};
  parallel_for(num_threads(), [&](int64_t) {
    const double g = kernels::attention::bf16_peak_gflops(0.2);
    double cur = total.load();
    while (!total.compare_exchange_weak(cur, cur + g)) {
    }
  });
  return total.load();
#else
  return 0;
#endif
}

int run_model(const BenchOptions& opt) {
  const int64_t D = 3072, blocks = opt.quick ? 1 : 2, side = opt.quick ? 32 : 64, St = opt.quick ? 64 : 256;
  const int64_t Si = (side / 2) * (side / 2);
  const int reps = std::max(1, opt.repeats);
  const std::string dir =
      (fs::temp_directory_path() / fmt::format("nibble_bench_model_{}_{}", ::getpid(), std::random_device{}())).string();
  fs::create_directories(dir);
  struct Cleanup {
    std::string d;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(d, ec);
    }
  } cleanup{dir};
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

  nn::QwenImageTimings tn, tl, tb;
  Tensor y;
  bench::settle_pools(true);
  const double t_nib = bench::median_seconds(reps, [&] { y = nib.forward(in, &tn); });
  const double runs = double(reps + 1);
  nn::set_dense_gemm(nullptr);
  const double t_lin = bench::median_seconds(reps, [&] { y = flt.forward(in, &tl); });
  double t_blas = 0;
  std::string kernel = "linear_f32";
  if (bench::openblas_available()) {
    nn::set_dense_gemm(&bench::sgemm_nt);
    bench::settle_pools(false);
    t_blas = bench::median_seconds(reps, [&] { y = flt.forward(in, &tb); });
    nn::set_dense_gemm(nullptr);
    bench::settle_pools(true);
    if (t_blas < t_lin) kernel = "openblas_sgemm";
  }
  const double t_flt = kernel == "openblas_sgemm" ? t_blas : t_lin;
  const double peak = bf16_peak_all_threads();
  const double S = double(Si + St), H = double(D / 128);
  const double attn_flop = double(blocks) * H * 4.0 * S * S * 128.0;  // q·kᵀ and p·v, 2 flop per MAC
  const double attn_s = tn.attention / runs;
  const double pct_peak = peak > 0 && attn_s > 0 ? 100.0 * attn_flop / attn_s / (peak * 1e9) : NAN;

  bench::Record r;
  r.s("op", "model").s("isa", isa_name(active_isa())).s("float_kernel", kernel).s("attention", nib.attention_path());
  r.n("threads", num_threads()).n("tokens", S).n("img_tokens", double(Si)).n("txt_tokens", double(St));
  r.n("blocks", double(blocks)).n("hidden", double(D));
  r.n("nibble_ms", t_nib * 1e3).n("float_ms", t_flt * 1e3);
  r.n("pct_linear", 100.0 * tn.linear / tn.total).n("pct_attention", 100.0 * tn.attention / tn.total);
  r.n("pct_other", 100.0 * tn.other / tn.total);
  r.n("attention_ms", attn_s * 1e3).n("bf16_peak_gflops", peak).n("attention_pct_bf16_peak", pct_peak);
  r.n("speedup_vs_float", t_flt / t_nib);
  r.n("weight_bytes_nibble", double(nib.stored_bytes())).n("weight_bytes_bf16", double(flt.stored_bytes()));
  r.n("weight_bytes_ratio", double(flt.stored_bytes()) / double(nib.stored_bytes()));
  r.n("peak_rss_mib", peak_rss_mib());
  if (opt.json) {
    fmt::print("{}\n", bench::records_to_json({r}));
  } else {
    fmt::print("{}", bench::records_to_table({r}, {"op", "tokens", "blocks", "nibble_ms", "float_ms", "float_kernel",
                                                   "pct_linear", "pct_attention", "pct_other",
                                                   "attention_pct_bf16_peak", "speedup_vs_float", "weight_bytes_ratio",
                                                   "peak_rss_mib"}));
    fmt::print("# attention: {}; float model: linear_f32 {:.1f} ms, openblas {}; shared host: ratios only\n",
               nib.attention_path(), t_lin * 1e3, t_blas > 0 ? fmt::format("{:.1f} ms", t_blas * 1e3) : "n/a");
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
