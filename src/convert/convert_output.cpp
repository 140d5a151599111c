// convert_output.cpp — stage 4 of the converter: streaming the planned tensors to OUT.
//
// Output tensors are written in plan order. When the next tensor belongs to a job not yet run, a
// batch of upcoming jobs whose estimated working sets fit the memory budget runs on the pool (one
// job per task, math single-threaded inside a task; a lone job uses the pool inside). Job results
// are dropped as soon as their tensors are written. Passthrough tensors are copied from the memory
// map. The writer is atomic: on any error nothing appears at OUT. The bytes depend only on input
// and options: jobs are pure functions, the batch split does not change any job's result.
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

#include <signal.h>
#include <sys/types.h>

#include <atomic>
#include <cerrno>

#include "convert_internal.h"
#include "io/atomic_file.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble {
using namespace convert_detail;

// ---- interrupted runs
// Temporary files register themselves with io::AtomicFile's cleanup table before they exist;
// shards committed before the index is written are registered here. The handler unlinks both.
namespace {
extern "C" void convert_signal_handler(int sig) {
  io::unlink_registered_paths();
  _exit(128 + sig);
}
}  // namespace

void install_convert_signal_cleanup() {
  struct sigaction sa {};
  sa.sa_handler = convert_signal_handler;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

std::vector<std::string> remove_stale_temp_files(const std::string& out) {
  namespace fs = std::filesystem;
  const fs::path t(out);
  const fs::path dir = t.has_parent_path() ? t.parent_path() : fs::path(".");
  const std::string file = t.filename().string();
  std::string stem = file;
  if (ends_with(stem, ".safetensors")) stem.resize(stem.size() - 12);
  const std::regex shard(std::regex_replace(stem, std::regex(R"([.^$|()\[\]{}*+?\\])"), R"(\$&)") +
                         R"(-\d{5}-of-\d{5}\.safetensors)");
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    const auto tp = n.rfind(".tmp-");
    if (n.empty() || n[0] != '.' || tp == std::string::npos) continue;
    const std::string base = n.substr(1, tp - 1);
    if (base != file && base != stem + ".safetensors.index.json" && !std::regex_match(base, shard)) continue;
    const std::string rest = n.substr(tp + 5);
    const auto dash = rest.find('-');
    if (dash == std::string::npos || dash == 0) continue;
    pid_t pid = 0;
    try { pid = pid_t(std::stol(rest.substr(0, dash))); } catch (const std::exception&) { continue; }
    if (pid <= 0 || pid == getpid()) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // the writer still runs (or is not ours to judge)
    if (fs::remove(e.path(), ec)) removed.push_back(e.path().string());
  }
  return removed;
}

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
    for (int s : slots_) io::unregister_cleanup_path(s);
    if (!done_)
      for (size_t k = 0; k < committed_; ++k) std::remove(paths_[k].c_str());
  }
  SafetensorsWriter& writer(const std::string& name) { return *writers_[shard_of_.at(name)]; }
  void write_tensor(const std::string& name, const Tensor& t) {
    writer(name).write_tensor(name, t);
  }
  void write(const std::string& name, const void* data, size_t n) {
    writer(name).write(name, data, n);
  }
  void commit() {
    for (; committed_ < writers_.size(); ++committed_) {
      writers_[committed_]->commit();
      if (!index_path_.empty()) slots_.push_back(io::register_cleanup_path(paths_[committed_]));  // removed if interrupted
    }
    if (!index_path_.empty()) {
      auto meta = metadata_;
      meta["total_size"] = std::to_string(total_);
      write_safetensors_index(index_path_, weight_map_, meta);
    }
    done_ = true;
  }
  const std::vector<std::string>& paths() const { return paths_; }

 private:
  std::vector<int> slots_;
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
  const std::map<std::string, ActStats>& calib = fp.calib;
  // Never write over an input file.
  for (const auto& sh : ck.shards())
    if (std::filesystem::exists(out) && std::filesystem::equivalent(sh->path(), out))
      throw Error(fmt::format("convert: output {} is an input file", out));

  for (const auto& f : remove_stale_temp_files(out))
    fp.summary.notes.push_back(fmt::format("removed {}, a temporary file left by an interrupted run", f));
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
      output.write_tensor(ot.name, t);
      release_pages(t);
      pr.bytes_before = pr.bytes_after = t.nbytes();
    } else if (!ot.json.empty()) {
      output.write(ot.name, ot.json.data(), ot.json.size());
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
      output.write_tensor(ot.name, t);
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
  auto num = [](double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); };
  j["seconds"] = r.seconds;
  j["peak_rss_bytes"] = r.peak_rss;
  j["linear_layers_found"] = r.plan.linear_layers;
  j["layers_quantized"] = r.plan.layers.size();
  j["linear_layers_kept"] = r.plan.kept_layers;
  j["tensors_total"] = r.plan.tensors_total;
  j["passthrough_tensors"] = r.plan.passthrough_tensors;
  j["bytes_in"] = r.plan.bytes_in;
  j["bytes_out"] = r.plan.bytes_out;
  j["file_size"] = r.plan.file_size;
  j["warnings"] = r.plan.warnings;
  j["notes"] = r.plan.notes;
  auto& sk = j["skipped"] = nlohmann::ordered_json::array();
  for (const auto& s : r.plan.skipped) sk.push_back({{"name", s.name}, {"reason", s.reason}});
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
    e["rule"] = lp.rule;
    if (lp.format == "svdquant_w4a4") e["act_unsigned"] = lp.act_unsigned;
    if (!lp.group.empty()) e["group"] = lp.group;
    e["calib"] = lp.calib_key.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(lp.calib_key);
    if (auto it = res.find(lp.name); it != res.end()) {
      const LayerResult& l = *it->second;
      if (lp.format == "svdquant_w4a4") {
        e["rank"] = l.rank;
        e["alpha"] = l.info.alpha >= 0 ? nlohmann::ordered_json(l.info.alpha) : nlohmann::ordered_json(nullptr);
        e["beta"] = l.info.beta >= 0 ? nlohmann::ordered_json(l.info.beta) : nlohmann::ordered_json(nullptr);
        e["alpha_on_grid_edge"] = l.info.alpha_on_edge;
      } else {
        e["clip_ratio_mean"] = l.info.clip_ratio_mean;
      }
      e["calibration_sample_rows"] = l.info.sample_rows;
      e["gptq"] = l.info.gptq;
      if (lp.format == "svdquant_w4a4") e["noise_aware_residual"] = l.info.noise_aware;
      e["snr_db_before"] = num(l.info.snr_before_db);
      if (lp.format == "svdquant_w4a4") e["snr_db_lowrank_only"] = num(l.info.snr_lowrank_db);
      e["snr_db_after"] = num(l.info.snr_after_db);
      e["weight_rel_error"] = l.weight_rel_error;
      e["seconds"] = l.seconds;
      max_err = std::max(max_err, l.weight_rel_error);
    }
    L.push_back(e);
  }
  j["max_weight_rel_error"] = max_err;
  return j.dump(2);
}

