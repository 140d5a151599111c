// linear_bf16 / the bf16 dense GEMM: every ISA path against an fp64 oracle with bounds derived from
// the arithmetic, outputs NaN-poisoned, thread-count bit identity, the scalar reference, validation.
//
// The arithmetic (kernels/dense_bf16.h, docs/dense.md): x̂ = bf16(x), ŵ = bf16(w) (RNE, relative
// error ≤ u_b = 2^-8 each; ŵ = w when W is stored bf16). x̂·ŵ is exact in fp32 (8 + 8 significand
// bits ≤ 24), and the K products are summed in fp32: |ŷ − Σ x̂ŵ| ≤ γ_K·Σ|x̂ŵ|, γ_K = K·u/(1 − K·u),
// u = 2^-24 (any order, fused or not). Against the unrounded inputs add Σ|x̂ŵ − xw| ≤
// (2u_b + u_b²)·Σ|xw| (u_b·Σ|xw| when only x is rounded). The bias add is one more fp32 rounding.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/dense_bf16_kernels.h"
#include "kernels/workspace.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "isa_guard.h"

using namespace nibble;
namespace db = nibble::kernels::dense_bf16;

namespace {

Tensor random_tensor(DType dt, Shape shape, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor f = Tensor::empty(DType::F32, shape);
  float* p = f.mutable_data<float>();
  for (int64_t i = 0; i < f.numel(); ++i) p[i] = nd(rng);
  return dt == DType::F32 ? f : f.to(dt);
}

struct FillGuard {
  FillGuard() { kernels::set_test_fill(std::numeric_limits<float>::quiet_NaN()); }
  ~FillGuard() { kernels::set_test_fill(std::nullopt); }
};

float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// Checks y against two oracles: the fp64 sum of the rounded inputs (bound γ_K·Σ|x̂ŵ| + bias rounding)
// and the fp64 sum of the unrounded inputs (plus the input-rounding term).
void check_against_fp64(const Tensor& x, const Tensor& w, const Tensor& b, const float* y) {
  const Tensor xf = x.to_f32(), wf = w.to_f32();
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  const double u = std::ldexp(1.0, -24), ub = std::ldexp(1.0, -8), gamma = K * u / (1 - K * u);
  const double in_round = w.dtype() == DType::BF16 ? ub : 2 * ub + ub * ub;
  const float* xp = xf.data<float>();
  const float* wp = wf.data<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double exact_r = 0, mag_r = 0, exact = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double pr = double(round_bf16(xp[m * K + k])) * double(round_bf16(wp[n * K + k]));
        exact_r += pr, mag_r += std::fabs(pr);
        const double p = double(xp[m * K + k]) * double(wp[n * K + k]);
        exact += p, mag += std::fabs(p);
      }
      const double bias = b.defined() ? double(b.to_f32().data<float>()[n]) : 0.0;
      const float got = y[m * N + n];
      ASSERT_FALSE(std::isnan(got)) << "unwritten or NaN output m=" << m << " n=" << n;
      const double tol_r = gamma * mag_r + u * (std::fabs(exact_r) + gamma * mag_r + std::fabs(bias)) + 1e-30;
      ASSERT_LE(std::fabs(double(got) - (exact_r + bias)), tol_r) << "m=" << m << " n=" << n << " K=" << K;
      const double tol = tol_r + in_round * mag;
      ASSERT_LE(std::fabs(double(got) - (exact + bias)), tol) << "m=" << m << " n=" << n << " K=" << K;
    }
}

// odd M, N not a multiple of 32 or 128, K odd / not a multiple of the k chunk (kKcPairs pairs: K = 3200
// is two chunks, 6145 three with a ragged last pair), M across row blocks
const int64_t kShapes[][3] = {{1, 1, 1},     {5, 3, 7},     {13, 33, 31},    {12, 64, 32},  {25, 255, 97},
                              {193, 300, 65}, {7, 513, 129}, {200, 257, 161}, {3, 2, 300}, {11, 1001, 33},
                              {9, 3200, 70},  {2, 6145, 17}};

}  // namespace

