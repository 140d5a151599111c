// The kernel plans (src/kernels/*_kernels.h) and the drivers' buffers:
//  * the plan is the one place dispatch is decided: path_name reads it, every fast family has its
//    kernel, the bf16-weight tier appears exactly where the docs say;
//  * poisoning belongs to the tester: with kernels::set_test_fill(NaN) every buffer a driver hands a
//    kernel (and the output block a kernel writes in place) starts as NaN, and the result must equal
//    the unpoisoned run bit for bit — an element a kernel skipped would come out NaN;
//  * scratch slots are 64-byte aligned and keep their memory.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <functional>
#include <random>

#include "kernels/awq_w4a16_kernels.h"
#include "kernels/svdquant_w4a4_kernels.h"
#include "kernels/workspace.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

#include "test_tensors.h"

using namespace nibble;

namespace {

using testing_tensors::random_bytes;
using testing_tensors::random_f32;
using testing_tensors::same_bits;
int64_t nan_count(const Tensor& t) {
  const Tensor f = t.to_f32();
  int64_t n = 0;
  for (int64_t i = 0; i < f.numel(); ++i) n += std::isnan(f.data<float>()[i]);
  return n;
}

struct Guard {
  Isa isa = active_isa();
  ~Guard() {
    set_isa(isa);
    kernels::set_test_fill(std::nullopt);
  }
};

// Runs fn once plain and once with NaN-poisoned driver buffers; both must agree bit for bit and
// hold no NaN.
template <class F>
void expect_every_element_written(F fn, const std::string& label) {
  kernels::set_test_fill(std::nullopt);
  const Tensor plain = fn();
  kernels::set_test_fill(std::numeric_limits<float>::quiet_NaN());
  const Tensor poisoned = fn();
  kernels::set_test_fill(std::nullopt);
  EXPECT_EQ(nan_count(plain), 0) << label;
  EXPECT_EQ(nan_count(poisoned), 0) << label << ": a kernel left elements unwritten";
  EXPECT_TRUE(same_bits(plain, poisoned)) << label;
}

// A random bf16 svdquant_w4a4 layer (N, K, rank R), with or without a bias.
SvdquantW4A4Params random_svdquant(std::mt19937& rng, int64_t N, int64_t K, int64_t R, bool bias) {
  SvdquantW4A4Params p;
  p.N = N, p.K = K, p.R = R;
  p.qweight = random_bytes(rng, {N, K / 2});
  p.wscales = random_f32(rng, {K / 64, N}, 0.001f, 0.05f, DType::BF16);
  p.smooth = random_f32(rng, {K}, 0.3f, 3.0f, DType::BF16);
  p.proj_down = random_f32(rng, {K, R}, -0.1f, 0.1f, DType::BF16);
  p.proj_up = random_f32(rng, {N, R}, -0.1f, 0.1f, DType::BF16);
  if (bias) p.bias = random_f32(rng, {N}, -1, 1, DType::BF16);
  return p;
}
}  // namespace

TEST(KernelPlan, AwqPathNameIsThePlanName) {
  namespace awq = kernels::awq;
  for (Isa isa : supported_isas())
    for (int64_t M : {1, 4, 8, 9, 16, 17, 48, 49, 200})
      for (int64_t G : {64, 128, 30})
        for (DType xdt : {DType::F32, DType::BF16, DType::F16})
          for (DType sdt : {DType::BF16, DType::F16})
            for (bool prepared : {false, true}) {
              const awq::Plan p = awq::plan(isa, M, G, xdt, sdt, prepared && awq::prepared_has_tiled(G));
              EXPECT_STREQ(awq::path_name(isa, M, G, xdt, sdt, prepared), p.name);
              const std::string label = std::string(isa_name(isa)) + " M=" + std::to_string(M) + " " + p.name;
              switch (p.family) {
                case awq::Family::Reference: EXPECT_EQ(isa, Isa::Scalar) << label; break;
                case awq::Family::Tiled: EXPECT_TRUE(p.tiled_f32 || p.tiled_bf16) << label; break;
                case awq::Family::Gemv: EXPECT_TRUE(p.gemv) << label; break;
                case awq::Family::Gemm: EXPECT_TRUE(p.bf16_weights ? p.gemm_bf16 != nullptr : p.gemm != nullptr) << label; break;
              }
              // the bf16-weight tier: avx512bf16 GEMM on bf16 models only, never for G % 8 != 0
              EXPECT_EQ(p.bf16_weights, p.family == awq::Family::Gemm && isa == Isa::Avx512Bf16 && G % 8 == 0 &&
                                            sdt == DType::BF16)
                  << label;
              EXPECT_LE(int(p.isa), int(isa)) << label;
              EXPECT_TRUE(isa_supported(p.isa)) << label;
            }
}

TEST(KernelPlan, W4A4PlanHasEveryStageOnFastLevels) {
  namespace w4 = kernels::w4a4;
  for (Isa isa : supported_isas()) {
    const w4::Plan p = w4::plan(isa);
    EXPECT_EQ(p.isa, isa);
    if (isa == Isa::Scalar) {
      EXPECT_TRUE(p.reference);
      EXPECT_STREQ(p.name, "reference");
    } else {
      EXPECT_FALSE(p.reference) << isa_name(isa);
      EXPECT_TRUE(p.quantize && p.lora && p.gemm) << isa_name(isa);
    }
  }
}

