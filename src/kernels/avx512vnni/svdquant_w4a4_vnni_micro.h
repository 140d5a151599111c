// src/kernels/avx512vnni/svdquant_w4a4_vnni_micro.h — the AVX-512 VNNI micro-kernel of the SVDQuant
// W4A4 GEMM, included by the VNNI file and (with Bf16Up, the vdpbf16ps up-projection) by the AVX-512
// BF16 file; internal linkage in each (anonymous namespace), so the two builds never mix.
//
// Register tile: MR rows × 32 columns (two 16-lane vectors). Per group, the int32 accumulators are seeded
// with acorr[m,g], then 16 k-quads are accumulated with vpdpbusd (unsigned operand: the offset weight
// nibbles, widened in-register by a mask / shift; signed operand: the activation dword of 4 codes,
// broadcast from memory). The group's int32 sums then go through the fp32 scale step in registers, so
// the fp32 accumulators never leave the register file until the low-rank epilogue and the store.
#pragma once
#include <immintrin.h>

#include "kernels/svdquant_w4a4_kernels.h"

namespace nibble::kernels::w4a4 {
namespace {
// A 4-byte activation load the compiler may fold into vpdpbusd's {1to16} broadcast operand.
typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;
inline __m512i bcast_dword(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const unaligned_i32*>(p)); }

template <int MR, bool Bf16Up>
void micro(const GemmArgs& a, int64_t m, int64_t t) {
  const int64_t K = a.K, G = K / kGroup, R = a.R;
  const int8_t* arow[MR];
  for (int i = 0; i < MR; ++i) arow[i] = a.a8 + (m + i) * K;
  const uint8_t* wp = a.wpk + t * G * kTileBytesPerGroup;
  const float* wsc = a.wsc + t * G * kTileN;
  const __m512i nib = _mm512_set1_epi8(0x0F);

  __m512 f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();

  for (int64_t g = 0; g < G; ++g) {
    __m512i d[MR][2];
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm512_set1_epi32(a.acorr[(m + i) * G + g]);
    const uint8_t* wg = wp + g * kTileBytesPerGroup;
    const int64_t kg = g * kGroup;
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const __m512i raw0 = _mm512_loadu_si512(wg + p * 128);
      const __m512i raw1 = _mm512_loadu_si512(wg + p * 128 + 64);
      const __m512i lo0 = _mm512_and_si512(raw0, nib), lo1 = _mm512_and_si512(raw1, nib);
      for (int i = 0; i < MR; ++i) {
        const __m512i av = bcast_dword(arow[i] + kg + 8 * p);
        d[i][0] = _mm512_dpbusd_epi32(d[i][0], lo0, av);
        d[i][1] = _mm512_dpbusd_epi32(d[i][1], lo1, av);
      }
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(raw0, 4), nib);
      const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(raw1, 4), nib);
      for (int i = 0; i < MR; ++i) {
        const __m512i av = bcast_dword(arow[i] + kg + 8 * p + 4);
        d[i][0] = _mm512_dpbusd_epi32(d[i][0], hi0, av);
        d[i][1] = _mm512_dpbusd_epi32(d[i][1], hi1, av);
      }
    }
    const __m512 ws0 = _mm512_loadu_ps(wsc + g * kTileN), ws1 = _mm512_loadu_ps(wsc + g * kTileN + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 as = _mm512_set1_ps(a.ascale[(m + i) * G + g]);
      f[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d[i][0]), as), ws0, f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d[i][1]), as), ws1, f[i][1]);
    }
  }
  if constexpr (Bf16Up) {  // vdpbf16ps on the pair-packed lora / up (a.lora2, a.up2)
    const int64_t R2 = (R + 1) / 2;
    const uint16_t* u2 = a.up2 + t * R2 * 2 * kTileN;
    for (int64_t q = 0; q < R2; ++q) {
      const __m512bh u0 = (__m512bh)_mm512_loadu_si512(u2 + q * 2 * kTileN);
      const __m512bh u1 = (__m512bh)_mm512_loadu_si512(u2 + q * 2 * kTileN + 32);
      for (int i = 0; i < MR; ++i) {
        const __m512bh l = (__m512bh)_mm512_set1_epi32(int(a.lora2[(m + i) * R2 + q]));
        f[i][0] = _mm512_dpbf16_ps(f[i][0], l, u0);
        f[i][1] = _mm512_dpbf16_ps(f[i][1], l, u1);
      }
    }
  } else if (R > 0) {
    const float* up = a.up + t * R * kTileN;
    // up_pairs: r in the order 1, 0, 3, 2, … (rr ^ 1); for odd R the pad index R adds +0 (as vdpbf16ps's 0·0)
    const int64_t Rn = a.up_pairs ? R + (R & 1) : R;
    for (int64_t rr = 0; rr < Rn; ++rr) {
      const int64_t r = a.up_pairs ? (rr ^ 1) : rr;
      if (r >= R) {
        for (int i = 0; i < MR; ++i) {
          f[i][0] = _mm512_add_ps(f[i][0], _mm512_setzero_ps());
          f[i][1] = _mm512_add_ps(f[i][1], _mm512_setzero_ps());
        }
        continue;
      }
      const __m512 u0 = _mm512_loadu_ps(up + r * kTileN), u1 = _mm512_loadu_ps(up + r * kTileN + 16);
      for (int i = 0; i < MR; ++i) {
        const __m512 l = _mm512_set1_ps(a.lora[(m + i) * R + r]);
        f[i][0] = _mm512_fmadd_ps(l, u0, f[i][0]);
        f[i][1] = _mm512_fmadd_ps(l, u1, f[i][1]);
      }
    }
  }
  const int64_t n0 = t * kTileN;
  const int64_t valid = a.N - n0 < kTileN ? a.N - n0 : kTileN;
  const __mmask16 k0 = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  const __mmask16 k1 = valid >= 32 ? __mmask16(0xFFFF) : valid <= 16 ? __mmask16(0) : __mmask16((1u << (valid - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    float* y = a.y + (m + i - a.y_row0) * a.ldy + (n0 - a.y_col0);
    _mm512_mask_storeu_ps(y, k0, f[i][0]);
    _mm512_mask_storeu_ps(y + 16, k1, f[i][1]);
  }
}

constexpr int kMR = 6;

template <bool Bf16Up>
void gemm_vnni_blocks(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = m0;
    for (; m + kMR <= m1; m += kMR) micro<kMR, Bf16Up>(a, m, t);
    switch (m1 - m) {
      case 5: micro<5, Bf16Up>(a, m, t); break;
      case 4: micro<4, Bf16Up>(a, m, t); break;
      case 3: micro<3, Bf16Up>(a, m, t); break;
      case 2: micro<2, Bf16Up>(a, m, t); break;
      case 1: micro<1, Bf16Up>(a, m, t); break;
      default: break;
    }
  }
}

}  // namespace
}  // namespace nibble::kernels::w4a4
