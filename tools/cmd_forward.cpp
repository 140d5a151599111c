// `nibble forward CKPT --latent X --context C [--mask M] [--ref R]... --timestep T -o OUT`: one raw
// call of the whole Qwen-Image transformer (nn::QwenImageTransformer), its prediction written to OUT.
//
// Inputs are safetensors files:
//   --latent X   a ComfyUI .latent file ("latent_tensor" + version marker, raw VAE space: normalised
//                here with the Wan 2.1 latent format, as ComfyUI's process_latent_in), or a file
//                with "latent" (or "samples", or a single tensor) already in the model's space:
//                (B, 16, H, W) or (B, 16, T, H, W), any float dtype
//   --context C  tensor "context" (B, L, joint_dim), optionally "attention_mask" (B, L) and
//                "reference_latents.<i>" (raw space; used when no --ref is given) — the
//                conditioning files of nibble/latent.h
//   --mask M     tensor "attention_mask" (or "mask", or the only tensor); overrides C's
//   --ref R      reference latents of edit models (same rules as --latent), in order
// The prediction is in the model's space (a velocity), not a latent to decode.
// Output: OUT holds "prediction" (fp32, the latent's shape); written to a temp file and renamed.
#include <fmt/format.h>
#include <sys/resource.h>

#include "devtools/bench_util.h"
#include "command.h"
#include "nibble/isa.h"
#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

Tensor read_tensor(const std::string& path, std::initializer_list<const char*> names, const char* what,
                   bool required = true) {
  std::shared_ptr<SafetensorsFile> f;
  f = SafetensorsFile::open(path);
  for (const char* n : names)
    if (f->contains(n)) return f->get(n);
  if (f->tensors().size() == 1 && required) return f->get(f->tensors()[0].name);
  if (!required) return {};
  throw Error(fmt::format("{}: no {} tensor: expected one named '{}' (or a file with a single tensor); it has {}",
                          path, what, *names.begin(), f->tensors().size()));
}

// A latent input: a ComfyUI `.latent` file ("latent_tensor" + its version marker; raw VAE space)
// is read with load_latent and normalised with latent_process_in (what ComfyUI hands the model);
// any other file's "latent" / "samples" / only tensor is taken as the model's input as is.
Tensor read_latent(const std::string& path, int64_t channels) {
  if (SafetensorsFile::open(path)->contains("latent_tensor")) return latent_process_in(load_latent(path, channels));
  return read_tensor(path, {"latent", "samples"}, "latent");
}

void check_latent(const Tensor& t, const std::string& path, const nn::QwenImageConfig& c) {
  const int64_t C = c.in_channels / 4;
  if (t.dim() != 4 && t.dim() != 5)
    throw Error(fmt::format("{}: latent: expected (B, {}, H, W) or (B, {}, T, H, W), got {}", path, C, C,
                            shape_str(t.shape())));
  if (t.size(1) != C)
    throw Error(fmt::format("{}: latent: expected {} channels (dim 1) for this checkpoint, got {} (shape {})", path, C,
                            t.size(1), shape_str(t.shape())));
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) < 1) throw Error(fmt::format("{}: latent: empty shape {}", path, shape_str(t.shape())));
  if (t.dtype() != DType::F32 && t.dtype() != DType::BF16 && t.dtype() != DType::F16 && t.dtype() != DType::F64)
    throw Error(fmt::format("{}: latent: expected a float dtype, got {}", path, dtype_name(t.dtype())));
}

