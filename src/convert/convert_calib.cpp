// convert_calib.cpp — stage 2 of the converter: the --calib statistics (docs/convert.md): the file
// format, the accumulator behind `nibble calib`, and which statistics belong to which layer.
#include <algorithm>
#include <limits>
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
    if (dot == std::string::npos)
      throw Error(fmt::format("{}: calibration tensor '{}' is not named <layer>.<statistic>", path, t.name));
    const std::string layer = t.name.substr(0, dot), stat = t.name.substr(dot + 1);
    if (!is_float(t.dtype))
      throw Error(fmt::format("{}: calibration tensor {} must be float, got {}", path, t.name, dtype_name(t.dtype)));
    Tensor v = f->get(t.name).to(DType::F32);
    ActStats& s = out[layer];
    if (stat == "mean_abs" || stat == "max_abs" || stat == "mean_sq" || stat == "min" || stat == "max") {
      if (t.shape.size() != 1) throw Error(fmt::format("{}: {} must be 1-D (K), got {}", path, t.name, shape_str(t.shape)));
      (stat == "mean_abs" ? s.mean_abs : stat == "max_abs" ? s.max_abs : stat == "mean_sq" ? s.mean_sq
                                                          : stat == "min"    ? s.min : s.max) = v;
    } else if (stat == "sample") {
      if (t.shape.size() != 2) throw Error(fmt::format("{}: {} must be 2-D (M, K), got {}", path, t.name, shape_str(t.shape)));
      s.sample = v;
    } else {
      throw Error(fmt::format("{}: unknown statistic '{}' in {} (expected mean_abs, max_abs, mean_sq, min, max, sample)",
                              path, stat, t.name));
    }
  }
  for (const auto& [layer, s] : out) {  // every statistic of a layer has the same K
    int64_t K = -1;
    for (const Tensor* t : {&s.mean_abs, &s.max_abs, &s.mean_sq, &s.min, &s.max, &s.sample}) {
      if (!t->defined()) continue;
      const int64_t k = t->size(-1);
      if (K >= 0 && k != K)
        throw Error(fmt::format("{}: the statistics of {} disagree on the channel count ({} vs {})", path, layer, K, k));
      K = k;
    }
  }
  return out;
}

namespace {
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t hash_name(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
}  // namespace

// Statistics over every row; the sample is a reservoir (Vitter's algorithm R): after t rows, each
// of them is in the sample with probability capacity / t, whatever call it came from.
void CalibAccumulator::add(const std::string& layer, const Tensor& xin) {
  if (!xin.defined() || xin.dim() < 1 || !is_float(xin.dtype()))
    throw Error(fmt::format("calib: activations of {} must be a float tensor", layer));
  Tensor x = xin.to_f32();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  Acc& a = acc_[layer];
  if (a.sum_abs.empty()) {
    a.sum_abs.assign(size_t(K), 0.0);
    a.sum_sq.assign(size_t(K), 0.0);
    a.max_abs.assign(size_t(K), 0.f);
    a.min.assign(size_t(K), std::numeric_limits<float>::infinity());
    a.max.assign(size_t(K), -std::numeric_limits<float>::infinity());
    a.rng = seed_ ^ hash_name(layer);
  }
  if (int64_t(a.sum_abs.size()) != K)
    throw Error(fmt::format("calib: {} had {} channels, now {}", layer, a.sum_abs.size(), K));
  const float* p = x.data<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float v = p[m * K + k];
      a.sum_abs[size_t(k)] += std::fabs(v);
      a.sum_sq[size_t(k)] += double(v) * v;
      a.max_abs[size_t(k)] = std::max(a.max_abs[size_t(k)], std::fabs(v));
      a.min[size_t(k)] = std::min(a.min[size_t(k)], v);
      a.max[size_t(k)] = std::max(a.max[size_t(k)], v);
    }
    const int64_t t = a.count + m;  // rows seen before this one
    if (a.sample_rows < sample_rows_) {
      a.sample.insert(a.sample.end(), p + m * K, p + (m + 1) * K);
      ++a.sample_rows;
    } else if (sample_rows_ > 0) {
      const uint64_t j = splitmix(a.rng) % uint64_t(t + 1);
      if (j < uint64_t(sample_rows_)) std::copy(p + m * K, p + (m + 1) * K, a.sample.begin() + int64_t(j) * K);
    }
  }
  a.count += M;
}

