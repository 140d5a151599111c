// convert.cpp — the streaming checkpoint converter (nibble/convert.h).
//
// 1. Plan: every `P.weight` that is a 2-D float tensor (or, with --allow-requantize, a quantized
//    layer, requantized from its dequantized weight) is matched against exclude regexes, then rules (first match wins), then the
//    preset. q/k/v (and add_q/k/v) triples that all go to svdquant form one job (shared smooth and
//    proj_down, spec §3.8). Output tensors (names, dtypes, shapes) follow from the plan alone, so
//    the whole header is known before any math runs.
// 2. Execute: output tensors are written in order. When the next tensor belongs to a job not yet
//    run, a batch of upcoming jobs whose estimated working sets fit the memory budget runs on the
//    pool (one job per task, math single-threaded inside a task; a lone job uses the pool inside).
//    Job results are dropped as soon as their tensors are written. Passthrough tensors are copied
//    from the memory map. The writer is atomic: on any error nothing appears at OUT.
// The bytes depend only on input and options: jobs are pure functions, the batch split does not
// change any job's result.
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <cmath>
#include <fstream>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble {
namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

std::regex make_regex(const std::string& pattern, const std::string& what) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw Error(fmt::format("{}: invalid regular expression '{}': {}", what, pattern, e.what()));
  }
}

const std::set<std::string> kRuleOpts = {"group_size", "rank", "act_unsigned", "layout", "svd", "refine"};

bool parse_bool(const std::string& v, const std::string& what) {
  if (v == "1" || v == "true" || v == "yes") return true;
  if (v == "0" || v == "false" || v == "no") return false;
  throw Error(fmt::format("{}: expected a boolean (1/0/true/false), got '{}'", what, v));
}
int64_t parse_int(const std::string& v, const std::string& what) {
  try {
    size_t pos = 0;
    const long long x = std::stoll(v, &pos);
    if (pos != v.size()) throw std::invalid_argument("trailing");
    return x;
  } catch (const std::exception&) {
    throw Error(fmt::format("{}: expected an integer, got '{}'", what, v));
  }
}

uint64_t peak_rss_bytes() {
  struct rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return uint64_t(ru.ru_maxrss) * 1024;
}

// Drops the input pages of a tensor we are done with from this process's resident set (clean
// file-backed pages of the read-only mapping; a later access would just fault them in again).
// Without this, RSS grows to the whole input file however small the working set is.
void release_pages(const Tensor& t) {
  if (!t.defined() || t.writable() || t.nbytes() == 0) return;
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t b = (uintptr_t(t.raw()) + page - 1) / page * page, e = (uintptr_t(t.raw()) + t.nbytes()) / page * page;
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

// ---- planned output tensors
struct OutTensor {
  std::string name;
  DType dtype;
  Shape shape;
  int64_t job = -1;          // -1: passthrough of `source`
  std::string source;        // input tensor (passthrough)
  std::string key;           // job output key (e.g. "weight_scale") and `member` index
  int member = 0;
  std::string json;          // comfy_quant bytes (written from the plan)
};

struct Job {
  std::string format;                 // awq_w4a16 | svdquant_w4a4
  std::vector<std::string> members;   // layer prefixes
  std::map<std::string, std::string> opts;
  uint64_t mem_estimate = 0;
};

struct FullPlan {
  ConvertPlan summary;
  std::vector<OutTensor> outputs;
  std::vector<Job> jobs;
  std::map<std::string, std::string> metadata;
};

struct LayerInfo {
  std::string name;
  int64_t N = 0, K = 0;
  DType dtype = DType::F32;
  bool has_bias = false;
  bool quantized = false;             // has P.comfy_quant (or metadata config)
  std::string qformat;
  std::vector<std::string> keys;      // all input keys of the layer
};

// Resolve per-layer quantization options from the rule options and the global options.
struct Resolved {
  int64_t group_size, rank;
  bool act_unsigned, tile;
  SvdMethod svd;
  int refine;
};
Resolved resolve(const std::map<std::string, std::string>& o, const ConvertOptions& g, const std::string& layer) {
  Resolved r{g.group_size, g.rank, false, g.tile_layout, g.svd, g.refine_iterations};
  const std::string w = "layer " + layer;
  if (auto it = o.find("group_size"); it != o.end()) r.group_size = parse_int(it->second, w + " group_size");
  if (auto it = o.find("rank"); it != o.end()) r.rank = parse_int(it->second, w + " rank");
  if (auto it = o.find("act_unsigned"); it != o.end()) r.act_unsigned = parse_bool(it->second, w + " act_unsigned");
  if (auto it = o.find("refine"); it != o.end()) r.refine = int(parse_int(it->second, w + " refine"));
  if (auto it = o.find("layout"); it != o.end()) {
    if (it->second == "tile") r.tile = true;
    else if (it->second == "natural") r.tile = false;
    else throw Error(fmt::format("{}: layout must be natural or tile, got '{}'", w, it->second));
  }
  if (auto it = o.find("svd"); it != o.end()) {
    if (it->second == "exact") r.svd = SvdMethod::Exact;
    else if (it->second == "randomized") r.svd = SvdMethod::Randomized;
    else throw Error(fmt::format("{}: svd must be randomized or exact, got '{}'", w, it->second));
  }
  return r;
}

constexpr DType kStoreDtype = DType::BF16;

}  // namespace

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

