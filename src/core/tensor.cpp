// Tensor storage, shape arithmetic and float conversions.
#include "nibble/tensor.h"

#include <sys/mman.h>

#include <cstdint>
#include <string>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>
#include <cstring>
#include <fmt/format.h>

namespace nibble {

std::string shape_str(const Shape& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

int64_t shape_numel(const Shape& s) {
  // The product of the non-zero dimensions must fit in int64, also when a zero makes the element
  // count 0: then no product of any subset of the dimensions (strides, row sizes, the shape
  // checks of the formats) can overflow, in whatever order code multiplies them.
  int64_t n = 1;
  bool zero = false;
  for (int64_t d : s) {
    if (d < 0) throw Error(fmt::format("negative dimension in shape {}", shape_str(s)));
    if (d == 0) {
      zero = true;
      continue;
    }
    if (n > INT64_MAX / d) throw Error(fmt::format("shape {} overflows int64", shape_str(s)));
    n *= d;
  }
  return zero ? 0 : n;
}

// Buffers of 4 MiB and more (layer outputs and activations at large M) are mapped directly and, when
// freed, kept in a small process-wide cache (at most kCacheBlocks blocks, kCacheBytes bytes; oldest
// dropped first) for the next request of about the same size. Without it glibc maps such sizes
// afresh on every call and a 48 MiB output takes ~12k page faults on first touch: ~15 % of the CPU
// time of an M = 4096 W4A4 layer went to the kernel zeroing pages. A model step asks for the same
// sizes layer after layer, so the cache turns that into plain reuse. (Huge-page advice was tried for these
// per-call buffers and dropped: direct compaction stalled for up to 100 ms on a busy host; prepared
// weights take it, below.) Sanitizer builds skip the cache.
namespace {
constexpr size_t kBig = size_t(4) << 20, kPage = size_t(64) << 10;
constexpr size_t kCacheBlocks = 8, kCacheBytes = size_t(512) << 20;
struct BigBlock {
  void* p;
  size_t len;
};
struct BigCache {
  std::mutex mu;
  std::vector<BigBlock> free;  // oldest first
  size_t bytes = 0;
  ~BigCache() {
    for (const BigBlock& b : free) munmap(b.p, b.len);
  }
};
// Two caches: plain blocks, and 2 MiB-aligned blocks advised for huge pages (weights_alloc_bytes).
BigCache& big_cache(bool huge) {
  static BigCache* c = new BigCache[2];  // never destroyed: tensors may be freed during static destruction
  return c[huge ? 1 : 0];
}
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kUseCache = false;
#else
constexpr bool kUseCache = true;
#endif
void big_release(void* p, size_t len, bool huge) {
  if (kUseCache && len <= kCacheBytes) {
    BigCache& c = big_cache(huge);
    std::lock_guard<std::mutex> lock(c.mu);
    c.free.push_back({p, len});
    c.bytes += len;
    while (c.free.size() > kCacheBlocks || c.bytes > kCacheBytes) {
      munmap(c.free.front().p, c.free.front().len);
      c.bytes -= c.free.front().len;
      c.free.erase(c.free.begin());
    }
    return;
  }
  munmap(p, len);
}
// The smallest cached block of len .. 1.25·len, taken out of the cache; null when none fits.
void* take_cached(size_t len, bool huge, size_t* got) {
  if (!kUseCache) return nullptr;
  BigCache& c = big_cache(huge);
  std::lock_guard<std::mutex> lock(c.mu);
  size_t best = c.free.size();
  for (size_t i = 0; i < c.free.size(); ++i)
    if (c.free[i].len >= len && c.free[i].len <= len + len / 4 && (best == c.free.size() || c.free[i].len < c.free[best].len))
      best = i;
  if (best == c.free.size()) return nullptr;
  void* p = c.free[best].p;
  *got = c.free[best].len;
  c.bytes -= *got;
  c.free.erase(c.free.begin() + std::ptrdiff_t(best));
  return p;
}
std::shared_ptr<void> big_alloc_bytes(size_t n) {
  const size_t len = (n + kPage - 1) / kPage * kPage;
  size_t got = 0;
  void* p = take_cached(len, false, &got);
  if (!p) {
    p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error(fmt::format("out of memory allocating {} bytes", n));
    got = len;
  }
  return std::shared_ptr<void>(p, [got](void* q) { big_release(q, got, false); });
}

// Buffers kept for the life of a model (weights prepared at load): 2 MiB-aligned mappings advised for
// transparent huge pages (MADV_HUGEPAGE; THP's "madvise" mode is Debian's default). A streamed weight
// crosses 512× fewer pages: on the AWQ GEMV stream (K = 3072, N = 18432, 2 threads, one process, 4 KiB
// vs huge pages) 1.10–1.17× the weight bytes/s; the bf16 GEMV's weights gained about as much
// (1.07–1.22×), which is why the benchmarks' weight copies use this allocation too. Unlike per-call
// outputs (above) the compaction a huge page may need is paid once, at load. Freed blocks go to their
// own cache: without it `nibble demo`, which prepares layers several times, spent +0.5 s zeroing fresh
// mappings. Used for the memory-bound AWQ stream only: the compute-bound packs (dense, W4A4) gained
// nothing measurable and glibc recycles their memory. NIBBLE_HUGEPAGES=0 turns the advice off.
bool hugepage_advice() {
  static const bool on = [] {
    const char* e = std::getenv("NIBBLE_HUGEPAGES");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}
}  // namespace

static std::shared_ptr<void> aligned_alloc_bytes(size_t n) {
  if (n >= kBig) return big_alloc_bytes(n);
  const size_t rounded = (n + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw Error(fmt::format("out of memory allocating {} bytes", n));
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

static std::shared_ptr<void> weights_alloc_bytes(size_t n) {
  constexpr size_t kHuge = size_t(2) << 20;
  if (n < kHuge || !hugepage_advice()) return aligned_alloc_bytes(n);
  if (n > SIZE_MAX - 2 * kHuge) throw Error(fmt::format("out of memory allocating {} bytes", n));
  const size_t len = (n + kHuge - 1) / kHuge * kHuge;
  size_t got = len;
  void* p = take_cached(len, true, &got);
  if (!p) {
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw Error(fmt::format("out of memory allocating {} bytes", n));
    const uintptr_t r = reinterpret_cast<uintptr_t>(raw), a = (r + kHuge - 1) / kHuge * kHuge;
    if (a > r) munmap(raw, a - r);  // the slack before the aligned start, and after its end
    if (r + len + kHuge > a + len) munmap(reinterpret_cast<void*>(a + len), r + len + kHuge - (a + len));
    p = reinterpret_cast<void*>(a);
    (void)madvise(p, len, MADV_HUGEPAGE);  // advice: refused or ignored where THP is unavailable
  }
  return std::shared_ptr<void>(p, [got](void* q) { big_release(q, got, true); });
}

Tensor Tensor::owning(DType dtype, Shape shape, std::shared_ptr<void> (*alloc)(size_t nbytes)) {
  Tensor t;
  t.dtype_ = dtype;
  t.dtype_set_ = true;
  t.numel_ = shape_numel(shape);
  t.nbytes_ = dtype_nbytes(dtype, uint64_t(t.numel_));
  t.shape_ = std::move(shape);
  auto buf = alloc(t.nbytes_);
  t.data_ = buf.get();
  t.storage_ = std::move(buf);
  t.writable_ = true;
  return t;
}

Tensor Tensor::empty(DType dtype, Shape shape) { return owning(dtype, std::move(shape), &aligned_alloc_bytes); }

std::string weights_hugepage_status() {
  if (!hugepage_advice()) return "off (NIBBLE_HUGEPAGES=0)";
  std::string mode = "unknown";
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char line[128] = {0};
    if (std::fgets(line, sizeof line, f)) {
      const char* a = std::strchr(line, '[');
      const char* b = a ? std::strchr(a, ']') : nullptr;
      if (a && b) mode.assign(a + 1, b);
    }
    std::fclose(f);
  }
  if (mode == "never") return "not available (THP: never)";
  return "huge pages advised from 2 MiB (THP: " + mode + ")";
}

Tensor Tensor::empty_weights(DType dtype, Shape shape) {
  return owning(dtype, std::move(shape), &weights_alloc_bytes);
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  std::memset(const_cast<void*>(t.data_), 0, t.nbytes_);
  return t;
}

Tensor Tensor::view(DType dtype, Shape shape, const void* data, std::shared_ptr<const void> keepalive,
                    bool writable) {
  Tensor t;
  t.dtype_ = dtype;
  t.dtype_set_ = true;
  t.numel_ = shape_numel(shape);
  t.nbytes_ = dtype_nbytes(dtype, uint64_t(t.numel_));
  t.shape_ = std::move(shape);
  t.data_ = data;
  t.storage_ = std::move(keepalive);
  t.writable_ = writable;
  return t;
}

Tensor Tensor::from_bytes(DType dtype, Shape shape, const void* bytes, size_t nbytes) {
  Tensor t = empty(dtype, std::move(shape));
  if (nbytes != t.nbytes_)
    throw Error(fmt::format("from_bytes: {} bytes given, {} {} needs {}", nbytes, dtype_name(dtype),
                            shape_str(t.shape_), t.nbytes_));
  if (nbytes) std::memcpy(const_cast<void*>(t.data_), bytes, nbytes);
  return t;
}

int64_t Tensor::size(int64_t i) const {
  const int64_t d = dim();
  if (i < 0) i += d;
  if (i < 0 || i >= d) throw Error(fmt::format("dimension {} out of range for shape {}", i, shape_str(shape_)));
  return shape_[size_t(i)];
}

void* Tensor::mutable_raw() {
  if (!writable_) throw Error("tensor is a read-only view (clone() it to modify)");
  return const_cast<void*>(data_);
}

Tensor Tensor::reshape(Shape shape) const {
  if (shape_numel(shape) != numel_)
    throw Error(fmt::format("cannot reshape {} to {}", shape_str(shape_), shape_str(shape)));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(dtype_, shape_);
  if (nbytes_) std::memcpy(const_cast<void*>(t.data_), data_, nbytes_);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  if (dim() < 1 || begin < 0 || end < begin || end > shape_[0])
    throw Error(fmt::format("slice_rows [{}, {}) out of range for shape {}", begin, end, shape_str(shape_)));
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.numel_ = shape_numel(t.shape_);
  const size_t row_bytes = shape_[0] ? nbytes_ / size_t(shape_[0]) : 0;
  t.data_ = static_cast<const uint8_t*>(data_) + size_t(begin) * row_bytes;
  t.nbytes_ = size_t(end - begin) * row_bytes;
  return t;
}

static float load_as_f32(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return float(static_cast<const double*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F8_E4M3: return fp8_e4m3_to_f32(static_cast<const uint8_t*>(p)[i]);
    case DType::F8_E5M2: return fp8_e5m2_to_f32(static_cast<const uint8_t*>(p)[i]);
    case DType::F8_E8M0: return e8m0_to_f32(static_cast<const uint8_t*>(p)[i]);
    default: break;
  }
  throw Error(fmt::format("cannot convert {} to a float dtype", dtype_name(t)));
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor out = empty(dtype, shape_);
  void* o = const_cast<void*>(out.data_);
  // Tight loops for the conversions every op does on its activations (the generic per-element
  // switch below costs ~1.6 ns per element, a visible share of a 1 ms GEMV's setup).
  if (dtype == DType::F32 && (dtype_ == DType::BF16 || dtype_ == DType::F16)) {
    const uint16_t* in = static_cast<const uint16_t*>(data_);
    float* of = static_cast<float*>(o);
    if (dtype_ == DType::BF16)
      for (int64_t i = 0; i < numel_; ++i) of[i] = bf16_to_f32(in[i]);
    else
      for (int64_t i = 0; i < numel_; ++i) of[i] = f16_to_f32(in[i]);
    return out;
  }
  if (dtype_ == DType::F32 && dtype == DType::BF16) {
    const float* in = static_cast<const float*>(data_);
    uint16_t* ob = static_cast<uint16_t*>(o);
    for (int64_t i = 0; i < numel_; ++i) ob[i] = f32_to_bf16(in[i]);
    return out;
  }
  for (int64_t i = 0; i < numel_; ++i) {
    if (dtype_ == DType::F64 && dtype == DType::F32) {  // avoid double rounding through f32
      static_cast<float*>(o)[i] = float(static_cast<const double*>(data_)[i]);
      continue;
    }
    const float f = load_as_f32(dtype_, data_, i);
    switch (dtype) {
      case DType::F32: static_cast<float*>(o)[i] = f; break;
      case DType::F64: static_cast<double*>(o)[i] = f; break;
      case DType::F16: static_cast<uint16_t*>(o)[i] = f32_to_f16(f); break;
      case DType::BF16: static_cast<uint16_t*>(o)[i] = f32_to_bf16(f); break;
      case DType::F8_E4M3: static_cast<uint8_t*>(o)[i] = f32_to_fp8_e4m3(f); break;
      case DType::F8_E5M2: static_cast<uint8_t*>(o)[i] = f32_to_fp8_e5m2(f); break;
      default: throw Error(fmt::format("cannot convert to {}", dtype_name(dtype)));
    }
  }
  return out;
}

Tensor Tensor::to_f32() const { return dtype_ == DType::F32 ? *this : to(DType::F32); }

void check_dtype(const Tensor& t, std::initializer_list<DType> allowed, const std::string& what) {
  for (DType d : allowed)
    if (t.dtype() == d) return;
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : "|") + std::string(dtype_name(d));
  throw Error(fmt::format("{}: expected dtype {}, got {}", what, names, dtype_name(t.dtype())));
}

void check_shape(const Tensor& t, const Shape& expected, const std::string& what) {
  if (t.shape() != expected)
    throw Error(fmt::format("{}: expected shape {}, got {}", what, shape_str(expected), shape_str(t.shape())));
}

}  // namespace nibble
