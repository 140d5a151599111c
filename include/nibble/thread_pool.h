// nibble/thread_pool.h — the library's single thread pool.
//
// One pool for the whole library (no OpenMP: it would clash with torch's inside ComfyUI). The
// calling thread takes part; workers pick task indices from an atomic counter. Every op partitions
// its work over *output* tiles, and the math of a tile never depends on which thread runs it, so
// results are bit-identical for any thread count.
// Between back-to-back calls workers spin briefly before sleeping: waking a sleeping thread costs
// milliseconds on a shared host, more than a whole GEMV.
// Thread count: set_num_threads(), else env NIBBLE_NUM_THREADS, else the hardware concurrency.
//
// Thread safety: parallel_for() may be called from any number of threads: the pool runs one
// parallel region at a time (other callers wait their turn), and a parallel_for() from inside a
// task runs inline on that thread. set_num_threads() replaces the workers; call it while no
// parallel region runs.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

namespace nibble {

int num_threads();
void set_num_threads(int n);  // n <= 0 → default

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
