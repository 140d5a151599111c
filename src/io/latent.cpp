// latent.cpp — ComfyUI `.latent` files, conditioning files and the Wan 2.1 latent normalisation
// (see nibble/latent.h for the formats).
#include "nibble/latent.h"

#include <fmt/format.h>

#include <map>

#include "nibble/safetensors.h"

namespace nibble {
namespace {

constexpr const char* kLatentKey = "latent_tensor";
constexpr const char* kVersionKey = "latent_format_version_0";
constexpr const char* kRefPrefix = "reference_latents.";

// ComfyUI comfy/latent_formats.py, class Wan21 (scale_factor 1.0).
constexpr float kWan21Mean[16] = {-0.7571f, -0.7089f, -0.9113f, 0.1075f, -0.1745f, 0.9653f, -0.1517f, 1.5508f,
                                  0.4134f,  -0.0715f, 0.5517f,  -0.3632f, -0.1922f, -0.9497f, 0.2503f, -0.2921f};
constexpr float kWan21Std[16] = {2.8184f, 1.4541f, 2.3275f, 2.6558f, 1.2196f, 1.7708f, 2.6052f, 2.0743f,
                                 3.2687f, 2.1526f, 2.8652f, 1.5579f, 1.6382f, 1.1253f, 2.8251f, 1.9160f};

std::string keys_of(const SafetensorsFile& f) {
  std::string s;
  for (const auto& t : f.tensors()) s += (s.empty() ? "" : ", ") + t.name;
  return s.empty() ? "no tensors" : s;
}

// Applies fn(value, channel) over dim 1 of a (B, 16, ...) tensor; fp32 result.
template <class F>
Tensor per_channel(const Tensor& latent, const char* what, F fn) {
  if (!latent.defined() || latent.dim() < 3 || latent.size(1) != 16 || !is_float(latent.dtype()))
    throw Error(fmt::format("{}: expected a float latent (B, 16, [T,] H, W) (Qwen-Image / Wan 2.1 latent format), got {}",
                            what, latent.defined() ? shape_str(latent.shape()) : std::string("nothing")));
  const Tensor x = latent.to_f32();
  Tensor y = Tensor::empty(DType::F32, x.shape());
  const int64_t B = x.size(0), C = 16, inner = x.numel() / (B * C);
  const float* p = x.data<float>();
  float* q = y.mutable_data<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = (b * C + c) * inner;
      for (int64_t i = 0; i < inner; ++i) q[o + i] = fn(p[o + i], c);
    }
  return y;
}

// A latent tensor read from `what`: float, rank 4 or 5, channel count.
Tensor checked_latent(const Tensor& t, const std::string& what, int64_t channels) {
  if (!is_float(t.dtype()))
    throw Error(fmt::format("{}: expected a float tensor, got {}", what, dtype_name(t.dtype())));
  if (t.dim() != 4 && t.dim() != 5)
    throw Error(fmt::format("{}: expected a latent (B, C, H, W) or (B, C, T, H, W), got shape {}", what,
                            shape_str(t.shape())));
  if (channels > 0 && t.size(1) != channels)
    throw Error(fmt::format("{}: expected {} latent channels (dim 1; Qwen-Image uses the 16-channel Wan 2.1 VAE), "
                            "got {} in shape {}", what, channels, t.size(1), shape_str(t.shape())));
  for (int64_t d : t.shape())
    if (d <= 0) throw Error(fmt::format("{}: empty latent, shape {}", what, shape_str(t.shape())));
  return t.to(DType::F32).clone();  // own the bytes (the mapping may go away)
}

}  // namespace

Tensor load_latent(const std::string& path, int64_t channels) {
  const auto f = SafetensorsFile::open(path);
  if (!f->contains(kLatentKey))
    throw Error(fmt::format("{}: not a ComfyUI .latent file: no tensor '{}' (found: {})", path, kLatentKey, keys_of(*f)));
  if (!f->contains(kVersionKey))
    throw Error(fmt::format("{}: .latent without the version marker '{}': a pre-2023 (SD1.x) latent that ComfyUI's "
                            "LoadLatent would rescale by 1/0.18215, not a Qwen-Image latent; re-save it with a "
                            "current ComfyUI SaveLatent", path, kVersionKey));
  return checked_latent(f->get(kLatentKey), fmt::format("{}: tensor '{}'", path, kLatentKey), channels);
}

void save_latent(const std::string& path, const Tensor& latent) {
  const Tensor t = checked_latent(latent, fmt::format("save_latent {}", path), 0);
  save_safetensors(path, {{kLatentKey, t}, {kVersionKey, Tensor::empty(DType::F32, {0})}},
                   {{"format", "pt"}, {"nibble", "latent"}});
}

Tensor latent_process_in(const Tensor& latent) {
  return per_channel(latent, "latent_process_in", [](float v, int64_t c) { return (v - kWan21Mean[c]) / kWan21Std[c]; });
}
Tensor latent_process_out(const Tensor& latent) {
  return per_channel(latent, "latent_process_out", [](float v, int64_t c) { return v * kWan21Std[c] + kWan21Mean[c]; });
}