std::string convert_summary_text(const ConvertReport& r) {
  const ConvertPlan& p = r.plan;
  std::map<std::string, int64_t> by_format;
  int64_t grouped = 0, calibrated = 0, edge = 0, with_snr = 0;
  std::set<std::string> groups;
  for (const auto& l : p.layers) {
    by_format[l.format]++;
    if (!l.group.empty()) { ++grouped; groups.insert(l.group.front()); }
  }
  double snr0 = 0, snr1 = 0, max_err = 0;
  for (const auto& l : r.layers) {
    max_err = std::max(max_err, l.weight_rel_error);
    if (l.info.calibrated) ++calibrated;
    if (l.info.alpha_on_edge) ++edge;
    if (std::isfinite(l.info.snr_before_db) && std::isfinite(l.info.snr_after_db)) {
      ++with_snr;
      snr0 += l.info.snr_before_db;
      snr1 += l.info.snr_after_db;
    }
  }
  std::string fmts;
  for (const auto& [f, n] : by_format) fmts += fmt::format("{}{} {}", fmts.empty() ? "" : ", ", n, f);
  auto mib = [](uint64_t b) { return double(b) / (1024.0 * 1024.0); };
  std::string s = fmt::format(
      "linear layers: {} found, {} quantized ({}{}), {} left as they are\n"
      "tensors: {} in the output, {} of them copied unchanged; {} input tensors are not linear layers (skipped)\n",
      p.linear_layers, p.layers.size(), fmts.empty() ? "none" : fmts,
      grouped ? fmt::format("; {} of them in {} groups sharing their input", grouped, groups.size()) : "",
      p.kept_layers, p.tensors_total, p.passthrough_tensors, p.skipped.size());
  if (!r.layers.empty()) {
    s += fmt::format("calibration: {} of {} quantized layers calibrated", calibrated, r.layers.size());
    if (with_snr)
      s += fmt::format("; mean output SNR on the calibration sample {:.2f} dB before (plain int4) → {:.2f} dB after, "
                       "over {} layers", snr0 / double(with_snr), snr1 / double(with_snr), with_snr);
    if (edge) s += fmt::format("; smoothing exponent on the edge of its grid in {} layers", edge);
    s += fmt::format("\nmax weight rel. error {:.4f} (‖W_eff − W‖/‖W‖; calibration lowers output error, not this)\n", max_err);
  }
  if (r.seconds > 0)
    s += fmt::format("{:.1f} s, {:.1f} MiB → {:.1f} MiB ({:.1f} MB/s input), peak RSS {:.0f} MiB\n", r.seconds, mib(p.bytes_in),
                     mib(p.file_size), double(p.bytes_in) / 1e6 / std::max(r.seconds, 1e-9), mib(r.peak_rss));
  return s;
}

}  // namespace nibble
