// dtype names, sizes and the exact float conversions (RNE on the way down).
#include "nibble/dtype.h"

#include <array>
#include <cmath>
#include <fmt/format.h>

#include "nibble/error.h"

namespace nibble {

namespace {
struct DTypeEntry { DType t; const char* name; int bits; bool is_float; };
constexpr DTypeEntry kDTypes[] = {
    {DType::F64, "F64", 64, true},          {DType::F32, "F32", 32, true},
    {DType::F16, "F16", 16, true},          {DType::BF16, "BF16", 16, true},
    {DType::I64, "I64", 64, false},         {DType::I32, "I32", 32, false},
    {DType::I16, "I16", 16, false},         {DType::I8, "I8", 8, false},
    {DType::U64, "U64", 64, false},         {DType::U32, "U32", 32, false},
    {DType::U16, "U16", 16, false},         {DType::U8, "U8", 8, false},
    {DType::BOOL, "BOOL", 8, false},        {DType::F8_E4M3, "F8_E4M3", 8, true},
    {DType::F8_E5M2, "F8_E5M2", 8, true},   {DType::F8_E8M0, "F8_E8M0", 8, true},
    {DType::F4, "F4", 4, true},             {DType::F6_E2M3, "F6_E2M3", 6, true},
    {DType::F6_E3M2, "F6_E3M2", 6, true},   {DType::C64, "C64", 64, false},
};
const DTypeEntry& entry(DType t) {
  for (const auto& e : kDTypes)
    if (e.t == t) return e;
  throw Error("invalid DType value");
}
}  // namespace

int dtype_bits(DType t) { return entry(t).bits; }
bool is_float(DType t) { return entry(t).is_float; }
std::string_view dtype_name(DType t) { return entry(t).name; }

uint64_t dtype_nbytes(DType t, uint64_t n) {
  const uint64_t bits = uint64_t(dtype_bits(t));
  if (n > UINT64_MAX / bits) throw Error(fmt::format("{} elements of {} overflow the byte count", n, dtype_name(t)));
  const uint64_t total = n * bits;
  if (total % 8 != 0)
    throw Error(fmt::format("{} elements of {} ({} bits each) are not a whole number of bytes", n,
                            dtype_name(t), bits));
  return total / 8;
}

bool parse_dtype(std::string_view s, DType* out) {
  for (const auto& e : kDTypes)
    if (s == e.name) { *out = e.t; return true; }
  return false;
}

std::string supported_dtype_names() {
  std::string r;
  for (const auto& e : kDTypes) r += (r.empty() ? "" : ", ") + std::string(e.name);
  return r;
}

// ---- fp16
float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
  // subnormal: man · 2^-24, exact in fp32
  const float v = float(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (x >= 0x477ff000u) return sign | 0x7c00;  // ≥ 65520 rounds to inf
  if (x >= 0x38800000u) {                       // normal half
    uint32_t r = x - 0x38000000u;
    r = r + 0xfffu + ((r >> 13) & 1u);
    return uint16_t(sign | (r >> 13));
  }
  const int e = int(x >> 23);
  if (e < 102) return sign;  // below half of the smallest subnormal
  const uint32_t m = (x & 0x7fffffu) | 0x800000u;
  const int s = 126 - e;  // units of 2^-24
  uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1), half = 1u << (s - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
}

// ---- fp8: decode by formula, encode by RNE search over the monotone positive code table
namespace {
float decode_minifloat(uint8_t v, int mbits, int bias) {
  const int ebits = 7 - mbits;
  const int exp = (v >> mbits) & ((1 << ebits) - 1), man = v & ((1 << mbits) - 1);
  const float mag = exp == 0 ? std::ldexp(float(man), 1 - bias - mbits)
                             : std::ldexp(float((1 << mbits) | man), exp - bias - mbits);
  return (v & 0x80) ? -mag : mag;
}
struct Fp8Table {
  std::array<float, 128> pos{};
  int max_code = 0;  // largest finite positive code
};
Fp8Table make_table(bool e4m3) {
  Fp8Table t;
  for (int c = 0; c < 128; ++c) t.pos[c] = e4m3 ? fp8_e4m3_to_f32(uint8_t(c)) : fp8_e5m2_to_f32(uint8_t(c));
  t.max_code = e4m3 ? 0x7e : 0x7b;
  return t;
}
// Nearest code by magnitude, ties to the even code; `a` finite, ≥ 0, ≤ the rounding limit.
uint8_t nearest_code(const Fp8Table& t, float a) {
  int lo = 0, hi = t.max_code;  // find largest c with pos[c] <= a
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.pos[mid] <= a) lo = mid; else hi = mid - 1;
  }
  if (lo == t.max_code || t.pos[lo] == a) return uint8_t(lo);
  const float mid = (t.pos[lo] + t.pos[lo + 1]) * 0.5f;  // exact: ≤ 5 significant bits
  if (a < mid) return uint8_t(lo);
  if (a > mid) return uint8_t(lo + 1);
  return uint8_t((lo & 1) ? lo + 1 : lo);
}
}  // namespace

float fp8_e4m3_to_f32(uint8_t v) {
  if ((v & 0x7f) == 0x7f) return std::nanf("");
  return decode_minifloat(v, 3, 7);
}
float fp8_e5m2_to_f32(uint8_t v) {
  const int exp = (v >> 2) & 0x1f;
  if (exp == 0x1f) {
    if (v & 3) return std::nanf("");
    return (v & 0x80) ? -INFINITY : INFINITY;
  }
  return decode_minifloat(v, 2, 15);
}
float e8m0_to_f32(uint8_t v) {
  if (v == 0xff) return std::nanf("");
  return std::ldexp(1.0f, int(v) - 127);
}

// torch semantics (c10 Float8_e4m3fn): RNE as if the exponent range were unbounded; a result past
// 448 lands on the code 0x7f, which is NaN in e4m3fn (no saturation). 464 is the midpoint between
// 448 (mantissa 110, even) and the would-be 480, so: |x| ≤ 464 → finite, |x| > 464 → NaN; inf → NaN.
uint8_t f32_to_fp8_e4m3(float f) {
  static const Fp8Table t = make_table(true);
  const uint8_t sign = (f32_to_bits(f) >> 24) & 0x80;
  const float a = std::fabs(f);
  if (std::isnan(f) || a > 464.0f) return uint8_t(sign | 0x7f);
  return uint8_t(sign | nearest_code(t, a));
}
// IEEE-like: RNE; magnitudes ≥ 61440 (half-way past 57344) → ±inf; NaN → NaN.
uint8_t f32_to_fp8_e5m2(float f) {
  static const Fp8Table t = make_table(false);
  const uint8_t sign = (f32_to_bits(f) >> 24) & 0x80;
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint8_t(sign | 0x7f);
  if (a >= 61440.0f) return uint8_t(sign | 0x7c);
  return uint8_t(sign | nearest_code(t, a));
}

}  // namespace nibble