FullPlan make_plan(const Checkpoint& ck, const ConvertOptions& o) {
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

}  // namespace

ConvertPlan plan_conversion(const std::string& in, const ConvertOptions& options) {
  Checkpoint ck = Checkpoint::open(in);
  return make_plan(ck, options).summary;
}

// ====================================================================== calibration file
std::map<std::string, ActStats> load_calib_stats(const std::string& path) {
  auto f = SafetensorsFile::open(path);
  std::map<std::string, ActStats> out;
  for (const auto& t : f->tensors()) {
    const auto dot = t.name.rfind('.');
    if (dot == std::string::npos) continue;
    const std::string layer = t.name.substr(0, dot), stat = t.name.substr(dot + 1);
    if (!is_float(t.dtype))
      throw Error(fmt::format("{}: calibration tensor {} must be float, got {}", path, t.name, dtype_name(t.dtype)));
    Tensor v = f->get(t.name).to(DType::F32);
    ActStats& s = out[layer];
    if (stat == "mean_abs" || stat == "max_abs" || stat == "mean_sq") {
      if (t.shape.size() != 1) throw Error(fmt::format("{}: {} must be 1-D (K), got {}", path, t.name, shape_str(t.shape)));
      (stat == "mean_abs" ? s.mean_abs : stat == "max_abs" ? s.max_abs : s.mean_sq) = v;
    } else if (stat == "sample") {
      if (t.shape.size() != 2) throw Error(fmt::format("{}: {} must be 2-D (M, K), got {}", path, t.name, shape_str(t.shape)));
      s.sample = v;
    } else {
      throw Error(fmt::format("{}: unknown statistic '{}' in {} (expected mean_abs, max_abs, mean_sq, sample)", path, stat, t.name));
    }
  }
  return out;
}

