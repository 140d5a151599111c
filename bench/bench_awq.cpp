// Google Benchmark of the awq_w4a16 op (spec §2) on the Qwen-Image modulation shapes, next to its
// yardsticks: the same product on bf16 weights, OpenBLAS on fp32 weights, and the read bandwidth.
// Weights rotate over copies larger than 2× L3 (devtools/bench_memory.h), so each call streams from DRAM.
// The caller paths (as in `nibble bench --op awq`): BM_awq_linear_fp32 is nn::Linear (fp32 x, weights
// prepared at load, fp32 out), BM_awq_w4a16 the kitchen op on the stored layout (bf16 x),
// BM_awq_w4a16_prepared the op on prepared weights with bf16 x (a prepared-weight cache hit). Counters: bytes_per_second = weight bytes read per second (int4 + scales + zeros for the op).
// `nibble bench --op awq` prints the same comparison as ratios from one run (the preferred report).
#include <benchmark/benchmark.h>

#include <random>

#include <map>

#include "devtools/bench_util.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

using namespace nibble;

namespace {

constexpr int64_t kG = 64;

struct Weights {
  int64_t K, N;
  std::unique_ptr<bench::RotatingCopies> w4, wbf, wf32;
  std::vector<std::shared_ptr<const AwqW4A16Prepared>> prepared;  // one per w4 copy
  std::vector<nn::Linear> linears;                                 // one per w4 copy (prepared at load)
  uint64_t int4_bytes = 0;
};

Weights& weights(int64_t K, int64_t N) {
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Weights>> cache;
  auto& slot = cache[{K, N}];
  if (slot) return *slot;
  slot = std::make_unique<Weights>();
  Weights& w = *slot;
  w.K = K;
  w.N = N;
  std::mt19937 rng(42);
  Tensor q = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t i = 0; i < q.numel(); ++i) q.mutable_data<uint8_t>()[i] = uint8_t(rng());
  Tensor s32 = Tensor::empty(DType::F32, {K / kG, N}), z32 = Tensor::empty(DType::F32, {K / kG, N});
  std::uniform_real_distribution<float> us(0.002f, 0.02f), uz(-0.1f, 0.1f);
  for (int64_t i = 0; i < s32.numel(); ++i) s32.mutable_data<float>()[i] = us(rng), z32.mutable_data<float>()[i] = uz(rng);
  const Tensor s = s32.to(DType::BF16), z = z32.to(DType::BF16);
  w.int4_bytes = q.nbytes() + s.nbytes() + z.nbytes();
  w.w4 = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{q, s, z}, bench::copies_to_defeat_cache(w.int4_bytes));
  for (int c = 0; c < w.w4->size(); ++c) {
    AwqW4A16Params p;
    p.qweight = w.w4->at(c)[0], p.wscales = w.w4->at(c)[1], p.wzeros = w.w4->at(c)[2];
    p.N = N, p.K = K, p.group_size = kG;
    w.prepared.push_back(prepare_awq_w4a16(p));
    w.linears.push_back(nn::Linear::from_layer([&] {
      LayerSource src;
      src.name = "bench.awq";
      src.config = QuantConfig::parse(R"({"format":"awq_w4a16","group_size":64})", src.name);
      src.tensors = {{"weight", p.qweight}, {"weight_scale", p.wscales}, {"weight_zeros", p.wzeros}};
      return bind_layer(src);
    }()));
  }
  Tensor Wf = Tensor::empty(DType::F32, {N, K});
  const Tensor sf = s.to_f32(), zf = z.to_f32();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t b = q.data<uint8_t>()[n * (K / 2) + k / 2];
      const int code = k % 2 ? b >> 4 : b & 15;
      Wf.mutable_data<float>()[n * K + k] =
          float(code - 8) * sf.data<float>()[(k / kG) * N + n] + zf.data<float>()[(k / kG) * N + n];
    }
  const Tensor Wb = Wf.to(DType::BF16);
  w.wbf = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{Wb}, bench::copies_to_defeat_cache(Wb.nbytes()));
  if (bench::openblas_available())
    w.wf32 = std::make_unique<bench::RotatingCopies>(std::vector<Tensor>{Wf}, bench::copies_to_defeat_cache(Wf.nbytes()));
  return w;
}

