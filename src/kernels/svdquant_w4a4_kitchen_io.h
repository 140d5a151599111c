// src/kernels/svdquant_w4a4_kitchen_io.h — the tensor I/O of the SVDQuant kitchen ops
// (quantize_svdquant_w4a4 / scaled_mm_svdquant_w4a4, spec §3.3): the 4-bit activation codes packed in
// the kitchen's nibble order and back, and bf16/f16 rows widened to fp32 for the quantize kernels.
// Pure integer / exact operations: every variant equals the scalar one bit for bit.
//
//   pack     n codes (n even) → n/2 bytes, byte i = (c[2i] & 0xF) | (c[2i+1] & 0xF) << 4
//            (spec §1 nibble order: the even column in the low nibble).
//   unpack   `rows` rows of K/2 bytes (K a multiple of 64) → K codes per row (low nibble first),
//            sign-extended (signed codes) or not (act_unsigned), and acorr[row][g] = −8·Σ_{k∈g} code
//            (the GEMM's signed-offset correction, svdquant_w4a4_kernels.h).
//   bf16/f16 → fp32, exact; NaN payloads kept as the scalar bf16_to_f32 / f16_to_f32 keep them.
//   store    n fp32 values (+ bias, one fp32 add, when given) rounded to bf16 / f16: f32_to_bf16 /
//            f32_to_f16 bit for bit (round to nearest even, their NaN results) — the GEMM epilogue of a
//            bf16/f16 output.
#pragma once
#include <cstdint>

#include "nibble/isa.h"

namespace nibble::kernels::w4a4 {

using PackCodesKernel = void (*)(const int8_t* codes, int64_t n, uint8_t* q);
using UnpackCodesKernel = void (*)(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes,
                                   int32_t* acorr);
using HalfToF32Kernel = void (*)(const uint16_t* src, int64_t n, float* dst);
using StoreHalfKernel = void (*)(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst);

void pack_codes_scalar(const int8_t* codes, int64_t n, uint8_t* q);
void unpack_codes_scalar(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr);
void bf16_to_f32_scalar(const uint16_t* src, int64_t n, float* dst);
void f16_to_f32_scalar(const uint16_t* src, int64_t n, float* dst);
void store_half_scalar(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst);

void pack_codes_avx2(const int8_t* codes, int64_t n, uint8_t* q);
void unpack_codes_avx2(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr);
void bf16_to_f32_avx2(const uint16_t* src, int64_t n, float* dst);
void f16_to_f32_avx2(const uint16_t* src, int64_t n, float* dst);
void store_half_avx2(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst);

void pack_codes_avx512(const int8_t* codes, int64_t n, uint8_t* q);
void unpack_codes_avx512(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr);
void bf16_to_f32_avx512(const uint16_t* src, int64_t n, float* dst);
void f16_to_f32_avx512(const uint16_t* src, int64_t n, float* dst);
void store_half_avx512(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst);

// The variants of an ISA level (Scalar → the scalar functions; Avx2 → AVX2; Avx512 and up → AVX-512).
struct KitchenIo {
  const char* name = "scalar";
  PackCodesKernel pack = &pack_codes_scalar;
  UnpackCodesKernel unpack = &unpack_codes_scalar;
  HalfToF32Kernel bf16_to_f32 = &bf16_to_f32_scalar;
  HalfToF32Kernel f16_to_f32 = &f16_to_f32_scalar;
  StoreHalfKernel store_half = &store_half_scalar;
};
KitchenIo kitchen_io(Isa isa);

}  // namespace nibble::kernels::w4a4
