// A file that appears at its target path only when complete.
//
// Bytes go to a temporary file created next to the target (same directory, so rename() is atomic
// and never crosses a file system); commit() flushes, fsyncs, renames over the target and fsyncs
// the directory. Destroying an uncommitted AtomicFile removes the temporary file, so an exception
// anywhere in a writer leaves the target path untouched. Small writes are buffered.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nibble::io {

class AtomicFile {
 public:
  // Creates the temporary file; throws nibble::Error naming the target and the directory.
  explicit AtomicFile(std::string target);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();
  uint64_t bytes_written() const { return written_; }
  const std::string& target() const { return target_; }
  const std::string& temp_path() const { return temp_; }

 private:
  void flush();
  void write_all(const void* data, size_t n);
  void discard() noexcept;
  std::string target_, temp_;
  int fd_ = -1;
  int cleanup_slot_ = -1;
  bool committed_ = false;
  bool failed_ = false;  // an I/O error happened: the temp file is suspect, refuse to go on
  uint64_t written_ = 0;
  std::vector<unsigned char> buf_;
  size_t buf_used_ = 0;
};

// Paths to unlink if the process is interrupted (SIGINT/SIGTERM handlers of long writers): every
// AtomicFile registers its temporary file *before* creating it and unregisters it once renamed or
// removed, so no window exists in which a temp file exists unregistered. Fixed slots, so that
// unlink_registered_paths() is async-signal-safe. register returns -1 when the table is full or
// the path too long (the file is then only cleaned up by the normal paths).
int register_cleanup_path(const std::string& path);
void unregister_cleanup_path(int slot);
void unlink_registered_paths() noexcept;  // async-signal-safe

// Directory part of `path` ("." when there is none).
std::string parent_dir(const std::string& path);

}  // namespace nibble::io
