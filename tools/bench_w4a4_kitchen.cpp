// `nibble bench --op w4a4-kitchen [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// The SVDQuant layer the way ComfyUI runs it through nibble's kitchen backend (python/nibble/kitchen.py):
// quantize_svdquant_w4a4 (bf16 x, fp32 lora_act, pad 256) then scaled_mm_svdquant_w4a4 on the weight
// side prepared once (prepare_svdquant_w4a4_gemm, the adapter's cache), bf16 out — against the fused
// nn::Linear layer (svdquant_linear) on the same weights, with the same bf16 x and bf16 out, and with
// fp32 x / fp32 out (the figure of `nibble bench --op w4a4`). R = 32, bf16 parameters, a signed layer.
// One interleaved loop per shape; each case rotates among weight copies that together exceed 2x the
// L3 (as in a model, where each layer runs once per step). kitchen_vs_fused is the median of
// per-repetition time ratios kitchen pair / fused (bf16 x); kitchen_vs_fused_f32 likewise against the
// fp32-x layer. quantize_ms / scaled_mm_ms split the kitchen pair. kitchen_f32_*: the pair on fp32 x with fp32
// outputs (ComfyUI on CPU computes in fp32) against the fp32 layer. bit_identical: the pair with
// lora_act in x's dtype (the op default) reproduces the fused bf16 layer bit for bit (checked once).
// With -t 1 the calling thread does all the work, so the *_cpu keys (the same ratios in that thread's CPU
// time, which preemption by other processes does not inflate) are the robust figures on a shared host.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>

#include "bench_registry.h"
#include "devtools/bench_util.h"
#include "devtools/random_layer.h"
#include "devtools/random_tensor.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

using bench::Shape3;

struct KitchenWeights {  // the tensors the kitchen passes on every call, and its prepared GEMM side
  Tensor qweight, wscales, smooth, proj_down, proj_up, bias;
  std::shared_ptr<const SvdquantW4A4Prepared> gemm;  // prepare_svdquant_w4a4_gemm
  std::shared_ptr<const SvdquantW4A4Prepared> layer;  // prepare_svdquant_w4a4 (the fused layer)
};

double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

Tensor kitchen_pair(const Tensor& x, const KitchenWeights& w, std::optional<DType> lora_dt, double* tq, double* tm,
                    std::optional<DType> out_dt = std::nullopt) {
  const double t0 = bench::now_seconds();
  const SvdquantActs a = quantize_svdquant_w4a4(x, w.smooth, w.proj_down, 256, false, {}, lora_dt);
  const double t1 = bench::now_seconds();
  Tensor y = scaled_mm_svdquant_w4a4_prepared(a.q_x, w.qweight, a.ascales, w.wscales, a.lora_act, w.proj_up, w.bias,
                                              false, out_dt, *w.gemm, -1);
  const double t2 = bench::now_seconds();
  if (tq) *tq = t1 - t0;
  if (tm) *tm = t2 - t1;
  return y;
}

