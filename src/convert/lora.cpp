// lora.cpp — LoRA files → per-layer deltas → applied to svdquant_w4a4 (low-rank branch grows),
// awq_w4a16 (merge + the converter's AWQ quantizer) and float layers (merge). nibble/lora.h,
// docs/lora.md.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "nibble/convert.h"
#include "nibble/lora.h"
#include "nibble/safetensors.h"
#include "svd.h"

namespace nibble {

void LoraApplyStats::merge(const LoraApplyStats& o) {
  layers += o.layers;
  svdquant_layers += o.svdquant_layers;
  awq_layers += o.awq_layers;
  float_layers += o.float_layers;
  max_rank_before = std::max(max_rank_before, o.max_rank_before);
  max_rank_after = std::max(max_rank_after, o.max_rank_after);
  awq_max_rel_error = std::max(awq_max_rel_error, o.awq_max_rel_error);
  awq_max_rel_delta = std::max(awq_max_rel_delta, o.awq_max_rel_delta);
}

namespace {

constexpr int64_t kRankTile = 16;
constexpr const char* kSupported =
    "supported: LoRA (diffusers/PEFT lora_A/lora_B, kohya lora_down/lora_up + alpha, ComfyUI-saved, "
    "diffusers lora.down/lora.up) on linear layers";

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
std::string flat(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

std::string strip_prefixes(std::string s) {
  static const char* const kPrefixes[] = {"base_model.model.", "model.diffusion_model.", "diffusion_model.",
                                          "transformer.",      "unet.",                  "lora_unet_",
                                          "lora_transformer_", "lycoris_"};
  for (bool again = true; again;) {
    again = false;
    for (const char* p : kPrefixes)
      if (s.rfind(p, 0) == 0) {
        s = s.substr(std::strlen(p));
        again = true;
      }
  }
  return s;
}

struct Module {
  std::string key;  // stem as in the file
  Tensor down, up;
  bool has_alpha = false;
  float alpha = 0;
};

std::map<std::string, Module> read_lora_file(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open(path);
  struct Role { const char* suffix; int role; };  // 0 down, 1 up, 2 alpha
  static const Role kRoles[] = {{".lora_A.default.weight", 0}, {".lora_B.default.weight", 1}, {".lora_A.weight", 0},
                                {".lora_B.weight", 1},         {".lora_down.weight", 0},      {".lora_up.weight", 1},
                                {".lora.down.weight", 0},      {".lora.up.weight", 1},        {".alpha", 2}};
  struct Bad { const char* marker; const char* type; };
  static const Bad kBad[] = {{"hada_w", "LoHa"},        {"hada_t", "LoHa"},        {"lokr_", "LoKr"},
                             {".lora_mid.", "LoCon (Tucker)"}, {"dora_scale", "DoRA"}, {".diff", "full-weight diff"},
                             {".w_norm", "LyCORIS norm"}, {".b_norm", "LyCORIS norm"}, {"oft_", "OFT"},
                             {".lora_B.bias", "LoRA bias"}, {".lora_up.bias", "LoRA bias"}};
  std::map<std::string, Module> mods;
  for (const TensorInfo& ti : f->tensors()) {
    const std::string& k = ti.name;
    for (const Bad& b : kBad)
      if (k.find(b.marker) != std::string::npos)
        throw Error(fmt::format("{}: '{}' is a {} tensor: not supported ({})", path, k, b.type, kSupported));
    const Role* role = nullptr;
    for (const Role& r : kRoles)
      if (ends_with(k, r.suffix)) { role = &r; break; }
    if (!role)
      throw Error(fmt::format("{}: key '{}' is not a LoRA tensor (expected *.lora_A/lora_B.weight, *.lora_down/lora_up.weight, "
                              "*.alpha; {})",
                              path, k, kSupported));
    const std::string stem = k.substr(0, k.size() - std::strlen(role->suffix));
    Module& m = mods[stem];
    m.key = stem;
    Tensor t = f->get(k);
    if (!is_float(t.dtype())) throw Error(fmt::format("{}: '{}' has dtype {}, expected a float", path, k, dtype_name(t.dtype())));
    if (role->role == 2) {
      if (t.numel() != 1) throw Error(fmt::format("{}: '{}' should be a scalar", path, k));
      m.has_alpha = true;
      m.alpha = t.to_f32().data<float>()[0];
      continue;
    }
    if (t.dim() == 4)
      throw Error(fmt::format("{}: '{}' has shape {}: a convolution LoRA (LoCon); only linear layers are supported ({})", path, k,
                              shape_str(t.shape()), kSupported));
    if (t.dim() != 2) throw Error(fmt::format("{}: '{}' has shape {}, expected 2-D", path, k, shape_str(t.shape())));
    (role->role == 0 ? m.down : m.up) = t.to_f32().clone();
  }
  for (auto& [stem, m] : mods) {
    if (!m.down.defined() || !m.up.defined())
      throw Error(fmt::format("{}: module '{}' has {} but no {}", path, stem, m.down.defined() ? "a down" : "an up",
                              m.down.defined() ? "up (lora_B / lora_up)" : "down (lora_A / lora_down)"));
    if (m.down.size(0) != m.up.size(1))
      throw Error(fmt::format("{}: module '{}': down {} and up {} disagree on the rank", path, stem, shape_str(m.down.shape()),
                              shape_str(m.up.shape())));
  }
  if (mods.empty()) throw Error(fmt::format("{}: no LoRA tensors ({})", path, kSupported));
  return mods;
}

Tensor rows(const Tensor& t, int64_t r0, int64_t r1) { return t.slice_rows(r0, r1).clone(); }

}  // namespace

LoraSpec parse_lora_spec(const std::string& text) {
  LoraSpec s;
  s.path = text;
  const size_t c = text.rfind(':');
  if (c != std::string::npos && c + 1 < text.size() && c > 1) {
    const std::string tail = text.substr(c + 1);
    char* end = nullptr;
    const float v = std::strtof(tail.c_str(), &end);
    if (end && *end == '\0') {
      if (!std::isfinite(v)) throw Error(fmt::format("LoRA '{}': strength '{}' is not finite", text, tail));
      s.path = text.substr(0, c);
      s.strength = v;
    }
  }
  if (!std::filesystem::exists(s.path)) throw Error(fmt::format("LoRA file '{}' does not exist", s.path));
  return s;
}

LoraMatch match_loras(const std::vector<LoraSpec>& loras, const std::vector<std::string>& names, bool partial) {
  // Aliases: name, flattened name, and fused q/k/v names → member layers.
  std::map<std::string, std::vector<std::string>> alias;
  std::set<std::string> nset(names.begin(), names.end());
  for (const auto& n : names) {
    alias[n] = {n};
    alias[flat(n)] = {n};
  }
  for (const auto& n : names) {
    auto group = [&](const char* q, const char* k, const char* v, const char* fused) {
      if (!ends_with(n, q)) return;
      const std::string base = n.substr(0, n.size() - std::strlen(q));
      if (nset.count(base + k) && nset.count(base + v)) {
        std::vector<std::string> m = {n, base + k, base + v};
        alias[base + fused] = m;
        alias[flat(base + fused)] = m;
      }
    };
    group("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_qkv");
    group("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.add_qkv_proj");
  }
  LoraMatch out;
  for (const LoraSpec& spec : loras) {
    auto mods = read_lora_file(spec.path);
    size_t matched = 0;
    std::vector<std::string> miss;
    for (auto& [stem, m] : mods) {
      const std::string s = strip_prefixes(stem);
      auto it = alias.find(s);
      if (it == alias.end()) it = alias.find(flat(s));
      if (it == alias.end()) {
        miss.push_back(stem);
        continue;
      }
      ++matched;
      const int64_t r = m.down.size(0);
      const float scale = spec.strength * (m.has_alpha ? m.alpha : float(r)) / float(r);
      const auto& members = it->second;
      const int64_t parts = int64_t(members.size());
      if (m.up.size(0) % parts)
        throw Error(fmt::format("{}: module '{}' (up {}) cannot be split into {} equal q/k/v parts", spec.path, stem,
                                shape_str(m.up.shape()), parts));
      const int64_t Nm = m.up.size(0) / parts;
      for (int64_t i = 0; i < parts; ++i) {
        LoraDelta d;
        d.source = fmt::format("{}: {}{}", spec.path, stem, parts > 1 ? fmt::format(" [part {} of fused qkv]", i) : "");
        d.down = m.down;
        d.up = parts > 1 ? rows(m.up, i * Nm, (i + 1) * Nm) : m.up;
        d.scale = scale;
        out.layers[members[size_t(i)]].push_back(std::move(d));
      }
    }
    if (matched == 0) {
      std::vector<std::string> ex(names.begin(), names.begin() + std::min<size_t>(names.size(), 3));
      std::vector<std::string> lm(miss.begin(), miss.begin() + std::min<size_t>(miss.size(), 3));
      throw Error(fmt::format("{}: none of its {} modules matches a layer of the model — a LoRA for another architecture? "
                              "(LoRA modules look like '{}'; the model's layers like '{}')",
                              spec.path, mods.size(), fmt::join(lm, "', '"), fmt::join(ex, "', '")));
    }
    if (!miss.empty() && !partial) {
      std::vector<std::string> head(miss.begin(), miss.begin() + std::min<size_t>(miss.size(), 10));
      throw Error(fmt::format("{}: {} of {} modules match no layer of the model: {}{} (use --partial to apply the rest)", spec.path,
                              miss.size(), mods.size(), fmt::join(head, ", "), miss.size() > head.size() ? ", ..." : ""));
    }
    for (auto& mm : miss) out.unmatched.push_back(spec.path + ": " + mm);
  }
  return out;
}

namespace {

void check_delta_shapes(const QuantizedLayer& L, const LoraDelta& d) {
  if (d.down.size(1) != L.K || d.up.size(0) != L.N)
    throw Error(fmt::format("layer '{}' ({} x {}): LoRA {} has down {} and up {}, expected down (r, {}) and up ({}, r)", L.name,
                            L.N, L.K, d.source, shape_str(d.down.shape()), shape_str(d.up.shape()), L.K, L.N));
}

// ΔW (N, K) fp32 = Σ scale · up · down.
std::vector<float> delta_weight(const QuantizedLayer& L, const std::vector<LoraDelta>& ds) {
  std::vector<float> dw(size_t(L.N * L.K), 0.0f);
  for (const auto& d : ds) {
    const int64_t r = d.down.size(0);
    std::vector<float> dt(size_t(L.K * r));  // (K, r) = scale · downᵀ
    for (int64_t j = 0; j < r; ++j)
      for (int64_t k = 0; k < L.K; ++k) dt[size_t(k * r + j)] = d.scale * d.down.data<float>()[j * L.K + k];
    convert_detail::matmul_nt(d.up.data<float>(), dt.data(), L.N, L.K, r, dw.data(), +1);
  }
  return dw;
}

uint16_t enc(DType d, float v) { return d == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v); }

}  // namespace

QuantizedLayer apply_lora(const QuantizedLayer& L, const std::vector<LoraDelta>& ds, LoraApplyStats* stats) {
  for (const auto& d : ds) check_delta_shapes(L, d);
  LoraApplyStats st;
  st.layers = 1;
  QuantizedLayer out = L;
  if (ds.empty()) return out;
  if (L.format && L.format->fused == FusedKernel::SvdquantW4A4) {
    SvdquantW4A4Params p = svdquant_params(L);
    const DType dt = p.proj_down.dtype();
    if (dt != DType::BF16 && dt != DType::F16)
      throw Error(fmt::format("layer '{}': proj_down dtype {} (LoRA joins a 16-bit low-rank branch)", L.name, dtype_name(dt)));
    Tensor up_nat = p.proj_up.dim() == 3 ? tile_unpack_proj_up(p.proj_up) : p.proj_up;
    int64_t radd = 0;
    for (const auto& d : ds) radd += d.down.size(0);
    const int64_t R0 = p.R, R1 = (R0 + radd + kRankTile - 1) / kRankTile * kRankTile;
    Tensor down = Tensor::zeros(dt, {L.K, R1}), up = Tensor::zeros(up_nat.dtype(), {L.N, R1});
    uint16_t* pd = down.mutable_data<uint16_t>();
    uint16_t* pu = up.mutable_data<uint16_t>();
    for (int64_t k = 0; k < L.K; ++k)
      std::memcpy(pd + k * R1, p.proj_down.data<uint16_t>() + k * R0, size_t(R0) * 2);
    for (int64_t n = 0; n < L.N; ++n) std::memcpy(pu + n * R1, up_nat.data<uint16_t>() + n * R0, size_t(R0) * 2);
    int64_t c = R0;
    for (const auto& d : ds) {
      const int64_t r = d.down.size(0);
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t k = 0; k < L.K; ++k) pd[k * R1 + c + j] = enc(dt, d.scale * d.down.data<float>()[j * L.K + k]);
        for (int64_t n = 0; n < L.N; ++n) pu[n * R1 + c + j] = enc(up_nat.dtype(), d.up.data<float>()[n * r + j]);
      }
      c += r;
    }
    out.params["proj_down"] = down;
    out.params["proj_up"] = p.proj_up.dim() == 3 ? tile_pack_proj_up(up) : up;
    out.rank = R1;
    st.svdquant_layers = 1;
    st.max_rank_before = R0;
    st.max_rank_after = R1;
    validate(svdquant_params(out), L.name);
  } else if (L.format && L.format->fused == FusedKernel::AwqW4A16) {
    AwqW4A16Params p = awq_params(L);
    Tensor W = effective_weight(p);
    std::vector<float> dw = delta_weight(L, ds);
    float* w = W.mutable_data<float>();
    for (size_t i = 0; i < dw.size(); ++i) w[i] += dw[i];
    AwqQuantOptions o;
    o.group_size = p.group_size;
    o.scale_dtype = p.wscales.dtype();
    AwqW4A16Params q = quantize_awq_w4a16(W, p.bias, o);
    // The bias is unchanged (the quantizer re-stores it in the scale dtype: keep the original bytes).
    Tensor We = effective_weight(q);
    double e2 = 0, d2 = 0, w2 = 0;
    for (size_t i = 0; i < dw.size(); ++i) {
      const double e = double(We.data<float>()[i]) - w[i];
      e2 += e * e;
      d2 += double(dw[i]) * dw[i];
      w2 += double(w[i]) * w[i];
    }
    st.awq_max_rel_error = w2 > 0 ? std::sqrt(e2 / w2) : 0;
    st.awq_max_rel_delta = d2 > 0 ? std::sqrt(e2 / d2) : 0;
    out.params["weight"] = q.qweight;
    out.params["weight_scale"] = q.wscales;
    out.params["weight_zeros"] = q.wzeros;
    st.awq_layers = 1;
  } else if (!L.format) {
    const Tensor& W0 = L.param("weight");
    std::vector<float> dw = delta_weight(L, ds);
    Tensor W = W0.to_f32().clone();
    float* w = W.mutable_data<float>();
    for (size_t i = 0; i < dw.size(); ++i) w[i] += dw[i];
    out.params["weight"] = W0.dtype() == DType::F32 ? W : W.to(W0.dtype());
    st.float_layers = 1;
  } else {
    throw Error(fmt::format("layer '{}': LoRA on format {} is not supported (supported: svdquant_w4a4, awq_w4a16, float layers)",
                            L.name, L.format->name));
  }
  if (stats) stats->merge(st);
  return out;
}

