// nibble/tensor.h — the one tensor type: a dense row-major array with shared storage.
//
// A Tensor either owns an aligned heap buffer or is a zero-copy view into a memory-mapped file
// (it then holds a shared_ptr that keeps the mapping alive). Tensors are always contiguous and
// row-major; shapes are int64. Views into read-only mappings are not writable: mutable access
// throws. Copies of a Tensor share storage (like torch); use clone() for a deep copy.
//
// Thread safety: A Tensor is a value. Const members may be called concurrently on one tensor and
// on copies that share its storage; the storage's reference count is atomic, so copies may be made
// and dropped on any thread. Writing through mutable_raw()/mutable_data() while another thread
// reads the same storage (a copy shares it) is a data race the caller must avoid.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "nibble/dtype.h"
#include "nibble/error.h"

namespace nibble {

using Shape = std::vector<int64_t>;
// How empty_weights() buffers are backed on this host, for diagnostics (`nibble --version`, the
// benchmarks' headers): e.g. "huge pages advised (THP: madvise)", "off (NIBBLE_HUGEPAGES=0)".
std::string weights_hugepage_status();
std::string shape_str(const Shape& s);  // "(3, 4)"
// Product of dims; throws nibble::Error on negative dims or int64 overflow.
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Owning, 64-byte aligned, uninitialized.
  static Tensor empty(DType dtype, Shape shape);
  // The same, for a buffer kept for the life of a model (weights prepared at load): from 2 MiB up,
  // 2 MiB-aligned and advised for transparent huge pages (env NIBBLE_HUGEPAGES=0: plain pages).
  static Tensor empty_weights(DType dtype, Shape shape);
  static Tensor zeros(DType dtype, Shape shape);
  // Zero-copy view of external memory; `keepalive` owns it (may be null for borrowed memory
  // that outlives the tensor).
  static Tensor view(DType dtype, Shape shape, const void* data,
                     std::shared_ptr<const void> keepalive, bool writable = false);
  // Owning copy of `bytes`.
  static Tensor from_bytes(DType dtype, Shape shape, const void* bytes, size_t nbytes);

  bool defined() const { return dtype_set_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return int64_t(shape_.size()); }
  int64_t size(int64_t i) const;  // negative i counts from the end
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return nbytes_; }
  bool writable() const { return writable_; }

  const void* raw() const { return data_; }
  void* mutable_raw();  // throws if not writable
  template <class T> const T* data() const { return static_cast<const T*>(data_); }
  template <class T> T* mutable_data() { return static_cast<T*>(mutable_raw()); }

  // Same storage, new shape (numel must match).
  Tensor reshape(Shape shape) const;
  // Deep, owning, writable copy.
  Tensor clone() const;
  // Element-wise conversion of float dtypes (F64/F32/F16/BF16/F8_*) to another float dtype; RNE.
  Tensor to(DType dtype) const;
  // Convenience: to(F32) without a copy when already F32.
  Tensor to_f32() const;
  // Rows [begin, end) of the first dimension, zero-copy.
  Tensor slice_rows(int64_t begin, int64_t end) const;

 private:
  // empty() and empty_weights(): an owning tensor on `nbytes` from `alloc`
  static Tensor owning(DType dtype, Shape shape, std::shared_ptr<void> (*alloc)(size_t nbytes));
  std::shared_ptr<const void> storage_;
  const void* data_ = nullptr;
  DType dtype_ = DType::F32;
  bool dtype_set_ = false;
  bool writable_ = false;
  Shape shape_;
  int64_t numel_ = 0;
  size_t nbytes_ = 0;
};

// Checks used by every op: throw nibble::Error("<what>: expected ..., got ...").
void check_dtype(const Tensor& t, std::initializer_list<DType> allowed, const std::string& what);
void check_shape(const Tensor& t, const Shape& expected, const std::string& what);

}  // namespace nibble
