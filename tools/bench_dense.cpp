// `nibble bench --op dense [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// The bf16 dense GEMM (kernels/dense_bf16.h: bf16 inputs, fp32 accumulation — nn::Linear's
// DenseMath::Bf16 path) against, interleaved per repetition (rotating order): nibble's fp32 GEMM
// (linear_f32's packed panels, the default dense path), the same bf16 GEMM fed bf16 x (run_packed_bf16x:
// no rounding pass), OpenBLAS sgemm on fp32 W, and oneDNN's bf16 matmul (when built with libdnnl-dev; fed
// bf16 activations, its weight reordered once to its preferred layout). speedup_vs_dnnl_bf16 compares the
// two fed bf16 x; speedup_vs_dnnl_bf16_f32x nibble on fp32 x (rounded inside). Every case
// rotates among weight copies that together exceed 2x the L3. Ratios are medians of per-repetition
// ratios; GFLOP/s counts 2·M·N·K.
// pct_bf16_peak: GFLOP/s of the median run over the vdpbf16ps peak of the pool, i.e. the per-core
// peak (kernels::attention::bf16_peak_gflops, in thread CPU time, best of samples before and after
// the loop) × threads. The GEMM is timed in wall clock, so a preempted run on a shared host lowers it.
#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <random>

#include "bench_registry.h"
#include "devtools/bench_dnnl.h"
#include "devtools/bench_util.h"
#include "kernels/attention_kernels.h"
#include "kernels/dense_bf16.h"
#include "kernels/linear_f32.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

using bench::Shape3;

// The pool's vdpbf16ps peak in GFLOP/s: the best per-core sample × threads (NaN without AVX-512 BF16).
double pool_bf16_peak(int samples) {
#if defined(NIBBLE_HAVE_AVX512)  // the peak kernel is compiled with the AVX-512 kernels only
  if (!isa_supported(Isa::Avx512Bf16)) return NAN;
  double best = 0;
  for (int s = 0; s < samples; ++s) best = std::max(best, kernels::attention::bf16_peak_gflops(0.2));
  return best * num_threads();
#else
  (void)samples;
  return NAN;
#endif
}

