// `nibble demo` (what `make demo` runs): synthetic Qwen-Image block at true widths (bf16) →
// converter with the kitchen Qwen-Image-Edit rules → write → reload → run the block; prints sizes,
// fidelity (PSNR vs the dequantized baseline, SNR vs the float block) and timings.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <random>

#include "devtools/bench_util.h"
#include "command.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"
#include "devtools/qwen_image_synth.h"

namespace nibble::cli {
namespace {
namespace fs = std::filesystem;

std::string mib(uint64_t b) { return fmt::format("{:.1f} MiB", double(b) / (1 << 20)); }

const CommandRegistration reg("demo", "end-to-end demo: synthesize, quantize, reload and run a Qwen-Image block", 90,
                              [](CLI::App& app) -> RunFn {
  struct Opts {
    std::string out;
    bool keep = false;
    int64_t hidden = 3072, img_tokens = 512, txt_tokens = 128, rank = 32;
    uint64_t seed = 20261123;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--out", o->out, "directory for the checkpoints (kept); default: a temp dir, removed at the end");
  app.add_flag("--keep", o->keep, "keep the temp dir");
  app.add_option("--hidden", o->hidden, "hidden size D (multiple of 128; Qwen-Image: 3072)");
  app.add_option("--img-tokens", o->img_tokens, "image tokens")->check(CLI::PositiveNumber);
  app.add_option("--txt-tokens", o->txt_tokens, "text tokens")->check(CLI::PositiveNumber);
  app.add_option("--rank", o->rank, "svdquant low-rank R")->check(CLI::PositiveNumber);
  app.add_option("--seed", o->seed, "seed of weights and inputs");
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
    so.hidden = o->hidden;
    so.rank = o->rank;
    so.seed = o->seed;
    const nn::SynthBlockFiles files = nn::make_synth_block_files(dir, so, log);
    log(fmt::format("  synthesized in {:.1f} s, converted in {:.1f} s", files.synth_seconds, files.convert_seconds));

    const nn::Model fmodel = nn::load_checkpoint(files.float_path);
    const nn::Model qmodel = nn::load_checkpoint(files.quant_path);
    const auto nib = nn::QwenImageBlock::from_model(qmodel, "transformer_blocks.0");
    const auto deq = nib.dequantized();
    const auto flt = nn::QwenImageBlock::from_model(fmodel, "transformer_blocks.0");
    std::map<std::string, int> formats;
    int unsigned_layers = 0;
    for (const auto& n : nn::QwenImageBlock::linear_names()) {
      const nn::Linear& l = nib.linear(n);
      formats[l.format_name()]++;
      unsigned_layers += l.act_unsigned();
    }
    std::string fmts;
    for (auto& [f, c] : formats) fmts += fmt::format("{}{} × {}", fmts.empty() ? "" : ", ", c, f);
    fmt::print("reloaded block: {} ({} act_unsigned)\n", fmts, unsigned_layers);

    const uint64_t bf16_bytes = flt.stored_bytes(), nib_bytes = nib.stored_bytes();
    fmt::print("weights of the 14 linears: bf16 {}  →  nibble {}  ({:.2f}× smaller; fp32 would be {}, {:.2f}×)\n",
               mib(bf16_bytes), mib(nib_bytes), double(bf16_bytes) / double(nib_bytes), mib(2 * bf16_bytes),
               2.0 * double(bf16_bytes) / double(nib_bytes));
    fmt::print("files: bf16 {}  nibble {}\n", mib(files.float_file_bytes), mib(files.quant_file_bytes));

    const auto in = nn::synth_block_inputs(o->hidden, 128, o->img_tokens, o->txt_tokens, o->seed + 7);
    deq.prepare_dense();
    flt.prepare_dense();
    nn::QwenBlockOutputs y_nib, y_deq, y_flt;
    const double t_nib = bench::median_seconds(1, [&] { y_nib = nib.forward(in); });
    y_deq = deq.forward(in);
    const double t_flt = bench::median_seconds(1, [&] { y_flt = flt.forward(in); });
    const nn::Fidelity vs_deq = nn::compare_outputs(y_nib.img, y_deq.img);
    const nn::Fidelity vs_flt = nn::compare_outputs(y_nib.img, y_flt.img);
    const nn::Fidelity deq_flt = nn::compare_outputs(y_deq.img, y_flt.img);
    const nn::Fidelity txt_deq = nn::compare_outputs(y_nib.txt, y_deq.txt);
    const nn::Fidelity upd_deq = nn::compare_updates(y_nib.img, y_deq.img, in.img);
    const nn::Fidelity upd_flt = nn::compare_updates(y_nib.img, y_flt.img, in.img);
    fmt::print("block: {} image + {} text tokens, hidden {}, heads {}\n", o->img_tokens, o->txt_tokens, o->hidden,
               nib.config().heads);
    fmt::print("  kernel fidelity   nibble vs dequantized baseline: PSNR {:.2f} dB (image tokens), {:.2f} dB (text);"
               " PSNR over the baseline's peak-to-peak range\n", vs_deq.psnr_db, txt_deq.psnr_db);
    fmt::print("                    on the block update (output − input) alone: PSNR {:.2f} dB, SNR {:.2f} dB\n",
               upd_deq.psnr_db, upd_deq.snr_db);
    fmt::print("  quantization      nibble vs float block: SNR {:.2f} dB (image tokens); dequantized vs float: SNR {:.2f} dB\n",
               vs_flt.snr_db, deq_flt.snr_db);
    fmt::print("                    on the block update: nibble vs float SNR {:.2f} dB\n", upd_flt.snr_db);
    fmt::print("  time              nibble {:.3f} s   float (fp32 math on the bf16 weights, linear_f32) {:.3f} s   "
               "→ {:.2f}× (second run of each; `nibble bench --op block` for 1024+256 tokens)\n",
               t_nib, t_flt, t_flt / t_nib);
    {
      const double tq = bench::now_seconds();
      const int64_t w = std::min<int64_t>(o->hidden, 1024);  // a square layer; 1024 keeps the demo short
      const nn::QualityVsNaive qv = nn::svdquant_quality_vs_naive(w, w, 256, o->rank, o->seed + 11);
      fmt::print("quantization quality, one {}×{} layer (synthetic weights and activations with outlier channels,"
                 " 256 rows), output SNR vs float:\n"
                 "  naive per-group int4 W4A4 {:.2f} dB   svdquant rank {} {:.2f} dB   svdquant rank {} + smoothing"
                 " (calibrated on the rows) {:.2f} dB   ({:.1f} s)\n",
                 w, w, qv.naive_snr_db, o->rank, qv.svdquant_snr_db, o->rank,
                 qv.svdquant_smooth_snr_db, bench::now_seconds() - tq);
    }
    fmt::print("demo finished in {:.1f} s\n", bench::now_seconds() - t_start);
    return 0;
  };
});
}  // namespace
}  // namespace nibble::cli
