// dtype tables and the exact scalar conversions, checked exhaustively (every 16-bit and 8-bit
// code) and on many random fp32 values against an independent reference.
//
// The reference rounds in double: for a format with `mbits` stored mantissa bits and minimum
// normal exponent `emin`, the spacing of representable values around x is
// ulp = 2^(max(ilogb(x), emin) - mbits); x / ulp is exact in double (power-of-two scaling), and
// nearbyint() rounds it to nearest, ties to even, under the default rounding mode. Overflow is
// judged on the rounded value, as IEEE does. Nothing here reuses the bit tricks of dtype.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "nibble/dtype.h"
#include "nibble/error.h"

using namespace nibble;
using ::testing::HasSubstr;

namespace {

struct Fmt {
  const char* name;
  int mbits;      // stored mantissa bits
  int emin;       // exponent of the smallest normal
  double max;     // largest finite magnitude
  bool overflow_to_nan;  // e4m3fn has no inf
};
const Fmt kBF16{"bf16", 7, -126, std::ldexp(255.0, 120), false};  // (2 - 2^-7) · 2^127
const Fmt kF16{"f16", 10, -14, 65504.0, false};
const Fmt kE4M3{"e4m3", 3, -6, 448.0, true};
const Fmt kE5M2{"e5m2", 2, -14, 57344.0, false};

// Round x (finite or inf) to the format: RNE, then overflow → inf or NaN.
double ref_round(double x, const Fmt& f) {
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return f.overflow_to_nan ? std::numeric_limits<double>::quiet_NaN() : x;
  if (x == 0) return x;
  const int e = std::max(std::ilogb(x), f.emin);
  const double ulp = std::ldexp(1.0, e - f.mbits);
  const double r = std::nearbyint(x / ulp) * ulp;
  if (std::fabs(r) > f.max) return f.overflow_to_nan ? std::numeric_limits<double>::quiet_NaN() : std::copysign(INFINITY, x);
  return r;
}

// Decode sign/exponent/mantissa fields with ldexp (IEEE layout; all-ones exponent = inf/NaN).
double ref_decode(uint32_t code, int ebits, int mbits, int bias) {
  const bool neg = (code >> (ebits + mbits)) & 1;
  const uint32_t exp = (code >> mbits) & ((1u << ebits) - 1), man = code & ((1u << mbits) - 1);
  double v;
  if (exp == (1u << ebits) - 1) v = man ? std::numeric_limits<double>::quiet_NaN() : INFINITY;
  else if (exp == 0) v = std::ldexp(double(man), 1 - bias - mbits);
  else v = std::ldexp(double((1u << mbits) | man), int(exp) - bias - mbits);
  return neg ? -v : v;
}
double ref_decode_e4m3(uint8_t c) {  // e4m3fn: exponent 15 is ordinary except S.1111.111 = NaN
  if ((c & 0x7f) == 0x7f) return std::numeric_limits<double>::quiet_NaN();
  const uint32_t exp = (c >> 3) & 15, man = c & 7;
  const double v = exp == 0 ? std::ldexp(double(man), -9) : std::ldexp(double(8 | man), int(exp) - 10);
  return (c & 0x80) ? -v : v;
}

// Same value, and for zeros the same sign; NaN matches NaN.
::testing::AssertionResult same(double got, double want, float input) {
  if (std::isnan(want) && std::isnan(got)) return ::testing::AssertionSuccess();
  if (got == want && std::signbit(got) == std::signbit(want)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "input " << std::hexfloat << input << " (bits 0x" << std::hex
                                       << f32_to_bits(input) << ") → " << got << ", expected " << want;
}

// Random fp32 inputs: raw bit patterns (every exponent, subnormals, NaN, inf) plus values with the
// exponent drawn uniformly from the format's interesting range, plus exact midpoints (ties).
std::vector<float> random_inputs(std::mt19937& rng, const Fmt& f, int n, const std::vector<double>& grid) {
  std::vector<float> v;
  std::uniform_int_distribution<int> exp_dist(f.emin - f.mbits - 3, int(std::ilogb(f.max)) + 2);
  for (int i = 0; i < n; ++i) {
    v.push_back(bits_to_f32(uint32_t(rng())));
    const float m = 1.0f + float(rng() & 0x7fffff) * 0x1p-23f;
    const float x = std::ldexp(m, exp_dist(rng));
    v.push_back((rng() & 1) ? -x : x);
    // a tie: the exact midpoint of two adjacent representable values
    const size_t k = size_t(rng() % (grid.size() - 1));
    const float mid = float((grid[k] + grid[k + 1]) / 2);
    if (double(mid) == (grid[k] + grid[k + 1]) / 2) v.push_back((rng() & 1) ? -mid : mid);
    // one fp32 ulp either side of a tie
    v.push_back(std::nextafter(mid, INFINITY));
    v.push_back(std::nextafter(mid, -INFINITY));
  }
  return v;
}

// Every finite non-negative value of a format from its decoder, ascending.
template <class Decode>
std::vector<double> positive_grid(uint32_t ncodes, Decode decode) {
  std::vector<double> g;
  for (uint32_t c = 0; c < ncodes / 2; ++c) {
    const double v = decode(c);
    if (std::isfinite(v)) g.push_back(v);
  }
  std::sort(g.begin(), g.end());
  return g;
}

// ---- tables

TEST(DType, NamesParseBackAndAreListed) {
  const std::string all = supported_dtype_names();
  int count = 0;
  for (int i = 0; i <= int(DType::C64); ++i) {
    const DType t = DType(i);
    DType back;
    ASSERT_TRUE(parse_dtype(dtype_name(t), &back)) << dtype_name(t);
    EXPECT_EQ(back, t);
    EXPECT_THAT(all, HasSubstr(std::string(dtype_name(t))));
    if (dtype_size(t) != 0) EXPECT_EQ(int(dtype_size(t)) * 8, dtype_bits(t)) << dtype_name(t);
    else EXPECT_NE(dtype_bits(t) % 8, 0) << dtype_name(t);
    ++count;
  }
  EXPECT_EQ(count, 20);
  DType out;
  EXPECT_FALSE(parse_dtype("f32", &out));
  EXPECT_FALSE(parse_dtype("", &out));
  EXPECT_FALSE(parse_dtype("F8_E4M3FN", &out));
}

TEST(DType, NBytesOfSubByteTypes) {
  EXPECT_EQ(dtype_nbytes(DType::F4, 0), 0u);
  EXPECT_EQ(dtype_nbytes(DType::F4, 2), 1u);
  EXPECT_EQ(dtype_nbytes(DType::F4, 4096), 2048u);
  EXPECT_EQ(dtype_nbytes(DType::F6_E2M3, 4), 3u);
  EXPECT_EQ(dtype_nbytes(DType::F6_E3M2, 32), 24u);
  EXPECT_EQ(dtype_nbytes(DType::C64, 3), 24u);
  EXPECT_THAT([] { dtype_nbytes(DType::F4, 3); }, ::testing::ThrowsMessage<Error>(HasSubstr("not a whole number of bytes")));
  EXPECT_THAT([] { dtype_nbytes(DType::F6_E2M3, 2); }, ::testing::ThrowsMessage<Error>(HasSubstr("F6_E2M3")));
  EXPECT_THAT([] { dtype_nbytes(DType::F64, uint64_t(1) << 61); }, ::testing::ThrowsMessage<Error>(HasSubstr("overflow")));
  EXPECT_EQ(dtype_nbytes(DType::U8, UINT64_MAX / 8), UINT64_MAX / 8);
}

// ---- 16-bit formats: every code

TEST(DType, EveryBF16CodeDecodesExactlyAndRoundTrips) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float f = bf16_to_f32(uint16_t(c));
    ASSERT_TRUE(same(f, ref_decode(c, 8, 7, 127), f)) << "code 0x" << std::hex << c;
    const uint16_t back = f32_to_bf16(f);
    if (std::isnan(f)) ASSERT_TRUE(std::isnan(bf16_to_f32(back))) << std::hex << c;
    else ASSERT_EQ(back, c) << std::hex << c;
  }
}

