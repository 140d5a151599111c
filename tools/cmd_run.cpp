// `nibble run CKPT --context C [--negative N] [--latent X | --width W --height H] [--seed S] [--ref R]...
//  [--steps S] [--cfg G] [--shift F | --model-sampling-default] [--scheduler simple|normal]
//  [--denoise D] [--baseline dequantized] [--lora FILE[:S]]... -o OUT.latent`
// ComfyUI's KSampler (euler) with a Qwen-Image(-Edit) model: sample_flow (qwen_image.h) around
// QwenImageTransformer::forward; latents and conditioning in the files of latent.h. Every input is
// read and checked before the first step; the output is written atomically at the end.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "command.h"
#include "nibble/isa.h"
#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {
namespace fs = std::filesystem;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Repeats a batch-1 tensor to batch B, dtype kept (ComfyUI broadcasts a conditioning over the batch).
Tensor repeat_batch(const Tensor& t, int64_t B, const std::string& what) {
  if (!t.defined() || t.size(0) == B) return t;
  if (t.size(0) != 1)
    throw Error(fmt::format("{}: batch {} does not match the latent batch {} (use batch 1 or {})", what, t.size(0), B, B));
  Shape s = t.shape();
  s[0] = B;
  Tensor out = Tensor::empty(t.dtype(), s);
  const auto* src = static_cast<const unsigned char*>(t.raw());
  auto* dst = static_cast<unsigned char*>(out.mutable_raw());
  for (int64_t b = 0; b < B; ++b) std::copy(src, src + t.nbytes(), dst + size_t(b) * t.nbytes());
  return out;
}

