// `nibble convert IN -o OUT [--preset qwen-image] [--tensor-type REGEX=FORMAT[:opt=v,...]]...
//  [--exclude REGEX] [--rank 32] [--group-size 64] [--layout natural|tile] [--calib STATS]
//  [--svd randomized|exact] [--refine N] [--allow-requantize] [--dry-run] [--json REPORT] [--mem MiB]`
// and `nibble synth` (the synthetic bf16 Qwen-Image checkpoint used to test and time it).
// One line per tensor (llama-quantize style), a progress bar with MB/s and ETA on a TTY, a summary.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>

#include <fmt/format.h>

#include "command.h"
#include "nibble/convert.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

double mib(uint64_t b) { return double(b) / (1024.0 * 1024.0); }

void print_plan(const ConvertPlan& p, bool verbose) {
  fmt::print("{:>5}  {:<60} {:<14} {:>14}  {:>10} → {:>9}\n", "#", "layer", "format", "shape", "MiB", "MiB");
  int i = 0;
  for (const auto& l : p.layers)
    fmt::print("{:>5}  {:<60} {:<14} {:>14}  {:>10.2f} → {:>9.2f}{}{}{}\n", ++i, l.name, l.format,
               fmt::format("{}x{}", l.N, l.K), mib(l.bytes_before), mib(l.bytes_after),
               l.group.empty() ? "" : fmt::format("  (shares its input with {} layers)", l.group.size() - 1),
               l.act_unsigned ? "  act_unsigned" : "", l.calib_key.empty() ? "" : "  calibrated");
  // Skipped tensors, by reason (all of them with -v).
  std::map<std::string, std::vector<std::string>> by_reason;
  for (const auto& s : p.skipped) by_reason[s.reason].push_back(s.name);
  if (!by_reason.empty()) fmt::print("skipped (not linear layers):\n");
  for (const auto& [why, names] : by_reason) {
    std::string list;
    for (size_t k = 0; k < names.size() && (verbose || k < 3); ++k) list += (k ? ", " : "") + names[k];
    if (!verbose && names.size() > 3) list += fmt::format(", … (-v lists all)");
    fmt::print("  {:>5} × {}: {}\n", names.size(), why, list);
  }
  for (const auto& n : p.notes) fmt::print("note: {}\n", n);
  fmt::print("linear layers: {} found, {} quantized, {} left as they are; tensors: {} in the output, {} copied unchanged; "
             "{:.1f} MiB → {:.1f} MiB; output file {} bytes ({:.1f} MiB)\n",
             p.linear_layers, p.layers.size(), p.kept_layers, p.tensors_total, p.passthrough_tensors, mib(p.bytes_in),
             mib(p.bytes_out), p.file_size, mib(p.file_size));
}

void print_warnings(const ConvertPlan& p) {
  for (const auto& w : p.warnings) fmt::print(stderr, "warning: {}\n", w);
}

