// nibble/error.h — the exception types of the library.
//
// Every failure the user can cause (bad file, bad shape, unknown format) is reported as a
// nibble::Error whose message names the file / tensor / layer, the offending field, and what was
// expected. The library never aborts on bad input. Failures of the file itself — it cannot be
// opened, read, mapped or written, or it is shorter than its own header says (truncated) — are
// the subclass nibble::IoError, which also carries the path and the errno value (0 when the cause
// is not an OS error, e.g. truncation). Python maps IoError to nibble.FileError (an OSError) and
// every other Error to nibble.InputError (a ValueError).
//
// Thread safety: nibble::Error and IoError are ordinary exception values with no shared state:
// safe from any thread.
#pragma once
#include <stdexcept>
#include <string>
#include <utility>

namespace nibble {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

class IoError : public Error {
 public:
  IoError(const std::string& what, std::string path, int err = 0)
      : Error(what), path_(std::move(path)), err_(err) {}
  const std::string& path() const noexcept { return path_; }
  int error_code() const noexcept { return err_; }  // errno, or 0 (e.g. a truncated file)

 private:
  std::string path_;
  int err_;
};

}  // namespace nibble
