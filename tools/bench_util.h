// tools/bench_util.h — shared helpers of the benchmarks (`nibble bench --op ...` and bench/*.cpp).
//
// Benchmarks here report ratios measured in one process run, because the host is shared and
// absolute figures drift by 2x between runs. The helpers give every op the same yardsticks:
//   * read_bandwidth_gbs(): the machine's streaming read limit, measured with AVX loads on the
//     library thread pool (same threads as the kernels), over >= 1 GiB of traffic;
//   * median_seconds(): median of repeated timings (robust to a stray preemption);
//   * RotatingCopies: N deep copies of an op's operands, cycled so that the weights are never
//     cache resident (total > 2x the L3 size) — what a real model sees, one layer after another;
//   * sgemm / sgemv wrappers around OpenBLAS (the fp32 peer) when it was found at build time
//     (NIBBLE_HAVE_OPENBLAS), with the thread count matched to the library pool;
//   * a tiny record table printed as aligned text or as a JSON array.
// Bench binaries under bench/ link no JSON library, so this file uses only fmt and the standard
// library; a bench/*.cpp that needs it includes "bench_util.cpp" directly (it is not part of
// libnibble).
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "nibble/tensor.h"

namespace nibble::bench {

// ---- timing
inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
// Runs `fn` once untimed (warm-up), then `repeats` timed runs; returns the median in seconds.
double median_seconds(int repeats, const std::function<void()>& fn);
// As above, but `fn(i)` gets the run index (to rotate among copies), warm-up included.
double median_seconds_indexed(int repeats, const std::function<void(int)>& fn);
// Median and best of the timed runs (the best shows the hardware when the shared host let the run
// through unpreempted; the median is what a user sees).
struct Timing {
  double median = 0, best = 0;
  std::vector<double> runs;  // time_interleaved: every timed run, in repetition order
};
// Median over repetitions of a[i] / b[i] (two cases of one time_interleaved call): the ratio of
// runs taken moments apart, the steadiest comparison on a host whose bandwidth drifts.
double paired_ratio(const Timing& a, const Timing& b);
Timing time_runs_indexed(int repeats, const std::function<void(int)>& fn);
// Interleaved timing: each repetition runs every fn once (fn(i) gets the run index; the order rotates
// by one case per repetition), after one untimed warm-up round. On a shared host whose bandwidth drifts over seconds, the cases of one
// repetition see the same machine, so ratios of their medians are far steadier than ratios of
// back-to-back blocks of runs.
std::vector<Timing> time_interleaved(int repeats, const std::vector<std::function<void(int)>>& fns);
// A case that runs on another library's threads (OpenBLAS). Two thread pools that spin after
// their calls steal cores from each other, so around such a case the timing waits, untimed, until
// nibble's workers are asleep (before) and the other pool's are (after), then wakes nibble's pool
// again, so neither side is measured while the other spins.
struct InterleavedCase {
  std::function<void(int)> run;
  bool foreign_pool = false;
};
std::vector<Timing> time_interleaved(int repeats, const std::vector<InterleavedCase>& cases);
// Sleeps past both pools' spin windows (nibble ~3.5 ms; OpenBLAS ~3 ms with the CLI's
// OPENBLAS_THREAD_TIMEOUT=23) and, with wake = true, gets nibble's workers spinning again.
void settle_pools(bool wake);

// ---- memory
// Streaming read bandwidth in GB/s (1e9 bytes/s): reads a `buffer_bytes` buffer repeatedly with the
// widest vector loads the CPU has, split over the library pool, until >= `min_total_bytes` were read;
// the best of `trials` passes (a pass is one full sweep over the buffer by all threads).
double read_bandwidth_gbs(size_t buffer_bytes = size_t(256) << 20, size_t min_total_bytes = size_t(1) << 30,
                          int trials = 3);
// One sweep of a dedicated buffer (> 2x L3) per call, same loads and threads as read_bandwidth_gbs:
// a probe sample to interleave with the timed cases (bytes() / median sweep time = bandwidth).
class ReadProbe {
 public:
  explicit ReadProbe(size_t bytes = size_t(256) << 20);
  ~ReadProbe();
  void sweep();
  size_t bytes() const { return bytes_; }
 private:
  ReadProbe(const ReadProbe&) = delete;
  ReadProbe& operator=(const ReadProbe&) = delete;
  size_t bytes_;
  uint8_t* p_ = nullptr;
  std::vector<uint64_t> sinks_;
};
// Default last-level cache size in bytes (the host: 32 MB L3); env NIBBLE_BENCH_L3 overrides.
size_t l3_bytes();
// How many copies of `bytes_per_copy` bytes exceed 2x the L3 (>= 2).
int copies_to_defeat_cache(size_t bytes_per_copy);
// Touches (reads) a buffer larger than L3 so that previously used data is evicted.
void flush_cache();

// Deep copies of a set of tensors, rotated per call: copies[i % n].
class RotatingCopies {
 public:
  RotatingCopies(const std::vector<Tensor>& originals, int n_copies);
  int size() const { return int(sets_.size()); }
  const std::vector<Tensor>& at(int i) const { return sets_[size_t(i) % sets_.size()]; }
  size_t bytes_per_copy() const { return bytes_; }
 private:
  std::vector<std::vector<Tensor>> sets_;
  size_t bytes_ = 0;
};

// The 1-minute load average (/proc/loadavg; NaN if unavailable): the host is shared, so every
// report says how busy it was.
double load_average();

// ---- the fp32 peer (OpenBLAS); available() is false when not linked
bool openblas_available();
// C (M,N) = A (M,K) · B(N,K)ᵀ, all fp32 row-major. Uses cblas_sgemv when M == 1.
// Sets OpenBLAS' thread count to nibble::num_threads(). Throws if OpenBLAS is unavailable.
void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C);

// ---- the bf16-weight baseline: y (M,N) fp32 = x (M,K) bf16 · W (N,K) bf16ᵀ, fp32 accumulation.
// The best plain bf16 GEMV we have (vdpbf16ps when the CPU has AVX-512 BF16, else AVX2 FMA on
// widened values): what a 16-bit checkpoint costs, for the speed-up of the 4-bit formats.
// Threaded over output columns on the library pool. K must be even.
void gemv_bf16_weights(int64_t M, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y);

// ---- records and their printing
struct Record {
  std::vector<std::pair<std::string, std::string>> text;  // key → string value (JSON string)
  std::vector<std::pair<std::string, double>> num;        // key → number (JSON number, NaN → null)
  Record& s(std::string k, std::string v) { text.emplace_back(std::move(k), std::move(v)); return *this; }
  Record& n(std::string k, double v) { num.emplace_back(std::move(k), v); return *this; }
};
// JSON array of objects (text fields first, then numbers, in insertion order).
std::string records_to_json(const std::vector<Record>& records);
// Aligned text table of the given columns (keys of either kind; missing → "-"); numbers are
// printed with `precision` significant decimals after the point.
std::string records_to_table(const std::vector<Record>& records, const std::vector<std::string>& columns,
                             int precision = 2);

// A benchmark shape list, "M,K,N;M,K,N;..." (--shapes); K must be a multiple of 64.
// `what` names the command in errors.
struct Shape3 { int64_t M, K, N; };
std::vector<Shape3> parse_shapes(const std::string& s, const std::string& what);

}  // namespace nibble::bench
