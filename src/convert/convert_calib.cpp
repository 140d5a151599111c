// convert_calib.cpp — stage 2 of the converter: the --calib statistics (docs/convert.md): the file
// format, the accumulator behind `nibble calib`, and which statistics belong to which layer.
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


namespace convert_detail {

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

}  // namespace convert_detail
}  // namespace nibble