TEST(DenseBf16, AllIsasMatchFp64Oracle) {
  IsaGuard guard;
  FillGuard fill;
  std::mt19937 rng(2024);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (const auto& s : kShapes)
      for (DType wdt : {DType::BF16, DType::F32, DType::F16}) {
        SCOPED_TRACE(testing::Message() << isa_name(isa) << " M=" << s[0] << " K=" << s[1] << " N=" << s[2]
                                        << " w=" << dtype_name(wdt));
        const Tensor x = random_tensor(DType::F32, {s[0], s[1]}, rng);
        const Tensor w = random_tensor(wdt, {s[2], s[1]}, rng);
        const Tensor b = random_tensor(DType::F32, {s[2]}, rng);
        const Tensor y = linear_bf16(x, w, b);
        check_against_fp64(x, w, b, y.data<float>());
      }
  }
}

// bf16 x is read as its own pairs (run_packed_bf16x: no rounding pass, no copy for even K in one chunk);
// the result must equal the fp32 path on the widened x bit for bit, on every ISA, with denormal and
// signed-zero inputs (vdpbf16ps reads a denormal as zero, as the fp32 path's rounding flushes it).
TEST(DenseBf16, Bf16XEqualsWidenedXBitwise) {
  IsaGuard guard;
  FillGuard fill;
  std::mt19937 rng(31);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (const auto& s : kShapes) {
      SCOPED_TRACE(testing::Message() << isa_name(isa) << " M=" << s[0] << " K=" << s[1] << " N=" << s[2]);
      Tensor x = random_tensor(DType::BF16, {s[0], s[1]}, rng);
      uint16_t* xb = x.mutable_data<uint16_t>();
      for (int64_t i = 0; i < x.numel(); i += 7) xb[i] = (i / 7) % 3 == 0 ? 0x0001 : (i / 7) % 3 == 1 ? 0x8003 : 0x8000;
      const Tensor w = random_tensor(DType::BF16, {s[2], s[1]}, rng);
      const Tensor b = random_tensor(DType::F32, {s[2]}, rng);
      const Tensor yb = linear_bf16(x, w, b);
      const Tensor yf = linear_bf16(x.to_f32(), w, b);
      ASSERT_EQ(0, std::memcmp(yb.raw(), yf.raw(), yb.nbytes()));
      check_against_fp64(x, w, b, yb.data<float>());
    }
  }
}

TEST(DenseBf16, DriverWritesEveryOutputOfAPoisonedBuffer) {
  std::mt19937 rng(7);
  for (const auto& s : kShapes) {
    const int64_t M = s[0], K = s[1], N = s[2];
    const Tensor x = random_tensor(DType::F32, {M, K}, rng);
    const Tensor w = random_tensor(DType::BF16, {N, K}, rng);
    const db::PackedBf16Weight pw = db::pack_weight(w.raw(), w.dtype(), N, K);
    // one poisoned guard element past the end must stay NaN (no write past N·M)
    std::vector<float> y(size_t(M * N) + 1, std::numeric_limits<float>::quiet_NaN());
    db::run_packed(x.data<float>(), M, pw, nullptr, y.data());
    check_against_fp64(x, w, Tensor(), y.data());
    EXPECT_TRUE(std::isnan(y.back())) << "wrote past the output M=" << M << " K=" << K << " N=" << N;
  }
}

TEST(DenseBf16, ReferenceMatchesFp64Oracle) {
  std::mt19937 rng(99);
  for (const auto& s : kShapes) {
    const int64_t M = s[0], K = s[1], N = s[2];
    const Tensor x = random_tensor(DType::F32, {M, K}, rng);
    const Tensor w = random_tensor(DType::F32, {N, K}, rng);
    std::vector<float> y(size_t(M * N), std::numeric_limits<float>::quiet_NaN());
    db::dense_bf16_ref(x.data<float>(), M, K, w.raw(), w.dtype(), N, y.data(), 0, N);
    check_against_fp64(x, w, Tensor(), y.data());
  }
}

