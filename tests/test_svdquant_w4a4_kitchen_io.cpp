// Tests of the SVDQuant kitchen ops' tensor I/O (src/kernels/svdquant_w4a4_kitchen_io.h) and of the two
// op entry points built on it. Everything here is integer or exact, so every comparison is bit for bit:
//   - each ISA's pack / unpack / bf16→fp32 / f16→fp32 / fp32→bf16|f16 store against the scalar version on fresh random inputs
//     (odd row counts, several K, lengths off the vector width), destinations poisoned first and checked
//     untouched past the end; the two half conversions on all 65536 inputs (NaN payloads included);
//   - quantize_svdquant_w4a4 on bf16 / f16 x against the same op on the exactly widened fp32 x (same
//     codes, lora_act; ascales = the fp32 ones rounded once), with lora_x, padding and act_unsigned;
//   - both ops at 1 and 3 threads, and with the drivers' NaN test fill on (nothing left unwritten).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "kernels/svdquant_w4a4_kitchen_io.h"
#include "kernels/workspace.h"
#include "nibble/formats.h"
#include "nibble/isa.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "isa_guard.h"

using namespace nibble;
using namespace nibble::kernels::w4a4;

namespace {

uint32_t seed() {
  const uint32_t s = uint32_t(::testing::UnitTest::GetInstance()->random_seed());
  return s == 0 ? 1616u : s;
}


std::vector<KitchenIo> fast_ios() {
  std::vector<KitchenIo> v;
  for (Isa isa : supported_isas())
    if (isa != Isa::Scalar) v.push_back(kitchen_io(isa));
  return v;
}

Tensor random_float(std::mt19937& rng, DType dt, Shape shape, float lo, float hi) {
  Tensor f = Tensor::empty(DType::F32, shape);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < f.numel(); ++i) f.mutable_data<float>()[i] = d(rng);
  return dt == DType::F32 ? f : f.to(dt);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

constexpr uint8_t kPoison = 0xA5;

TEST(SvdquantKitchenIo, PackMatchesScalar) {
  std::mt19937 rng(seed());
  std::uniform_int_distribution<int> code(-8, 15);  // any int8 whose low nibble matters, signed or unsigned
  for (const KitchenIo& io : fast_ios())
    for (int64_t rows : {1, 3, 7, 17})
      for (int64_t K : {64, 128, 640, 3072}) {
        SCOPED_TRACE(::testing::Message() << io.name << " rows=" << rows << " K=" << K);
        const int64_t n = rows * K;
        std::vector<int8_t> c(static_cast<size_t>(n));
        for (auto& v : c) v = int8_t(code(rng));
        std::vector<uint8_t> ref(size_t(n / 2 + 64), kPoison), got(size_t(n / 2 + 64), kPoison);
        pack_codes_scalar(c.data(), n, ref.data());
        io.pack(c.data(), n, got.data());
        ASSERT_EQ(ref, got);
        for (size_t i = size_t(n / 2); i < got.size(); ++i) ASSERT_EQ(got[i], kPoison) << "wrote past the end";
      }
  // lengths that are not a multiple of the vector width (the tail)
  for (const KitchenIo& io : fast_ios())
    for (int64_t n : {2, 30, 62, 66, 126, 190}) {
      std::vector<int8_t> c(static_cast<size_t>(n));
      for (auto& v : c) v = int8_t(code(rng));
      std::vector<uint8_t> ref(size_t(n / 2 + 8), kPoison), got(size_t(n / 2 + 8), kPoison);
      pack_codes_scalar(c.data(), n, ref.data());
      io.pack(c.data(), n, got.data());
      ASSERT_EQ(ref, got) << io.name << " n=" << n;
    }
}

TEST(SvdquantKitchenIo, UnpackMatchesScalarAndInvertsPack) {
  std::mt19937 rng(seed() + 1);
  for (const KitchenIo& io : fast_ios())
    for (bool uns : {false, true})
      for (int64_t rows : {1, 5, 13})
        for (int64_t K : {64, 192, 640, 3072}) {
          SCOPED_TRACE(::testing::Message() << io.name << " unsigned=" << uns << " rows=" << rows << " K=" << K);
          const int64_t G = K / 64;
          std::vector<uint8_t> q(size_t(rows * K / 2));
          for (auto& b : q) b = uint8_t(rng());
          std::vector<int8_t> ref(size_t(rows * K + 64), int8_t(kPoison)), got(ref);
          std::vector<int32_t> rc(size_t(rows * G + 4), -12345), gc(rc);
          unpack_codes_scalar(q.data(), K, rows, uns, ref.data(), rc.data());
          io.unpack(q.data(), K, rows, uns, got.data(), gc.data());
          ASSERT_EQ(ref, got);
          ASSERT_EQ(rc, gc);
          for (size_t i = size_t(rows * K); i < got.size(); ++i) ASSERT_EQ(got[i], int8_t(kPoison)) << "past the end";
          for (size_t i = size_t(rows * G); i < gc.size(); ++i) ASSERT_EQ(gc[i], -12345) << "acorr past the end";
          // the codes pack back to the same bytes, and acorr is −8·Σ of the codes
          std::vector<uint8_t> back(q.size());
          io.pack(got.data(), rows * K, back.data());
          ASSERT_EQ(back, q);
          for (int64_t i = 0; i < rows * G; ++i) {
            int32_t s = 0;
            for (int64_t j = 0; j < 64; ++j) s += got[size_t(i * 64 + j)];
            ASSERT_EQ(gc[size_t(i)], -8 * s);
            for (int64_t j = 0; j < 64; ++j) {
              const int v = got[size_t(i * 64 + j)];
              ASSERT_TRUE(uns ? (v >= 0 && v <= 15) : (v >= -8 && v <= 7)) << v;
            }
          }
        }
}

// All 65536 half inputs (every NaN payload, subnormals, infinities), bit for bit against the scalar
// conversions, at lengths that leave every tail size; the destination starts as NaN and must be
// exactly written, nothing past the end.
TEST(SvdquantKitchenIo, HalfToF32AllInputsBitwise) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  for (const KitchenIo& io : fast_ios())
    for (bool bf : {true, false}) {
      SCOPED_TRACE(::testing::Message() << io.name << (bf ? " bf16" : " f16"));
      HalfToF32Kernel fast = bf ? io.bf16_to_f32 : io.f16_to_f32;
      HalfToF32Kernel ref = bf ? &bf16_to_f32_scalar : &f16_to_f32_scalar;
      std::vector<float> r(all.size()), g(all.size() + 16, NAN);
      ref(all.data(), int64_t(all.size()), r.data());
      fast(all.data(), int64_t(all.size()), g.data());
      for (size_t i = 0; i < all.size(); ++i)
        ASSERT_EQ(f32_to_bits(r[i]), f32_to_bits(g[i])) << "input 0x" << std::hex << i;
      for (size_t i = all.size(); i < g.size(); ++i) ASSERT_TRUE(std::isnan(g[i])) << "past the end";
      for (int64_t n : {1, 7, 9, 15, 17, 31, 33}) {
        std::vector<float> gn(size_t(n) + 16, NAN);
        fast(all.data() + 0x3C00 - n / 2, n, gn.data());  // around 1.0 (f16) / subnormals (bf16)
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(f32_to_bits(gn[size_t(i)]), f32_to_bits(r[size_t(0x3C00 - n / 2 + i)]));
        for (size_t i = size_t(n); i < gn.size(); ++i) ASSERT_TRUE(std::isnan(gn[i])) << "n=" << n << " past the end";
      }
    }
}

