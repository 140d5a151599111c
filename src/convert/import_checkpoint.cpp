// import_checkpoint.cpp — whole-checkpoint importers (nibble/import.h): plan every output tensor
// from the input header (names, dtypes, shapes), declare them to the atomic SafetensorsWriter, then
// produce one unit (a layer, or a fused layer's q/k/v) at a time and stream it out. Nothing is
// written at OUT unless every layer imported.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/convert.h"
#include "nibble/import.h"
#include "nibble/safetensors.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using TensorList = std::vector<std::pair<std::string, Tensor>>;

struct OutDecl {
  std::string name;
  DType dtype;
  Shape shape;
};
struct Unit {
  std::vector<OutDecl> outs;
  std::function<TensorList()> make;
};

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

Tensor config_tensor(const QuantConfig& c) {
  const std::string j = c.to_json();
  return Tensor::from_bytes(DType::U8, {int64_t(j.size())}, j.data(), j.size());
}

Unit copy_unit(const Checkpoint& ck, const std::string& from, const std::string& to) {
  const TensorInfo& ti = ck.info(from);
  Unit u;
  u.outs.push_back({to, ti.dtype, ti.shape});
  u.make = [&ck, from, to] { return TensorList{{to, ck.get(from)}}; };
  return u;
}

// Out declarations of a layer, from typed params computed by `make` (shapes known up front).
void add_layer_decls(Unit& u, const std::string& P, const std::vector<std::pair<std::string, std::pair<DType, Shape>>>& t,
                     const QuantConfig& cfg) {
  for (auto& [suffix, ds] : t) u.outs.push_back({P + "." + suffix, ds.first, ds.second});
  u.outs.push_back({P + ".comfy_quant", DType::U8, {int64_t(cfg.to_json().size())}});
}
void append_layer(TensorList& out, const std::string& P, const TensorList& t, const QuantConfig& cfg) {
  for (auto& [suffix, v] : t) out.emplace_back(P + "." + suffix, v);
  out.emplace_back(P + ".comfy_quant", config_tensor(cfg));
}

ImportReport write_units(const std::string& out, std::vector<Unit>& units, std::map<std::string, std::string> meta,
                         ImportReport& r) {
  SafetensorsWriter w(out, std::move(meta));
  std::set<std::string> seen;
  for (auto& u : units)
    for (auto& d : u.outs) {
      if (!seen.insert(d.name).second) throw Error(fmt::format("import: output tensor '{}' would be written twice", d.name));
      w.add(d.name, d.dtype, d.shape);
    }
  for (auto& u : units) {
    TensorList ts = u.make();
    if (ts.size() != u.outs.size()) throw Error("internal: import unit produced an unexpected tensor count");
    for (size_t i = 0; i < ts.size(); ++i) {
      const auto& d = u.outs[i];
      if (ts[i].first != d.name || ts[i].second.dtype() != d.dtype || ts[i].second.shape() != d.shape)
        throw Error(fmt::format("internal: import planned {} {} {}, produced {} {} {}", d.name, dtype_name(d.dtype),
                                shape_str(d.shape), ts[i].first, dtype_name(ts[i].second.dtype()),
                                shape_str(ts[i].second.shape())));
      w.write_tensor(d.name, ts[i].second);
      ++r.tensors_written;
    }
  }
  w.commit();
  r.file_size = fs::file_size(out);
  return r;
}

const nlohmann::json* find_json_config(const std::string& in, nlohmann::json& holder) {
  fs::path dir = fs::is_directory(in) ? fs::path(in) : fs::path(in).parent_path();
  for (const char* name : {"config.json", "quant_config.json"}) {
    fs::path p = dir / name;
    if (!fs::exists(p)) continue;
    try {
      std::ifstream f(p);
      holder = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      throw Error(fmt::format("{}: not valid JSON ({})", p.string(), e.what()));
    }
    if (holder.contains("quantization_config")) return &holder["quantization_config"];
    if (holder.contains("w_bit") || holder.contains("q_group_size")) return &holder;
  }
  return nullptr;
}

DType parse_scale_dtype(const std::string& s, DType dflt) {
  if (s.empty()) return dflt;
  if (s == "bf16" || s == "BF16") return DType::BF16;
  if (s == "f16" || s == "fp16" || s == "F16") return DType::F16;
  throw Error(fmt::format("import: scale dtype '{}': expected bf16 or f16", s));
}

