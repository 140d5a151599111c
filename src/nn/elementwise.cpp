// The element-wise ops of the Qwen-Image model (nn/elementwise.h): AVX-512 bodies with function
// target attributes, portable bodies with the same arithmetic, dispatched on active_isa().
#include "nn/elementwise.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"
#include "nn/fast_exp.h"

#if defined(NIBBLE_HAVE_AVX512) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NIBBLE_EW_AVX512 1
#include <immintrin.h>

#include "nn/fast_exp_avx512.h"
#define EW512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#endif

namespace nibble::nn::ew {

namespace {

constexpr float kGeluC = 0.7978845608028654f;  // √(2/π)
constexpr float kGeluA = 0.044715f;

bool use512() {
#if defined(NIBBLE_EW_AVX512)
  return active_isa() >= Isa::Avx512;
#else
  return false;
#endif
}

// ---- portable bodies: 16 partial sums (lane j takes i ≡ j mod 16), reduced as a halving tree.
inline float tree16(float* a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}
inline float sum_ref(const float* x, int64_t n) {
  float a[16] = {};
  for (int64_t i = 0; i < n; ++i) a[i % 16] += x[i];
  return tree16(a);
}
inline float sum_sq_dev_ref(const float* x, int64_t n, float mu) {
  float a[16] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[i] - mu;
    a[i % 16] += d * d;
  }
  return tree16(a);
}
inline float gelu_ref(float x) {
  const float u = kGeluC * (x + kGeluA * x * x * x);
  const float e = fast_exp(2.0f * u);
  return x * (e / (e + 1.0f));
}

void layernorm_row_ref(const float* x, int64_t D, float eps, const float* shift, const float* scale, float* o) {
  const float mu = sum_ref(x, D) / float(D);
  const float var = sum_sq_dev_ref(x, D, mu) / float(D);
  const float inv = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < D; ++i) o[i] = (x[i] - mu) * inv * (1.0f + scale[i]) + shift[i];
}

void rmsnorm_rope_row_ref(float* v, int64_t D, int64_t hd, float eps, const float* w, const float* c2,
                          const float* s2) {
  for (int64_t h = 0; h < D / hd; ++h) {
    float* p = v + h * hd;
    float a[16] = {};
    for (int64_t i = 0; i < hd; ++i) a[i % 16] += p[i] * p[i];
    const float inv = 1.0f / std::sqrt(tree16(a) / float(hd) + eps);
    if (!c2) {
      for (int64_t i = 0; i < hd; ++i) p[i] = p[i] * inv * w[i];
      continue;
    }
    for (int64_t i = 0; i < hd; i += 2) {
      const float y0 = p[i] * inv * w[i], y1 = p[i + 1] * inv * w[i + 1];
      p[i] = y0 * c2[i] + y1 * s2[i];
      p[i + 1] = y1 * c2[i + 1] + y0 * s2[i + 1];
    }
  }
}

void rmsnorm_row_ref(const float* x, int64_t D, float eps, const float* w, float* o) {
  float a[16] = {};
  for (int64_t i = 0; i < D; ++i) a[i % 16] += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(tree16(a) / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) o[i] = x[i] * inv * w[i];
}

#if defined(NIBBLE_EW_AVX512)
// ---- AVX-512 bodies (GCC 12 warns about the _mm512_undefined_* operands inside its intrinsics)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
EW512 inline float tree512(__m512 v) {  // the halving tree of tree16
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}
EW512 inline __mmask16 tail_mask(int64_t n) { return __mmask16((1u << n) - 1u); }

EW512 void layernorm_row_512(const float* x, int64_t D, float eps, const float* shift, const float* scale, float* o) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
  if (i < D) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(tail_mask(D - i), x + i));
  const float mu = tree512(acc) / float(D);
  const __m512 vmu = _mm512_set1_ps(mu);
  acc = _mm512_setzero_ps();
  for (i = 0; i + 16 <= D; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmu);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  if (i < D) {
    const __mmask16 m = tail_mask(D - i);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), vmu);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  const float var = tree512(acc) / float(D);
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(var + eps)), one = _mm512_set1_ps(1.0f);
  for (i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xFFFF) : tail_mask(D - i);
    const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmu), inv);
    const __m512 s1 = _mm512_add_ps(one, _mm512_maskz_loadu_ps(m, scale + i));
    _mm512_mask_storeu_ps(o + i, m, _mm512_fmadd_ps(n, s1, _mm512_maskz_loadu_ps(m, shift + i)));
  }
}

// hd % 16 == 0 (checked by the caller).
EW512 void rmsnorm_rope_row_512(float* v, int64_t D, int64_t hd, float eps, const float* w, const float* c2,
                                const float* s2) {
  for (int64_t h = 0; h < D / hd; ++h) {
    float* p = v + h * hd;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < hd; i += 16) {
      const __m512 x = _mm512_loadu_ps(p + i);
      acc = _mm512_fmadd_ps(x, x, acc);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(tree512(acc) / float(hd) + eps));
    for (int64_t i = 0; i < hd; i += 16) {
      const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), inv), _mm512_loadu_ps(w + i));
      if (!c2) {
        _mm512_storeu_ps(p + i, y);
        continue;
      }
      const __m512 ys = _mm512_permute_ps(y, 0xB1);  // swap the two floats of every pair
      _mm512_storeu_ps(p + i, _mm512_fmadd_ps(y, _mm512_loadu_ps(c2 + i), _mm512_mul_ps(ys, _mm512_loadu_ps(s2 + i))));
    }
  }
}


