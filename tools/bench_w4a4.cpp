// `nibble bench --op w4a4 [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// For each shape, in one process run (R = 32, fp32 x, bf16 parameters, a signed layer): the fused
// svdquant_linear; its stages timed apart (quantize, low-rank, integer GEMM + epilogue); OpenBLAS sgemm
// on the dequantized fp32 weight W_eff (the user's alternative); and two yardsticks measured first in
// the same process with the same threads: the int8 VNNI peak (a register-only vpdpbusd loop) and the
// streaming read bandwidth. GOP/s counts 2·M·N·K.
#include <fmt/format.h>

#include <algorithm>
#include <random>
#include <sstream>

#include "bench_registry.h"
#include "bench_util.h"
#include "kernels/svdquant_w4a4_kernels.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

using bench::Shape3;

// int8 peak of the pool in GOP/s: many equal register-only tasks so that every thread stays busy.
double vnni_peak_gops(int trials) {
  if (!isa_supported(Isa::Avx512Vnni)) return NAN;
  const int64_t iters = 500000, tasks = 16 * num_threads();
  double best = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const double t0 = bench::now_seconds();
    std::vector<double> ops(size_t(tasks), 0.0);
    parallel_for(tasks, [&](int64_t t) { ops[size_t(t)] = kernels::w4a4::vnni_peak_ops(iters); });
    const double dt = bench::now_seconds() - t0;
    double total = 0;
    for (double v : ops) total += v;
    best = std::max(best, total / dt / 1e9);
  }
  return best;
}

Tensor random_tensor(std::mt19937& rng, DType dt, Shape shape, float lo, float hi) {
  Tensor f = Tensor::empty(DType::F32, shape);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < f.numel(); ++i) f.mutable_data<float>()[i] = d(rng);
  return dt == DType::F32 ? f : f.to(dt);
}

