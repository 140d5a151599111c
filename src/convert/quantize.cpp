// quantize.cpp — in-memory quantizers: float W → awq_w4a16 / svdquant_w4a4 params (nibble/convert.h).
//
// Both quantizers store their scales in a 16-bit dtype and choose the integer codes *after* rounding
// the scales, so the stored (code, scale, zero) triples are the best representation given what the
// runtime actually reads. Work inside one call is split over rows with parallel_for_range (per-row
// math only, so the bytes never depend on the thread count); the converter calls these from its
// own pool tasks, where nested parallel_for runs serially.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include <fmt/format.h>

#include "nibble/convert.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"
#include "gptq.h"
#include "svd.h"

#include <Eigen/Dense>

namespace nibble {
namespace {

using convert_detail::LowRank;

float round_to(DType d, float v) {
  return d == DType::F16 ? f16_to_f32(f32_to_f16(v)) : bf16_to_f32(f32_to_bf16(v));
}
uint16_t encode16(DType d, float v) { return d == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v); }

// Round half to even for |v| ≤ 2^22 (codes are clamped to ±16 before): adding and subtracting
// 1.5·2^23 leaves the integer part under the default rounding mode. std::nearbyint is a libm call
// in the baseline x86-64 build, and the searches run this over every weight dozens of times. The
// project builds without -ffast-math, so the compiler may not fold (v + m) − m (IEEE semantics);
// the byte-identity of outputs across builds is checked by the converter tests.
inline float round_even(float v) {
  constexpr float magic = 12582912.0f;
  return (v + magic) - magic;
}

Tensor store16(DType d, const float* v, Shape shape) {
  Tensor t = Tensor::empty(d, shape);
  uint16_t* p = t.mutable_data<uint16_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = encode16(d, v[i]);
  return t;
}

// Smallest 16-bit value ≥ v (v ≥ 0): the stored scale must not clip the group's absmax.
float round_up_to(DType d, float v) {
  float r = round_to(d, v);
  if (r >= v) return r;
  if (d == DType::F16) {
    uint16_t h = f32_to_f16(v);
    return f16_to_f32(uint16_t(h + 1));
  }
  uint16_t h = f32_to_bf16(v);
  return bf16_to_f32(uint16_t(h + 1));
}

void check_16bit(DType d, const char* what) {
  if (d != DType::BF16 && d != DType::F16)
    throw Error(fmt::format("{}: storage dtype must be BF16 or F16, got {}", what, dtype_name(d)));
}

Tensor as_f32_2d(const Tensor& W, const char* what) {
  if (!W.defined() || W.dim() != 2 || !is_float(W.dtype()))
    throw Error(fmt::format("{}: expected a 2-D float weight (N, K), got {}", what,
                            W.defined() ? std::string(dtype_name(W.dtype())) + " " + shape_str(W.shape()) : "undefined"));
  return W.to_f32();
}

std::vector<float> bias_f32(const Tensor& b, int64_t N, const char* what) {
  std::vector<float> out;
  if (!b.defined()) return out;
  if (b.numel() != N || !is_float(b.dtype()))
    throw Error(fmt::format("{}: bias must be a float tensor of {} elements, got {} {}", what, N,
                            dtype_name(b.dtype()), shape_str(b.shape())));
  Tensor f = b.to_f32();
  out.assign(f.data<float>(), f.data<float>() + N);
  return out;
}

std::vector<float> stat_vec(const Tensor& t, int64_t K, const char* what) {
  std::vector<float> v;
  if (!t.defined()) return v;
  if (t.numel() != K)
    throw Error(fmt::format("calibration statistics {}: expected {} channels, got {}", what, K, shape_str(t.shape())));
  Tensor f = t.to_f32();
  v.assign(f.data<float>(), f.data<float>() + K);
  return v;
}

// One AWQ group (G values v): the (scale, zero) pair, rounded as stored, and its nearest codes that
// minimise the importance-weighted error (imp: G weights, or null = unweighted) over the clipping
// ratios; with `improved`, asymmetric clipping and a weighted least-squares refit follow.
struct AwqGroupChoice { float s, z, r; };
AwqGroupChoice awq_choose_group(const float* v, int64_t G, const float* imp, const std::vector<float>& ratios,
                                bool improved, DType sd, int* best_codes) {
  std::vector<int> codes(static_cast<size_t>(G));
  float lo = v[0], hi = v[0];
  for (int64_t j = 1; j < G; ++j) { lo = std::min(lo, v[j]); hi = std::max(hi, v[j]); }
  // Error of the (s, z) pair (rounded as stored) with its nearest codes, importance-weighted. The
  // sum only grows: once it reaches `bound` (the best so far) the pair cannot win, and it stops.
  auto eval = [&](float s, float z, std::vector<int>& c, double bound) {
    double err = 0;
    for (int64_t j = 0; j < G; ++j) {
      int q = 8;
      if (s > 0) q = int(round_even(std::clamp((v[j] - z) / s + 8.0f, -1.0f, 16.0f)));
      q = std::clamp(q, 0, 15);
      c[size_t(j)] = q;
      const float e = (float(q - 8) * s + z) - v[j];
      err += (imp ? double(imp[j]) : 1.0) * double(e) * double(e);
      if ((j & 15) == 15 && err >= bound) return err;
    }
    return err;
  };
  auto pair_for = [&](float clo, float chi) {
    const float s = round_to(sd, (chi - clo) / 15.0f);
    // constant group: every code 8, value in the zero
    const float z = s > 0 ? round_to(sd, clo + 8.0f * s) : round_to(sd, 0.5f * (lo + hi));
    return std::pair<float, float>{s, z};
  };
  double best_err = std::numeric_limits<double>::infinity();
  float best_s = 0, best_z = 0, best_r = 1;
  auto consider = [&](float s, float z, float r) {
    const double err = eval(s, z, codes, best_err);
    if (err < best_err) { best_err = err; best_s = s; best_z = z; best_r = r; std::copy(codes.begin(), codes.end(), best_codes); }
  };
  for (float r : ratios) {
    auto [s, z] = pair_for(lo * r, hi * r);
    consider(s, z, r);
  }
  if (improved && ratios.size() > 1) {
    // Asymmetric clipping: the low end with the high end fixed, then the other way round.
    const float r0 = best_r;
    float rl = r0;
    for (float r : ratios) {
      auto [s, z] = pair_for(lo * r, hi * r0);
      const double before = best_err;
      consider(s, z, best_r);
      if (best_err < before) rl = r;
    }
    for (float r : ratios) { auto [s, z] = pair_for(lo * rl, hi * r); consider(s, z, best_r); }
    // Weighted least-squares refit of (s, z) for the chosen codes, re-rounded (2 rounds).
    for (int it = 0; it < 2 && best_s > 0; ++it) {
      double saa = 0, sa = 0, s1 = 0, saw = 0, sw = 0;
      for (int64_t j = 0; j < G; ++j) {
        const double a = imp ? double(imp[j]) : 1.0;
        const double c = double(best_codes[j] - 8);
        saa += a * c * c, sa += a * c, s1 += a, saw += a * c * v[j], sw += a * v[j];
      }
      const double det = saa * s1 - sa * sa;
      if (!(std::fabs(det) > 1e-30)) break;
      const double ns = (saw * s1 - sa * sw) / det, nz = (saa * sw - sa * saw) / det;
      if (!(ns > 0) || !std::isfinite(nz)) break;
      const double before = best_err;
      consider(round_to(sd, float(ns)), round_to(sd, float(nz)), best_r);
      if (!(best_err < before)) break;
    }
  }
  return {best_s, best_z, best_r};
}

}  // namespace