// The epilogue's rounding to bf16 / f16 against f32_to_bf16 / f32_to_f16: random bit patterns (every
// class: NaNs with payloads, infinities, subnormals), the rounding ties and overflow edges of both
// formats, with and without a bias, at lengths that leave every tail; destination poisoned.
TEST(SvdquantKitchenIo, StoreHalfMatchesScalar) {
  std::mt19937 rng(seed() + 4);
  std::vector<float> v;
  for (int i = 0; i < 200000; ++i) v.push_back(bits_to_f32(uint32_t(rng())));
  std::uniform_real_distribution<float> mag(-70000.0f, 70000.0f), small(-1e-4f, 1e-4f);
  for (int i = 0; i < 50000; ++i) v.push_back(mag(rng)), v.push_back(small(rng));
  for (uint32_t b : {0x7f7fffffu, 0x7f800000u, 0x7f800001u, 0x7fc00000u, 0xffbfffffu, 0x477fefffu, 0x477ff000u,
                     0x477fe000u, 0x38800000u, 0x387fffffu, 0x33000000u, 0x33000001u, 0x32ffffffu, 0x00000001u,
                     0x80000000u, 0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f800fffu, 0x3f801000u, 0x3f803000u})
    for (uint32_t s : {0u, 0x80000000u}) v.push_back(bits_to_f32(b ^ s));
  std::vector<float> bias(v.size());
  std::uniform_real_distribution<float> bd(-2.0f, 2.0f);
  for (auto& b : bias) b = bd(rng);
  const int64_t n = int64_t(v.size());
  for (const KitchenIo& io : fast_ios())
    for (bool bf : {true, false})
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE(::testing::Message() << io.name << (bf ? " bf16" : " f16") << " bias=" << with_bias);
        const float* bp = with_bias ? bias.data() : nullptr;
        std::vector<uint16_t> ref(static_cast<size_t>(n)), got(static_cast<size_t>(n) + 16, 0xA5A5);
        store_half_scalar(v.data(), bp, n, bf, ref.data());
        io.store_half(v.data(), bp, n, bf, got.data());
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(ref[size_t(i)], got[size_t(i)]) << "input 0x" << std::hex << f32_to_bits(v[size_t(i)]);
        for (size_t i = size_t(n); i < got.size(); ++i) ASSERT_EQ(got[i], 0xA5A5) << "past the end";
        for (int64_t len : {1, 7, 9, 15, 17, 31}) {
          std::vector<uint16_t> g(size_t(len) + 16, 0xA5A5);
          io.store_half(v.data() + 3, bp ? bp + 3 : nullptr, len, bf, g.data());
          for (int64_t i = 0; i < len; ++i) ASSERT_EQ(g[size_t(i)], ref[size_t(3 + i)]) << "len=" << len;
          for (size_t i = size_t(len); i < g.size(); ++i) ASSERT_EQ(g[i], 0xA5A5) << "len=" << len << " past the end";
        }
      }
}

