// AtomicFile: temp file in the target directory → fsync → rename → fsync(dir).
#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fmt/format.h>

#include "nibble/error.h"

namespace nibble::io {

namespace {
constexpr size_t kBufferBytes = size_t(4) << 20;  // writes smaller than this are coalesced

std::string errno_str(int e) { return std::strerror(e); }

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
}  // namespace

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

namespace {
constexpr int kCleanupSlots = 64;
struct CleanupSlot {
  std::atomic<bool> used{false};
  std::atomic<bool> armed{false};  // path written, visible to the signal handler
  char path[4096];
};
CleanupSlot g_cleanup[kCleanupSlots];
}  // namespace

int register_cleanup_path(const std::string& path) {
  if (path.size() >= sizeof(g_cleanup[0].path)) return -1;
  for (int i = 0; i < kCleanupSlots; ++i) {
    bool expected = false;
    if (!g_cleanup[i].used.compare_exchange_strong(expected, true)) continue;
    std::memcpy(g_cleanup[i].path, path.c_str(), path.size() + 1);
    g_cleanup[i].armed.store(true);
    return i;
  }
  return -1;
}

void unregister_cleanup_path(int slot) {
  if (slot < 0 || slot >= kCleanupSlots) return;
  g_cleanup[slot].armed.store(false);
  g_cleanup[slot].used.store(false);
}

void unlink_registered_paths() noexcept {
  for (auto& s : g_cleanup)
    if (s.armed.load()) ::unlink(s.path);
}

AtomicFile::AtomicFile(std::string target) : target_(std::move(target)) {
  if (target_.empty() || target_.back() == '/')
    throw Error(fmt::format("cannot write '{}': not a file path", target_));
  const std::string dir = parent_dir(target_);
  // A unique name per process and call; O_EXCL makes a collision a retry, never a clobber.
  static std::atomic<uint64_t> counter{0};
  const uint64_t stamp = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  int err = 0;
  for (int attempt = 0; attempt < 16; ++attempt) {
    temp_ = fmt::format("{}/.{}.tmp-{}-{}-{:x}", dir, base_name(target_), getpid(), counter++, stamp & 0xffffff);
    cleanup_slot_ = register_cleanup_path(temp_);  // before the file exists: no unregistered window
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ >= 0) break;
    err = errno;
    unregister_cleanup_path(cleanup_slot_);
    cleanup_slot_ = -1;
    if (err != EEXIST) break;
  }
  if (fd_ < 0) {
    const std::string why = errno_str(err);
    temp_.clear();
    throw IoError(fmt::format("cannot write '{}': cannot create a temporary file in directory '{}': {}", target_,
                              dir, why), target_, err);
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) discard();
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_.empty()) ::unlink(temp_.c_str());
  temp_.clear();
  unregister_cleanup_path(cleanup_slot_);
  cleanup_slot_ = -1;
}

void AtomicFile::write_all(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const size_t chunk = n < (size_t(1) << 30) ? n : (size_t(1) << 30);
    const ssize_t w = ::write(fd_, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      failed_ = true;
      throw IoError(fmt::format("cannot write '{}' (temporary file '{}'): {}", target_, temp_, errno_str(e)), target_,
                    e);
    }
    p += w;
    n -= size_t(w);
  }
}

void AtomicFile::flush() {
  if (buf_used_) write_all(buf_.data(), buf_used_);
  buf_used_ = 0;
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) throw Error(fmt::format("cannot write '{}': file already committed or discarded", target_));
  if (failed_) throw Error(fmt::format("cannot write '{}': an earlier write failed", target_));
  if (n == 0) return;
  if (buf_.empty()) buf_.resize(kBufferBytes);
  if (buf_used_ + n <= buf_.size()) {
    std::memcpy(buf_.data() + buf_used_, data, n);
    buf_used_ += n;
  } else {
    flush();
    if (n >= buf_.size()) {
      write_all(data, n);
    } else {
      std::memcpy(buf_.data(), data, n);
      buf_used_ = n;
    }
  }
  written_ += n;
}

void AtomicFile::commit() {
  if (fd_ < 0) throw Error(fmt::format("cannot commit '{}': file already committed or discarded", target_));
  if (failed_) throw Error(fmt::format("cannot commit '{}': an earlier write failed", target_));
  flush();
  if (::fsync(fd_) != 0) {
    const int e = errno;
    failed_ = true;
    throw IoError(fmt::format("cannot write '{}': fsync of '{}' failed: {}", target_, temp_, errno_str(e)), target_, e);
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int e = errno;
    throw IoError(fmt::format("cannot write '{}': close of '{}' failed: {}", target_, temp_, errno_str(e)), target_, e);
  }
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    const int e = errno;
    throw IoError(fmt::format("cannot write '{}': rename from '{}' failed: {}", target_, temp_, errno_str(e)), target_,
                  e);
  }
  committed_ = true;
  temp_.clear();
  unregister_cleanup_path(cleanup_slot_);
  cleanup_slot_ = -1;
  // Make the rename itself durable; failure here cannot un-write the file, so it is not an error.
  const int dfd = ::open(parent_dir(target_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace nibble::io