// ====================================================================== awq_w4a16
QuantConfig awq_quant_config(const AwqQuantOptions& o) {
  QuantConfig c;
  c.format = "awq_w4a16";
  c.group_size = o.group_size;
  return c;
}

AwqW4A16Params quantize_awq_w4a16(const Tensor& Win, const Tensor& bias, const AwqQuantOptions& o) {
  check_16bit(o.scale_dtype, "awq_w4a16 quantize");
  Tensor W = as_f32_2d(Win, "awq_w4a16 quantize");
  const int64_t N = W.size(0), K = W.size(1), G = o.group_size;
  if (G <= 0 || G % 2 != 0 || K % G != 0)
    throw Error(fmt::format("awq_w4a16 quantize: group_size {} must be even and divide K = {}", G, K));
  const int64_t NG = K / G;
  // Importance of each input channel in the output error Σ_k E[x_k²]·e_k²: E[x²] (mean_sq) with the
  // improved search, else mean|x|² (the original AWQ proxy).
  std::vector<float> imp;
  if (o.calib && o.calib->mean_sq.defined() && o.improved_search) {
    imp = stat_vec(o.calib->mean_sq, K, "mean_sq");
  } else if (o.calib && o.calib->mean_abs.defined()) {
    imp = stat_vec(o.calib->mean_abs, K, "mean_abs");
    for (float& a : imp) a *= a;
  }
  std::vector<float> ratios = {1.0f};
  if (!imp.empty() && o.clip_grid > 0)  // (ratios > 1 only with statistics: weight-only stays min/max)
    for (int i = 1; i <= o.clip_grid; ++i) ratios.push_back(1.0f - float(i) / float(o.clip_grid) * (1.0f - o.min_clip));

  Tensor qweight = Tensor::empty(DType::I8, {N, K / 2});
  std::vector<float> scales(size_t(NG * N)), zeros(size_t(NG * N));
  const float* w = W.data<float>();
  uint8_t* qw = reinterpret_cast<uint8_t*>(qweight.mutable_data<int8_t>());
  const DType sd = o.scale_dtype;
  std::vector<double> row_err(static_cast<size_t>(N), 0.0), row_norm(static_cast<size_t>(N), 0.0);
  std::vector<double> ratio_sum(static_cast<size_t>(N), 0.0);
  const Tensor* gX = o.gptq && o.calib && o.calib->sample.defined() ? &o.calib->sample : nullptr;
  if (gX && (gX->dim() != 2 || gX->size(1) != K))
    throw Error(fmt::format("calibration sample: expected (M, {}), got {}", K, shape_str(gX->shape())));
  if (gX) {
    // GPTQ: columns rounded in turn with error feedback through H = XᵀX of the sample rows; each
    // group's (scale, zero) is searched as below, on the group's values after the feedback.
    Tensor Xs = gX->to_f32();
    const convert_detail::GptqFactor U = convert_detail::gptq_factor(
        convert_detail::gram(Xs.data<float>(), Xs.size(0), K), std::max(o.gptq_damp * double(K) / double(Xs.size(0)), 0.01));
    std::vector<float> Wq(w, w + N * K);
    std::vector<float> ratio_of(size_t(NG * N), 1.0f);
    convert_detail::gptq_sweep(
        Wq.data(), N, K, G, U,
        [&](int64_t n, int64_t g, const float* v) {
          std::vector<int> c(static_cast<size_t>(G));
          const AwqGroupChoice ch = awq_choose_group(v, G, imp.empty() ? nullptr : imp.data() + g * G, ratios,
                                                     o.improved_search, sd, c.data());
          scales[size_t(g * N + n)] = ch.s, zeros[size_t(g * N + n)] = ch.z, ratio_of[size_t(g * N + n)] = ch.r;
        },
        [&](int64_t n, int64_t g, float x) {
          const float s = scales[size_t(g * N + n)], z = zeros[size_t(g * N + n)];
          int q = 8;
          if (s > 0) q = std::clamp(int(round_even(std::clamp((x - z) / s + 8.0f, -1.0f, 16.0f))), 0, 15);
          return float(q - 8) * s + z;
        });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < NG; ++g) {
        const float s = scales[size_t(g * N + n)], z = zeros[size_t(g * N + n)];
        ratio_sum[size_t(n)] += ratio_of[size_t(g * N + n)];
        uint8_t* row = qw + n * (K / 2) + g * (G / 2);
        for (int64_t j = 0; j < G; ++j) {
          const int64_t k = g * G + j;
          const int q = s > 0 ? std::clamp(int(std::lrint((Wq[size_t(n * K + k)] - z) / s + 8.0f)), 0, 15) : 8;
          row[j / 2] = j % 2 == 0 ? uint8_t(q) : uint8_t(row[j / 2] | (q << 4));
          const double e = double(float(q - 8) * s + z) - w[n * K + k];
          row_err[size_t(n)] += e * e;
          row_norm[size_t(n)] += double(w[n * K + k]) * w[n * K + k];
        }
      }
  } else
  parallel_for_range(N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<int> best_codes(static_cast<size_t>(G));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < NG; ++g) {
        const float* v = w + n * K + g * G;
        const AwqGroupChoice ch = awq_choose_group(v, G, imp.empty() ? nullptr : imp.data() + g * G, ratios,
                                                   o.improved_search, sd, best_codes.data());
        const float best_s = ch.s, best_z = ch.z, best_r = ch.r;
        ratio_sum[size_t(n)] += best_r;
        for (int64_t j = 0; j < G; ++j) {
          const double e = double(float(best_codes[size_t(j)] - 8) * best_s + best_z) - v[j];
          row_err[size_t(n)] += e * e;
          row_norm[size_t(n)] += double(v[j]) * v[j];
        }
        scales[size_t(g * N + n)] = best_s;
        zeros[size_t(g * N + n)] = best_z;
        uint8_t* row = qw + n * (K / 2) + g * (G / 2);
        for (int64_t j = 0; j < G; j += 2) row[j / 2] = pack_nibbles(best_codes[size_t(j)], best_codes[size_t(j + 1)]);
      }
    }
  });
  if (o.weight_rel_error) {
    double e = 0, w2 = 0;
    for (int64_t n = 0; n < N; ++n) { e += row_err[size_t(n)]; w2 += row_norm[size_t(n)]; }
    *o.weight_rel_error = w2 > 0 ? std::sqrt(e / w2) : std::sqrt(e);
  }
  AwqW4A16Params p;
  p.N = N; p.K = K; p.group_size = G;
  p.qweight = qweight;
  p.wscales = store16(sd, scales.data(), {NG, N});
  p.wzeros = store16(sd, zeros.data(), {NG, N});
  auto b = bias_f32(bias, N, "awq_w4a16 quantize");
  if (!b.empty()) p.bias = store16(sd, b.data(), {N});
  if (o.info) {
    QuantInfo& inf = *o.info;
    inf = QuantInfo{};
    inf.calibrated = !imp.empty();
    inf.gptq = gX != nullptr;
    double rs = 0;
    for (double v : ratio_sum) rs += v;
    inf.clip_ratio_mean = rs / double(N * NG);
    const Tensor* X = o.calib && o.calib->sample.defined() ? &o.calib->sample : nullptr;
    if (X && X->dim() == 2 && X->size(1) == K) {
      AwqQuantOptions plain = o;
      plain.calib = nullptr;
      plain.info = nullptr;
      plain.weight_rel_error = nullptr;
      Tensor Xf = X->to_f32();
      Tensor yref = linear_f32(Xf, W);
      auto snr = [&](const Tensor& Weff) {
        Tensor y = linear_f32(Xf, Weff);
        double num = 0, den = 0;
        for (int64_t i = 0; i < y.numel(); ++i) {
          const double r = yref.data<float>()[i], e = double(y.data<float>()[i]) - r;
          num += e * e, den += r * r;
        }
        return num > 0 ? 10 * std::log10(den / num) : INFINITY;
      };
      inf.sample_rows = Xf.size(0);
      inf.snr_before_db = snr(effective_weight(quantize_awq_w4a16(W, Tensor(), plain)));
      inf.snr_after_db = snr(effective_weight(p));
    }
  }
  return p;
}