// ------------------------------------------------------------------ the op entry points
struct Inputs {
  Tensor x, smooth, down, lora_x;
};
Inputs make_inputs(std::mt19937& rng, int64_t M, int64_t K, int64_t R, DType dt, bool uns, bool with_lora_x) {
  Inputs in;
  in.x = uns ? random_float(rng, dt, {M, K}, -0.17f, 4.0f) : random_float(rng, dt, {M, K}, -3.0f, 3.0f);
  in.smooth = random_float(rng, dt, {K}, 0.3f, 3.0f);
  in.down = random_float(rng, dt, {K, R}, -0.1f, 0.1f);
  if (with_lora_x) in.lora_x = random_float(rng, dt, {M, K}, -2.0f, 2.0f);
  return in;
}

// bf16 / f16 x against the same values given as fp32: the op widens exactly, so the codes and the fp32
// lora_act agree bit for bit, and the ascales are the fp32 run's rounded once to x's dtype.
TEST(SvdquantKitchenOps, HalfInputEqualsWidenedInput) {
  IsaGuard guard;
  std::mt19937 rng(seed() + 2);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (DType dt : {DType::BF16, DType::F16})
      for (bool uns : {false, true})
        for (int64_t M : {1, 17, 33}) {
          const int64_t K = M == 17 ? 640 : 192, R = M == 1 ? 0 : (M == 17 ? 32 : 20);
          SCOPED_TRACE(::testing::Message() << isa_name(isa) << " " << dtype_name(dt) << " unsigned=" << uns
                                            << " M=" << M << " K=" << K << " R=" << R);
          const Inputs in = make_inputs(rng, M, K, R, dt, uns, M == 33);
          const Tensor lx32 = in.lora_x.defined() ? in.lora_x.to_f32() : Tensor();
          const SvdquantActs h = quantize_svdquant_w4a4(in.x, in.smooth, in.down, 16, uns, in.lora_x, DType::F32);
          const SvdquantActs f = quantize_svdquant_w4a4(in.x.to_f32(), in.smooth, in.down, 16, uns, lx32, DType::F32);
          ASSERT_TRUE(same_bits(h.q_x, f.q_x));
          ASSERT_TRUE(same_bits(h.lora_act, f.lora_act));
          ASSERT_TRUE(same_bits(h.ascales, f.ascales.to(dt)));
        }
  }
}