Tensor activations(int64_t M, int64_t K) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return x.to(DType::BF16);
}

// The runtime's path: weights prepared at load (tiled stream on AVX-512).
void BM_awq_w4a16_prepared(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  Weights& w = weights(K, N);
  const Tensor x = activations(M, K);
  size_t i = 0;
  for (auto _ : st) {
    Tensor y = gemv_awq_w4a16(x, *w.prepared[i++ % w.prepared.size()]);
    benchmark::DoNotOptimize(y.raw());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(w.int4_bytes));
  st.SetLabel(std::string(isa_name(active_isa())) + " threads=" + std::to_string(num_threads()));
}

// nn::Linear::forward: fp32 x, prepared at load, fp32 out (the C++ runtime and nibble.load).
void BM_awq_linear_fp32(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  Weights& w = weights(K, N);
  const Tensor x = activations(M, K).to_f32();
  size_t i = 0;
  for (auto _ : st) {
    Tensor y = w.linears[i++ % w.linears.size()].forward(x);
    benchmark::DoNotOptimize(y.raw());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(w.int4_bytes));
  st.SetLabel(std::string(isa_name(active_isa())) + " threads=" + std::to_string(num_threads()));
}

// The op on the stored layout (what a caller without prepared weights gets).
void BM_awq_w4a16(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  Weights& w = weights(K, N);
  const Tensor x = activations(M, K);
  int i = 0;
  for (auto _ : st) {
    const auto& c = w.w4->at(i++);
    Tensor y = gemv_awq_w4a16(x, c[0], c[1], c[2], Tensor(), kG);
    benchmark::DoNotOptimize(y.raw());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(w.int4_bytes));
  st.SetLabel(std::string(isa_name(active_isa())) + " threads=" + std::to_string(num_threads()));
}

void BM_bf16_weights(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  Weights& w = weights(K, N);
  const Tensor x = activations(M, K);
  Tensor y = Tensor::empty(DType::F32, {M, N});
  int i = 0;
  for (auto _ : st) {
    bench::gemv_bf16_weights(M, N, K, x.data<uint16_t>(), w.wbf->at(i++)[0].data<uint16_t>(), y.mutable_data<float>());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * N * K * 2);
}

void BM_openblas_fp32(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  if (!bench::openblas_available()) {
    st.SkipWithError("OpenBLAS not found at build time");
    return;
  }
  Weights& w = weights(K, N);
  const Tensor x = activations(M, K).to_f32();
  Tensor y = Tensor::empty(DType::F32, {M, N});
  int i = 0;
  for (auto _ : st) {
    bench::sgemm_nt(M, N, K, x.data<float>(), w.wf32->at(i++)[0].data<float>(), y.mutable_data<float>());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * N * K * 4);
}

void BM_read_bandwidth(benchmark::State& st) {
  for (auto _ : st) st.counters["GBps"] = bench::read_bandwidth_gbs(size_t(256) << 20, size_t(1) << 30, 1);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int64_t N : {18432, 3072})
    for (int64_t M : {1, 2, 8, 64, 512}) b->Args({M, 3072, N});
  b->ArgNames({"M", "K", "N"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_read_bandwidth)->Iterations(3)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_awq_linear_fp32)->Apply(shapes);
BENCHMARK(BM_awq_w4a16_prepared)->Apply(shapes);
BENCHMARK(BM_awq_w4a16)->Apply(shapes);
BENCHMARK(BM_bf16_weights)->Apply(shapes);
BENCHMARK(BM_openblas_fp32)->Apply(shapes);
BENCHMARK_MAIN();
