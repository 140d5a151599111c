// Qwen-Image transformer block: fp32 element-wise math, joint attention, and the 14 linears.
#include "nn/qwen_image_block.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "kernels/linear_f32.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"
#include "nn/attention.h"
#include "nn/fast_exp.h"

namespace nibble::nn {

namespace {

// A scratch buffer of n floats, left uninitialised (every buffer of the block is written in full
// before it is read; zeroing ~250 MB per block at 1280 tokens was measurable).
struct Buf {
  std::unique_ptr<float[]> p;
  size_t n = 0;
  explicit Buf(size_t count) : p(new float[count]), n(count) {}
  float* data() { return p.get(); }
  const float* data() const { return p.get(); }
  float& operator[](size_t i) { return p[i]; }
  const float& operator[](size_t i) const { return p[i]; }
  size_t size() const { return n; }
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}


// GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), tanh(u) = 1 − 2/(e^{2u} + 1).
inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float th = 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);
  return 0.5f * x * (1.0f + th);
}

// LayerNorm (no affine) then modulation: out = norm(x)·(1 + scale) + shift, rows of D.
void layernorm_modulate(const float* x, int64_t rows, int64_t D, float eps, const float* shift, const float* scale,
                        float* out) {
  parallel_for_range(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      double mean = 0;
      for (int64_t i = 0; i < D; ++i) mean += xr[i];
      mean /= double(D);
      double var = 0;
      for (int64_t i = 0; i < D; ++i) {
        const double d = xr[i] - mean;
        var += d * d;
      }
      var /= double(D);
      const float inv = float(1.0 / std::sqrt(var + double(eps))), mu = float(mean);
      float* o = out + r * D;
      for (int64_t i = 0; i < D; ++i) o[i] = (xr[i] - mu) * inv * (1.0f + scale[i]) + shift[i];
    }
  });
}

// RMSNorm per head (learnable weight) over rows [r0, r1) of a (rows, D) buffer, in place.
void rmsnorm_heads(float* x, int64_t r0, int64_t r1, int64_t D, int64_t hd, float eps, const float* w) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t h = 0; h < D / hd; ++h) {
      float* v = x + r * D + h * hd;
      double ss = 0;
      for (int64_t i = 0; i < hd; ++i) ss += double(v[i]) * v[i];
      const float inv = float(1.0 / std::sqrt(ss / double(hd) + double(eps)));
      for (int64_t i = 0; i < hd; ++i) v[i] = v[i] * inv * w[i];
    }
}

// RoPE on one joint row: pairs (2i, 2i+1) of every head rotated by (cos_i, sin_i).
void rope_row(float* v, int64_t D, int64_t hd, const float* cs, const float* sn) {
  for (int64_t h = 0; h < D / hd; ++h) {
    float* p = v + h * hd;
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float a = p[2 * i], b = p[2 * i + 1];
      p[2 * i] = cs[i] * a - sn[i] * b;
      p[2 * i + 1] = sn[i] * a + cs[i] * b;
    }
  }
}

// x (rows, D) += gate[b] ⊙ y, rows grouped by batch (rows_per_batch each); rows at or after
// zero_from within their batch take the gate of mod row B + b (B = rows / rows_per_batch).
void gated_residual(float* x, const float* y, int64_t rows, int64_t rows_per_batch, int64_t D, const float* mod,
                    int64_t mod_stride, int64_t gate_offset, int64_t zero_from) {
  const int64_t B = rows / rows_per_batch;
  parallel_for_range(rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / rows_per_batch, mrow = (r % rows_per_batch) < zero_from ? b : B + b;
      const float* g = mod + mrow * mod_stride + gate_offset;
      for (int64_t i = 0; i < D; ++i) x[r * D + i] += g[i] * y[r * D + i];
    }
  });
}

struct Shapes {
  int64_t B, S_img, S_txt;
};