TEST(DType, EveryF16CodeDecodesExactlyAndRoundTrips) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float f = f16_to_f32(uint16_t(c));
    ASSERT_TRUE(same(f, ref_decode(c, 5, 10, 15), f)) << "code 0x" << std::hex << c;
    const uint16_t back = f32_to_f16(f);
    if (std::isnan(f)) ASSERT_TRUE(std::isnan(f16_to_f32(back))) << std::hex << c;
    else ASSERT_EQ(back, c) << std::hex << c;
  }
}

TEST(DType, F32ToBF16RoundsToNearestEven) {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  std::mt19937 rng(20240601);
  const auto grid = positive_grid(65536, [](uint32_t c) { return double(bf16_to_f32(uint16_t(c))); });
  auto inputs = random_inputs(rng, kBF16, 200000, grid);
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                  bits_to_f32(0x7f7f8000u), bits_to_f32(0x7f7f7fffu), bits_to_f32(0x00008000u),
                  bits_to_f32(0x00018000u), bits_to_f32(0x3f808000u), bits_to_f32(0x3f818000u)})
    inputs.push_back(x);
  for (float x : inputs)
    ASSERT_TRUE(same(bf16_to_f32(f32_to_bf16(x)), ref_round(x, kBF16), x));
  // NaNs (quiet and signalling, both signs) stay NaN
  for (uint32_t b : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu})
    EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(bits_to_f32(b))))) << std::hex << b;
}

