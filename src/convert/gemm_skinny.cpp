// gemm_skinny.cpp — see gemm_skinny.h.
#include "gemm_skinny.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "nibble/isa.h"
#include "nibble/thread_pool.h"

namespace nibble::convert_detail {
namespace {

constexpr int64_t kChunkK = 2048;   // B rows per pass: 2048·48·4 B = 384 KiB stays in L2
constexpr int64_t kRowBlock = 8;

bool use_avx512() {
  // Follows the library's ISA selection (NIBBLE_ISA / set_isa), so the scalar path stays testable.
  return int(active_isa()) >= int(Isa::Avx512) && __builtin_cpu_supports("avx512f");
}

// ---- Y = W·B, rows [n0, n1)
void nn_generic(const float* W, int64_t K, const float* B, int64_t L, float* Y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    float* y = Y + n * L;
    std::fill(y, y + L, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float w = W[n * K + k];
      const float* b = B + k * L;
      for (int64_t j = 0; j < L; ++j) y[j] += w * b[j];
    }
  }
}

__attribute__((target("avx512f"))) void nn_avx512(const float* W, int64_t K, const float* B, int64_t L, float* Y,
                                                   int64_t n0, int64_t n1) {
  // L is a multiple of 16; column tiles of 48 (3 zmm) × 8 rows = 24 accumulators.
  for (int64_t n = n0; n < n1; ++n) std::fill(Y + n * L, Y + (n + 1) * L, 0.0f);
  for (int64_t kc = 0; kc < K; kc += kChunkK) {
    const int64_t ke = std::min(K, kc + kChunkK);
    for (int64_t j0 = 0; j0 < L; j0 += 48) {
      const int64_t nj = std::min<int64_t>(3, (L - j0) / 16);
      for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, n1 - nb);
        __m512 acc[kRowBlock][3];
        for (int r = 0; r < kRowBlock; ++r) for (int c = 0; c < 3; ++c) acc[r][c] = _mm512_setzero_ps();
        if (rows == kRowBlock && nj == 3) {
          for (int64_t k = kc; k < ke; ++k) {
            const float* b = B + k * L + j0;
            const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
            for (int r = 0; r < kRowBlock; ++r) {
              const __m512 w = _mm512_set1_ps(W[(nb + r) * K + k]);
              acc[r][0] = _mm512_fmadd_ps(w, b0, acc[r][0]);
              acc[r][1] = _mm512_fmadd_ps(w, b1, acc[r][1]);
              acc[r][2] = _mm512_fmadd_ps(w, b2, acc[r][2]);
            }
          }
        } else {
          for (int64_t k = kc; k < ke; ++k) {
            const float* b = B + k * L + j0;
            for (int64_t r = 0; r < rows; ++r) {
              const __m512 w = _mm512_set1_ps(W[(nb + r) * K + k]);
              for (int64_t c = 0; c < nj; ++c) acc[r][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(b + 16 * c), acc[r][c]);
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < nj; ++c) {
            float* y = Y + (nb + r) * L + j0 + 16 * c;
            _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), acc[r][c]));
          }
      }
    }
  }
}

// ---- Z = Wᵀ·Q, output rows (k) [k0, k1)
void tn_generic(const float* W, int64_t N, int64_t K, const float* Q, int64_t L, float* Z, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) std::fill(Z + k * L, Z + (k + 1) * L, 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    const float* q = Q + n * L;
    for (int64_t k = k0; k < k1; ++k) {
      const float w = W[n * K + k];
      float* z = Z + k * L;
      for (int64_t j = 0; j < L; ++j) z[j] += w * q[j];
    }
  }
}

__attribute__((target("avx512f"))) void tn_avx512(const float* W, int64_t N, int64_t K, const float* Q, int64_t L,
                                                   float* Z, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) std::fill(Z + k * L, Z + (k + 1) * L, 0.0f);
  for (int64_t j0 = 0; j0 < L; j0 += 48) {
    const int64_t nj = std::min<int64_t>(3, (L - j0) / 16);
    int64_t n = 0;
    if (nj == 3) {
      for (; n + 8 <= N; n += 8) {  // 8 rows of Q in 24 registers; Z rows streamed (L1-resident block)
        __m512 q[8][3];
        for (int r = 0; r < 8; ++r)
          for (int c = 0; c < 3; ++c) q[r][c] = _mm512_loadu_ps(Q + (n + r) * L + j0 + 16 * c);
        for (int64_t k = k0; k < k1; ++k) {
          float* z = Z + k * L + j0;
          __m512 z0 = _mm512_loadu_ps(z), z1 = _mm512_loadu_ps(z + 16), z2 = _mm512_loadu_ps(z + 32);
          for (int r = 0; r < 8; ++r) {
            const __m512 w = _mm512_set1_ps(W[(n + r) * K + k]);
            z0 = _mm512_fmadd_ps(w, q[r][0], z0);
            z1 = _mm512_fmadd_ps(w, q[r][1], z1);
            z2 = _mm512_fmadd_ps(w, q[r][2], z2);
          }
          _mm512_storeu_ps(z, z0); _mm512_storeu_ps(z + 16, z1); _mm512_storeu_ps(z + 32, z2);
        }
      }
    }
    for (; n < N; ++n)
      for (int64_t k = k0; k < k1; ++k) {
        const __m512 w = _mm512_set1_ps(W[n * K + k]);
        float* z = Z + k * L + j0;
        for (int64_t c = 0; c < nj; ++c)
          _mm512_storeu_ps(z + 16 * c, _mm512_fmadd_ps(w, _mm512_loadu_ps(Q + n * L + j0 + 16 * c), _mm512_loadu_ps(z + 16 * c)));
      }
  }
}