TEST(KernelPlan, AwqEveryPlanWritesEveryElement) {
  Guard g;
  std::mt19937 rng(7);
  const int64_t N = 70, K = 256;  // N not a multiple of any tile: the tails are covered
  for (int64_t G : {64, 128}) {
    const Tensor q = random_bytes(rng, {N, K / 2});
    const Tensor s = random_f32(rng, {K / G, N}, 0.002f, 0.03f, DType::BF16);
    const Tensor z = random_f32(rng, {K / G, N}, -0.2f, 0.2f, DType::BF16);
    AwqW4A16Params prm;
    prm.qweight = q, prm.wscales = s, prm.wzeros = z, prm.N = N, prm.K = K, prm.group_size = G;
    const auto prep = prepare_awq_w4a16(prm);
    for (Isa isa : supported_isas())
      for (int64_t M : {1, 5, 9, 17, 33, 50})
        for (DType xdt : {DType::F32, DType::BF16}) {
          const Tensor x = random_f32(rng, {M, K}, -2, 2, xdt);
          set_isa(isa);
          const std::string label = std::string(isa_name(isa)) + " G=" + std::to_string(G) + " M=" +
                                    std::to_string(M) + " x=" + std::string(dtype_name(xdt));
          expect_every_element_written([&] { return gemv_awq_w4a16(x, q, s, z, Tensor(), G, DType::F32); },
                                       label + " stored " + kernels::awq::path_name(isa, M, G, xdt, DType::BF16, false));
          expect_every_element_written([&] { return gemv_awq_w4a16(x, *prep, DType::F32); },
                                       label + " prepared " + kernels::awq::path_name(isa, M, G, xdt, DType::BF16, true));
        }
  }
}

TEST(KernelPlan, W4A4EveryPlanWritesEveryElement) {
  Guard g;
  std::mt19937 rng(8);
  const int64_t N = 70, K = 256, R = 16;
  SvdquantW4A4Params p = random_svdquant(rng, N, K, R, /*bias=*/true);
  for (bool act_unsigned : {false, true}) {
    p.act_unsigned = act_unsigned;
    const auto prep = prepare_svdquant_w4a4(p);
    for (Isa isa : supported_isas())
      for (int64_t M : {1, 7, 100})
        for (DType out : {DType::F32, DType::BF16}) {
          const Tensor x = random_f32(rng, {M, K}, -0.2f, 3.0f, DType::BF16);
          set_isa(isa);
          expect_every_element_written([&] { return svdquant_linear(x, *prep, out); },
                                       std::string(isa_name(isa)) + " " + kernels::w4a4::plan(isa).name + " M=" +
                                           std::to_string(M) + " out=" + std::string(dtype_name(out)) +
                                           (act_unsigned ? " unsigned" : ""));
        }
  }
}

// The caller's output buffer (`out`, what nn::Linear passes): written in place, every element
// (pre-filled with NaN), the same bits as a fresh output; a wrong dtype / shape / read-only out is
// an error naming the op.
TEST(KernelPlan, OutParameterWrittenInPlace) {
  std::mt19937 rng(9);
  const int64_t N = 70, K = 256, R = 16;
  const SvdquantW4A4Params p = random_svdquant(rng, N, K, R, /*bias=*/false);
  const auto svd = prepare_svdquant_w4a4(p);
  AwqW4A16Params a;
  a.qweight = random_bytes(rng, {N, K / 2}), a.N = N, a.K = K, a.group_size = 64;
  a.wscales = random_f32(rng, {K / 64, N}, 0.002f, 0.03f, DType::BF16);
  a.wzeros = random_f32(rng, {K / 64, N}, -0.2f, 0.2f, DType::BF16);
  const auto awq = prepare_awq_w4a16(a);
  const std::function<Tensor(const Tensor&, const Tensor&)> ops[2] = {
      [&](const Tensor& x, const Tensor& out) { return svdquant_linear(x, *svd, DType::F32, out); },
      [&](const Tensor& x, const Tensor& out) { return gemv_awq_w4a16(x, *awq, DType::F32, out); }};
  const char* names[2] = {"svdquant_linear", "gemv_awq_w4a16"};
  for (int o = 0; o < 2; ++o)
    for (int64_t M : {1, 9, 100}) {
      const Tensor x = random_f32(rng, {M, K}, -0.5f, 2.0f);
      const Tensor fresh = ops[o](x, Tensor());
      Tensor out = Tensor::empty(DType::F32, {M, N});
      for (int64_t i = 0; i < out.numel(); ++i) out.mutable_data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
      const Tensor got = ops[o](x, out);
      EXPECT_EQ(got.raw(), out.raw()) << names[o] << " M=" << M;
      EXPECT_EQ(nan_count(out), 0) << names[o] << " M=" << M;
      EXPECT_TRUE(same_bits(out, fresh)) << names[o] << " M=" << M;
      for (const Tensor& bad : {Tensor::empty(DType::BF16, {M, N}), Tensor::empty(DType::F32, {M, N + 1}),
                                Tensor::view(DType::F32, {M, N}, out.raw(), nullptr)}) {
        try {
          ops[o](x, bad);
          ADD_FAILURE() << names[o] << ": a bad out was accepted";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find(std::string(names[o]) + ": out"), std::string::npos) << e.what();
        }
      }
    }
}

TEST(KernelWorkspace, ScratchIsAlignedAndGrowOnly) {
  using kernels::Slot;
  float* a = kernels::thread_scratch<float>(Slot::Stage, 100);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
  a[99] = 1.0f;
  float* b = kernels::thread_scratch<float>(Slot::Stage, 50);  // smaller: same memory
  EXPECT_EQ(a, b);
  float* c = kernels::thread_scratch<float>(Slot::Weights, 1 << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(c) % 64, 0u);
  EXPECT_NE(c, b);
  c[(1 << 20) - 1] = 2.0f;
  kernels::set_test_fill(-3.0f);
  float* d = kernels::thread_scratch<float>(Slot::Stage, 10);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(d[i], -3.0f);
  kernels::set_test_fill(std::nullopt);
  EXPECT_FALSE(kernels::test_fill_active());
}
