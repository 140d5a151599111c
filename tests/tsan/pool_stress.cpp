// ThreadSanitizer stress of the thread pool alone (make test-tsan-pool: this file + src/core/thread_pool.cpp,
// built in seconds): three callers run parallel regions while other threads resize the pool and change
// the spin time. The pool before this change failed it (run() read n_threads_ while resize() wrote it).
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>
#include "nibble/thread_pool.h"
using namespace nibble;
int main() {
  std::atomic<bool> stop{false};
  std::atomic<long> bad{0};
  std::thread resizer([&] { for (int n = 1; !stop.load(); n = n % 4 + 1) set_num_threads(n); });
#if 1
  std::thread spinner([&] { for (int i = 0; !stop.load(); ++i) set_spin_ms((i % 3) * 0.05); });
#endif
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c)
    callers.emplace_back([&, c] {
      for (int round = 0; round < 300; ++round) {
        const int64_t n = 1 + (round * 7 + c) % 29;
        std::vector<int> hits(size_t(n), 0);  // plain ints: each written by one task only
        parallel_for(n, [&](int64_t i) { hits[size_t(i)] += 1; });
        for (int64_t i = 0; i < n; ++i) if (hits[size_t(i)] != 1) ++bad;
      }
    });
  for (auto& t : callers) t.join();
  stop.store(true);
  resizer.join();
#if 1
  spinner.join();
#endif
  std::printf("bad=%ld threads=%d\n", bad.load(), num_threads());
  return bad.load() != 0;
}
