// The library thread pool: caller + (n-1) workers, an atomic task counter, spin-then-wait wakeups.
#include "nibble/thread_pool.h"

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "nibble/error.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define NIBBLE_PAUSE() _mm_pause()
#else
#define NIBBLE_PAUSE() std::this_thread::yield()
#endif

namespace nibble {

namespace {

using Clock = std::chrono::steady_clock;

int default_threads() {
  if (const char* env = std::getenv("NIBBLE_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}

double default_spin() {
  const char* env = std::getenv("NIBBLE_SPIN_MS");
  if (!env || !*env) return kDefaultSpinMs;
  double ms = 0;
  if (!parse_spin_ms(env, &ms))
    throw Error(fmt::format("NIBBLE_SPIN_MS={}: expected a number of milliseconds in [0, {}]", env, kMaxSpinMs));
  return ms;
}

// Spin time in nanoseconds; read by the workers at the end of every region.
std::atomic<int64_t>& spin_ns_slot() {
  static std::atomic<int64_t> ns{int64_t(std::llround(default_spin() * 1e6))};
  return ns;
}

thread_local bool t_in_task = false;

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() {
    std::lock_guard<std::mutex> lk(run_mu_);
    stop_workers();
  }

  int size() const { return n_threads_.load(std::memory_order_relaxed); }

  void resize(int n) {
    if (t_in_task) throw Error("set_num_threads: called from inside a parallel_for task");
    // run_mu_ serializes resize against parallel regions: workers are only stopped and started
    // between regions, and n_threads_ changes only here.
    std::lock_guard<std::mutex> lk(run_mu_);
    n = n < 1 ? 1 : n;
    if (n == n_threads_.load(std::memory_order_relaxed) && int(workers_.size()) == n - 1) return;
    stop_workers();
    n_threads_.store(n, std::memory_order_relaxed);
    stop_.store(false);
    // Workers start from the current (even) generation, read here: a worker that starts late
    // must not mistake the first parallel region for one it has already done.
    const uint64_t g0 = generation_.load();
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, g0] { worker_loop(g0); });
  }

  void run(int64_t n_tasks, FunctionRef<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    if (n_tasks == 1 || t_in_task || n_threads_.load(std::memory_order_relaxed) == 1) {
      serial(n_tasks, fn);
      return;
    }
    std::unique_lock<std::mutex> lk(run_mu_);  // one parallel region at a time
    if (workers_.empty()) {  // resized to one thread after the unlocked check above
      lk.unlock();
      serial(n_tasks, fn);
      return;
    }
    // Generation protocol: odd = the region's state is being rewritten, even = published.
    // A worker joins a region only if the generation is still the even value it saw after
    // announcing itself in `active_`; the caller rewrites the state only once no worker is active.
    // So the caller waits for the *tasks*, never for sleeping workers to check in (on a loaded
    // host a descheduled worker could otherwise cost milliseconds per call).
    generation_.fetch_add(1);  // odd: setup
    while (active_.load() != 0) NIBBLE_PAUSE();
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0);
    done_.store(0);
    error_ = nullptr;
    generation_.fetch_add(1);  // even: published
    generation_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) != n_tasks) NIBBLE_PAUSE();
    std::exception_ptr err;
    {
      std::lock_guard<std::mutex> elk(err_mu_);
      err = error_;
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  static void serial(int64_t n_tasks, FunctionRef<void(int64_t)>& fn) {
    const bool prev = t_in_task;
    t_in_task = true;
    try {
      for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    } catch (...) {
      t_in_task = prev;
      throw;
    }
    t_in_task = prev;
  }

  void work() {
    const bool prev = t_in_task;
    t_in_task = true;
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tasks_) break;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
    }
    t_in_task = prev;
  }

  // True while g is a generation this worker has no business in (done, or being set up).
  static bool idle(uint64_t g, uint64_t seen) { return g == seen || (g & 1); }

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Spin for spin_ms (back-to-back kernel calls), then sleep on the generation counter. The
      // clock is read every 32 pauses (a pause is 10–150 cycles depending on the CPU).
      uint64_t g = generation_.load();
      const int64_t spin_ns = spin_ns_slot().load(std::memory_order_relaxed);
      if (spin_ns > 0 && idle(g, seen) && !stop_.load(std::memory_order_relaxed)) {
        const Clock::time_point until = Clock::now() + std::chrono::nanoseconds(spin_ns);
        for (int i = 1; idle(g, seen) && !stop_.load(std::memory_order_relaxed); ++i) {
          NIBBLE_PAUSE();
          g = generation_.load();
          if (i % 32 == 0 && Clock::now() >= until) break;
        }
      }
      if (stop_.load()) return;
      if (idle(g, seen)) {
        generation_.wait(g);
        continue;
      }
      active_.fetch_add(1);
      if (generation_.load() != g) {  // the caller began rewriting the state: retry
        active_.fetch_sub(1);
        continue;
      }
      work();
      active_.fetch_sub(1);
      seen = g;
    }
  }

  // Caller holds run_mu_.
  void stop_workers() {
    stop_.store(true);
    generation_.fetch_add(2);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::atomic<int> n_threads_{1};  // read unlocked by run()/size(), written under run_mu_
  std::vector<std::thread> workers_;
  std::mutex run_mu_, err_mu_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};
  int64_t n_tasks_ = 0;
  FunctionRef<void(int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n > 0 ? n : default_threads()); }
void parallel_for(int64_t n_tasks, FunctionRef<void(int64_t)> fn) { pool().run(n_tasks, fn); }

bool parse_spin_ms(const char* s, double* out) {
  if (!s || !*s) return false;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (end == s) return false;  // no number at all
  while (*end == ' ' || *end == '\t') ++end;
  if (*end != '\0' || !std::isfinite(v) || v < 0 || v > kMaxSpinMs) return false;
  *out = v;
  return true;
}

double spin_ms() { return double(spin_ns_slot().load(std::memory_order_relaxed)) * 1e-6; }

void set_spin_ms(double ms) {
  if (std::isnan(ms) || ms > kMaxSpinMs)
    throw Error(fmt::format("set_spin_ms: {} ms is out of range [0, {}] (negative: the default)", ms, kMaxSpinMs));
  spin_ns_slot().store(int64_t(std::llround((ms < 0 ? default_spin() : ms) * 1e6)), std::memory_order_relaxed);
}

}  // namespace nibble