TEST(DType, F32ToF16RoundsToNearestEven) {
  std::mt19937 rng(777);
  const auto grid = positive_grid(65536, [](uint32_t c) { return double(f16_to_f32(uint16_t(c))); });
  auto inputs = random_inputs(rng, kF16, 200000, grid);
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, 65504.0f, 65519.996f, 65520.0f, -65520.0f, 65536.0f,
                  0x1p-24f, 0x1p-25f, 0x1.000002p-25f, 0x1.8p-24f, 0x1p-26f, 0x1.ffcp-15f, 0x1p-14f,
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::max()})
    inputs.push_back(x);
  for (float x : inputs) ASSERT_TRUE(same(f16_to_f32(f32_to_f16(x)), ref_round(x, kF16), x));
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the tie at the top rounds to even = inf
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);  // half the smallest subnormal: tie → 0 (even)
  EXPECT_EQ(f32_to_f16(0x1.8p-24f), 0x0002);  // 1.5 subnormal units: tie → 2 (even)
  for (uint32_t b : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu})
    EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(bits_to_f32(b))))) << std::hex << b;
}

// ---- 8-bit formats: every code

TEST(DType, EveryFp8E4M3CodeDecodesExactlyAndRoundTrips) {
  int nans = 0;
  for (uint32_t c = 0; c < 256; ++c) {
    const float f = fp8_e4m3_to_f32(uint8_t(c));
    ASSERT_TRUE(same(f, ref_decode_e4m3(uint8_t(c)), f)) << "code 0x" << std::hex << c;
    if (std::isnan(f)) {
      ++nans;
      EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(f32_to_fp8_e4m3(f))));
    } else {
      EXPECT_EQ(f32_to_fp8_e4m3(f), c) << std::hex << c;
    }
  }
  EXPECT_EQ(nans, 2);  // 0x7f and 0xff; e4m3fn has no inf
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), 0x1p-9f);
}