int run_w4a4(const BenchOptions& o) {
  std::vector<Shape3> shapes;
  if (!o.shapes.empty()) {
    shapes = bench::parse_shapes(o.shapes, "bench w4a4");
  } else if (o.quick) {
    shapes = {{256, 3072, 3072}};
  } else {
    for (auto kn : {std::pair<int64_t, int64_t>{3072, 3072}, {3072, 12288}, {12288, 3072}})
      for (int64_t M : {256, 4096}) shapes.push_back({M, kn.first, kn.second});
  }
  const int64_t R = 32;
  const int reps = std::max(1, o.repeats);
  const double load_before = bench::load_average();
  const double peak = vnni_peak_gops(3);
  const double stream = bench::read_bandwidth_gbs(size_t(256) << 20, size_t(1) << 30, o.quick ? 1 : 3);
  bench::ReadProbe probe(size_t(256) << 20);  // one sweep per repetition (pct_read_bw)
  if (!o.json)
    fmt::print("# svdquant_w4a4: int8 VNNI peak {:.0f} GOP/s, read bandwidth {:.1f} GB/s ({} threads, isa {}); R={}, "
               "fp32 x, bf16 params; load average {:.2f}\n",
               peak, stream, num_threads(), isa_name(active_isa()), R, load_before);
  std::vector<bench::Record> recs;
  std::mt19937 rng(4321);
  for (const Shape3& sh : shapes) {
    const int64_t M = sh.M, K = sh.K, N = sh.N;
    LayerSource src;
    src.name = "bench.linear";
    src.config = QuantConfig::parse(R"({"format":"svdquant_w4a4"})", src.name);
    Tensor q = Tensor::empty(DType::I8, {N, K / 2});
    for (int64_t j = 0; j < q.numel(); ++j) q.mutable_data<uint8_t>()[j] = uint8_t(rng());
    src.tensors["weight"] = q;
    src.tensors["weight_scale"] = random_tensor(rng, DType::BF16, {K / 64, N}, 0.001f, 0.02f);
    src.tensors["smooth_factor"] = random_tensor(rng, DType::BF16, {K}, 0.5f, 2.0f);
    src.tensors["proj_down"] = random_tensor(rng, DType::BF16, {K, R}, -0.05f, 0.05f);
    src.tensors["proj_up"] = random_tensor(rng, DType::BF16, {N, R}, -0.05f, 0.05f);
    src.tensors["bias"] = random_tensor(rng, DType::BF16, {N}, -0.1f, 0.1f);
    const QuantizedLayer layer = bind_layer(src);
    const auto prep = prepare_svdquant_w4a4(svdquant_params(layer));
    const Tensor x = random_tensor(rng, DType::F32, {M, K}, -2.0f, 2.0f);
    const int r = M >= 4096 ? std::max(3, reps / 2) : reps;  // the M = 4096 sgemm takes seconds

    // Interleaved repetitions: each one times the fused layer, its stages, sgemm and the VNNI peak back
    // to back, so every ratio compares measurements taken under the same momentary host load; the
    // reported ratios are medians of the per-repetition ratios.
    const bool blas = bench::openblas_available();
    Tensor W, yb;
    if (blas) W = dequantize(layer), yb = Tensor::empty(DType::F32, {M, N});
    const double gop = 2.0 * double(M) * double(N) * double(K) / 1e9;
    std::vector<double> tf, tq, tl, tg, ts, pk, bw, r_speed, r_gemm_pct, r_fused_pct, r_read;
    (void)svdquant_linear(x, *prep, DType::F32);  // warm-up
    for (int i = 0; i < r; ++i) {
      double t0 = bench::now_seconds();
      (void)svdquant_linear(x, *prep, DType::F32);
      tf.push_back(bench::now_seconds() - t0);
      kernels::w4a4::StageTimes st;
      (void)kernels::w4a4::svdquant_linear_timed(x, *prep, &st);
      tq.push_back(st.quantize), tl.push_back(st.lowrank), tg.push_back(st.gemm);
      if (blas) {
        // OpenBLAS runs on its own threads: both pools settled around it (bench_util.h), else the
        // spinning workers of one steal a core from the other (the VNNI peak right after sgemm
        // used to read up to 2x low).
        bench::settle_pools(false);
        t0 = bench::now_seconds();
        bench::sgemm_nt(M, N, K, x.data<float>(), W.data<float>(), yb.mutable_data<float>());
        ts.push_back(bench::now_seconds() - t0);
        bench::settle_pools(true);
        r_speed.push_back(ts.back() / tf.back());
      }
      pk.push_back(vnni_peak_gops(1));
      r_gemm_pct.push_back(100.0 * gop / tg.back() / pk.back());
      r_fused_pct.push_back(100.0 * gop / tf.back() / pk.back());
      // the read bandwidth of this repetition (a 256 MiB sweep): the host's bandwidth drifts by
      // 25-55 GB/s over minutes, so the quantize share is taken against the same moment
      t0 = bench::now_seconds();
      probe.sweep();
      bw.push_back(double(probe.bytes()) / (bench::now_seconds() - t0) / 1e9);
      r_read.push_back(100.0 * double(M) * double(K) * 4.0 / tq.back() / 1e9 / bw.back());
    }
    auto median = [](std::vector<double> v) {
      if (v.empty()) return double(NAN);
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    auto best = [](const std::vector<double>& v) {
      return v.empty() ? double(NAN) : *std::min_element(v.begin(), v.end());
    };
    const double t_f = median(tf), t_q = median(tq), t_l = median(tl), t_g = median(tg);
    bench::Record rec;
    rec.s("op", "svdquant_w4a4").n("M", double(M)).n("K", double(K)).n("N", double(N)).n("R", double(R));
    rec.s("isa", isa_name(active_isa())).n("threads", num_threads());
    rec.n("fused_ms", t_f * 1e3).n("fused_GOPs", gop / t_f).n("fused_best_ms", best(tf) * 1e3);
    rec.n("quant_ms", t_q * 1e3).n("pct_read_bw", median(r_read));
    rec.n("lowrank_ms", t_l * 1e3);
    rec.n("gemm_ms", t_g * 1e3).n("gemm_GOPs", gop / t_g).n("pct_vnni_peak", median(r_gemm_pct));
    rec.n("fused_pct_vnni_peak", median(r_fused_pct));
    rec.n("sgemm_ms", median(ts) * 1e3).n("speedup_vs_sgemm", median(r_speed));
    // best-of-runs figures: the machine with fewer of the shared host's preemptions
    rec.n("pct_vnni_peak_best", 100.0 * gop / best(tg) / *std::max_element(pk.begin(), pk.end()));
    rec.n("speedup_vs_sgemm_best", best(ts) / best(tf));
    rec.n("vnni_peak_GOPs", median(pk)).n("read_GBps", median(bw)).n("loadavg", bench::load_average());
    recs.push_back(rec);
    if (!o.json) fmt::print(stderr, "  done M={} K={} N={}\n", M, K, N);
  }
  if (o.json) {
    fmt::print("{}", bench::records_to_json(recs));
  } else {
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "isa", "threads", "fused_ms", "fused_GOPs",
                                                    "quant_ms", "pct_read_bw", "lowrank_ms", "gemm_ms", "gemm_GOPs",
                                                    "pct_vnni_peak", "fused_pct_vnni_peak", "sgemm_ms",
                                                    "speedup_vs_sgemm", "pct_vnni_peak_best",
                                                    "speedup_vs_sgemm_best", "loadavg"}));
  }
  return 0;
}

const BenchRegistration reg("w4a4", "svdquant_w4a4 fused layer and its stages vs OpenBLAS sgemm and the VNNI peak",
                            run_w4a4);

}  // namespace
}  // namespace nibble::cli
