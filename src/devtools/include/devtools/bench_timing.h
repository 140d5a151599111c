// devtools/bench_timing.h — clocks, medians and interleaved timing for the benchmarks.
//
// The host is shared and its bandwidth drifts over seconds, so benchmarks report ratios of cases
// timed moments apart: time_interleaved() runs every case once per repetition (rotating the order)
// and keeps every run, paired_ratio() takes the median of per-repetition ratios. median() is the
// one median used everywhere (mean of the two middle values for an even count).
//
// Part of nibble_devtools (not of libnibble). Not thread-safe: call from one thread.
#pragma once
#include <chrono>
#include <functional>
#include <vector>

namespace nibble::bench {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The median of `v` (NaN when empty): the middle value, or the mean of the two middle values for an
// even count. Takes a copy (the caller's order is kept).
double median(std::vector<double> v);
// The smallest value (NaN when empty).
double best(const std::vector<double>& v);

// Runs `fn` once untimed (warm-up), then `repeats` timed runs; returns the median in seconds.
double median_seconds(int repeats, const std::function<void()>& fn);

// Median and best of the timed runs (the best shows the hardware when the shared host let the run
// through unpreempted; the median is what a user sees), and every run in repetition order.
struct Timing {
  double median = 0, best = 0;
  std::vector<double> runs;
};
// Median over repetitions of a.runs[i] / b.runs[i] (two cases of one time_interleaved call).
double paired_ratio(const Timing& a, const Timing& b);

// A case of an interleaved timing. `run(i)` gets the run index (0 = the warm-up round), to rotate
// among operand copies. A case that runs on another library's threads (OpenBLAS) sets
// foreign_pool: two thread pools that spin after their calls steal cores from each other, so around
// such a case the timing waits, untimed, until nibble's workers are asleep (before) and the other
// pool's are (after), then wakes nibble's pool again.
struct InterleavedCase {
  std::function<void(int)> run;
  bool foreign_pool = false;
};
// Each repetition runs every case once, in a fresh shuffled order (whatever follows a large sweep runs
// a few % slower; shuffling gives every case every predecessor), after one untimed warm-up round.
std::vector<Timing> time_interleaved(int repeats, const std::vector<InterleavedCase>& cases);
// Sleeps past both pools' spin windows and, with wake = true, gets nibble's workers spinning again.
void settle_pools(bool wake);

// The 1-minute load average (/proc/loadavg; NaN if unavailable): every report says how busy the
// shared host was.
double load_average();

}  // namespace nibble::bench