const CommandRegistration kConvert{
    "convert", "quantize float linears to kitchen-native awq_w4a16 / svdquant_w4a4 (CPU, streaming)", 20,
    [](CLI::App& app) -> RunFn {
      struct Args {
        std::string in, out, json, layout = "natural", svd = "randomized";
        std::vector<std::string> rules;
        bool dry_run = false;
        double mem_mib = 2048, shard_mib = 0;
        ConvertOptions o;
      };
      auto a = std::make_shared<Args>();
      app.fallthrough();
      app.add_option("in", a->in, "input: a .safetensors file, a *.safetensors.index.json or a directory of shards")->required();
      app.add_option("-o,--output", a->out, "output .safetensors file");
      app.add_option("--preset", a->o.preset, "layer → format map: qwen-image (the kitchen Qwen-Image-Edit map), flux (FLUX.1), wan (Wan 2.x)");
      app.add_option("--share", a->o.share,
                     "REGEX: layers whose names are equal up to the matched part read the same input (one smooth "
                     "and proj_down), e.g. '(query|key|value)$'");
      app.add_option("--search", a->o.search,
                     "calibrated search: full (α/β grid, proj_up refit, awq asymmetric clip + scale refit) or legacy "
                     "(the earlier searches, for comparisons)")->capture_default_str();
      app.add_flag("--gptq", a->o.gptq,
                   "GPTQ on the int4 weights from the calibration sample rows (svdquant: on the residual W_s - L; "
                   "awq: on W): column-by-column rounding with error feedback through H = X^T X");
      app.add_option("--gptq-damp", a->o.gptq_damp, "ridge of the calibration Gram matrices (GPTQ, noise-aware residual): lambda = max(damp * K / sample_rows, 0.01) * mean(diag H)")->capture_default_str();
      app.add_flag("--strict", a->o.strict, "calibration coverage warnings (layers without statistics, statistics without a layer) are errors");
      app.add_flag("--force", a->o.force, "accept act_unsigned on layers whose calibration shows inputs below -0.171875 (warning only)");
      app.add_option("--tensor-type", a->rules,
                     "REGEX=FORMAT[:opt=v,...] rule (first match wins, before the preset); FORMAT awq_w4a16|svdquant_w4a4|keep; "
                     "opts group_size, rank, act_unsigned, layout, svd, refine");
      app.add_option("--exclude", a->o.exclude, "REGEX: matching layers are copied unchanged");
      app.add_option("--key-style", a->o.key_style,
                     "svdquant side tensor names: comfyui (smooth_factor, proj_down, proj_up: ComfyUI's loaders) or "
                     "kitchen (weight_smooth_factor, weight_proj_down, weight_proj_up: comfy-kitchen's serializer)")
          ->capture_default_str();
      app.add_option("--rank", a->o.rank, "svdquant low-rank R")->capture_default_str();
      app.add_option("--group-size", a->o.group_size, "awq group size along K")->capture_default_str();
      app.add_option("--layout", a->layout, "svdquant storage: natural|tile")->capture_default_str();
      app.add_option("--calib", a->o.calib_path, "activation statistics (safetensors, docs/convert.md)");
      app.add_option("--svd", a->svd, "randomized|exact")->capture_default_str();
      app.add_option("--refine", a->o.refine_iterations, "svdquant refinement iterations L ← SVD_R(W − Q(W − L))")->capture_default_str();
      app.add_flag("--allow-requantize", a->o.allow_requantize, "allow matching already-quantized layers");
      app.add_flag("--dry-run", a->dry_run, "print the plan and the output size; write nothing");
      app.add_option("--json", a->json, "write a JSON report (per-layer errors, totals)");
      app.add_option("--mem", a->mem_mib, "working-memory budget for in-flight layers, MiB")->capture_default_str();
      app.add_option("--shard-size", a->shard_mib,
                     "split the output into shards of at most this many MiB (OUT-0000i-of-0000n.safetensors + "
                     "OUT.safetensors.index.json); 0 = one file")->capture_default_str();
      return [a]() {
        ConvertOptions o = a->o;
        for (const auto& r : a->rules) o.rules.push_back(parse_convert_rule(r));
        if (a->layout != "natural" && a->layout != "tile") throw Error(fmt::format("--layout {}: expected natural or tile", a->layout));
        o.tile_layout = a->layout == "tile";
        if (a->svd != "randomized" && a->svd != "exact") throw Error(fmt::format("--svd {}: expected randomized or exact", a->svd));
        o.svd = a->svd == "exact" ? SvdMethod::Exact : SvdMethod::Randomized;
        if (a->mem_mib <= 0) throw Error("--mem must be positive");
        o.mem_budget = uint64_t(a->mem_mib * 1024 * 1024);
        if (a->shard_mib < 0) throw Error("--shard-size must be >= 0");
        o.shard_size = uint64_t(a->shard_mib * 1024 * 1024);
        if (o.preset.empty() && o.rules.empty())
          throw Error("convert: nothing to do — give --preset qwen-image|flux|wan and/or --tensor-type REGEX=FORMAT rules");
        const bool quiet = globals().quiet;
        if (a->dry_run) {
          ConvertPlan p = plan_conversion(a->in, o);
          print_warnings(p);
          print_plan(p, globals().verbose);
          if (!a->json.empty()) {
            ConvertReport r;
            r.plan = p;
            std::ofstream(a->json) << convert_report_json(r) << "\n";
          }
          return 0;
        }
        if (a->out.empty()) throw Error("convert: -o OUT is required (or use --dry-run)");
        {  // warnings before the long part (the plan is cheap: no tensor data is read)
          ConvertPlan p = plan_conversion(a->in, o);
          print_warnings(p);
          if (!quiet) for (const auto& n : p.notes) fmt::print("note: {}\n", n);
        }
        install_convert_signal_cleanup();  // Ctrl-C / SIGTERM: remove the temporary output, exit 130 / 143
        const bool tty = isatty(fileno(stderr)) && !globals().no_progress && !quiet;
        auto progress = [&](const ConvertProgress& p) {
          if (tty) fmt::print(stderr, "\r\033[K");
          if (!quiet) {
            std::string err = p.rel_error >= 0 ? fmt::format("  err {:.4f}", p.rel_error) : "";
            if (p.format != "comfy_quant" || globals().verbose)
              fmt::print("[{:>5}/{:>5}] {:<64} {:>20} {:<14} {:>9.2f} MiB → {:>8.2f} MiB{}\n", p.index, p.total, p.name,
                         shape_str(p.shape), p.format.empty() ? "copy" : p.format,
                         mib(p.bytes_before ? p.bytes_before : p.bytes_after), mib(p.bytes_after), err);
          }
          if (tty) {
            const double frac = p.bytes_total ? double(p.bytes_done) / double(p.bytes_total) : 1.0;
            const double rate = p.elapsed_seconds > 0 ? mib(p.bytes_done) / p.elapsed_seconds : 0;
            const double eta = rate > 0 ? (mib(p.bytes_total) - mib(p.bytes_done)) / rate : 0;
            const int w = 30, fill = int(frac * w);
            fmt::print(stderr, "[{}{}] {:5.1f}%  {:.1f} MB/s  ETA {:.0f}s", std::string(size_t(fill), '#'),
                       std::string(size_t(w - fill), '.'), 100 * frac, rate * 1.048576, eta);
          }
          std::fflush(stdout);
        };
        ConvertReport r = convert_checkpoint(a->in, a->out, o, progress);
        if (tty) fmt::print(stderr, "\r\033[K");
        if (!quiet) {
          if (globals().verbose)
            for (const auto& l : r.layers)
              if (l.info.calibrated)
                fmt::print("  {:<60} {:<14} α {:>5} β {:>5}{} SNR {:6.2f} → {:6.2f} dB ({} rows) {:.2f} s\n", l.name, l.format,
                           l.info.alpha >= 0 ? fmt::format("{:.2f}", l.info.alpha) : "-",
                           l.info.beta >= 0 ? fmt::format("{:.2f}", l.info.beta) : "-", l.info.alpha_on_edge ? " (edge)" : "",
                           l.info.snr_before_db, l.info.snr_after_db, l.info.sample_rows, l.seconds);
          fmt::print("{}", convert_summary_text(r));
          fmt::print("{} threads → {}\n", num_threads(), a->out);
        }
        print_warnings(r.plan);
        if (!a->json.empty()) std::ofstream(a->json) << convert_report_json(r) << "\n";
        return 0;
      };
    }};