void CalibAccumulator::add(const std::string& layer, const Tensor& xin) {
  if (!xin.defined() || xin.dim() < 1 || !is_float(xin.dtype()))
    throw Error(fmt::format("calib: activations of {} must be a float tensor", layer));
  Tensor x = xin.to_f32();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  Acc& a = acc_[layer];
  if (a.sum_abs.empty()) { a.sum_abs.assign(size_t(K), 0.0); a.sum_sq.assign(size_t(K), 0.0); a.max_abs.assign(size_t(K), 0.f); }
  if (int64_t(a.sum_abs.size()) != K)
    throw Error(fmt::format("calib: {} had {} channels, now {}", layer, a.sum_abs.size(), K));
  const float* p = x.data<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float v = p[m * K + k];
      a.sum_abs[size_t(k)] += std::fabs(v);
      a.sum_sq[size_t(k)] += double(v) * v;
      a.max_abs[size_t(k)] = std::max(a.max_abs[size_t(k)], std::fabs(v));
    }
    if (a.sample_rows < 64) { a.sample.insert(a.sample.end(), p + m * K, p + (m + 1) * K); ++a.sample_rows; }
  }
  a.count += M;
}

std::map<std::string, ActStats> CalibAccumulator::finish(int64_t sample_rows) const {
  std::map<std::string, ActStats> out;
  for (const auto& [layer, a] : acc_) {
    const int64_t K = int64_t(a.sum_abs.size());
    ActStats s;
    s.mean_abs = Tensor::empty(DType::F32, {K});
    s.max_abs = Tensor::empty(DType::F32, {K});
    s.mean_sq = Tensor::empty(DType::F32, {K});
    for (int64_t k = 0; k < K; ++k) {
      s.mean_abs.mutable_data<float>()[k] = float(a.sum_abs[size_t(k)] / double(std::max<int64_t>(a.count, 1)));
      s.mean_sq.mutable_data<float>()[k] = float(a.sum_sq[size_t(k)] / double(std::max<int64_t>(a.count, 1)));
      s.max_abs.mutable_data<float>()[k] = a.max_abs[size_t(k)];
    }
    const int64_t rows = std::min(sample_rows, a.sample_rows);
    if (rows > 0) s.sample = Tensor::from_bytes(DType::F32, {rows, K}, a.sample.data(), size_t(rows * K) * 4);
    out[layer] = s;
  }
  return out;
}

void CalibAccumulator::save(const std::string& path, int64_t sample_rows) const {
  std::vector<std::pair<std::string, Tensor>> t;
  for (const auto& [layer, s] : finish(sample_rows)) {
    t.emplace_back(layer + ".max_abs", s.max_abs);
    t.emplace_back(layer + ".mean_abs", s.mean_abs);
    t.emplace_back(layer + ".mean_sq", s.mean_sq);
    if (s.sample.defined()) t.emplace_back(layer + ".sample", s.sample);
  }
  save_safetensors(path, t, {{"format", "nibble_calib_v1"}});
}