int64_t CalibAccumulator::rows_seen(const std::string& layer) const {
  auto it = acc_.find(layer);
  return it == acc_.end() ? 0 : it->second.count;
}

std::map<std::string, ActStats> CalibAccumulator::finish(int64_t sample_rows) const {
  std::map<std::string, ActStats> out;
  for (const auto& [layer, a] : acc_) {
    const int64_t K = int64_t(a.sum_abs.size());
    ActStats s;
    s.mean_abs = Tensor::empty(DType::F32, {K});
    s.max_abs = Tensor::empty(DType::F32, {K});
    s.mean_sq = Tensor::empty(DType::F32, {K});
    s.min = Tensor::empty(DType::F32, {K});
    s.max = Tensor::empty(DType::F32, {K});
    for (int64_t k = 0; k < K; ++k) {
      s.mean_abs.mutable_data<float>()[k] = float(a.sum_abs[size_t(k)] / double(std::max<int64_t>(a.count, 1)));
      s.mean_sq.mutable_data<float>()[k] = float(a.sum_sq[size_t(k)] / double(std::max<int64_t>(a.count, 1)));
      s.max_abs.mutable_data<float>()[k] = a.max_abs[size_t(k)];
      s.min.mutable_data<float>()[k] = a.count ? a.min[size_t(k)] : 0.f;
      s.max.mutable_data<float>()[k] = a.count ? a.max[size_t(k)] : 0.f;
    }
    // Fewer rows than kept: a seeded uniform subset (partial Fisher–Yates), in their kept order.
    const int64_t rows = sample_rows < 0 ? a.sample_rows : std::min(sample_rows, a.sample_rows);
    if (rows > 0) {
      std::vector<int64_t> idx(size_t(a.sample_rows));
      for (int64_t i = 0; i < a.sample_rows; ++i) idx[size_t(i)] = i;
      if (rows < a.sample_rows) {
        uint64_t r = seed_ ^ hash_name(layer) ^ 0xa5a5a5a5ull;
        for (int64_t i = 0; i < rows; ++i)
          std::swap(idx[size_t(i)], idx[size_t(i + int64_t(splitmix(r) % uint64_t(a.sample_rows - i)))]);
        idx.resize(size_t(rows));
        std::sort(idx.begin(), idx.end());
      }
      s.sample = Tensor::empty(DType::F32, {rows, K});
      for (int64_t i = 0; i < rows; ++i)
        std::copy(a.sample.begin() + idx[size_t(i)] * K, a.sample.begin() + (idx[size_t(i)] + 1) * K,
                  s.sample.mutable_data<float>() + i * K);
    }
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
    t.emplace_back(layer + ".min", s.min);
    t.emplace_back(layer + ".max", s.max);
    if (s.sample.defined()) t.emplace_back(layer + ".sample", s.sample);
  }
  save_safetensors(path, t, {{"format", "nibble_calib_v1"}});
}

namespace convert_detail {

// Statistics named exactly like the layer, or one name a dot-suffix of the other (the checkpoint's
// `model.diffusion_model.` prefix present on one side only).
std::string find_stats_key(const std::map<std::string, ActStats>& calib, const std::string& layer) {
  if (calib.empty()) return "";
  if (calib.count(layer)) return layer;
  for (const auto& [k, v] : calib)
    if (ends_with(k, "." + layer) || ends_with(layer, "." + k)) return k;
  return "";
}
const ActStats* find_stats(const std::map<std::string, ActStats>& calib, const std::string& layer) {
  const std::string k = find_stats_key(calib, layer);
  return k.empty() ? nullptr : &calib.at(k);
}

}  // namespace convert_detail
}  // namespace nibble