// ============================================================================ autoawq
ImportReport import_autoawq(const std::string& in, const std::string& out, const ImportOptions& o) {
  Checkpoint ck = Checkpoint::open(in);
  ImportReport r;
  r.format = "autoawq";
  int64_t cfg_group = o.group_size;
  nlohmann::json holder;
  if (const nlohmann::json* qc = find_json_config(in, holder)) {
    int64_t bits = qc->value("bits", qc->value("w_bit", int64_t(4)));
    if (bits != 4) throw Error(fmt::format("{}: quantization_config says {} bits; only 4-bit AWQ imports", in, bits));
    std::string ver = qc->value("version", std::string("gemm"));
    std::transform(ver.begin(), ver.end(), ver.begin(), ::tolower);
    if (ver != "gemm")
      throw Error(fmt::format("{}: AutoAWQ packing version '{}' is not supported (only GEMM)", in, ver));
    if (qc->value("zero_point", true) == false)
      throw Error(fmt::format("{}: zero_point = false AWQ checkpoints are not supported", in));
    if (!cfg_group) cfg_group = qc->value("group_size", qc->value("q_group_size", int64_t(0)));
  }
  std::set<std::string> used;
  std::vector<std::string> layers;
  for (const auto& n : ck.names())
    if (ends_with(n, ".qweight")) layers.push_back(n.substr(0, n.size() - 8));
  if (layers.empty())
    throw Error(fmt::format("{}: not an AutoAWQ checkpoint: no layer has the keys P.qweight, P.qzeros, P.scales", in));
  std::vector<Unit> units;
  std::map<std::string, size_t> unit_of_layer;  // to keep output order = input order of first key
  const DType sd_req = parse_scale_dtype(o.scale_dtype, DType::F16);
  for (const auto& P : layers) {
    for (const char* suf : {".qzeros", ".scales"})
      if (!ck.contains(P + suf))
        throw Error(fmt::format("{}: layer '{}' has {}.qweight but no {}{} (AutoAWQ GEMM expects qweight, qzeros, scales)",
                                in, P, P, P, suf));
    const TensorInfo &qi = ck.info(P + ".qweight"), &si = ck.info(P + ".scales"), &zi = ck.info(P + ".qzeros");
    if (qi.shape.size() != 2 || si.shape.size() != 2 || zi.shape.size() != 2 || qi.dtype != DType::I32)
      throw Error(fmt::format("{}: layer '{}': expected qweight I32 (K, N/8), qzeros (K/G, N/8), scales (K/G, N); got {} {}, {}, {}",
                              in, P, dtype_name(qi.dtype), shape_str(qi.shape), shape_str(zi.shape), shape_str(si.shape)));
    const int64_t K = qi.shape[0], N = qi.shape[1] * 8, NG = si.shape[0];
    if (si.shape[1] != N)
      throw Error(fmt::format("{}: layer '{}': scales {} vs qweight {}: not AutoAWQ's GEMM packing (GEMV/GEMVFast are not supported)",
                              in, P, shape_str(si.shape), shape_str(qi.shape)));
    if (NG == 0 || K % NG) throw Error(fmt::format("{}: layer '{}': {} scale rows do not divide K = {}", in, P, NG, K));
    const int64_t G = K / NG;
    if (cfg_group && cfg_group != G)
      throw Error(fmt::format("{}: layer '{}': shapes give group size {}, the config says {}", in, P, G, cfg_group));
    const int64_t Go = o.out_group_size ? o.out_group_size : (G % 64 == 0 ? 64 : G);
    const DType sd = o.scale_dtype.empty() && si.dtype == DType::BF16 ? DType::BF16 : sd_req;
    const bool has_bias = ck.contains(P + ".bias");
    for (const char* suf : {".qweight", ".qzeros", ".scales", ".bias"}) used.insert(P + suf);
    QuantConfig cfg;
    cfg.format = "awq_w4a16";
    cfg.group_size = Go;
    Unit u;
    std::vector<std::pair<std::string, std::pair<DType, Shape>>> decl = {
        {"weight", {DType::I8, {N, K / 2}}}, {"weight_scale", {sd, {K / Go, N}}}, {"weight_zeros", {sd, {K / Go, N}}}};
    if (has_bias) decl.push_back({"bias", {sd, {N}}});
    add_layer_decls(u, P, decl, cfg);
    auto* rep = &r;
    u.make = [&ck, P, Go, sd, has_bias, cfg, rep] {
      ZeroRounding zr;
      AwqW4A16Params p = import_autoawq_gemm(ck.get(P + ".qweight"), ck.get(P + ".qzeros"), ck.get(P + ".scales"),
                                             has_bias ? ck.get(P + ".bias") : Tensor(), Go, sd, &zr, P);
      rep->zeros.merge(zr);
      TensorList t;
      append_layer(t, P, layer_tensors(p), cfg);
      return t;
    };
    units.push_back(std::move(u));
    r.layers.push_back({P, P, "awq_w4a16", N, K, 0, Go, G == Go ? "" : fmt::format("source group size {}", G)});
  }
  for (const auto& n : ck.names())
    if (!used.count(n)) {
      units.push_back(copy_unit(ck, n, n));
      ++r.tensors_copied;
    }
  std::map<std::string, std::string> meta = ck.metadata();
  meta["nibble_import"] = "autoawq";
  return write_units(out, units, meta, r);
}

// ============================================================================ nunchaku
struct NkLayer {
  std::string P;                        // source prefix
  std::map<std::string, std::string> key;  // canonical suffix → source key
  bool awq = false;
};


// ============================================================================ nunchaku FLUX.1
// nunchaku's FLUX files use its C++ runtime's module names (transformer_blocks.N.qkv_proj, …,
// single_transformer_blocks.N.mlp_fc1, norm1.linear) with the v0 or v1 suffixes; its v2 Python model
// uses diffusers' names (attn.to_qkv, ff.net.0.proj, …). Both map to ComfyUI's FLUX (BFL) names.
struct Alias {
  const char* out;
  std::vector<const char*> in;
};
const std::vector<Alias> kFluxDoubleW4A4 = {
    {"img_attn.qkv", {"qkv_proj", "attn.to_qkv"}},
    {"txt_attn.qkv", {"qkv_proj_context", "attn.add_qkv_proj"}},
    {"img_attn.proj", {"out_proj", "attn.to_out.0"}},
    {"txt_attn.proj", {"out_proj_context", "attn.to_add_out"}},
    {"img_mlp.0", {"mlp_fc1", "ff.net.0.proj"}},
    {"img_mlp.2", {"mlp_fc2", "ff.net.2"}},
    {"txt_mlp.0", {"mlp_context_fc1", "ff_context.net.0.proj"}},
    {"txt_mlp.2", {"mlp_context_fc2", "ff_context.net.2"}},
};
const std::vector<Alias> kFluxDoubleMod = {{"img_mod.lin", {"norm1.linear"}}, {"txt_mod.lin", {"norm1_context.linear"}}};
const std::vector<Alias> kFluxDoubleFloat = {
    {"img_attn.norm.query_norm.scale", {"norm_q.weight", "attn.norm_q.weight"}},
    {"img_attn.norm.key_norm.scale", {"norm_k.weight", "attn.norm_k.weight"}},
    {"txt_attn.norm.query_norm.scale", {"norm_added_q.weight", "attn.norm_added_q.weight"}},
    {"txt_attn.norm.key_norm.scale", {"norm_added_k.weight", "attn.norm_added_k.weight"}},
};
const std::vector<Alias> kFluxSingleFloat = {
    {"norm.query_norm.scale", {"norm_q.weight", "attn.norm_q.weight"}},
    {"norm.key_norm.scale", {"norm_k.weight", "attn.norm_k.weight"}},
};
// Top level: diffusers → BFL (comfy/utils.py flux_to_diffusers). `required`: the weight must exist.
struct TopAlias {
  const char* out;
  const char* in;
  bool required;
};
const std::vector<TopAlias> kFluxTop = {
    {"img_in", "x_embedder", true},
    {"txt_in", "context_embedder", true},
    {"time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", true},
    {"time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", true},
    {"vector_in.in_layer", "time_text_embed.text_embedder.linear_1", true},
    {"vector_in.out_layer", "time_text_embed.text_embedder.linear_2", true},
    {"guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", false},  // dev only
    {"guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", false},
    {"final_layer.linear", "proj_out", true},
    {"final_layer.adaLN_modulation.1", "norm_out.linear", true},  // halves swapped: (scale, shift) → (shift, scale)
};