int run_dense(const BenchOptions& o) {
  std::vector<Shape3> shapes;
  if (!o.shapes.empty()) shapes = bench::parse_shapes(o.shapes, "bench dense");
  else if (o.quick) shapes = {{512, 1024, 1024}};
  else shapes = {{4096, 3072, 3072}};
  const int reps = std::max(1, o.repeats);
  const bool bf16 = kernels::dense_bf16::supported();
  const bool blas = bench::openblas_available();
  const bool dnnl = bench::dnnl_available();
  const double load_before = bench::load_average();
  const double peak_before = pool_bf16_peak(o.quick ? 1 : 3);
  if (!o.json)
    fmt::print("# dense: vdpbf16ps peak {:.0f} GFLOP/s ({} threads, isa {}); bf16 kernel: {}; OpenBLAS: {}; "
               "oneDNN: {}; load average {:.2f}\n",
               peak_before, num_threads(), isa_name(active_isa()), bf16 ? "yes" : "no (scalar fallback, skipped)",
               blas ? bench::openblas_info() : "unavailable", bench::dnnl_info(), load_before);
  if (!bf16) {
    fmt::print(stderr, "bench dense: the bf16 GEMM needs AVX-512 BF16 (active isa {})\n", isa_name(active_isa()));
    return 1;
  }
  std::vector<bench::Record> recs;
  std::mt19937 rng(777);
  for (const Shape3& sh : shapes) {
    const int64_t M = sh.M, K = sh.K, N = sh.N;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    Tensor wf = Tensor::empty(DType::F32, {N, K});
    for (int64_t i = 0; i < wf.numel(); ++i) wf.mutable_data<float>()[i] = 0.02f * nd(rng);
    const Tensor wb = wf.to(DType::BF16);
    Tensor x = Tensor::empty(DType::F32, {M, K});
    for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
    const Tensor xb = x.to(DType::BF16);
    Tensor y = Tensor::empty(DType::F32, {M, N});
    std::vector<int32_t> ys;
    const int copies = bench::copies_to_defeat_cache(size_t(N * K) * 2);
    std::vector<kernels::dense_bf16::PackedBf16Weight> pb;
    std::vector<kernels::linear::PackedF32Weight> pf;
    for (int c = 0; c < copies; ++c) pb.push_back(kernels::dense_bf16::pack_weight(wb.raw(), DType::BF16, N, K));
    for (int c = 0, n = bench::copies_to_defeat_cache(size_t(N * K) * 4); c < n; ++c)
      pf.push_back(kernels::linear::pack_weight(wb.raw(), DType::BF16, N, K));
    std::unique_ptr<bench::RotatingCopies> W;
    if (blas) W = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{wb.to(DType::F32)}, bench::copies_to_defeat_cache(size_t(N * K) * 4));
    std::vector<std::unique_ptr<bench::DnnlBf16Matmul>> dm;
    if (dnnl)
      for (int c = 0; c < copies; ++c) dm.push_back(std::make_unique<bench::DnnlBf16Matmul>(M, N, K, wb.data<uint16_t>()));
    const double gflop = 2.0 * double(M) * double(N) * double(K) / 1e9;
    const int r = M * N * K >= int64_t(4096) * 3072 * 3072 ? std::max(3, reps) : reps;
    int c_b = 0, c_f = 0, c_s = 0, c_d = 0;
    std::vector<bench::InterleavedCase> cases = {
        {[&](int) { kernels::dense_bf16::run_packed(x.data<float>(), M, pb[size_t(c_b++) % pb.size()], nullptr, y.mutable_data<float>()); }},
        {[&](int) { kernels::linear::run_packed(x.data<float>(), M, pf[size_t(c_f++) % pf.size()], nullptr, y.mutable_data<float>()); }},
        // the same bf16 GEMM fed the bf16 x the oneDNN peer gets (its pairs read as they are)
        {[&](int) { kernels::dense_bf16::run_packed_bf16x(xb.data<uint16_t>(), M, pb[size_t(c_b++) % pb.size()], nullptr, y.mutable_data<float>()); }}};
    const size_t i_blas = cases.size();
    if (blas)
      cases.push_back({[&](int) { bench::sgemm_nt(M, N, K, x.data<float>(), W->at(c_s++)[0].data<float>(), y.mutable_data<float>()); }, true});
    const size_t i_dnnl = cases.size();
    if (dnnl)
      cases.push_back({[&](int) { dm[size_t(c_d++) % dm.size()]->run(xb.data<uint16_t>(), y.mutable_data<float>()); }, true});
    const std::vector<bench::Timing> T = bench::time_interleaved(r, cases);
    const double peak = std::max(peak_before, pool_bf16_peak(o.quick ? 1 : 2));
    const bench::Timing& Tb = T[0];
    bench::Record rec;
    rec.s("op", "dense_bf16").s("path", "nn.Linear DenseMath::Bf16").n("M", double(M)).n("K", double(K)).n("N", double(N));
    rec.s("isa", isa_name(active_isa())).n("threads", num_threads());
    rec.n("bf16_ms", Tb.median * 1e3).n("bf16_best_ms", Tb.best * 1e3).n("bf16_GFLOPs", gflop / Tb.median);
    rec.n("pct_bf16_peak", 100.0 * gflop / Tb.median / peak).n("pct_bf16_peak_best", 100.0 * gflop / Tb.best / peak);
    rec.n("f32_ms", T[1].median * 1e3).n("speedup_vs_f32", bench::paired_ratio(T[1], Tb));
    rec.n("sgemm_ms", blas ? T[i_blas].median * 1e3 : NAN).n("speedup_vs_sgemm", blas ? bench::paired_ratio(T[i_blas], Tb) : NAN);
    // against oneDNN like for like (both fed bf16 x); fp32 x (rounded by nibble first): *_f32x
    const bench::Timing& Tbx = T[2];
    rec.n("bf16x_ms", Tbx.median * 1e3).n("pct_bf16_peak_bf16x", 100.0 * gflop / Tbx.median / peak);
    rec.n("dnnl_bf16_ms", dnnl ? T[i_dnnl].median * 1e3 : NAN)
        .n("speedup_vs_dnnl_bf16", dnnl ? bench::paired_ratio(T[i_dnnl], Tbx) : NAN)
        .n("speedup_vs_dnnl_bf16_f32x", dnnl ? bench::paired_ratio(T[i_dnnl], Tb) : NAN);
    rec.n("bf16_peak_GFLOPs", peak).n("weight_copies", double(copies)).n("loadavg", bench::load_average());
    recs.push_back(rec);
    if (!o.json) fmt::print(stderr, "  done M={} K={} N={}\n", M, K, N);
  }
  if (o.json) {
    fmt::print("{}", bench::records_to_json(recs));
  } else {
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "threads", "bf16_ms", "bf16_GFLOPs", "pct_bf16_peak",
                                                    "pct_bf16_peak_best", "f32_ms", "speedup_vs_f32", "sgemm_ms",
                                                    "speedup_vs_sgemm", "bf16x_ms", "pct_bf16_peak_bf16x", "dnnl_bf16_ms", "speedup_vs_dnnl_bf16",
                                                    "speedup_vs_dnnl_bf16_f32x", "loadavg"}));
    fmt::print("# pct_bf16_peak: wall-clock GEMM vs the per-core vdpbf16ps peak (thread CPU time) x threads\n");
  }
  return 0;
}

const BenchRegistration reg("dense", "bf16 dense GEMM (vdpbf16ps) vs nibble fp32, OpenBLAS sgemm, oneDNN bf16 and the bf16 peak",
                            run_dense);

}  // namespace
}  // namespace nibble::cli
