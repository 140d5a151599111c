// `nibble bench --op awq [--json] [-r N] [--quick] [--shapes "M,K,N;..."]`
//
// For each shape, in one process run: the awq_w4a16 op (bf16 x and scales, the ComfyUI case), the
// same product on bf16 weights (bench::gemv_bf16_weights), OpenBLAS sgemv/sgemm on the dequantized
// fp32 weights (the CPU peer), and the machine's read bandwidth measured first with the same
// threads. Weights are rotated among enough copies to exceed 2× the L3, so every call streams them
// from memory, as in a model where each layer is used once per step.
#include <fmt/format.h>

#include <random>
#include <sstream>

#include "bench_registry.h"
#include "bench_util.h"
#include "kernels/awq_w4a16_kernels.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

namespace nibble::cli {
namespace {

using bench::Shape3;

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
  // Bandwidth: a 256 MiB read sweep (AVX loads, same threads) interleaved with every repetition, so
  // pct_stream compares the op with the machine at the same moment (>= 1 GiB read per shape).
  bench::ReadProbe probe(size_t(256) << 20);
  if (!o.json)
    fmt::print("# awq_w4a16: {} threads; G={}, x/scales bf16; weights rotated over > 2x L3; each repetition runs "
               "read-probe, op, op-stored, bf16, sgemm in turn (medians); load average {:.2f}\n",
               num_threads(), G, load_before);
  std::vector<bench::Record> recs;
  std::mt19937 rng(1234);
  // group shapes by (K, N) so the weight copies are built once
  for (size_t i = 0; i < shapes.size();) {
    const int64_t K = shapes[i].K, N = shapes[i].N;
    Tensor q = Tensor::empty(DType::I8, {N, K / 2});
    for (int64_t j = 0; j < q.numel(); ++j) q.mutable_data<uint8_t>()[j] = uint8_t(rng());
    Tensor s32 = Tensor::empty(DType::F32, {K / G, N}), z32 = Tensor::empty(DType::F32, {K / G, N});
    std::uniform_real_distribution<float> us(0.002f, 0.02f), uz(-0.1f, 0.1f);
    for (int64_t j = 0; j < s32.numel(); ++j) s32.mutable_data<float>()[j] = us(rng), z32.mutable_data<float>()[j] = uz(rng);
    const Tensor s = s32.to(DType::BF16), z = z32.to(DType::BF16);
    const uint64_t int4_bytes = q.nbytes() + s.nbytes() + z.nbytes();
    bench::RotatingCopies w4({q, s, z}, bench::copies_to_defeat_cache(int4_bytes));
    // the runtime's path: weights prepared once at load (tiled repack where the ISA has it)
    std::vector<std::shared_ptr<const AwqW4A16Prepared>> w4p;
    for (int c = 0; c < w4.size(); ++c) {
      AwqW4A16Params prm;
      prm.qweight = w4.at(c)[0], prm.wscales = w4.at(c)[1], prm.wzeros = w4.at(c)[2];
      prm.N = N, prm.K = K, prm.group_size = G;
      w4p.push_back(prepare_awq_w4a16(prm));
    }
    // dequantized weights for the peers (fp32 for OpenBLAS, bf16 for the bf16 baseline)
    Tensor Wf = Tensor::empty(DType::F32, {N, K});
    {
      // W = dequantize via the op on an identity would be slow; direct formula
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
    const bool blas = bench::openblas_available();
    std::unique_ptr<bench::RotatingCopies> wf32;
    if (blas) wf32 = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{Wf}, bench::copies_to_defeat_cache(Wf.nbytes()));

    for (; i < shapes.size() && shapes[i].K == K && shapes[i].N == N; ++i) {
      const int64_t M = shapes[i].M;
      std::normal_distribution<float> nd(0.f, 1.f);
      Tensor x32 = Tensor::empty(DType::F32, {M, K});
      for (int64_t j = 0; j < x32.numel(); ++j) x32.mutable_data<float>()[j] = nd(rng);
      const Tensor xb = x32.to(DType::BF16);
      const Tensor xf = xb.to_f32();
      Tensor yb = Tensor::empty(DType::F32, {M, N}), yf = Tensor::empty(DType::F32, {M, N});
      // more samples for the short cases; >= 4 probe sweeps (1 GiB) per shape
      const int r = M >= 64 ? std::max(5, reps) : reps * 4;

      // one interleaved round per repetition: probe sweep, op (prepared), op (stored layout), bf16, sgemm
      int c_op = 0, c_st = 0, c_bf = 0, c_bl = 0;
      std::vector<bench::InterleavedCase> fns = {
          {[&](int) { probe.sweep(); }},
          {[&](int) { (void)gemv_awq_w4a16(xb, *w4p[size_t(c_op++) % w4p.size()]); }},
          {[&](int) {
            const auto& c = w4.at(c_st++);
            (void)gemv_awq_w4a16(xb, c[0], c[1], c[2], Tensor(), G);
          }},
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
      const std::vector<bench::Timing> T = bench::time_interleaved(r, fns);
      const bench::Timing T_probe = T[0], T_op = T[1], T_stored = T[2], T_bf16 = T[3];
      const bench::Timing T_blas = blas ? T[4] : bench::Timing{NAN, NAN, {}};
      const double stream = double(probe.bytes()) / T_probe.median / 1e9;
      const double t_op = T_op.median, t_bf16 = T_bf16.median, t_blas = T_blas.median;
      const double gbs = double(int4_bytes) / t_op / 1e9;
      bench::Record rec;
      rec.s("op", "awq_w4a16").n("M", double(M)).n("K", double(K)).n("N", double(N)).n("G", double(G));
      rec.s("isa", isa_name(active_isa())).s("path", kernels::awq::path_name(active_isa(), M, G, DType::BF16, DType::BF16, true));
      rec.n("threads", num_threads()).n("weight_MB", double(int4_bytes) / 1e6);
      rec.n("op_ms", t_op * 1e3).n("weight_GBps", gbs).n("stream_GBps", stream).n("pct_stream", 100.0 * gbs / stream);
      rec.n("bf16_GBps", double(Wb.nbytes()) / t_bf16 / 1e9);
      // paired: median over repetitions of the ratio within one repetition (runs moments apart)
      rec.n("pct_stream_paired", 100.0 * double(int4_bytes) / double(probe.bytes()) * bench::paired_ratio(T_probe, T_op));
      rec.n("speedup_vs_bf16_paired", bench::paired_ratio(T_bf16, T_op));
      rec.n("speedup_vs_sgemm_paired", blas ? bench::paired_ratio(T_blas, T_op) : NAN);
      rec.n("stored_ms", T_stored.median * 1e3).n("pct_stream_stored", 100.0 * double(int4_bytes) / T_stored.median / 1e9 / stream);
      rec.n("bf16_ms", t_bf16 * 1e3).n("speedup_vs_bf16", t_bf16 / t_op);
      rec.n("sgemm_ms", t_blas * 1e3).n("speedup_vs_sgemm", t_blas / t_op);
      rec.n("gflops", 2.0 * double(M) * double(N) * double(K) / t_op / 1e9);
      // best-of-runs figures: the machine without the shared host's preemptions
      rec.n("op_best_ms", T_op.best * 1e3)
          .n("pct_stream_best", 100.0 * double(int4_bytes) / T_op.best / (double(probe.bytes()) / T_probe.best));
      rec.n("speedup_vs_bf16_best", T_bf16.best / T_op.best).n("speedup_vs_sgemm_best", T_blas.best / T_op.best);
      rec.n("loadavg", bench::load_average());
      recs.push_back(rec);
      if (!o.json) fmt::print(stderr, "  done M={} K={} N={}\n", M, K, N);
    }
  }
  if (o.json) {
    fmt::print("{}", bench::records_to_json(recs));
  } else {
    fmt::print("{}", bench::records_to_table(recs, {"M", "K", "N", "isa", "path", "threads", "op_ms", "weight_GBps",
                                                    "pct_stream", "stored_ms", "pct_stream_stored", "bf16_ms", "speedup_vs_bf16", "sgemm_ms",
                                                    "speedup_vs_sgemm", "stream_GBps", "bf16_GBps", "pct_stream_paired", "speedup_vs_bf16_paired",
                                                    "speedup_vs_sgemm_paired", "op_best_ms", "pct_stream_best",
                                                    "speedup_vs_bf16_best", "speedup_vs_sgemm_best", "loadavg"}));
  }
  return 0;
}

const BenchRegistration reg("awq", "awq_w4a16 op vs bf16 GEMV, OpenBLAS sgemm and read bandwidth", run_awq);

}  // namespace
}  // namespace nibble::cli
