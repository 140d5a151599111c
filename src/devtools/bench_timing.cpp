// Timing helpers of the benchmarks (see devtools/bench_timing.h).
#include "devtools/bench_timing.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>

#include "nibble/thread_pool.h"

namespace nibble::bench {

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

double best(const std::vector<double>& v) { return v.empty() ? double(NAN) : *std::min_element(v.begin(), v.end()); }

double median_seconds(int repeats, const std::function<void()>& fn) {
  if (repeats < 1) repeats = 1;
  fn();  // warm-up: pool wake-up, page faults of fresh outputs
  std::vector<double> t;
  t.reserve(size_t(repeats));
  for (int i = 0; i < repeats; ++i) {
    const double t0 = now_seconds();
    fn();
    t.push_back(now_seconds() - t0);
  }
  return median(std::move(t));
}

void settle_pools(bool wake) {
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!wake) return;
  // a short busy region on every worker: they leave their sleep and spin for the next call
  parallel_for(int64_t(num_threads()) * 2, [](int64_t) {
    const double t0 = now_seconds();
    while (now_seconds() - t0 < 2e-4) {
    }
  });
}

std::vector<Timing> time_interleaved(int repeats, const std::vector<InterleavedCase>& cases) {
  if (repeats < 1) repeats = 1;
  auto run_case = [&](size_t f, int i) -> double {
    if (cases[f].foreign_pool) settle_pools(false);
    const double t0 = now_seconds();
    cases[f].run(i);
    const double dt = now_seconds() - t0;
    if (cases[f].foreign_pool) settle_pools(true);
    return dt;
  };
  const size_t n = cases.size();
  for (size_t f = 0; f < n; ++f) (void)run_case(f, 0);  // warm-up round
  std::vector<std::vector<double>> t(n);
  // A fresh order per repetition (fixed seed: reproducible). Rotating one fixed order kept every
  // case's predecessor the same, so the case after the read probe always paid for the probe's sweep
  // (measured: the AWQ M = 1 layer read 3–5 % slower in that slot, whichever caller path sat there).
  std::mt19937 rng(20261130);
  std::vector<size_t> order(n);
  for (size_t j = 0; j < n; ++j) order[j] = j;
  for (int i = 0; i < repeats; ++i) {
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t f : order) t[f].push_back(run_case(f, i + 1));
  }
  std::vector<Timing> out;
  for (auto& v : t) out.push_back(Timing{median(v), best(v), v});
  return out;
}

double paired_ratio(const Timing& a, const Timing& b) {
  const size_t n = std::min(a.runs.size(), b.runs.size());
  std::vector<double> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = a.runs[i] / b.runs[i];
  return median(std::move(r));
}

double load_average() {
  double v = NAN;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &v) != 1) v = NAN;
    std::fclose(f);
  }
  return v;
}

}  // namespace nibble::bench