LoraApplyStats apply_loras_to_checkpoint(const std::string& in, const std::vector<LoraSpec>& loras, const std::string& out,
                                         bool partial, std::vector<std::string>* unmatched) {
  Checkpoint ck = Checkpoint::open(in);
  std::vector<LayerSource> srcs = collect_layers(ck);
  std::string prefix;
  for (const auto& n : ck.names())
    if (n.rfind("model.diffusion_model.", 0) == 0) { prefix = "model.diffusion_model."; break; }
  auto strip = [&](const std::string& n) { return !prefix.empty() && n.rfind(prefix, 0) == 0 ? n.substr(prefix.size()) : n; };
  std::vector<std::string> names;
  for (const auto& s : srcs) names.push_back(strip(s.name));
  LoraMatch mt = match_loras(loras, names, partial);
  if (unmatched) *unmatched = mt.unmatched;
  // Matched layers: their keys (source spellings) and, for the header, the shapes after the LoRA
  // (svdquant: the branch grows to R1; awq / float keep their shapes). The new tensors are made
  // when the writer reaches the layer's first key and dropped once written (one layer in memory).
  struct Pending {
    const LayerSource* src;
    const std::vector<LoraDelta>* deltas;
  };
  std::map<std::string, Pending> layer_of_key;   // source key → its layer
  std::map<std::string, Shape> new_shape;        // source key → shape after the LoRA
  auto key_of = [](const LayerSource& s, const QuantizedLayer& b, const std::string& canon) {
    std::string suffix = canon;
    if (b.format)
      for (const ParamSpec& ps : b.format->params)
        if (ps.canonical == canon)
          for (const auto& sp : ps.spellings)
            if (s.tensors.count(sp)) suffix = sp;
    return s.name + "." + suffix;
  };
  for (const auto& s : srcs) {
    auto it = mt.layers.find(strip(s.name));
    if (it == mt.layers.end()) continue;
    QuantizedLayer b = bind_layer(s);
    for (const auto& d : it->second) check_delta_shapes(b, d);
    for (const auto& [canon, t] : b.params) layer_of_key[key_of(s, b, canon)] = {&s, &it->second};
    if (b.format && b.format->fused == FusedKernel::SvdquantW4A4) {
      int64_t radd = 0;
      for (const auto& d : it->second) radd += d.down.size(0);
      const int64_t R1 = (b.rank + radd + kRankTile - 1) / kRankTile * kRankTile;
      new_shape[key_of(s, b, "proj_down")] = {b.K, R1};
      const Tensor& pu = b.param("proj_up");
      new_shape[key_of(s, b, "proj_up")] = pu.dim() == 3 ? Shape{pu.size(0), R1, pu.size(2)} : Shape{b.N, R1};
    }
  }
  LoraApplyStats st;
  SafetensorsWriter w(out, ck.metadata());
  for (const auto& n : ck.names()) {
    auto it = new_shape.find(n);
    w.add(n, ck.info(n).dtype, it != new_shape.end() ? it->second : ck.info(n).shape);
  }
  std::map<std::string, Tensor> ready;  // new tensors of the layer being written
  for (const auto& n : ck.names()) {
    auto lk = layer_of_key.find(n);
    if (lk == layer_of_key.end()) {
      w.write_tensor(n, ck.get(n));
      continue;
    }
    if (!ready.count(n)) {
      const LayerSource& s = *lk->second.src;
      QuantizedLayer b = bind_layer(s);
      QuantizedLayer a = apply_lora(b, *lk->second.deltas, &st);
      for (const auto& [canon, t] : a.params) ready[key_of(s, b, canon)] = t;
    }
    w.write_tensor(n, ready.at(n));
    ready.erase(n);
  }
  w.commit();
  return st;
}

}  // namespace nibble