Shapes check_inputs(const QwenBlockInputs& in, const QwenBlockConfig& c) {
  const int64_t D = c.hidden;
  auto dims = [&](const Tensor& t, const char* what, int64_t* B, int64_t* S) {
    if (!t.defined()) throw Error(fmt::format("qwen_image_block: {} is undefined", what));
    check_dtype(t, {DType::F32, DType::BF16, DType::F16}, fmt::format("qwen_image_block: {}", what));
    if (t.dim() == 2 && t.size(1) == D) {
      *B = 1, *S = t.size(0);
    } else if (t.dim() == 3 && t.size(2) == D) {
      *B = t.size(0), *S = t.size(1);
    } else {
      throw Error(fmt::format("qwen_image_block: {}: expected (B, S, {}) or (S, {}), got {}", what, D, D,
                              shape_str(t.shape())));
    }
  };
  Shapes s{};
  int64_t Bt = 0;
  dims(in.img, "img", &s.B, &s.S_img);
  dims(in.txt, "txt", &Bt, &s.S_txt);
  if (Bt != s.B) throw Error(fmt::format("qwen_image_block: img batch {} != txt batch {}", s.B, Bt));
  if (!in.temb.defined()) throw Error("qwen_image_block: temb is undefined");
  if (in.temb.numel() != s.B * D || in.temb.size(-1) != D)
    throw Error(fmt::format("qwen_image_block: temb: expected ({}, {}), got {}", s.B, D, shape_str(in.temb.shape())));
  if (in.rope_cos.defined() != in.rope_sin.defined())
    throw Error("qwen_image_block: give both rope_cos and rope_sin, or neither");
  if (in.rope_cos.defined()) {
    const Shape want{s.S_txt + s.S_img, c.head_dim / 2};
    check_shape(in.rope_cos, want, "qwen_image_block: rope_cos");
    check_shape(in.rope_sin, want, "qwen_image_block: rope_sin");
  }
  if (in.txt_key_bias.defined()) {
    check_dtype(in.txt_key_bias, {DType::F32}, "qwen_image_block: txt_key_bias");
    check_shape(in.txt_key_bias, {s.B, s.S_txt}, "qwen_image_block: txt_key_bias");
  }
  if (in.img_zero_from >= 0) {
    if (in.img_zero_from > s.S_img)
      throw Error(fmt::format("qwen_image_block: img_zero_from {} > image rows {}", in.img_zero_from, s.S_img));
    if (!in.temb_zero.defined() || in.temb_zero.numel() != s.B * D || in.temb_zero.size(-1) != D)
      throw Error(fmt::format("qwen_image_block: temb_zero: expected ({}, {}) with img_zero_from", s.B, D));
  }
  return s;
}

}  // namespace

const std::vector<std::string>& QwenImageBlock::linear_names() {
  static const std::vector<std::string> n = {
      "img_mod.1",          "txt_mod.1",     "attn.to_q",          "attn.to_k",     "attn.to_v",
      "attn.add_q_proj",    "attn.add_k_proj", "attn.add_v_proj",  "attn.to_out.0", "attn.to_add_out",
      "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"};
  return n;
}
const std::vector<std::string>& QwenImageBlock::norm_names() {
  static const std::vector<std::string> n = {"attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight",
                                             "attn.norm_added_k.weight"};
  return n;
}

