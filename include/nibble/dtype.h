// nibble/dtype.h — element types of safetensors files and exact scalar conversions.
//
// The enum covers every dtype string of the safetensors format. Conversions to fp32 are exact;
// conversions from fp32 round to nearest, ties to even (NaN stays NaN; values past the finite range
// follow IEEE for fp16/bf16 (→ ±inf) and saturate-to-NaN rules of the fp8 formats as documented in
// dtype.cpp). These are the only conversion routines of the project: kernels call the inline ones.
//
// Thread safety: Pure functions and constants, no state: safe from any thread.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace nibble {

enum class DType : uint8_t {
  F64, F32, F16, BF16,
  I64, I32, I16, I8,
  U64, U32, U16, U8,
  BOOL,
  F8_E4M3, F8_E5M2,
  F8_E8M0,          // scale dtype of mxfp8 (float8_e8m0fnu)
  F4,               // float4_e2m1fn_x2 (two codes per byte, shape counts elements)
  F6_E2M3, F6_E3M2, // packed 6-bit floats (shape counts elements)
  C64,              // complex64
};

// Bits per element (F4 = 4, F6_* = 6, everything else 8 × bytes).
int dtype_bits(DType t);
// Bytes of `n` elements; throws nibble::Error if the count is not byte aligned or overflows.
uint64_t dtype_nbytes(DType t, uint64_t n);
// Byte size of one element for byte-sized dtypes (1,2,4,8); 0 for sub-byte dtypes.
inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: case DType::U64: case DType::C64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: case DType::F8_E4M3: case DType::F8_E5M2:
    case DType::F8_E8M0: return 1;
    default: return 0;
  }
}
// The safetensors spelling ("F32", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType t);
// Parse a safetensors spelling; returns false for an unknown string.
bool parse_dtype(std::string_view s, DType* out);
// Comma-separated list of every accepted spelling (for error messages).
std::string supported_dtype_names();
bool is_float(DType t);

// ---- exact scalar conversions (inline: used in kernels and reference code)
inline float bits_to_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN kept quiet
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);            // RNE, overflow → ±inf
float fp8_e4m3_to_f32(uint8_t v);        // e4m3fn: no inf, 0x7f/0xff = NaN, max 448
uint8_t f32_to_fp8_e4m3(float f);        // RNE, |x| > 448 (after rounding) → NaN as torch's cast does not saturate? see dtype.cpp
float fp8_e5m2_to_f32(uint8_t v);        // IEEE-like, has inf
uint8_t f32_to_fp8_e5m2(float f);        // RNE, overflow → ±inf
float e8m0_to_f32(uint8_t v);            // 2^(v-127); 0xff = NaN

}  // namespace nibble