Tensor effective_weight(const AwqW4A16Params& p) {
  const int64_t N = p.N, K = p.K, G = p.group_size;
  Tensor s = p.wscales.to_f32(), z = p.wzeros.to_f32();
  Tensor out = Tensor::empty(DType::F32, {N, K});
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.data<int8_t>());
  float* o = out.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; k += 2) {
      const uint8_t b = q[n * (K / 2) + k / 2];
      const float sc = s.data<float>()[(k / G) * N + n], ze = z.data<float>()[(k / G) * N + n];
      o[n * K + k] = float(unpack_lo_unsigned(b) - 8) * sc + ze;
      o[n * K + k + 1] = float(unpack_hi_unsigned(b) - 8) * sc + ze;
    }
  return out;
}

std::vector<std::pair<std::string, Tensor>> layer_tensors(const AwqW4A16Params& p) {
  std::vector<std::pair<std::string, Tensor>> t = {
      {"weight", p.qweight}, {"weight_scale", p.wscales}, {"weight_zeros", p.wzeros}};
  if (p.bias.defined()) t.emplace_back("bias", p.bias);
  return t;
}

// ====================================================================== svdquant_w4a4
QuantConfig svdquant_quant_config(const SvdquantQuantOptions& o) {
  QuantConfig c;
  c.format = "svdquant_w4a4";
  if (o.act_unsigned) c.act_unsigned = true;
  if (o.tile_layout) c.layout = "kitchen_tile_packed_w4a4";
  c.lowrank_branch_input_basis = "raw";
  c.proj_down_smooth_folded = true;
  return c;
}

namespace {

constexpr int64_t kGroup = 64;

// Residual quantization of a (N, K) smoothed-basis matrix: per row, per 64-group, absmax/7 scale
// rounded UP to the storage dtype (so no value clips), codes rint(r/s) in [−7, 7].
struct QuantResidual {
  std::vector<int8_t> codes;   // (N, K)
  std::vector<float> scales;   // (K/64, N), already rounded to the storage dtype
};
// With `imp` (K channel weights): the scale is searched per group among absmax·r/7, r ∈ {1, 0.95,
// …, 0.8} (r < 1 clips the largest values), minimising Σ_k imp_k·(q_k·s − r_k)².
// The scale of one group of 64 values v: absmax/7 rounded up (nothing clips), or with `w` (64
// weights) the best of absmax·r/7, r ∈ {1, 0.95, …, 0.8}, on Σ_j w_j·(q_j·s − v_j)².
float residual_scale(const float* v, const float* w, DType sd) {
  float amax = 0;
  for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
  float s = amax > 0 ? round_up_to(sd, amax / 7.0f) : 0.0f;
  if (w && s > 0) {
    auto err = [&](float sc) {
      const float inv = 1.0f / sc;
      double e = 0;
      for (int64_t j = 0; j < kGroup; ++j) {
        const float c = std::clamp(round_even(std::clamp(v[j] * inv, -8.0f, 8.0f)), -7.0f, 7.0f);
        const double d = double(c * sc) - v[j];
        e += double(w[j]) * d * d;
      }
      return e;
    };
    double best = err(s);
    for (int i = 1; i <= 4; ++i) {
      const float c = round_to(sd, amax * (1.0f - 0.05f * float(i)) / 7.0f);
      if (!(c > 0)) continue;
      const double e = err(c);
      if (e < best) best = e, s = c;
    }
  }
  return s;
}

QuantResidual quantize_residual(const float* R, int64_t N, int64_t K, DType sd, const float* imp = nullptr) {
  QuantResidual q;
  q.codes.resize(size_t(N * K));
  q.scales.resize(size_t(K / kGroup * N));
  parallel_for_range(N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < K / kGroup; ++g) {
        const float* v = R + n * K + g * kGroup;
        const float s = residual_scale(v, imp ? imp + g * kGroup : nullptr, sd);
        q.scales[size_t(g * N + n)] = s;
        int8_t* c = q.codes.data() + n * K + g * kGroup;
        if (s == 0) { std::fill(c, c + kGroup, int8_t(0)); continue; }
        const float inv = 1.0f / s;
        for (int64_t j = 0; j < kGroup; ++j)
          c[j] = int8_t(std::clamp(round_even(std::clamp(v[j] * inv, -8.0f, 8.0f)), -7.0f, 7.0f));
      }
  });
  return q;
}
// The same grid (per-64 scales, codes in [−7, 7]) chosen by GPTQ: the group's scale (residual_scale,
// with `imp` the weighted search) from its values after the feedback of the earlier columns. R is
// consumed.
QuantResidual gptq_residual(float* R, int64_t N, int64_t K, const convert_detail::GptqFactor& U, DType sd,
                            const float* imp = nullptr) {
  QuantResidual q;
  q.codes.resize(size_t(N * K));
  q.scales.resize(size_t(K / kGroup * N));
  const int64_t NG = K / kGroup;
  convert_detail::gptq_sweep(
      R, N, K, kGroup, U,
      [&](int64_t n, int64_t g, const float* v) {
        q.scales[size_t(g * N + n)] = residual_scale(v, imp ? imp + g * kGroup : nullptr, sd);
      },
      [&](int64_t n, int64_t g, float x) {
        (void)NG;
        const float s = q.scales[size_t(g * N + n)];
        return s > 0 ? std::clamp(round_even(std::clamp(x / s, -8.0f, 8.0f)), -7.0f, 7.0f) * s : 0.0f;
      });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float s = q.scales[size_t((k / kGroup) * N + n)];
      q.codes[size_t(n * K + k)] = s > 0 ? int8_t(std::lrint(R[n * K + k] / s)) : int8_t(0);
    }
  return q;
}