QwenImageBlock QwenImageBlock::from_linears(std::map<std::string, Linear> linears, std::map<std::string, Tensor> norms,
                                            int64_t head_dim) {
  QwenImageBlock blk;
  for (const auto& n : linear_names())
    if (!linears.count(n) || !linears.at(n).defined())
      throw Error(fmt::format("qwen_image_block: missing linear '{}'", n));
  QwenBlockConfig& c = blk.cfg_;
  const Linear& q = linears.at("attn.to_q");
  c.hidden = q.in_features();
  c.head_dim = head_dim;
  if (head_dim <= 0 || head_dim % 2 != 0 || c.hidden % head_dim != 0)
    throw Error(fmt::format("qwen_image_block: hidden {} is not a multiple of head_dim {} (even)", c.hidden, head_dim));
  c.heads = c.hidden / head_dim;
  c.mlp_hidden = linears.at("img_mlp.net.0.proj").out_features();
  const int64_t D = c.hidden, F = c.mlp_hidden;
  auto expect = [&](const std::string& n, int64_t N, int64_t K) {
    const Linear& l = linears.at(n);
    if (l.out_features() != N || l.in_features() != K)
      throw Error(fmt::format("qwen_image_block: layer '{}': expected (out, in) = ({}, {}), got ({}, {})", l.name(), N,
                              K, l.out_features(), l.in_features()));
  };
  expect("img_mod.1", 6 * D, D);
  expect("txt_mod.1", 6 * D, D);
  for (const char* n : {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                        "attn.to_out.0", "attn.to_add_out"})
    expect(n, D, D);
  expect("img_mlp.net.0.proj", F, D);
  expect("txt_mlp.net.0.proj", F, D);
  expect("img_mlp.net.2", D, F);
  expect("txt_mlp.net.2", D, F);
  for (const auto& n : norm_names()) {
    Tensor w;
    if (auto it = norms.find(n); it != norms.end() && it->second.defined()) {
      check_shape(it->second, {head_dim}, fmt::format("qwen_image_block: {}", n));
      check_dtype(it->second, {DType::F32, DType::BF16, DType::F16}, fmt::format("qwen_image_block: {}", n));
      w = it->second.to(DType::F32).clone();
    } else {
      w = Tensor::empty(DType::F32, {head_dim});
      for (int64_t i = 0; i < head_dim; ++i) w.mutable_data<float>()[i] = 1.0f;
    }
    blk.norms_[n] = w;
  }
  blk.lin_ = std::move(linears);
  return blk;
}

QwenImageBlock QwenImageBlock::from_model(const Model& model, const std::string& block_prefix, int64_t head_dim) {
  std::map<std::string, Linear> lin;
  for (const auto& n : linear_names()) lin[n] = model.linear(block_prefix + "." + n);
  std::map<std::string, Tensor> norms;
  for (const auto& n : norm_names())
    if (model.has_tensor(block_prefix + "." + n)) norms[n] = model.tensor(block_prefix + "." + n);
  return from_linears(std::move(lin), std::move(norms), head_dim);
}

QwenImageBlock QwenImageBlock::dequantized() const {
  QwenImageBlock b = *this;
  for (auto& [n, l] : b.lin_) l = l.dequantized();
  return b;
}

QwenImageBlock QwenImageBlock::streamed() const {
  QwenImageBlock b = *this;
  for (auto& [n, l] : b.lin_) l = l.streamed();
  return b;
}

const Linear& QwenImageBlock::linear(const std::string& rel_name) const {
  auto it = lin_.find(rel_name);
  if (it == lin_.end()) throw Error(fmt::format("qwen_image_block: no linear '{}'", rel_name));
  return it->second;
}
const Tensor& QwenImageBlock::norm_weight(const std::string& rel_name) const {
  auto it = norms_.find(rel_name);
  if (it == norms_.end()) throw Error(fmt::format("qwen_image_block: no norm '{}'", rel_name));
  return it->second;
}
uint64_t QwenImageBlock::stored_bytes() const {
  uint64_t b = 0;
  for (auto& [n, l] : lin_) b += l.stored_bytes();
  return b;
}
void QwenImageBlock::prepare_dense() const {
  for (auto& [n, l] : lin_) l.prepare_dense();
}