// Halves of dim 0 swapped (diffusers' norm_out.linear is [scale; shift], BFL's [shift; scale]).
Unit swap_halves_unit(const Checkpoint& ck, const std::string& from, const std::string& to, const std::string& in) {
  const TensorInfo& ti = ck.info(from);
  if (ti.shape.empty() || ti.shape[0] % 2)
    throw Error(fmt::format("{}: '{}' {} has no even first dimension to split into (scale, shift)", in, from,
                            shape_str(ti.shape)));
  Unit u;
  u.outs.push_back({to, ti.dtype, ti.shape});
  u.make = [&ck, from, to] {
    Tensor t = ck.get(from);
    Tensor o = Tensor::empty(t.dtype(), t.shape());
    const size_t half = t.nbytes() / 2;
    std::memcpy(o.mutable_raw(), static_cast<const uint8_t*>(t.raw()) + half, half);
    std::memcpy(static_cast<uint8_t*>(o.mutable_raw()) + half, t.raw(), half);
    return TensorList{{to, o}};
  };
  return u;
}

// One nunchaku SVDQuant layer with its logical size and rank (planned before the output is written).
struct FluxPart {
  NunchakuW4A4Source src;
  int64_t N, K, R;
  bool act_unsigned;
  std::string P;
  DType dt;
};
SvdquantW4A4Params run_part(const FluxPart& p) {
  return import_nunchaku_w4a4(p.src, p.N, p.K, {}, p.R, p.act_unsigned, p.P).front();
}

using Decls = std::vector<std::pair<std::string, std::pair<DType, Shape>>>;
Decls svdquant_decls(int64_t N, int64_t K, int64_t R, DType dt, bool bias, DType bd) {
  Decls d = {{"weight", {DType::I8, {N, K / 2}}}, {"weight_scale", {dt, {K / 64, N}}}, {"smooth_factor", {dt, {K}}},
             {"proj_down", {dt, {K, R}}},          {"proj_up", {dt, {N, R}}}};
  if (bias) d.push_back({"bias", {bd, {N}}});
  return d;
}
QuantConfig svdquant_config(bool act_unsigned) {
  QuantConfig cfg;
  cfg.format = "svdquant_w4a4";
  cfg.lowrank_branch_input_basis = "raw";
  cfg.proj_down_smooth_folded = true;
  if (act_unsigned) cfg.act_unsigned = true;
  return cfg;
}

// Model width from the diffusers config nunchaku stores in the metadata (heads × head dim), 0 if absent.
int64_t width_from_config(const Checkpoint& ck) {
  if (!ck.metadata().count("config")) return 0;
  try {
    auto j = nlohmann::json::parse(ck.metadata().at("config"));
    if (j.contains("num_attention_heads") && j.contains("attention_head_dim"))
      return j["num_attention_heads"].get<int64_t>() * j["attention_head_dim"].get<int64_t>();
  } catch (const std::exception&) {
  }
  return 0;
}

