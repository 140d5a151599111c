// convert_plan.cpp — stage 1 of the converter: which layers become which format.
//
// Linear layers are found structurally: a 2-D float `P.weight` used as x·Wᵀ (with, optionally, a
// `P.bias` of N). Never linear: 1-D tensors (norms, biases), ≥ 3-D tensors (convolutions,
// parameters), lookup tables (embedding names; a head tied to one), GPT-2 Conv1D (stored x·W).
// Each linear layer (or, with --allow-requantize, a quantized one) is matched against exclude
// regexes, then rules (first match wins), then the preset. Layers that read the same input and all
// go to svdquant with the same options form one job (shared smooth and proj_down, spec §3.8): by
// the name families of common architectures, or by --share. Every mistake that would otherwise be
// silent is an error here (a rule, exclude or preset matching nothing; calibration statistics
// matching no layer; act_unsigned on inputs the calibration shows negative) or a warning in the
// plan. Output tensors (names, dtypes, shapes) follow from the plan alone, so the whole header is
// known before any math runs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "convert_internal.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble {
using namespace convert_detail;

// ====================================================================== rules
ConvertRule parse_convert_rule(const std::string& text) {
  const auto eq = text.rfind('=');
  // The format part has no '=' except inside the options; split at the first '=' that is followed
  // by a known format name.
  ConvertRule r;
  size_t split = std::string::npos;
  for (size_t p = text.find('='); p != std::string::npos; p = text.find('=', p + 1)) {
    const std::string rest = text.substr(p + 1);
    for (const char* f : {"awq_w4a16", "svdquant_w4a4", "keep"})
      if (rest.rfind(f, 0) == 0 && (rest.size() == strlen(f) || rest[strlen(f)] == ':')) { split = p; break; }
    if (split != std::string::npos) break;
  }
  (void)eq;
  if (split == std::string::npos || split == 0)
    throw Error(fmt::format("--tensor-type '{}': expected REGEX=FORMAT[:opt=v,...] with FORMAT one of awq_w4a16, "
                            "svdquant_w4a4, keep", text));
  r.pattern = text.substr(0, split);
  std::string rest = text.substr(split + 1);
  const auto colon = rest.find(':');
  r.format = rest.substr(0, colon);
  make_regex(r.pattern, fmt::format("--tensor-type '{}'", text));
  if (colon != std::string::npos) {
    std::string opts = rest.substr(colon + 1);
    size_t pos = 0;
    while (pos <= opts.size()) {
      const size_t comma = opts.find(',', pos);
      const std::string kv = opts.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
      const auto e = kv.find('=');
      if (e == std::string::npos || !kRuleOpts.count(kv.substr(0, e)))
        throw Error(fmt::format("--tensor-type '{}': option '{}' must be one of group_size, rank, act_unsigned, "
                                "layout, svd, refine as name=value", text, kv));
      r.opts[kv.substr(0, e)] = kv.substr(e + 1);
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  }
  return r;
}

std::vector<std::string> preset_names() { return {"qwen-image", "flux", "wan"}; }

std::vector<ConvertRule> preset_rules(const std::string& preset) {
  if (preset.empty()) return {};
  if (preset == "qwen-image" || preset == "qwen-image-edit") {
    return {
        {R"((^|\.)(img_mod|txt_mod)\.1$)", "awq_w4a16", {{"group_size", "64"}}},
        {R"((^|\.)(img_mlp|txt_mlp)\.net\.2$)", "svdquant_w4a4", {{"act_unsigned", "1"}}},
        {R"((^|\.)(img_mlp|txt_mlp)\.net\.0\.proj$)", "svdquant_w4a4", {}},
        {R"((^|\.)attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$)", "svdquant_w4a4", {}},
    };
  }
  // FLUX.1 dev / schnell, ComfyUI names (comfy/ldm/flux/model.py, layers.py): double blocks with
  // fused qkv, proj, a GELU(tanh) MLP (mlp.0 → GELU → mlp.2, so mlp.2 reads post-GELU input) and
  // modulation linears; single blocks with linear1 (qkv + MLP in) and linear2, whose input is the
  // attention output concatenated with the post-GELU MLP — signed, so not act_unsigned.
  if (preset == "flux") {
    return {
        {R"((^|\.)double_blocks\.\d+\.(img_mod|txt_mod)\.lin$)", "awq_w4a16", {{"group_size", "64"}}},
        {R"((^|\.)single_blocks\.\d+\.modulation\.lin$)", "awq_w4a16", {{"group_size", "64"}}},
        {R"((^|\.)double_blocks\.\d+\.(img_mlp|txt_mlp)\.2$)", "svdquant_w4a4", {{"act_unsigned", "1"}}},
        {R"((^|\.)double_blocks\.\d+\.(img_mlp|txt_mlp)\.0$)", "svdquant_w4a4", {}},
        {R"((^|\.)double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)$)", "svdquant_w4a4", {}},
        {R"((^|\.)single_blocks\.\d+\.(linear1|linear2)$)", "svdquant_w4a4", {}},
    };
  }
  // Wan 2.1 / 2.2 DiT, ComfyUI names (comfy/ldm/wan/model.py): self_attn q/k/v/o, cross_attn
  // q/k/v/o (+ k_img/v_img in i2v), ffn.0 → GELU(tanh) → ffn.2.
  if (preset == "wan") {
    return {
        {R"((^|\.)blocks\.\d+\.ffn\.2$)", "svdquant_w4a4", {{"act_unsigned", "1"}}},
        {R"((^|\.)blocks\.\d+\.ffn\.0$)", "svdquant_w4a4", {}},
        {R"((^|\.)blocks\.\d+\.self_attn\.(q|k|v|o)$)", "svdquant_w4a4", {}},
        {R"((^|\.)blocks\.\d+\.cross_attn\.(q|k|v|o|k_img|v_img)$)", "svdquant_w4a4", {}},
    };
  }
  throw Error(fmt::format("unknown preset '{}' (supported: qwen-image, flux, wan)", preset));
}

// ====================================================================== planning
namespace {

std::string last_component(const std::string& name) {
  const auto d = name.rfind('.');
  return d == std::string::npos ? name : name.substr(d + 1);
}
std::string parent_of(const std::string& name) {
  const auto d = name.rfind('.');
  return d == std::string::npos ? "" : name.substr(0, d);
}

// Lookup tables: the layer's last name component is one of the usual embedding names.
bool is_embedding_name(const std::string& layer) {
  static const std::set<std::string> names = {
      "embed", "embedding", "embeddings", "wte", "wpe", "word_embeddings", "position_embeddings",
      "token_type_embeddings", "pos_embed", "pos_embedding", "position_embedding", "token_embedding",
      "embed_tokens", "tok_embeddings", "embed_positions", "shared", "relative_attention_bias"};
  return names.count(last_component(layer)) > 0;
}

struct Found {
  std::vector<LayerInfo> layers;
  std::vector<SkippedTensor> skipped;
  std::map<std::string, std::string> skipped_layer;  // layer-like prefix → reason (for rule messages)
};

Found find_layers(const Checkpoint& ck) {
  Found found;
  std::map<std::string, LayerInfo> layers;
  std::set<std::string> quantized;
  const auto qlayers = collect_layers(ck, /*configs_only=*/true);
  for (const auto& l : qlayers) quantized.insert(l.name);
  std::vector<std::pair<std::string, Shape>> tables;  // embedding tables (for tied heads)
  auto skip = [&](const std::string& tensor, const std::string& layer, const std::string& why) {
    found.skipped.push_back({tensor, why});
    found.skipped_layer[layer] = why;
  };
  for (const auto& name : ck.names()) {
    const TensorInfo& ti = ck.info(name);
    const bool is_weight = ends_with(name, ".weight");
    const std::string p = is_weight ? name.substr(0, name.size() - 7) : name;
    if (is_weight && quantized.count(p)) continue;
    if (!is_weight) {
      if (ends_with(name, ".in_proj_weight") && ti.shape.size() == 2 && ti.shape[0] == 3 * ti.shape[1] && is_float(ti.dtype)) {
        // torch.nn.MultiheadAttention's fused q/k/v (3E, E): it is not an nn.Linear, so no quantized
        // ComfyUI op reads it; ComfyUI's SAM3 loader splits the float tensor into q/k/v_proj itself.
        skip(name, name.substr(0, name.size() - 7),  // "P.in_proj": what a rule would name
             "nn.MultiheadAttention fused q/k/v (in_proj_weight, 3E×E): not an nn.Linear, no ComfyUI loader reads it "
             "quantized (SAM3 splits the float tensor into q/k/v_proj at load)");
        continue;
      }
      if (ti.shape.size() >= 2 && is_float(ti.dtype))
        skip(name, p, fmt::format("{}-D parameter, not a layer weight", ti.shape.size()));
      continue;
    }
    if (!is_float(ti.dtype) || dtype_size(ti.dtype) == 0 || ti.dtype == DType::F8_E4M3 || ti.dtype == DType::F8_E5M2) {
      skip(name, p, fmt::format("{} weight without a quantization config", dtype_name(ti.dtype)));
      continue;
    }
    if (ti.shape.size() == 1) { skip(name, p, "1-D (norm scale)"); continue; }
    if (ti.shape.size() != 2) { skip(name, p, fmt::format("{}-D (convolution)", ti.shape.size())); continue; }
    if (is_embedding_name(p)) {
      skip(name, p, "embedding table (lookup, not x·Wᵀ)");
      tables.emplace_back(p, ti.shape);
      continue;
    }
    const std::string lc = last_component(p);
    if ((lc == "c_attn" || lc == "c_fc" || lc == "c_proj") && ck.contains(p + ".bias") &&
        ck.info(p + ".bias").shape == Shape{ti.shape[1]} && ti.shape[0] != ti.shape[1]) {
      skip(name, p, "GPT-2 Conv1D (stored transposed, used as x·W)");
      continue;
    }
    LayerInfo li;
    li.name = p;
    li.N = ti.shape[0];
    li.K = ti.shape[1];
    li.dtype = ti.dtype;
    li.keys.push_back(name);
    if (ck.contains(p + ".bias")) {
      const TensorInfo& bi = ck.info(p + ".bias");
      if (bi.shape == Shape{li.N} && is_float(bi.dtype)) { li.has_bias = true; li.keys.push_back(p + ".bias"); }
    }
    layers[p] = li;
  }
  // A head tied to a lookup table (lm_head / cls.predictions.decoder with the table's shape).
  for (const auto& [tname, tshape] : tables)
    for (auto it = layers.begin(); it != layers.end();) {
      const std::string lc = last_component(it->first);
      if ((lc == "lm_head" || lc == "decoder") && Shape{it->second.N, it->second.K} == tshape) {
        skip(it->first + ".weight", it->first, "tied to the embedding table " + tname);
        it = layers.erase(it);
      } else {
        ++it;
      }
    }
  for (const auto& l : qlayers) {
    LayerInfo li;
    li.name = l.name;
    li.quantized = true;
    li.qformat = l.config ? l.config->format : "";
    for (const auto& [suffix, t] : l.tensors) {
      const std::string key = l.name + "." + suffix;
      if (ck.contains(key)) li.keys.push_back(key);
    }
    if (ck.contains(l.name + ".comfy_quant")) li.keys.push_back(l.name + ".comfy_quant");
    try {  // shapes for --allow-requantize; an unbindable layer is only an error if a rule picks it
      QuantizedLayer ql = bind_layer(l);
      li.N = ql.N;
      li.K = ql.K;
      li.has_bias = ql.bias.defined();
    } catch (const Error&) {
    }
    layers[l.name] = li;
  }
  for (auto& [k, v] : layers) found.layers.push_back(std::move(v));
  return found;
}

// Layers of the structural pooler / classifier family: matched only by a rule that names them.
bool is_pooler(const std::string& layer) {
  return layer.find("pooler") != std::string::npos;
}

// Shared-input families: layers of the same parent module that read the same input. Returns the
// group key ("" = none) and the member's position in the family.
std::pair<std::string, int> share_family(const std::string& layer) {
  const std::string lc = last_component(layer), parent = parent_of(layer), pl = last_component(parent);
  const bool cross = pl.find("cross") != std::string::npos || pl == "attn2" || pl == "EncDecAttention";
  using Fam = std::vector<std::string>;
  static const std::vector<Fam> self_fams = {
      {"to_q", "to_k", "to_v"},                 // Qwen-Image, diffusers FLUX / SD3 (joint attention)
      {"add_q_proj", "add_k_proj", "add_v_proj"},
      {"q", "k", "v"},                          // Wan self_attn, T5 SelfAttention
      {"query", "key", "value"},                // BERT / ViT
      {"q_proj", "k_proj", "v_proj"},           // LLaMA, CLIP
      {"gate_proj", "up_proj"},                 // LLaMA-style gated MLP
      {"w1", "w3"},                             // LLaMA reference names
  };
  static const std::vector<Fam> cross_fams = {  // queries read the other stream
      {"to_k", "to_v"}, {"k", "v"}, {"k_img", "v_img"}, {"key", "value"}, {"k_proj", "v_proj"}};
  const auto& fams = cross ? cross_fams : self_fams;
  for (size_t f = 0; f < fams.size(); ++f)
    for (size_t i = 0; i < fams[f].size(); ++i)
      if (lc == fams[f][i]) return {fmt::format("{}.{{{}}}", parent, f + (cross ? 100 : 0)), int(i)};
  return {"", 0};
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Up to `n` layer names nearest to `name` (edit distance).
std::vector<std::string> near_names(const std::string& name, const std::vector<LayerInfo>& layers, size_t n) {
  std::vector<std::pair<size_t, std::string>> d;
  for (const auto& l : layers) d.emplace_back(edit_distance(name, l.name), l.name);
  std::sort(d.begin(), d.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < d.size() && i < n; ++i) out.push_back(d[i].second);
  return out;
}

std::string join(const std::vector<std::string>& v, size_t max_items = 5, const char* sep = ", ") {
  std::string s;
  for (size_t i = 0; i < v.size() && i < max_items; ++i) s += (i ? sep : "") + v[i];
  if (v.size() > max_items) s += fmt::format("{}… ({} in all)", sep, v.size());
  return s;
}

std::string rule_text(const ConvertRule& r) {
  std::string s = r.pattern + "=" + r.format;
  std::string o;
  for (const auto& [k, v] : r.opts) o += (o.empty() ? ":" : ",") + k + "=" + v;
  return s + o;
}

std::vector<std::pair<std::string, std::pair<DType, Shape>>> planned_tensors(const std::string& format, int64_t N,
                                                                             int64_t K, int64_t R, int64_t G,
                                                                             bool tile, bool bias) {
  std::vector<std::pair<std::string, std::pair<DType, Shape>>> t;
  if (format == "awq_w4a16") {
    t = {{"weight", {DType::I8, {N, K / 2}}}, {"weight_scale", {kStoreDtype, {K / G, N}}}, {"weight_zeros", {kStoreDtype, {K / G, N}}}};
  } else {
    t = {{"weight", {DType::I8, tile ? Shape{N / 128, K / 64, 32, 128} : Shape{N, K / 2}}},
         {"weight_scale", {kStoreDtype, tile ? Shape{N / 128, K / 64, 128} : Shape{K / 64, N}}},
         {"smooth_factor", {kStoreDtype, {K}}},
         {"proj_down", {kStoreDtype, {K, R}}},
         {"proj_up", {kStoreDtype, tile ? Shape{N / 128, R, 128} : Shape{N, R}}}};
  }
  if (bias) t.push_back({"bias", {kStoreDtype, {N}}});
  return t;
}


float min_of(const ActStats& s, int64_t* below = nullptr, int64_t* total = nullptr) {
  float m = std::numeric_limits<float>::infinity();
  if (s.min.defined())
    for (int64_t k = 0; k < s.min.numel(); ++k) m = std::min(m, s.min.data<float>()[k]);
  if (s.sample.defined()) {
    int64_t b = 0;
    for (int64_t i = 0; i < s.sample.numel(); ++i) {
      const float v = s.sample.data<float>()[i];
      if (!s.min.defined()) m = std::min(m, v);
      if (v < -kSvdquantUnsignedShift) ++b;
    }
    if (below) *below = b;
    if (total) *total = s.sample.numel();
  }
  return m;
}

}  // namespace

FullPlan convert_detail::make_plan(const Checkpoint& ck, const ConvertOptions& o) {
  FullPlan fp;
  fp.metadata = ck.metadata();
  ConvertPlan& S = fp.summary;
  // Rules: the user's (first), then the preset's; each remembers where it came from.
  std::vector<ConvertRule> rules = o.rules;
  std::vector<std::string> origin;
  for (const auto& r : o.rules) origin.push_back(fmt::format("--tensor-type '{}'", rule_text(r)));
  const size_t n_user = rules.size();
  for (auto& r : preset_rules(o.preset)) {
    rules.push_back(r);
    origin.push_back(fmt::format("preset {} '{}'", o.preset, rule_text(r)));
  }
  std::vector<std::regex> rule_re, excl_re, share_re;
  for (size_t i = 0; i < rules.size(); ++i) {
    const auto& r = rules[i];
    if (r.format != "awq_w4a16" && r.format != "svdquant_w4a4" && r.format != "keep")
      throw Error(fmt::format("rule '{}={}': unknown format (supported: awq_w4a16, svdquant_w4a4, keep)", r.pattern, r.format));
    rule_re.push_back(make_regex(r.pattern, origin[i]));
  }
  for (const auto& e : o.exclude) excl_re.push_back(make_regex(e, "--exclude '" + e + "'"));
  for (const auto& e : o.share) share_re.push_back(make_regex(e, "--share '" + e + "'"));

  if (o.search != "full" && o.search != "legacy")
    throw Error(fmt::format("search must be full or legacy, got '{}'", o.search));
  Found found = find_layers(ck);
  const auto& layers = found.layers;
  S.skipped = found.skipped;
  S.linear_layers = layers.size();
  std::map<std::string, const LayerInfo*> by_name;
  struct Target {
    std::string format;
    std::map<std::string, std::string> opts;
    size_t rule = 0;
  };
  std::map<std::string, Target> target;
  std::vector<int64_t> rule_first(rules.size(), 0), rule_any(rules.size(), 0), excl_hits(excl_re.size(), 0);
  for (const auto& l : layers) {
    by_name[l.name] = &l;
    bool excluded = false;
    for (size_t e = 0; e < excl_re.size(); ++e)
      if (std::regex_search(l.name, excl_re[e])) { excluded = true; ++excl_hits[e]; }
    bool taken = excluded;
    for (size_t i = 0; i < rules.size(); ++i) {
      if (!std::regex_search(l.name, rule_re[i])) continue;
      // The pooler / classifier head is left alone unless a rule names it.
      if (is_pooler(l.name) && rules[i].pattern.find("pooler") == std::string::npos) continue;
      ++rule_any[i];
      if (taken) continue;
      taken = true;
      ++rule_first[i];
      if (rules[i].format == "keep") continue;  // (later rules are still counted, for the messages)
      if (l.quantized && !o.allow_requantize)
        throw Error(fmt::format("layer {} is already quantized ({}); refusing to requantize it to {} "
                                "(pass --allow-requantize, or --exclude it)", l.name, l.qformat, rules[i].format));
      if (l.quantized && l.N == 0)
        throw Error(fmt::format("layer {}: cannot requantize: the {} layer does not validate", l.name, l.qformat));
      target[l.name] = {rules[i].format, rules[i].opts, i};
    }
  }
  // ---- loud, not silent: rules / excludes / preset that match nothing
  std::vector<std::string> examples;
  for (size_t i = 0; i < layers.size() && i < 4; ++i) examples.push_back(layers[i * layers.size() / 4].name);
  auto why_nothing = [&](const std::regex& re, int64_t any) {
    if (any > 0) return fmt::format(" (the {} linear layers it matches are all taken by an earlier rule or --exclude)", any);
    std::vector<std::string> sk;
    for (const auto& [layer, why] : found.skipped_layer)
      if (std::regex_search(layer, re)) sk.push_back(layer + " (" + why + ")");
    if (!sk.empty()) return " (it matches only tensors that are not linear layers: " + join(sk, 3) + ")";
    return layers.empty() ? std::string(" (the checkpoint has no linear layers)")
                          : " (linear layers here are named like: " + join(examples, 4) + ")";
  };
  for (size_t i = 0; i < n_user; ++i)
    if (rule_first[i] == 0)
      throw Error(fmt::format("{} matches no linear layer of {}{}", origin[i], ck.path(), why_nothing(rule_re[i], rule_any[i])));
  for (size_t e = 0; e < excl_re.size(); ++e)
    if (excl_hits[e] == 0)
      throw Error(fmt::format("--exclude '{}' matches no linear layer of {}{}", o.exclude[e], ck.path(),
                              why_nothing(excl_re[e], 0)));
  if (!o.preset.empty()) {
    int64_t hits = 0;
    for (size_t i = n_user; i < rules.size(); ++i) hits += rule_any[i];
    if (hits == 0) {
      std::string hint;
      int64_t best_n = 0;
      const std::string best = detect_preset(ck, &best_n);
      if (!best.empty() && best != o.preset) hint = fmt::format("; --preset {} would quantize {} layers", best, best_n);
      throw Error(fmt::format("preset '{}' matches no linear layer of {} (linear layers here are named like: {}){}",
                              o.preset, ck.path(), join(examples, 4), hint));
    }
    for (size_t i = n_user; i < rules.size(); ++i)
      if (rule_first[i] == 0) S.notes.push_back(fmt::format("{} matched no layer", origin[i]));
  }

  // Validate shapes.
  auto resolved_of = [&](const std::string& n) { return resolve(target[n].opts, o, n); };
  for (auto& [name, ft] : target) {
    const LayerInfo& l = *by_name[name];
    const Resolved r = resolved_of(name);
    if (ft.format == "awq_w4a16") {
      if (r.group_size <= 0 || r.group_size % 2 || l.K % r.group_size)
        throw Error(fmt::format("layer {}: awq_w4a16 needs K ({}) divisible by an even group_size ({})", name, l.K, r.group_size));
    } else {
      if (l.K % 64) throw Error(fmt::format("layer {}: svdquant_w4a4 needs K ({}) % 64 == 0 (picked by {})", name, l.K, origin[ft.rule]));
      if (r.tile && l.N % 128) throw Error(fmt::format("layer {}: tile layout needs N ({}) % 128 == 0", name, l.N));
      if (r.rank < 0) throw Error(fmt::format("layer {}: rank must be ≥ 0", name));
    }
  }
  S.kept_layers = layers.size() - target.size();

  // ---- jobs: layers sharing their input (--share regexes first, then the name families)
  std::map<std::string, std::vector<std::pair<int, std::string>>> share_groups;
  std::map<std::string, std::string> share_key;
  for (auto& [name, ft] : target) {
    if (ft.format != "svdquant_w4a4") continue;
    std::string key;
    int pos = 0;
    for (size_t e = 0; e < share_re.size() && key.empty(); ++e) {
      std::smatch m;
      if (std::regex_search(name, m, share_re[e]))
        key = fmt::format("share{}:{}*{}", e, m.prefix().str(), m.suffix().str()), pos = int(m.position(0));
    }
    if (key.empty()) std::tie(key, pos) = share_family(name);
    if (key.empty()) continue;
    share_key[name] = key;
    share_groups[key].emplace_back(pos, name);
  }
  std::set<std::string> grouped;
  std::map<std::string, int64_t> job_of;
  for (auto& [name, ft] : target) {
    if (job_of.count(name)) continue;
    Job job;
    job.format = ft.format;
    job.opts = ft.opts;
    job.members = {name};
    if (auto sk = share_key.find(name); sk != share_key.end()) {
      auto g = share_groups[sk->second];
      std::sort(g.begin(), g.end());
      std::vector<std::string> m;
      for (const auto& [pos, n] : g)
        if (target[n].opts == ft.opts && by_name[n]->K == by_name[name]->K && !job_of.count(n)) m.push_back(n);
      if (m.size() > 1) job.members = m;
    }
    int64_t ntot = 0;
    const int64_t K = by_name[name]->K;
    for (const auto& m : job.members) { job_of[m] = int64_t(fp.jobs.size()); ntot += by_name[m]->N; }
    // Working set: the fp32 weights, the stacked smoothed copy, the SVD target and a residual buffer.
    job.mem_estimate = uint64_t(ntot) * uint64_t(K) * 4 * (job.format == "awq_w4a16" ? 2 : 5) + (64u << 20);
    if (o.gptq) job.mem_estimate += uint64_t(K) * uint64_t(K) * (3 * 8 + 4);  // H, its factors (double), GPTQ's U
    fp.jobs.push_back(std::move(job));
  }

  // ---- calibration: every statistic must belong to a layer; every quantized layer should have some
  if (o.gptq && o.calib_path.empty())
    throw Error("--gptq needs --calib with sample rows (GPTQ's Hessian XᵀX comes from the calibration sample)");
  if (!o.calib_path.empty()) {
    fp.calib = load_calib_stats(o.calib_path);
    std::set<std::string> used;
    std::vector<std::string> orphans;
    for (const auto& [k, st] : fp.calib) {
      bool found_layer = false;
      for (const auto& l : layers)
        if (l.name == k || ends_with(l.name, "." + k) || ends_with(k, "." + l.name)) { found_layer = true; break; }
      if (!found_layer) orphans.push_back(k);
    }
    if (!orphans.empty()) {
      std::string detail;
      for (size_t i = 0; i < orphans.size() && i < 3; ++i)
        detail += fmt::format("\n  {} — nearest layers: {}", orphans[i], join(near_names(orphans[i], layers, 3), 3));
      const std::string msg = fmt::format("{}: {} of {} calibration entries match no linear layer of {}:{}{}",
                                          o.calib_path, orphans.size(), fp.calib.size(), ck.path(), detail,
                                          orphans.size() > 3 ? fmt::format("\n  … and {} more", orphans.size() - 3) : "");
      if (orphans.size() == fp.calib.size() || o.strict) throw Error(msg);
      S.warnings.push_back(msg);
    }
    std::vector<std::string> uncalibrated;
    for (auto& job : fp.jobs) {
      for (const auto& m : job.members) {  // members share the input: any member's statistics serve
        job.calib_key = find_stats_key(fp.calib, m);
        if (!job.calib_key.empty()) break;
      }
      if (job.calib_key.empty()) {
        for (const auto& m : job.members) uncalibrated.push_back(m);
        continue;
      }
      const ActStats& st = fp.calib.at(job.calib_key);
      const int64_t K = by_name[job.members.front()]->K;
      for (const Tensor* t : {&st.max_abs, &st.mean_abs, &st.mean_sq, &st.min, &st.max, &st.sample})
        if (t->defined() && t->size(-1) != K)
          throw Error(fmt::format("{}: the statistics {} have {} input channels, but layer {} has K = {}", o.calib_path,
                                  job.calib_key, t->size(-1), job.members.front(), K));
    }
    if (o.gptq) {  // GPTQ needs the sample rows (its Hessian XᵀX)
      std::vector<std::string> no_rows;
      for (const auto& job : fp.jobs)
        if (!job.calib_key.empty() && !fp.calib.at(job.calib_key).sample.defined())
          for (const auto& m : job.members) no_rows.push_back(m);
      if (!no_rows.empty()) {
        const std::string msg = fmt::format("--gptq: {} quantized layers have statistics without sample rows in {} "
                                            "and are rounded without GPTQ: {}", no_rows.size(), o.calib_path,
                                            join(no_rows, 8));
        if (o.strict) throw Error(msg + " (--strict)");
        S.warnings.push_back(msg);
      }
    }
    if (!uncalibrated.empty()) {
      const std::string msg = fmt::format("{} of {} quantized layers have no calibration statistics in {} and are "
                                          "converted weight-only: {}", uncalibrated.size(), target.size(),
                                          o.calib_path, join(uncalibrated, 8));
      if (o.strict) throw Error(msg + " (--strict)");
      S.warnings.push_back(msg);
    }
  }
  // ---- act_unsigned: only from an explicit rule or a preset; checked against the calibration
  for (auto& job : fp.jobs) {
    if (job.format != "svdquant_w4a4") continue;
    const Resolved r = resolve(job.opts, o, job.members.front());
    if (!r.act_unsigned) continue;
    const std::string from = origin[target[job.members.front()].rule];
    if (job.calib_key.empty()) {
      S.notes.push_back(fmt::format("{}: act_unsigned from {}, not checked (no calibration statistics)",
                                    join(job.members), from));
      continue;
    }
    const ActStats& st = fp.calib.at(job.calib_key);
    int64_t below = -1, total = 0;
    const float mn = min_of(st, &below, &total);
    if (std::isinf(mn)) {
      S.warnings.push_back(fmt::format("{}: act_unsigned from {} cannot be checked: the statistics {} have no min or "
                                       "sample", join(job.members), from, job.calib_key));
      continue;
    }
    if (mn < -kSvdquantUnsignedShift) {
      const std::string msg = fmt::format(
          "{}: act_unsigned (from {}) needs inputs ≥ −0.171875, but the calibration minimum is {:.4g}{}; the "
          "unsigned int4 main path would clip them (use act_unsigned=0 for this layer{})",
          join(job.members), from, mn,
          below > 0 ? fmt::format(" and {:.1f} % of the sampled inputs are below −0.171875", 100.0 * double(below) / double(total)) : "",
          o.force ? "" : ", or --force");
      if (!o.force) throw Error(msg);
      S.warnings.push_back(msg + " (--force)");
    } else {
      S.notes.push_back(fmt::format("{}: act_unsigned from {}, checked: calibration minimum {:.4g}", join(job.members),
                                    from, mn));
    }
  }

  // Output order: input key order; a converted layer's tensors go where its first key was.
  std::set<std::string> emitted_layers;
  std::map<std::string, std::string> key_layer;
  for (const auto& [name, ft] : target)
    for (const auto& k : by_name[name]->keys) key_layer[k] = name;
  for (const auto& name : ck.names()) {
    auto kl = key_layer.find(name);
    const TensorInfo& ti = ck.info(name);
    S.bytes_in += ti.nbytes();
    if (kl == key_layer.end()) {
      fp.outputs.push_back({name, ti.dtype, ti.shape, -1, name, "", 0, ""});
      S.passthrough_tensors++;
      S.bytes_out += ti.nbytes();
      continue;
    }
    const std::string& layer = kl->second;
    if (emitted_layers.count(layer)) continue;
    emitted_layers.insert(layer);
    const LayerInfo& l = *by_name[layer];
    const int64_t j = job_of[layer];
    const Job& job = fp.jobs[size_t(j)];
    const int member = int(std::find(job.members.begin(), job.members.end(), layer) - job.members.begin());
    const Resolved r = resolved_of(layer);
    int64_t ntot = 0;
    for (const auto& m : job.members) ntot += by_name[m]->N;
    const int64_t R = std::max<int64_t>(0, std::min({r.rank, ntot, l.K}));
    const bool bias = l.has_bias || (job.format == "svdquant_w4a4" && r.act_unsigned);
    LayerPlan lp;
    lp.name = layer;
    lp.format = job.format;
    lp.N = l.N;
    lp.K = l.K;
    lp.source_dtype = l.quantized ? l.qformat : std::string(dtype_name(l.dtype));
    lp.opts = job.opts;
    if (job.members.size() > 1) lp.group = job.members;
    lp.rule = origin[target[layer].rule];
    lp.act_unsigned = job.format == "svdquant_w4a4" && r.act_unsigned;
    lp.calib_key = job.calib_key;
    for (const auto& k : l.keys) lp.bytes_before += ck.info(k).nbytes();
    for (const auto& [suffix, ds] : planned_tensors(job.format, l.N, l.K, R, r.group_size, r.tile, bias)) {
      OutTensor ot{layer + "." + suffix, ds.first, ds.second, j, "", suffix, member, ""};
      lp.bytes_after += uint64_t(shape_numel(ds.second)) * dtype_size(ds.first);
      fp.outputs.push_back(ot);
    }
    QuantConfig cfg;
    if (job.format == "awq_w4a16") {
      AwqQuantOptions ao;
      ao.group_size = r.group_size;
      cfg = awq_quant_config(ao);
    } else {
      SvdquantQuantOptions so;
      so.act_unsigned = r.act_unsigned;
      so.tile_layout = r.tile;
      cfg = svdquant_quant_config(so);
    }
    OutTensor cq{layer + ".comfy_quant", DType::U8, {int64_t(cfg.to_json().size())}, -1, "", "", 0, cfg.to_json()};
    lp.bytes_after += cfg.to_json().size();
    fp.outputs.push_back(cq);
    S.bytes_out += lp.bytes_after;
    S.layers.push_back(lp);
  }
  // Header-metadata configs (spec §4.1) of layers we re-wrote would contradict their new
  // P.comfy_quant tensors: drop those entries, keep the ones of layers passed through.
  if (auto it = fp.metadata.find("_quantization_metadata"); it != fp.metadata.end()) {
    try {
      auto j = nlohmann::ordered_json::parse(it->second);
      if (j.is_object() && j.contains("layers") && j["layers"].is_object()) {
        for (const auto& lp : S.layers) j["layers"].erase(lp.name);
        if (j["layers"].empty()) fp.metadata.erase(it);
        else it->second = j.dump();
      }
    } catch (const nlohmann::json::exception& e) {
      throw Error(fmt::format("{}: __metadata__[\"_quantization_metadata\"] is not valid JSON: {}", ck.path(), e.what()));
    }
  }
  apply_key_style(fp, o.key_style);
  S.tensors_total = fp.outputs.size();
  {
    SafetensorsWriter probe("/dev/null/unused", fp.metadata);  // only for the size computation
    for (const auto& ot : fp.outputs) probe.add(ot.name, ot.dtype, ot.shape);
    S.file_size = probe.planned_file_size();
  }
  return fp;
}


ConvertPlan plan_conversion(const std::string& in, const ConvertOptions& options) {
  Checkpoint ck = Checkpoint::open(in);
  return make_plan(ck, options).summary;
}

std::string detect_preset(const Checkpoint& ck, int64_t* n_layers) {
  const Found found = find_layers(ck);
  std::string best;
  int64_t best_n = 0;
  for (const auto& p : preset_names()) {
    std::vector<std::regex> re;
    auto rules = preset_rules(p);
    for (const auto& r : rules) re.emplace_back(r.pattern, std::regex::ECMAScript);
    int64_t n = 0;
    for (const auto& l : found.layers)
      for (size_t i = 0; i < re.size(); ++i)
        if (std::regex_search(l.name, re[i])) { n += rules[i].format != "keep"; break; }
    if (n > best_n) best_n = n, best = p;
  }
  if (n_layers) *n_layers = best_n;
  return best;
}

}  // namespace nibble