void dequantize_residual(const QuantResidual& q, int64_t N, int64_t K, float* out) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = float(q.codes[size_t(n * K + k)]) * q.scales[size_t((k / kGroup) * N + n)];
}

struct Member {
  int64_t N = 0, row0 = 0;     // rows of the stacked matrix
  Tensor W;                    // F32 (N, K), raw basis
  std::vector<float> bias;
};

// One full decomposition of the stacked smoothed weight for a given smooth vector.
struct Decomposition {
  std::vector<float> smooth;          // (K) rounded to storage dtype
  std::vector<float> proj_down;       // (K, R) raw basis, rounded
  std::vector<float> proj_up;         // (Ntot, R) rounded
  QuantResidual resid;                // per stacked row
  int64_t R = 0;
  std::vector<double> row_err;        // Σ_k ((Q(r) − r)/s_k)² per stacked row = ‖W_eff − W‖² rows
};

// `start`: the unrefined decomposition (refine 0) of the same smooth, already computed (by the
// search); the refinement continues from it instead of recomputing iteration 0 (same bytes).
Decomposition decompose(const std::vector<Member>& members, int64_t Ntot, int64_t K,
                        const std::vector<float>& smooth, const SvdquantQuantOptions& o, int refine,
                        const Decomposition* start = nullptr) {
  const DType sd = o.dtype;
  if (start && refine == 0) return *start;
  Decomposition d;
  d.smooth = smooth;
  // Stacked smoothed weight Ws = W·diag(s).
  std::vector<float> Ws(size_t(Ntot * K));
  for (const auto& m : members) {
    const float* w = m.W.data<float>();
    float* dst = Ws.data() + m.row0 * K;
    for (int64_t n = 0; n < m.N; ++n)
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] = w[n * K + k] * smooth[size_t(k)];
  }
  std::vector<float> target = Ws;   // matrix whose top-R subspace we take
  std::vector<float> tmp(size_t(Ntot * K));
  LowRank lr;
  int it0 = 0;
  if (start) {  // next target: Ws − Q(R) of the start
    d = *start;
    dequantize_residual(d.resid, Ntot, K, tmp.data());
    for (size_t i = 0; i < target.size(); ++i) target[i] = Ws[i] - tmp[i];
    it0 = 1;
  }
  for (int it = it0; it <= refine; ++it) {
    lr = convert_detail::truncated_svd(target.data(), Ntot, K, o.rank, o.svd, o.seed + uint64_t(it),
                                        o.oversample, o.power_iterations);
    const int64_t R = lr.R;
    d.R = R;
    // Round the projections as stored; proj_down in the raw basis is V / s.
    d.proj_down.resize(size_t(K * R));
    d.proj_up.resize(size_t(Ntot * R));
    std::vector<float> Vs(size_t(K * R));  // smoothed-basis V as the runtime effectively sees it
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) {
        const float pd = round_to(sd, lr.V[size_t(k * R + r)] / smooth[size_t(k)]);
        d.proj_down[size_t(k * R + r)] = pd;
        Vs[size_t(k * R + r)] = pd * smooth[size_t(k)];
      }
    for (size_t i = 0; i < d.proj_up.size(); ++i) d.proj_up[i] = round_to(sd, lr.U[i]);
    // Residual R = Ws − U·Vsᵀ (with the stored, rounded projections).
    std::copy(Ws.begin(), Ws.end(), tmp.begin());
    if (R > 0) convert_detail::matmul_nt(d.proj_up.data(), Vs.data(), Ntot, K, R, tmp.data(), -1);
    d.resid = quantize_residual(tmp.data(), Ntot, K, sd);
    if (it == refine) {  // W_eff − W = (Q(R) − R)·diag(1/s) exactly, R taken w.r.t. the stored projections
      d.row_err.assign(size_t(Ntot), 0.0);
      parallel_for_range(Ntot, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double e = (double(d.resid.codes[size_t(n * K + k)]) * d.resid.scales[size_t((k / kGroup) * Ntot + n)] -
                              tmp[size_t(n * K + k)]) / smooth[size_t(k)];
            acc += e * e;
          }
          d.row_err[size_t(n)] = acc;
        }
      });
    }
    if (it < refine) {  // next target: Ws − Q(R)
      dequantize_residual(d.resid, Ntot, K, tmp.data());
      for (size_t i = 0; i < target.size(); ++i) target[i] = Ws[i] - tmp[i];
    }
  }
  return d;
}

