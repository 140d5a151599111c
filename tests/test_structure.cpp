// Structural guarantees of issue 15: format traits decide what a format can do (not its name),
// the mapped originals a repack made redundant are released without losing their bytes, and the
// benchmarks' one median helper picks the true median.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <set>

#include "devtools/bench_memory.h"
#include "devtools/bench_peers.h"
#include "devtools/bench_timing.h"
#include "isa_guard.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/sample.h"
#include "nibble/safetensors.h"
#include "test_io_common.h"

namespace nibble {
namespace {

TEST(FormatTraits, ConsistentWithTheRegistry) {
  std::set<FusedKernel> fused;
  for (const FormatInfo& f : all_formats()) {
    SCOPED_TRACE(f.name);
    EXPECT_EQ(f.has_fused_kernel, f.fused != FusedKernel::None);
    if (f.fused != FusedKernel::None) {
      EXPECT_TRUE(fused.insert(f.fused).second) << "one format per fused kernel";
    }
    if (f.is_int4) {
      EXPECT_EQ(f.weight_bits, 4);
    }
    if (f.has_lowrank) {  // the low-rank branch's tensors are parameters of the format
      bool down = false, up = false;
      for (const ParamSpec& p : f.params) down |= p.canonical == "proj_down", up |= p.canonical == "proj_up";
      EXPECT_TRUE(down && up);
    }
    if (f.has_smoothing) {
      bool smooth = false;
      for (const ParamSpec& p : f.params) smooth |= p.canonical == "smooth_factor";
      EXPECT_TRUE(smooth);
    }
    EXPECT_GE(f.row_padding, 0);
  }
  EXPECT_EQ(fused.size(), 2u);
  const FormatInfo* awq = find_format("awq_w4a16");
  const FormatInfo* svd = find_format("svdquant_w4a4");
  ASSERT_TRUE(awq && svd);
  EXPECT_EQ(awq->fused, FusedKernel::AwqW4A16);
  EXPECT_TRUE(awq->is_int4 && awq->has_group_size && !awq->act_quantized && !awq->has_lowrank);
  EXPECT_EQ(svd->fused, FusedKernel::SvdquantW4A4);
  EXPECT_TRUE(svd->is_int4 && svd->act_quantized && svd->has_lowrank && svd->has_act_unsigned &&
              svd->supports_tile_layout);
  EXPECT_EQ(svd->fixed_group_size, 64);
  EXPECT_EQ(find_format("nvfp4")->row_padding, 16);
  EXPECT_EQ(find_format("mxfp8")->row_padding, 32);
}

TEST(ReleaseMappedPages, FileViewsKeepTheirBytesHeapIsUntouched) {
  testing_io::ScratchDir dir;
  const std::string path = dir.file("big.safetensors");
  Tensor a = Tensor::empty(DType::F32, {1 << 16});  // 256 KiB: many whole pages
  for (int64_t i = 0; i < a.numel(); ++i) a.mutable_data<float>()[i] = float(i) * 0.5f - 7.0f;
  save_safetensors(path, {{"a", a}});
  const auto f = SafetensorsFile::open(path);
  const Tensor v = f->get("a");
  ASSERT_EQ(std::memcmp(v.raw(), a.raw(), a.nbytes()), 0);
  EXPECT_GT(release_mapped_pages(v), size_t(0));
  // the view faults its bytes in again from the file
  EXPECT_EQ(std::memcmp(v.raw(), a.raw(), a.nbytes()), 0);
  // heap memory is never advised (MADV_DONTNEED would zero it)
  Tensor h = a.clone();
  EXPECT_EQ(release_mapped_pages(h), size_t(0));
  EXPECT_EQ(std::memcmp(h.raw(), a.raw(), a.nbytes()), 0);
  EXPECT_EQ(release_mapped_pages(Tensor()), size_t(0));
}

TEST(ReleaseMappedPages, LoadedFusedLayersStillSaveAndDequantizeExactly) {
  testing_io::ScratchDir dir;
  const std::string path = dir.file("sample.safetensors");
  SampleOptions so;
  so.hidden = 128;
  so.rank = 8;
  write_sample_checkpoint(path, so);
  const auto file = SafetensorsFile::open(path);
  const nn::Model model = nn::load_checkpoint(path);
  int fused = 0;
  for (const std::string& name : model.names()) {
    const nn::Linear& l = model.linear(name);
    if (l.path() != nn::LinearPath::AwqW4A16 && l.path() != nn::LinearPath::SvdquantW4A4) continue;
    ++fused;
    // every stored tensor still holds the file's bytes after the load released its pages
    for (const auto& [key, t] : l.layer().params) {
      SCOPED_TRACE(name + "." + key);
      bool found = false;
      for (const TensorInfo& ti : file->tensors())
        if (ti.name.rfind(name + ".", 0) == 0 && ti.nbytes() == t.nbytes() &&
            std::memcmp(file->get(ti.name).raw(), t.raw(), t.nbytes()) == 0)
          found = true;
      EXPECT_TRUE(found);
    }
    const Tensor w = l.effective_weight();
    const Tensor ref = dequantize(l.layer());
    ASSERT_EQ(w.nbytes(), ref.nbytes());
    EXPECT_EQ(std::memcmp(w.raw(), ref.raw(), w.nbytes()), 0) << name;
  }
  EXPECT_GE(fused, 2);
}

TEST(BenchMedian, TrueMedianForOddAndEvenCounts) {
  EXPECT_TRUE(std::isnan(bench::median({})));
  EXPECT_EQ(bench::median({3.0}), 3.0);
  EXPECT_EQ(bench::median({5.0, 1.0, 3.0}), 3.0);
  EXPECT_EQ(bench::median({4.0, 1.0, 3.0, 2.0}), 2.5);  // mean of the two middle values
  EXPECT_EQ(bench::best({4.0, 1.0, 3.0}), 1.0);
  bench::Timing a{0, 0, {2.0, 4.0, 6.0, 8.0}}, b{0, 0, {1.0, 1.0, 2.0, 1.0}};
  EXPECT_EQ(bench::paired_ratio(a, b), 3.5);  // per-repetition ratios 2, 4, 3, 8 → (3 + 4) / 2
}

// The bf16 GEMV yardstick of `bench --op awq` at every ISA level (it follows nibble's active level):
// fp32 sums of exact bf16 products, so against a double oracle each output is within the fp32
// summation bound K·2^-24·Σ|w·x| (a loose form of γ_K), for M = 1..6 and K not a multiple of 16/32.
TEST(BenchPeers, Bf16GemvYardstickAtEveryLevel) {
  IsaGuard guard;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t M : {1, 3, 6})
    for (int64_t K : {64, 100}) {
      const int64_t N = 70;
      std::vector<uint16_t> x(size_t(M * K)), w(size_t(N * K));
      for (auto& v : x) v = f32_to_bf16(nd(rng));
      for (auto& v : w) v = f32_to_bf16(nd(rng));
      for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Avx512Bf16}) {
        if (!isa_supported(isa)) continue;
        set_isa(isa);
        std::vector<float> y(size_t(M * N), NAN);
        bench::gemv_bf16_weights(M, N, K, x.data(), w.data(), y.data());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              const double p = double(bf16_to_f32(w[size_t(n * K + k)])) * bf16_to_f32(x[size_t(m * K + k)]);
              ref += p;
              mag += std::fabs(p);
            }
            const float got = y[size_t(m * N + n)];
            ASSERT_FALSE(std::isnan(got)) << isa_name(isa);
            ASSERT_LE(std::fabs(got - ref), double(K) * std::ldexp(mag, -24)) << isa_name(isa) << " M=" << M << " K=" << K;
          }
      }
    }
}

TEST(BenchMemory, ProcessMemoryIsRead) {
  const bench::ProcessMemory m = bench::process_memory();
  EXPECT_GT(m.rss, uint64_t(0));
  EXPECT_LE(m.anon, m.rss);
}

}  // namespace
}  // namespace nibble
