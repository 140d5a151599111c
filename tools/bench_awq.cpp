// `nibble bench --op awq [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// One row per path a caller actually takes through the awq_w4a16 op:
//   * "nn.Linear"      — nibble::nn::Linear::forward (C++ runtime, `nibble.load` in Python): fp32 x,
//                        weights prepared at load (the tiled repack where the ISA has one), fp32 out;
//   * "kitchen.stored" — the comfy-kitchen op as nibble.kitchen calls it: bf16 x, the stored layout,
//                        bf16 out (no prepared weights: the op repacks nothing and reads as stored);
//   * "kitchen.cached" — the same op with prepared weights (what a prepared-weight cache in the
//                        kitchen adapter gives on a hit): bf16 x, prepared, bf16 out.
// Every row carries the same bias and is timed in one interleaved loop with its yardsticks: the same
// product on bf16 weights (bench::gemv_bf16_weights), OpenBLAS sgemv/sgemm on the dequantized fp32
// weights, oneDNN's bf16 matmul on the same bf16 weights (torch's bf16 linear; when built with
// libdnnl-dev: speedup_vs_dnnl_bf16) and a read-bandwidth sweep. All weights rotate among copies
// larger than 2x the L3.
//
// Share of read bandwidth: in every repetition the ceiling is the fastest read rate seen — the probe
// sweep or any case's weight bytes / time (a kernel can stream faster than the probe) — and a row's
// share is its rate over that ceiling (median over repetitions). pct_probe is the rate over the probe
// alone; probe_exceeded = 1 flags a row whose pct_probe is above 100 % (the probe is then not the
// machine's limit).
#include <fmt/format.h>

#include <random>

#include "bench_registry.h"
#include "devtools/bench_dnnl.h"
#include "devtools/bench_util.h"
#include "kernels/awq_w4a16_kernels.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

using bench::Shape3;

struct CallerPath {
  const char* name;
  const char* caller;
  DType x_dtype;
  bool prepared;
};
const CallerPath kPaths[] = {
    {"nn.Linear", "nn::Linear / nibble.load (fp32 x, prepared at load, fp32 out)", DType::F32, true},
    {"kitchen.stored", "kitchen op via nibble.kitchen (bf16 x, stored layout, bf16 out)", DType::BF16, false},
    {"kitchen.cached", "kitchen op with a prepared-weight cache hit (bf16 x, prepared, bf16 out)", DType::BF16, true},
};

