// `nibble bench --op lora [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// What a LoRA costs on an svdquant_w4a4 layer when it joins the low-rank branch (nibble/lora.h):
// the layer with its rank-32 base branch vs the same layer after apply_lora() of a rank-64 LoRA
// (R = 32 + 64 = 96). Both run the runtime's path (nn::Linear → svdquant_linear), fp32 x, bf16
// params. `flop_ratio` is what the grown branch should cost: (N·K + 96·(K+N)) / (N·K + 32·(K+N)).
// Medians of per-repetition ratios of one interleaved loop (devtools/bench_timing.h).
#include <fmt/format.h>

#include <random>

#include "bench_registry.h"
#include "devtools/bench_records.h"
#include "devtools/bench_timing.h"
#include "nibble/lora.h"
#include "nibble/nn.h"
#include "nibble/thread_pool.h"
#include "devtools/random_tensor.h"

namespace nibble::cli {
namespace {

constexpr auto rnd = bench::random_tensor;

// A random svdquant layer (codes, scales, smooth, factors) as the registry binds it.
QuantizedLayer random_layer(std::mt19937& rng, int64_t N, int64_t K, int64_t R) {
  std::uniform_int_distribution<int> b(0, 255);
  Tensor q = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t i = 0; i < q.numel(); ++i) q.mutable_data<int8_t>()[i] = int8_t(b(rng));
  LayerSource src;
  src.name = "bench.lora";
  QuantConfig c;
  c.format = "svdquant_w4a4";
  src.config = c;
  src.tensors = {{"weight", q},
                 {"weight_scale", rnd(rng, DType::BF16, {K / 64, N}, 0.001f, 0.01f)},
                 {"smooth_factor", rnd(rng, DType::BF16, {K}, 0.5f, 2.0f)},
                 {"proj_down", rnd(rng, DType::BF16, {K, R}, -0.05f, 0.05f)},
                 {"proj_up", rnd(rng, DType::BF16, {N, R}, -0.05f, 0.05f)},
                 {"bias", rnd(rng, DType::BF16, {N}, -0.1f, 0.1f)}};
  return bind_layer(src);
}

int run_lora(const BenchOptions& o) {
  std::vector<bench::Shape3> shapes;
  if (!o.shapes.empty()) shapes = bench::parse_shapes(o.shapes, "bench lora");
  else if (o.quick) shapes = {{256, 3072, 3072}};
  else shapes = {{256, 3072, 3072}, {4096, 3072, 3072}, {256, 12288, 3072}};
  const int64_t R0 = 32, RL = 64;
  std::vector<bench::Record> recs;
  std::mt19937 rng(777);
  for (const auto& s : shapes) {
    QuantizedLayer base = random_layer(rng, s.N, s.K, R0);
    LoraDelta d;
    d.source = "bench";
    d.down = rnd(rng, DType::F32, {RL, s.K}, -0.05f, 0.05f);
    d.up = rnd(rng, DType::F32, {s.N, RL}, -0.05f, 0.05f);
    QuantizedLayer grown = apply_lora(base, {d});
    nn::Linear lb = nn::Linear::from_layer(base), lg = nn::Linear::from_layer(grown);
    Tensor x = rnd(rng, DType::F32, {s.M, s.K}, -1.0f, 1.0f);
    const double tb = bench::median_seconds(o.repeats, [&] { (void)lb.forward(x); });
    const double tg = bench::median_seconds(o.repeats, [&] { (void)lg.forward(x); });
    const double R1 = double(grown.rank);
    const double flops = double(s.N) * s.K + R1 * (s.K + s.N), flops0 = double(s.N) * s.K + R0 * (s.K + s.N);
    recs.push_back(bench::Record()
                       .n("M", double(s.M)).n("K", double(s.K)).n("N", double(s.N))
                       .n("rank_base", double(R0)).n("rank_lora", R1)
                       .n("ms_base", tb * 1e3).n("ms_lora", tg * 1e3).n("time_ratio", tg / tb)
                       .n("flop_ratio", flops / flops0));
  }
  if (o.json) {
    fmt::print("{}\n", bench::records_to_json(recs));
  } else {
    fmt::print("# svdquant_w4a4 layer: rank-32 base vs base + rank-64 LoRA in the low-rank branch ({} threads; "
               "medians of {} runs; timings on a shared host are noise)\n",
               num_threads(), o.repeats);
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "rank_base", "rank_lora", "ms_base", "ms_lora",
                                                    "time_ratio", "flop_ratio"},
                                             3));
  }
  return 0;
}

const BenchRegistration kLoraBench{"lora", "svdquant layer: rank-32 base vs + rank-64 LoRA (low-rank branch)", run_lora};

}  // namespace
}  // namespace nibble::cli
