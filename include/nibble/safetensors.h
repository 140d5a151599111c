// nibble/safetensors.h — checkpoint I/O: mmap reader, sharded checkpoints, streaming writer.
//
// Reader: the whole file is mapped read-only; tensors are zero-copy views that keep the mapping
// alive. The header is validated completely at open (size caps, UTF-8, duplicate keys via a SAX
// pass, dtypes, shape overflow, byte lengths, offsets in bounds / non-overlapping / no holes);
// every error is a nibble::Error naming the file and the tensor. No allocation is sized from an
// unchecked header value.
// Writer: streaming. All tensors are declared first (so the header and every offset are known),
// then their bytes are written in declaration order, in as many chunks as the caller likes. Output
// goes to a temporary file in the target directory, is fsync'ed and renamed on commit(); a writer
// destroyed without commit() removes the temporary file, so a failure leaves nothing at the target.
//
// Thread safety: A SafetensorsFile or Checkpoint is immutable once opened: its const members and
// the tensors it returns may be used from any thread, and the mapping lives as long as any of
// those tensors. A mapped tensor is read-only; a file truncated by another process while mapped
// raises SIGBUS on access (mmap's limit). A SafetensorsWriter is not thread-safe: one thread
// drives it. release_mapped_pages() is thread-safe.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/tensor.h"

namespace nibble {

// Drops the resident pages of a tensor that is a view of a mapped checkpoint file (madvise
// MADV_DONTNEED on the whole pages inside it). The mapping is private and read-only, so the next
// read faults the bytes in again from the file: the tensor stays valid (for saving, dequantizing),
// it just stops occupying memory until then. The runtime calls this on stored tensors that a
// load-time repack made redundant. Returns the bytes released; 0 (and does nothing) for tensors
// that are not file views (heap memory would be zeroed). Thread-safe.
size_t release_mapped_pages(const Tensor& t);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
  uint64_t nbytes() const { return end - begin; }
};

class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws nibble::Error.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Validates an in-memory image (used by the fuzzer and tests); `label` names it in errors.
  static std::shared_ptr<SafetensorsFile> from_memory(std::shared_ptr<const void> keepalive,
                                                      const void* data, size_t size,
                                                      std::string label);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  // Tensors in data (offset) order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  // Zero-copy view; throws if missing.
  // (A tensor whose bytes are not aligned to its element size is returned as an aligned copy.)
  Tensor get(std::string_view name) const;
  // The "__metadata__" object (string → string).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Raw header JSON text (for diagnostics).
  const std::string& header_json() const { return header_; }

 private:
  SafetensorsFile() = default;
  struct Impl;
  void parse(const void* data, size_t size);
  std::string path_;
  uint64_t size_ = 0;
  std::shared_ptr<const void> mapping_;
  const uint8_t* data_section_ = nullptr;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
  std::string header_;
};

// A checkpoint: one .safetensors file, a `*.safetensors.index.json` (weight_map), or a directory
// of *.safetensors shards. Tensor names are unique across shards (duplicates are an error).
class Checkpoint {
 public:
  static Checkpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  // All tensor names, sorted.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;  // throws if missing
  Tensor get(std::string_view name) const;              // zero-copy; throws if missing
  const std::string& file_of(std::string_view name) const;
  // __metadata__ of the first shard merged with the index's "metadata" (strings only).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& shards() const { return shards_; }
  uint64_t total_bytes() const;  // sum of tensor byte sizes

 private:
  std::string path_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::pair<size_t, size_t>, std::less<>> where_;  // name → (shard, index)
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();  // without commit(): removes the temporary file
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Phase 1: declare tensors (order = order in the file and in the header).
  void add(std::string name, DType dtype, Shape shape);
  // Bytes the finished file will have (valid after all add()).
  uint64_t planned_file_size() const;
  // Phase 2: write bytes for the current tensor (chunks appended; the tensor is complete when its
  // byte count is reached, then the next declared tensor becomes current). Starts the file on the
  // first call. Throws on overflow of a tensor or a mismatched name.
  void write(std::string_view name, const void* data, size_t nbytes);
  void write_tensor(std::string_view name, const Tensor& t);
  // Phase 3: every tensor must be complete. fsync + rename to the target path.
  void commit();
  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

// Writes a complete file from in-memory tensors (declaration order = vector order).
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});
// Writes a `*.safetensors.index.json` (atomically, like the writer).
void write_safetensors_index(const std::string& path,
                             const std::map<std::string, std::string>& weight_map,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace nibble
