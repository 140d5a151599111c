// `nibble linear CKPT LAYER --input IN.safetensors [--output OUT.safetensors] [-r N]`: run one layer
// of a checkpoint on the tensor `x` of IN (any leading shape), write `y` (fp32).
#include <fmt/format.h>

#include "devtools/bench_util.h"
#include "kernels/awq_w4a16_kernels.h"
#include "command.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {
const CommandRegistration reg("linear", "run one layer of a checkpoint on an input tensor", 30, [](CLI::App& app) -> RunFn {
  struct Opts {
    std::string ckpt, layer, input, output, input_name = "x";
    int repeats = 1;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("CKPT", o->ckpt, "checkpoint (.safetensors, index .json, or shard directory)")->required();
  app.add_option("LAYER", o->layer, "layer name (with or without 'model.diffusion_model.')")->required();
  app.add_option("--input", o->input, "safetensors file holding the input tensor")->required();
  app.add_option("--input-name", o->input_name, "name of the input tensor in --input (default x)");
  app.add_option("--output", o->output, "write the result as tensor 'y' (fp32) to this safetensors file");
  app.add_option("-r,--repeats", o->repeats, "timed runs (median reported)")->check(CLI::PositiveNumber);
  return [o]() -> int {
    const bench::ProcessMemory m0 = bench::process_memory();
    const nn::Model model = nn::load_checkpoint(o->ckpt);
    const bench::ProcessMemory m1 = bench::process_memory();
    const nn::Linear& l = model.linear(o->layer);
    const auto in = SafetensorsFile::open(o->input);
    if (!in->contains(o->input_name))
      throw Error(fmt::format("{}: no tensor '{}' (the input must be named '{}', or pass --input-name)", o->input,
                              o->input_name, o->input_name));
    const Tensor x = in->get(o->input_name);
    l.prepare_dense();
    Tensor y;
    const double t = bench::median_seconds(o->repeats, [&] { y = l.forward(x); });
    if (!globals().quiet) {
      fmt::print("layer      {}\n", l.name());
      fmt::print("format     {}{}\n", l.format_name(), l.act_unsigned() ? " (act_unsigned)" : "");
      fmt::print("path       {}\n", nn::linear_path_name(l.path()));
      if (l.path() == nn::LinearPath::AwqW4A16 && l.in_features() > 0) {
        // the runtime feeds fp32 activations to the prepared weights
        const QuantizedLayer& q = l.layer();
        const DType sdt = q.params.count("weight_scale") ? q.params.at("weight_scale").dtype() : DType::BF16;
        fmt::print("kernel     {}\n", kernels::awq::path_name(active_isa(), x.numel() / l.in_features(), q.group_size,
                                                              DType::F32, sdt, true));
      }
      fmt::print("weight     ({}, {}), {} stored bytes\n", l.out_features(), l.in_features(), l.stored_bytes());
      // what the whole model holds after load (repacks are anonymous; mapped originals a repack made
      // redundant are released), next to its checkpoint bytes
      uint64_t file_bytes = 0;
      for (const auto& n : model.names()) file_bytes += model.linear(n).stored_bytes();
      fmt::print("memory     model after load: {:.1f} MiB resident, {:.1f} MiB anonymous; its linears store {:.1f} MiB\n",
                 double(m1.rss > m0.rss ? m1.rss - m0.rss : 0) / (1 << 20),
                 double(m1.anon > m0.anon ? m1.anon - m0.anon : 0) / (1 << 20), double(file_bytes) / (1 << 20));
      fmt::print("input      {} {}\n", dtype_name(x.dtype()), shape_str(x.shape()));
      fmt::print("output     F32 {}\n", shape_str(y.shape()));
      fmt::print("time       {:.3f} ms (median of {}, after one warm-up run)\n", t * 1e3, o->repeats);
      fmt::print("isa        {} ({} threads)\n", isa_name(active_isa()), num_threads());
    }
    if (!o->output.empty()) {
      save_safetensors(o->output, {{"y", y}});
      if (!globals().quiet) fmt::print("wrote      {} (tensor 'y')\n", o->output);
    }
    return 0;
  };
});
}  // namespace
}  // namespace nibble::cli