ImportReport import_nunchaku_flux(const Checkpoint& ck, const std::string& in, const std::string& out,
                                  const ImportOptions& o, const std::map<std::string, NkLayer>& layers, ImportReport& r) {
  const std::string l2 = o.flux_linear2.empty() ? "svdquant" : o.flux_linear2;
  if (l2 != "svdquant" && l2 != "bf16")
    throw Error(fmt::format("import: --flux-linear2 '{}': expected svdquant or bf16", o.flux_linear2));
  // Blocks present.
  std::set<int64_t> doubles, singles;
  auto block_index = [](const std::string& n, const std::string& pre, int64_t* idx) {
    if (n.compare(0, pre.size(), pre) != 0) return false;
    size_t e = pre.size();
    while (e < n.size() && std::isdigit(static_cast<unsigned char>(n[e]))) ++e;
    if (e == pre.size() || e >= n.size() || n[e] != '.') return false;
    *idx = std::stoll(n.substr(pre.size(), e - pre.size()));
    return true;
  };
  for (const auto& n : ck.names()) {
    int64_t i;
    if (block_index(n, "transformer_blocks.", &i)) doubles.insert(i);
    else if (block_index(n, "single_transformer_blocks.", &i)) singles.insert(i);
  }
  if (doubles.empty() && singles.empty())
    throw Error(fmt::format("{}: no transformer_blocks.N / single_transformer_blocks.N in a FLUX nunchaku checkpoint", in));
  // Model width D.
  int64_t D = o.hidden;
  if (!D) D = width_from_config(ck);
  if (!D && ck.contains("x_embedder.weight")) D = ck.info("x_embedder.weight").shape[0];
  if (!D) throw Error(fmt::format("{}: cannot tell the FLUX model width (no metadata config, no x_embedder.weight); pass --hidden", in));
  if (D % 64) throw Error(fmt::format("{}: FLUX model width {} is not a multiple of 64", in, D));

  std::set<std::string> consumed;  // input tensors accounted for
  auto layer_of = [&](const std::string& blk, const std::vector<const char*>& names, bool awq, const std::string& role) {
    for (const char* nm : names) {
      auto it = layers.find(blk + nm);
      if (it == layers.end()) continue;
      if (it->second.awq != awq)
        throw Error(fmt::format("{}: '{}' is a nunchaku {} layer; {} expects {}", in, it->first,
                                it->second.awq ? "AWQ W4A16" : "SVDQuant INT4", role, awq ? "AWQ W4A16" : "SVDQuant INT4"));
      return &it->second;
    }
    std::vector<std::string> alts;
    for (const char* nm : names) alts.push_back(blk + nm + ".qweight");
    throw Error(fmt::format("{}: FLUX {} is missing: expected {} (a nunchaku {} layer)", in, role, fmt::join(alts, " or "),
                            awq ? "AWQ W4A16 modulation" : "SVDQuant INT4"));
  };
  auto float_of = [&](const std::string& blk, const std::vector<const char*>& names, const std::string& role) {
    for (const char* nm : names)
      if (ck.contains(blk + nm)) return blk + nm;
    std::vector<std::string> alts;
    for (const char* nm : names) alts.push_back(blk + nm);
    throw Error(fmt::format("{}: FLUX {} is missing: expected the tensor {}", in, role, fmt::join(alts, " or ")));
  };
  auto mark_layer = [&](const NkLayer& l) {
    for (const char* s : {"qweight", "wscales", "wzeros", "smooth_factor", "smooth", "smooth_factor_orig", "smooth_orig",
                          "proj_down", "proj_up", "lora_down", "lora_up", "bias"})
      if (ck.contains(l.P + "." + s)) consumed.insert(l.P + "." + s);
  };
  auto source_of = [&ck](const NkLayer& l) {
    return NunchakuW4A4Source{ck.get(l.key.at("qweight")), ck.get(l.key.at("wscales")), ck.get(l.key.at("smooth")),
                              ck.get(l.key.at("proj_down")), ck.get(l.key.at("proj_up")),
                              l.key.count("bias") ? ck.get(l.key.at("bias")) : Tensor()};
  };
  // Logical (N, K) of a FLUX SVDQuant layer: qkv 3D×D, proj D×D, fc1 F×D, fc2 D×F with F = 4D when it
  // fits the stored padding (FLUX.1's mlp_ratio), else the stored size.
  enum Kind { kQkv, kProj, kFc1, kFc2 };
  auto logical = [&](const NkLayer& l, Kind kind) {
    const TensorInfo& qi = ck.info(l.key.at("qweight"));
    const int64_t Np = qi.shape[0], Kp = qi.shape[1] * 2;
    auto fits = [](int64_t stored, int64_t want) { return stored - want >= 0 && stored - want < 128; };
    switch (kind) {
      case kQkv: return std::pair<int64_t, int64_t>{3 * D, D};
      case kProj: return std::pair<int64_t, int64_t>{D, D};
      case kFc1: return std::pair<int64_t, int64_t>{fits(Np, 4 * D) ? 4 * D : Np, D};
      case kFc2: return std::pair<int64_t, int64_t>{D, fits(Kp, 4 * D) ? 4 * D : Kp};
    }
    return std::pair<int64_t, int64_t>{Np, Kp};
  };
  auto probe = [&](const NkLayer& l, Kind kind) {
    auto [N, K] = logical(l, kind);
    FluxPart p{source_of(l), N, K, 0, kind == kFc2, l.P, DType::BF16};
    p.dt = p.src.wscales.dtype();
    p.R = import_nunchaku_w4a4(p.src, N, K, {}, 0, p.act_unsigned, l.P).front().R;  // dry run: checks and rank
    return p;
  };
  std::vector<Unit> units;
  auto add_svdquant_unit = [&](const std::string& outP, std::vector<FluxPart> parts, bool rows, const std::string& note,
                               const std::string& source) {
    // Shapes as import_nunchaku_w4a4 / concat_svdquant_rows / concat_svdquant_k will produce them.
    const bool one = parts.size() == 1;
    int64_t N = one || !rows ? parts[0].N : 0, K = one || rows ? parts[0].K : 0, R = 0;
    bool bias = false;
    DType bd = parts[0].dt;
    bool bd_set = false;
    for (const auto& p : parts) {
      if (!one && rows) N += p.N;
      if (!one && !rows) K += p.K;
      R += p.R;
      bias = bias || p.src.bias.defined() || (!one && !rows && p.act_unsigned);
      if (p.src.bias.defined() && !bd_set) {
        bd = p.src.bias.dtype();
        bd_set = true;
      }
    }
    const bool unsigned_ = one && parts[0].act_unsigned;
    const QuantConfig cfg = svdquant_config(unsigned_);
    Unit u;
    add_layer_decls(u, outP, svdquant_decls(N, K, R, parts[0].dt, bias, bd), cfg);
    u.make = [parts, rows, outP, cfg] {
      std::vector<SvdquantW4A4Params> ps;
      for (const auto& p : parts) ps.push_back(run_part(p));
      SvdquantW4A4Params m = ps.size() == 1 ? ps[0] : rows ? concat_svdquant_rows(ps, outP) : concat_svdquant_k(ps, outP);
      TensorList t;
      append_layer(t, outP, layer_tensors(m), cfg);
      return t;
    };
    units.push_back(std::move(u));
    r.layers.push_back({source, outP, "svdquant_w4a4", N, K, R, 64, note});
  };
  auto add_mod_unit = [&](const NkLayer& l, const std::string& outP, int S) {
    const TensorInfo& qi = ck.info(l.key.at("qweight"));
    const int64_t N = qi.shape[0] * 4, K = qi.shape[1] * int64_t(dtype_size(qi.dtype)) / 2;
    if (N != S * D || K != D)
      throw Error(fmt::format("{}: '{}' is {}x{}, expected {}x{} ({} modulation chunks of D = {})", in, l.P, N, K, S * D, D, S, D));
    // nunchaku's GEMV_AWQ may carry an optional low-rank branch (lora_down/lora_up); awq_w4a16 has
    // none, so a non-zero one cannot be imported exactly.
    for (const char* s : {"lora_down", "lora_up", "proj_down", "proj_up"}) {
      if (!ck.contains(l.P + "." + s)) continue;
      const Tensor t = ck.get(l.P + "." + s);
      const auto* b = static_cast<const uint8_t*>(t.raw());
      const size_t es = dtype_size(t.dtype());
      for (size_t i = 0; i < t.nbytes(); ++i)
        if (b[i] != 0 && !(es == 2 && i % 2 == 1 && b[i] == 0x80))  // ±0 of a 16-bit float
          throw Error(fmt::format("{}: modulation layer '{}' has a non-zero low-rank branch '{}.{}'; awq_w4a16 has none "
                                  "(merge it into the weight first)",
                                  in, l.P, l.P, s));
    }
    const DType sd = ck.info(l.key.at("wscales")).dtype;
    const bool has_bias = l.key.count("bias") != 0;
    const DType bd = has_bias ? (ck.info(l.key.at("bias")).dtype == DType::F32 ? sd : ck.info(l.key.at("bias")).dtype) : sd;
    QuantConfig cfg;
    cfg.format = "awq_w4a16";
    cfg.group_size = 64;
    Unit u;
    Decls decl = {{"weight", {DType::I8, {N, K / 2}}}, {"weight_scale", {sd, {K / 64, N}}}, {"weight_zeros", {sd, {K / 64, N}}}};
    if (has_bias) decl.push_back({"bias", {bd, {N}}});
    add_layer_decls(u, outP, decl, cfg);
    const bool minus_one = o.mod_scale_shift;
    auto* rep = &r;
    u.make = [&ck, l, S, minus_one, cfg, rep, outP] {
      ZeroRounding zr;
      AwqW4A16Params p = import_nunchaku_awq(ck.get(l.key.at("qweight")), ck.get(l.key.at("wscales")), ck.get(l.key.at("wzeros")),
                                             l.key.count("bias") ? ck.get(l.key.at("bias")) : Tensor(), S, minus_one, &zr, l.P);
      rep->zeros.merge(zr);
      TensorList t;
      append_layer(t, outP, layer_tensors(p), cfg);
      return t;
    };
    units.push_back(std::move(u));
    mark_layer(l);
    r.layers.push_back({l.P, outP, "awq_w4a16", N, K, 0, 64,
                        fmt::format("chunks [D,{}]→[{},D]{}", S, S, minus_one ? ", bias of scale chunks −1" : "")});
  };
  auto add_float = [&](const std::string& from, const std::string& to) {
    units.push_back(copy_unit(ck, from, to));
    consumed.insert(from);
    ++r.tensors_copied;
  };

  // Top level.
  for (const auto& t : kFluxTop) {
    const std::string w = std::string(t.in) + ".weight", b = std::string(t.in) + ".bias";
    if (!ck.contains(w)) {
      if (!t.required) continue;
      throw Error(fmt::format("{}: FLUX top-level tensor '{}' (ComfyUI {}.weight) is missing{}", in, w, t.out,
                              doubles.empty() || ck.contains("x_embedder.weight")
                                  ? ""
                                  : "; a split nunchaku model (transformer_blocks.safetensors + unquantized_layers.safetensors) "
                                    "must be merged first: python -m nunchaku.merge_safetensors"));
    }
    const bool swap = std::string(t.in) == "norm_out.linear";
    for (const auto& [from, suffix] : {std::pair{w, ".weight"}, std::pair{b, ".bias"}}) {
      if (!ck.contains(from)) continue;
      const std::string to = std::string(t.out) + suffix;
      if (swap) {
        units.push_back(swap_halves_unit(ck, from, to, in));
        consumed.insert(from);
        ++r.tensors_copied;
      } else {
        add_float(from, to);
      }
    }
  }
  // Double blocks.
  for (int64_t i : doubles) {
    const std::string blk = fmt::format("transformer_blocks.{}.", i), ob = fmt::format("double_blocks.{}.", i);
    for (const auto& a : kFluxDoubleMod)
      add_mod_unit(*layer_of(blk, a.in, true, fmt::format("double block {} {}", i, a.out)), ob + a.out, 6);
    for (const auto& a : kFluxDoubleW4A4) {
      const NkLayer& l = *layer_of(blk, a.in, false, fmt::format("double block {} {}", i, a.out));
      const std::string out_name = a.out;
      const Kind kind = ends_with(out_name, ".qkv") ? kQkv : ends_with(out_name, ".proj") ? kProj
                        : ends_with(out_name, ".0") ? kFc1 : kFc2;
      mark_layer(l);
      add_svdquant_unit(ob + a.out, {probe(l, kind)}, true, kind == kFc2 ? "act_unsigned" : "", l.P);
    }
    for (const auto& a : kFluxDoubleFloat) add_float(float_of(blk, a.in, fmt::format("double block {} {}", i, a.out)), ob + a.out);
  }
  // Single blocks: linear1 = [qkv; mlp_fc1] (rows), linear2 = [out_proj | mlp_fc2] (K).
  for (int64_t i : singles) {
    const std::string blk = fmt::format("single_transformer_blocks.{}.", i), ob = fmt::format("single_blocks.{}.", i);
    add_mod_unit(*layer_of(blk, {"norm.linear"}, true, fmt::format("single block {} modulation.lin", i)), ob + "modulation.lin", 3);
    const NkLayer& qkv = *layer_of(blk, {"qkv_proj", "attn.to_qkv"}, false, fmt::format("single block {} linear1 (qkv part)", i));
    const NkLayer& fc1 = *layer_of(blk, {"mlp_fc1", "proj_mlp"}, false, fmt::format("single block {} linear1 (mlp part)", i));
    const NkLayer& prj = *layer_of(blk, {"out_proj", "attn.to_out", "attn.to_out.0"}, false,
                                   fmt::format("single block {} linear2 (attention part)", i));
    const NkLayer& fc2 = *layer_of(blk, {"mlp_fc2", "proj_out.linears.1"}, false, fmt::format("single block {} linear2 (mlp part)", i));
    for (const NkLayer* l : {&qkv, &fc1, &prj, &fc2}) mark_layer(*l);
    FluxPart pq = probe(qkv, kQkv), pf = probe(fc1, kFc1);
    {
      // The rows can only be stacked exactly when both parts were smoothed together (DC does so).
      const Tensor a = pq.src.smooth, b = pf.src.smooth;
      if (a.nbytes() != b.nbytes() || std::memcmp(a.raw(), b.raw(), a.nbytes()) != 0)
        throw Error(fmt::format("{}: '{}' and '{}' have different smoothing vectors, so ComfyUI's fused linear1 cannot hold "
                                "them exactly (nunchaku's converter smooths both with one vector)",
                                in, qkv.P, fc1.P));
    }
    add_svdquant_unit(ob + "linear1", {pq, pf}, true, fmt::format("rows [qkv {}; mlp {}], rank {}+{}", pq.N, pf.N, pq.R, pf.R),
                      qkv.P + "+" + fc1.P);
    FluxPart pp = probe(prj, kProj), p2 = probe(fc2, kFc2);
    if (l2 == "svdquant") {
      add_svdquant_unit(ob + "linear2", {pp, p2}, false,
                        fmt::format("K [attn {} | mlp {}], rank {}+{}, mlp part requantized signed (was act_unsigned), shift "
                                    "folded into bias",
                                    pp.K, p2.K, pp.R, p2.R),
                        prj.P + "+" + fc2.P);
    } else {
      const std::string outP = ob + "linear2";
      const int64_t N = pp.N, K = pp.K + p2.K;
      Unit u;
      u.outs.push_back({outP + ".weight", DType::BF16, {N, K}});
      u.outs.push_back({outP + ".bias", DType::BF16, {N}});
      u.make = [pp, p2, outP] {
        auto wb = dense_svdquant_k({run_part(pp), run_part(p2)}, DType::BF16, outP);
        return TensorList{{outP + ".weight", wb.first}, {outP + ".bias", wb.second}};
      };
      units.push_back(std::move(u));
      r.layers.push_back({prj.P + "+" + fc2.P, outP, "bf16", N, K, 0, 0,
                          "dense effective weight W = q·s/smooth + up·downᵀ, shift folded into bias"});
    }
    for (const auto& a : kFluxSingleFloat) add_float(float_of(blk, a.in, fmt::format("single block {} {}", i, a.out)), ob + a.out);
  }
  // Anything else: copied under its own name (ComfyUI ignores unknown keys), listed in the notes.
  std::vector<std::string> extra;
  for (const auto& n : ck.names())
    if (!consumed.count(n)) {
      units.push_back(copy_unit(ck, n, n));
      ++r.tensors_copied;
      extra.push_back(n);
    }
  if (!extra.empty()) {
    const std::vector<std::string> shown(extra.begin(), extra.begin() + std::min<size_t>(extra.size(), 8));
    r.notes.push_back(fmt::format("{} tensor(s) not part of FLUX.1 copied under their own names: {}{}", extra.size(),
                                  fmt::join(shown, ", "), extra.size() > 8 ? ", …" : ""));
  }
  if (l2 == "bf16") r.notes.push_back("single blocks' linear2 written as dense bf16 (--flux-linear2 bf16)");
  std::map<std::string, std::string> meta;
  for (auto& [k, v] : ck.metadata())
    if (k == "config") meta[k] = v;
  meta["nibble_import"] = "nunchaku";
  meta["nibble_import_arch"] = "flux";
  return write_units(out, units, meta, r);
}