EW512 void gelu_512(float* x, int64_t n) {
  const __m512 c = _mm512_set1_ps(2.0f * kGeluC), a = _mm512_set1_ps(kGeluA), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 e = nn::fast_exp_avx512(_mm512_mul_ps(c, _mm512_fmadd_ps(a, v3, v)));
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(v, _mm512_div_ps(e, _mm512_add_ps(e, one))));
  }
}

EW512 void axpy_512(float* x, const float* g, const float* y, int64_t D) {  // x += g ⊙ y
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xFFFF) : tail_mask(D - i);
    const __m512 r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, y + i),
                                     _mm512_maskz_loadu_ps(m, x + i));
    _mm512_mask_storeu_ps(x + i, m, r);
  }
}

EW512 void rmsnorm_row_512(const float* x, int64_t D, float eps, const float* w, float* o) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xFFFF) : tail_mask(D - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(tree512(acc) / float(D) + eps));
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xFFFF) : tail_mask(D - i);
    _mm512_mask_storeu_ps(o + i, m,
                          _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv), _mm512_maskz_loadu_ps(m, w + i)));
  }
}
#pragma GCC diagnostic pop
#endif

// Rows per task: about 64 KiB of input per task, at least one row.
int64_t row_grain(int64_t D) { return D >= 16384 ? 1 : 16384 / (D > 0 ? D : 1); }

struct Slot {
  float* p = nullptr;
  int64_t n = 0;
};
struct Scratch {
  Slot slots[16];
  ~Scratch() {
    for (auto& s : slots) std::free(s.p);
  }
};

}  // namespace

void layernorm_modulate(const float* x, int64_t rows, int64_t D, float eps, const float* shift, const float* scale,
                        float* out) {
  const bool v = use512();
  parallel_for_range(rows, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#if defined(NIBBLE_EW_AVX512)
      if (v) {
        layernorm_row_512(x + r * D, D, eps, shift, scale, out + r * D);
        continue;
      }
#endif
      layernorm_row_ref(x + r * D, D, eps, shift, scale, out + r * D);
    }
  });
  (void)v;
}

void rope_expand(const float* cos, const float* sin, int64_t S, int64_t hd, float* c2, float* s2) {
  const int64_t h2 = hd / 2;
  for (int64_t p = 0; p < S; ++p)
    for (int64_t i = 0; i < h2; ++i) {
      c2[p * hd + 2 * i] = c2[p * hd + 2 * i + 1] = cos[p * h2 + i];
      s2[p * hd + 2 * i] = -sin[p * h2 + i];
      s2[p * hd + 2 * i + 1] = sin[p * h2 + i];
    }
}

void rmsnorm_rope_row(float* v, int64_t D, int64_t hd, float eps, const float* w, const float* c2, const float* s2) {
#if defined(NIBBLE_EW_AVX512)
  if (hd % 16 == 0 && use512()) {
    rmsnorm_rope_row_512(v, D, hd, eps, w, c2, s2);
    return;
  }
#endif
  rmsnorm_rope_row_ref(v, D, hd, eps, w, c2, s2);
}

void gelu_tanh_inplace(float* x, int64_t n) {
  const bool v = use512();
  parallel_for_range(n, 1 << 14, [&](int64_t i0, int64_t i1) {
#if defined(NIBBLE_EW_AVX512)
    if (v) {
      gelu_512(x + i0, i1 - i0);
      return;
    }
#endif
    for (int64_t i = i0; i < i1; ++i) x[i] = gelu_ref(x[i]);
  });
  (void)v;
}

void gated_residual(float* x, const float* y, int64_t rows, int64_t rows_per_batch, int64_t D, const float* mod,
                    int64_t mod_stride, int64_t gate_offset, int64_t zero_from) {
  const int64_t B = rows / rows_per_batch;
  const bool v = use512();
  parallel_for_range(rows, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / rows_per_batch, mrow = (r % rows_per_batch) < zero_from ? b : B + b;
      const float* g = mod + mrow * mod_stride + gate_offset;
#if defined(NIBBLE_EW_AVX512)
      if (v) {
        axpy_512(x + r * D, g, y + r * D, D);
        continue;
      }
#endif
      for (int64_t i = 0; i < D; ++i) x[r * D + i] += g[i] * y[r * D + i];
    }
  });
  (void)v;
}

void silu(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / (1.0f + std::exp(-x[i]));
}

void rmsnorm_rows(const float* x, int64_t rows, int64_t D, float eps, const float* w, float* out) {
  const bool v = use512();
  parallel_for_range(rows, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#if defined(NIBBLE_EW_AVX512)
      if (v) {
        rmsnorm_row_512(x + r * D, D, eps, w, out + r * D);
        continue;
      }
#endif
      rmsnorm_row_ref(x + r * D, D, eps, w, out + r * D);
    }
  });
  (void)v;
}

float* scratch(int slot, int64_t n) {
  thread_local Scratch s;
  if (slot < 0 || slot >= 16) throw Error("nn::ew::scratch: slot out of range");
  Slot& sl = s.slots[slot];
  if (n > sl.n) {
    std::free(sl.p);
    sl.p = nullptr;
    sl.n = 0;
    const size_t bytes = (size_t(n) * sizeof(float) + 63) / 64 * 64;
    sl.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!sl.p) throw Error("nn: out of memory (" + std::to_string(bytes >> 20) + " MiB of activation scratch)");
    sl.n = n;
  }
  return sl.p;
}

}  // namespace nibble::nn::ew
