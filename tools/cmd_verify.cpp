// `nibble verify QUANT [--against FLOAT_CKPT] [--inputs ACTS] [--json] [--rows M] [--seed S] [--filter REGEX]`
// Per quantized layer: relative Frobenius error of the effective weight against the float layer of
// FLOAT_CKPT (when given), and output SNR — against the float layer when given, else against the
// layer's own dequantized baseline (which checks the kernels). Inputs: the layer's real activations
// from ACTS when given (a dump as `nibble calib` reads — tensor = layer name, value (..., K) — or a
// statistics file's `<layer>.sample` rows), else seeded random N(0, 1) (GELU(tanh) of that for
// act_unsigned layers). Every line and the summary say which inputs were used.
#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "command.h"
#include "devtools/bench_memory.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"

namespace nibble::cli {
namespace {

double snr_db(const Tensor& got, const Tensor& ref) {
  double sig = 0, err = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = ref.data<float>()[i], d = double(got.data<float>()[i]) - r;
    sig += r * r, err += d * d;
  }
  if (err == 0) return std::numeric_limits<double>::infinity();
  return 10 * std::log10(sig / err);
}

double rel_fro(const Tensor& a, const Tensor& ref) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = ref.data<float>()[i], d = double(a.data<float>()[i]) - r;
    num += d * d, den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

Tensor seeded_input(int64_t M, int64_t K, uint64_t seed, bool post_gelu) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor x = Tensor::empty(DType::F32, {M, K});
  float* p = x.mutable_data<float>();
  for (int64_t i = 0; i < M * K; ++i) {
    float v = nd(rng);
    if (post_gelu) v = 0.5f * v * (1.0f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
    p[i] = v;
  }
  return x;
}

const CommandRegistration reg("verify", "check a quantized checkpoint: weight error and output SNR per layer", 40,
                              [](CLI::App& app) -> RunFn {
  struct Opts {
    std::string quant, against, filter, inputs;
    bool json = false;
    int64_t rows = 32;
    uint64_t seed = 1;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("QUANT", o->quant, "quantized checkpoint")->required();
  app.add_option("--against", o->against, "float checkpoint with the same layer names");
  app.add_option("--inputs", o->inputs,
                 "real activations: safetensors with <layer> (..., K) input rows or <layer>.sample (a --calib file)");
  app.add_flag("--json", o->json, "print a JSON array (one record per layer) plus a summary record");
  app.add_option("--rows", o->rows, "rows of the random input per layer")->check(CLI::PositiveNumber);
  app.add_option("--seed", o->seed, "seed of the random inputs");
  app.add_option("--filter", o->filter, "only layers whose name matches this regex (search)");
  return [o]() -> int {
    nn::set_notice_handler(nullptr);
    const bench::ProcessMemory m0 = bench::process_memory();
    const nn::Model q = nn::load_checkpoint(o->quant);
    const bench::ProcessMemory m1 = bench::process_memory();
    // what the loaded quantized model holds (resident / anonymous growth over its load) next to the
    // bytes its linears store in the checkpoint
    const double rss_load = double(m1.rss > m0.rss ? m1.rss - m0.rss : 0);
    const double anon_load = double(m1.anon > m0.anon ? m1.anon - m0.anon : 0);
    double stored = 0;
    for (const auto& n : q.names()) stored += double(q.linear(n).stored_bytes());
    std::optional<nn::Model> ref;
    if (!o->against.empty()) ref = nn::load_checkpoint(o->against);
    const std::regex re(o->filter.empty() ? std::string(".*") : o->filter);
    std::shared_ptr<SafetensorsFile> acts;
    if (!o->inputs.empty()) acts = SafetensorsFile::open(o->inputs);
    // The activation rows of `layer` in ACTS: `<layer>` or `<layer>.sample`, names equal or one a
    // dot-suffix of the other (checkpoint prefixes).
    auto real_input = [&](const std::string& layer, int64_t K) -> Tensor {
      if (!acts) return Tensor();
      for (const auto& t : acts->tensors()) {
        std::string n = t.name;
        if (n.size() > 7 && n.compare(n.size() - 7, 7, ".sample") == 0) n.resize(n.size() - 7);
        const bool match = n == layer || (layer.size() > n.size() && layer.compare(layer.size() - n.size() - 1, n.size() + 1, "." + n) == 0) ||
                           (n.size() > layer.size() && n.compare(n.size() - layer.size() - 1, layer.size() + 1, "." + layer) == 0);
        if (!match || t.shape.empty() || t.shape.back() != K || !is_float(t.dtype)) continue;
        Tensor x = acts->get(t.name).to_f32();
        return x.reshape({x.numel() / K, K});
      }
      return Tensor();
    };
    int real = 0, random = 0;
    nlohmann::json out = nlohmann::json::array();
    int count = 0, missing = 0, exact = 0;  // exact: output identical to the reference (SNR = inf)
    double snr_min = std::numeric_limits<double>::infinity(), snr_sum = 0, err_max = 0;
    std::string worst;
    if (!o->json)
      fmt::print("{:<52} {:<14} {:>6} {:>6} {:>10} {:>9}  {}\n", "layer", "format", "N", "K",
                 ref ? "w_rel_err" : "-", ref ? "SNR(float)" : "SNR(deq)", "inputs");
    uint64_t seed = o->seed;
    for (const auto& name : q.names()) {
      const nn::Linear& l = q.linear(name);
      if (!l.layer().format || !std::regex_search(name, re)) continue;
      ++count;
      Tensor x = real_input(name, l.in_features());
      const bool is_real = x.defined();
      if (!is_real) x = seeded_input(o->rows, l.in_features(), seed, l.act_unsigned());
      ++seed;
      (is_real ? real : random)++;
      const Tensor y = l.forward(x);
      nlohmann::json rec = {{"layer", name}, {"format", l.format_name()}, {"N", l.out_features()},
                            {"K", l.in_features()}, {"act_unsigned", l.act_unsigned()},
                            {"inputs", is_real ? "real" : "random"}, {"rows", x.size(0)}};
      double snr = 0, err = -1;
      if (ref) {
        if (!ref->contains(name)) {
          ++missing;
          rec["error"] = "missing in the float checkpoint";
          if (!o->json) fmt::print("{:<52} {:<14} missing in {}\n", name, l.format_name(), o->against);
          out.push_back(rec);
          continue;
        }
        const nn::Linear& f = ref->linear(name);
        if (f.out_features() != l.out_features() || f.in_features() != l.in_features())
          throw Error(fmt::format("layer '{}': float layer is ({}, {}), quantized is ({}, {})", name,
                                  f.out_features(), f.in_features(), l.out_features(), l.in_features()));
        err = rel_fro(l.effective_weight(), f.effective_weight());
        snr = snr_db(y, f.forward(x));
        rec["weight_rel_err"] = err;
        rec["reference"] = "float";
      } else {
        snr = snr_db(y, l.dequantized().forward(x));
        rec["reference"] = "dequantized";
      }
      rec["snr_db"] = std::isinf(snr) ? nlohmann::json(nullptr) : nlohmann::json(snr);
      out.push_back(rec);
      if (snr < snr_min) snr_min = snr, worst = name;
      if (std::isinf(snr))
        ++exact;
      else
        snr_sum += snr;
      err_max = std::max(err_max, err);
      if (!o->json)
        fmt::print("{:<52} {:<14} {:>6} {:>6} {:>10} {:>9.2f}  {}\n", name, l.format_name(), l.out_features(),
                   l.in_features(), err >= 0 ? fmt::format("{:.5f}", err) : "-", snr,
                   is_real ? fmt::format("real ({} rows)", x.size(0)) : "random");
    }
    const int measured = count - missing;
    const double mean = measured - exact > 0 ? snr_sum / (measured - exact) : std::numeric_limits<double>::infinity();
    if (o->json) {
      out.push_back({{"summary", true}, {"layers", count}, {"missing", missing}, {"exact", exact},
                     {"snr_min_db", measured ? nlohmann::json(snr_min) : nlohmann::json(nullptr)},
                     {"snr_mean_db", std::isinf(mean) ? nlohmann::json(nullptr) : nlohmann::json(mean)},
                     {"worst_layer", worst}, {"layers_real_inputs", real}, {"layers_random_inputs", random},
                     {"weight_rel_err_max", ref ? nlohmann::json(err_max) : nlohmann::json(nullptr)},
                     {"rss_after_load_bytes", rss_load}, {"anon_after_load_bytes", anon_load},
                     {"stored_bytes", stored}});
      fmt::print("{}\n", out.dump(1));
    } else {
      fmt::print("summary: {} quantized layers{}{}, output SNR vs {} mean {:.2f} dB, min {:.2f} dB ({}){}\n", count,
                 missing ? fmt::format(" ({} missing in the float checkpoint)", missing) : "",
                 exact ? fmt::format(", {} exact (SNR inf, not in the mean)", exact) : "",
                 ref ? "float" : "dequantized baseline", mean, measured ? snr_min : 0.0, worst,
                 ref ? fmt::format(", max weight rel. error {:.5f}", err_max) : "");
      fmt::print("memory: the quantized model after load holds {:.1f} MiB resident, {:.1f} MiB anonymous; its linears "
                 "store {:.1f} MiB\n",
                 rss_load / (1 << 20), anon_load / (1 << 20), stored / (1 << 20));
      if (!acts)
        fmt::print("inputs: seeded random N(0,1) rows (GELU of them for act_unsigned layers), not real activations — "
                   "these SNRs do not rank checkpoints; pass --inputs ACTS.safetensors to measure on real ones\n");
      else
        fmt::print("inputs: real activations from {} for {} layers; {} layers had none there and fell back to random inputs\n",
                   o->inputs, real, random);
    }
    return missing ? 2 : 0;
  };
});
}  // namespace
}  // namespace nibble::cli