// ====================================================================== execution
namespace {

const ActStats* find_stats(const std::map<std::string, ActStats>& calib, const std::string& layer) {
  if (calib.empty()) return nullptr;
  if (auto it = calib.find(layer); it != calib.end()) return &it->second;
  for (const char* pre : {"model.diffusion_model.", "diffusion_model."})
    if (layer.rfind(pre, 0) == 0)
      if (auto it = calib.find(layer.substr(strlen(pre))); it != calib.end()) return &it->second;
  for (const auto& [k, v] : calib)  // stats keyed with a prefix the checkpoint lacks
    if (ends_with(k, "." + layer)) return &v;
  return nullptr;
}

struct JobResult {
  std::vector<std::map<std::string, Tensor>> tensors;  // per member: suffix → tensor
  std::vector<LayerResult> layers;
};


// --allow-requantize: the float weight of a quantized layer is its dequantized W_eff; for an
// act_unsigned svdquant layer the stored bias b' = b − shift·Σ_k R_raw[n,k] is turned back into b
// (R_raw = W_eff − proj_up·proj_downᵀ), so the new quantization applies its own correction once.
void load_quantized(const LayerSource& src, Tensor* W, Tensor* B) {
  QuantizedLayer ql = bind_layer(src);
  *W = dequantize(ql);
  *B = ql.bias.defined() ? ql.bias.to_f32().clone() : Tensor();
  if (ql.format && ql.format->has_act_unsigned && ql.act_unsigned) {
    SvdquantW4A4Params p = svdquant_params(ql);
    Tensor pu = (p.proj_up.dim() == 3 ? tile_unpack_proj_up(p.proj_up) : p.proj_up).to_f32();
    Tensor pd = p.proj_down.to_f32();
    const int64_t N = ql.N, K = ql.K, R = p.R;
    std::vector<double> pd_colsum(size_t(R), 0.0);
    for (int64_t k = 0; k < K; ++k) for (int64_t r = 0; r < R; ++r) pd_colsum[size_t(r)] += pd.data<float>()[k * R + r];
    if (!B->defined()) *B = Tensor::zeros(DType::F32, {N});
    for (int64_t n = 0; n < N; ++n) {
      double rowsum = 0;
      for (int64_t k = 0; k < K; ++k) rowsum += W->data<float>()[n * K + k];
      for (int64_t r = 0; r < R; ++r) rowsum -= double(pu.data<float>()[n * R + r]) * pd_colsum[size_t(r)];
      B->mutable_data<float>()[n] += float(double(kSvdquantUnsignedShift) * rowsum);
    }
  }
}

JobResult run_job_impl(const Checkpoint& ck, const Job& job, const ConvertOptions& o,
                       const std::map<std::string, ActStats>& calib, const std::map<std::string, LayerSource>& quantized) {
  const auto t0 = std::chrono::steady_clock::now();
  JobResult res;
  const Resolved r = resolve(job.opts, o, job.members.front());
  std::vector<Tensor> Ws, Bs;
  bool all_bias = true;
  for (const auto& m : job.members) {
    if (auto q = quantized.find(m); q != quantized.end()) {
      Tensor W, B;
      load_quantized(q->second, &W, &B);
      Ws.push_back(W);
      Bs.push_back(B);
      if (!B.defined()) all_bias = false;
      continue;
    }
    Ws.push_back(ck.get(m + ".weight"));
    if (ck.contains(m + ".bias") && ck.info(m + ".bias").shape == Shape{Ws.back().size(0)}) Bs.push_back(ck.get(m + ".bias"));
    else { Bs.push_back(Tensor()); all_bias = false; }
  }
  const ActStats* stats = find_stats(calib, job.members.front());
  if (job.format == "awq_w4a16") {
    AwqQuantOptions ao;
    ao.group_size = r.group_size;
    ao.scale_dtype = kStoreDtype;
    ao.calib = stats;
    double err = 0;
    ao.weight_rel_error = &err;
    AwqW4A16Params p = quantize_awq_w4a16(Ws[0], Bs[0], ao);
    std::map<std::string, Tensor> t;
    for (auto& [k, v] : layer_tensors(p)) t[k] = v;
    res.tensors.push_back(t);
    LayerResult lr{job.members[0], job.format, p.N, p.K, 0, 0, err, 0};
    res.layers.push_back(lr);
  } else {
    SvdquantQuantOptions so;
    so.rank = r.rank;
    so.act_unsigned = r.act_unsigned;
    so.tile_layout = r.tile;
    so.svd = r.svd;
    so.refine_iterations = r.refine;
    so.dtype = kStoreDtype;
    so.calib = stats;
    std::vector<double> errs;
    so.weight_rel_errors = &errs;
    std::vector<Tensor> biases;
    // Members without a bias get none (unless act_unsigned, which always writes the corrected one).
    for (auto& b : Bs) biases.push_back(b.defined() ? b : Tensor());
    std::vector<SvdquantW4A4Params> ps;
    if (all_bias) {
      ps = quantize_weight_svdquant_w4a4_group(Ws, biases, so);
    } else {
      // Some member lacks a bias: quantize with zero biases, then drop the ones that were absent.
      std::vector<Tensor> zb;
      for (size_t i = 0; i < Ws.size(); ++i) zb.push_back(biases[i].defined() ? biases[i] : Tensor::zeros(DType::F32, {Ws[i].size(0)}));
      ps = quantize_weight_svdquant_w4a4_group(Ws, zb, so);
      for (size_t i = 0; i < ps.size(); ++i) if (!biases[i].defined() && !so.act_unsigned) ps[i].bias = Tensor();
    }
    for (size_t i = 0; i < ps.size(); ++i) {
      std::map<std::string, Tensor> t;
      for (auto& [k, v] : layer_tensors(ps[i])) t[k] = v;
      res.tensors.push_back(t);
      res.layers.push_back({job.members[i], job.format, ps[i].N, ps[i].K, 0, 0, errs[i], 0});
    }
  }
  for (const auto& w : Ws) release_pages(w);
  for (const auto& b : Bs) release_pages(b);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& l : res.layers) l.seconds = s / double(res.layers.size());
  return res;
}