// Output error of the W4A4 layer forward (spec §3.4 arithmetic, fp32) on sample rows X, per member:
// num = ‖y − y_ref‖², den = ‖y_ref‖². With `refit`, proj_up of each member is first refit to the
// output error the int4 main path leaves (ridge towards the current proj_up, rounded as stored).
struct SampleError {
  std::vector<double> num, den;
  double rel() const {
    double n = 0, d = 0;
    for (size_t i = 0; i < num.size(); ++i) n += num[i], d += den[i];
    return d > 0 ? n / d : n;
  }
};
// x·Wᵀ of each member on the sample rows (the reference outputs, computed once per layer).
std::vector<Tensor> reference_outputs(const std::vector<Member>& members, const Tensor& X) {
  std::vector<Tensor> y;
  for (const auto& mb : members) y.push_back(linear_f32(X, mb.W).clone());
  return y;
}
SampleError sample_output_error(const std::vector<Member>& members, int64_t K, Decomposition& d, const Tensor& X,
                                const std::vector<Tensor>& yrefs, bool act_unsigned, bool refit = false,
                                DType sd = DType::BF16) {
  const int64_t M = X.size(0);
  const float* x = X.data<float>();
  const float shift = act_unsigned ? kSvdquantUnsignedShift : 0.0f;
  const float qmax = act_unsigned ? 15.0f : 7.0f;
  // Fake-quantized main-path activations (x + shift)/s.
  Tensor Xq = Tensor::empty(DType::F32, {M, K});
  float* xq = Xq.mutable_data<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / kGroup; ++g) {
      float y[kGroup], amax = 0;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t k = g * kGroup + j;
        const float s = d.smooth[size_t(k)];
        y[j] = (x[m * K + k] + shift) * (std::fabs(s) > 1e-10f ? 1.0f / s : 0.0f);
        amax = std::max(amax, std::fabs(y[j]));
      }
      const float scale = std::max(amax / qmax, 1e-10f);
      for (int64_t j = 0; j < kGroup; ++j) {
        float q = round_even(std::clamp(y[j] * (1.0f / scale), -16.0f, 16.0f));
        q = act_unsigned ? std::clamp(q, 0.0f, 15.0f) : std::clamp(q, -7.0f, 7.0f);
        xq[m * K + g * kGroup + j] = q * scale;
      }
    }
  // Low-rank activations from the raw input.
  const int64_t R = d.R;
  Tensor Xt = Tensor::view(DType::F32, {M, K}, x, nullptr);
  Tensor lora;
  if (R > 0) {
    std::vector<float> pdT(size_t(R * K));
    for (int64_t k = 0; k < K; ++k) for (int64_t r = 0; r < R; ++r) pdT[size_t(r * K + k)] = d.proj_down[size_t(k * R + r)];
    lora = linear_f32(Xt, Tensor::view(DType::F32, {R, K}, pdT.data(), nullptr)).clone();
  }
  const int64_t Ntot = int64_t(d.resid.scales.size()) / (K / kGroup);
  SampleError out;
  for (const auto& mb : members) {
    const int64_t N = mb.N;
    std::vector<float> Rq(size_t(N * K));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = mb.row0 + n;
        Rq[size_t(n * K + k)] = float(d.resid.codes[size_t(row * K + k)]) * d.resid.scales[size_t((k / kGroup) * Ntot + row)];
      }
    Tensor y = linear_f32(Xq, Tensor::view(DType::F32, {N, K}, Rq.data(), nullptr));
    const Tensor& yref = yrefs[size_t(&mb - members.data())];
    const float* yp = y.data<float>();
    const float* rp = yref.data<float>();
    // Unsigned: the stored bias removes shift·Σ_k R_raw[n,k]; do the same here.
    std::vector<double> corr(size_t(N), 0.0);
    if (act_unsigned)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(Rq[size_t(n * K + k)]) / double(d.smooth[size_t(k)]);
        corr[size_t(n)] = double(shift) * s;
      }
    if (refit && R > 0 && M >= 4 * R) {
      // min_U ‖A·U − T‖² + λ‖U − U0‖², A = X·proj_down (M, R), T = y_ref − y_main (M, N).
      // (ridge λ = 0.2·tr(AᵀA)/R: the target T carries the activation noise of the main path, which
      // no function of X·proj_down explains; the fit stays near the SVD solution.)
      using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      const RowMatD A = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                            lora.data<float>(), M, R).cast<double>();
      const Eigen::MatrixXd G = A.transpose() * A;
      const double lambda = 0.2 * G.trace() / double(R) + 1e-12;
      Eigen::MatrixXd rhs(R, N);
      float* pu = d.proj_up.data() + mb.row0 * R;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t r = 0; r < R; ++r) rhs(r, n) = lambda * double(pu[n * R + r]);
      RowMatD T(M, N);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) T(m, n) = double(rp[m * N + n]) - (double(yp[m * N + n]) - corr[size_t(n)]);
      rhs.noalias() += A.transpose() * T;
      Eigen::MatrixXd Greg = G;
      Greg.diagonal().array() += lambda;
      const Eigen::MatrixXd U = Greg.ldlt().solve(rhs);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t r = 0; r < R; ++r) pu[n * R + r] = round_to(sd, float(U(r, n)));
    }
    std::vector<float> lu;
    if (R > 0) {
      Tensor up = Tensor::view(DType::F32, {N, R}, d.proj_up.data() + mb.row0 * R, nullptr);
      Tensor yl = linear_f32(lora, up);
      lu.assign(yl.data<float>(), yl.data<float>() + M * N);
    }
    double num = 0, den = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const double v = double(yp[m * N + n]) + (R > 0 ? double(lu[size_t(m * N + n)]) : 0.0) - corr[size_t(n)];
        const double e = v - double(rp[m * N + n]);
        num += e * e;
        den += double(rp[m * N + n]) * double(rp[m * N + n]);
      }
    out.num.push_back(num);
    out.den.push_back(den);
  }
  return out;
}

double snr_db(double num, double den) { return num > 0 ? 10.0 * std::log10(den / num) : INFINITY; }

// Proxy of the output error from per-channel statistics only (no sample rows): weight error weighted
// by E[x_k²] plus the activation-quantization noise (group step²/12) through the residual.
double stats_output_error(const std::vector<Member>& members, int64_t Ntot, int64_t K, const Decomposition& d,
                          const std::vector<float>& m2, const std::vector<float>& amax, bool act_unsigned) {
  const float shift = act_unsigned ? kSvdquantUnsignedShift : 0.0f;
  const float qmax = act_unsigned ? 15.0f : 7.0f;
  // Reconstruct the smoothed weight error per channel: Σ_n (W_eff − W)²  in the raw basis.
  std::vector<float> L(size_t(Ntot * K), 0.f);
  std::vector<float> Vs(size_t(K * std::max<int64_t>(d.R, 1)));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < d.R; ++r) Vs[size_t(k * d.R + r)] = d.proj_down[size_t(k * d.R + r)];
  if (d.R > 0) convert_detail::matmul_nt(d.proj_up.data(), Vs.data(), Ntot, K, d.R, L.data(), 0);  // raw-basis L
  std::vector<double> werr(size_t(K), 0.0), rnorm(size_t(K), 0.0);
  for (const auto& mb : members) {
    const float* w = mb.W.data<float>();
    for (int64_t n = 0; n < mb.N; ++n) {
      const int64_t row = mb.row0 + n;
      for (int64_t k = 0; k < K; ++k) {
        const float rq = float(d.resid.codes[size_t(row * K + k)]) * d.resid.scales[size_t((k / kGroup) * Ntot + row)];
        const double e = double(rq) / d.smooth[size_t(k)] + L[size_t(row * K + k)] - w[n * K + k];
        werr[size_t(k)] += e * e;
        rnorm[size_t(k)] += double(rq) * rq;
      }
    }
  }
  double err = 0;
  for (int64_t g = 0; g < K / kGroup; ++g) {
    double gmax = 0;
    for (int64_t j = 0; j < kGroup; ++j) {
      const int64_t k = g * kGroup + j;
      gmax = std::max(gmax, (double(amax[size_t(k)]) + shift) / d.smooth[size_t(k)]);
    }
    const double step = gmax / qmax;
    for (int64_t j = 0; j < kGroup; ++j) {
      const int64_t k = g * kGroup + j;
      err += double(m2[size_t(k)]) * werr[size_t(k)] + step * step / 12.0 * rnorm[size_t(k)];
    }
  }
  return err;
}

// s_k = max|x_k|^α / max_n|W_nk|^β, clamped to [1e-4, 1e4] and rounded to the storage dtype.
std::vector<float> smooth_for(const std::vector<float>& amax, const std::vector<float>& wmax, float alpha, float beta,
                              DType sd) {
  const size_t K = amax.size();
  std::vector<float> s(K);
  for (size_t k = 0; k < K; ++k) {
    const double a = std::max(double(amax[k]), 1e-5), w = std::max(double(wmax[k]), 1e-5);
    double v = std::pow(a, double(alpha)) / std::pow(w, double(beta));
    v = std::clamp(v, 1e-4, 1e4);
    s[k] = round_to(sd, float(v));
  }
  return s;
}

