// The joint attention of the Qwen-Image block (nn/attention.h): fp32 panel-GEMM path, bf16 flash
// path, fp64 reference.
#include "nn/attention.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/attention_kernels.h"
#include "kernels/linear_f32.h"
#include "nibble/error.h"
#include "nn/fast_exp.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"

namespace nibble::nn {

namespace {


struct AlignedBuf {
  float* p = nullptr;
  explicit AlignedBuf(size_t n) {
    p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64 + 64));
    if (!p) throw Error("qwen_image_block: out of memory (attention scratch)");
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// o (B, S, D) = softmax(q·kᵀ/√hd)·v per (batch, head); q/k/v (B, S, D).
// key_bias: optional (B, n_bias) bias on the scaled scores of keys [0, n_bias) (the text keys).
void joint_attention_f32(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t D, int64_t hd,
                     const float* key_bias, int64_t n_bias, float* o) {
  using namespace kernels::linear;
  const int64_t H = D / hd;
  constexpr int64_t kQb = 64;
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool use512 = active_isa() >= Isa::Avx512, use256 = active_isa() >= Isa::Avx2;
  (void)use512;
  (void)use256;
  parallel_for(B * H, [&](int64_t task) {
    const int64_t b = task / H, h = task % H;
    const float* qb = q + b * S * D + h * hd;
    const float* kb = k + b * S * D + h * hd;
    const float* vb = v + b * S * D + h * hd;
    // K_h as a weight (N = S, K = hd); V_hᵀ as a weight (N = hd, K = S): its panels are rows of V.
    PackedF32Weight kw, vw;
    kw.N = S, kw.K = hd, kw.panels = (S + kPanel - 1) / kPanel;
    vw.N = hd, vw.K = S, vw.panels = (hd + kPanel - 1) / kPanel;
    AlignedBuf kbuf(size_t(kw.panels * hd * kPanel)), vbuf(size_t(vw.panels * S * kPanel));
    kw.data = kbuf.p;
    vw.data = vbuf.p;
    pack_rows_f32(kb, D, S, hd, kw.data);
    for (int64_t p = 0; p < vw.panels; ++p)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t j = 0; j < kPanel; ++j) {
          const int64_t c = p * kPanel + j;
          vw.data[(p * S + s) * kPanel + j] = c < hd ? vb[s * D + c] : 0.0f;
        }
    AlignedBuf qblk(size_t(kQb * hd)), scores(size_t(kQb * S)), oblk(size_t(kQb * hd));
    std::vector<float> rowsum(kQb);
    for (int64_t s0 = 0; s0 < S; s0 += kQb) {
      const int64_t rows = S - s0 < kQb ? S - s0 : kQb;
      for (int64_t r = 0; r < rows; ++r) std::memcpy(qblk.p + r * hd, qb + (s0 + r) * D, size_t(hd) * sizeof(float));
      gemm_packed_serial(qblk.p, rows, kw, scores.p);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = scores.p + r * S;
        if (key_bias) {  // softmax((s·scale) + bias) = softmax((s + bias/scale)·scale)
          const float* kbias = key_bias + b * n_bias;
          for (int64_t j = 0; j < n_bias; ++j) sr[j] += kbias[j] / scale;
        }
#if defined(NIBBLE_HAVE_AVX512)
        if (use512) {
          rowsum[size_t(r)] = kernels::attention::softmax_row_avx512(sr, S, scale);
          continue;
        }
#endif
#if defined(NIBBLE_HAVE_AVX2)
        if (use256) {
          rowsum[size_t(r)] = kernels::attention::softmax_row_avx2(sr, S, scale);
          continue;
        }
#endif
        float mx = sr[0];
        for (int64_t j = 1; j < S; ++j) mx = sr[j] > mx ? sr[j] : mx;
        float sum = 0;
        for (int64_t j = 0; j < S; ++j) {
          const float e = fast_exp((sr[j] - mx) * scale);
          sr[j] = e;
          sum += e;
        }
        rowsum[size_t(r)] = sum;
      }
      gemm_packed_serial(scores.p, rows, vw, oblk.p);
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / rowsum[size_t(r)];
        float* dst = o + (b * S + s0 + r) * D + h * hd;
        for (int64_t i = 0; i < hd; ++i) dst[i] = oblk.p[r * hd + i] * inv;
      }
    }
  });
}

}  // namespace

AttentionPrecision resolve_attention(AttentionPrecision p, int64_t hd) {
  if (p == AttentionPrecision::Fp32) return p;
#if defined(NIBBLE_HAVE_AVX512)
  const bool ok = active_isa() >= Isa::Avx512Bf16 && kernels::attention::flash_head_bf16_supported(hd);
#else
  const bool ok = false;
#endif
  if (p == AttentionPrecision::Bf16 && !ok)
    throw Error(fmt::format("attention: the bf16 path needs AVX-512 BF16 (active ISA: {}) and head_dim % 16 == 0 "
                            "(head_dim {})", isa_name(active_isa()), hd));
  return ok ? AttentionPrecision::Bf16 : AttentionPrecision::Fp32;
}

const char* attention_name(AttentionPrecision p) {
  switch (p) {
    case AttentionPrecision::Auto: return "auto";
    case AttentionPrecision::Fp32: return "fp32 (panel GEMM)";
    case AttentionPrecision::Bf16: return "bf16 vdpbf16ps flash";
  }
  return "?";
}

void joint_attention(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t D, int64_t hd,
                     const float* key_bias, int64_t n_bias, float* o, AttentionPrecision p) {
  if (resolve_attention(p, hd) == AttentionPrecision::Fp32) {
    joint_attention_f32(q, k, v, B, S, D, hd, key_bias, n_bias, o);
    return;
  }
#if defined(NIBBLE_HAVE_AVX512)
  const int64_t H = D / hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  parallel_for(B * H, [&](int64_t task) {
    const int64_t b = task / H, h = task % H;
    const int64_t off = b * S * D + h * hd;
    kernels::attention::flash_head_bf16(q + off, k + off, v + off, D, S, hd, key_bias ? key_bias + b * n_bias : nullptr,
                                        n_bias, scale, o + off, D);
  });
#endif
}

void joint_attention_ref(const float* q, const float* k, const float* v, int64_t B, int64_t S, int64_t D, int64_t hd,
                         const float* key_bias, int64_t n_bias, float* o) {
  const int64_t H = D / hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<double> s(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const float* qi = q + (b * S + i) * D + h * hd;
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          const float* kj = k + (b * S + j) * D + h * hd;
          double d = 0;
          for (int64_t t = 0; t < hd; ++t) d += double(qi[t]) * kj[t];
          s[size_t(j)] = d * scale + (key_bias && j < n_bias ? double(key_bias[b * n_bias + j]) : 0.0);
          mx = s[size_t(j)] > mx ? s[size_t(j)] : mx;
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
        for (int64_t t = 0; t < hd; ++t) {
          double acc = 0;
          for (int64_t j = 0; j < S; ++j) acc += s[size_t(j)] * v[(b * S + j) * D + h * hd + t];
          o[(b * S + i) * D + h * hd + t] = float(acc / sum);
        }
      }
}

}  // namespace nibble::nn
