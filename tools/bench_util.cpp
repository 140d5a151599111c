// Shared benchmark helpers (see bench_util.h for the why).
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* used by the reduce intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "bench_util.h"

#include <fmt/format.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <thread>

#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/thread_pool.h"

#ifdef NIBBLE_HAVE_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);
#endif

namespace nibble::bench {

double median_seconds_indexed(int repeats, const std::function<void(int)>& fn) {
  return time_runs_indexed(repeats, fn).median;
}

Timing time_runs_indexed(int repeats, const std::function<void(int)>& fn) {
  if (repeats < 1) repeats = 1;
  fn(0);  // warm-up: pool wake-up, page faults of fresh outputs
  std::vector<double> t;
  t.reserve(size_t(repeats));
  for (int i = 0; i < repeats; ++i) {
    const double t0 = now_seconds();
    fn(i + 1);
    t.push_back(now_seconds() - t0);
  }
  std::sort(t.begin(), t.end());
  const size_t h = t.size() / 2;
  return Timing{t.size() % 2 ? t[h] : 0.5 * (t[h - 1] + t[h]), t.front(), {}};
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

std::vector<Timing> time_interleaved(int repeats, const std::vector<std::function<void(int)>>& fns) {
  std::vector<InterleavedCase> cases;
  for (auto& f : fns) cases.push_back({f, false});
  return time_interleaved(repeats, cases);
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
  // The starting case rotates with the repetition: whatever follows a large sweep (or runs first
  // after the caller's own work) measurably runs a few % slower, and rotation spreads that evenly.
  for (int i = 0; i < repeats; ++i)
    for (size_t j = 0; j < n; ++j) {
      const size_t f = (j + size_t(i)) % n;
      t[f].push_back(run_case(f, i + 1));
    }
  std::vector<Timing> out;
  for (auto& v : t) {
    std::vector<double> sorted = v;
    std::sort(sorted.begin(), sorted.end());
    const size_t h = sorted.size() / 2;
    out.push_back(Timing{sorted.size() % 2 ? sorted[h] : 0.5 * (sorted[h - 1] + sorted[h]), sorted.front(), v});
  }
  return out;
}

double paired_ratio(const Timing& a, const Timing& b) {
  const size_t n = std::min(a.runs.size(), b.runs.size());
  if (n == 0) return NAN;
  std::vector<double> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = a.runs[i] / b.runs[i];
  std::sort(r.begin(), r.end());
  return n % 2 ? r[n / 2] : 0.5 * (r[n / 2 - 1] + r[n / 2]);
}

double median_seconds(int repeats, const std::function<void()>& fn) {
  return median_seconds_indexed(repeats, [&](int) { fn(); });
}

// ---------------------------------------------------------------- read bandwidth
namespace {

// Sums 64-byte lines with independent accumulators so the loop is load bound, not latency bound.
__attribute__((target("avx512f"))) uint64_t read_sum_avx512(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
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
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
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

struct AlignedBuf {
  explicit AlignedBuf(size_t n) : size(n), p(static_cast<uint8_t*>(std::aligned_alloc(64, n))) {
    if (!p) throw Error(fmt::format("bench: cannot allocate {} bytes", n));
    // touch every page with non-zero data (zero pages may all map to one physical page)
    for (size_t i = 0; i < n; i += 64) p[i] = uint8_t(i >> 6);
    for (size_t i = 0; i < n; ++i) p[i] = uint8_t(i * 131u + 7u);
  }
  ~AlignedBuf() { std::free(p); }
  size_t size;
  uint8_t* p;
};

volatile uint64_t g_sink;

}  // namespace

double read_bandwidth_gbs(size_t buffer_bytes, size_t min_total_bytes, int trials) {
  ReadProbe probe(buffer_bytes);
  const size_t bytes = probe.bytes();
  const int sweeps_per_pass = int(std::max<size_t>(1, (min_total_bytes / std::max(1, trials) + bytes - 1) / bytes));
  probe.sweep();  // warm-up (pool, TLB)
  double best = 0;
  for (int t = 0; t < std::max(1, trials); ++t) {
    const double t0 = now_seconds();
    for (int s = 0; s < sweeps_per_pass; ++s) probe.sweep();
    const double dt = now_seconds() - t0;
    best = std::max(best, double(bytes) * sweeps_per_pass / dt / 1e9);
  }
  return best;
}

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

void flush_cache() {
  static AlignedBuf buf(2 * l3_bytes());
  g_sink = read_sum(buf.p, buf.size);
}

RotatingCopies::RotatingCopies(const std::vector<Tensor>& originals, int n_copies) {
  for (auto& t : originals)
    if (t.defined()) bytes_ += t.nbytes();
  sets_.reserve(size_t(std::max(1, n_copies)));
  for (int i = 0; i < std::max(1, n_copies); ++i) {
    std::vector<Tensor> set;
    for (auto& t : originals) set.push_back(t.defined() ? t.clone() : Tensor());
    sets_.push_back(std::move(set));
  }
}

double load_average() {
  double v = NAN;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &v) != 1) v = NAN;
    std::fclose(f);
  }
  return v;
}

// ---------------------------------------------------------------- OpenBLAS
bool openblas_available() {
#ifdef NIBBLE_HAVE_OPENBLAS
  return true;
#else
  return false;
#endif
}

void sgemm_nt(int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C) {
#ifdef NIBBLE_HAVE_OPENBLAS
  openblas_set_num_threads(num_threads());
  if (M == 1) {
    // y (N) = B (N,K) · x (K)
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(N), int(K), 1.0f, B, int(K), A, 1, 0.0f, C, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, A, int(K), B, int(K),
                0.0f, C, int(N));
  }