// `nibble synth OUT [--blocks B] [--hidden D] [--mlp-hidden F] [--joint-dim J] [--no-top-level]`:
// a seeded synthetic bf16 Qwen-Image checkpoint (nibble/synth.h) — the converter's test input.
const CommandRegistration kSynth{
    "synth", "write a seeded synthetic bf16 Qwen-Image checkpoint (converter / demo input)", 91,
    [](CLI::App& app) -> RunFn {
      auto path = std::make_shared<std::string>();
      auto o = std::make_shared<SynthCheckpointOptions>();
      auto no_top = std::make_shared<bool>(false);
      app.add_option("out", *path, "output .safetensors path")->required();
      app.add_option("--blocks", o->blocks, "transformer blocks")->capture_default_str();
      app.add_option("--hidden", o->hidden, "hidden size D")->capture_default_str();
      app.add_option("--mlp-hidden", o->mlp_hidden, "MLP width (0 = 4·D)")->capture_default_str();
      app.add_option("--joint-dim", o->joint_dim, "txt_in input width (0 = D; real model 3584)")->capture_default_str();
      app.add_option("--head-dim", o->head_dim, "attention head width")->capture_default_str();
      app.add_option("--seed", o->seed, "random seed")->capture_default_str();
      app.add_option("--prefix", o->prefix, "prefix of every name, e.g. model.diffusion_model.");
      app.add_flag("--no-top-level", *no_top, "only the transformer blocks");
      return [path, o, no_top]() {
        o->top_level = !*no_top;
        const uint64_t bytes = write_synth_qwen_image_checkpoint(*path, *o);
        if (!globals().quiet) fmt::print("wrote {} ({:.1f} MiB)\n", *path, mib(bytes));
        return 0;
      };
    }};

}  // namespace
}  // namespace nibble::cli
