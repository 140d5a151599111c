// `nibble demo` (what `make demo` runs): the whole model. A synthetic Qwen-Image model at true widths
// (hidden 3072, MLP 12288, joint 3584; reduced depth, bf16) → converter with the kitchen
// Qwen-Image-Edit rules → reload → sample a few Euler steps with CFG (ComfyUI's schedule, sampler.cpp)
// with nibble, with the dequantized baseline and with the float (bf16-weight) model; prints sizes,
// fidelity (PSNR of the final latent vs the dequantized baseline, SNR vs the float model) and
// seconds per step, nibble vs the float model. Then the quantization-quality comparison of one layer.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <random>

#include "devtools/bench_util.h"
#include "command.h"
#include "nibble/isa.h"
#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"
#include "devtools/qwen_image_synth.h"

namespace nibble::cli {
namespace {
namespace fs = std::filesystem;

std::string mib(uint64_t b) { return fmt::format("{:.1f} MiB", double(b) / (1 << 20)); }

Tensor demo_context(int64_t L, int64_t J, uint64_t seed) {
  SynthActOptions a;
  a.n_outlier_channels = 4;
  a.outlier_min = 5.0f;
  a.outlier_max = 20.0f;
  return synth_activations(L, J, seed, a).reshape({1, L, J});
}

const CommandRegistration reg("demo", "end-to-end demo: synthesize, quantize, reload and sample with a Qwen-Image model", 90,
                              [](CLI::App& app) -> RunFn {
  struct Opts {
    std::string out;
    bool keep = false;
    int64_t hidden = 3072, blocks = 1, latent = 16, txt_tokens = 16, rank = 32;
    int steps = 4;
    double cfg = 2.5;
    uint64_t seed = 20261123;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--out", o->out, "directory for the checkpoints (kept); default: a temp dir, removed at the end");
  app.add_flag("--keep", o->keep, "keep the temp dir");
  app.add_option("--hidden", o->hidden, "hidden size D (multiple of 128; Qwen-Image: 3072)");
  app.add_option("--blocks", o->blocks, "transformer blocks (Qwen-Image: 60; default 1)")->check(CLI::PositiveNumber);
  app.add_option("--latent", o->latent, "latent side (image tokens = (side/2)², pixels = 8·side; default 16)")
      ->check(CLI::PositiveNumber);
  app.add_option("--txt-tokens", o->txt_tokens, "text tokens of the positive conditioning")->check(CLI::PositiveNumber);
  app.add_option("--steps", o->steps, "sampling steps (default 4)")->check(CLI::PositiveNumber);
  app.add_option("--cfg", o->cfg, "classifier-free guidance scale (default 2.5)");
  app.add_option("--rank", o->rank, "svdquant low-rank R")->check(CLI::PositiveNumber);
  app.add_option("--seed", o->seed, "seed of weights, conditioning and noise");
  return [o]() -> int {
    const double t_start = bench::now_seconds();
    const bool quiet = globals().quiet;
    auto log = [&](const std::string& s) {
      if (!quiet) fmt::print("{}\n", s);
    };
    std::string dir = o->out;
    bool remove = false;
    if (dir.empty()) {
      dir = (fs::temp_directory_path() / fmt::format("nibble_demo_{}_{}", ::getpid(), std::random_device{}())).string();
      remove = !o->keep;
    }
    fs::create_directories(dir);
    struct Cleanup {
      std::string d;
      bool on;
      ~Cleanup() {
        std::error_code ec;
        if (on) fs::remove_all(d, ec);
      }
    } cleanup{dir, remove};

    fmt::print("nibble demo — isa {} ({} threads), files in {}{}\n", isa_name(active_isa()), num_threads(), dir,
               remove ? " (removed at the end)" : "");
    nn::SynthBlockOptions so;
    so.whole_model = true;
    so.blocks = o->blocks;
    so.hidden = o->hidden;
    so.joint_dim = 3584;
    so.rank = o->rank;
    so.seed = o->seed;
    const nn::SynthBlockFiles files = nn::make_synth_block_files(dir, so, log);
    log(fmt::format("  synthesized in {:.1f} s, converted in {:.1f} s", files.synth_seconds, files.convert_seconds));

    nn::QwenImageLoadOptions lo;
    const nn::QwenImageTransformer nib = nn::QwenImageTransformer::load(files.quant_path, lo);
    lo.dequantized_baseline = true;
    const nn::QwenImageTransformer deq = nn::QwenImageTransformer::load(files.quant_path, lo);
    const nn::QwenImageTransformer flt = nn::QwenImageTransformer::load(files.float_path);
    {
      // What the converter did to the block linears.
      const nn::Model qmodel = nn::load_checkpoint(files.quant_path);
      const auto blk = nn::QwenImageBlock::from_model(qmodel, "transformer_blocks.0");
      std::map<std::string, int> formats;
      int unsigned_layers = 0;
      for (const auto& n : nn::QwenImageBlock::linear_names()) {
        const nn::Linear& l = blk.linear(n);
        formats[l.format_name()]++;
        unsigned_layers += l.act_unsigned();
      }
      std::string fmts;
      for (auto& [f, c] : formats) fmts += fmt::format("{}{} × {}", fmts.empty() ? "" : ", ", c, f);
      fmt::print("model: {} block(s), hidden {}, joint {}; per block {} ({} act_unsigned); img_in, txt_in, time "
                 "embedding, norm_out, proj_out kept bf16\n", nib.config().blocks, nib.config().hidden,
                 nib.config().joint_dim, fmts, unsigned_layers);
    }
    fmt::print("weights: bf16 {}  →  nibble {}  ({:.2f}× smaller; the bf16 top-level layers weigh more at this depth "
               "than in the 60-block model)\n", mib(flt.stored_bytes()), mib(nib.stored_bytes()),
               double(flt.stored_bytes()) / double(nib.stored_bytes()));
    fmt::print("files:   bf16 {}  nibble {}\n", mib(files.float_file_bytes), mib(files.quant_file_bytes));

    // Sampling: ComfyUI's KSampler (euler, simple, AuraFlow shift 3.1) with a negative and CFG.
    const int64_t S = o->latent;
    const Conditioning pos{demo_context(o->txt_tokens, 3584, o->seed + 1), {}, {}};
    const Conditioning neg{demo_context(std::max<int64_t>(1, o->txt_tokens / 2), 3584, o->seed + 2), {}, {}};
    const Tensor latent = Tensor::zeros(DType::F32, {1, 16, 1, S, S});
    const Tensor noise = nn::flow_noise(latent.shape(), o->seed + 3);
    nn::SamplerOptions opt;
    opt.steps = o->steps;
    opt.cfg = o->cfg;
    fmt::print("sampling: latent {} ({}×{} px, {} image + {} text tokens), euler, simple, shift {}, {} steps, cfg {} "
               "with a negative (2 model calls per step)\n", shape_str(latent.shape()), 8 * S, 8 * S,
               ((S + 1) / 2) * ((S + 1) / 2), o->txt_tokens, opt.shift, opt.steps, opt.cfg);
    auto sample = [&](const nn::QwenImageTransformer& m, const char* name, double* sec_per_step) {
      const nn::DenoiseFn fn = nn::qwen_image_denoiser(m, pos, neg);
      // One untimed call first (packs dense weights, warms the caches), like the benchmarks.
      (void)fn(noise, 1.0, false);
      std::vector<double> secs;
      const Tensor y = nn::sample_flow(fn, latent, noise, opt, true, [&](int, int, double s) { secs.push_back(s); });
      std::sort(secs.begin(), secs.end());
      *sec_per_step = secs.empty() ? 0 : secs[secs.size() / 2];
      if (!quiet) fmt::print("  {:<28} {:.3f} s/step (median of {})\n", name, *sec_per_step, secs.size());
      return y;
    };
    double t_nib = 0, t_deq = 0, t_flt = 0;
    const Tensor y_nib = sample(nib, "nibble", &t_nib);
    const Tensor y_deq = sample(deq, "dequantized baseline (fp32)", &t_deq);
    const Tensor y_flt = sample(flt, "float model (bf16 weights)", &t_flt);
    const nn::Fidelity vs_deq = nn::compare_outputs(y_nib, y_deq);
    const nn::Fidelity vs_flt = nn::compare_outputs(y_nib, y_flt);
    const nn::Fidelity deq_flt = nn::compare_outputs(y_deq, y_flt);
    fmt::print("  kernel fidelity   final latent, nibble vs dequantized baseline: PSNR {:.2f} dB, SNR {:.2f} dB"
               " (PSNR over the baseline's peak-to-peak range)\n", vs_deq.psnr_db, vs_deq.snr_db);
    fmt::print("  quantization      final latent, nibble vs float model: SNR {:.2f} dB; dequantized vs float: SNR {:.2f} dB\n",
               vs_flt.snr_db, deq_flt.snr_db);
    fmt::print("  time              nibble {:.3f} s/step   float model {:.3f} s/step   → {:.2f}× "
               "(`nibble bench --op model` for 1024 + 256 tokens)\n", t_nib, t_flt, t_flt / t_nib);
    if (!remove) {
      save_latent((fs::path(dir) / "nibble.latent").string(), y_nib);
      save_conditioning((fs::path(dir) / "pos.safetensors").string(), pos);
      save_conditioning((fs::path(dir) / "neg.safetensors").string(), neg);
      fmt::print("  wrote {}/nibble.latent; the same run from the CLI (same noise, same result):\n    nibble run {} "
                 "--context {}/pos.safetensors --negative {}/neg.safetensors --width {} --height {} --seed {} --steps {} "
                 "--cfg {} -o out.latent\n", dir, files.quant_path, dir, dir, 8 * S, 8 * S, o->seed + 3, opt.steps, opt.cfg);
    }
    {
      const double tq = bench::now_seconds();
      const int64_t w = std::min<int64_t>(o->hidden, 1024);  // a square layer; 1024 keeps the demo short
      const nn::QualityVsNaive qv = nn::svdquant_quality_vs_naive(w, w, 256, o->rank, o->seed + 11);
      fmt::print("quantization quality, one {}×{} layer (synthetic weights and activations with outlier channels,"
                 " 256 rows), output SNR vs float:\n"
                 "  naive per-group int4 W4A4 {:.2f} dB   svdquant rank {} {:.2f} dB   svdquant rank {} + smoothing"
                 " (calibrated on 256 other rows) {:.2f} dB   ({:.1f} s)\n",
                 w, w, qv.naive_snr_db, o->rank, qv.svdquant_snr_db, o->rank,
                 qv.svdquant_smooth_snr_db, bench::now_seconds() - tq);
    }
    fmt::print("demo finished in {:.1f} s\n", bench::now_seconds() - t_start);
    return 0;
  };
});
}  // namespace
}  // namespace nibble::cli
