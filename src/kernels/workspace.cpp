// Per-thread driver scratch and the tests' poison fill (src/kernels/workspace.h).
#include "kernels/workspace.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

namespace nibble::kernels {

namespace {
std::atomic<bool> g_fill_on{false};
std::atomic<uint32_t> g_fill_bits{0};

struct Block {
  void* p = nullptr;
  size_t cap = 0;
  ~Block() { std::free(p); }
};
}  // namespace

void* thread_scratch(Slot slot, size_t bytes) {
  thread_local Block blocks[int(Slot::Count)];
  Block& b = blocks[int(slot)];
  if (bytes == 0) bytes = 64;
  if (b.cap < bytes) {
    const size_t cap = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, cap);
    if (!p) throw std::bad_alloc();
    std::free(b.p);
    b.p = p;
    b.cap = cap;
  }
  if (test_fill_active()) test_fill(static_cast<float*>(b.p), int64_t(bytes / sizeof(float)));
  return b.p;
}

void set_test_fill(std::optional<float> v) {
  if (v) {
    uint32_t bits;
    std::memcpy(&bits, &*v, 4);
    g_fill_bits.store(bits, std::memory_order_relaxed);
  }
  g_fill_on.store(v.has_value(), std::memory_order_release);
}

bool test_fill_active() { return g_fill_on.load(std::memory_order_acquire); }

void test_fill(float* p, int64_t n) {
  if (!test_fill_active()) return;
  const uint32_t bits = g_fill_bits.load(std::memory_order_relaxed);
  float v;
  std::memcpy(&v, &bits, 4);
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

}  // namespace nibble::kernels