TEST(DenseBf16, BitIdenticalForAnyThreadCount) {
  const int saved = num_threads();
  std::mt19937 rng(5);
  for (const auto& s : {std::array<int64_t, 3>{385, 700, 300}, std::array<int64_t, 3>{9, 257, 161}}) {
    const Tensor x = random_tensor(DType::F32, {s[0], s[1]}, rng);
    const Tensor w = random_tensor(DType::BF16, {s[2], s[1]}, rng);
    const Tensor b = random_tensor(DType::F32, {s[2]}, rng);
    set_num_threads(1);
    const Tensor y1 = linear_bf16(x, w, b);
    for (int t : {2, 3, 5}) {
      set_num_threads(t);
      const Tensor yt = linear_bf16(x, w, b);
      EXPECT_EQ(0, std::memcmp(y1.raw(), yt.raw(), y1.nbytes())) << "threads=" << t;
    }
  }
  set_num_threads(saved);
}

TEST(DenseBf16, PlanPerIsa) {
  for (Isa isa : supported_isas()) {
    const db::Plan pl = db::plan(isa);
    EXPECT_EQ(pl.reference, isa < Isa::Avx512Bf16) << isa_name(isa);
    EXPECT_EQ(pl.gemm != nullptr, !pl.reference) << isa_name(isa);
    EXPECT_EQ(pl.pack_x != nullptr, !pl.reference) << isa_name(isa);
  }
}

TEST(DenseBf16, RejectsBadShapes) {
  std::mt19937 rng(1);
  const Tensor x = random_tensor(DType::F32, {4, 8}, rng);
  EXPECT_THROW(linear_bf16(x, random_tensor(DType::F32, {3, 9}, rng)), Error);
  EXPECT_THROW(linear_bf16(x, random_tensor(DType::F32, {3, 8}, rng), random_tensor(DType::F32, {4}, rng)), Error);
  EXPECT_THROW(linear_bf16(x, random_tensor(DType::F32, {24}, rng)), Error);
}

#include "nibble/nn.h"

TEST(DenseBf16, LinearOptInPath) {
  std::mt19937 rng(31);
  const int64_t M = 21, K = 97, N = 45;
  const Tensor x = random_tensor(DType::F32, {M, K}, rng);
  const Tensor b = random_tensor(DType::F32, {N}, rng);
  const Tensor wb = random_tensor(DType::BF16, {N, K}, rng), wf = random_tensor(DType::F32, {N, K}, rng);
  const nn::DenseMath saved = nn::dense_math();
  {
    nn::set_dense_math(nn::DenseMath::Bf16);
    const nn::Linear lb = nn::Linear::from_float("t.bf16", wb, b), lf = nn::Linear::from_float("t.f32", wf, b);
    const Tensor yb = lb.forward(x), yf = lf.forward(x);
    if (kernels::dense_bf16::supported()) {
      const Tensor ref = linear_bf16(x, wb, b);
      EXPECT_EQ(0, std::memcmp(yb.raw(), ref.raw(), ref.nbytes())) << "bf16 weights must take the bf16 GEMM";
    } else {
      const Tensor ref = linear_f32(x, wb, b);
      EXPECT_EQ(0, std::memcmp(yb.raw(), ref.raw(), ref.nbytes())) << "without AVX-512 BF16 the fp32 path stays";
    }
    check_against_fp64(x, wb, b, yb.data<float>());
    const Tensor reff = linear_f32(x, wf, b);  // fp32-stored weights keep the fp32 path
    EXPECT_EQ(0, std::memcmp(yf.raw(), reff.raw(), reff.nbytes()));
  }
  {
    nn::set_dense_math(nn::DenseMath::F32);
    const nn::Linear lb = nn::Linear::from_float("t.bf16", wb, b);
    const Tensor y = lb.forward(x), ref = linear_f32(x, wb, b);
    EXPECT_EQ(0, std::memcmp(y.raw(), ref.raw(), ref.nbytes())) << "the default stays the fp32 GEMM";
  }
  nn::set_dense_math(saved);
}
