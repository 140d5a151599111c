// nibble/thread_pool.h — the library's single thread pool.
//
// One pool for the whole library (no OpenMP: it would clash with torch's inside ComfyUI). The
// calling thread takes part; workers pick task indices from an atomic counter. Every op partitions
// its work over *output* tiles, and the math of a tile never depends on which thread runs it, so
// results are bit-identical for any thread count.
// Between back-to-back calls workers spin for spin_ms() before sleeping: waking a sleeping thread
// costs tens of microseconds to milliseconds on a shared host, more than a whole GEMV; spinning
// longer than the gaps between one caller's ops only steals a core from other work in the process
// (torch inside ComfyUI). Spin time: set_spin_ms(), else env NIBBLE_SPIN_MS, else kDefaultSpinMs.
// Thread count: set_num_threads(), else env NIBBLE_NUM_THREADS, else the hardware concurrency.
//
// Thread safety: parallel_for() may be called from any number of threads: the pool runs one
// parallel region at a time (other callers wait their turn), and a parallel_for() from inside a
// task runs inline on that thread. set_num_threads() and set_spin_ms() may be called from any
// thread at any time: set_num_threads() waits for the running region before it replaces the
// workers (from inside a task it throws nibble::Error). tests/test_threads.cpp, make test-tsan.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

namespace nibble {

int num_threads();
void set_num_threads(int n);  // n <= 0 → default

// Idle-worker spin time in milliseconds (0: sleep right after a region).
inline constexpr double kDefaultSpinMs = 0.25;
inline constexpr double kMaxSpinMs = 1000.0;
double spin_ms();
void set_spin_ms(double ms);  // ms < 0 → the default (NIBBLE_SPIN_MS or kDefaultSpinMs); > kMaxSpinMs throws
// Parses a NIBBLE_SPIN_MS value: a decimal number in [0, kMaxSpinMs]. An invalid env value makes the
// first use of the pool throw nibble::Error naming it.
bool parse_spin_ms(const char* s, double* out);

// A non-owning callable reference (no allocation per parallel_for call).
template <class Sig> class FunctionRef;
template <class R, class... A> class FunctionRef<R(A...)> {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, FunctionRef>>>
  FunctionRef(F&& f) : obj_((void*)&f), call_([](void* o, A... a) -> R {
    return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<A>(a)...);
  }) {}
  R operator()(A... a) const { return call_(obj_, std::forward<A>(a)...); }
 private:
  void* obj_;
  R (*call_)(void*, A...);
};

// Runs fn(i) for every i in [0, n_tasks), spread over the pool; returns when all are done.
// Nested calls (from inside a task) run serially on the calling thread.
// An exception thrown by a task is rethrown here (the first one; remaining tasks still finish).
void parallel_for(int64_t n_tasks, FunctionRef<void(int64_t)> fn);

// Split [0, n) into chunks of `grain` and run fn(begin, end) for each chunk.
inline void parallel_for_range(int64_t n, int64_t grain, FunctionRef<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t tasks = (n + grain - 1) / grain;
  parallel_for(tasks, [&](int64_t t) {
    const int64_t b = t * grain, e = b + grain < n ? b + grain : n;
    fn(b, e);
  });
}

}  // namespace nibble
