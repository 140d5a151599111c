// `nibble inspect`: per-layer table, bytes by format, and float layers a kitchen format could hold.
// See inspect.h for the design; candidate sizes follow the tensor shapes of spec §2.1 / §3.1.
#include "nibble/inspect.h"

#include <fmt/format.h>

#include <regex>

#include <nlohmann/json.hpp>

namespace nibble {

namespace {

const std::regex& awq_candidate_re() {
  // Qwen-Image (img_mod.1), FLUX.1 (double/single block modulation.lin): the converter's presets.
  static const std::regex re(R"((^|\.)((img_mod|txt_mod)\.1|(img_mod|txt_mod)\.lin|single_blocks\.\d+\.modulation\.lin)$)");
  return re;
}
const std::regex& svdquant_candidate_re() {
  static const std::regex re(
      R"((^|\.)(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)|(img_mlp|txt_mlp)\.net\.(0\.proj|2))$)"
      // FLUX.1 and Wan 2.x (nibble convert --preset flux / wan)
      R"(|(^|\.)double_blocks\.\d+\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.(0|2))$)"
      R"(|(^|\.)single_blocks\.\d+\.(linear1|linear2)$)"
      R"(|(^|\.)blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))$)");
  return re;
}

void set_candidate(InspectRow& row, const QuantizedLayer& l) {
  const int64_t N = l.N, K = l.K;
  const uint64_t bias = l.bias.defined() ? uint64_t(N) * 2 : 0;  // bias stored in bf16
  if (K % 64 != 0) return;
  if (std::regex_search(row.name, awq_candidate_re())) {
    row.candidate = "awq_w4a16";
    row.candidate_bytes = uint64_t(N) * K / 2 + 2 * uint64_t(K / 64) * N * 2 + bias;
  } else if (std::regex_search(row.name, svdquant_candidate_re())) {
    const int64_t R = kInspectCandidateRank;
    row.candidate = "svdquant_w4a4";
    row.candidate_bytes = uint64_t(N) * K / 2 + uint64_t(K / 64) * N * 2 + uint64_t(K) * 2 +
                          uint64_t(K) * R * 2 + uint64_t(N) * R * 2 + bias;
  }
  if (row.candidate_bytes >= row.bytes) {  // not worth it (tiny layers)
    row.candidate.clear();
    row.candidate_bytes = 0;
  }
}

bool takes_act_unsigned(const std::string& format) {
  const FormatInfo* f = find_format(format);
  return f && f->has_act_unsigned;
}

std::string layout_of(const QuantizedLayer& l) {
  if (l.format && l.format->supports_tile_layout) return l.tile_packed ? "tile" : "natural";
  return l.config.layout.empty() ? "-" : l.config.layout;
}

}  // namespace

std::string human_bytes(uint64_t b) {
  if (b < 1024) return fmt::format("{} B", b);
  if (b < 1024ull * 1024) return fmt::format("{:.1f} KiB", b / 1024.0);
  if (b < 1024ull * 1024 * 1024) return fmt::format("{:.2f} MiB", b / (1024.0 * 1024.0));
  return fmt::format("{:.2f} GiB", b / (1024.0 * 1024.0 * 1024.0));
}

InspectReport inspect_checkpoint(const Checkpoint& ckpt, const std::string& filter) {
  std::regex re;
  if (!filter.empty()) {
    try {
      re = std::regex(filter, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw Error(fmt::format("--filter '{}': not a valid regular expression ({})", filter, e.what()));
    }
  }
  InspectReport rep;
  rep.path = ckpt.path();
  rep.tensor_count = ckpt.names().size();
  rep.tensor_bytes = ckpt.total_bytes();
  for (const LayerSource& src : collect_layers(ckpt)) {
    if (!filter.empty() && !std::regex_search(src.name, re)) continue;
    const QuantizedLayer l = bind_layer(src);
    InspectRow row;
    row.name = l.name;
    row.N = l.N;
    row.K = l.K;
    row.bytes = l.storage_bytes();
    row.bits_per_weight = l.N * l.K > 0 ? double(row.bytes) * 8.0 / double(l.N * l.K) : 0.0;
    row.warnings = l.warnings;
    if (l.format) {
      row.format = l.format->name;
      row.group_size = l.group_size;
      if (row.group_size == 0) row.group_size = l.format->fixed_group_size;  // fixed by the format (0: none)
      row.rank = l.rank;
      row.act_unsigned = l.act_unsigned;
      row.layout = layout_of(l);
      auto& f = rep.by_format[row.format];
      f.first += 1;
      f.second += row.bytes;
      rep.quantized_bytes += row.bytes;
      rep.quantized.push_back(std::move(row));
    } else {
      row.format = std::string(dtype_name(l.param("weight").dtype()));
      row.layout = "-";
      set_candidate(row, l);
      if (!row.candidate.empty()) rep.candidate_saving += row.bytes - row.candidate_bytes;
      rep.float_bytes += row.bytes;
      rep.float_layers.push_back(std::move(row));
    }
  }
  return rep;
}

std::string inspect_text(const InspectReport& r) {
  std::string s = fmt::format("{}: {} tensors, {}\n", r.path, r.tensor_count, human_bytes(r.tensor_bytes));
  size_t w = 5;
  for (const auto& row : r.quantized) w = std::max(w, row.name.size());
  if (!r.quantized.empty()) {
    s += fmt::format("{:<{}}  {:<15} {:>13} {:>5} {:>4} {:>8} {:<8} {:>12} {:>6}\n", "layer", w, "format", "N x K",
                     "group", "rank", "unsigned", "layout", "bytes", "bits/w");
    for (const auto& row : r.quantized) {
      s += fmt::format("{:<{}}  {:<15} {:>13} {:>5} {:>4} {:>8} {:<8} {:>12} {:>6.2f}\n", row.name, w, row.format,
                       fmt::format("{}x{}", row.N, row.K), row.group_size ? fmt::format("{}", row.group_size) : "-",
                       row.rank ? fmt::format("{}", row.rank) : "-",
                       takes_act_unsigned(row.format) ? (row.act_unsigned ? "yes" : "no") : "-", row.layout, row.bytes,
                       row.bits_per_weight);
      for (const auto& warn : row.warnings) s += fmt::format("  note: {}: {}\n", row.name, warn);
    }
  } else {
    s += "no quantized layers\n";
  }
  s += "summary:\n";
  for (const auto& [f, nb] : r.by_format)
    s += fmt::format("  {:<16} {:>5} layers  {:>12}\n", f, nb.first, human_bytes(nb.second));
  s += fmt::format("  {:<16} {:>5} layers  {:>12}\n", "quantized total", r.quantized.size(),
                   human_bytes(r.quantized_bytes));
  s += fmt::format("  {:<16} {:>5} layers  {:>12}\n", "float linears", r.float_layers.size(),
                   human_bytes(r.float_bytes));
  s += fmt::format("  {:<16} {:>5} tensors {:>12}\n", "checkpoint", r.tensor_count, human_bytes(r.tensor_bytes));
  size_t n_cand = 0;
  for (const auto& row : r.float_layers) n_cand += !row.candidate.empty();
  if (n_cand) {
    s += fmt::format("float layers a kitchen format could hold: {} (would save {}; svdquant at rank {})\n", n_cand,
                     human_bytes(r.candidate_saving), kInspectCandidateRank);
    size_t cw = 0;
    for (const auto& row : r.float_layers)
      if (!row.candidate.empty()) cw = std::max(cw, row.name.size());
    for (const auto& row : r.float_layers)
      if (!row.candidate.empty())
        s += fmt::format("  {:<{}}  {} {}x{} -> {}: {} -> {} (saves {})\n", row.name, cw, row.format, row.N, row.K,
                         row.candidate, human_bytes(row.bytes), human_bytes(row.candidate_bytes),
                         human_bytes(row.bytes - row.candidate_bytes));
  } else {
    s += "float layers a kitchen format could hold: none\n";
  }
  return s;
}

std::string inspect_json(const InspectReport& r) {
  using nlohmann::ordered_json;
  auto row_json = [](const InspectRow& row) {
    ordered_json j;
    j["name"] = row.name;
    j["format"] = row.format;
    j["N"] = row.N;
    j["K"] = row.K;
    j["group_size"] = row.group_size;
    j["rank"] = row.rank;
    j["act_unsigned"] = row.act_unsigned;
    j["layout"] = row.layout;
    j["bytes"] = row.bytes;
    j["bits_per_weight"] = row.bits_per_weight;
    if (!row.candidate.empty()) {
      j["candidate"] = row.candidate;
      j["candidate_bytes"] = row.candidate_bytes;
    }
    if (!row.warnings.empty()) j["warnings"] = row.warnings;
    return j;
  };
  ordered_json j;
  j["path"] = r.path;
  j["tensor_count"] = r.tensor_count;
  j["tensor_bytes"] = r.tensor_bytes;
  j["layers"] = ordered_json::array();
  for (const auto& row : r.quantized) j["layers"].push_back(row_json(row));
  j["float_layers"] = ordered_json::array();
  for (const auto& row : r.float_layers) j["float_layers"].push_back(row_json(row));
  ordered_json bf = ordered_json::object();
  for (const auto& [f, nb] : r.by_format) bf[f] = {{"layers", nb.first}, {"bytes", nb.second}};
  j["summary"] = {{"bytes_by_format", bf},
                  {"quantized_layers", r.quantized.size()},
                  {"quantized_bytes", r.quantized_bytes},
                  {"float_layers", r.float_layers.size()},
                  {"float_bytes", r.float_bytes},
                  {"candidate_saving_bytes", r.candidate_saving},
                  {"candidate_rank", kInspectCandidateRank}};
  return j.dump(2) + "\n";
}

}  // namespace nibble