// Residual R = W·diag(s) − proj_up·(proj_down·s)ᵀ against the current (stored) projections, quantized.
// What the residual is rounded to, beyond plain round-to-nearest (from the calibration sample):
// * noise-aware target. The main path computes Q(x_s)·R_qᵀ: activation quantization adds a noise e
//   to x_s (per channel energy d_k = Σ_m e_mk² on the sample). The residual row minimising
//   Σ_m ((x_s + e)·r*ᵀ − x_s·rᵀ)² with e uncorrelated to x_s is r* = r·H·(H + D)⁻¹ (H = X_sᵀX_s,
//   D = diag(d)): a Wiener shrinkage of the residual along directions the int4 activations drown in
//   noise. H is estimated on S sample rows, so both H and H + D get a ridge λ = damp·B/S·mean(diag H)
//   (B = the size of the block solved: the estimate's noise grows with B/S); without GPTQ, S is
//   block diagonal (blocks of noise_block channels: cost K·B², no K×K matrix).
// * GPTQ: columns rounded in turn with error feedback through H + D + λ (the full K×K).
struct ResidualTarget {
  int64_t block = 0;                   // block size of the shrinkage (0: none)
  std::vector<float> S;                // per block B×B row-major (r_blk ← r_blk·S_b), concatenated
  std::optional<convert_detail::GptqFactor> gptq;
  std::vector<float> imp;              // (K) diag(H + D): weights of the per-group scale search
};

ResidualTarget residual_target(const Tensor& sample, const std::vector<float>& smooth, const SvdquantQuantOptions& o,
                               int64_t K) {
  const int64_t M = sample.size(0);
  const float shift = o.act_unsigned ? kSvdquantUnsignedShift : 0.0f;
  const float qmax = o.act_unsigned ? 15.0f : 7.0f;
  // Main-path inputs x_s = (x + shift)/s and the energy of their int4 quantization error.
  std::vector<float> xs(size_t(M * K));
  std::vector<double> D(size_t(K), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / kGroup; ++g) {
      float* v = xs.data() + m * K + g * kGroup;
      float amax = 0;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t k = g * kGroup + j;
        v[j] = (sample.data<float>()[m * K + k] + shift) / smooth[size_t(k)];
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float sc = std::max(amax / qmax, 1e-10f);
      for (int64_t j = 0; j < kGroup; ++j) {
        float q = std::nearbyint(v[j] * (1.0f / sc));
        q = o.act_unsigned ? std::clamp(q, 0.0f, 15.0f) : std::clamp(q, -7.0f, 7.0f);
        const double e = double(q * sc) - v[j];
        D[size_t(g * kGroup + j)] += e * e;
      }
    }
  const bool noise = o.noise_aware;
  ResidualTarget t;
  if (o.scale_search) {
    t.imp.assign(size_t(K), 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) t.imp[size_t(k)] += xs[size_t(m * K + k)] * xs[size_t(m * K + k)];
    for (int64_t k = 0; k < K; ++k) t.imp[size_t(k)] += float(D[size_t(k)]);
  }
  // One block [k0, k0 + B): shrinkage matrix (into S) and, for GPTQ, the factor of H + D + λ.
  auto solve_block = [&](int64_t k0, int64_t B, float* S, bool want_gptq) {
    Eigen::MatrixXd H;
    if (k0 == 0 && B == K) {
      H = convert_detail::gram(xs.data(), M, K);
    } else {
      std::vector<float> xb(size_t(M * B));
      for (int64_t m = 0; m < M; ++m) std::copy(xs.data() + m * K + k0, xs.data() + m * K + k0 + B, xb.data() + m * B);
      H = convert_detail::gram(xb.data(), M, B);
    }
    double md = 0;
    for (int64_t k = 0; k < B; ++k) {
      if (!(H(k, k) > 0)) H(k, k) = 1e-12;
      md += H(k, k);
    }
    md /= double(B);
    const double lambda = std::max(o.gptq_damp * double(B) / double(M), 0.01) * md;
    Eigen::MatrixXd Hr = H;
    Hr.diagonal().array() += lambda;
    Eigen::MatrixXd Hn = Hr;
    if (noise)
      for (int64_t k = 0; k < B; ++k) Hn(k, k) += D[size_t(k0 + k)];
    if (S && noise) {
      Eigen::LLT<Eigen::MatrixXd> llt(Hn);
      if (llt.info() != Eigen::Success) throw Error("svdquant: calibration Gram matrix not positive definite after the ridge");
      const Eigen::MatrixXd St = llt.solve(Hr);  // (H + D + λ)⁻¹(H + λ) = Sᵀ
      for (int64_t i = 0; i < B; ++i)
        for (int64_t j = 0; j < B; ++j) S[i * B + j] = float(St(j, i));
    }
    if (want_gptq) t.gptq = convert_detail::gptq_factor(Hn, 0.0);
  };
  if (o.gptq) solve_block(0, K, nullptr, true);
  if (noise) {
    int64_t B = std::max<int64_t>(kGroup, o.noise_block / kGroup * kGroup);
    while (K % B != 0) B -= kGroup;
    t.block = B;
    t.S.resize(size_t(K * B));
    parallel_for_range(K / B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) solve_block(b * B, B, t.S.data() + b * B * B, false);
    });
  }
  return t;
}

void requantize_residual(const std::vector<Member>& members, int64_t Ntot, int64_t K, Decomposition& d, DType sd,
                         const ResidualTarget* target = nullptr) {
  std::vector<float> R(size_t(Ntot * K));
  for (const auto& mb : members) {
    const float* w = mb.W.data<float>();
    for (int64_t n = 0; n < mb.N; ++n)
      for (int64_t k = 0; k < K; ++k) R[size_t((mb.row0 + n) * K + k)] = w[n * K + k] * d.smooth[size_t(k)];
  }
  if (d.R > 0) {
    std::vector<float> Vs(size_t(K * d.R));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < d.R; ++r) Vs[size_t(k * d.R + r)] = d.proj_down[size_t(k * d.R + r)] * d.smooth[size_t(k)];
    convert_detail::matmul_nt(d.proj_up.data(), Vs.data(), Ntot, K, d.R, R.data(), -1);
  }
  if (target && target->block > 0) {
    using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const int64_t B = target->block;
    parallel_for_range(Ntot, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t b = 0; b < K / B; ++b) {
        Eigen::Map<RowMatF, 0, Eigen::OuterStride<>> Rb(R.data() + n0 * K + b * B, n1 - n0, B, Eigen::OuterStride<>(K));
        Eigen::Map<const RowMatF> Sb(target->S.data() + b * B * B, B, B);
        const RowMatF t = Rb * Sb;
        Rb = t;
      }
    });
  }
  if (target && target->gptq) {
    d.resid = gptq_residual(R.data(), Ntot, K, *target->gptq, sd, target->imp.empty() ? nullptr : target->imp.data());
  } else {
    d.resid = quantize_residual(R.data(), Ntot, K, sd, target && !target->imp.empty() ? target->imp.data() : nullptr);
  }
}

// ‖W_eff − W‖² per stacked row, W_eff = R_q·diag(1/s) + proj_up·proj_downᵀ (after a refit of proj_up).
void recompute_row_err(const std::vector<Member>& members, int64_t Ntot, int64_t K, Decomposition& d) {
  std::vector<float> L(size_t(Ntot * K), 0.f);
  if (d.R > 0) convert_detail::matmul_nt(d.proj_up.data(), d.proj_down.data(), Ntot, K, d.R, L.data(), 0);
  for (const auto& mb : members) {
    const float* w = mb.W.data<float>();
    for (int64_t n = 0; n < mb.N; ++n) {
      const int64_t row = mb.row0 + n;
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double rq = double(d.resid.codes[size_t(row * K + k)]) * d.resid.scales[size_t((k / kGroup) * Ntot + row)];
        const double e = rq / d.smooth[size_t(k)] + L[size_t(row * K + k)] - w[n * K + k];
        acc += e * e;
      }
      d.row_err[size_t(row)] = acc;
    }
  }
}