int run_awq(const BenchOptions& o) {
  std::vector<Shape3> shapes;
  if (!o.shapes.empty()) {
    shapes = bench::parse_shapes(o.shapes, "bench awq");
  } else if (o.quick) {
    shapes = {{1, 3072, 3072}, {8, 3072, 3072}, {64, 3072, 3072}};
  } else {
    for (int64_t N : {18432, 3072})
      for (int64_t M : {1, 2, 8, 64, 512}) shapes.push_back({M, 3072, N});
  }
  const int64_t G = 64;
  const int reps = std::max(1, o.repeats);
  const double load_before = bench::load_average();
  bench::ReadProbe probe(size_t(256) << 20);
  const bool blas = bench::openblas_available();
  if (!o.json)
    fmt::print("# awq_w4a16: {} threads; G={}, bf16 scales/zeros/bias; weights rotated over > 2x L3 ({}, every "
               "case's); each repetition runs read-probe, the {} caller paths, bf16 GEMV{} in a shuffled order; load "
               "average {:.2f}\n",
               num_threads(), G, weights_hugepage_status(), std::size(kPaths),
               blas ? ", OpenBLAS" : " (OpenBLAS: " + bench::openblas_info() + ")", load_before);
  std::vector<bench::Record> recs;
  std::mt19937 rng(1234);
  // group shapes by (K, N) so the weight copies are built once
  for (size_t i = 0; i < shapes.size();) {
    const int64_t K = shapes[i].K, N = shapes[i].N;
    Tensor q = Tensor::empty(DType::I8, {N, K / 2});
    for (int64_t j = 0; j < q.numel(); ++j) q.mutable_data<uint8_t>()[j] = uint8_t(rng());
    Tensor s32 = Tensor::empty(DType::F32, {K / G, N}), z32 = Tensor::empty(DType::F32, {K / G, N});
    Tensor b32 = Tensor::empty(DType::F32, {N});
    std::uniform_real_distribution<float> us(0.002f, 0.02f), uz(-0.1f, 0.1f);
    for (int64_t j = 0; j < s32.numel(); ++j) s32.mutable_data<float>()[j] = us(rng), z32.mutable_data<float>()[j] = uz(rng);
    for (int64_t j = 0; j < N; ++j) b32.mutable_data<float>()[j] = uz(rng);
    const Tensor s = s32.to(DType::BF16), z = z32.to(DType::BF16), bias = b32.to(DType::BF16);
    const uint64_t int4_bytes = q.nbytes() + s.nbytes() + z.nbytes();
    bench::RotatingCopies w4({q, s, z, bias}, bench::copies_to_defeat_cache(int4_bytes));
    // per copy: the Linear the runtime builds at load, and the op's prepared weights
    std::vector<nn::Linear> linears;
    std::vector<std::shared_ptr<const AwqW4A16Prepared>> prepared;
    for (int c = 0; c < w4.size(); ++c) {
      LayerSource src;
      src.name = "bench.awq";
      src.config = QuantConfig::parse(fmt::format(R"({{"format":"awq_w4a16","group_size":{}}})", G), src.name);
      src.tensors = {{"weight", w4.at(c)[0]}, {"weight_scale", w4.at(c)[1]}, {"weight_zeros", w4.at(c)[2]},
                     {"bias", w4.at(c)[3]}};
      const QuantizedLayer layer = bind_layer(src);
      linears.push_back(nn::Linear::from_layer(layer));
      prepared.push_back(prepare_awq_w4a16(awq_params(layer)));
    }
    // dequantized weights for the peers (fp32 for OpenBLAS, bf16 for the bf16 baseline)
    Tensor Wf = Tensor::empty(DType::F32, {N, K});
    {
      const uint8_t* qp = q.data<uint8_t>();
      float* wp = Wf.mutable_data<float>();
      const Tensor sf = s.to_f32(), zf = z.to_f32();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const uint8_t b = qp[n * (K / 2) + k / 2];
          const int code = k % 2 ? b >> 4 : b & 15;
          wp[n * K + k] = float(code - 8) * sf.data<float>()[(k / G) * N + n] + zf.data<float>()[(k / G) * N + n];
        }
    }
    const Tensor Wb = Wf.to(DType::BF16);
    bench::RotatingCopies wbf({Wb}, bench::copies_to_defeat_cache(Wb.nbytes()));
    std::unique_ptr<bench::RotatingCopies> wf32;
    if (blas) wf32 = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{Wf}, bench::copies_to_defeat_cache(Wf.nbytes()));
    const bool dnnl = bench::dnnl_available();

    for (; i < shapes.size() && shapes[i].K == K && shapes[i].N == N; ++i) {
      const int64_t M = shapes[i].M;
      std::normal_distribution<float> nd(0.f, 1.f);
      Tensor x32 = Tensor::empty(DType::F32, {M, K});
      for (int64_t j = 0; j < x32.numel(); ++j) x32.mutable_data<float>()[j] = nd(rng);
      const Tensor xb = x32.to(DType::BF16);
      const Tensor xf = xb.to_f32();  // the same values in fp32
      Tensor yb = Tensor::empty(DType::F32, {M, N}), yf = Tensor::empty(DType::F32, {M, N});
      // more samples for the short cases; >= 4 probe sweeps (1 GiB) per shape
      const int r = M >= 64 ? std::max(5, reps) : reps * 4;

      // the cases, in this order: probe, the caller paths, bf16 GEMV, (sgemm)
      int c_lin = 0, c_st = 0, c_pr = 0, c_bf = 0, c_bl = 0;
      std::vector<bench::InterleavedCase> fns = {
          {[&](int) { probe.sweep(); }},
          {[&](int) { (void)linears[size_t(c_lin++) % linears.size()].forward(xf); }},
          {[&](int) {
            const auto& c = w4.at(c_st++);
            (void)gemv_awq_w4a16(xb, c[0], c[1], c[2], c[3], G);
          }},
          {[&](int) { (void)gemv_awq_w4a16(xb, *prepared[size_t(c_pr++) % prepared.size()]); }},
          {[&](int) {
            bench::gemv_bf16_weights(M, N, K, xb.data<uint16_t>(), wbf.at(c_bf++)[0].data<uint16_t>(),
                                     yb.mutable_data<float>());
          }}};
      if (blas)  // OpenBLAS runs on its own threads: timed with both pools settled around it
        fns.push_back({[&](int) {
                         bench::sgemm_nt(M, N, K, xf.data<float>(), wf32->at(c_bl++)[0].data<float>(),
                                         yf.mutable_data<float>());
                       },
                       true});
      // oneDNN bf16 matmul (per shape: its primitive is built for M), weights reordered once per copy
      std::vector<std::unique_ptr<bench::DnnlBf16Matmul>> dnnl_bf16;
      int c_dn = 0;
      if (dnnl) {
        for (int c = 0, n = bench::copies_to_defeat_cache(Wb.nbytes()); c < n; ++c)
          dnnl_bf16.push_back(std::make_unique<bench::DnnlBf16Matmul>(M, N, K, Wb.data<uint16_t>()));
        fns.push_back({[&](int) {
                         dnnl_bf16[size_t(c_dn++) % dnnl_bf16.size()]->run(xb.data<uint16_t>(), yf.mutable_data<float>());
                       },
                       true});
      }
      const std::vector<bench::Timing> T = bench::time_interleaved(r, fns);
      const size_t P = std::size(kPaths), i_bf = 1 + P, i_bl = 2 + P, i_dn = blas ? 3 + P : 2 + P;
      // bytes each case streams (its weights), for the per-repetition ceiling
      std::vector<double> case_bytes = {double(probe.bytes())};
      for (size_t p = 0; p < P; ++p) case_bytes.push_back(double(int4_bytes));
      case_bytes.push_back(double(Wb.nbytes()));
      if (blas) case_bytes.push_back(double(Wf.nbytes()));
      if (dnnl) case_bytes.push_back(double(Wb.nbytes()));
      const size_t R = T[0].runs.size();
      std::vector<double> ceiling(R), probe_rate(R);
      for (size_t k = 0; k < R; ++k) {
        probe_rate[k] = case_bytes[0] / T[0].runs[k] / 1e9;
        for (size_t c = 0; c < T.size(); ++c) ceiling[k] = std::max(ceiling[k], case_bytes[c] / T[c].runs[k] / 1e9);
      }
      for (size_t p = 0; p < P; ++p) {
        const bench::Timing& t = T[1 + p];
        std::vector<double> pct_ceiling(R), pct_probe(R);
        for (size_t k = 0; k < R; ++k) {
          const double rate = double(int4_bytes) / t.runs[k] / 1e9;
          pct_ceiling[k] = 100.0 * rate / ceiling[k];
          pct_probe[k] = 100.0 * rate / probe_rate[k];
        }
        const double probe_pct = bench::median(pct_probe);
        bench::Record rec;
        rec.s("op", "awq_w4a16").s("path", kPaths[p].name).s("caller", kPaths[p].caller);
        rec.n("M", double(M)).n("K", double(K)).n("N", double(N)).n("G", double(G));
        rec.s("isa", isa_name(active_isa()))
            .s("kernel", kernels::awq::path_name(active_isa(), M, G, kPaths[p].x_dtype, DType::BF16, kPaths[p].prepared));
        rec.n("threads", num_threads()).n("weight_MB", double(int4_bytes) / 1e6).s("weight_pages", weights_hugepage_status());
        rec.n("op_ms", t.median * 1e3).n("op_best_ms", t.best * 1e3);
        rec.n("weight_GBps", double(int4_bytes) / t.median / 1e9);
        rec.n("pct_ceiling", bench::median(pct_ceiling)).n("pct_probe", probe_pct);
        rec.n("probe_exceeded", probe_pct > 100.0 ? 1 : 0);
        rec.n("speedup_vs_bf16", bench::paired_ratio(T[i_bf], t));
        rec.n("speedup_vs_sgemm", blas ? bench::paired_ratio(T[i_bl], t) : NAN);
        rec.n("speedup_vs_dnnl_bf16", dnnl ? bench::paired_ratio(T[i_dn], t) : NAN);
        rec.n("dnnl_bf16_ms", dnnl ? T[i_dn].median * 1e3 : NAN);
        rec.n("gflops", 2.0 * double(M) * double(N) * double(K) / t.median / 1e9);
        rec.n("ceiling_GBps", bench::median(ceiling)).n("probe_GBps", bench::median(probe_rate));
        rec.n("bf16_ms", T[i_bf].median * 1e3).n("bf16_GBps", double(Wb.nbytes()) / T[i_bf].median / 1e9);
        // weight bytes per second over those of nibble's bf16 GEMV (1.0 = the same stream rate)
        rec.n("weight_rate_vs_bf16", (double(int4_bytes) / t.median) / (double(Wb.nbytes()) / T[i_bf].median));
        rec.n("sgemm_ms", blas ? T[i_bl].median * 1e3 : NAN);
        rec.n("loadavg", bench::load_average());
        recs.push_back(rec);
      }
      if (!o.json) fmt::print(stderr, "  done M={} K={} N={}\n", M, K, N);
    }
  }
  if (o.json) {
    fmt::print("{}", bench::records_to_json(recs));
  } else {
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "path", "kernel", "op_ms", "weight_GBps",
                                                    "pct_ceiling", "pct_probe", "speedup_vs_bf16", "speedup_vs_sgemm", "speedup_vs_dnnl_bf16",
                                                    "ceiling_GBps", "probe_GBps", "bf16_ms", "sgemm_ms", "op_best_ms",
                                                    "loadavg"}));
    for (const CallerPath& p : kPaths) fmt::print("# {:<15} {}\n", p.name, p.caller);
    fmt::print("# speed-ups: median of per-repetition ratios; pct_ceiling: rate / max(probe, every case's weight read "
               "rate) of the same repetition\n");
    bool exceeded = false;
    for (const auto& r : recs)
      for (const auto& [k, v] : r.num)
        if (k == "probe_exceeded" && v > 0) exceeded = true;
    if (exceeded)
      fmt::print("# WARNING: some rows read faster than the probe (pct_probe > 100 %): the probe is not this machine's "
                 "read limit; pct_ceiling uses the fastest rate seen instead\n");
  }
  return 0;
}

const BenchRegistration reg("awq", "awq_w4a16 per caller path vs bf16 GEMV, OpenBLAS sgemm and read bandwidth", run_awq);

}  // namespace
}  // namespace nibble::cli