// Errors name the layer (and the input file) they happened in.
JobResult run_job(const Checkpoint& ck, const Job& job, const ConvertOptions& o,
                  const std::map<std::string, ActStats>& calib, const std::map<std::string, LayerSource>& quantized) {
  try {
    return run_job_impl(ck, job, o, calib, quantized);
  } catch (const Error& e) {
    std::string names;
    for (const auto& m : job.members) names += (names.empty() ? "" : ", ") + m;
    throw Error(fmt::format("{}: converting {} to {}: {}", ck.path(), names, job.format, e.what()));
  }
}

}  // namespace

// ---- sharded output
// One file at OUT, or (shard_size > 0 and the output larger than it) shards of at most shard_size
// bytes each (a single larger tensor gets a shard of its own), named like Hugging Face's:
// OUT "model.safetensors" → "model-00001-of-00003.safetensors", ... and the index
// "model.safetensors.index.json". Every shard is written atomically; the index comes last, and a
// failure removes the shards already committed, so nothing half-written is left behind.
class ConvertOutput {
 public:
  ConvertOutput(const std::string& out, const FullPlan& fp, uint64_t shard_size) : out_(out) {
    std::vector<std::vector<size_t>> groups(1);
    uint64_t cur = 0, total = 0;
    for (size_t i = 0; i < fp.outputs.size(); ++i) {
      const auto& ot = fp.outputs[i];
      const uint64_t b = dtype_nbytes(ot.dtype, uint64_t(shape_numel(ot.shape)));
      total += b;
      if (shard_size > 0 && !groups.back().empty() && cur + b > shard_size) groups.emplace_back(), cur = 0;
      groups.back().push_back(i);
      cur += b;
    }
    total_ = total;
    if (groups.size() == 1) {
      paths_.push_back(out);
    } else {
      std::string base = out;
      if (base.size() > 12 && base.compare(base.size() - 12, 12, ".safetensors") == 0) base.resize(base.size() - 12);
      for (size_t k = 0; k < groups.size(); ++k)
        paths_.push_back(fmt::format("{}-{:05d}-of-{:05d}.safetensors", base, k + 1, groups.size()));
      index_path_ = base + ".safetensors.index.json";
    }
    for (size_t k = 0; k < groups.size(); ++k) {
      writers_.push_back(std::make_unique<SafetensorsWriter>(paths_[k], fp.metadata));
      for (size_t i : groups[k]) {
        const auto& ot = fp.outputs[i];
        writers_.back()->add(ot.name, ot.dtype, ot.shape);
        shard_of_[ot.name] = k;
        weight_map_[ot.name] = std::filesystem::path(paths_[k]).filename().string();
      }
    }
    metadata_ = fp.metadata;
  }
  ~ConvertOutput() {
    if (!done_)
      for (size_t k = 0; k < committed_; ++k) std::remove(paths_[k].c_str());
  }
  SafetensorsWriter& writer(const std::string& name) { return *writers_[shard_of_.at(name)]; }
  void commit() {
    for (; committed_ < writers_.size(); ++committed_) writers_[committed_]->commit();
    if (!index_path_.empty()) {
      auto meta = metadata_;
      meta["total_size"] = std::to_string(total_);
      write_safetensors_index(index_path_, weight_map_, meta);
    }
    done_ = true;
  }
  const std::vector<std::string>& paths() const { return paths_; }

