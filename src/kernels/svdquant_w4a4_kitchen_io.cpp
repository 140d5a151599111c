// Scalar kitchen I/O of the SVDQuant ops and the ISA choice (svdquant_w4a4_kitchen_io.h).
#include "kernels/svdquant_w4a4_kitchen_io.h"

#include "kernels/kernel_ref.h"
#include "kernels/svdquant_w4a4_kernels.h"
#include "nibble/dtype.h"
#include "nibble/formats.h"

namespace nibble::kernels::w4a4 {

void pack_codes_scalar(const int8_t* codes, int64_t n, uint8_t* q) {
  for (int64_t i = 0; i < n / 2; ++i) q[i] = pack_nibbles(codes[2 * i], codes[2 * i + 1]);
}

void unpack_codes_scalar(const uint8_t* q, int64_t K, int64_t rows, bool act_unsigned, int8_t* codes, int32_t* acorr) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* qb = q + m * (K / 2) + g * (kGroup / 2);
      int8_t* c = codes + m * K + g * kGroup;
      int32_t s = 0;
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        c[2 * j] = int8_t(act_unsigned ? unpack_lo_unsigned(qb[j]) : unpack_lo_signed(qb[j]));
        c[2 * j + 1] = int8_t(act_unsigned ? unpack_hi_unsigned(qb[j]) : unpack_hi_signed(qb[j]));
        s += c[2 * j] + c[2 * j + 1];
      }
      acorr[m * G + g] = -8 * s;
    }
}

void bf16_to_f32_scalar(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
void f16_to_f32_scalar(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

void store_half_scalar(const float* src, const float* bias, int64_t n, bool bf16, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = bias ? src[i] + bias[i] : src[i];
    dst[i] = bf16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
}

KitchenIo kitchen_io(Isa isa) {
  KitchenIo io;
  switch (isa) {
    case Isa::Scalar: break;
    case Isa::Avx2:
      if (NIBBLE_K2(pack_codes_avx2)) {
        io.name = "avx2";
        io.pack = NIBBLE_K2(pack_codes_avx2), io.unpack = NIBBLE_K2(unpack_codes_avx2);
        io.bf16_to_f32 = NIBBLE_K2(bf16_to_f32_avx2), io.f16_to_f32 = NIBBLE_K2(f16_to_f32_avx2);
        io.store_half = NIBBLE_K2(store_half_avx2);
      }
      break;
    default:  // AVX-512 (F, BW, VL, DQ) and up
      if (NIBBLE_K512(pack_codes_avx512)) {
        io.name = "avx512";
        io.pack = NIBBLE_K512(pack_codes_avx512), io.unpack = NIBBLE_K512(unpack_codes_avx512);
        io.bf16_to_f32 = NIBBLE_K512(bf16_to_f32_avx512), io.f16_to_f32 = NIBBLE_K512(f16_to_f32_avx512);
        io.store_half = NIBBLE_K512(store_half_avx512);
      }
      break;
  }
  return io;
}

}  // namespace nibble::kernels::w4a4
