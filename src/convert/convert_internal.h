// convert_internal.h — the pieces the converter's stages share (internal to src/convert/).
//
// The pipeline (nibble/convert.h, docs/convert.md), one file per stage:
//   convert_plan.cpp    rules, presets, layer discovery, the plan (every output tensor known up front)
//   convert_calib.cpp   the --calib statistics file, the accumulator, stats → layer lookup
//   convert_jobs.cpp    one job = one layer (or a group sharing its input) quantized in memory
//   convert_output.cpp  streaming the planned tensors to OUT (atomic, sharded), the report
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fmt/format.h>

#include "nibble/convert.h"
#include "nibble/formats.h"
#include "nibble/safetensors.h"

namespace nibble::convert_detail {

inline bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

inline std::regex make_regex(const std::string& pattern, const std::string& what) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw Error(fmt::format("{}: invalid regular expression '{}': {}", what, pattern, e.what()));
  }
}

inline const std::set<std::string> kRuleOpts = {"group_size", "rank", "act_unsigned", "layout", "svd", "refine"};

inline bool parse_bool(const std::string& v, const std::string& what) {
  if (v == "1" || v == "true" || v == "yes") return true;
  if (v == "0" || v == "false" || v == "no") return false;
  throw Error(fmt::format("{}: expected a boolean (1/0/true/false), got '{}'", what, v));
}
inline int64_t parse_int(const std::string& v, const std::string& what) {
  try {
    size_t pos = 0;
    const long long x = std::stoll(v, &pos);
    if (pos != v.size()) throw std::invalid_argument("trailing");
    return x;
  } catch (const std::exception&) {
    throw Error(fmt::format("{}: expected an integer, got '{}'", what, v));
  }
}

inline uint64_t peak_rss_bytes() {
  struct rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return uint64_t(ru.ru_maxrss) * 1024;
}

// Drops the input pages of a tensor we are done with from this process's resident set (clean
// file-backed pages of the read-only mapping; a later access would just fault them in again).
// Without this, RSS grows to the whole input file however small the working set is.
inline void release_pages(const Tensor& t) {
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
  std::string calib_key;              // the statistics all members use ("" = weight-only)
};

struct FullPlan {
  ConvertPlan summary;
  std::vector<OutTensor> outputs;
  std::vector<Job> jobs;
  std::map<std::string, std::string> metadata;
  std::map<std::string, ActStats> calib;  // the --calib file
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
inline Resolved resolve(const std::map<std::string, std::string>& o, const ConvertOptions& g, const std::string& layer) {
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

// ---- stages
FullPlan make_plan(const Checkpoint& ck, const ConvertOptions& o);
// Renames the svdquant side tensors to `style` (ConvertOptions::key_style; key_style.cpp).
void apply_key_style(FullPlan& fp, const std::string& style);

std::string find_stats_key(const std::map<std::string, ActStats>& calib, const std::string& layer);
const ActStats* find_stats(const std::map<std::string, ActStats>& calib, const std::string& layer);

struct JobResult {
  std::vector<std::map<std::string, Tensor>> tensors;  // per member: suffix → tensor
  std::vector<LayerResult> layers;
};
// Errors name the layer (and the input file) they happened in.
JobResult run_job(const Checkpoint& ck, const Job& job, const ConvertOptions& o,
                  const std::map<std::string, ActStats>& calib, const std::map<std::string, LayerSource>& quantized);

}  // namespace nibble::convert_detail
