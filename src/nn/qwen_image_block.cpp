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
#include "nn/elementwise.h"

namespace nibble::nn {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Scratch slots of the block's activations (ew::scratch: grow-only per calling thread, so a step
// neither allocates nor faults in pages; every buffer is written in full before it is read).
enum : int { kSt = 0, kImgMod, kTxtMod, kXi, kXt, kQ, kK, kV, kO, kTmp, kYi, kYt, kH, kRopeC, kRopeS };

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
  check_inputs(in, cfg_);
  QwenBlockInputs w = in;
  w.img = in.img.to(DType::F32).clone();
  w.txt = in.txt.to(DType::F32).clone();
  forward_inplace(w, tm);
  return {w.img.reshape(in.img.shape()), w.txt.reshape(in.txt.shape())};
}

void QwenImageBlock::forward_inplace(QwenBlockInputs& in, QwenBlockTimings* tm) const {
  const QwenBlockConfig& c = cfg_;
  const Shapes sh = check_inputs(in, c);
  if (in.img.dtype() != DType::F32 || in.txt.dtype() != DType::F32)
    throw Error("qwen_image_block: forward_inplace needs fp32 img and txt");
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
  float* st = ew::scratch(kSt, Bm * D);
  float* img_mod = ew::scratch(kImgMod, Bm * 6 * D);
  float* txt_mod = ew::scratch(kTxtMod, B * 6 * D);
  {
    const Tensor temb = in.temb.to_f32();
    ew::silu(temb.data<float>(), B * D, st);
    if (zero_mode) ew::silu(in.temb_zero.to_f32().data<float>(), B * D, st + B * D);
  }
  fwd("img_mod.1", st, Bm, img_mod);
  fwd("txt_mod.1", st, B, txt_mod);
  lap(t.modulation);
  // Image rows from img_zero_from on use the second half of img_mod (batch b → row B + b).
  const int64_t zf = zero_mode ? in.img_zero_from : Si;

  float* img = in.img.mutable_data<float>();
  float* txt = in.txt.mutable_data<float>();
  float* xi = ew::scratch(kXi, Ri * D);
  float* xt = ew::scratch(kXt, Rt * D);
  // Per-batch modulation: rows of batch b use mod row b (chunk offsets: shift 0, scale D, gate 2D; +3D for the MLP).
  // zero_from < rows_per_b: rows [zero_from, rows_per_b) of batch b use mod row B + b.
  auto modulate = [&](const float* x, int64_t rows_per_b, const float* mod, int64_t off, float* out, int64_t zero_from) {
    for (int64_t b = 0; b < B; ++b) {
      const float* m = mod + b * 6 * D + off;
      ew::layernorm_modulate(x + b * rows_per_b * D, zero_from, D, c.eps, m, m + D, out + b * rows_per_b * D);
      if (zero_from < rows_per_b) {
        const float* mz = mod + (B + b) * 6 * D + off;
        ew::layernorm_modulate(x + (b * rows_per_b + zero_from) * D, rows_per_b - zero_from, D, c.eps, mz, mz + D,
                               out + (b * rows_per_b + zero_from) * D);
      }
    }
  };
  modulate(img, Si, img_mod, 0, xi, zf);
  modulate(txt, St, txt_mod, 0, xt, St);
  lap(t.norms);

  // ---- projections into joint buffers (B, S, D), txt rows first (batch 1: written in place)
  float* q = ew::scratch(kQ, B * S * D);
  float* k = ew::scratch(kK, B * S * D);
  float* v = ew::scratch(kV, B * S * D);
  auto project = [&](const char* name, const float* x, int64_t rows_per_b, int64_t joint_off, float* dst) {
    if (B == 1) {
      fwd(name, x, rows_per_b, dst + joint_off * D);
      return;
    }
    float* tmp = ew::scratch(kTmp, B * rows_per_b * D);
    fwd(name, x, B * rows_per_b, tmp);
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(dst + (b * S + joint_off) * D, tmp + b * rows_per_b * D, size_t(rows_per_b * D) * sizeof(float));
  };
  project("attn.add_q_proj", xt, St, 0, q);
  project("attn.add_k_proj", xt, St, 0, k);
  project("attn.add_v_proj", xt, St, 0, v);
  project("attn.to_q", xi, Si, St, q);
  project("attn.to_k", xi, Si, St, k);
  project("attn.to_v", xi, Si, St, v);
  lap(t.qkv);

  // ---- RMSNorm on q/k per head (txt rows: norm_added_*) fused with RoPE, then attention
  const float* nq = norms_.at("attn.norm_q.weight").data<float>();
  const float* nk = norms_.at("attn.norm_k.weight").data<float>();
  const float* naq = norms_.at("attn.norm_added_q.weight").data<float>();
  const float* nak = norms_.at("attn.norm_added_k.weight").data<float>();
  float* c2 = nullptr;
  float* s2 = nullptr;
  if (in.rope_cos.defined()) {
    const Tensor rc = in.rope_cos.to_f32(), rs = in.rope_sin.to_f32();
    c2 = ew::scratch(kRopeC, S * hd);
    s2 = ew::scratch(kRopeS, S * hd);
    ew::rope_expand(rc.data<float>(), rs.data<float>(), S, hd, c2, s2);
  }
  parallel_for_range(B * S, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = r % S;
      const bool is_txt = pos < St;
      const float* pc = c2 ? c2 + pos * hd : nullptr;
      const float* ps = s2 ? s2 + pos * hd : nullptr;
      ew::rmsnorm_rope_row(q + r * D, D, hd, c.eps, is_txt ? naq : nq, pc, ps);
      ew::rmsnorm_rope_row(k + r * D, D, hd, c.eps, is_txt ? nak : nk, pc, ps);
    }
  });
  float* o = ew::scratch(kO, B * S * D);
  const Tensor kb = in.txt_key_bias.defined() ? in.txt_key_bias.to_f32() : Tensor();
  {
    const double a = now_s();
    joint_attention(q, k, v, B, S, D, hd, kb.defined() ? kb.data<float>() : nullptr, St, o, attention_);
    t.attention_core += now_s() - a;
  }
  lap(t.attention);

  // ---- output projections + gated residuals (gate1 at offset 2D)
  {
    const float* oi = o + St * D;  // batch 1: the joint rows are [txt ; img] already
    const float* ot = o;
    if (B > 1) {  // split into xi / xt (free after the projections)
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(xt + b * St * D, o + b * S * D, size_t(St * D) * sizeof(float));
        std::memcpy(xi + b * Si * D, o + (b * S + St) * D, size_t(Si * D) * sizeof(float));
      }
      oi = xi;
      ot = xt;
    }
    float* yi = ew::scratch(kYi, Ri * D);
    float* yt = ew::scratch(kYt, Rt * D);
    fwd("attn.to_out.0", oi, Ri, yi);
    fwd("attn.to_add_out", ot, Rt, yt);
    ew::gated_residual(img, yi, Ri, Si, D, img_mod, 6 * D, 2 * D, zf);
    ew::gated_residual(txt, yt, Rt, St, D, txt_mod, 6 * D, 2 * D, St);
  }
  lap(t.out_proj);

  // ---- MLPs: modulation chunk 2 (shift 3D, scale 4D, gate 5D)
  {
    auto mlp = [&](float* x, int64_t rows_per_b, const float* mod, const char* fc1, const char* fc2, int64_t zero_from,
                   float* xm, float* y) {
      const int64_t R = B * rows_per_b;
      float* h = ew::scratch(kH, R * F);
      modulate(x, rows_per_b, mod, 3 * D, xm, zero_from);
      fwd(fc1, xm, R, h);
      ew::gelu_tanh_inplace(h, R * F);
      fwd(fc2, h, R, y);
      ew::gated_residual(x, y, R, rows_per_b, D, mod, 6 * D, 5 * D, zero_from);
    };
    mlp(img, Si, img_mod, "img_mlp.net.0.proj", "img_mlp.net.2", zf, xi, ew::scratch(kYi, Ri * D));
    mlp(txt, St, txt_mod, "txt_mlp.net.0.proj", "txt_mlp.net.2", St, xt, ew::scratch(kYt, Rt * D));
  }
  lap(t.mlp);
  t.total += now_s() - t_start;
}

}  // namespace nibble::nn