const CommandRegistration reg(
    "forward", "one raw call of a whole Qwen-Image transformer: the model's prediction for a latent", 40,
    [](CLI::App& app) -> RunFn {
      struct Opts {
        std::string ckpt, latent, context, mask, output;
        std::vector<std::string> refs;
        std::string attention = "auto";
        double timestep = 0;
        int repeats = 1;
      };
      auto o = std::make_shared<Opts>();
      app.add_option("CKPT", o->ckpt, "Qwen-Image transformer checkpoint (.safetensors, index .json, shard dir)")
          ->required();
      app.add_option("--latent", o->latent, "safetensors with 'latent' (or 'latent_tensor', or one tensor)")
          ->required();
      app.add_option("--context", o->context, "safetensors with 'context' (B, L, joint_dim) [+ 'attention_mask']")
          ->required();
      app.add_option("--mask", o->mask, "safetensors with 'attention_mask' (B, L): ints 0 = masked; floats = bias");
      app.add_option("--ref", o->refs, "reference latent (edit models), repeatable, in order");
      app.add_option("--timestep", o->timestep, "the model's timestep (Qwen-Image: sigma in [0, 1])")->required();
      app.add_option("-o,--output", o->output, "output safetensors (tensor 'prediction', fp32)")->required();
      app.add_option("--attention", o->attention, "joint attention: auto (bf16 vdpbf16ps where available), fp32, bf16")
          ->check(CLI::IsMember({"auto", "fp32", "bf16"}));
      app.add_option("-r,--repeats", o->repeats, "timed runs (median reported)")->check(CLI::PositiveNumber);
      return [o]() -> int {
        nn::QwenImageLoadOptions lo;
        lo.attention = o->attention;
        const auto model = nn::QwenImageTransformer::load(o->ckpt, lo);
        const nn::QwenImageConfig& c = model.config();
        nn::QwenImageInputs in;
        in.latent = read_latent(o->latent, c.in_channels / 4);
        check_latent(in.latent, o->latent, c);
        in.context = read_tensor(o->context, {"context"}, "context");
        {
          const Tensor& t = in.context;
          if (t.dim() != 3 || t.size(2) != c.joint_dim || t.size(1) < 1)
            throw Error(fmt::format("{}: context: expected (B, L, {}) (the checkpoint's txt_in width), got {}",
                                    o->context, c.joint_dim, shape_str(t.shape())));
          if (t.size(0) != in.latent.size(0))
            throw Error(fmt::format("{}: context batch {} != latent batch {} ({})", o->context, t.size(0),
                                    in.latent.size(0), o->latent));
        }
        std::string mask_file = o->context;
        in.attention_mask = read_tensor(o->context, {"attention_mask"}, "attention_mask", false);
        if (!o->mask.empty()) {
          in.attention_mask = read_tensor(o->mask, {"attention_mask", "mask"}, "attention_mask");
          mask_file = o->mask;
        }
        if (in.attention_mask.defined()) {
          const Tensor& m = in.attention_mask;
          const int64_t B = in.context.size(0), L = in.context.size(1);
          if (m.size(-1) != L || (m.numel() != L && m.numel() != B * L))
            throw Error(fmt::format("{}: attention_mask: expected ({}, {}) matching the context, got {}", mask_file, B,
                                    L, shape_str(m.shape())));
        }
        for (const auto& r : o->refs) {
          in.ref_latents.push_back(read_latent(r, c.in_channels / 4));
          check_latent(in.ref_latents.back(), r, c);
          if (in.ref_latents.back().size(0) != in.latent.size(0))
            throw Error(fmt::format("{}: reference batch {} != latent batch {}", r, in.ref_latents.back().size(0),
                                    in.latent.size(0)));
        }
        if (o->refs.empty()) {  // a conditioning file's reference latents (raw space, as ComfyUI stores them)
          const auto cf = SafetensorsFile::open(o->context);
          for (int i = 0; cf->contains("reference_latents." + std::to_string(i)); ++i) {
            Tensor r = cf->get("reference_latents." + std::to_string(i));
            check_latent(r, o->context + " (reference_latents." + std::to_string(i) + ")", c);
            in.ref_latents.push_back(latent_process_in(r.to(DType::F32)));
          }
        }
        in.timestep = Tensor::empty(DType::F32, {1});
        in.timestep.mutable_data<float>()[0] = float(o->timestep);
        Tensor y;
        nn::QwenImageTimings tm;
        const double t = bench::median_seconds(o->repeats, [&] {
          tm = {};
          y = model.forward(in, &tm);
        });
        save_safetensors(o->output, {{"prediction", y}}, {{"nibble", "forward"}});
        if (!globals().quiet) {
          fmt::print("model      {} blocks, hidden {} ({} heads x {}), joint {}, {}{}\n", c.blocks, c.hidden, c.heads,
                     c.head_dim, c.joint_dim, c.index_timestep_zero ? "index_timestep_zero" : "index refs",
                     c.addition_t_embedding ? ", addition_t_embedding" : "");
          fmt::print("weights    {:.1f} MiB stored\n", double(model.stored_bytes()) / (1 << 20));
          fmt::print("latent     {} {}{}\n", dtype_name(in.latent.dtype()), shape_str(in.latent.shape()),
                     in.ref_latents.empty() ? "" : fmt::format(" + {} reference(s)", in.ref_latents.size()));
          fmt::print("time       {:.3f} s (median of {}): linear {:.3f}, attention {:.3f}, other {:.3f}\n", t,
                     o->repeats, tm.linear, tm.attention, tm.other);
          fmt::print("attention  {}\n", model.attention_path());
          fmt::print("isa        {} ({} threads)\n", isa_name(active_isa()), num_threads());
          rusage ru{};
          getrusage(RUSAGE_SELF, &ru);
          fmt::print("peak RSS   {:.0f} MiB (weights stored: {:.0f} MiB)\n", double(ru.ru_maxrss) / 1024.0,
                     double(model.stored_bytes()) / (1 << 20));
          fmt::print("wrote      {} (tensor 'prediction', F32 {})\n", o->output, shape_str(y.shape()));
        }
        return 0;
      };
    });

}  // namespace
}  // namespace nibble::cli
