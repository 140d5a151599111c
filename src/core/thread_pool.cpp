// The library thread pool: caller + (n-1) workers, an atomic task counter, spin-then-wait wakeups.
#include "nibble/thread_pool.h"

#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define NIBBLE_PAUSE() _mm_pause()
#else
#define NIBBLE_PAUSE() std::this_thread::yield()
#endif

namespace nibble {

namespace {

int default_threads() {
  if (const char* env = std::getenv("NIBBLE_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}

thread_local bool t_in_task = false;

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop_workers(); }

  int size() const { return n_threads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> lk(run_mu_);
    stop_workers();
    n_threads_ = n < 1 ? 1 : n;
    stop_.store(false);
    // Workers start from the current (even) generation, read here: a worker that starts late
    // must not mistake the first parallel region for one it has already done.
    const uint64_t g0 = generation_.load();
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, g0] { worker_loop(g0); });
  }

  void run(int64_t n_tasks, FunctionRef<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1 || t_in_task) {
      const bool prev = t_in_task;
      t_in_task = true;
      try {
        for (int64_t i = 0; i < n_tasks; ++i) fn(i);
      } catch (...) { t_in_task = prev; throw; }
      t_in_task = prev;
      return;
    }
    std::lock_guard<std::mutex> lk(run_mu_);  // one parallel region at a time
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
    if (error_) std::rethrow_exception(error_);
  }

 private:
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

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Spin briefly (back-to-back kernel calls), then sleep on the generation counter.
      uint64_t g = generation_.load();
      for (int spin = 0; spin < 200000 && (g == seen || (g & 1)) && !stop_.load(std::memory_order_relaxed); ++spin) {
        NIBBLE_PAUSE();
        g = generation_.load();
      }
      if (stop_.load()) return;
      if (g == seen || (g & 1)) {
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

  void stop_workers() {
    stop_.store(true);
    generation_.fetch_add(2);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int n_threads_ = 1;
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

}  // namespace nibble