SvdquantW4A4Params pack_member(const Member& mb, int64_t K, const Decomposition& d, const SvdquantQuantOptions& o,
                               int64_t Ntot) {
  const DType sd = o.dtype;
  const int64_t N = mb.N, R = d.R;
  SvdquantW4A4Params p;
  p.N = N; p.K = K; p.R = R; p.act_unsigned = o.act_unsigned;
  Tensor qw = Tensor::empty(DType::I8, {N, K / 2});
  uint8_t* q = reinterpret_cast<uint8_t*>(qw.mutable_data<int8_t>());
  std::vector<float> sc(size_t(K / kGroup * N));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = mb.row0 + n;
    const int8_t* c = d.resid.codes.data() + row * K;
    for (int64_t k = 0; k < K; k += 2) q[n * (K / 2) + k / 2] = pack_nibbles(c[k], c[k + 1]);
    for (int64_t g = 0; g < K / kGroup; ++g) sc[size_t(g * N + n)] = d.resid.scales[size_t(g * Ntot + row)];
  }
  p.qweight = qw;
  p.wscales = store16(sd, sc.data(), {K / kGroup, N});
  p.smooth = store16(sd, d.smooth.data(), {K});
  p.proj_down = store16(sd, d.proj_down.data(), {K, R});
  p.proj_up = store16(sd, d.proj_up.data() + mb.row0 * R, {N, R});
  if (!mb.bias.empty() || o.act_unsigned) {
    std::vector<float> b(size_t(N), 0.0f);
    for (int64_t n = 0; n < N; ++n) {
      double v = mb.bias.empty() ? 0.0 : double(mb.bias[size_t(n)]);
      if (o.act_unsigned) {  // b' = b − shift·Σ_k R_raw[n,k] (spec §3.4), with the stored values
        const int64_t row = mb.row0 + n;
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += double(float(d.resid.codes[size_t(row * K + k)]) * d.resid.scales[size_t((k / kGroup) * Ntot + row)]) /
               double(d.smooth[size_t(k)]);
        v -= double(kSvdquantUnsignedShift) * s;
      }
      b[size_t(n)] = float(v);
    }
    p.bias = store16(sd, b.data(), {N});
  }
  if (o.tile_layout) {
    p.qweight = tile_pack_weight(p.qweight);
    p.wscales = tile_pack_wscales(p.wscales);
    p.proj_up = tile_pack_proj_up(p.proj_up);
    p.tile_packed = p.proj_up_tile = true;
  }
  return p;
}

}  // namespace