Conditioning load_conditioning(const std::string& path, int64_t joint_dim) {
  const auto f = SafetensorsFile::open(path);
  if (!f->contains("context"))
    throw Error(fmt::format("{}: not a conditioning file: no tensor 'context' (B, L, {}) (found: {}); write one with "
                            "nibble.save_conditioning", path, joint_dim > 0 ? std::to_string(joint_dim) : "D", keys_of(*f)));
  Conditioning c;
  Tensor ctx = f->get("context");
  if (!is_float(ctx.dtype()))
    throw Error(fmt::format("{}: tensor 'context': expected a float tensor, got {}", path, dtype_name(ctx.dtype())));
  if (ctx.dim() == 2) ctx = ctx.reshape({1, ctx.size(0), ctx.size(1)});
  if (ctx.dim() != 3 || ctx.size(0) <= 0 || ctx.size(1) <= 0)
    throw Error(fmt::format("{}: tensor 'context': expected (B, L, {}) or (L, {}), got {}", path,
                            joint_dim > 0 ? std::to_string(joint_dim) : "D", joint_dim > 0 ? std::to_string(joint_dim) : "D",
                            shape_str(f->get("context").shape())));
  if (joint_dim > 0 && ctx.size(2) != joint_dim)
    throw Error(fmt::format("{}: tensor 'context': expected width {} (the model's joint_dim; Qwen-Image's text encoder "
                            "gives 3584), got {} in shape {}", path, joint_dim, ctx.size(2), shape_str(ctx.shape())));
  c.context = ctx.to(DType::F32).clone();
  const int64_t B = ctx.size(0), L = ctx.size(1);
  if (f->contains("attention_mask")) {
    Tensor m = f->get("attention_mask");
    if (m.dim() == 1) m = m.reshape({1, m.size(0)});
    if (m.dim() != 2 || m.size(0) != B || m.size(1) != L)
      throw Error(fmt::format("{}: tensor 'attention_mask': expected ({}, {}) to match 'context' {}, got {}", path, B, L,
                              shape_str(ctx.shape()), shape_str(f->get("attention_mask").shape())));
    const DType mt = m.dtype();
    const bool integral = mt == DType::BOOL || mt == DType::I64 || mt == DType::I32 || mt == DType::I16 ||
                          mt == DType::I8 || mt == DType::U64 || mt == DType::U32 || mt == DType::U16 || mt == DType::U8;
    if (!integral && mt != DType::F32 && mt != DType::F16 && mt != DType::BF16 && mt != DType::F64)
      throw Error(fmt::format("{}: tensor 'attention_mask': expected an integer/bool (nonzero = keep) or float (added to "
                              "the attention scores) tensor, got {}", path, dtype_name(mt)));
    Tensor out = integral ? m.clone() : m.to(DType::F32).clone();
    c.attention_mask = out;
  }
  std::map<int64_t, Tensor> refs;
  for (const auto& t : f->tensors()) {
    if (t.name.rfind(kRefPrefix, 0) != 0) continue;
    const std::string idx = t.name.substr(std::string(kRefPrefix).size());
    if (idx.empty() || idx.size() > 6 || idx.find_first_not_of("0123456789") != std::string::npos)
      throw Error(fmt::format("{}: tensor '{}': expected '{}<index>'", path, t.name, kRefPrefix));
    refs[std::stoll(idx)] = checked_latent(f->get(t.name), fmt::format("{}: tensor '{}'", path, t.name), 16);
  }
  int64_t expect = 0;
  for (auto& [i, t] : refs) {
    if (i != expect) throw Error(fmt::format("{}: reference latents must be numbered 0, 1, ...: '{}{}' is missing", path, kRefPrefix, expect));
    c.reference_latents.push_back(t);
    ++expect;
  }
  for (const auto& t : f->tensors())
    if (t.name != "context" && t.name != "attention_mask" && t.name.rfind(kRefPrefix, 0) != 0)
      throw Error(fmt::format("{}: unexpected tensor '{}' in a conditioning file (expected context, attention_mask, "
                              "{}<i>)", path, t.name, kRefPrefix));
  return c;
}

void save_conditioning(const std::string& path, const Conditioning& c) {
  if (!c.context.defined() || (c.context.dim() != 3 && c.context.dim() != 2) || !is_float(c.context.dtype()))
    throw Error(fmt::format("save_conditioning {}: context must be a float (B, L, D) tensor", path));
  std::vector<std::pair<std::string, Tensor>> ts{{"context", c.context}};
  if (c.attention_mask.defined()) ts.emplace_back("attention_mask", c.attention_mask);
  for (size_t i = 0; i < c.reference_latents.size(); ++i)
    ts.emplace_back(kRefPrefix + std::to_string(i),
                    checked_latent(c.reference_latents[i], fmt::format("save_conditioning {}: reference latent {}", path, i), 16));
  save_safetensors(path, ts, {{"format", "pt"}, {"nibble", "conditioning"}});
}

}  // namespace nibble
