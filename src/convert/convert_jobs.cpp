// convert_jobs.cpp — stage 3 of the converter: one job (a layer, or layers sharing their input)
// loaded from the checkpoint and quantized in memory with the quantizers of quantize.cpp. Jobs are
// pure functions of their input and options, so the output bytes do not depend on how the output
// stage batches them over the pool.
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

namespace nibble::convert_detail {
namespace {


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
  const ActStats* stats = nullptr;
  if (!job.calib_key.empty()) stats = &calib.at(job.calib_key);
  if (job.format == "awq_w4a16") {
    AwqQuantOptions ao;
    ao.group_size = r.group_size;
    ao.scale_dtype = kStoreDtype;
    ao.calib = stats;
    ao.improved_search = o.search != "legacy";
    ao.gptq = o.gptq;
    ao.gptq_damp = o.gptq_damp;
    double err = 0;
    QuantInfo info;
    ao.weight_rel_error = &err;
    ao.info = &info;
    AwqW4A16Params p = quantize_awq_w4a16(Ws[0], Bs[0], ao);
    std::map<std::string, Tensor> t;
    for (auto& [k, v] : layer_tensors(p)) t[k] = v;
    res.tensors.push_back(t);
    LayerResult lr{job.members[0], job.format, p.N, p.K, 0, 0, err, 0, 0, info};
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
    so.gptq = o.gptq;
    so.gptq_damp = o.gptq_damp;
    if (o.search == "legacy") {
      so.alpha_grid = {0.3f, 0.4f, 0.5f, 0.6f, 0.7f};
      so.fine_search = false;
      so.refit_lowrank = false;
      so.noise_aware = false;
      so.scale_search = false;
    }
    std::vector<double> errs;
    std::vector<QuantInfo> infos;
    so.weight_rel_errors = &errs;
    so.info = &infos;
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
      res.layers.push_back({job.members[i], job.format, ps[i].N, ps[i].K, 0, 0, errs[i], 0, ps[i].R,
                          i < infos.size() ? infos[i] : QuantInfo{}});
    }
  }
  for (const auto& w : Ws) release_pages(w);
  for (const auto& b : Bs) release_pages(b);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& l : res.layers) l.seconds = s / double(res.layers.size());
  return res;
}

}  // namespace

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

}  // namespace nibble::convert_detail