std::vector<SvdquantW4A4Params> quantize_weight_svdquant_w4a4_group(const std::vector<Tensor>& Ws,
                                                                    const std::vector<Tensor>& biases,
                                                                    const SvdquantQuantOptions& o) {
  check_16bit(o.dtype, "svdquant_w4a4 quantize");
  if (Ws.empty()) throw Error("svdquant_w4a4 quantize: empty group");
  if (!biases.empty() && biases.size() != Ws.size())
    throw Error(fmt::format("svdquant_w4a4 quantize: {} weights but {} biases", Ws.size(), biases.size()));
  if (o.rank < 0) throw Error(fmt::format("svdquant_w4a4 quantize: rank must be ≥ 0, got {}", o.rank));
  std::vector<Member> members;
  int64_t K = -1, Ntot = 0;
  for (size_t i = 0; i < Ws.size(); ++i) {
    Member m;
    m.W = as_f32_2d(Ws[i], "svdquant_w4a4 quantize");
    m.N = m.W.size(0);
    if (K < 0) K = m.W.size(1);
    if (m.W.size(1) != K)
      throw Error(fmt::format("svdquant_w4a4 quantize: group members must share K ({} vs {})", m.W.size(1), K));
    if (o.tile_layout && m.N % 128 != 0)
      throw Error(fmt::format("svdquant_w4a4 quantize: tile layout needs N % 128 == 0, got N = {}", m.N));
    m.row0 = Ntot;
    Ntot += m.N;
    if (!biases.empty()) m.bias = bias_f32(biases[i], m.N, "svdquant_w4a4 quantize");
    members.push_back(std::move(m));
  }
  if (K % kGroup != 0) throw Error(fmt::format("svdquant_w4a4 quantize: K = {} must be a multiple of 64", K));

  std::vector<float> ones(size_t(K), 1.0f);
  Decomposition best;
  const ActStats* cs = o.calib;
  const bool calibrated = cs && (cs->max_abs.defined() || cs->sample.defined());
  std::vector<QuantInfo> infos(members.size());
  Tensor sample;
  std::vector<Tensor> yrefs;
  if (!calibrated) {
    best = decompose(members, Ntot, K, ones, o, o.refine_iterations);
  } else {
    // Per-channel statistics: max|x| (from the sample when only it is given) and E[x²].
    std::vector<float> amax = stat_vec(cs->max_abs, K, "max_abs"), m2 = stat_vec(cs->mean_sq, K, "mean_sq");
    if (cs->sample.defined()) {
      if (cs->sample.dim() != 2 || cs->sample.size(1) != K)
        throw Error(fmt::format("calibration sample: expected (M, {}), got {}", K, shape_str(cs->sample.shape())));
      sample = cs->sample.to_f32();
      yrefs = reference_outputs(members, sample);
    }
    for (auto& inf : infos) {
      inf.calibrated = true;
      inf.sample_rows = sample.defined() ? sample.size(0) : 0;
    }
    if (amax.empty()) {
      amax.assign(size_t(K), 0.f);
      for (int64_t m = 0; m < sample.size(0); ++m)
        for (int64_t k = 0; k < K; ++k) amax[size_t(k)] = std::max(amax[size_t(k)], std::fabs(sample.data<float>()[m * K + k]));
    }
    if (m2.empty()) {
      std::vector<float> ma = stat_vec(cs->mean_abs, K, "mean_abs");
      m2.resize(size_t(K));
      for (int64_t k = 0; k < K; ++k)
        m2[size_t(k)] = ma.empty() ? (amax[size_t(k)] / 3.f) * (amax[size_t(k)] / 3.f) : 1.5708f * ma[size_t(k)] * ma[size_t(k)];
    }
    std::vector<float> wmax(size_t(K), 0.f);
    for (const auto& mb : members)
      for (int64_t n = 0; n < mb.N; ++n)
        for (int64_t k = 0; k < K; ++k) wmax[size_t(k)] = std::max(wmax[size_t(k)], std::fabs(mb.W.data<float>()[n * K + k]));
    // Smoothing search on unrefined decompositions, scored by the output error of the full forward.
    // With the refit on, candidates are scored after it (what will be written).
    const bool refit = o.refit_lowrank && sample.defined() && sample.size(0) >= 4 * std::min<int64_t>(o.rank, K);
    auto score = [&](Decomposition& d) {
      return sample.defined() ? sample_output_error(members, K, d, sample, yrefs, o.act_unsigned, refit, o.dtype).rel()
                              : stats_output_error(members, Ntot, K, d, m2, amax, o.act_unsigned);
    };
    std::map<std::pair<int, int>, double> tried;  // (α, β) in 1/100 → error
    double best_err = std::numeric_limits<double>::infinity();
    int best_a = -1, best_b = -1;                  // −1: s = 1
    Decomposition winner;  // the best candidate as decomposed (before the refit in `score`)
    {
      Decomposition d = decompose(members, Ntot, K, ones, o, 0);
      winner = d;
      best_err = score(d);
      if (sample.defined()) {  // the low-rank-only figure (no smoothing) for the report
        SampleError e = sample_output_error(members, K, d, sample, yrefs, o.act_unsigned);
        for (size_t i = 0; i < members.size(); ++i) infos[i].snr_lowrank_db = snr_db(e.num[i], e.den[i]);
      }
    }
    auto try_ab = [&](int a, int b) {
      if (a < 5 || a > 95 || b < 0 || b > 95 || tried.count({a, b})) return;
      Decomposition d = decompose(members, Ntot, K, smooth_for(amax, wmax, a / 100.f, b / 100.f, o.dtype), o, 0);
      Decomposition unscored = d;
      const double e = score(d);
      tried[{a, b}] = e;
      if (e < best_err) best_err = e, best_a = a, best_b = b, winner = std::move(unscored);
    };
    for (float af : o.alpha_grid) {
      const int a = int(std::lround(af * 100));
      try_ab(a, 100 - a);
    }
    if (o.fine_search && best_a >= 0) {
      const int a0 = best_a;
      try_ab(a0 - 5, 100 - (a0 - 5));
      try_ab(a0 + 5, 100 - (a0 + 5));
      const int a1 = best_a, b1 = best_b;
      for (int db : {-10, -5, 5, 10}) try_ab(a1, b1 + db);
    }
    std::vector<float> best_s = best_a < 0 ? ones : smooth_for(amax, wmax, best_a / 100.f, best_b / 100.f, o.dtype);
    int lo = 100, hi = 0;
    for (const auto& [ab, e] : tried) lo = std::min(lo, ab.first), hi = std::max(hi, ab.first);
    for (auto& inf : infos) {
      inf.alpha = best_a < 0 ? -1 : best_a / 100.0;
      inf.beta = best_b < 0 ? -1 : best_b / 100.0;
      inf.alpha_on_edge = best_a >= 0 && (best_a == lo || best_a == hi) && (best_a <= 5 || best_a >= 95 || !o.fine_search);
    }
    best = decompose(members, Ntot, K, best_s, o, o.refine_iterations, &winner);
  }
  ResidualTarget target;
  const bool noise_aware = o.noise_aware && o.noise_block > 0;
  if (calibrated && sample.defined() && (o.gptq || noise_aware || o.scale_search)) {
    target = residual_target(sample, best.smooth, o, K);
    for (auto& inf : infos) inf.gptq = bool(target.gptq), inf.noise_aware = target.block > 0;
    requantize_residual(members, Ntot, K, best, o.dtype, &target);
    recompute_row_err(members, Ntot, K, best);
  }
  if (calibrated && sample.defined()) {
    const bool refit = o.refit_lowrank && best.R > 0 && sample.size(0) >= 4 * best.R;
    SampleError e = sample_output_error(members, K, best, sample, yrefs, o.act_unsigned, refit, o.dtype);
    // (The residual is not requantized against the refit proj_up: a further round raised only the
    // in-sample figure on the quality set, never the held-out one.)
    if (refit) recompute_row_err(members, Ntot, K, best);
    for (size_t i = 0; i < members.size(); ++i) infos[i].snr_after_db = snr_db(e.num[i], e.den[i]);
    // Plain int4 (no smoothing, no low-rank branch) for the "before" figure.
    SvdquantQuantOptions plain = o;
    plain.rank = 0;
    Decomposition d0 = decompose(members, Ntot, K, ones, plain, 0);
    SampleError e0 = sample_output_error(members, K, d0, sample, yrefs, o.act_unsigned);
    for (size_t i = 0; i < members.size(); ++i) infos[i].snr_before_db = snr_db(e0.num[i], e0.den[i]);
  }
  if (o.info) *o.info = infos;
  std::vector<SvdquantW4A4Params> out;
  for (const auto& mb : members) out.push_back(pack_member(mb, K, best, o, Ntot));
  if (o.weight_rel_errors) {
    o.weight_rel_errors->clear();
    for (const auto& mb : members) {
      double e = 0, w2 = 0;
      const float* w = mb.W.data<float>();
      for (int64_t n = 0; n < mb.N; ++n) e += best.row_err[size_t(mb.row0 + n)];
      for (int64_t i = 0; i < mb.N * K; ++i) w2 += double(w[i]) * w[i];
      o.weight_rel_errors->push_back(w2 > 0 ? std::sqrt(e / w2) : std::sqrt(e));
    }
  }
  return out;
}

SvdquantW4A4Params quantize_weight_svdquant_w4a4(const Tensor& W, const Tensor& bias, const SvdquantQuantOptions& o) {
  std::vector<Tensor> b;
  if (bias.defined()) b.push_back(bias);
  return quantize_weight_svdquant_w4a4_group({W}, b, o).front();
}

Tensor effective_weight(const SvdquantW4A4Params& pin) {
  SvdquantW4A4Params p = pin;
  if (p.qweight.dim() == 4) p.qweight = tile_unpack_weight(p.qweight);
  if (p.wscales.dim() == 3) p.wscales = tile_unpack_wscales(p.wscales);
  if (p.proj_up.dim() == 3) p.proj_up = tile_unpack_proj_up(p.proj_up);
  const int64_t N = p.N, K = p.K, R = p.R;
  Tensor s = p.wscales.to_f32(), sm = p.smooth.to_f32(), pd = p.proj_down.to_f32(), pu = p.proj_up.to_f32();
  Tensor out = Tensor::empty(DType::F32, {N, K});
  float* o = out.mutable_data<float>();
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.data<int8_t>());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; k += 2) {
      const uint8_t b = q[n * (K / 2) + k / 2];
      const float sc = s.data<float>()[(k / kGroup) * N + n];
      o[n * K + k] = float(unpack_lo_signed(b)) * sc / sm.data<float>()[k];
      o[n * K + k + 1] = float(unpack_hi_signed(b)) * sc / sm.data<float>()[k + 1];
    }
  if (R > 0) convert_detail::matmul_nt(pu.data<float>(), pd.data<float>(), N, K, R, o, +1);
  return out;
}

std::vector<std::pair<std::string, Tensor>> layer_tensors(const SvdquantW4A4Params& p) {
  std::vector<std::pair<std::string, Tensor>> t = {{"weight", p.qweight},        {"weight_scale", p.wscales},
                                                   {"smooth_factor", p.smooth},  {"proj_down", p.proj_down},
                                                   {"proj_up", p.proj_up}};
  if (p.bias.defined()) t.emplace_back("bias", p.bias);
  return t;
}

}  // namespace nibble
