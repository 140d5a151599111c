// The whole Qwen-Image(-Edit) transformer (include/nibble/qwen_image.h) around nn::QwenImageBlock.
//
// Written from ComfyUI's QwenImageTransformer2DModel (comfy/ldm/qwen_image/model.py) and the pieces
// it imports (flux EmbedND / rope, lightricks Timesteps / TimestepEmbedding, common_dit padding):
//   patchify  x (B, C, T, H, W) → circular pad of H, W to even → tokens (t, h/2, w/2) with features
//             c·4 + dy·2 + dx; ids (t or ref index, h − h_len//2, w − w_len//2)
//   refs      each reference latent patchified the same way with index 1, 2, ... ("index") and
//             appended after the image tokens
//   text ids  every axis = txt_start + i, txt_start = max(h_len//2, w_len//2) of the main latent
//   RoPE      per axis a of width d_a: pair j rotates by pos_a · θ^(−2j/d_a); axes concatenated
//   temb      sinusoid(1000·t, 256) as [cos | sin] → linear_1 → SiLU → linear_2 (+ addition_t_embedding[0])
//   blocks    nn::QwenImageBlock; with `__index_timestep_zero__` and refs, the reference tokens take
//             their image modulation from temb(t = 0)
//   norm_out  emb = linear(SiLU(temb)), (scale, shift) = chunks in that order; LN(x)·(1 + scale) + shift
//   proj_out  then the first (image) tokens are unpatchified and cropped to H, W.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include <unistd.h>

#include "nibble/qwen_image.h"
#include "nibble/thread_pool.h"
#include "nn/elementwise.h"
#include "nn/qwen_image_block.h"

namespace nibble::nn {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Latent5 {  // a latent as (B, C, T, H, W) fp32
  Tensor t;
  int64_t B, C, T, H, W;
};

Latent5 as5(const Tensor& x, const char* what, int64_t channels) {
  if (!x.defined()) throw Error(fmt::format("qwen_image: {} is undefined", what));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16, DType::F64}, fmt::format("qwen_image: {}", what));
  Latent5 l{};
  if (x.dim() == 5) {
    l = {x.to(DType::F32), x.size(0), x.size(1), x.size(2), x.size(3), x.size(4)};
  } else if (x.dim() == 4) {
    l = {x.to(DType::F32), x.size(0), x.size(1), 1, x.size(2), x.size(3)};
  } else {
    throw Error(fmt::format("qwen_image: {}: expected (B, {}, T, H, W) or (B, {}, H, W), got {}", what, channels,
                            channels, shape_str(x.shape())));
  }
  if (l.C != channels)
    throw Error(fmt::format("qwen_image: {}: expected {} latent channels (dim 1), got {} (shape {})", what, channels,
                            l.C, shape_str(x.shape())));
  if (l.B < 1 || l.T < 1 || l.H < 1 || l.W < 1)
    throw Error(fmt::format("qwen_image: {}: empty latent {}", what, shape_str(x.shape())));
  return l;
}

// Patchify one latent (2×2, circular padding of H and W to even) into rows [row0, row0 + n) of
// tokens (B, S_img, C·4) and its ids into ids (n, 3).
void patchify(const Latent5& l, int64_t index, float* tokens, int64_t S_img, int64_t row0, std::vector<float>& ids) {
  const int64_t hl = (l.H + 1) / 2, wl = (l.W + 1) / 2, F = l.C * 4;
  const float* src = l.t.data<float>();
  for (int64_t b = 0; b < l.B; ++b)
    for (int64_t t = 0; t < l.T; ++t)
      for (int64_t hp = 0; hp < hl; ++hp)
        for (int64_t wp = 0; wp < wl; ++wp) {
          float* dst = tokens + (b * S_img + row0 + (t * hl + hp) * wl + wp) * F;
          for (int64_t c = 0; c < l.C; ++c)
            for (int64_t dy = 0; dy < 2; ++dy)
              for (int64_t dx = 0; dx < 2; ++dx) {
                const int64_t y = (2 * hp + dy) % l.H, x = (2 * wp + dx) % l.W;  // circular pad
                dst[c * 4 + dy * 2 + dx] = src[(((b * l.C + c) * l.T + t) * l.H + y) * l.W + x];
              }
        }
  for (int64_t t = 0; t < l.T; ++t)
    for (int64_t hp = 0; hp < hl; ++hp)
      for (int64_t wp = 0; wp < wl; ++wp) {
        ids.push_back(float(l.T > 1 ? t : index));
        ids.push_back(float(hp - hl / 2));
        ids.push_back(float(wp - wl / 2));
      }
}

}  // namespace