// ---- Y (±)= U·Vt, rows [n0, n1)
void expand_generic(const float* U, const float* Vt, int64_t K, int64_t R, float* Y, bool acc, float sign,
                    int64_t n0, int64_t n1) {
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t r = 0; r < R; ++r) {
      const float u = U[n * R + r];
      const float* v = Vt + r * K;
      for (int64_t k = 0; k < K; ++k) row[size_t(k)] += u * v[k];
    }
    float* y = Y + n * K;
    if (acc) for (int64_t k = 0; k < K; ++k) y[k] += sign * row[size_t(k)];
    else for (int64_t k = 0; k < K; ++k) y[k] = sign * row[size_t(k)];
  }
}

__attribute__((target("avx512f"))) void expand_avx512(const float* U, const float* Vt, int64_t N, int64_t K, int64_t R,
                                                       float* Y, bool acc, float sign, int64_t k0, int64_t k1) {
  // Columns [k0, k1) (a multiple of 16 wide): the Vt slice (R × 256) stays in L1 while all rows
  // stream by; 4 rows × 64 columns = 16 accumulators.
  const __m512 s = _mm512_set1_ps(sign);
  for (int64_t kb = k0; kb < k1; kb += 64) {
    const int64_t nc = std::min<int64_t>(4, (k1 - kb) / 16);
    for (int64_t n = 0; n < N; n += 4) {
      const int64_t rows = std::min<int64_t>(4, N - n);
      __m512 a[4][4];
      for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
      for (int64_t r = 0; r < R; ++r) {
        const float* v = Vt + r * K + kb;
        __m512 vv[4];
        for (int64_t c = 0; c < nc; ++c) vv[c] = _mm512_loadu_ps(v + 16 * c);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512 u = _mm512_set1_ps(U[(n + i) * R + r]);
          for (int64_t c = 0; c < nc; ++c) a[i][c] = _mm512_fmadd_ps(u, vv[c], a[i][c]);
        }
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < nc; ++c) {
          float* y = Y + (n + i) * K + kb + 16 * c;
          const __m512 v = _mm512_mul_ps(s, a[i][c]);
          _mm512_storeu_ps(y, acc ? _mm512_add_ps(_mm512_loadu_ps(y), v) : v);
        }
    }
  }
}

}  // namespace

void skinny_nn(const float* W, int64_t N, int64_t K, const float* B, int64_t L, float* Y) {
  const bool fast = use_avx512() && L % 16 == 0;
  parallel_for_range(N, 64, [&](int64_t n0, int64_t n1) {
    if (fast) nn_avx512(W, K, B, L, Y, n0, n1);
    else nn_generic(W, K, B, L, Y, n0, n1);
  });
}

void skinny_tn(const float* W, int64_t N, int64_t K, const float* Q, int64_t L, float* Z) {
  const bool fast = use_avx512() && L % 16 == 0;
  parallel_for_range(K, 256, [&](int64_t k0, int64_t k1) {
    if (fast) tn_avx512(W, N, K, Q, L, Z, k0, k1);
    else tn_generic(W, N, K, Q, L, Z, k0, k1);
  });
}

void expand_lowrank(const float* U, const float* Vt, int64_t N, int64_t K, int64_t R, float* Y, bool accumulate, float sign) {
  if (use_avx512() && K % 16 == 0) {
    parallel_for_range(K, 256, [&](int64_t k0, int64_t k1) { expand_avx512(U, Vt, N, K, R, Y, accumulate, sign, k0, k1); });
  } else {
    parallel_for_range(N, 16, [&](int64_t n0, int64_t n1) { expand_generic(U, Vt, K, R, Y, accumulate, sign, n0, n1); });
  }
}

}  // namespace nibble::convert_detail
