// Google Benchmark of the svdquant_w4a4 layer: the fused svdquant_linear, the two kitchen ops, and the
// register-only VNNI loop (the int8 roofline) — counters report GOP/s (2·M·N·K per call). The fused
// layer rotates among prepared copies larger than 2x the L3 (devtools/bench_memory.h), so its
// weights are never cache-warm from the previous call.
// The full comparison table (stages, OpenBLAS sgemm, % of peak) is `nibble bench --op w4a4`.
#include <benchmark/benchmark.h>

#include <random>

#include "devtools/bench_memory.h"
#include "devtools/bench_peers.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "devtools/random_tensor.h"
#include "kernels/svdquant_w4a4_kernels.h"

using namespace nibble;

namespace {

constexpr auto rnd = nibble::bench::random_tensor;

SvdquantW4A4Params layer(int64_t N, int64_t K, int64_t R) {
  std::mt19937 rng(7);
  SvdquantW4A4Params p;
  p.N = N, p.K = K, p.R = R;
  p.qweight = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t i = 0; i < p.qweight.numel(); ++i) p.qweight.mutable_data<uint8_t>()[i] = uint8_t(rng());
  p.wscales = rnd(rng, DType::BF16, {K / 64, N}, 0.001f, 0.02f);
  p.smooth = rnd(rng, DType::BF16, {K}, 0.5f, 2.0f);
  p.proj_down = rnd(rng, DType::BF16, {K, R}, -0.05f, 0.05f);
  p.proj_up = rnd(rng, DType::BF16, {N, R}, -0.05f, 0.05f);
  p.bias = rnd(rng, DType::BF16, {N}, -0.1f, 0.1f);
  return p;
}

void BM_svdquant_linear(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2), R = 32;
  const SvdquantW4A4Params p = layer(N, K, R);
  std::vector<std::shared_ptr<const SvdquantW4A4Prepared>> preps;
  const size_t prep_bytes = size_t(N * K / 2 + (K / 64) * N * 4 + N * R * 4 + K * R * 4);
  for (int c = 0, n = bench::copies_to_defeat_cache(prep_bytes); c < n; ++c) preps.push_back(prepare_svdquant_w4a4(p));
  std::mt19937 rng(1);
  const Tensor x = rnd(rng, DType::F32, {M, K}, -2, 2);
  size_t i = 0;
  for (auto _ : st) benchmark::DoNotOptimize(svdquant_linear(x, *preps[i++ % preps.size()], DType::F32));
  st.counters["GOPs"] = benchmark::Counter(2.0 * M * N * K, benchmark::Counter::kIsIterationInvariantRate,
                                           benchmark::Counter::kIs1000);
  st.SetLabel(isa_name(active_isa()));
}

void BM_two_ops(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2), R = 32;
  const SvdquantW4A4Params p = layer(N, K, R);
  std::mt19937 rng(1);
  const Tensor x = rnd(rng, DType::BF16, {M, K}, -2, 2);
  for (auto _ : st) {
    const SvdquantActs a = quantize_svdquant_w4a4(x, p.smooth, p.proj_down);
    benchmark::DoNotOptimize(
        scaled_mm_svdquant_w4a4(a.q_x, p.qweight, a.ascales, p.wscales, a.lora_act, p.proj_up, p.bias));
  }
  st.counters["GOPs"] = benchmark::Counter(2.0 * M * N * K, benchmark::Counter::kIsIterationInvariantRate,
                                           benchmark::Counter::kIs1000);
}

void BM_vnni_peak_one_thread(benchmark::State& st) {
  if (!isa_supported(Isa::Avx512Vnni)) {
    st.SkipWithError("no AVX-512 VNNI");
    return;
  }
  double ops = 0;
  for (auto _ : st) ops += bench::vnni_peak_ops(1000000);
  st.counters["GOPs"] = benchmark::Counter(ops, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// The activation quantizer alone, one thread, x in cache (16 rows of K = 3072 fp32: 192 KiB, L2):
// the plan's kernel of each ISA level against the scalar reference, in groups of 64 per second.
void BM_quantize_rows_in_cache(benchmark::State& st) {
  const Isa isa = Isa(st.range(0));
  if (!isa_supported(isa)) {
    st.SkipWithError("ISA not supported here");
    return;
  }
  const int64_t rows = 16, K = 3072, G = K / 64;
  std::mt19937 rng(3);
  const Tensor x = rnd(rng, DType::F32, {rows, K}, -2, 2), inv_s = rnd(rng, DType::F32, {K}, 0.5f, 2.0f);
  std::vector<int8_t> codes(size_t(rows * K));
  std::vector<float> sc(size_t(rows * G));
  std::vector<int32_t> corr(size_t(rows * G));
  const kernels::w4a4::Plan pl = kernels::w4a4::plan(isa);
  for (auto _ : st) {
    if (pl.quantize)
      pl.quantize(x.data<float>(), K, K, inv_s.data<float>(), false, codes.data(), sc.data(), corr.data(), 0, rows);
    else
      kernels::w4a4::quantize_ref(x.data<float>(), K, inv_s.data<float>(), false, codes.data(), sc.data(), 0, rows);
    benchmark::DoNotOptimize(codes.data());
  }
  st.counters["groups_per_s"] = benchmark::Counter(double(rows * G), benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(isa_name(isa));
}

}  // namespace

BENCHMARK(BM_quantize_rows_in_cache)
    ->Arg(int(Isa::Scalar))->Arg(int(Isa::Avx2))->Arg(int(Isa::Avx512))->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_vnni_peak_one_thread)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_svdquant_linear)
    ->Args({256, 3072, 3072})
    ->Args({4096, 3072, 3072})
    ->Args({256, 3072, 12288})
    ->Args({4096, 3072, 12288})
    ->Args({256, 12288, 3072})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_two_ops)->Args({256, 3072, 3072})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