struct QwenImageTransformer::Impl {
  QwenImageConfig cfg;
  std::string path;
  uint64_t stored = 0, block_stored = 0;
  Linear img_in, txt_in, t_lin1, t_lin2, norm_out, proj_out;
  Tensor txt_norm_w;   // fp32 (joint_dim)
  Tensor add_t_emb;    // fp32 (2, D) or undefined
  std::vector<QwenImageBlock> blocks;
  AttentionPrecision attention = AttentionPrecision::Fp32;
  bool deq_per_block = false;  // dequantized baseline decoded block by block in forward()
};

namespace {

std::vector<int64_t> default_axes(int64_t hd, const std::string& file) {
  if (hd == 128) return {16, 56, 56};
  if (hd % 32 != 0)
    throw Error(fmt::format("{}: head_dim {} has no default RoPE axes (need head_dim % 32 == 0, or give axes_dim)",
                            file, hd));
  return {hd / 8, 7 * hd / 16, 7 * hd / 16};
}

}  // namespace

QwenImageTransformer QwenImageTransformer::load(const std::string& path, const QwenImageLoadOptions& opt) {
  return from_model(Model::load(path), opt);
}

QwenImageTransformer QwenImageTransformer::from_model(const Model& model, const QwenImageLoadOptions& opt) {
  auto im = std::make_shared<Impl>();
  const std::string& file = model.path();
  im->path = file;
  QwenImageConfig& c = im->cfg;

  // ---- what kind of checkpoint is this
  const std::string& pre = model.prefix();
  std::set<int64_t> block_ids;
  bool has_any_top = false;
  for (const auto& n : model.checkpoint().names()) {
    std::string_view k(n);
    if (!pre.empty() && k.rfind(pre, 0) == 0) k.remove_prefix(pre.size());
    if (k.rfind("transformer_blocks.", 0) == 0) {
      k.remove_prefix(19);
      int64_t v = 0;
      size_t i = 0;
      while (i < k.size() && k[i] >= '0' && k[i] <= '9' && v < 1000000) v = v * 10 + (k[i++] - '0');
      if (i > 0 && i < k.size() && k[i] == '.') block_ids.insert(v);
    }
    if (k.rfind("img_in.", 0) == 0 || k.rfind("txt_in.", 0) == 0) has_any_top = true;
  }
  if (block_ids.empty() && !has_any_top)
    throw Error(fmt::format(
        "{}: not a Qwen-Image transformer: no 'img_in.weight', 'txt_in.weight' or 'transformer_blocks.N.*' keys "
        "(with or without the 'model.diffusion_model.' prefix)", file));
  auto need_linear = [&](const std::string& n) -> const Linear& {
    if (!model.contains(n))
      throw Error(fmt::format("{}: not a complete Qwen-Image transformer: missing layer '{}{}' ({}.weight)", file, pre,
                              n, n));
    return model.linear(n);
  };
  im->img_in = need_linear("img_in");
  im->txt_in = need_linear("txt_in");
  im->t_lin1 = need_linear("time_text_embed.timestep_embedder.linear_1");
  im->t_lin2 = need_linear("time_text_embed.timestep_embedder.linear_2");
  im->norm_out = need_linear("norm_out.linear");
  im->proj_out = need_linear("proj_out");
  if (!model.has_tensor("txt_norm.weight"))
    throw Error(fmt::format("{}: not a complete Qwen-Image transformer: missing tensor '{}txt_norm.weight'", file, pre));

  // ---- widths from the shapes
  c.hidden = im->img_in.out_features();
  c.in_channels = im->img_in.in_features();
  c.joint_dim = im->txt_in.in_features();
  c.patch = 2;
  const int64_t D = c.hidden;
  auto expect = [&](const Linear& l, int64_t N, int64_t K, const char* what) {
    if (l.out_features() != N || l.in_features() != K)
      throw Error(fmt::format("{}: layer '{}{}': expected (out, in) = ({}, {}) ({}), got ({}, {})", file, pre, l.name(),
                              N, K, what, l.out_features(), l.in_features()));
  };
  if (c.in_channels % 4 != 0)
    throw Error(fmt::format("{}: layer '{}img_in': in_features {} is not latent channels × 4 (2×2 patches)", file, pre,
                            c.in_channels));
  expect(im->txt_in, D, c.joint_dim, "txt_in: hidden from img_in");
  expect(im->t_lin1, D, 256, "256 sinusoid channels → hidden");
  expect(im->t_lin2, D, D, "hidden → hidden");
  expect(im->norm_out, 2 * D, D, "scale and shift");
  if (im->proj_out.in_features() != D || im->proj_out.out_features() % 4 != 0)
    throw Error(fmt::format("{}: layer '{}proj_out': expected (out_channels·4, {}), got ({}, {})", file, pre, D,
                            im->proj_out.out_features(), im->proj_out.in_features()));
  c.out_channels = im->proj_out.out_features() / 4;
  if (c.out_channels != c.in_channels / 4)
    throw Error(fmt::format("{}: proj_out predicts {} channels but img_in takes {} latent channels", file,
                            c.out_channels, c.in_channels / 4));
  {
    const Tensor w = model.tensor("txt_norm.weight");
    check_dtype(w, {DType::F32, DType::BF16, DType::F16}, fmt::format("{}: {}txt_norm.weight", file, pre));
    check_shape(w, {c.joint_dim}, fmt::format("{}: {}txt_norm.weight", file, pre));
    im->txt_norm_w = w.to(DType::F32).clone();
  }
  if (model.has_tensor("time_text_embed.addition_t_embedding.weight")) {
    const Tensor w = model.tensor("time_text_embed.addition_t_embedding.weight");
    check_shape(w, {2, D}, fmt::format("{}: {}time_text_embed.addition_t_embedding.weight", file, pre));
    im->add_t_emb = w.to(DType::F32).clone();
    c.addition_t_embedding = true;
  }
  c.index_timestep_zero = model.has_tensor("__index_timestep_zero__");

  // ---- blocks: 0 .. max present, every one complete
  c.blocks = block_ids.empty() ? 0 : *block_ids.rbegin() + 1;
  if (c.blocks == 0) throw Error(fmt::format("{}: no transformer blocks ('{}transformer_blocks.0.*' absent)", file, pre));
  for (int64_t b = 0; b < c.blocks; ++b)
    if (!block_ids.count(b))
      throw Error(fmt::format("{}: block {} absent: no '{}transformer_blocks.{}.*' keys, but blocks up to {} exist", file,
                              b, pre, b, c.blocks - 1));
  c.head_dim = opt.head_dim;
  if (model.has_tensor("transformer_blocks.0.attn.norm_q.weight")) {
    const Tensor w = model.tensor("transformer_blocks.0.attn.norm_q.weight");
    if (w.dim() != 1) throw Error(fmt::format("{}: {}transformer_blocks.0.attn.norm_q.weight: expected 1-D (head_dim), got {}",
                                              file, pre, shape_str(w.shape())));
    c.head_dim = w.size(0);
  }
  if (c.head_dim <= 0 || D % c.head_dim != 0)
    throw Error(fmt::format("{}: hidden {} is not a multiple of head_dim {}", file, D, c.head_dim));
  c.heads = D / c.head_dim;
  c.axes_dim = opt.axes_dim.empty() ? default_axes(c.head_dim, file) : opt.axes_dim;
  {
    int64_t sum = 0;
    for (int64_t a : c.axes_dim) {
      if (a <= 0 || a % 2) throw Error(fmt::format("{}: RoPE axes must be positive and even", file));
      sum += a;
    }
    if (c.axes_dim.size() != 3 || sum != c.head_dim)
      throw Error(fmt::format("{}: RoPE axes ({}) must be 3 and sum to head_dim {}", file, fmt::join(c.axes_dim, ", "),
                              c.head_dim));
  }
  AttentionPrecision attn = AttentionPrecision::Auto;
  if (opt.attention == "fp32") attn = AttentionPrecision::Fp32;
  else if (opt.attention == "bf16") attn = AttentionPrecision::Bf16;
  else if (opt.attention != "auto")
    throw Error(fmt::format("qwen_image: attention '{}': expected auto, fp32 or bf16", opt.attention));
  attn = resolve_attention(attn, c.head_dim);
  im->attention = attn;
  // The dequantized baseline: at load, or block by block in forward() when the fp32 copies (weights
  // and their packed panels, 8 bytes per weight of every quantized block linear) would not fit.
  bool deq_per_block = false;
  if (opt.dequantized_baseline) {
    uint64_t deq_bytes = 0;
    for (int64_t b = 0; b < c.blocks; ++b)
      for (const auto& n : QwenImageBlock::linear_names()) {
        const std::string ln = fmt::format("transformer_blocks.{}.{}", b, n);
        if (!model.contains(ln)) continue;
        const Linear& l = model.linear(ln);
        if (l.path() != LinearPath::Float) deq_bytes += uint64_t(l.out_features()) * uint64_t(l.in_features()) * 8;
      }
    const long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGE_SIZE);
    const uint64_t ram = pages > 0 && psize > 0 ? uint64_t(pages) * uint64_t(psize) : 0;
    deq_per_block = opt.dequantize_per_block > 0 || (opt.dequantize_per_block < 0 && ram && deq_bytes > ram / 2);
  }
  im->deq_per_block = deq_per_block;
  im->blocks.reserve(size_t(c.blocks));
  for (int64_t b = 0; b < c.blocks; ++b) {
    const std::string bp = fmt::format("transformer_blocks.{}", b);
    for (const auto& n : QwenImageBlock::linear_names())
      if (!model.contains(bp + "." + n))
        throw Error(fmt::format("{}: block {}: missing layer '{}{}.{}'", file, b, pre, bp, n));
    QwenImageBlock blk;
    try {
      blk = QwenImageBlock::from_model(model, bp, c.head_dim);
    } catch (const Error& e) {
      throw Error(fmt::format("{}: block {}: {}", file, b, e.what()));
    }
    if (blk.config().hidden != D)
      throw Error(fmt::format("{}: block {}: hidden {} != img_in's {}", file, b, blk.config().hidden, D));
    if (b == 0) c.mlp_hidden = blk.config().mlp_hidden;
    if (blk.config().mlp_hidden != c.mlp_hidden)
      throw Error(fmt::format("{}: block {}: mlp_hidden {} != block 0's {}", file, b, blk.config().mlp_hidden,
                              c.mlp_hidden));
    im->stored += blk.stored_bytes();
    im->block_stored += blk.stored_bytes();
    im->blocks.push_back((opt.dequantized_baseline && !deq_per_block ? blk.dequantized() : blk).with_attention(attn));
  }
  for (Linear* l : {&im->img_in, &im->txt_in, &im->t_lin1, &im->t_lin2, &im->norm_out, &im->proj_out}) {
    im->stored += l->stored_bytes();
    if (opt.dequantized_baseline) *l = l->dequantized();
  }
  // Float weights: packed fp32 panels (2x bf16) unless that would not fit comfortably.
  {
    uint64_t packed = 0;
    auto count = [&](const Linear& l) {
      if (l.path() == LinearPath::Float || (l.path() == LinearPath::Dequantized && !l.is_streamed()))
        packed += uint64_t(l.out_features()) * uint64_t(l.in_features()) * 4;
    };
    for (const auto& b : im->blocks)
      for (const auto& n : QwenImageBlock::linear_names()) count(b.linear(n));
    const long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGE_SIZE);
    const uint64_t ram = pages > 0 && psize > 0 ? uint64_t(pages) * uint64_t(psize) : 0;
    const bool stream = opt.stream_float_weights > 0 || (opt.stream_float_weights < 0 && ram && packed > ram / 2);
    if (stream) {
      for (auto& b : im->blocks) b = b.streamed();
      for (Linear* l : {&im->img_in, &im->txt_in, &im->t_lin1, &im->t_lin2, &im->norm_out, &im->proj_out})
        *l = l->streamed();
    }
  }
  im->stored += im->txt_norm_w.numel() * dtype_size(model.tensor("txt_norm.weight").dtype());
  QwenImageTransformer out;
  out.impl_ = im;
  return out;
}

