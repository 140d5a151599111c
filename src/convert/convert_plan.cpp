// convert_plan.cpp — stage 1 of the converter: which layers become which format.
//
// Every `P.weight` that is a 2-D float tensor (or, with --allow-requantize, a quantized layer,
// requantized from its dequantized weight) is matched against exclude regexes, then rules (first
// match wins), then the preset. Layers that read the same input and all go to svdquant with the
// same options form one job (shared smooth and proj_down, spec §3.8). Output tensors (names,
// dtypes, shapes) follow from the plan alone, so the whole header is known before any math runs.
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
  throw Error(fmt::format("unknown preset '{}' (supported: qwen-image)", preset));
}

// ====================================================================== planning
namespace {

std::vector<LayerInfo> find_layers(const Checkpoint& ck) {
  std::map<std::string, LayerInfo> layers;
  std::set<std::string> quantized;
  for (const auto& l : collect_layers(ck, /*configs_only=*/true)) {
    quantized.insert(l.name);
  }
  for (const auto& name : ck.names()) {
    if (!ends_with(name, ".weight")) continue;
    const std::string p = name.substr(0, name.size() - 7);
    const TensorInfo& ti = ck.info(name);
    if (quantized.count(p)) continue;
    if (ti.shape.size() != 2 || !is_float(ti.dtype) || dtype_size(ti.dtype) == 0 || ti.dtype == DType::F8_E4M3 ||
        ti.dtype == DType::F8_E5M2)
      continue;
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
  for (const auto& l : collect_layers(ck, true)) {
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
  std::vector<LayerInfo> out;
  for (auto& [k, v] : layers) out.push_back(std::move(v));
  return out;
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

}  // namespace

FullPlan convert_detail::make_plan(const Checkpoint& ck, const ConvertOptions& o) {
  FullPlan fp;
  fp.metadata = ck.metadata();
  std::vector<ConvertRule> rules = o.rules;
  for (auto& r : preset_rules(o.preset)) rules.push_back(r);
  std::vector<std::regex> rule_re, excl_re;
  for (const auto& r : rules) {
    if (r.format != "awq_w4a16" && r.format != "svdquant_w4a4" && r.format != "keep")
      throw Error(fmt::format("rule '{}={}': unknown format (supported: awq_w4a16, svdquant_w4a4, keep)", r.pattern, r.format));
    rule_re.push_back(make_regex(r.pattern, "rule '" + r.pattern + "'"));
  }
  for (const auto& e : o.exclude) excl_re.push_back(make_regex(e, "--exclude"));

  const auto layers = find_layers(ck);
  std::map<std::string, const LayerInfo*> by_name;
  // layer → (format, opts)
  std::map<std::string, std::pair<std::string, std::map<std::string, std::string>>> target;
  for (const auto& l : layers) {
    by_name[l.name] = &l;
    bool excluded = false;
    for (const auto& re : excl_re) if (std::regex_search(l.name, re)) excluded = true;
    if (excluded) continue;
    for (size_t i = 0; i < rules.size(); ++i) {
      if (!std::regex_search(l.name, rule_re[i])) continue;
      if (rules[i].format == "keep") break;
      if (l.quantized && !o.allow_requantize)
        throw Error(fmt::format("layer {} is already quantized ({}); refusing to requantize it to {} "
                                "(pass --allow-requantize, or --exclude it)", l.name, l.qformat, rules[i].format));
      if (l.quantized && l.N == 0)
        throw Error(fmt::format("layer {}: cannot requantize: the {} layer does not validate", l.name, l.qformat));
      target[l.name] = {rules[i].format, rules[i].opts};
      break;
    }
  }
  // Validate shapes, then form jobs (q/k/v groups).
  std::set<std::string> grouped;
  std::map<std::string, int64_t> job_of;
  auto resolved_of = [&](const std::string& n) { return resolve(target[n].second, o, n); };
  for (auto& [name, ft] : target) {
    const LayerInfo& l = *by_name[name];
    const Resolved r = resolved_of(name);
    if (ft.first == "awq_w4a16") {
      if (r.group_size <= 0 || r.group_size % 2 || l.K % r.group_size)
        throw Error(fmt::format("layer {}: awq_w4a16 needs K ({}) divisible by an even group_size ({})", name, l.K, r.group_size));
    } else {
      if (l.K % 64) throw Error(fmt::format("layer {}: svdquant_w4a4 needs K ({}) % 64 == 0", name, l.K));
      if (r.tile && l.N % 128) throw Error(fmt::format("layer {}: tile layout needs N ({}) % 128 == 0", name, l.N));
      if (r.rank < 0) throw Error(fmt::format("layer {}: rank must be ≥ 0", name));
    }
  }
  for (auto& [name, ft] : target) {
    if (job_of.count(name)) continue;
    Job job;
    job.format = ft.first;
    job.opts = ft.second;
    job.members = {name};
    if (ft.first == "svdquant_w4a4") {
      // Whichever member of a q/k/v triple comes first forms the group, members in q, k, v order.
      static const std::vector<std::vector<std::string>> triples = {
          {"attn.to_q", "attn.to_k", "attn.to_v"}, {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}};
      for (const auto& tri : triples)
        for (const auto& t : tri) {
          if (!ends_with(name, t)) continue;
          const std::string base = name.substr(0, name.size() - t.size());
          std::vector<std::string> m = {base + tri[0], base + tri[1], base + tri[2]};
          bool ok = true;
          for (const auto& x : m) {
            auto it = target.find(x);
            if (it == target.end() || it->second.first != "svdquant_w4a4" || it->second.second != ft.second ||
                by_name[x]->K != by_name[name]->K || job_of.count(x))
              ok = false;
          }
          if (ok) job.members = m;
        }
    }
    int64_t ntot = 0;
    const int64_t K = by_name[name]->K;
    for (const auto& m : job.members) { job_of[m] = int64_t(fp.jobs.size()); ntot += by_name[m]->N; }
    // Working set: the fp32 weights, the stacked smoothed copy, the SVD target and a residual buffer.
    job.mem_estimate = uint64_t(ntot) * uint64_t(K) * 4 * (job.format == "awq_w4a16" ? 2 : 5) + (64u << 20);
    fp.jobs.push_back(std::move(job));
  }

  // Output order: input key order; a converted layer's tensors go where its first key was.
  std::set<std::string> consumed;
  std::set<std::string> emitted_layers;
  std::map<std::string, std::string> key_layer;
  for (const auto& [name, ft] : target)
    for (const auto& k : by_name[name]->keys) key_layer[k] = name;
  ConvertPlan& S = fp.summary;
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

}  // namespace nibble