#else
  (void)M; (void)N; (void)K; (void)A; (void)B; (void)C;
  throw Error("bench: OpenBLAS was not found at build time (sgemm peer unavailable)");
#endif
}

// ---------------------------------------------------------------- bf16 baseline GEMV
namespace {

// Rows [n0, n1) for activation rows [m0, m0+MB): one 64-byte weight load feeds MB vdpbf16ps.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_rows_avx512(
    int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t full = K / 32;
  const __mmask16 tail = __mmask16((1u << ((K % 32) / 2)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      const __m512i wv = _mm512_loadu_si512(w + 32 * c);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + 32 * c));
    }
    if (tail) {
      const __m512i wv = _mm512_maskz_loadu_epi32(tail, w + 32 * full);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv,
                                  (__m512bh)_mm512_maskz_loadu_epi32(tail, x + (m0 + m) * K + 32 * full));
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

__attribute__((target("avx2,fma"))) void bf16_rows_avx2(int64_t N, int64_t K, const uint16_t* x, const uint16_t* W,
                                                        float* y, int64_t n0, int64_t n1, int64_t m) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    const uint16_t* xr = x + m * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k))), 16));
      const __m256 xv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(xr + k))), 16));
      acc = _mm256_fmadd_ps(wv, xv, acc);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    float s = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
    for (; k < K; ++k) s += bf16_to_f32(w[k]) * bf16_to_f32(xr[k]);
    y[m * N + n] = s;
  }
}

}  // namespace

void gemv_bf16_weights(int64_t M, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, float* y) {
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  const int64_t cols = 64;
  parallel_for((N + cols - 1) / cols, [&](int64_t t) {
    const int64_t n0 = t * cols, n1 = std::min(N, n0 + cols);
    if (has_bf16) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: bf16_rows_avx512<1>(N, K, x, W, y, n0, n1, m0); break;
          case 2: bf16_rows_avx512<2>(N, K, x, W, y, n0, n1, m0); break;
          case 3: bf16_rows_avx512<3>(N, K, x, W, y, n0, n1, m0); break;
          default: bf16_rows_avx512<4>(N, K, x, W, y, n0, n1, m0); break;
        }
      }
    } else {
      for (int64_t m = 0; m < M; ++m) bf16_rows_avx2(N, K, x, W, y, n0, n1, m);
    }
  });
}

// ---------------------------------------------------------------- printing
namespace {
std::string json_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\t': r += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) r += fmt::format("\\u{:04x}", int(c));
        else r += c;
    }
  }
  return r;
}
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return fmt::format("{}", int64_t(v));
  return fmt::format("{:.6g}", v);
}
}  // namespace

std::string records_to_json(const std::vector<Record>& records) {
  std::string out = "[";
  for (size_t i = 0; i < records.size(); ++i) {
    out += i ? ",\n {" : "\n {";
    bool first = true;
    for (auto& [k, v] : records[i].text) {
      out += fmt::format("{}\"{}\": \"{}\"", first ? "" : ", ", json_escape(k), json_escape(v));
      first = false;
    }
    for (auto& [k, v] : records[i].num) {
      out += fmt::format("{}\"{}\": {}", first ? "" : ", ", json_escape(k), json_number(v));
      first = false;
    }
    out += "}";
  }
  out += records.empty() ? "]\n" : "\n]\n";
  return out;
}

std::string records_to_table(const std::vector<Record>& records, const std::vector<std::string>& columns,
                             int precision) {
  std::vector<std::vector<std::string>> cells;
  cells.push_back(columns);
  for (auto& r : records) {
    std::vector<std::string> row;
    for (auto& c : columns) {
      std::string v = "-";
      for (auto& [k, s] : r.text)
        if (k == c) v = s;
      for (auto& [k, x] : r.num)
        if (k == c) {
          if (!std::isfinite(x)) v = "-";
          else if (x == std::floor(x) && std::fabs(x) < 1e12) v = fmt::format("{}", int64_t(x));
          else v = fmt::format("{:.{}f}", x, precision);
        }
      row.push_back(v);
    }
    cells.push_back(std::move(row));
  }
  std::vector<size_t> w(columns.size(), 0);
  for (auto& row : cells)
    for (size_t j = 0; j < row.size(); ++j) w[j] = std::max(w[j], row[j].size());
  std::string out;
  for (size_t i = 0; i < cells.size(); ++i) {
    for (size_t j = 0; j < cells[i].size(); ++j) out += fmt::format("{:>{}}{}", cells[i][j], w[j], j + 1 < w.size() ? "  " : "\n");
    if (i == 0) {
      for (size_t j = 0; j < w.size(); ++j) out += std::string(w[j], '-') + (j + 1 < w.size() ? "  " : "\n");
    }
  }
  return out;
}

std::vector<Shape3> parse_shapes(const std::string& s, const std::string& what) {
  std::vector<Shape3> r;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ';')) {
    if (item.empty()) continue;
    Shape3 sh{};
    int used = 0;
    if (std::sscanf(item.c_str(), "%ld,%ld,%ld%n", &sh.M, &sh.K, &sh.N, &used) != 3 || size_t(used) != item.size() || sh.M < 1 || sh.K < 64 ||
        sh.K % 64 != 0 || sh.N < 1)
      throw Error(fmt::format("{}: --shapes item '{}': expected M,K,N with K a multiple of 64 (items separated by ';')", what, item));
    r.push_back(sh);
  }
  return r;
}

}  // namespace nibble::bench
