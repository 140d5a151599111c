// Google Benchmark of the converter's truncated SVD (src/convert/svd.h): randomized rank-32 SVD of
// a true Qwen-Image shape — fc2, 3072 × 12288 fp32 (151 MB) — the step that dominates converting
// an SVDQuant layer. Moved here from tests/test_svd.cpp: a timing is a measurement, not a test.
//   ./build/bench/bench_svd --benchmark_repetitions=3
// Smaller shapes (the q/k/v 3072² layers, a 1024² layer) for the scaling; the exact (Eigen BDCSVD)
// method only at 1024² (it is O(N·K·min(N,K))).
#include <benchmark/benchmark.h>

#include "convert/svd.h"
#include "nibble/synth.h"
#include "nibble/thread_pool.h"

using namespace nibble;
using namespace nibble::convert_detail;

namespace {

void BM_svd(benchmark::State& st, SvdMethod method) {
  const int64_t N = st.range(0), K = st.range(1), R = st.range(2);
  const Tensor W = synth_weight(N, K, 1);
  int64_t rank = 0;
  for (auto _ : st) {
    LowRank lr = truncated_svd(W.data<float>(), N, K, R, method, 1);
    rank = lr.R;
    benchmark::DoNotOptimize(lr.U.data());
  }
  if (rank != R) st.SkipWithError("truncated_svd returned a different rank");
  st.counters["threads"] = num_threads();
  st.counters["MB"] = double(N * K * 4) / 1e6;
}

void BM_svd_randomized(benchmark::State& st) { BM_svd(st, SvdMethod::Randomized); }
void BM_svd_exact(benchmark::State& st) { BM_svd(st, SvdMethod::Exact); }

}  // namespace

BENCHMARK(BM_svd_randomized)
    ->Args({3072, 12288, 32})  // fc2 (the old test_svd QwenShapeSpeed case)
    ->Args({12288, 3072, 32})  // fc1
    ->Args({3072, 3072, 32})   // attention projections
    ->Args({1024, 1024, 32})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_svd_exact)->Args({1024, 1024, 32})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