QwenBlockOutputs QwenImageBlock::forward(const QwenBlockInputs& in, QwenBlockTimings* tm) const {
  const QwenBlockConfig& c = cfg_;
  const Shapes sh = check_inputs(in, c);
  const int64_t D = c.hidden, F = c.mlp_hidden, hd = c.head_dim, B = sh.B, Si = sh.S_img, St = sh.S_txt;
  const int64_t S = Si + St, Ri = B * Si, Rt = B * St;
  QwenBlockTimings local;
  QwenBlockTimings& t = tm ? *tm : local;
  const double t_start = now_s();
  double t0 = t_start;
  auto lap = [&](double& slot) {
    const double t1 = now_s();
    slot += t1 - t0;
    t0 = t1;
  };

  auto fwd = [&](const std::string& name, const float* x, int64_t M, float* y) {
    const double a = now_s();
    lin_.at(name).forward_rows(x, M, y);
    t.linear += now_s() - a;
  };
  // ---- modulation: SiLU(temb) → (B, 6D) per stream
  const bool zero_mode = in.img_zero_from >= 0;
  const int64_t Bm = zero_mode ? 2 * B : B;  // img_mod rows: [temb ; temb_zero]
  Buf st(size_t(Bm * D)), img_mod(size_t(Bm * 6 * D)), txt_mod(size_t(B * 6 * D));
  {
    const Tensor temb = in.temb.to_f32();
    const Tensor tz = zero_mode ? in.temb_zero.to_f32() : Tensor();
    for (int64_t i = 0; i < Bm * D; ++i) {
      const float v = i < B * D ? temb.data<float>()[i] : tz.data<float>()[i - B * D];
      st[size_t(i)] = v / (1.0f + std::exp(-v));
    }
  }
  fwd("img_mod.1", st.data(), Bm, img_mod.data());
  fwd("txt_mod.1", st.data(), B, txt_mod.data());
  lap(t.modulation);
  // Image rows from img_zero_from on use the second half of img_mod (batch b → row B + b).
  const int64_t zf = zero_mode ? in.img_zero_from : Si;

  Tensor img_t = in.img.to(DType::F32).clone(), txt_t = in.txt.to(DType::F32).clone();
  float* img = img_t.mutable_data<float>();
  float* txt = txt_t.mutable_data<float>();
  Buf xi(size_t(Ri * D)), xt(size_t(Rt * D));
  // Per-batch modulation: rows of batch b use mod row b (chunk offsets: shift 0, scale D, gate 2D; +3D for the MLP).
  // zero_from < rows_per_b: rows [zero_from, rows_per_b) of batch b use mod row B + b.
  auto modulate = [&](const float* x, int64_t rows_per_b, const Buf& mod, int64_t off, float* out, int64_t zero_from) {
    for (int64_t b = 0; b < B; ++b) {
      const float* m = mod.data() + b * 6 * D + off;
      layernorm_modulate(x + b * rows_per_b * D, zero_from, D, c.eps, m, m + D, out + b * rows_per_b * D);
      if (zero_from < rows_per_b) {
        const float* mz = mod.data() + (B + b) * 6 * D + off;
        layernorm_modulate(x + (b * rows_per_b + zero_from) * D, rows_per_b - zero_from, D, c.eps, mz, mz + D,
                           out + (b * rows_per_b + zero_from) * D);
      }
    }
  };
  modulate(img, Si, img_mod, 0, xi.data(), zf);
  modulate(txt, St, txt_mod, 0, xt.data(), St);
  lap(t.norms);

  // ---- projections into joint buffers (B, S, D), txt rows first
  Buf q(size_t(B * S * D)), k(size_t(B * S * D)), v(size_t(B * S * D)), tmp(size_t((Ri > Rt ? Ri : Rt) * D));
  auto project = [&](const char* name, const float* x, int64_t rows_per_b, int64_t joint_off, Buf& dst) {
    fwd(name, x, B * rows_per_b, tmp.data());
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(dst.data() + (b * S + joint_off) * D, tmp.data() + b * rows_per_b * D,
                  size_t(rows_per_b * D) * sizeof(float));
  };
  project("attn.add_q_proj", xt.data(), St, 0, q);
  project("attn.add_k_proj", xt.data(), St, 0, k);
  project("attn.add_v_proj", xt.data(), St, 0, v);
  project("attn.to_q", xi.data(), Si, St, q);
  project("attn.to_k", xi.data(), Si, St, k);
  project("attn.to_v", xi.data(), Si, St, v);
  lap(t.qkv);

  // ---- RMSNorm on q/k per head (txt rows: norm_added_*), RoPE, attention
  const float* nq = norms_.at("attn.norm_q.weight").data<float>();
  const float* nk = norms_.at("attn.norm_k.weight").data<float>();
  const float* naq = norms_.at("attn.norm_added_q.weight").data<float>();
  const float* nak = norms_.at("attn.norm_added_k.weight").data<float>();
  const Tensor rc = in.rope_cos.defined() ? in.rope_cos.to_f32() : Tensor();
  const Tensor rs = in.rope_sin.defined() ? in.rope_sin.to_f32() : Tensor();
  parallel_for_range(B * S, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool is_txt = (r % S) < St;
      rmsnorm_heads(q.data(), r, r + 1, D, hd, c.eps, is_txt ? naq : nq);
      rmsnorm_heads(k.data(), r, r + 1, D, hd, c.eps, is_txt ? nak : nk);
      if (rc.defined()) {
        const int64_t pos = r % S;
        rope_row(q.data() + r * D, D, hd, rc.data<float>() + pos * (hd / 2), rs.data<float>() + pos * (hd / 2));
        rope_row(k.data() + r * D, D, hd, rc.data<float>() + pos * (hd / 2), rs.data<float>() + pos * (hd / 2));
      }
    }
  });
  Buf o(size_t(B * S * D));
  const Tensor kb = in.txt_key_bias.defined() ? in.txt_key_bias.to_f32() : Tensor();
  {
    const double a = now_s();
    joint_attention(q.data(), k.data(), v.data(), B, S, D, hd, kb.defined() ? kb.data<float>() : nullptr, St,
                    o.data(), attention_);
    t.attention_core += now_s() - a;
  }
  lap(t.attention);

  // ---- output projections + gated residuals (gate1 at offset 2D)
  {
    Buf oi(size_t(Ri * D)), ot(size_t(Rt * D)), yi(size_t(Ri * D)), yt(size_t(Rt * D));
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(ot.data() + b * St * D, o.data() + b * S * D, size_t(St * D) * sizeof(float));
      std::memcpy(oi.data() + b * Si * D, o.data() + (b * S + St) * D, size_t(Si * D) * sizeof(float));
    }
    fwd("attn.to_out.0", oi.data(), Ri, yi.data());
    fwd("attn.to_add_out", ot.data(), Rt, yt.data());
    gated_residual(img, yi.data(), Ri, Si, D, img_mod.data(), 6 * D, 2 * D, zf);
    gated_residual(txt, yt.data(), Rt, St, D, txt_mod.data(), 6 * D, 2 * D, St);
  }
  lap(t.out_proj);

  // ---- MLPs: modulation chunk 2 (shift 3D, scale 4D, gate 5D)
  {
    auto mlp = [&](float* x, int64_t rows_per_b, const Buf& mod, const char* fc1, const char* fc2, int64_t zero_from) {
      const int64_t R = B * rows_per_b;
      Buf xm(size_t(R * D)), h(size_t(R * F)), y(size_t(R * D));
      modulate(x, rows_per_b, mod, 3 * D, xm.data(), zero_from);
      fwd(fc1, xm.data(), R, h.data());
      parallel_for_range(R * F, 1 << 14, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) h[size_t(i)] = gelu_tanh(h[size_t(i)]);
      });
      fwd(fc2, h.data(), R, y.data());
      gated_residual(x, y.data(), R, rows_per_b, D, mod.data(), 6 * D, 5 * D, zero_from);
    };
    mlp(img, Si, img_mod, "img_mlp.net.0.proj", "img_mlp.net.2", zf);
    mlp(txt, St, txt_mod, "txt_mlp.net.0.proj", "txt_mlp.net.2", St);
  }
  lap(t.mlp);
  t.total += now_s() - t_start;
  return {img_t.reshape(in.img.shape()), txt_t.reshape(in.txt.shape())};
}

}  // namespace nibble::nn