TEST(DType, EveryFp8E5M2CodeDecodesExactlyAndRoundTrips) {
  for (uint32_t c = 0; c < 256; ++c) {
    const float f = fp8_e5m2_to_f32(uint8_t(c));
    ASSERT_TRUE(same(f, ref_decode(c, 5, 2, 15), f)) << "code 0x" << std::hex << c;
    if (std::isnan(f)) EXPECT_TRUE(std::isnan(fp8_e5m2_to_f32(f32_to_fp8_e5m2(f))));
    else EXPECT_EQ(f32_to_fp8_e5m2(f), c) << std::hex << c;  // includes ±inf (0x7c / 0xfc)
  }
  EXPECT_EQ(fp8_e5m2_to_f32(0x7b), 57344.0f);
}

TEST(DType, EveryE8M0CodeIsAPowerOfTwo) {
  for (int c = 0; c < 255; ++c) EXPECT_EQ(double(e8m0_to_f32(uint8_t(c))), std::ldexp(1.0, c - 127)) << c;
  EXPECT_TRUE(std::isnan(e8m0_to_f32(0xff)));
}

TEST(DType, F32ToFp8E4M3RoundsToNearestEvenAndOverflowsToNaN) {
  std::mt19937 rng(31337);
  const auto grid = positive_grid(256, [](uint32_t c) { return double(fp8_e4m3_to_f32(uint8_t(c))); });
  auto inputs = random_inputs(rng, kE4M3, 100000, grid);
  for (float x : {0.0f, -0.0f, 448.0f, 456.0f, 464.0f, std::nextafter(464.0f, 0.0f), std::nextafter(464.0f, 1e9f),
                  470.0f, 479.99f, 480.0f, -480.0f, 1e6f, INFINITY, -INFINITY, 0x1p-9f, 0x1p-10f,
                  std::nextafter(0x1p-10f, 1.0f), 0x1.8p-9f, 0x1.4p-7f, 0x1p-6f, 0x1.1p-6f, 0x1.0p-100f})
    inputs.push_back(x);
  for (float x : inputs) ASSERT_TRUE(same(fp8_e4m3_to_f32(f32_to_fp8_e4m3(x)), ref_round(x, kE4M3), x));
  // The documented overflow rule (torch's c10 cast): |x| ≤ 464 → finite, |x| > 464 → NaN.
  EXPECT_EQ(f32_to_fp8_e4m3(464.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(-464.0f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(464.0f, 1e9f)), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(480.0f), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(-INFINITY), 0xff);
  EXPECT_EQ(f32_to_fp8_e4m3(0x1p-10f), 0x00);   // tie between 0 and the smallest subnormal → 0
  EXPECT_EQ(f32_to_fp8_e4m3(0x1.8p-9f), 0x02);  // tie between codes 1 and 2 → 2 (even)
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(f32_to_fp8_e4m3(std::nanf("")))));
}

TEST(DType, F32ToFp8E5M2RoundsToNearestEvenAndOverflowsToInf) {
  std::mt19937 rng(4242);
  const auto grid = positive_grid(256, [](uint32_t c) { return double(fp8_e5m2_to_f32(uint8_t(c))); });
  auto inputs = random_inputs(rng, kE5M2, 100000, grid);
  for (float x : {0.0f, -0.0f, 57344.0f, 61439.996f, 61440.0f, -61440.0f, 65536.0f, INFINITY, -INFINITY, 0x1p-16f,
                  0x1p-17f, 0x1.8p-16f, 0x1p-14f, 1e-30f})
    inputs.push_back(x);
  for (float x : inputs) ASSERT_TRUE(same(fp8_e5m2_to_f32(f32_to_fp8_e5m2(x)), ref_round(x, kE5M2), x));
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(61440.0f, 0.0f)), 0x7b);
  EXPECT_EQ(f32_to_fp8_e5m2(61440.0f), 0x7c);  // the tie at the top rounds to even = inf
  EXPECT_EQ(f32_to_fp8_e5m2(-61440.0f), 0xfc);
  EXPECT_TRUE(std::isnan(fp8_e5m2_to_f32(f32_to_fp8_e5m2(std::nanf("")))));
  EXPECT_TRUE(std::isnan(fp8_e5m2_to_f32(f32_to_fp8_e5m2(-std::nanf("")))));
}

}  // namespace