ImportReport import_nunchaku(const std::string& in, const std::string& out, const ImportOptions& o) {
  Checkpoint ck = Checkpoint::open(in);
  ImportReport r;
  r.format = "nunchaku";
  // Layers: prefixes with .qweight. v1 keys qweight/wscales/smooth_factor/proj_down/proj_up/bias;
  // v0 keys smooth/lora_down/lora_up (DC's converter); AWQ: qweight/wscales/wzeros/bias.
  std::map<std::string, NkLayer> layers;
  std::set<std::string> used;
  for (const auto& n : ck.names())
    if (ends_with(n, ".qweight")) {
      NkLayer l;
      l.P = n.substr(0, n.size() - 8);
      auto alias = [&](const char* canon, std::initializer_list<const char*> names) {
        for (const char* s : names)
          if (ck.contains(l.P + "." + s)) {
            l.key[canon] = l.P + "." + s;
            return;
          }
      };
      alias("qweight", {"qweight"});
      alias("wscales", {"wscales"});
      alias("wzeros", {"wzeros"});
      alias("smooth", {"smooth_factor", "smooth"});
      alias("proj_down", {"proj_down", "lora_down"});
      alias("proj_up", {"proj_up", "lora_up"});
      alias("bias", {"bias"});
      l.awq = l.key.count("wzeros") != 0;
      for (const char* s : {"qweight", "wscales", "wzeros", "smooth_factor", "smooth", "smooth_factor_orig", "smooth_orig",
                            "proj_down", "proj_up", "lora_down", "lora_up", "bias"})
        if (ck.contains(l.P + "." + s)) used.insert(l.P + "." + s);
      for (const char* s : {"wtscale", "wcscales"})
        if (ck.contains(l.P + "." + s))
          throw Error(fmt::format("{}: layer '{}' has '{}.{}': an NVFP4 nunchaku checkpoint (only the INT4 ones import to svdquant_w4a4)",
                                  in, l.P, l.P, s));
      std::vector<std::string> missing;
      const std::vector<std::string> required =
          l.awq ? std::vector<std::string>{"wscales"} : std::vector<std::string>{"wscales", "smooth", "proj_down", "proj_up"};
      for (const std::string& c : required)
        if (!l.key.count(c)) missing.push_back(c);
      if (!missing.empty())
        throw Error(fmt::format("{}: layer '{}' is not a nunchaku SVDQuant INT4 layer: missing {} (expected {}.qweight, .wscales, "
                                ".smooth_factor|.smooth, .proj_down|.lora_down, .proj_up|.lora_up[, .bias]; or .qweight, .wscales, "
                                ".wzeros for AWQ W4A16)",
                                in, l.P, fmt::join(missing, ", "), l.P));
      layers.emplace(l.P, std::move(l));
    }
  if (layers.empty())
    throw Error(fmt::format("{}: not a nunchaku checkpoint: no layer has the keys P.qweight, P.wscales (+ smooth_factor, "
                            "proj_down, proj_up or wzeros)",
                            in));
  // Architecture.
  std::string arch = o.arch;
  if (arch.empty()) {
    // FLUX first: nunchaku's FLUX v2 names reuse Qwen's attn.to_qkv, but only FLUX has single blocks
    // and norm1.linear modulation.
    for (auto& [P, l] : layers)
      if (P.find("single_transformer_blocks.") != std::string::npos || ends_with(P, "norm1.linear") ||
          ends_with(P, ".qkv_proj") || ends_with(P, ".mlp_fc1"))
        arch = "flux";
    if (arch.empty())
      for (auto& [P, l] : layers)
        if (ends_with(P, "img_mod.1") || ends_with(P, "attn.to_qkv") || ends_with(P, "img_mlp.net.0.proj"))
          arch = "qwen-image";
    if (arch.empty()) throw Error(fmt::format("{}: cannot tell the architecture from the layer names; pass --arch", in));
  }
  if (arch != "qwen-image" && arch != "flux")
    throw Error(fmt::format("{}: nunchaku architecture '{}' is not supported (supported: qwen-image, flux)", in, arch));
  r.arch = arch;
  if (arch == "flux") return import_nunchaku_flux(ck, in, out, o, layers, r);
  // Model width D: metadata config, else img_in rows, else to_out.0's stored N.
  int64_t D = o.hidden;
  if (!D) D = width_from_config(ck);
  if (!D && ck.contains("img_in.weight")) D = ck.info("img_in.weight").shape[0];
  int64_t rank_meta = 0;
  if (ck.metadata().count("quantization_config")) {
    try {
      auto j = nlohmann::json::parse(ck.metadata().at("quantization_config"));
      if (j.contains("weight") && j["weight"].value("dtype", std::string()) == "fp4_e2m1_all")
        throw Error(fmt::format("{}: an NVFP4 nunchaku checkpoint (quantization_config weight dtype fp4); only INT4 imports", in));
      rank_meta = j.value("rank", int64_t(0));
    } catch (const nlohmann::json::exception&) {
    }
  }
  (void)rank_meta;
  std::vector<Unit> units;
  std::set<std::string> emitted;
  // Output in input key order: a layer's unit goes where its first key appears.
  for (const auto& n : ck.names()) {
    if (!used.count(n)) {
      if (emitted.insert(n).second) {
        units.push_back(copy_unit(ck, n, n));
        ++r.tensors_copied;
      }
      continue;
    }
    std::string P = n.substr(0, n.rfind('.'));
    auto it = layers.find(P);
    if (it == layers.end() || !emitted.insert("layer:" + P).second) continue;
    const NkLayer& l = it->second;
    const TensorInfo& qi = ck.info(l.key.at("qweight"));
    if (l.awq) {
      const bool mod = ends_with(P, "img_mod.1") || ends_with(P, "txt_mod.1");
      const int S = mod ? 6 : 1;
      const int64_t N = qi.shape[0] * 4, K = qi.shape[1] * int64_t(dtype_size(qi.dtype)) / 2;
      const DType sd = ck.info(l.key.at("wscales")).dtype;
      const bool has_bias = l.key.count("bias") != 0;
      const DType bd = has_bias ? (ck.info(l.key.at("bias")).dtype == DType::F32 ? sd : ck.info(l.key.at("bias")).dtype) : sd;
      QuantConfig cfg;
      cfg.format = "awq_w4a16";
      cfg.group_size = 64;
      Unit u;
      std::vector<std::pair<std::string, std::pair<DType, Shape>>> decl = {
          {"weight", {DType::I8, {N, K / 2}}}, {"weight_scale", {sd, {K / 64, N}}}, {"weight_zeros", {sd, {K / 64, N}}}};
      if (has_bias) decl.push_back({"bias", {bd, {N}}});
      add_layer_decls(u, P, decl, cfg);
      const bool minus_one = o.mod_scale_shift && mod;
      auto* rep = &r;
      u.make = [&ck, l, S, minus_one, cfg, rep, P] {
        ZeroRounding zr;
        AwqW4A16Params p = import_nunchaku_awq(ck.get(l.key.at("qweight")), ck.get(l.key.at("wscales")),
                                               ck.get(l.key.at("wzeros")), l.key.count("bias") ? ck.get(l.key.at("bias")) : Tensor(),
                                               S, minus_one, &zr, P);
        rep->zeros.merge(zr);
        TensorList t;
        append_layer(t, P, layer_tensors(p), cfg);
        return t;
      };
      units.push_back(std::move(u));
      r.layers.push_back({P, P, "awq_w4a16", N, K, 0, 64,
                          mod ? (minus_one ? "chunks [D,6]→[6,D], bias of scale chunks −1" : "chunks [D,6]→[6,D]") : ""});
      continue;
    }
    // SVDQuant INT4.
    const int64_t Np = qi.shape[0], Kp = qi.shape[1] * 2;
    std::vector<std::string> outs = {P};
    std::string base = P;
    const bool qkv = ends_with(P, "attn.to_qkv"), add_qkv = ends_with(P, "attn.add_qkv_proj");
    if (qkv || add_qkv) {
      base = P.substr(0, P.rfind('.') + 1);
      outs = qkv ? std::vector<std::string>{base + "to_q", base + "to_k", base + "to_v"}
                 : std::vector<std::string>{base + "add_q_proj", base + "add_k_proj", base + "add_v_proj"};
    }
    const bool fc2 = ends_with(P, "img_mlp.net.2") || ends_with(P, "txt_mlp.net.2");
    const bool fc1 = ends_with(P, "img_mlp.net.0.proj") || ends_with(P, "txt_mlp.net.0.proj");
    const int64_t Dl = D ? D : 0;
    int64_t N = Np, K = Kp;
    if (Dl) {
      if (qkv || add_qkv) { N = 3 * Dl; K = Dl; }
      else if (fc1) { N = (Np - 4 * Dl >= 0 && Np - 4 * Dl < 128) ? 4 * Dl : Np; K = Dl; }
      else if (fc2) { K = (Kp - 4 * Dl >= 0 && Kp - 4 * Dl < 128) ? 4 * Dl : Kp; N = Dl; }
      else { N = Dl; K = Dl; }
    }
    if ((qkv || add_qkv) && N % 3)
      throw Error(fmt::format("{}: layer '{}' has {} outputs, not 3 equal parts; pass --hidden D", in, P, N));
    std::vector<int64_t> splits;
    if (qkv || add_qkv) splits = {N / 3, N / 3, N / 3};
    else splits = {N};
    // Rank: scan once here (cheap) so that the output header is known.
    NunchakuW4A4Source src{ck.get(l.key.at("qweight")), ck.get(l.key.at("wscales")), ck.get(l.key.at("smooth")),
                           ck.get(l.key.at("proj_down")), ck.get(l.key.at("proj_up")),
                           l.key.count("bias") ? ck.get(l.key.at("bias")) : Tensor()};
    const DType dt = src.wscales.dtype();
    // Determine R by a dry import of one row's worth? The scan lives in import_nunchaku_w4a4; run it
    // lazily and check against the declared R (computed the same way below).
    int64_t R = 0;
    {
      auto probe = import_nunchaku_w4a4(src, N, K, splits, 0, fc2, P);
      R = probe.front().R;
    }
    Unit u;
    QuantConfig cfg;
    cfg.format = "svdquant_w4a4";
    cfg.lowrank_branch_input_basis = "raw";
    cfg.proj_down_smooth_folded = true;
    if (fc2) cfg.act_unsigned = true;
    const DType bd = src.bias.defined() ? src.bias.dtype() : dt;
    for (size_t i = 0; i < outs.size(); ++i) {
      const int64_t Nm = splits[i];
      std::vector<std::pair<std::string, std::pair<DType, Shape>>> decl = {
          {"weight", {DType::I8, {Nm, K / 2}}}, {"weight_scale", {dt, {K / 64, Nm}}}, {"smooth_factor", {dt, {K}}},
          {"proj_down", {dt, {K, R}}},          {"proj_up", {dt, {Nm, R}}}};
      if (src.bias.defined()) decl.push_back({"bias", {bd, {Nm}}});
      add_layer_decls(u, outs[i], decl, cfg);
      r.layers.push_back({P, outs[i], "svdquant_w4a4", Nm, K, R, 64,
                          std::string(outs.size() > 1 ? "split of fused qkv" : "") + (fc2 ? "act_unsigned" : "")});
    }
    u.make = [src, N, K, splits, R, fc2, outs, cfg, P] {
      auto ps = import_nunchaku_w4a4(src, N, K, splits, R, fc2, P);
      TensorList t;
      for (size_t i = 0; i < ps.size(); ++i) append_layer(t, outs[i], layer_tensors(ps[i]), cfg);
      return t;
    };
    units.push_back(std::move(u));
  }
  std::map<std::string, std::string> meta;
  for (auto& [k, v] : ck.metadata())
    if (k == "config" || k == "model_class") meta[k] = v;
  meta["nibble_import"] = "nunchaku";
  return write_units(out, units, meta, r);
}

}  // namespace