const QwenImageConfig& QwenImageTransformer::config() const { return impl_->cfg; }
uint64_t QwenImageTransformer::stored_bytes() const { return impl_->stored; }
uint64_t QwenImageTransformer::block_stored_bytes() const { return impl_->block_stored; }
std::string QwenImageTransformer::attention_path() const { return attention_name(impl_->attention); }

Tensor QwenImageTransformer::forward(const QwenImageInputs& in, QwenImageTimings* tm) const {
  const Impl& m = *impl_;
  const QwenImageConfig& c = m.cfg;
  const int64_t D = c.hidden, Cl = c.in_channels / 4, F = c.in_channels, hd = c.head_dim;
  const double t_start = now_s();

  // ---- inputs
  const Latent5 x = as5(in.latent, "latent", Cl);
  const int64_t B = x.B;
  if (!in.context.defined()) throw Error("qwen_image: context is undefined");
  check_dtype(in.context, {DType::F32, DType::BF16, DType::F16, DType::F64}, "qwen_image: context");
  Tensor ctx = in.context;
  if (ctx.dim() == 2) ctx = ctx.reshape({1, ctx.size(0), ctx.size(1)});
  if (ctx.dim() != 3 || ctx.size(2) != c.joint_dim)
    throw Error(fmt::format("qwen_image: context: expected (B, L, {}) (joint_dim of the checkpoint), got {}",
                            c.joint_dim, shape_str(in.context.shape())));
  if (ctx.size(0) != B)
    throw Error(fmt::format("qwen_image: context batch {} != latent batch {}", ctx.size(0), B));
  const int64_t L = ctx.size(1);
  if (L < 1) throw Error("qwen_image: context has no tokens (L = 0)");
  std::vector<float> tsteps(static_cast<size_t>(B));
  {
    if (!in.timestep.defined()) throw Error("qwen_image: timestep is undefined");
    check_dtype(in.timestep, {DType::F32, DType::F64, DType::BF16, DType::F16}, "qwen_image: timestep");
    const Tensor ts = in.timestep.to(DType::F32);
    if (ts.numel() != 1 && ts.numel() != B)
      throw Error(fmt::format("qwen_image: timestep: expected a scalar or ({}) values, got {}", B,
                              shape_str(ts.shape())));
    for (int64_t b = 0; b < B; ++b) tsteps[size_t(b)] = ts.data<float>()[ts.numel() == 1 ? 0 : b];
  }
  Tensor txt_bias;  // (B, L) additive score bias
  if (in.attention_mask.defined()) {
    const Tensor& am = in.attention_mask;
    if (!(am.numel() == B * L && am.size(-1) == L) && !(am.numel() == L && am.size(-1) == L))
      throw Error(fmt::format("qwen_image: attention_mask: expected ({}, {}) or ({}), got {}", B, L, L,
                              shape_str(am.shape())));
    txt_bias = Tensor::empty(DType::F32, {B, L});
    float* tb = txt_bias.mutable_data<float>();
    const bool floating = am.dtype() == DType::F32 || am.dtype() == DType::F16 || am.dtype() == DType::BF16 ||
                          am.dtype() == DType::F64;
    const int64_t per = am.numel() == L ? 0 : L;
    if (floating) {
      const Tensor f = am.to(DType::F32);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < L; ++j) tb[b * L + j] = f.data<float>()[b * per + j];
    } else {
      const size_t es = dtype_size(am.dtype());
      const auto* raw = static_cast<const uint8_t*>(am.raw());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < L; ++j) {
          bool nz = false;
          for (size_t q = 0; q < es; ++q) nz |= raw[size_t(b * per + j) * es + q] != 0;
          tb[b * L + j] = nz ? 0.0f : -std::numeric_limits<float>::max();
        }
    }
  }
  std::vector<Latent5> refs;
  for (size_t i = 0; i < in.ref_latents.size(); ++i) {
    const std::string what = fmt::format("ref_latents[{}]", i);
    refs.push_back(as5(in.ref_latents[i], what.c_str(), Cl));
    if (refs.back().B != B)
      throw Error(fmt::format("qwen_image: {}: batch {} != latent batch {}", what, refs.back().B, B));
  }

  // ---- patchify image + references, ids
  const int64_t hl = (x.H + 1) / 2, wl = (x.W + 1) / 2;
  const int64_t n_img = x.T * hl * wl;
  int64_t S_img = n_img;
  for (const auto& r : refs) S_img += r.T * ((r.H + 1) / 2) * ((r.W + 1) / 2);
  Tensor tokens = Tensor::empty(DType::F32, {B, S_img, F});
  std::vector<float> img_ids;
  img_ids.reserve(size_t(S_img * 3));
  patchify(x, 0, tokens.mutable_data<float>(), S_img, 0, img_ids);
  {
    int64_t row = n_img, index = 0;
    for (const auto& r : refs) {
      ++index;  // the "index" method (and index_timestep_zero): ref i gets index i, offsets 0
      patchify(r, index, tokens.mutable_data<float>(), S_img, row, img_ids);
      row += r.T * ((r.H + 1) / 2) * ((r.W + 1) / 2);
    }
  }
  const bool ts_zero = c.index_timestep_zero && !refs.empty();
  const int64_t S = L + S_img;
  // RoPE cos/sin (S, hd/2), joint order: text then image.
  Tensor rc = Tensor::empty(DType::F32, {S, hd / 2}), rs = Tensor::empty(DType::F32, {S, hd / 2});
  {
    const int64_t txt_start = std::max(wl / 2, hl / 2), h2 = hd / 2;
    float* pc = rc.mutable_data<float>();
    float* ps = rs.mutable_data<float>();
    std::vector<double> omega(static_cast<size_t>(h2));  // column → (axis, θ^(−2j/d_a))
    std::vector<int> axis(static_cast<size_t>(h2));
    for (int64_t a = 0, col = 0; a < 3; ++a)
      for (int64_t j = 0; j < c.axes_dim[size_t(a)] / 2; ++j, ++col) {
        omega[size_t(col)] = 1.0 / std::pow(c.theta, double(2 * j) / double(c.axes_dim[size_t(a)]));
        axis[size_t(col)] = int(a);
      }
    parallel_for_range(S, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t col = 0; col < h2; ++col) {
          const int a = axis[size_t(col)];
          const float pos = p < L ? float(txt_start + p) : img_ids[size_t((p - L) * 3 + a)];
          const double ang = double(pos) * omega[size_t(col)];
          pc[p * h2 + col] = float(std::cos(ang));
          ps[p * h2 + col] = float(std::sin(ang));
        }
    });
  }
  double t_lin = 0, t0 = now_s();
  auto lin = [&](const Linear& l, const float* src, int64_t M, float* dst) {
    const double a = now_s();
    l.forward_rows(src, M, dst);
    t_lin += now_s() - a;
  };

  // ---- embeddings
  Tensor img = Tensor::empty(DType::F32, {B, S_img, D});
  lin(m.img_in, tokens.data<float>(), B * S_img, img.mutable_data<float>());
  tokens = Tensor();
  Tensor txt = Tensor::empty(DType::F32, {B, L, D});
  {
    const Tensor cf = ctx.to(DType::F32);
    Tensor normed = Tensor::empty(DType::F32, {B * L, c.joint_dim});
    ew::rmsnorm_rows(cf.data<float>(), B * L, c.joint_dim, 1e-6f, m.txt_norm_w.data<float>(),
                     normed.mutable_data<float>());
    lin(m.txt_in, normed.data<float>(), B * L, txt.mutable_data<float>());
  }
  // temb rows: [t_b] (B) and, with index_timestep_zero, [0] (B) after them.
  const int64_t Bt = ts_zero ? 2 * B : B;
  Tensor temb = Tensor::empty(DType::F32, {Bt, D});
  {
    std::vector<float> sinus(size_t(Bt * 256)), h(size_t(Bt * D));
    const float neg_log = float(-std::log(10000.0));
    for (int64_t b = 0; b < Bt; ++b) {
      const float tv = b < B ? tsteps[size_t(b)] : 0.0f;
      for (int64_t i = 0; i < 128; ++i) {
        // fp32 steps of get_timestep_embedding: exp(−ln(1e4)·i / 128), ·t, ·1000
        const float e = std::exp(neg_log * float(i) / 128.0f);
        const float arg = 1000.0f * (tv * e);
        sinus[size_t(b * 256 + i)] = float(std::cos(double(arg)));        // flip_sin_to_cos: cos first
        sinus[size_t(b * 256 + 128 + i)] = float(std::sin(double(arg)));
      }
    }
    lin(m.t_lin1, sinus.data(), Bt, h.data());
    ew::silu(h.data(), Bt * D, h.data());
    float* te = temb.mutable_data<float>();
    lin(m.t_lin2, h.data(), Bt, te);
    if (m.add_t_emb.defined())  // additional_t_cond defaults to 0
      for (int64_t b = 0; b < Bt; ++b)
        for (int64_t i = 0; i < D; ++i) te[b * D + i] += m.add_t_emb.data<float>()[i];
  }
  double other = now_s() - t0 - t_lin;

  // ---- blocks
  double blk_lin = 0, blk_attn = 0, blk_total = 0, t_deq = 0;
  for (const QwenImageBlock& blk : m.blocks) {
    QwenBlockInputs bi;
    bi.img = img;
    bi.txt = txt;
    bi.temb = ts_zero ? temb.slice_rows(0, B) : temb;
    bi.rope_cos = rc;
    bi.rope_sin = rs;
    bi.txt_key_bias = txt_bias;
    if (ts_zero) {
      bi.temb_zero = temb.slice_rows(B, 2 * B);
      bi.img_zero_from = n_img;
    }
    QwenBlockTimings bt;
    if (m.deq_per_block) {  // the baseline's block, dequantized now and dropped after it ran
      const double a = now_s();
      const QwenImageBlock d = blk.dequantized();
      t_deq += now_s() - a;
      d.forward_inplace(bi, &bt);
    } else {
      blk.forward_inplace(bi, &bt);  // img and txt are this call's own fp32 tensors
    }
    blk_lin += bt.linear;
    blk_attn += bt.attention_core;
    blk_total += bt.total;
  }

  // ---- norm_out + proj_out on the image tokens (the references are dropped after proj_out in
  // ComfyUI; rows are independent, so only the first n_img rows are computed here)
  t0 = now_s();
  const double lin_before = t_lin;
  Tensor out;
  {
    std::vector<float> st(size_t(B * D)), emb(size_t(B * 2 * D));
    ew::silu(temb.data<float>(), B * D, st.data());
    lin(m.norm_out, st.data(), B, emb.data());
    std::vector<float> xn(size_t(B * n_img * D)), y(size_t(B * n_img * F));
    for (int64_t b = 0; b < B; ++b) {
      const float* scale = emb.data() + b * 2 * D;  // ComfyUI's LastLayer: scale first, then shift
      const float* shift = scale + D;
      ew::layernorm_modulate(img.data<float>() + b * S_img * D, n_img, D, 1e-6f, shift, scale, xn.data() + b * n_img * D);
    }
    lin(m.proj_out, xn.data(), B * n_img, y.data());
    Shape oshape = in.latent.dim() == 5 ? Shape{B, Cl, x.T, x.H, x.W} : Shape{B, Cl, x.H, x.W};
    out = Tensor::empty(DType::F32, oshape);
    float* op = out.mutable_data<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t ch = 0; ch < Cl; ++ch)
        for (int64_t t = 0; t < x.T; ++t)
          for (int64_t yy = 0; yy < x.H; ++yy)
            for (int64_t xx = 0; xx < x.W; ++xx) {
              const int64_t tok = (t * hl + yy / 2) * wl + xx / 2;
              op[(((b * Cl + ch) * x.T + t) * x.H + yy) * x.W + xx] =
                  y[size_t((b * n_img + tok) * F + ch * 4 + (yy % 2) * 2 + (xx % 2))];
            }
  }
  other += now_s() - t0 - (t_lin - lin_before);
  if (tm) {
    tm->linear += t_lin + blk_lin;
    tm->attention += blk_attn;
    tm->dequantize += t_deq;
    tm->total += now_s() - t_start;
    tm->other = tm->total - tm->linear - tm->attention - tm->dequantize;
  }
  (void)other;
  (void)blk_total;
  return out;
}

}  // namespace nibble::nn
