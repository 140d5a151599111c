// devtools/bench_memory.h — memory yardsticks of the benchmarks: the streaming read bandwidth,
// operand copies that defeat the last-level cache, and the process's resident memory.
//
// Part of nibble_devtools (not of libnibble). Not thread-safe: call from one thread (the probe
// itself runs on the library pool, with the same threads as the kernels).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "nibble/tensor.h"

namespace nibble::bench {

// One sweep of a dedicated buffer (> 2x L3) per call, with the widest vector loads the CPU has,
// split over the library pool: a bandwidth sample to interleave with timed cases
// (bytes() / sweep time = GB/s).
class ReadProbe {
 public:
  explicit ReadProbe(size_t bytes = size_t(256) << 20);
  ~ReadProbe();
  ReadProbe(const ReadProbe&) = delete;
  ReadProbe& operator=(const ReadProbe&) = delete;
  void sweep();
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  uint8_t* p_ = nullptr;
  std::vector<uint64_t> sinks_;
};
// Streaming read bandwidth in GB/s: the best of `trials` passes of >= min_total_bytes / trials each.
double read_bandwidth_gbs(size_t buffer_bytes = size_t(256) << 20, size_t min_total_bytes = size_t(1) << 30,
                          int trials = 3);

// Last-level cache size in bytes (default 32 MB, the host's L3); env NIBBLE_BENCH_L3 overrides.
size_t l3_bytes();
// How many copies of `bytes_per_copy` bytes exceed 2x the L3 (>= 2).
int copies_to_defeat_cache(size_t bytes_per_copy);

// Deep copies of a set of tensors, rotated per call: at(i) = copies[i % n]. Cycling through more
// bytes than the cache holds makes every call stream its operands from memory, as in a model where
// each layer runs once per step.
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

// The process's memory from /proc/self/status (bytes; 0 when unavailable): resident set, and its
// anonymous (heap: repacks, copies) and file-backed (mapped checkpoints) parts.
struct ProcessMemory {
  uint64_t rss = 0, anon = 0, file = 0;
};
ProcessMemory process_memory();

}  // namespace nibble::bench