 private:
  std::string out_, index_path_;
  std::vector<std::string> paths_;
  std::vector<std::unique_ptr<SafetensorsWriter>> writers_;
  std::map<std::string, size_t> shard_of_;
  std::map<std::string, std::string> weight_map_, metadata_;
  uint64_t total_ = 0;
  size_t committed_ = 0;
  bool done_ = false;
};

ConvertReport convert_checkpoint(const std::string& in, const std::string& out, const ConvertOptions& o,
                                 const std::function<void(const ConvertProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  if (o.threads > 0) set_num_threads(o.threads);
  Checkpoint ck = Checkpoint::open(in);
  FullPlan fp = make_plan(ck, o);
  std::map<std::string, ActStats> calib;
  if (!o.calib_path.empty()) calib = load_calib_stats(o.calib_path);
  // Never write over an input file.
  for (const auto& sh : ck.shards())
    if (std::filesystem::exists(out) && std::filesystem::equivalent(sh->path(), out))
      throw Error(fmt::format("convert: output {} is an input file", out));

  ConvertReport report;
  report.plan = fp.summary;
  ConvertOutput output(out, fp, o.shard_size);

  std::map<std::string, LayerSource> quantized;  // sources of layers being requantized
  if (o.allow_requantize) {
    std::set<std::string> planned;
    for (const auto& lp : fp.summary.layers) planned.insert(lp.name);
    for (auto& l : collect_layers(ck, true))
      if (planned.count(l.name)) quantized[l.name] = std::move(l);
  }
  std::map<int64_t, JobResult> done;
  std::map<int64_t, int> remaining;  // job → tensors still to write
  for (const auto& ot : fp.outputs) if (ot.job >= 0) remaining[ot.job]++;
  std::vector<int64_t> job_order;    // jobs in order of first output
  for (const auto& ot : fp.outputs)
    if (ot.job >= 0 && (job_order.empty() || std::find(job_order.begin(), job_order.end(), ot.job) == job_order.end()))
      job_order.push_back(ot.job);
  size_t next_job = 0;
  std::map<std::string, uint64_t> layer_before;
  for (const auto& lp : fp.summary.layers) layer_before[lp.name] = lp.bytes_before;
  std::map<std::string, const LayerPlan*> lplan;
  for (const auto& lp : fp.summary.layers) lplan[lp.name] = &lp;
  uint64_t bytes_done = 0;
  int64_t index = 0;
  for (const auto& ot : fp.outputs) {
    ++index;
    ConvertProgress pr;
    pr.index = index;
    pr.total = int64_t(fp.outputs.size());
    pr.name = ot.name;
    pr.shape = ot.shape;
    if (ot.job < 0 && ot.json.empty()) {
      Tensor t = ck.get(ot.source);
      output.writer(ot.name).write_tensor(ot.name, t);
      release_pages(t);
      pr.bytes_before = pr.bytes_after = t.nbytes();
    } else if (!ot.json.empty()) {
      output.writer(ot.name).write(ot.name, ot.json.data(), ot.json.size());
      pr.format = "comfy_quant";
      pr.bytes_after = ot.json.size();
    } else {
      if (!done.count(ot.job)) {
        // Run a batch: upcoming jobs while their working sets fit the budget (at least one).
        std::vector<int64_t> batch;
        uint64_t mem = 0;
        while (next_job < job_order.size()) {
          const int64_t j = job_order[next_job];
          const uint64_t m = fp.jobs[size_t(j)].mem_estimate;
          if (!batch.empty() && (mem + m > o.mem_budget || int64_t(batch.size()) >= num_threads())) break;
          batch.push_back(j);
          mem += m;
          ++next_job;
        }
        std::vector<JobResult> results(batch.size());
        if (batch.size() == 1) {
          results[0] = run_job(ck, fp.jobs[size_t(batch[0])], o, calib, quantized);
        } else {
          parallel_for(int64_t(batch.size()), [&](int64_t i) { results[size_t(i)] = run_job(ck, fp.jobs[size_t(batch[size_t(i)])], o, calib, quantized); });
        }
        for (size_t i = 0; i < batch.size(); ++i) {
          for (auto& lr : results[i].layers) {
            lr.bytes_before = layer_before[lr.name];
            lr.bytes_after = lplan[lr.name]->bytes_after;
            report.layers.push_back(lr);
          }
          done[batch[i]] = std::move(results[i]);
        }
        report.peak_rss = std::max(report.peak_rss, peak_rss_bytes());
      }
      JobResult& jr = done[ot.job];
      const Tensor& t = jr.tensors[size_t(ot.member)].at(ot.key);
      if (t.dtype() != ot.dtype || t.shape() != ot.shape)
        throw Error(fmt::format("convert: internal plan mismatch for {}: planned {} {}, got {} {}", ot.name,
                                dtype_name(ot.dtype), shape_str(ot.shape), dtype_name(t.dtype()), shape_str(t.shape())));
      output.writer(ot.name).write_tensor(ot.name, t);
      pr.format = fp.jobs[size_t(ot.job)].format;
      pr.bytes_after = t.nbytes();
      const std::string layer = jr.layers[size_t(ot.member)].name;
      if (ot.key == "weight") {
        pr.bytes_before = layer_before[layer];
        pr.rel_error = jr.layers[size_t(ot.member)].weight_rel_error;
      }
      if (--remaining[ot.job] == 0) done.erase(ot.job);
    }
    bytes_done += pr.bytes_after;
    pr.bytes_done = bytes_done;
    pr.bytes_total = fp.summary.bytes_out;
    pr.elapsed_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (progress) progress(pr);
  }
  output.commit();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  report.peak_rss = std::max(report.peak_rss, peak_rss_bytes());
  std::sort(report.layers.begin(), report.layers.end(), [](const LayerResult& a, const LayerResult& b) { return a.name < b.name; });
  return report;
}

std::string convert_report_json(const ConvertReport& r) {
  nlohmann::ordered_json j;
  j["seconds"] = r.seconds;
  j["peak_rss_bytes"] = r.peak_rss;
  j["tensors_total"] = r.plan.tensors_total;
  j["passthrough_tensors"] = r.plan.passthrough_tensors;
  j["bytes_in"] = r.plan.bytes_in;
  j["bytes_out"] = r.plan.bytes_out;
  j["file_size"] = r.plan.file_size;
  auto& L = j["layers"] = nlohmann::ordered_json::array();
  std::map<std::string, const LayerResult*> res;
  for (const auto& l : r.layers) res[l.name] = &l;
  double max_err = 0;
  for (const auto& lp : r.plan.layers) {
    nlohmann::ordered_json e;
    e["name"] = lp.name;
    e["format"] = lp.format;
    e["shape"] = {lp.N, lp.K};
    e["source_dtype"] = lp.source_dtype;
    e["bytes_before"] = lp.bytes_before;
    e["bytes_after"] = lp.bytes_after;
    if (!lp.group.empty()) e["group"] = lp.group;
    if (auto it = res.find(lp.name); it != res.end()) {
      e["weight_rel_error"] = it->second->weight_rel_error;
      e["seconds"] = it->second->seconds;
      max_err = std::max(max_err, it->second->weight_rel_error);
    }
    L.push_back(e);
  }
  j["max_weight_rel_error"] = max_err;
  return j.dump(2);
}

}  // namespace nibble