ImportReport import_checkpoint(const std::string& in, const std::string& out, const ImportOptions& o) {
  if (o.format == "autoawq") return import_autoawq(in, out, o);
  if (o.format == "nunchaku") return import_nunchaku(in, out, o);
  throw Error(fmt::format("import: unknown format '{}' (supported: autoawq, nunchaku)", o.format));
}

std::string import_report_json(const ImportReport& r) {
  nlohmann::ordered_json j;
  j["format"] = r.format;
  if (!r.arch.empty()) j["arch"] = r.arch;
  j["tensors_written"] = r.tensors_written;
  j["tensors_copied"] = r.tensors_copied;
  j["file_size"] = r.file_size;
  j["zeros"] = {{"total", r.zeros.total}, {"rounded", r.zeros.rounded}, {"max_abs", r.zeros.max_abs},
                {"max_rel_scale", r.zeros.max_rel_scale}};
  j["notes"] = r.notes;
  auto& L = j["layers"] = nlohmann::ordered_json::array();
  for (const auto& l : r.layers)
    L.push_back({{"source", l.source}, {"name", l.name}, {"format", l.format}, {"out_features", l.N},
                 {"in_features", l.K}, {"rank", l.R}, {"group_size", l.group_size}, {"note", l.note}});
  return j.dump(2);
}

}  // namespace nibble