// Every output element written (the drivers' NaN fill on: outputs start poisoned), results unchanged,
// the padding rows zero; 1 and 3 threads give the same bits.
TEST(SvdquantKitchenOps, PoisonedOutputsAndThreadCount) {
  IsaGuard guard;
  std::mt19937 rng(seed() + 3);
  const int saved = num_threads();
  const int64_t M = 37, K = 320, N = 96, R = 24, pad = 32, M_pad = 64;
  for (DType dt : {DType::BF16, DType::F32}) {
    const Inputs in = make_inputs(rng, M, K, R, dt, false, false);
    Tensor w = Tensor::empty(DType::I8, {N, K / 2});
    for (int64_t i = 0; i < w.numel(); ++i) w.mutable_data<uint8_t>()[i] = uint8_t(rng());
    const Tensor ws = random_float(rng, dt, {K / 64, N}, 0.001f, 0.05f), up = random_float(rng, dt, {N, R}, -0.1f, 0.1f);
    const Tensor bias = random_float(rng, dt, {N}, -1.0f, 1.0f);
    for (Isa isa : supported_isas()) {
      SCOPED_TRACE(::testing::Message() << isa_name(isa) << " " << dtype_name(dt));
      set_isa(isa);
      set_num_threads(1);
      const SvdquantActs a1 = quantize_svdquant_w4a4(in.x, in.smooth, in.down, pad, false);
      const auto prep = isa == Isa::Scalar ? nullptr : prepare_svdquant_w4a4_gemm(w, ws, up);
      auto mm = [&](const SvdquantActs& a) {
        return prep ? scaled_mm_svdquant_w4a4_prepared(a.q_x, w, a.ascales, ws, a.lora_act, up, bias, false, std::nullopt, *prep)
                    : scaled_mm_svdquant_w4a4(a.q_x, w, a.ascales, ws, a.lora_act, up, bias, false);
      };
      const Tensor y1 = mm(a1);
      set_num_threads(3);
      kernels::set_test_fill(NAN);
      const SvdquantActs a3 = quantize_svdquant_w4a4(in.x, in.smooth, in.down, pad, false);
      const Tensor y3 = mm(a3);
      kernels::set_test_fill(std::nullopt);
      ASSERT_TRUE(same_bits(a1.q_x, a3.q_x));
      ASSERT_TRUE(same_bits(a1.ascales, a3.ascales));
      ASSERT_TRUE(same_bits(a1.lora_act, a3.lora_act));
      ASSERT_TRUE(same_bits(y1, y3));
      const Tensor yf = y3.to_f32();
      for (int64_t i = 0; i < yf.numel(); ++i) ASSERT_FALSE(std::isnan(yf.data<float>()[i])) << i;
      ASSERT_EQ(a3.q_x.size(0), M_pad);
      for (int64_t i = M * K / 2; i < M_pad * K / 2; ++i) ASSERT_EQ(a3.q_x.data<uint8_t>()[i], 0) << "q_x padding";
      const Tensor as = a3.ascales.to_f32(), la = a3.lora_act.to_f32();
      for (int64_t g = 0; g < K / 64; ++g)
        for (int64_t m = 0; m < M_pad; ++m) {
          const float v = as.data<float>()[g * M_pad + m];
          ASSERT_TRUE(m < M ? v > 0.0f : f32_to_bits(v) == 0) << "ascales g=" << g << " m=" << m << " " << v;
        }
      for (int64_t i = 0; i < M_pad * R; ++i) {
        const float v = la.data<float>()[i];
        ASSERT_TRUE(i < M * R ? std::isfinite(v) : f32_to_bits(v) == 0) << "lora_act " << i;
      }
    }
  }
  set_num_threads(saved);
}

}  // namespace