int run_w4a4_kitchen(const BenchOptions& o) {
  std::vector<Shape3> shapes;
  if (!o.shapes.empty()) shapes = bench::parse_shapes(o.shapes, "bench w4a4-kitchen");
  else if (o.quick) shapes = {{256, 3072, 3072}};
  else shapes = {{256, 3072, 3072}, {1024, 3072, 3072}, {4096, 3072, 3072}};
  const int64_t R = 32;
  const int reps = std::max(1, o.repeats);
  if (!o.json)
    fmt::print("# svdquant_w4a4 kitchen ops (quantize + scaled_mm, prepared weights, bf16 x) vs the fused layer; "
               "{} threads, isa {}, R={}, bf16 params; weights rotated over > 2x L3; load average {:.2f}\n",
               num_threads(), isa_name(active_isa()), R, bench::load_average());
  std::vector<bench::Record> recs;
  std::mt19937 rng(1616);
  for (const Shape3& sh : shapes) {
    const int64_t M = sh.M, K = sh.K, N = sh.N;
    const LayerSource src = bench::random_svdquant_source(rng, "bench.kitchen", K, N, R);
    const QuantizedLayer layer = bind_layer(src);
    const SvdquantW4A4Params params = svdquant_params(layer);
    const size_t prep_bytes = bench::svdquant_prepared_bytes(K, N, R);
    std::vector<KitchenWeights> ws;
    for (int c = 0, n = bench::copies_to_defeat_cache(prep_bytes); c < n; ++c) {
      KitchenWeights w;
      w.qweight = params.qweight.clone(), w.wscales = params.wscales.clone(), w.smooth = params.smooth.clone();
      w.proj_down = params.proj_down.clone(), w.proj_up = params.proj_up.clone(), w.bias = params.bias.clone();
      w.gemm = prepare_svdquant_w4a4_gemm(w.qweight, w.wscales, w.proj_up);
      w.layer = prepare_svdquant_w4a4(params);
      ws.push_back(std::move(w));
    }
    const Tensor x32 = bench::random_tensor(rng, DType::F32, {M, K}, -2.0f, 2.0f);
    const Tensor xb = x32.to(DType::BF16);
    // the op composition with the op's default lora_act dtype equals the fused layer bit for bit
    const Tensor y_pair = kitchen_pair(xb, ws[0], std::nullopt, nullptr, nullptr);
    const Tensor y_fused = svdquant_linear(xb, *ws[0].layer);
    const bool same = y_pair.nbytes() == y_fused.nbytes() &&
                      std::memcmp(y_pair.raw(), y_fused.raw(), y_pair.nbytes()) == 0;

    int c_k = 0, c_f = 0, c_f32 = 0, c_k32 = 0;
    std::vector<double> tq, tm, cpu[4];  // cpu: the calling thread's CPU seconds per case and repetition
    const int r = M >= 4096 ? std::max(3, reps / 2) : reps;
    auto timed = [&](int i, int which, const std::function<void()>& fn) {
      const double c0 = thread_cpu_seconds();
      fn();
      if (i > 0) cpu[which].push_back(thread_cpu_seconds() - c0);
    };
    std::vector<bench::InterleavedCase> cases = {
        {[&](int i) {
          double a = 0, b = 0;
          timed(i, 0, [&] { (void)kitchen_pair(xb, ws[size_t(c_k++) % ws.size()], DType::F32, &a, &b); });  // the adapter's fp32 lora_act
          if (i > 0) tq.push_back(a), tm.push_back(b);
        }},
        {[&](int i) { timed(i, 1, [&] { (void)svdquant_linear(xb, *ws[size_t(c_f++) % ws.size()].layer); }); }},
        {[&](int i) { timed(i, 2, [&] { (void)svdquant_linear(x32, *ws[size_t(c_f32++) % ws.size()].layer, DType::F32); }); }},
        {[&](int i) {  // the pair on fp32 x, fp32 out (ComfyUI on CPU computes in fp32)
          timed(i, 3, [&] { (void)kitchen_pair(x32, ws[size_t(c_k32++) % ws.size()], DType::F32, nullptr, nullptr, DType::F32); });
        }}};
    const std::vector<bench::Timing> T = bench::time_interleaved(r, cases);
    auto cpu_ratio = [&](int a, int b) {
      if (num_threads() != 1) return double(NAN);
      std::vector<double> q;
      for (size_t k = 0; k < cpu[a].size() && k < cpu[b].size(); ++k) q.push_back(cpu[a][k] / cpu[b][k]);
      return bench::median(q);
    };
    bench::Record rec;
    rec.s("op", "svdquant_w4a4").s("path", "kitchen ops").n("M", double(M)).n("K", double(K)).n("N", double(N));
    rec.n("R", double(R)).s("isa", isa_name(active_isa())).n("threads", num_threads());
    rec.n("kitchen_ms", T[0].median * 1e3).n("quantize_ms", bench::median(tq) * 1e3).n("scaled_mm_ms", bench::median(tm) * 1e3);
    rec.n("fused_ms", T[1].median * 1e3).n("fused_f32_ms", T[2].median * 1e3);
    rec.n("kitchen_vs_fused", bench::paired_ratio(T[0], T[1])).n("kitchen_vs_fused_f32", bench::paired_ratio(T[0], T[2]));
    rec.n("kitchen_vs_fused_cpu", cpu_ratio(0, 1)).n("kitchen_vs_fused_f32_cpu", cpu_ratio(0, 2));
    rec.n("kitchen_f32_ms", T[3].median * 1e3).n("kitchen_f32_vs_fused_f32", bench::paired_ratio(T[3], T[2]));
    rec.n("kitchen_f32_vs_fused_f32_cpu", cpu_ratio(3, 2));
    rec.n("bit_identical", same ? 1 : 0).n("weight_copies", double(ws.size())).n("loadavg", bench::load_average());
    recs.push_back(rec);
    if (!o.json) fmt::print(stderr, "  done M={} K={} N={}\n", M, K, N);
  }
  if (o.json) {
    fmt::print("{}", bench::records_to_json(recs));
  } else {
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "isa", "threads", "kitchen_ms", "quantize_ms",
                                                    "scaled_mm_ms", "fused_ms", "fused_f32_ms", "kitchen_vs_fused",
                                                    "kitchen_vs_fused_f32", "kitchen_vs_fused_cpu", "kitchen_vs_fused_f32_cpu",
                                                    "kitchen_f32_ms", "kitchen_f32_vs_fused_f32", "bit_identical", "loadavg"},
                                             3));
    fmt::print("# kitchen_vs_fused: kitchen pair time / fused layer time (same bf16 x, bf16 out), median of "
               "per-repetition ratios; _f32: against the fused layer on fp32 x, fp32 out; _cpu: the same in thread CPU "
               "time (-t 1 only)\n");
  }
  return 0;
}

const BenchRegistration reg("w4a4-kitchen",
                            "svdquant_w4a4 through the kitchen ops (quantize + prepared scaled_mm, bf16 x) vs the fused layer",
                            run_w4a4_kitchen);

}  // namespace
}  // namespace nibble::cli