const CommandRegistration reg(
    "run", "sample a latent with a Qwen-Image(-Edit) checkpoint (ComfyUI's KSampler, euler, flow matching)", 42,
    [](CLI::App& app) -> RunFn {
      struct Opts {
        std::string ckpt, context, negative, latent, out, baseline, scheduler = "simple";
        std::vector<std::string> refs, loras;
        bool lora_partial = false;
        int64_t width = 0, height = 0, batch = 1;
        uint64_t seed = 0;
        int steps = 20;
        double cfg = 2.5, shift = 3.1, denoise = 1.0;
        bool model_default = false;
      };
      auto o = std::make_shared<Opts>();
      app.add_option("CKPT", o->ckpt, "Qwen-Image(-Edit) transformer checkpoint (file, index .json or shard dir)")->required();
      app.add_option("--context", o->context, "positive conditioning (.safetensors with 'context' (B, L, 3584); "
                                              "nibble.save_conditioning)")->required();
      app.add_option("--negative", o->negative, "negative conditioning (enables classifier-free guidance)");
      app.add_option("--latent", o->latent, "input .latent (ComfyUI SaveLatent); with --denoise < 1 it is the image "
                                            "to start from, at denoise 1 only its shape matters");
      app.add_option("--width", o->width, "image width in pixels (multiple of 16): an empty latent of width/8")->check(CLI::PositiveNumber);
      app.add_option("--height", o->height, "image height in pixels (multiple of 16)")->check(CLI::PositiveNumber);
      app.add_option("--batch", o->batch, "batch size of the empty latent (default 1)")->check(CLI::PositiveNumber);
      app.add_option("--seed", o->seed, "noise seed (nibble's own generator; not torch's: see docs/sampling.md)");
      app.add_option("--ref", o->refs, "reference latent (.latent) for edit models; repeatable");
      app.add_option("--steps", o->steps, "sampling steps (default 20)")->check(CLI::PositiveNumber);
      app.add_option("--cfg", o->cfg, "classifier-free guidance scale (default 2.5; used with --negative)");
      app.add_option("--shift", o->shift, "ModelSamplingAuraFlow shift (default 3.1, ComfyUI's Qwen-Image template)");
      app.add_flag("--model-sampling-default", o->model_default,
                   "no ModelSampling node: the model's own sampling (ModelSamplingFlux, shift 1.15); ignores --shift");
      app.add_option("--scheduler", o->scheduler, "simple (default) | normal");
      app.add_option("--denoise", o->denoise, "denoise strength in (0, 1] (default 1)");
      app.add_option("--baseline", o->baseline, "'dequantized': every quantized layer replaced by its dequantized float layer");
      app.add_option("--lora", o->loras, "LoRA applied at load, FILE[:STRENGTH] (default 1); repeatable, in order "
                                         "(nothing is written: docs/lora.md)");
      app.add_flag("--lora-partial", o->lora_partial, "skip LoRA modules that match no layer (default: an error)");
      app.add_option("-o,--output", o->out, "output .latent (written atomically)")->required();
      return [o]() -> int {
        const bool quiet = globals().quiet;
        const double t_start = now_s();
        // ---- options (before touching any file)
        if (!o->baseline.empty() && o->baseline != "dequantized")
          throw Error(fmt::format("--baseline {}: unknown (expected 'dequantized')", o->baseline));
        if (!o->latent.empty() && (o->width || o->height))
          throw Error("run: give either --latent or --width/--height, not both");
        if (o->latent.empty() && (!o->width || !o->height))
          throw Error("run: give --latent X or both --width W and --height H (pixels)");
        if (o->latent.empty() && (o->width % 16 || o->height % 16))
          throw Error(fmt::format("run: --width {} / --height {} must be multiples of 16 (ComfyUI's empty latent: "
                                  "pixels / 8, patches of 2)", o->width, o->height));
        nn::SamplerOptions so;
        so.steps = o->steps;
        so.cfg = o->cfg;
        so.shift = o->shift;
        so.denoise = o->denoise;
        so.scheduler = o->scheduler;
        so.model_sampling_default = o->model_default;
        const std::vector<float> sigmas = nn::flow_sigmas(so);  // validates the sampler options
        std::vector<LoraSpec> lora_specs;
        for (const auto& l : o->loras) {
          lora_specs.push_back(parse_lora_spec(l));
          if (!fs::is_regular_file(lora_specs.back().path))
            throw Error(fmt::format("--lora {}: no such file '{}'", l, lora_specs.back().path));
        }
        {
          const fs::path parent = fs::absolute(fs::path(o->out)).parent_path();
          if (!fs::is_directory(parent))
            throw Error(fmt::format("{}: the output directory {} does not exist", o->out, parent.string()));
        }
        // ---- inputs
        nn::QwenImageLoadOptions lo;
        lo.dequantized_baseline = o->baseline == "dequantized";
        const double t_load = now_s();
        LoraApplyStats lora_stats;
        const nn::QwenImageTransformer model =
            lora_specs.empty() ? nn::QwenImageTransformer::load(o->ckpt, lo)
                               : nn::QwenImageTransformer::from_model(
                                     nn::Model::load(o->ckpt, lora_specs, o->lora_partial, &lora_stats), lo);
        const nn::QwenImageConfig& cfg = model.config();
        const double load_s = now_s() - t_load;
        Tensor latent;
        if (!o->latent.empty()) {
          latent = load_latent(o->latent, cfg.out_channels);
          if (latent.dim() == 4) latent = latent.reshape({latent.size(0), latent.size(1), 1, latent.size(2), latent.size(3)});
        } else {
          latent = Tensor::zeros(DType::F32, {o->batch, cfg.out_channels, 1, o->height / 8, o->width / 8});
        }
        const int64_t B = latent.size(0);
        Conditioning pos = load_conditioning(o->context, cfg.joint_dim), neg;
        const bool has_neg = !o->negative.empty();
        if (has_neg) neg = load_conditioning(o->negative, cfg.joint_dim);
        std::vector<Tensor> extra_refs;
        for (const auto& r : o->refs) extra_refs.push_back(load_latent(r, cfg.out_channels));
        auto prepare = [&](Conditioning& c, const std::string& file) {
          c.context = repeat_batch(c.context, B, file + ": context");
          c.attention_mask = repeat_batch(c.attention_mask, B, file + ": attention_mask");
          std::vector<Tensor> refs = c.reference_latents;
          refs.insert(refs.end(), extra_refs.begin(), extra_refs.end());
          c.reference_latents.clear();
          for (size_t i = 0; i < refs.size(); ++i)  // the model sees normalised references (ComfyUI extra_conds)
            c.reference_latents.push_back(repeat_batch(latent_process_in(refs[i]), B, fmt::format("reference latent {}", i)));
        };
        prepare(pos, o->context);
        if (has_neg) prepare(neg, o->negative);
        const Tensor noise = nn::flow_noise(latent.shape(), o->seed);

        if (!quiet) {
          fmt::print("model      {}: {} blocks, hidden {}, {:.1f} MiB of weights{} (loaded in {:.1f} s)\n", o->ckpt,
                     cfg.blocks, cfg.hidden, double(model.stored_bytes()) / (1 << 20),
                     lo.dequantized_baseline ? ", dequantized baseline" : "", load_s);
          for (const auto& l : lora_specs)
            fmt::print("lora       {} (strength {})\n", l.path, l.strength);
          if (!lora_specs.empty())
            fmt::print("lora       {} layers changed ({} svdquant, {} awq requantized, {} float)\n", lora_stats.layers,
                       lora_stats.svdquant_layers, lora_stats.awq_layers, lora_stats.float_layers);
          fmt::print("latent     {} ({}), context {} tokens{}{}, {} reference latent(s)\n", shape_str(latent.shape()),
                     o->latent.empty() ? "empty" : o->latent, pos.context.size(1),
                     pos.attention_mask.defined() ? " (masked)" : "",
                     has_neg ? fmt::format(", negative {} tokens", neg.context.size(1)) : std::string(),
                     pos.reference_latents.size());
          std::string ss;
          for (float s : sigmas) ss += fmt::format("{}{:.4f}", ss.empty() ? "" : " ", s);
          fmt::print("sampler    euler, {} {} steps, {}, cfg {}{}, denoise {}, seed {}\n", so.scheduler,
                     sigmas.size() ? sigmas.size() - 1 : 0,
                     so.model_sampling_default ? std::string("model sampling default (flux shift 1.15)")
                                               : fmt::format("shift {}", so.shift),
                     so.cfg, has_neg ? "" : " (no negative: one model call per step)", so.denoise, o->seed);
          fmt::print("sigmas     {}\n", ss);
          fmt::print("isa        {} ({} threads)\n", isa_name(active_isa()), num_threads());
          std::fflush(stdout);
        }

        // ---- sampling
        nn::QwenImageTimings tm;
        int calls = 0;
        const nn::DenoiseFn model_fn = nn::qwen_image_denoiser(model, pos, neg, &tm);
        nn::DenoiseFn fn = [&](const Tensor& x, double sigma, bool negative) {
          ++calls;
          return model_fn(x, sigma, negative);
        };
        const bool tty = isatty(fileno(stderr)) && !globals().no_progress && !quiet;
        double step_sum = 0;
        auto on_step = [&](int i, int n, double sec) {
          step_sum += sec;
          const double avg = step_sum / (i + 1), eta = avg * (n - i - 1);
          if (tty) {
            const int w = 30, fill = int(double(i + 1) / n * w);
            fmt::print(stderr, "\r\033[K[{}{}] step {}/{}  {:.2f} s/step  ETA {:.0f} s", std::string(size_t(fill), '#'),
                       std::string(size_t(w - fill), '.'), i + 1, n, avg, eta);
            std::fflush(stderr);
          } else if (!quiet && !globals().no_progress) {
            fmt::print("step {}/{}  {:.2f} s\n", i + 1, n, sec);
            std::fflush(stdout);
          }
        };
        const Tensor result = nn::sample_flow(fn, latent, noise, so, has_neg, on_step);
        if (tty) fmt::print(stderr, "\r\033[K");
        save_latent(o->out, result);
        if (!quiet) {
          const int steps = sigmas.size() ? int(sigmas.size()) - 1 : 0;
          fmt::print("sampled    {} steps, {} model calls in {:.1f} s: {:.2f} s/step (linear {:.1f} s, attention {:.1f} s, "
                     "other {:.1f} s)\n", steps, calls, step_sum, steps ? step_sum / steps : 0.0, tm.linear, tm.attention,
                     tm.other);
          fmt::print("wrote      {} {} (ComfyUI LoadLatent → VAE Decode) in {:.1f} s total\n", o->out,
                     shape_str(result.shape()), now_s() - t_start);
        }
        return 0;
      };
    });
}  // namespace
}  // namespace nibble::cli
