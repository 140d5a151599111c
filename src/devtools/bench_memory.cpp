// Memory yardsticks of the benchmarks (see devtools/bench_memory.h).
#include "devtools/bench_memory.h"

#include <fmt/format.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "devtools/bench_timing.h"
#include "nibble/error.h"
#include "nibble/thread_pool.h"

namespace nibble::bench {
namespace {

// XORs 64-byte lines into independent accumulators so the loop is load bound, not latency bound.
__attribute__((target("avx512f"))) uint64_t read_sum_avx512(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
  }
  a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a0);
  uint64_t r = 0;
  for (uint64_t v : lanes) r ^= v;
  return r;
}

__attribute__((target("avx2"))) uint64_t read_sum_avx2(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256((__m256i*)lanes, a0);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

uint64_t read_sum(const uint8_t* p, size_t n) {
  static const bool has512 = __builtin_cpu_supports("avx512f");
  static const bool has2 = __builtin_cpu_supports("avx2");
  if (has512) return read_sum_avx512(p, n);
  if (has2) return read_sum_avx2(p, n);
  uint64_t r = 0;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    r ^= v;
  }
  return r;
}

volatile uint64_t g_sink;

}  // namespace

// Whole 1 MiB chunks: enough tasks for load balance, each long enough to stream.
ReadProbe::ReadProbe(size_t bytes) : bytes_(std::max<size_t>(bytes & ~size_t((1 << 20) - 1), size_t(1) << 20)) {
  p_ = static_cast<uint8_t*>(std::aligned_alloc(64, bytes_));
  if (!p_) throw Error(fmt::format("bench: cannot allocate {} bytes", bytes_));
  for (size_t i = 0; i < bytes_; ++i) p_[i] = uint8_t(i * 131u + 7u);  // real pages, not the zero page
  sinks_.assign(bytes_ >> 20, 0);
}
ReadProbe::~ReadProbe() { std::free(p_); }
void ReadProbe::sweep() {
  const size_t chunk = size_t(1) << 20;
  parallel_for(int64_t(bytes_ / chunk), [&](int64_t c) { sinks_[size_t(c)] ^= read_sum(p_ + size_t(c) * chunk, chunk); });
  g_sink = sinks_[0];
}

double read_bandwidth_gbs(size_t buffer_bytes, size_t min_total_bytes, int trials) {
  ReadProbe probe(buffer_bytes);
  const size_t bytes = probe.bytes();
  trials = std::max(1, trials);
  const int sweeps_per_pass = int(std::max<size_t>(1, (min_total_bytes / size_t(trials) + bytes - 1) / bytes));
  probe.sweep();  // warm-up (pool, TLB)
  double top = 0;
  for (int t = 0; t < trials; ++t) {
    const double t0 = now_seconds();
    for (int s = 0; s < sweeps_per_pass; ++s) probe.sweep();
    top = std::max(top, double(bytes) * sweeps_per_pass / (now_seconds() - t0) / 1e9);
  }
  return top;
}

size_t l3_bytes() {
  if (const char* e = std::getenv("NIBBLE_BENCH_L3"); e && *e) {
    const long long v = std::atoll(e);
    if (v > 0) return size_t(v);
  }
  return size_t(32) << 20;
}

int copies_to_defeat_cache(size_t bytes_per_copy) {
  if (bytes_per_copy == 0) return 2;
  const size_t need = 2 * l3_bytes();
  return int(std::max<size_t>(2, (need + bytes_per_copy - 1) / bytes_per_copy + 1));
}

RotatingCopies::RotatingCopies(const std::vector<Tensor>& originals, int n_copies) {
  for (auto& t : originals)
    if (t.defined()) bytes_ += t.nbytes();
  n_copies = std::max(1, n_copies);
  sets_.reserve(size_t(n_copies));
  for (int i = 0; i < n_copies; ++i) {
    std::vector<Tensor> set;
    // weight copies allocated as the runtime allocates its prepared weights (huge pages when granted)
    for (auto& t : originals) {
      if (!t.defined()) {
        set.emplace_back();
        continue;
      }
      Tensor c = Tensor::empty_weights(t.dtype(), t.shape());
      std::memcpy(c.mutable_raw(), t.raw(), t.nbytes());
      set.push_back(std::move(c));
    }
    sets_.push_back(std::move(set));
  }
}

ProcessMemory process_memory() {
  ProcessMemory m;
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return m;
  char line[256];
  while (std::fgets(line, sizeof line, f)) {
    unsigned long long kb = 0;
    if (std::sscanf(line, "VmRSS: %llu kB", &kb) == 1) m.rss = kb << 10;
    else if (std::sscanf(line, "RssAnon: %llu kB", &kb) == 1) m.anon = kb << 10;
    else if (std::sscanf(line, "RssFile: %llu kB", &kb) == 1) m.file = kb << 10;
  }
  std::fclose(f);
  return m;
}

}  // namespace nibble::bench
